"""Worker identity in the ERC-8004 IdentityRegistry: registering a worker as an agent
(`dispatch worker register`) and the coordinator's check of a worker's claim to an agent
(EvmIdentityVerifier, an agent_identity.IdentityVerifier).

Blocking web3.py code; the verifier runs it with asyncio.to_thread and caches what it
verified for a TTL, so a reconnecting worker costs no chain reads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from dispatchnet.agent_identity import (
    ED25519_METADATA_KEY,
    REGISTRATION_TYPE,
    SOLANA_METADATA_KEY,
    RegistrationFileError,
    VerifiedAgent,
    agent_proof_message,
    base58,
    base58_decode,
    check_registration_uri,
    parse_agent_id,
    solana_link_message,
)
from dispatchnet.chains.deployments import ChainConfigError
from dispatchnet.chains.evm.deploy import load_artifact
from dispatchnet.chains.evm.node import TRANSIENT, EvmChain, EvmSender, _brief, _hex, web3_for
from dispatchnet.errors import FailedPrecondition, Unauthenticated, Unavailable
from dispatchnet.keys import verify as ed25519_verify

log = logging.getLogger("dispatch.identity")
_ABI: list[dict[str, Any]] = []


def identity_contract(w3: Web3, address: str) -> Contract:
    if not _ABI:
        _ABI.extend(load_artifact("IdentityRegistry").abi)
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=_ABI)


def sign_agent_proof(
    chain_key: str,
    nonce: bytes,
    coordinator_public_key: bytes,
    worker_public_key: bytes,
    agent_id: str,
) -> bytes:
    """The worker's ChallengeResponse.chain_signature (EIP-191 personal_sign)."""
    msg = agent_proof_message(nonce, coordinator_public_key, worker_public_key, agent_id)
    return bytes(Account.sign_message(encode_defunct(msg), chain_key).signature)


# --- registering ----------------------------------------------------------------------------


def registration_file(
    name: str,
    description: str,
    endpoint: str,
    ed25519_public_key: bytes,
    agent_id: int | None = None,
    chain: EvmChain | None = None,
    solana: str = "",
) -> dict[str, Any]:
    """An ERC-8004 registration-v1 file for a worker (registrations once the id is known).
    dispatch.solana lists the worker's Solana address: `solana`, by default its ed25519
    key in base58 (the same key is a Solana address)."""
    data: dict[str, Any] = {
        "type": REGISTRATION_TYPE,
        "name": name,
        "description": description,
        "services": [{"name": "gRPC", "endpoint": endpoint, "version": "dispatch.v1"}],
        "supportedTrust": ["reputation"],
        "dispatch": {
            "ed25519": ed25519_public_key.hex(),
            "solana": solana or base58(ed25519_public_key),
        },
    }
    if agent_id is not None and chain is not None:
        data["registrations"] = [
            {"agentId": agent_id, "agentRegistry": f"{chain.network}:{chain.identity_registry}"}
        ]
    return data


def data_uri(doc: dict[str, Any]) -> str:
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return "data:application/json;base64," + base64.b64encode(raw).decode()


def fund_dev_account(chain: EvmChain, address: str, wei: int, timeout: float = 10.0) -> bool:
    """On a local anvil chain: gives `address` `wei` with anvil_setBalance when it has less.
    True when it funded it."""
    w3 = web3_for(chain.rpc_url, timeout)
    if w3.eth.get_balance(Web3.to_checksum_address(address)) >= wei:
        return False
    w3.provider.make_request("anvil_setBalance", [address, hex(wei)])  # type: ignore[arg-type]
    return True


