"""The EVM chain adapter: where a profile's chain is, the coordinator's chain account, the
ReceiptAnchor anchorer and the on-chain check of a receipt proof's anchor.

    chain = resolve_evm_chain(profile.chain, data_dir)   # reads the deployment file, if any
    anchorer = EvmAnchorer.for_chain(chain, profile.chain)
    await anchorer.anchor(root, leaf_count, batch_id)   # web3.py in a worker thread

Everything here that talks to a node is blocking web3.py code: async callers go through
asyncio.to_thread (EvmAnchorer.anchor does), so the event loop never waits on the chain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import Contract
from web3.exceptions import (
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)
from web3.logs import DISCARD
from web3.types import RPCEndpoint

from dispatchnet import keys
from dispatchnet.chains.evm_deploy import load_artifact
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import ChainConfig, chain_id_of
from dispatchnet.receipts.anchoring import AnchorResult

log = logging.getLogger("dispatch.chain")

CHAINS_DIR = "chains"  # under $DISPATCH_HOME: <name>.json deployment files
CHAIN_KEY_HEADER = "dispatch-secp256k1-key-v1"


class ChainConfigError(ValueError):
    """The profile's chain settings, or the deployment file they name, do not work."""


class AnchorError(RuntimeError):
    """Anchoring failed in a way a quick retry will not fix (a reverted transaction, a gas
    limit too low, an RPC that serves another chain). The batcher marks the batch "failed"
    and retries it at its slowest pace."""


# --- where the chain is ---------------------------------------------------------------------


def deployment_path(name: str) -> Path:
    """The deployment file a profile's `deployment` names: a path to a .json file, or
    $DISPATCH_HOME/chains/<name>.json."""
    if name.endswith(".json") or os.sep in name:
        return Path(name).expanduser()
    return keys.default_home() / CHAINS_DIR / f"{name}.json"


def read_deployment(name: str) -> dict[str, Any]:
    path = deployment_path(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainConfigError(
            f"no deployment file {path} (run `dispatch chain up` for a local chain)"
        ) from None
    except (OSError, ValueError) as e:
        raise ChainConfigError(f"cannot read deployment file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ChainConfigError(f"{path} is not a deployment file")
    return data


@dataclass(frozen=True)
class EvmChain:
    """A profile's EVM chain, resolved: the deployment file read, addresses checksummed
    ("" where the profile uses no such contract), the coordinator's account key found."""

    network: str
    chain_id: int
    rpc_url: str
    identity_registry: str = ""
    reputation_registry: str = ""
    validation_registry: str = ""
    receipt_anchor: str = ""
    usdc: str = ""
    batch_settler: str = ""
    # secp256k1 private key (0x hex) of the coordinator's chain account; "" when unknown
    account_key: str = field(default="", repr=False)

    @property
    def account_address(self) -> str:
        return str(Account.from_key(self.account_key).address) if self.account_key else ""


def _address(value: Any, what: str) -> str:
    if not value:
        return ""
    try:
        return str(Web3.to_checksum_address(str(value)))
    except ValueError as e:
        raise ChainConfigError(f"{what}: {value!r} is not an address") from e


def resolve_evm_chain(cfg: ChainConfig, data_dir: Path | None = None) -> EvmChain:
    """The chain a profile's [chain] describes (kind "evm"). With a deployment name the RPC
    URL, addresses and (unless key_file is set) the coordinator account come from the
    deployment file; otherwise from the profile. data_dir: where a new chain.key goes when
    neither key_file nor a deployment account is given (None: no key is loaded)."""
    if cfg.kind != "evm":
        raise ChainConfigError(f'[chain] kind is {cfg.kind!r}, not "evm"')
    chain_id = chain_id_of(cfg.network)
    account_key = ""
    if cfg.deployment:
        data = read_deployment(cfg.deployment)
        where = str(deployment_path(cfg.deployment))
        if data.get("network") != cfg.network:
            raise ChainConfigError(
                f"{where} is for network {data.get('network')!r}, the profile for {cfg.network!r}"
            )
        contracts = data.get("contracts") or {}
        values = {k: _address(contracts.get(k), f"{where} contracts.{k}") for k in _CONTRACTS}
        rpc_url = str(data.get("rpc_url") or "")
        coordinator = (data.get("accounts") or {}).get("coordinator") or {}
        account_key = str(coordinator.get("private_key") or "")
    else:
        values = {k: _address(getattr(cfg, k), f"[chain] {k}") for k in _CONTRACTS}
        rpc_url = cfg.rpc_url
    if not rpc_url:
        raise ChainConfigError("[chain] has no RPC URL")
    if cfg.key_file:
        account_key = load_or_create_chain_key(in_home(cfg.key_file))
    elif not account_key and data_dir is not None:
        account_key = load_or_create_chain_key(data_dir / "chain.key")
    return EvmChain(
        network=cfg.network, chain_id=chain_id, rpc_url=rpc_url, account_key=account_key, **values
    )


_CONTRACTS = (
    "identity_registry",
    "reputation_registry",
    "validation_registry",
    "receipt_anchor",
    "usdc",
    "batch_settler",
)


def in_home(path: str) -> Path:
    """A path from a profile: relative paths are under $DISPATCH_HOME."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else keys.default_home() / p


def load_or_create_chain_key(path: Path) -> str:
    """The secp256k1 private key (0x hex) in a chain key file, created (mode 0600, a new
    random key) when missing. The file holds a header line and the key in hex."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "0x" + bytes(Account.create().key).hex()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created meanwhile by another process: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{CHAIN_KEY_HEADER}\n{key}\n")
            return key
    lines = path.read_text().split()
    if len(lines) != 2 or lines[0] != CHAIN_KEY_HEADER:
        raise ChainConfigError(f"{path} is not a Dispatch chain key file")
    try:
        Account.from_key(lines[1])
    except (ValueError, TypeError) as e:
        raise ChainConfigError(f"{path}: not a secp256k1 private key") from e
    return lines[1]


def web3_for(rpc_url: str, timeout: float) -> Web3:
    # eth_chainId is cached: web3 validates every call's chain id, which otherwise costs a
    # round trip to the node per call (two per paid CommitJob), and a node's id is fixed.
    return Web3(
        Web3.HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": timeout},
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
        )
    )


