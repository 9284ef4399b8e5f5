"""Receipt anchoring on Solana: a batch root written as an SPL Memo from the coordinator's
keypair (SolanaAnchorer, a receipts.anchoring.Anchorer), and the check of a receipt proof's
anchor read back over JSON-RPC (`dispatch receipt verify --onchain`).

    anchorer = SolanaAnchorer.for_chain(chain, profile.chain)
    await anchorer.anchor(root, leaf_count, batch_id)   # solana-py in a worker thread

The memo text is "dispatch.v1.anchor <root hex> <leaf count> <batch id>".
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from solana.rpc.commitment import Confirmed
from solana.rpc.models import TxOpts
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.memo.instructions import create_memo
from spl.memo.models import MemoParams

from dispatchnet.chains.solana.memos import (
    MEMO_PROGRAM,
    MemoReadError,
    earliest_memo,
    fetch_transaction,
    memos_of,
    signer_of,
)
from dispatchnet.chains.solana.node import TRANSIENT, SolanaChain, brief, client_for
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import ChainConfig
from dispatchnet.receipts.anchoring import AnchorResult

MEMO_TAG = "dispatch.v1.anchor"


class AnchorError(RuntimeError):
    """Anchoring failed in a way a quick retry will not fix (the memo transaction failed on
    chain, an RPC that serves another chain). The batcher marks the batch "failed"."""


def memo_text(root: bytes, leaf_count: int, batch_id: str) -> str:
    return f"{MEMO_TAG} {root.hex()} {leaf_count} {batch_id}"


def _root_prefix(root: bytes) -> str:
    return f"{MEMO_TAG} {root.hex()} "


@dataclass
class _InFlight:
    """A memo transaction sent whose outcome is not known yet (lost reply, not confirmed in
    time): resent as is while its blockhash is valid, never replaced by a second one."""

    raw: bytes
    signature: Signature
    last_valid_block_height: int


class SolanaAnchorer:
    """Anchors receipt batch roots as SPL Memos sent from the coordinator's keypair.
    Implements receipts.anchoring.Anchorer.

    Exactly once: before sending, the key's latest `lookback` transactions are searched
    (getSignaturesForAddress, whose entries carry their memos; a candidate is read back with
    getTransaction) for an earlier memo of the same root, which is returned instead. A
    transaction sent by this process whose outcome is unknown (a lost reply, a confirmation
    timeout) is remembered: a retry resends that same signed transaction while its blockhash
    is valid (a node drops a duplicate), and signs a new one only once it has expired
    without landing. Node unreachable, an RPC error or no confirmation within tx_timeout:
    Unavailable (the batch stays pending). A failed memo transaction or a node of another
    chain: AnchorError. Blocking solana-py runs in a worker thread, one anchor at a time.
    """

    enabled = True

    def __init__(
        self,
        rpc_url: str,
        network: str,
        keypair: Keypair,
        *,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 60.0,
        lookback: int = 1000,
        genesis_hash: str = "",
        poll_seconds: float = 0.1,
    ) -> None:
        self.rpc_url = rpc_url
        self.network = network
        self.keypair = keypair
        self.tx_timeout = tx_timeout
        self.lookback = lookback
        self.genesis_hash = genesis_hash
        self.poll_seconds = poll_seconds
        self.client = client_for(rpc_url, rpc_timeout)
        self._lock = threading.Lock()
        self._in_flight: dict[bytes, _InFlight] = {}
        self._chain_checked = False

    @classmethod
    def for_chain(cls, chain: SolanaChain, cfg: ChainConfig) -> SolanaAnchorer:
        return cls(
            chain.rpc_url,
            chain.network,
            chain.keypair,
            rpc_timeout=cfg.rpc_timeout_seconds,
            tx_timeout=cfg.tx_timeout_seconds,
            lookback=cfg.anchor_lookback,
            genesis_hash=chain.genesis_hash,
        )

    @property
    def address(self) -> str:
        return str(self.keypair.pubkey())

    def describe(self) -> str:
        return f"solana: Memo on {self.network} via {self.rpc_url}, from {self.address}"

    async def anchor(self, root: bytes, leaf_count: int, batch_id: str) -> AnchorResult:
        tx = await asyncio.to_thread(self._anchor_locked, root, leaf_count, batch_id)
        return AnchorResult(network=self.network, transaction=tx)

    def _anchor_locked(self, root: bytes, leaf_count: int, batch_id: str) -> str:
        with self._lock:
            try:
                return self._anchor(root, leaf_count, batch_id)
            except TRANSIENT as e:
                raise Unavailable(f"chain {self.network} at {self.rpc_url}: {brief(e)}") from e

    def _anchor(self, root: bytes, leaf_count: int, batch_id: str) -> str:
        if len(root) != 32:
            raise ValueError("a Merkle root is 32 bytes")
        if not self._chain_checked:
            got = str(self.client.get_genesis_hash().value)
            if self.genesis_hash and got != self.genesis_hash:
                raise AnchorError(
                    f"{self.rpc_url} serves genesis {got}, the deployment {self.genesis_hash}"
                )
            self._chain_checked = True
        existing = self.find_existing(root)
        if existing:
            self._in_flight.pop(root, None)
            return existing
        sent = self._in_flight.get(root)
        if sent is not None and self._expired(sent):
            # expired without landing (find_existing saw none): it never will
            del self._in_flight[root]
            sent = None
        if sent is None:
            sent = self._sign(memo_text(root, leaf_count, batch_id))
            self._in_flight[root] = sent
        self._send(sent)
        try:
            self._confirm(sent)
        except AnchorError:
            del self._in_flight[root]  # landed and failed: the root is not anchored
            raise
        del self._in_flight[root]
        return str(sent.signature)

    def find_existing(self, root: bytes) -> str:
        """The signature of this key's earliest memo of `root` among its `lookback` latest
        transactions, "" if none."""
        address = self.keypair.pubkey()
        try:
            return earliest_memo(
                self.client, address, str(address), _root_prefix(root), self.lookback
            )
        except MemoReadError as e:
            raise AnchorError(str(e)) from e

    def _expired(self, sent: _InFlight) -> bool:
        status = self.client.get_signature_statuses([sent.signature]).value[0]
        if status is not None:
            return False  # landed (or failed: _confirm says which)
        height = self.client.get_block_height(Confirmed).value
        return bool(height > sent.last_valid_block_height)

    def _sign(self, text: str) -> _InFlight:
        latest = self.client.get_latest_blockhash(Confirmed).value
        memo = create_memo(
            MemoParams(program_id=MEMO_PROGRAM, signer=self.keypair.pubkey(), message=text.encode())
        )
        message = MessageV0.try_compile(self.keypair.pubkey(), [memo], [], latest.blockhash)
        tx = VersionedTransaction(message, [self.keypair])
        return _InFlight(bytes(tx), tx.signatures[0], int(latest.last_valid_block_height))

    def _send(self, sent: _InFlight) -> None:
        status = self.client.get_signature_statuses([sent.signature]).value[0]
        if status is not None:
            return  # already landed: a resend would only be refused as AlreadyProcessed
        self.client.send_raw_transaction(sent.raw, TxOpts(preflight_commitment=Confirmed))

    def _confirm(self, sent: _InFlight) -> None:
        deadline = time.monotonic() + self.tx_timeout
        while True:
            status = self.client.get_signature_statuses([sent.signature]).value[0]
            if status is not None:
                if status.err is not None:
                    raise AnchorError(f"memo transaction {sent.signature} failed: {status.err}")
                if status.confirmation_status is not None:
                    return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"memo transaction {sent.signature} not confirmed within {self.tx_timeout:g}s"
                )
            time.sleep(self.poll_seconds)


# --- checking an anchor ---------------------------------------------------------------------


@dataclass
class OnchainCheck:
    """What `dispatch receipt verify --onchain` found."""

    problems: list[str] = field(default_factory=list)
    anchorer: str = ""  # the memo transaction's signer
    slot: int = 0
    memo: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": not self.problems,
            "problems": self.problems,
            "anchorer": self.anchorer,
            "slot": self.slot,
            "memo": self.memo,
        }


def check_anchor_onchain(
    chain: SolanaChain,
    root: bytes,
    network: str,
    transaction: str,
    *,
    expected_anchorer: str = "",
    timeout: float = 10.0,
) -> OnchainCheck:
    """Reads the proof's anchor transaction back: it landed without error, its signer is
    `expected_anchorer` (when given) and one of its memos carries `root`. Blocking."""
    out = OnchainCheck()
    if network != chain.network:
        out.problems.append(
            f"the proof is anchored on {network or 'no network'!r}, the profile's chain is "
            f"{chain.network}"
        )
    if not transaction:
        out.problems.append("the proof names no anchor transaction (not anchored yet?)")
        return out
    try:
        signature = Signature.from_string(transaction)
    except ValueError:
        out.problems.append(f"tx not found: {transaction!r} is not a Solana signature")
        return out
    client = client_for(chain.rpc_url, timeout)
    try:
        fetched = fetch_transaction(client, str(signature))
        if fetched is None:
            out.problems.append(f"tx not found: {transaction} is not on {chain.network}")
            return out
        tx, err, out.slot = fetched
    except TRANSIENT as e:
        out.problems.append(f"cannot reach chain {chain.network} at {chain.rpc_url}: {brief(e)}")
        return out
    except MemoReadError as e:
        out.problems.append(f"bad anchor data: {e}")
        return out
    out.anchorer = signer_of(tx)
    memos = memos_of(tx)
    out.memo = next((m for m in memos if m.startswith(_root_prefix(root))), "")
    if err is not None:
        out.problems.append(f"transaction {transaction} failed on chain: {err}")
    if expected_anchorer and out.anchorer != expected_anchorer:
        out.problems.append(
            f"root anchored by {out.anchorer}, not by the expected {expected_anchorer}"
        )
    if not out.memo:
        seen = ", ".join(repr(m[:120]) for m in memos) or "none"
        out.problems.append(
            f"root mismatch: transaction {transaction} has no anchor memo for root "
            f"{root.hex()} (memos in it: {seen})"
        )
    return out