def register_worker(
    chain: EvmChain,
    chain_key: str,
    ed25519_public_key: bytes,
    *,
    name: str,
    description: str,
    endpoint: str,
    gas_limit: int = 1_000_000,
    timeout: float = 60.0,
    solana: str = "",
) -> dict[str, Any]:
    """Registers the worker as an agent owned by chain_key's account: register(uri, metadata)
    with dispatch.ed25519 and dispatch.solana (`solana`, a base58 Solana address; default
    the ed25519 key's), then setAgentURI with the final registration file (which names the
    new agent id and lists the same Solana address). Blocking. Returns agent_id,
    chain_address, tx."""
    if not chain.identity_registry:
        raise ChainConfigError("[chain] has no identity_registry address")
    w3 = web3_for(chain.rpc_url, timeout)
    sender = EvmSender(w3, chain.network, chain_key)
    registry = identity_contract(w3, chain.identity_registry)
    solana = solana or base58(ed25519_public_key)
    first = registration_file(name, description, endpoint, ed25519_public_key, solana=solana)
    metadata = [
        (ED25519_METADATA_KEY, ed25519_public_key),
        (SOLANA_METADATA_KEY, solana.encode()),
    ]
    fn = registry.functions.register(data_uri(first), metadata)
    receipt = _mine(sender, fn, gas_limit, timeout)
    events = registry.events.Registered().process_receipt(receipt, errors=DISCARD)
    if not events:
        raise RuntimeError(
            f"register transaction {_hex(receipt['transactionHash'])} emitted no Registered"
        )
    agent_id = int(events[0]["args"]["agentId"])
    final = registration_file(
        name, description, endpoint, ed25519_public_key, agent_id, chain, solana=solana
    )
    receipt2 = _mine(
        sender, registry.functions.setAgentURI(agent_id, data_uri(final)), gas_limit, timeout
    )
    return {
        "agent_id": str(agent_id),
        "chain_address": str(sender.address),
        "tx": _hex(receipt["transactionHash"]),
        "uri_tx": _hex(receipt2["transactionHash"]),
        "network": chain.network,
        "identity_registry": chain.identity_registry,
        "solana": solana,
    }


def _mine(sender: EvmSender, fn: Any, gas_limit: int, timeout: float) -> Any:
    with sender.lock:
        tx = sender.send(fn, gas_limit)
    receipt = sender.w3.eth.wait_for_transaction_receipt(HexBytes(tx), timeout=timeout)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {_hex(tx)} reverted")
    return receipt


# --- verifying ------------------------------------------------------------------------------