def anchor_contract(w3: Web3, address: str) -> Contract:
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=_anchor_abi())


_ABI_CACHE: dict[str, list[dict[str, Any]]] = {}


def _anchor_abi() -> list[dict[str, Any]]:
    if "ReceiptAnchor" not in _ABI_CACHE:
        _ABI_CACHE["ReceiptAnchor"] = load_artifact("ReceiptAnchor").abi
    return _ABI_CACHE["ReceiptAnchor"]


# Errors that mean "the node (or the path to it) is in trouble; try again later".
TRANSIENT = (requests.RequestException, OSError, TimeExhausted, Web3RPCError)


def _hex(tx_hash: bytes | str) -> str:
    if isinstance(tx_hash, str):
        return tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash
    return "0x" + bytes(tx_hash).hex()


def find_anchor_transaction(contract: Contract, root: bytes, block: int) -> str:
    """The transaction in `block` whose Anchored event carries `root` ("" if none)."""
    logs = contract.events.Anchored().get_logs(
        from_block=block, to_block=block, argument_filters={"merkleRoot": root}
    )
    return _hex(logs[0]["transactionHash"]) if logs else ""


# --- the shared sender ----------------------------------------------------------------------


class EvmSender:
    """Signs and sends transactions from one chain account. Every user of the account in
    this process (the anchorer, the feedback sender) shares one EvmSender (shared_sender),
    and holds `lock` around everything from reading the nonce to sending, so their nonces
    never collide. The nonce is the node's pending count, fetched for every transaction; a
    "nonce too low" answer (another process used the account) refetches it and sends again.
    Blocking: call it in a worker thread."""

    def __init__(self, w3: Web3, network: str, private_key: str) -> None:
        self.w3 = w3
        self.network = network
        self.chain_id = chain_id_of(network)
        self.account: LocalAccount = Account.from_key(private_key)
        self.lock = threading.Lock()

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    def sign(self, fn: Any, gas_limit: int) -> tuple[bytes, bytes]:
        """(raw transaction, hash) of the contract call fn, with the pending nonce and the
        given gas limit; the caller holds `lock`."""
        nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        tx = fn.build_transaction(
            {"from": self.address, "nonce": nonce, "gas": gas_limit, "chainId": self.chain_id}
        )
        signed = self.account.sign_transaction(tx)
        return bytes(signed.raw_transaction), bytes(signed.hash)

    def send(self, fn: Any, gas_limit: int, nonce_retries: int = 3) -> bytes:
        """Signs and sends with the pending nonce and the given gas limit; the caller holds
        `lock`."""
        for attempt in range(nonce_retries + 1):
            raw, _ = self.sign(fn, gas_limit)
            try:
                return bytes(self.w3.eth.send_raw_transaction(raw))
            except Web3RPCError as e:
                if "nonce too low" not in str(e).lower() or attempt == nonce_retries:
                    raise
                log.info("a nonce was taken meanwhile; refetching the pending nonce")
        raise AssertionError("unreachable")


