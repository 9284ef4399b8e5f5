"""Receipt anchoring on EVM chains: ReceiptAnchor.anchor(root, leafCount, batchId) from
the coordinator's account (EvmAnchorer, a receipts.anchoring.Anchorer), and the on-chain
check of a receipt proof's anchor (`dispatch receipt verify --onchain`).

    anchorer = EvmAnchorer.for_chain(chain, profile.chain)
    await anchorer.anchor(root, leaf_count, batch_id)   # web3.py in a worker thread
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import requests
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

from dispatchnet.chains.deployments import ChainConfigError
from dispatchnet.chains.evm.config import chain_id_of
from dispatchnet.chains.evm.node import (
    TRANSIENT,
    AbiFunction,
    Call,
    EvmChain,
    _brief,
    _hex,
    load_abi,
    shared_sender,
    web3_for,
)
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import ChainConfig
from dispatchnet.receipts.anchoring import AnchorResult

log = logging.getLogger("dispatch.chain")


class AnchorError(RuntimeError):
    """Anchoring failed in a way a quick retry will not fix (a reverted transaction, a gas
    limit too low, an RPC that serves another chain). The batcher marks the batch "failed"
    and retries it at its slowest pace."""


def anchor_contract(w3: Web3, address: str) -> Contract:
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=_anchor_abi())


def _anchor_abi() -> list[dict[str, Any]]:
    return load_abi("ReceiptAnchor")


def find_anchor_transaction(contract: Contract, root: bytes, block: int) -> str:
    """The transaction in `block` whose Anchored event carries `root` ("" if none)."""
    logs = contract.events.Anchored().get_logs(
        from_block=block, to_block=block, argument_filters={"merkleRoot": root}
    )
    return _hex(logs[0]["transactionHash"]) if logs else ""


# --- anchoring ------------------------------------------------------------------------------


class EvmAnchorer:
    """Anchors receipt batch roots with ReceiptAnchor.anchor(root, leafCount, batchId), sent
    from the coordinator's chain account. Implements receipts.anchoring.Anchorer.

    - Blocking calls (bare JSON-RPC requests, see EvmSender) run in a worker thread; one
      lock serializes everything that uses the account, so nonces never collide within
      this process. The nonce is the node's pending count, fetched for every transaction; a
      "nonce too low" answer (another sender used the account) refetches it and sends again.
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
        call = Call(self.contract.address, _function("anchor").calldata(root, leaf_count, batch_id))
        needed = self._estimate(call)
        if needed > self.gas_limit:
            raise AnchorError(
                f"ReceiptAnchor.anchor needs {needed} gas; [chain] anchor_gas_limit is "
                f"{self.gas_limit}"
            )
        tx_hash = _hex(self._send(call))
        try:
            receipt = self.sender.receipt(tx_hash, self.tx_timeout, self.poll_seconds)
        except TimeExhausted as e:
            raise Unavailable(
                f"anchor transaction {tx_hash} not mined within {self.tx_timeout:g}s"
            ) from e
        if int(receipt["status"], 16) != 1:
            raise AnchorError(
                f"anchor transaction {tx_hash} reverted (gas used "
                f"{int(receipt['gasUsed'], 16)} of {self.gas_limit})"
            )
        if any(_anchors(log_entry, self.contract.address, root) for log_entry in receipt["logs"]):
            return tx_hash
        # anchored by someone else between our check and our transaction: theirs stands
        existing = self._existing(root)
        if not existing:
            raise AnchorError(f"anchor transaction {tx_hash} emitted no Anchored event")
        return existing

    def _estimate(self, call: Call) -> int:
        try:
            return int(self.sender.call(call.to, call.data, "eth_estimateGas"), 16)
        except ContractLogicError as e:
            raise AnchorError(f"ReceiptAnchor.anchor would revert: {e}") from e

    def _existing(self, root: bytes) -> str:
        anchored_at = _function("anchoredAt")
        found = self.sender.call(self.contract.address, anchored_at.calldata(root))
        block, _anchorer = anchored_at.result(HexBytes(found))
        if not block:
            return ""
        tx = find_anchor_transaction(self.contract, root, int(block))
        if not tx:
            raise AnchorError(f"root {root.hex()} is anchored in block {block} with no event")
        return tx

    def _send(self, call: Call) -> bytes:
        return self.sender.send(call, self.gas_limit, self.nonce_retries)


@functools.cache
def _function(name: str) -> AbiFunction:
    return AbiFunction.of(_anchor_abi(), name)


ANCHORED_TOPIC = Web3.keccak(text="Anchored(bytes32,address,uint32,string)")


def _anchors(log_entry: dict[str, Any], contract: str, root: bytes) -> bool:
    """Whether a receipt's log (the node's, hex strings) is contract's Anchored(root)."""
    topics = log_entry.get("topics") or []
    return (
        str(log_entry.get("address", "")).lower() == contract.lower()
        and len(topics) >= 2
        and HexBytes(topics[0]) == ANCHORED_TOPIC
        and HexBytes(topics[1]) == root
    )


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
