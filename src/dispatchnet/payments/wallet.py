"""The client side of x402 over gRPC: a wallet that answers a `payment-required` trailer
with a `payment-signature`, using the official SDK's client scheme (EIP-3009 signatures).

    wallet = wallet_for(profile)              # None when the profile gives no wallet key
    signature = wallet.pay(required_header)   # blocking; PaymentDeclined over the limit

Spend control: the wallet pays only in assets it knows (the SDK's default stablecoins and
the [chain] deployment's test USDC) and never more than [wallet] max_per_job_micros for one
job (micro-USD; an asset's atomic units at 6 decimals).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import coincurve
from eth_account import Account
from eth_account._utils.encode_typed_data.encoding_and_hashing import (
    hash_domain,
    hash_eip712_message,
    hash_type,
)
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from x402 import x402ClientSync
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.default_assets import find_default_asset
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.mechanisms.evm.types import TypedDataDomain, TypedDataField
from x402.schemas import PaymentRequired, PaymentRequirements

from dispatchnet.chains.deployments import (
    ChainConfigError,
    deployment_path,
    in_home,
    read_deployment,
)
from dispatchnet.chains.evm.node import load_or_create_chain_key
from dispatchnet.client import PaymentDeclined as PaymentDeclined
from dispatchnet.profiles import Profile

log = logging.getLogger("dispatch.wallet")

MICROS = 10**6


DOMAINS_KEPT = 64  # EIP-712 domain hashes a wallet remembers (one per token and chain)


class KeptKeySigner(EthAccountSigner):
    """The SDK's EIP-712 signer, the same signature for the same input, at a fraction of
    the cost: the secp256k1 key is loaded once (eth_account parses it and derives its
    public key on every signature) and each domain's hash is computed once (a token's
    domain, name, version, chain and address, does not change between payments). The
    message hash and the digest are eth_account's own; the signature is libsecp256k1's
    deterministic (RFC 6979) low-s one, as eth_account's."""

    def __init__(self, account: LocalAccount) -> None:
        super().__init__(account)
        self._key = coincurve.PrivateKey(bytes(account.key))
        self._domains: dict[tuple[tuple[str, Any], ...], bytes] = {}
        self._type_hashes: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}
        self._lock = threading.Lock()

    def _domain_hash(self, domain: dict[str, Any]) -> bytes:
        key = tuple(sorted(domain.items()))
        with self._lock:
            cached = self._domains.get(key)
        if cached is None:
            cached = bytes(hash_domain(domain))
            with self._lock:
                if len(self._domains) >= DOMAINS_KEPT:
                    self._domains.clear()
                self._domains[key] = cached
        return cached

    def _struct_hash(
        self, types: dict[str, list[dict[str, str]]], primary_type: str, message: dict[str, Any]
    ) -> bytes | None:
        """hashStruct(message) as EIP-712 defines it, for a struct of 32-byte words only
        (address, uintN, bytes32: an EIP-3009 authorization), without eth_abi's generic
        encoder (~80 us a payment, more than the rest of the signature): keccak(typeHash ||
        each field's word), the type hash kept. None for any other shape or value (eth_account's
        encoder then)."""
        fields = types.get(primary_type)
        if fields is None or any(t not in (primary_type, "EIP712Domain") for t in types):
            return None
        if len(message) != len(fields):
            return None
        words = [self._type_hash(primary_type, types)]
        for f in fields:
            word = _word(f["type"], message.get(f["name"]))
            if word is None:
                return None
            words.append(word)
        return bytes(keccak(b"".join(words)))

    def _type_hash(self, primary_type: str, types: dict[str, list[dict[str, str]]]) -> bytes:
        """eth_account's hash_type, kept by the type's fields."""
        key = (primary_type, tuple((f["name"], f["type"]) for f in types[primary_type]))
        with self._lock:
            cached = self._type_hashes.get(key)
        if cached is None:
            cached = bytes(hash_type(primary_type, types))
            with self._lock:
                if len(self._type_hashes) >= DOMAINS_KEPT:
                    self._type_hashes.clear()
                self._type_hashes[key] = cached
        return cached

    def sign_typed_data(
        self,
        domain: TypedDataDomain,
        types: dict[str, list[TypedDataField]],
        primary_type: str,
        message: dict[str, Any],
    ) -> bytes:
        types_dict = {
            name: [
                {"name": f.name, "type": f.type} if isinstance(f, TypedDataField) else f
                for f in fields
            ]
            for name, fields in types.items()
        }
        domain_dict: dict[str, Any] = (
            {
                "name": domain.name,
                "version": domain.version,
                "chainId": domain.chain_id,
                "verifyingContract": domain.verifying_contract,
            }
            if isinstance(domain, TypedDataDomain)
            else dict(domain)
        )
        body = self._struct_hash(types_dict, primary_type, message)
        if body is None:
            body = bytes(hash_eip712_message(types_dict, message))
        digest = keccak(b"\x19\x01" + self._domain_hash(domain_dict) + body)
        signature = self._key.sign_recoverable(digest, hasher=None)  # r, s, recovery id
        return signature[:64] + bytes([signature[64] + 27])