_SENDERS: dict[tuple[str, str], EvmSender] = {}
_SENDERS_LOCK = threading.Lock()


def shared_sender(rpc_url: str, network: str, private_key: str, rpc_timeout: float) -> EvmSender:
    """The process's one EvmSender for this account on this node."""
    address = str(Account.from_key(private_key).address)
    with _SENDERS_LOCK:
        sender = _SENDERS.get((rpc_url, address))
        if sender is None:
            sender = EvmSender(web3_for(rpc_url, rpc_timeout), network, private_key)
            _SENDERS[(rpc_url, address)] = sender
        return sender


# --- anchoring ------------------------------------------------------------------------------


class EvmAnchorer:
    """Anchors receipt batch roots with ReceiptAnchor.anchor(root, leafCount, batchId), sent
    from the coordinator's chain account. Implements receipts.anchoring.Anchorer.

    - Blocking web3.py calls run in a worker thread; one lock serializes everything that
      uses the account, so nonces never collide within this process. The nonce is the
      node's pending count, fetched for every transaction; a "nonce too low" answer (another
      sender used the account) refetches it and sends again.
    - The gas limit is the profile's, not an estimate (chains like Monad charge for the
      limit); an estimate above it is refused before anything is sent.
    - A root that is already on chain is not sent again: its first Anchored transaction is
      returned, so a retry after a crash or a lost receipt costs one call, no gas.
    - Node unreachable, an RPC error, or no receipt within tx_timeout: Unavailable (the
      batcher keeps the batch pending and retries with backoff). A reverted transaction or
      a wrong chain: AnchorError.
    """

    enabled = True

    def __init__(
        self,
        rpc_url: str,
        network: str,
        contract_address: str,
        private_key: str,
        *,
        gas_limit: int,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 60.0,
        poll_seconds: float = 0.1,
        nonce_retries: int = 3,
    ) -> None:
        self.network = network
        self.chain_id = chain_id_of(network)
        self.gas_limit = gas_limit
        self.tx_timeout = tx_timeout
        self.poll_seconds = poll_seconds
        self.nonce_retries = nonce_retries
        self.rpc_url = rpc_url
        self.sender = shared_sender(rpc_url, network, private_key, rpc_timeout)
        self.w3 = self.sender.w3
        self.contract = anchor_contract(self.w3, contract_address)
        self.account: LocalAccount = self.sender.account
        self._lock = self.sender.lock  # shared with every other sender from this account
        self._chain_checked = False

    @classmethod
    def for_chain(cls, chain: EvmChain, cfg: ChainConfig) -> EvmAnchorer:
        if not chain.receipt_anchor:
            raise ChainConfigError("[chain] has no receipt_anchor address")
        if not chain.account_key:
            raise ChainConfigError("[chain] has no account to anchor from (set key_file)")
        return cls(
            chain.rpc_url,
            chain.network,
            chain.receipt_anchor,
            chain.account_key,
            gas_limit=cfg.anchor_gas_limit,
            rpc_timeout=cfg.rpc_timeout_seconds,
            tx_timeout=cfg.tx_timeout_seconds,
        )

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    def describe(self) -> str:
        return (
            f"evm: ReceiptAnchor {self.contract.address} on {self.network} via {self.rpc_url}, "
            f"from {self.address}, gas limit {self.gas_limit}"
        )

    async def anchor(self, root: bytes, leaf_count: int, batch_id: str) -> AnchorResult:
        tx = await asyncio.to_thread(self._anchor_locked, root, leaf_count, batch_id)
        return AnchorResult(network=self.network, transaction=tx)

    def _anchor_locked(self, root: bytes, leaf_count: int, batch_id: str) -> str:
        with self._lock:
            try:
                return self._anchor(root, leaf_count, batch_id)
            except TRANSIENT as e:
                raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e

    def _anchor(self, root: bytes, leaf_count: int, batch_id: str) -> str:
        if len(root) != 32:
            raise ValueError("a Merkle root is 32 bytes")
        if not self._chain_checked:
            got = self.w3.eth.chain_id
            if got != self.chain_id:
                raise AnchorError(f"{self.rpc_url} serves chain {got}, the profile {self.network}")
            self._chain_checked = True
        existing = self._existing(root)
        if existing:
            return existing
        fn = self.contract.functions.anchor(root, leaf_count, batch_id)
        try:
            needed = fn.estimate_gas({"from": self.address})
        except ContractLogicError as e:
            raise AnchorError(f"ReceiptAnchor.anchor would revert: {e}") from e
        if needed > self.gas_limit:
            raise AnchorError(
                f"ReceiptAnchor.anchor needs {needed} gas; [chain] anchor_gas_limit is "
                f"{self.gas_limit}"
            )
        tx_hash = self._send(fn)
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                HexBytes(tx_hash), timeout=self.tx_timeout, poll_latency=self.poll_seconds
            )
        except TimeExhausted as e:
            raise Unavailable(
                f"anchor transaction {_hex(tx_hash)} not mined within {self.tx_timeout:g}s"
            ) from e
        if receipt["status"] != 1:
            raise AnchorError(
                f"anchor transaction {_hex(tx_hash)} reverted (gas used {receipt['gasUsed']} "
                f"of {self.gas_limit})"
            )
        events = self.contract.events.Anchored().process_receipt(receipt, errors=DISCARD)
        if any(bytes(ev["args"]["merkleRoot"]) == root for ev in events):
            return _hex(tx_hash)
        # anchored by someone else between our check and our transaction: theirs stands
        existing = self._existing(root)
        if not existing:
            raise AnchorError(f"anchor transaction {_hex(tx_hash)} emitted no Anchored event")
        return existing

    def _existing(self, root: bytes) -> str:
        block, _anchorer = self.contract.functions.anchoredAt(root).call()
        if not block:
            return ""
        tx = find_anchor_transaction(self.contract, root, int(block))
        if not tx:
            raise AnchorError(f"root {root.hex()} is anchored in block {block} with no event")
        return tx

    def _send(self, fn: Any) -> bytes:
        return self.sender.send(fn, self.gas_limit, self.nonce_retries)