class EvmIdentityVerifier:
    """Checks a worker's chain_signature against the IdentityRegistry: the signer must be
    ownerOf(agentId) or getAgentWallet(agentId), and getMetadata(agentId, "dispatch.ed25519")
    must equal the worker's ed25519 key; tokenURI(agentId), the registration file, must pass
    check_registration_uri (a data: URI is parsed, an http(s)/ipfs one is not fetched and
    only logged as unchecked). Verified (agent, address, key) triples are cached for
    ttl_seconds.

    With solana_link (the Solana track, whose identities live on this EVM chain), the agent
    must also link a Solana key: getMetadata(agentId, "dispatch.solana") names it (base58),
    the registration file (when it is a data: URI) lists the same address as
    dispatch.solana, and every Connect's solana_signature must verify under it (the key is
    cached with the triple, the signature over the fresh nonce is checked each time)."""

    def __init__(
        self,
        chain: EvmChain,
        *,
        rpc_timeout: float = 10.0,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        solana_link: bool = False,
    ) -> None:
        if not chain.identity_registry:
            raise ChainConfigError("[chain] has no identity_registry address")
        self.chain = chain
        self.w3 = web3_for(chain.rpc_url, rpc_timeout)
        self.registry = identity_contract(self.w3, chain.identity_registry)
        self.ttl = ttl_seconds
        self.clock = clock
        self.solana_link = solana_link
        # (agent, address, key) -> (expiry, the agent's linked Solana key or b"", its owner)
        self._cache: dict[tuple[str, str, bytes], tuple[float, bytes, str]] = {}

    async def verify(
        self,
        agent_id: str,
        worker_public_key: bytes,
        nonce: bytes,
        coordinator_public_key: bytes,
        chain_signature: bytes,
        solana_signature: bytes = b"",
    ) -> VerifiedAgent:
        try:
            number = parse_agent_id(agent_id)
        except ValueError as e:
            raise Unauthenticated(str(e)) from None
        if len(chain_signature) != 65:
            raise Unauthenticated(
                f"agent {agent_id}: chain_signature must be a 65-byte EIP-191 signature by the "
                "agent's owner or agent wallet"
            )
        msg = agent_proof_message(nonce, coordinator_public_key, worker_public_key, agent_id)
        try:
            address = str(Account.recover_message(encode_defunct(msg), signature=chain_signature))
        except Exception as e:  # malformed signature (bad v, s out of range, ...)
            raise Unauthenticated(f"agent {agent_id}: chain_signature does not recover") from e
        if self.solana_link and len(solana_signature) != 64:
            raise Unauthenticated(
                f"agent {agent_id}: solana_signature must be a 64-byte ed25519 signature by "
                f'the Solana key its "{SOLANA_METADATA_KEY}" metadata names'
            )
        key = (agent_id, address, worker_public_key)
        now = self.clock()
        expiry, solana_key, owner = self._cache.get(key, (0.0, b"", ""))
        if expiry <= now:
            solana_key, owner = await asyncio.to_thread(
                self._check, number, address, worker_public_key
            )
            self._cache[key] = (now + self.ttl, solana_key, owner)
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        if self.solana_link:
            msg = solana_link_message(nonce, coordinator_public_key, worker_public_key, agent_id)
            if not ed25519_verify(solana_key, b"", msg, solana_signature):
                raise Unauthenticated(
                    f"agent {agent_id}: solana_signature does not verify for the Solana key "
                    f'{base58(solana_key)} that its "{SOLANA_METADATA_KEY}" metadata names'
                )
        return VerifiedAgent(agent_id, address, owner)

    def _check(self, agent_id: int, address: str, worker_public_key: bytes) -> tuple[bytes, str]:
        """Blocking chain reads; the agent's linked Solana key (b"" without solana_link)
        and its owner (ownerOf)."""
        f = self.registry.functions
        try:
            try:
                owner = str(f.ownerOf(agent_id).call())
            except ContractLogicError:
                raise Unauthenticated(
                    f"agent {agent_id} does not exist in IdentityRegistry "
                    f"{self.registry.address} on {self.chain.network}"
                ) from None
            wallet = str(f.getAgentWallet(agent_id).call())
            if address.lower() not in {owner.lower(), wallet.lower()}:
                raise Unauthenticated(
                    f"agent {agent_id} is not controlled by {address} (the chain_signature's "
                    f"signer): its owner is {owner}"
                    + (f" and its agent wallet {wallet}" if int(wallet, 16) else "")
                )
            bound = bytes(f.getMetadata(agent_id, ED25519_METADATA_KEY).call())
            solana = (
                bytes(f.getMetadata(agent_id, SOLANA_METADATA_KEY).call())
                if self.solana_link
                else b""
            )
        except TRANSIENT as e:
            raise Unavailable(
                f"cannot check agent {agent_id} on chain {self.chain.network} at "
                f"{self.chain.rpc_url}: {_brief(e)}"
            ) from e
        if not bound:
            raise FailedPrecondition(
                f'agent {agent_id} has no "{ED25519_METADATA_KEY}" metadata: register the '
                "worker with `dispatch worker register`"
            )
        if len(bound) != 32:
            raise FailedPrecondition(
                f'agent {agent_id}: "{ED25519_METADATA_KEY}" metadata is {len(bound)} bytes, '
                "not a 32-byte ed25519 public key"
            )
        if bound != worker_public_key:
            raise Unauthenticated(
                f"agent {agent_id} is bound to ed25519 key {bound.hex()[:16]}… "
                f"("
                f'"{ED25519_METADATA_KEY}"), not to this worker\'s key '
                f"{worker_public_key.hex()[:16]}…"
            )
        solana_key = self._solana_key(agent_id, solana) if self.solana_link else b""
        doc = self._check_registration_file(agent_id)
        if self.solana_link and doc is not None:
            listed = (doc.get("dispatch") or {}) if isinstance(doc.get("dispatch"), dict) else {}
            if listed.get("solana") != base58(solana_key):
                raise Unauthenticated(
                    f"agent {agent_id}: its registration file lists Solana address "
                    f"{str(listed.get('solana') or 'none')[:64]!r} (dispatch.solana), its "
                    f'"{SOLANA_METADATA_KEY}" metadata {base58(solana_key)}: both must name '
                    "the worker's Solana key"
                )
        return solana_key, owner

    def _solana_key(self, agent_id: int, metadata: bytes) -> bytes:
        """The 32-byte key that the agent's dispatch.solana metadata names in base58."""
        if not metadata:
            raise FailedPrecondition(
                f'agent {agent_id} has no "{SOLANA_METADATA_KEY}" metadata: register the '
                "worker with `dispatch worker register` for this profile"
            )
        try:
            key = base58_decode(metadata.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != 32:
            raise FailedPrecondition(
                f'agent {agent_id}: "{SOLANA_METADATA_KEY}" metadata is not a base58 Solana '
                "address (a 32-byte ed25519 key)"
            )
        return key

    def _check_registration_file(self, agent_id: int) -> dict[str, Any] | None:
        try:
            uri = str(self.registry.functions.tokenURI(agent_id).call())
        except TRANSIENT as e:
            raise Unavailable(
                f"cannot check agent {agent_id} on chain {self.chain.network} at "
                f"{self.chain.rpc_url}: {_brief(e)}"
            ) from e
        registry = f"eip155:{self.chain.chain_id}:{self.registry.address}"
        try:
            doc = check_registration_uri(uri, agent_id, registry)
        except RegistrationFileError as e:
            raise FailedPrecondition(
                f"agent {agent_id}: its registration file (tokenURI) is unusable: {e}; "
                "fix it with setAgentURI or `dispatch worker register`"
            ) from None
        if doc is None:
            log.info(
                "agent %d: registration file %s not checked (http(s)/ipfs URIs are not fetched)",
                agent_id,
                uri[:200],
            )
        return doc


class PayoutAddresses:
    """Where a registered worker is paid, read from the IdentityRegistry: on this EVM chain
    the agent's getAgentWallet, else its owner (solana=False); for the Solana track the
    Solana address its "dispatch.solana" metadata links (solana=True), which Connect
    checked against its registration file. Blocking; call it in a worker thread."""

    def __init__(self, chain: EvmChain, *, rpc_timeout: float = 10.0, solana: bool = False):
        if not chain.identity_registry:
            raise ChainConfigError("[chain] has no identity_registry address")
        self.chain = chain
        self.registry = identity_contract(
            web3_for(chain.rpc_url, rpc_timeout), chain.identity_registry
        )
        self.solana = solana

    def __call__(self, agent_id: str) -> str | None:
        """The agent's payout address; None when it has none (unknown agent, no linked
        Solana address). Unavailable on node trouble."""
        try:
            number = parse_agent_id(agent_id)
        except ValueError:
            return None
        f = self.registry.functions
        try:
            if self.solana:
                linked = bytes(f.getMetadata(number, SOLANA_METADATA_KEY).call())
                try:
                    key = base58_decode(linked.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    return None
                return base58(key) if len(key) == 32 else None
            wallet = str(f.getAgentWallet(number).call())
            if int(wallet, 16):
                return Web3.to_checksum_address(wallet)
            return Web3.to_checksum_address(str(f.ownerOf(number).call()))
        except ContractLogicError:
            return None  # no such agent
        except TRANSIENT as e:
            raise Unavailable(
                f"cannot read agent {agent_id}'s payout address on {self.chain.network}: "
                f"{_brief(e)}"
            ) from e