def _word(solidity_type: str, value: Any) -> bytes | None:
    """The 32-byte EIP-712 encoding of an address, uintN or bytes32 value; None for another
    type, or a value given in another form than the SDK's (a 0x address, an int, 32 bytes)."""
    if solidity_type == "address":
        if isinstance(value, str) and len(value) == 42 and value[:2] in ("0x", "0X"):
            try:
                address = bytes.fromhex(value[2:])
            except ValueError:
                return None
            # (fromhex skips spaces: "0xab ab..." is not 20 bytes, and eth_account refuses it)
            return bytes(12) + address if len(address) == 20 else None
        return None
    if solidity_type.startswith("uint") and type(value) is int:
        bits = solidity_type[4:]
        if bits.isdigit() and 8 <= int(bits) <= 256 and int(bits) % 8 == 0:
            if 0 <= value < 1 << int(bits):
                return value.to_bytes(32, "big")
        return None
    if solidity_type == "bytes32" and isinstance(value, bytes) and len(value) == 32:
        return value
    return None


@dataclass(frozen=True)
class Asset:
    network: str
    address: str
    decimals: int = 6


class Wallet:
    # EIP-3009 payments are signed with the local key, asking no node (client.Payer)
    pays_offline = True

    def __init__(
        self, private_key: str, max_per_job_micros: int, extra_assets: list[Asset] | None = None
    ) -> None:
        self.account = Account.from_key(private_key)
        self.max_per_job_micros = max_per_job_micros
        self.extra_assets = list(extra_assets or [])
        self.client = x402ClientSync()
        scheme = ExactEvmClientScheme(KeptKeySigner(self.account))
        self.client.register("eip155:*", scheme)

    @classmethod
    def of_deployment(
        cls, data: dict[str, Any], max_per_job_micros: int, account: str = "client"
    ) -> Wallet:
        """The wallet of a deployment file's dev account (`dispatch chain up` funds the
        "client" one with test USDC), knowing the deployment's USDC."""
        key = str(((data.get("accounts") or {}).get(account) or {}).get("private_key") or "")
        if not key:
            raise ChainConfigError(f"the deployment has no {account!r} account")
        return cls(key, max_per_job_micros, deployment_assets(data))

    @property
    def address(self) -> str:
        return str(self.account.address)

    def _cap(self, req: PaymentRequirements) -> int | None:
        """The most this wallet pays for the requirement, in its atomic units; None when it
        does not know the asset."""
        network = str(req.network)
        default = find_default_asset(req.asset, network)
        if default is not None:
            decimals = int(default["decimals"])
        else:
            known = [
                a
                for a in self.extra_assets
                if a.network == network and a.address.lower() == req.asset.lower()
            ]
            if not known:
                return None
            decimals = known[0].decimals
        return int(self.max_per_job_micros * 10**decimals // MICROS)

    def pay(self, required_header: str) -> str:
        """A `payment-signature` value for one of the trailer's accepted requirements."""
        try:
            required = decode_payment_required_header(required_header)
        except Exception as e:
            raise PaymentDeclined(f"the payment-required trailer does not parse: {e}") from None
        if not isinstance(required, PaymentRequired):
            raise PaymentDeclined("only x402 version 2 payments are supported")
        affordable = []
        reasons = []
        for req in required.accepts:
            cap = self._cap(req)
            if cap is None:
                reasons.append(f"{req.network}: unknown asset {req.asset}")
            elif int(req.amount) > cap:
                reasons.append(
                    f"{req.network}: asks {req.amount} atomic units, more than the "
                    f"[wallet] limit of {cap} ({self.max_per_job_micros} micro-USD)"
                )
            else:
                affordable.append(req)
        if not affordable:
            raise PaymentDeclined("will not pay: " + "; ".join(reasons or ["nothing offered"]))
        self.client.set_spend_controls(
            {
                "allowed_assets": [
                    {
                        "network": str(r.network),
                        "asset": r.asset,
                        "max_amount_per_payment": str(self._cap(r)),
                    }
                    for r in affordable
                ]
            }
        )
        offer = required.model_copy(update={"accepts": affordable})
        try:
            payload = self.client.create_payment_payload(offer)
        except Exception as e:
            raise PaymentDeclined(f"cannot sign a payment: {e}") from None
        return encode_payment_signature_header(payload)


def deployment_assets(data: dict[str, Any]) -> list[Asset]:
    """The stablecoin a deployment file names (its test USDC), if any."""
    usdc = (data.get("contracts") or {}).get("usdc")
    return [Asset(str(data.get("network") or ""), str(usdc))] if usdc else []


def wallet_for(profile: Profile, key_file: str = "") -> Wallet | None:
    """The profile's wallet: key_file (or [wallet] key_file), else the deployment file's
    "client" dev account, else None. Raises ChainConfigError for a key that does not load."""
    w = profile.wallet
    chain = profile.chain
    data: dict[str, Any] = {}
    if chain.deployment and deployment_path(chain.deployment).exists():
        data = read_deployment(chain.deployment)
    extra = deployment_assets(data)
    if chain.usdc:
        extra.append(Asset(chain.network, chain.usdc))
    path = key_file or w.key_file
    if path:
        p = in_home(path)
        if not p.exists():
            raise ChainConfigError(f"no wallet key file {p}")
        return Wallet(load_or_create_chain_key(p), w.max_per_job_micros, extra)
    if "client" not in (data.get("accounts") or {}):
        return None
    return Wallet.of_deployment(data, w.max_per_job_micros)