def _brief(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, requests.ConnectionError):
        text = "connection refused or lost"
    elif isinstance(e, requests.Timeout):
        text = "no answer in time"
    return text[:300]


# --- checking an anchor ---------------------------------------------------------------------


@dataclass
class OnchainCheck:
    """What `dispatch receipt verify --onchain` found."""

    problems: list[str] = field(default_factory=list)
    block: int = 0  # where the root was first anchored (0: not anchored)
    anchorer: str = ""
    transaction_block: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": not self.problems,
            "problems": self.problems,
            "anchored_in_block": self.block,
            "anchorer": self.anchorer,
            "transaction_block": self.transaction_block,
        }


def check_anchor_onchain(
    chain: EvmChain,
    root: bytes,
    network: str,
    transaction: str,
    *,
    expected_anchorer: str = "",
    timeout: float = 10.0,
) -> OnchainCheck:
    """Checks on chain that `root` is anchored in the chain's ReceiptAnchor and that
    `transaction` (the proof's anchor transaction) emitted Anchored for it. Blocking."""
    out = OnchainCheck()
    if not chain.receipt_anchor:
        out.problems.append("the profile's [chain] has no receipt_anchor address")
        return out
    if network != chain.network:
        out.problems.append(
            f"the proof is anchored on {network or 'no network'!r}, the profile's chain is "
            f"{chain.network}"
        )
    w3 = web3_for(chain.rpc_url, timeout)
    contract = anchor_contract(w3, chain.receipt_anchor)
    try:
        got = w3.eth.chain_id
        if got != chain.chain_id:
            out.problems.append(f"{chain.rpc_url} serves chain {got}, not {chain.network}")
            return out
        block, anchorer = contract.functions.anchoredAt(root).call()
        out.block, out.anchorer = int(block), str(anchorer) if int(block) else ""
        if not out.block:
            out.problems.append(
                f"no anchor: root {root.hex()} is not anchored in ReceiptAnchor "
                f"{contract.address} on {chain.network}"
            )
        elif expected_anchorer and out.anchorer.lower() != expected_anchorer.lower():
            out.problems.append(
                f"root anchored by {out.anchorer}, not by the expected {expected_anchorer}"
            )
        if not transaction:
            out.problems.append("the proof names no anchor transaction (not anchored yet?)")
            return out
        try:
            receipt = w3.eth.get_transaction_receipt(transaction)  # type: ignore[arg-type]
        except TransactionNotFound:
            out.problems.append(f"tx not found: {transaction} is not on {chain.network}")
            return out
        out.transaction_block = int(receipt["blockNumber"])
        events = contract.events.Anchored().process_receipt(receipt, errors=DISCARD)
        roots = [bytes(ev["args"]["merkleRoot"]) for ev in events]
        if root not in roots:
            seen = ", ".join(r.hex() for r in roots) or "none"
            out.problems.append(
                f"root mismatch: transaction {transaction} emitted no Anchored event for root "
                f"{root.hex()} (Anchored roots in it: {seen})"
            )
        elif out.block and out.transaction_block != out.block:
            out.problems.append(
                f"transaction {transaction} is in block {out.transaction_block}, but the root "
                f"was first anchored in block {out.block}"
            )
    except (ValueError, Web3Exception) as e:
        if isinstance(e, Web3RPCError):
            out.problems.append(f"chain {chain.network} at {chain.rpc_url}: {_brief(e)}")
        else:
            out.problems.append(f"bad anchor data: {_brief(e)}")
    except (requests.RequestException, OSError) as e:
        out.problems.append(f"cannot reach chain {chain.network} at {chain.rpc_url}: {_brief(e)}")
    return out


