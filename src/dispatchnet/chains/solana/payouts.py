"""Worker payouts on Solana (payments/payouts.py's PayoutSender): one transaction per payout
(one worker, one run) from the coordinator's keypair, which pays its fee: the worker's
associated token account created if missing (idempotently, at the coordinator's cost), a
TransferChecked from the coordinator's token account, and a memo "dispatch:payout:<id>".

The signed transaction is returned for storage before it is sent; sending it again can
never pay twice (same signature: the chain processes it once). It names a recent blockhash
and can only land while that is valid (about a minute): one never landed past it is STALE,
and the caller signs the payout anew (same id and memo).

Blocking solana-py code: call it in a worker thread.
"""

from __future__ import annotations

import base64
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
        """One transaction per payout, all with the node's latest blockhash."""
        me = self.keypair.pubkey()
        out = []
        try:
            blockhash = self.client.get_latest_blockhash(Confirmed).value.blockhash
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
                out.append(
                    SignedPayout(p, base64.b64encode(bytes(tx)).decode(), str(tx.signatures[0]))
                )
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        return out

    def send(self, signed: list[SignedPayout]) -> dict[str, PayoutStatus]:
        """Sends each stored transaction (again) and waits for it, one after the other."""
        return {s.payout.payout_id: self._send_one(s) for s in signed}

    def _send_one(self, signed: SignedPayout) -> PayoutStatus:
        raw = base64.b64decode(signed.raw)
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
        getSignatureStatuses; not found, STALE once its blockhash has expired (checked
        before a last look, so one landing meanwhile is still seen), else NOT_FOUND."""
        sig = Signature.from_string(signed.transaction)
        try:
            found = self._lookup(sig)
            if found is None:
                blockhash = VersionedTransaction.from_bytes(
                    base64.b64decode(signed.raw)
                ).message.recent_blockhash
                if self._blockhash_valid(str(blockhash)):
                    return PayoutStatus(PayoutState.NOT_FOUND)
                found = self._lookup(sig)
                if found is None:
                    return PayoutStatus(
                        PayoutState.STALE, "", "its blockhash expired before it landed"
                    )
            return found
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

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
