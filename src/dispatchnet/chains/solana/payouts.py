"""Worker payouts on Solana (payments/payouts.py's PayoutSender): one transaction per payout
(one worker, one run) from the coordinator's keypair, which pays its fee: the worker's
associated token account created if missing (idempotently, at the coordinator's cost), a
TransferChecked from the coordinator's token account, and a memo "dispatch:payout:<id>".

The signed transaction is returned for storage before it is sent, with the slot it was
signed at; sending it again can never pay twice (same signature: the chain processes it
once). It names a recent blockhash and can only land while that is valid (about a minute),
in the slot it was signed at or a later one. Once the blockhash has expired, a payout the
node does not find is STALE (the caller signs it anew, same id and memo) only when the
node's history (minimumLedgerSlot) reaches back to the slot it was signed at: then not
finding it proves it never landed. A transaction of this keypair with the payout's memo on
the worker's token account (e.g. an earlier signing of it) makes it LANDED there. A node
that has dropped that part of its history cannot tell: the payout is UNKNOWN.

Blocking solana-py code: call it in a worker thread.
"""

from __future__ import annotations

import base64
import json
import time

from solana.rpc.api import Client
from solana.rpc.commitment import Confirmed
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.rpc.errors import SendTransactionPreflightFailureMessage
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from solders.transaction_status import TransactionErrorFieldless
from spl.token.instructions import (
    TransferCheckedParams,
    create_idempotent_associated_token_account,
    transfer_checked,
)
from x402.mechanisms.svm import MEMO_PROGRAM_ADDRESS, derive_ata

from dispatchnet.chains.solana.memos import MemoReadError, earliest_memo
from dispatchnet.chains.solana.node import blockhash_valid, client_for
from dispatchnet.chains.solana.rail import MINT_DECIMALS_OFFSET, TRANSIENT, first_line
from dispatchnet.errors import Unavailable
from dispatchnet.payments.payouts import (
    MEMO_PREFIX,
    Payout,
    PayoutState,
    PayoutStatus,
    SignedPayout,
)

# How many of a worker token account's latest transactions are searched for a payout's memo
MEMO_LOOKBACK = 1000


def stored_raw(tx: VersionedTransaction, signed_slot: int) -> str:
    """A SignedPayout's `raw`: the signed transaction (base64) and the slot it was signed
    at (the context slot of the blockhash it names), as JSON."""
    return json.dumps(
        {"transaction": base64.b64encode(bytes(tx)).decode(), "signed_slot": signed_slot}
    )


def unpack_raw(raw: str) -> tuple[VersionedTransaction, int | None]:
    """The signed transaction in a SignedPayout's `raw`, and the slot it was signed at
    (None for a payout stored as the bare base64 transaction, before slots were kept)."""
    if raw.startswith("{"):
        data = json.loads(raw)
        tx, slot = str(data["transaction"]), int(data["signed_slot"])
    else:
        tx, slot = raw, None
    return VersionedTransaction.from_bytes(base64.b64decode(tx)), slot