# --- feedback -------------------------------------------------------------------------------


FEEDBACK_LOOKBACK = 10_000  # blocks searched for an entry's earlier transaction
# giveFeedback's gas limit is the node's estimate plus this share (storage costs can move
# between the estimate and the transaction: a first rating of an agent costs more)
FEEDBACK_GAS_MARGIN = 0.25


class FeedbackRejected(RuntimeError):
    """giveFeedback reverts (or would): e.g. the coordinator's account owns the agent, or
    the agent does not exist. The entry is marked "failed" with this reason."""


def reputation_contract(w3: Web3, address: str) -> Contract:
    if "ReputationRegistry" not in _ABI_CACHE:
        _ABI_CACHE["ReputationRegistry"] = load_artifact("ReputationRegistry").abi
    return w3.eth.contract(
        address=Web3.to_checksum_address(address), abi=_ABI_CACHE["ReputationRegistry"]
    )


class EvmFeedbackPoster:
    """Posts ReputationRegistry.giveFeedback from the coordinator's chain account through the
    shared EvmSender (same lock and nonces as the anchorer). Blocking calls run in a thread.

    Exactly once: before sending, the registry's NewFeedback events from this account for
    the agent are searched for the entry's feedbackURI + feedbackHash; when found (a retry
    after a lost receipt or a crash), that transaction is returned and nothing is sent.
    Gas: each transaction gets the node's estimate plus FEEDBACK_GAS_MARGIN, never more than
    `gas_limit` (the profile's cap; chains like Monad charge for the limit). An estimate
    above the cap, or a transaction that ran out of gas, is not the registry refusing the
    entry: Unavailable (the entry stays pending and is retried). Node trouble: Unavailable.
    A revert of the call itself: FeedbackRejected."""

    def __init__(
        self,
        chain: EvmChain,
        *,
        gas_limit: int,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 60.0,
        poll_seconds: float = 0.1,
    ) -> None:
        if not chain.reputation_registry:
            raise ChainConfigError("[chain] has no reputation_registry address")
        if not chain.account_key:
            raise ChainConfigError("[chain] has no account to send feedback from")
        self.network = chain.network
        self.rpc_url = chain.rpc_url
        self.gas_limit = gas_limit
        self.tx_timeout = tx_timeout
        self.poll_seconds = poll_seconds
        self.sender = shared_sender(chain.rpc_url, chain.network, chain.account_key, rpc_timeout)
        self.contract = reputation_contract(self.sender.w3, chain.reputation_registry)

    @property
    def address(self) -> ChecksumAddress:
        return self.sender.address

    def describe(self) -> str:
        return (
            f"evm: ReputationRegistry {self.contract.address} on {self.network}, from "
            f"{self.address}, gas: estimate +{FEEDBACK_GAS_MARGIN:.0%}, at most {self.gas_limit}"
        )

    async def give(self, entry: Any) -> str:
        """Sends one FeedbackEntry; the transaction hash."""
        return await asyncio.to_thread(self._give_locked, entry)

    def _give_locked(self, entry: Any) -> str:
        with self.sender.lock:
            try:
                return self._give(entry)
            except TRANSIENT as e:
                raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e

    def estimate(self, fn: Any) -> int:
        """The gas to send fn with: the node's estimate plus the margin, capped. Raises
        FeedbackRejected when the call itself reverts, Unavailable when it needs more gas
        than the cap allows (raise [feedback] gas_limit)."""
        try:
            needed = int(fn.estimate_gas({"from": self.address}))
        except ContractLogicError as e:
            raise FeedbackRejected(f"giveFeedback reverts: {_brief(e)}") from e
        if needed > self.gas_limit:
            raise Unavailable(
                f"giveFeedback needs {needed} gas; [feedback] gas_limit is {self.gas_limit}: "
                "raise it (the entry stays pending)"
            )
        return min(self.gas_limit, int(needed * (1 + FEEDBACK_GAS_MARGIN)))

    def _give(self, entry: Any) -> str:
        existing = self._existing(entry)
        if existing:
            return existing
        fn = self.contract.functions.giveFeedback(
            entry.agent_id,
            entry.value,
            entry.value_decimals,
            entry.tag1,
            entry.tag2,
            "",
            entry.feedback_uri,
            entry.feedback_hash,
        )
        gas = self.estimate(fn)
        tx_hash = self.sender.send(fn, gas)
        try:
            receipt = self.sender.w3.eth.wait_for_transaction_receipt(
                HexBytes(tx_hash), timeout=self.tx_timeout, poll_latency=self.poll_seconds
            )
        except TimeExhausted as e:
            raise Unavailable(
                f"feedback transaction {_hex(tx_hash)} not mined within {self.tx_timeout:g}s"
            ) from e
        if receipt["status"] != 1:
            used = int(receipt["gasUsed"])
            if used >= gas:  # out of gas, not a refusal: a reverted send changed nothing
                raise Unavailable(
                    f"feedback transaction {_hex(tx_hash)} ran out of gas ({used} of {gas}); "
                    "retrying with a fresh estimate"
                )
            raise FeedbackRejected(
                f"feedback transaction {_hex(tx_hash)} reverted (gas used {used} of {gas})"
            )
        return _hex(tx_hash)

    def _existing(self, entry: Any) -> str:
        """This account's NewFeedback for the entry within the last FEEDBACK_LOOKBACK
        blocks ("" if none). A node that refuses the log query (range limits on public
        RPCs) skips the check, with a warning: only a retry after a lost receipt could
        then post twice."""
        latest = int(self.sender.w3.eth.block_number)
        try:
            logs = self.contract.events.NewFeedback().get_logs(
                from_block=max(0, latest - FEEDBACK_LOOKBACK),
                to_block=latest,
                argument_filters={"agentId": entry.agent_id, "clientAddress": self.address},
            )
        except Web3RPCError as e:
            log.warning("cannot search earlier feedback (%s); sending without the check", e)
            return ""
        for ev in logs:
            args = ev["args"]
            if (
                args["feedbackURI"] == entry.feedback_uri
                and bytes(args["feedbackHash"]) == entry.feedback_hash
            ):
                return _hex(ev["transactionHash"])
        return ""


class EvmReputationReader:
    """Reads ReputationRegistry.getSummary over the trusted reviewers (blocking: call it in
    a thread). summary(agent_id) -> (count, average value) of the successRate feedback."""

    def __init__(
        self, chain: EvmChain, trusted: list[str], tag1: str, timeout: float = 10.0
    ) -> None:
        if not chain.reputation_registry:
            raise ChainConfigError("[chain] has no reputation_registry address")
        # Each reviewer once: getSummary (the reference implementation's too) counts a
        # reviewer listed twice twice.
        reviewers = list(
            dict.fromkeys(_address(a, "[reputation] trusted_reviewers") for a in trusted)
        )
        if chain.account_key and chain.account_address not in reviewers:
            reviewers.append(chain.account_address)  # the coordinator trusts itself
        if not reviewers:
            raise ChainConfigError("[reputation] has no trusted reviewer")
        self.reviewers = reviewers
        self.tag1 = tag1
        self.network = chain.network
        self.rpc_url = chain.rpc_url
        self.contract = reputation_contract(
            web3_for(chain.rpc_url, timeout), chain.reputation_registry
        )

    def summary(self, agent_id: int) -> tuple[int, float]:
        try:
            count, value, decimals = self.contract.functions.getSummary(
                agent_id, self.reviewers, self.tag1, ""
            ).call()
        except TRANSIENT as e:
            raise Unavailable(f"chain {self.network} at {self.rpc_url}: {_brief(e)}") from e
        return int(count), int(value) / 10 ** int(decimals)