class SolanaPayoutSender:
    """Payouts from `keypair`'s associated token accounts on the node at `rpc_url`. Every
    method blocks; node trouble raises Unavailable."""

    def __init__(
        self,
        rpc_url: str,
        keypair: Keypair,
        *,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 30.0,
        poll_seconds: float = 0.2,
    ) -> None:
        self.rpc_url = rpc_url
        self.keypair = keypair
        self.rpc_timeout = rpc_timeout
        self.tx_timeout = tx_timeout
        self.poll_seconds = poll_seconds
        self.client: Client = client_for(rpc_url, rpc_timeout)
        self._mints: dict[str, tuple[Pubkey, int]] = {}

    @property
    def address(self) -> str:
        return str(self.keypair.pubkey())

    def _mint(self, mint: str) -> tuple[Pubkey, int]:
        """(token program, decimals) of a mint, read once."""
        if mint not in self._mints:
            info = self.client.get_account_info(Pubkey.from_string(mint)).value
            if info is None or len(info.data) <= MINT_DECIMALS_OFFSET:
                raise Unavailable(f"mint {mint} not found on {self.rpc_url}")
            self._mints[mint] = (info.owner, info.data[MINT_DECIMALS_OFFSET])
        return self._mints[mint]

    def sign(self, payouts: list[Payout]) -> list[SignedPayout]:
        """One transaction per payout, all with the node's latest blockhash; each `raw`
        also holds the slot of that blockhash's answer (no transaction of it lands earlier)."""
        me = self.keypair.pubkey()
        out = []
        try:
            latest = self.client.get_latest_blockhash(Confirmed)
            blockhash, slot = latest.value.blockhash, latest.context.slot
            for p in payouts:
                program, decimals = self._mint(p.asset)
                mint, to = Pubkey.from_string(p.asset), Pubkey.from_string(p.to)
                ixs = [
                    create_idempotent_associated_token_account(me, to, mint, program),
                    transfer_checked(
                        TransferCheckedParams(
                            program_id=program,
                            source=Pubkey.from_string(
                                derive_ata(self.address, p.asset, str(program))
                            ),
                            mint=mint,
                            dest=Pubkey.from_string(derive_ata(p.to, p.asset, str(program))),
                            owner=me,
                            amount=p.amount,
                            decimals=decimals,
                            signers=[],
                        )
                    ),
                    Instruction(
                        Pubkey.from_string(MEMO_PROGRAM_ADDRESS),
                        f"{MEMO_PREFIX}{p.payout_id}".encode(),
                        [],
                    ),
                ]
                tx = VersionedTransaction(
                    MessageV0.try_compile(me, ixs, [], blockhash), [self.keypair]
                )
                out.append(SignedPayout(p, stored_raw(tx, slot), str(tx.signatures[0])))
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        return out

    def send(self, signed: list[SignedPayout]) -> dict[str, PayoutStatus]:
        """Sends each stored transaction (again) and waits for it, one after the other."""
        return {s.payout.payout_id: self._send_one(s) for s in signed}

    def _send_one(self, signed: SignedPayout) -> PayoutStatus:
        raw = bytes(unpack_raw(signed.raw)[0])
        try:
            try:
                self.client.send_raw_transaction(raw, TxOpts(preflight_commitment=Confirmed))
            except RPCException as e:
                data = e.args[0] if e.args else None
                err = (
                    data.data.err
                    if isinstance(data, SendTransactionPreflightFailureMessage)
                    else None
                )
                if err in (
                    TransactionErrorFieldless.AlreadyProcessed,
                    TransactionErrorFieldless.BlockhashNotFound,
                ):
                    return self.status(signed)
                if data is not None and isinstance(data, SendTransactionPreflightFailureMessage):
                    # refused by the simulation (e.g. the coordinator's balance is short):
                    # nothing was sent; it may go through later, until its blockhash expires
                    return PayoutStatus(PayoutState.NOT_FOUND, "", str(data.message)[:300])
                raise Unavailable(f"payout not accepted by the node: {data}") from None
            deadline = time.monotonic() + self.tx_timeout
            while True:
                status = self.status(signed)
                if status.state is not PayoutState.NOT_FOUND:
                    return status
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"payout {signed.transaction} not confirmed in {self.tx_timeout:.0f}s"
                    )
                time.sleep(self.poll_seconds)
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

    def status(self, signed: SignedPayout) -> PayoutStatus:
        """LANDED (or FAILED when it landed with an error: it moved nothing) by
        getSignatureStatuses. Not found: NOT_FOUND while its blockhash is valid; once it
        has expired (checked before a last look, so one landing meanwhile is still seen),
        LANDED if a transaction of this keypair carrying the payout's memo landed on the
        worker's token account (another signing of it), else STALE when the node's history
        reaches back to the slot it was signed at (it never landed), else UNKNOWN."""
        sig = Signature.from_string(signed.transaction)
        try:
            found = self._lookup(sig)
            if found is not None:
                return found
            tx, signed_slot = unpack_raw(signed.raw)
            if self._blockhash_valid(str(tx.message.recent_blockhash)):
                return PayoutStatus(PayoutState.NOT_FOUND)
            found = self._lookup(sig) or self._landed_by_memo(signed.payout)
            return found or self._never_landed(signed_slot)
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        except MemoReadError as e:
            raise Unavailable(f"Solana node: {e}") from e

    def _lookup(self, sig: Signature) -> PayoutStatus | None:
        status = self.client.get_signature_statuses([sig], search_transaction_history=True)
        found = status.value[0]
        if found is None:
            return None
        if found.err is not None:
            return PayoutStatus(PayoutState.FAILED, str(sig), f"failed on chain: {found.err}")
        return PayoutStatus(PayoutState.LANDED, str(sig))

    def _blockhash_valid(self, blockhash: str) -> bool:
        return blockhash_valid(self.rpc_url, blockhash, self.rpc_timeout)

    def _landed_by_memo(self, payout: Payout) -> PayoutStatus | None:
        """LANDED in the earliest transaction among the worker's token account's
        MEMO_LOOKBACK latest that succeeded, was signed by this keypair and carries the
        payout's memo; None if none (as far back as the node's history goes)."""
        program, _ = self._mint(payout.asset)
        account = Pubkey.from_string(derive_ata(payout.to, payout.asset, str(program)))
        memo = f"{MEMO_PREFIX}{payout.payout_id}"
        found = earliest_memo(self.client, account, self.address, memo, MEMO_LOOKBACK)
        return PayoutStatus(PayoutState.LANDED, found) if found else None

    def _never_landed(self, signed_slot: int | None) -> PayoutStatus:
        """STALE when the node's history starts no later than the slot the payout was
        signed at (its lookups saw every slot it could land in), else UNKNOWN. Read after
        the lookups: a history only ever starts later, never earlier."""
        oldest = self.client.get_minimum_ledger_slot().value
        if oldest <= (signed_slot or 0):
            return PayoutStatus(PayoutState.STALE, "", "its blockhash expired before it landed")
        signed_at = "at an unknown slot" if signed_slot is None else f"at slot {signed_slot}"
        return PayoutStatus(
            PayoutState.UNKNOWN,
            "",
            f"not found, but the node's history starts at slot {oldest} and the payout was "
            f"signed {signed_at}: it may have landed",
        )
