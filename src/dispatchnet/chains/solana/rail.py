"""x402 on Solana: one accepted network's rail (SvmRail) for payments/x402.py's gateway, with
the SDK's exact SVM scheme (an SPL TransferChecked the client signs and the facilitator
co-signs as fee payer). Blocking solana-py code: call it in threads.

A Solana payment cannot wait for the job: its transaction names a recent blockhash and
expires with it (about 60 s). Its valid_before is therefore about now + 60 s, so with the
profile's settle margin (60 s by default) the settlement loop settles it at once, as HELD
while the job runs; a job that does not complete is refunded on chain (sign_refund).

The payment's one-time id (authorization_id) is the SHA-256 of the transaction message,
"0x" + hex: every signer commits to the message (blockhash, amount, the client's random
memo), so a payment cannot be altered without a new id, and it is the key the SDK's
facilitator itself deduplicates on. The fee payer's signature slot is not part of it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from solana.exceptions import SolanaRpcException
from solana.rpc.api import Client
from solana.rpc.commitment import Confirmed
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
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
from x402 import x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.svm import (
    MEMO_PROGRAM_ADDRESS,
    ExactSvmPayload,
    decode_transaction_from_payload,
    derive_ata,
    extract_transaction_info,
    get_default_asset,
)
from x402.mechanisms.svm.exact import ExactSvmFacilitatorScheme, ExactSvmServerScheme
from x402.schemas import PaymentPayload

from dispatchnet.chains.solana.node import blockhash_valid
from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import InvalidArgument, Unavailable
from dispatchnet.payments.service import SettlementRefused
from dispatchnet.solana_rpc import RpcFacilitatorSigner

log = logging.getLogger("dispatch.payments.solana")

# How long a transaction's blockhash stays usable: 150 slots of 400 ms.
BLOCKHASH_SECONDS = 60
# A remote facilitator's fee payer signs the landed transaction, so its signature cannot be
# derived here: settlement_of looks through the payer's newest transactions, this many.
SCAN_LIMIT = 25
TRANSIENT = (SolanaRpcException, httpx.HTTPError, OSError)
TOKEN_AMOUNT_OFFSET = 64  # an SPL token account: mint (32), owner (32), amount (u64 LE)
# Offsets in an SPL mint account: decimals (u8)
MINT_DECIMALS_OFFSET = 44


@dataclass(frozen=True)
class Asset:
    address: str
    name: str
    version: str
    decimals: int
    token_program: str


@dataclass(frozen=True)
class SvmAuthorization:
    """What an exact SVM payment carries, as the gateway reads it (see the module docstring
    for nonce)."""

    payer: str
    value: int
    nonce: str
    valid_before: float
    fee_payer: str


class WatchedSigner(RpcFacilitatorSigner):
    """RpcFacilitatorSigner noting when the node could not be reached: the SDK reports that
    as an invalid payment, and the gateway then answers UNAVAILABLE instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch_lock = threading.Lock()
        self._failed_at = 0.0
        self.last_transport_error = ""

    def transport_failed_since(self, t: float) -> bool:
        with self._watch_lock:
            return self._failed_at >= t

    def _note(self, e: BaseException) -> None:
        if isinstance(e, TRANSIENT):
            with self._watch_lock:
                self._failed_at = time.monotonic()
                self.last_transport_error = first_line(e)

    def simulate_transaction(self, tx_base64: str, network: str) -> None:
        try:
            super().simulate_transaction(tx_base64, network)
        except BaseException as e:
            self._note(e)
            raise

    def send_transaction(self, tx_base64: str, network: str) -> str:
        try:
            return super().send_transaction(tx_base64, network)
        except BaseException as e:
            self._note(e)
            raise


class SvmRail:
    """One accepted Solana network of CommitJob (payments/x402.py's PaymentRail): the exact
    SVM scheme, its facilitator (in-process with the coordinator's keypair as fee payer, or
    a URL), the pay-to account (the coordinator's; its token account receives), the mint,
    and refunds. One settlement per payment (no batch). Every method blocks."""

    batch: Any = None

    def __init__(
        self,
        network: str,
        rpc_url: str,
        mint: str,
        keypair: Keypair,
        *,
        rpc_timeout: float = 10.0,
        tx_timeout: float = 30.0,
        facilitator_url: str = "",
        poll_seconds: float = 0.2,
    ) -> None:
        self.network = network
        self.rpc_url = rpc_url
        self.keypair = keypair
        self.pay_to = str(keypair.pubkey())
        self.tx_timeout = tx_timeout
        self.rpc_timeout = rpc_timeout
        self.poll_seconds = poll_seconds
        self.client = Client(rpc_url, timeout=rpc_timeout)
        self.signer: WatchedSigner | None = None
        self.facilitator: Any
        if facilitator_url:
            self.facilitator = HTTPFacilitatorClientSync(
                FacilitatorConfig(url=facilitator_url, timeout=rpc_timeout * 3)
            )
            self.describe = f"{network} via facilitator {facilitator_url}"
        else:
            self.signer = WatchedSigner(
                keypair,
                rpc_url,
                timeout=rpc_timeout,
                confirm_timeout=tx_timeout,
                poll_seconds=poll_seconds,
            )
            facilitator = x402FacilitatorSync()
            facilitator.register([network], ExactSvmFacilitatorScheme(self.signer))
            self.facilitator = facilitator
            self.describe = f"{network} (in-process facilitator, fee payer {self.pay_to})"
        self._mint = mint
        self._asset: Asset | None = None
        self._lock = threading.Lock()

    # --- the offer ------------------------------------------------------------------------

    def asset(self) -> Asset:
        """The mint, its decimals and token program: read from the chain once (Unavailable
        while the node is down), or the SDK's default USDC of the network when no mint is
        configured."""
        with self._lock:
            if self._asset is None:
                if self._mint:
                    try:
                        info = self.client.get_account_info(Pubkey.from_string(self._mint)).value
                    except TRANSIENT as e:
                        raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
                    if info is None or len(info.data) <= MINT_DECIMALS_OFFSET:
                        raise Unavailable(f"mint {self._mint} not found on {self.rpc_url}")
                    asset = Asset(
                        self._mint, "USDC", "", info.data[MINT_DECIMALS_OFFSET], str(info.owner)
                    )
                else:
                    d = get_default_asset(self.network)
                    asset = Asset(d["asset"], d["symbol"], "", d["decimals"], d["token_program"])
                self._open_pay_to_account(asset)
                self._asset = asset
            return self._asset

    def _open_pay_to_account(self, asset: Asset) -> None:
        """Payments go to pay_to's associated token account, which must exist before any
        payment can verify: created once, at the coordinator's cost, if it is missing (a new
        coordinator keypair has none). Unavailable while the node is down."""
        program = Pubkey.from_string(asset.token_program)
        me = self.keypair.pubkey()
        ata = Pubkey.from_string(derive_ata(self.pay_to, asset.address, str(program)))
        try:
            if self.client.get_account_info(ata).value is not None:
                return
            ix = create_idempotent_associated_token_account(
                me, me, Pubkey.from_string(asset.address), program
            )
            blockhash = self.client.get_latest_blockhash(Confirmed).value.blockhash
            tx = VersionedTransaction(
                MessageV0.try_compile(me, [ix], [], blockhash), [self.keypair]
            )
            raw = bytes(tx)
            self.client.send_raw_transaction(raw, TxOpts(preflight_commitment=Confirmed))
            if not self._await(tx.signatures[0], raw):
                raise Unavailable(f"the token account of {self.pay_to} was not created")
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        except RPCException as e:
            raise Unavailable(f"cannot create the token account of {self.pay_to}: {e}") from e
        log.info("created the token account %s of %s for payments", ata, self.pay_to)

    def server_scheme(self) -> Any:
        """The x402 SDK's server side of the exact scheme (no blockhash hints: the client
        asks its own node for one)."""
        return ExactSvmServerScheme()

    # --- a payment ------------------------------------------------------------------------

    def authorization(self, payload: PaymentPayload) -> SvmAuthorization:
        """The payer, amount and one-time id of an exact SVM payment; InvalidArgument if it
        carries no decodable TransferChecked transaction signed by its payer. No I/O."""
        try:
            tx = decode_transaction_from_payload(ExactSvmPayload.from_dict(payload.payload))
            info = extract_transaction_info(tx)
            if info is None:
                raise ValueError("no TransferChecked instruction")
            signers = list(tx.message.account_keys)[: tx.message.header.num_required_signatures]
            payer = Pubkey.from_string(info.payer)
            if payer not in signers:
                raise ValueError("the token owner does not sign the transaction")
            signature = tx.signatures[signers.index(payer)]
            if not signature.verify(payer, to_bytes_versioned(tx.message)):
                raise ValueError("the payer's signature does not verify")
        except Exception as e:
            raise InvalidArgument(
                f"payment-signature: not an exact SVM payment: {first_line(e)}"
            ) from None
        return SvmAuthorization(
            payer=info.payer,
            value=info.amount,
            nonce=message_id(tx),
            valid_before=time.time() + BLOCKHASH_SECONDS,
            fee_payer=info.fee_payer,
        )

    def balance(self, payer: str, asset: str) -> int:
        """payer's balance of the mint `asset`: what its associated token account (a
        payment's source) holds now, 0 without one. Unavailable while the node is down."""
        program = self.asset().token_program
        ata = Pubkey.from_string(derive_ata(payer, asset, program))
        try:
            info = self.client.get_account_info(ata).value
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        if info is None or len(info.data) < TOKEN_AMOUNT_OFFSET + 8:
            return 0
        return int.from_bytes(info.data[TOKEN_AMOUNT_OFFSET : TOKEN_AMOUNT_OFFSET + 8], "little")

    def transport_error_since(self, t: float) -> str:
        """What went wrong when the in-process facilitator's node failed since monotonic
        time t ("" if it did not, or the facilitator is remote)."""
        if self.signer is not None and self.signer.transport_failed_since(t):
            return self.signer.last_transport_error or "no answer"
        return ""

    def settlement_of(self, payment: Payment) -> tuple[bool, str]:
        """Whether the payment's transaction landed (and succeeded) on chain, and its
        signature. With our own fee payer the landed signature is ours, derived from the
        message (ed25519 is deterministic); with a remote facilitator the payer's newest
        SCAN_LIMIT transactions are searched for the message. Unavailable when the node
        cannot be reached."""
        tx = decode_transaction_from_payload(ExactSvmPayload.from_dict(_payload(payment).payload))
        fee_payer = tx.message.account_keys[0]
        try:
            if fee_payer == self.keypair.pubkey():
                sig = self.keypair.sign_message(to_bytes_versioned(tx.message))
                landed = self._status(sig)
                return (True, str(sig)) if landed else (False, "")
            return self._scan(Pubkey.from_string(payment.payer), message_id(tx))
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

    def waits(self, payment: Payment) -> bool:
        """Never: this rail has no back-off of its own."""
        return False

    def settlement_failed(self, transaction: str) -> bool:
        """Whether the settlement transaction (a signature) landed with an error: it ran
        and moved nothing, and its payment's one signed transaction cannot land again.
        Unavailable when the node cannot be reached."""
        try:
            return self._status(Signature.from_string(transaction)) is False
        except ValueError:  # not a signature: nothing is known of it
            return False
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

    def _scan(self, payer: Pubkey, wanted: str) -> tuple[bool, str]:
        listed = self.client.get_signatures_for_address(payer, limit=SCAN_LIMIT).value
        for entry in listed:
            if entry.err is not None:
                continue
            got = self.client.get_transaction(
                entry.signature, encoding="base64", max_supported_transaction_version=0
            ).value
            if got is None:
                continue
            landed = got.transaction.transaction
            if isinstance(landed, VersionedTransaction) and message_id(landed) == wanted:
                return True, str(entry.signature)
        return False, ""

    def settle_batch(
        self,
        asset: str,
        payments: list[Payment],
        refusal: Callable[[Payment], SettlementRefused | None],
    ) -> dict[str, str | SettlementRefused]:
        raise ValueError(f"{self.network} settles one payment at a time")

    # --- refunds ---------------------------------------------------------------------------

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        """(raw signed transaction base64, its signature): a TransferChecked of the amount
        from the coordinator's token account back to the payer's (created first if
        missing, paid by the coordinator), with a recent blockhash and a memo naming the
        job, so two refunds of one amount to one payer are different transactions."""
        asset = self.asset()
        program = Pubkey.from_string(asset.token_program)
        mint = Pubkey.from_string(payment.asset)
        me = self.keypair.pubkey()
        payer = Pubkey.from_string(payment.payer)
        ixs = [
            create_idempotent_associated_token_account(me, payer, mint, program),
            transfer_checked(
                TransferCheckedParams(
                    program_id=program,
                    source=Pubkey.from_string(derive_ata(self.pay_to, payment.asset, str(program))),
                    mint=mint,
                    dest=Pubkey.from_string(derive_ata(payment.payer, payment.asset, str(program))),
                    owner=me,
                    amount=payment.amount,
                    decimals=asset.decimals,
                    signers=[],
                )
            ),
            Instruction(
                Pubkey.from_string(MEMO_PROGRAM_ADDRESS),
                f"dispatch:refund:{payment.job_id}".encode(),
                [],
            ),
        ]
        try:
            blockhash = self.client.get_latest_blockhash(Confirmed).value.blockhash
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e
        tx = VersionedTransaction(MessageV0.try_compile(me, ixs, [], blockhash), [self.keypair])
        return base64.b64encode(bytes(tx)).decode(), str(tx.signatures[0])

    def refund_status(self, payment: Payment) -> bool | None:
        """True: the refund landed and succeeded; False: it landed and failed; None: not
        found (yet)."""
        try:
            return self._status(Signature.from_string(payment.refund_transaction))
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

    def broadcast_refund(self, payment: Payment) -> bool | None:
        """Sends the stored refund (again) and waits for it; as refund_status. None when its
        blockhash expired before it landed: it never can, and the caller signs a new one. A
        resend of a landed refund pays nothing more (same signature)."""
        raw = base64.b64decode(payment.refund_raw)
        sig = Signature.from_string(payment.refund_transaction)
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
                if err == TransactionErrorFieldless.AlreadyProcessed:
                    return self._status(sig)
                if err == TransactionErrorFieldless.BlockhashNotFound:
                    blockhash = str(VersionedTransaction.from_bytes(raw).message.recent_blockhash)
                    if self._blockhash_valid(blockhash):  # a lagging node, not an expiry
                        raise Unavailable(f"refund {sig}: blockhash unknown") from None
                    landed = self._status(sig)
                    if landed is None:
                        log.info("refund %s went stale (blockhash expired); signing anew", sig)
                    return landed
                raise Unavailable(f"refund not accepted by the node: {data}") from None
            return self._await(sig, raw)
        except TRANSIENT as e:
            raise Unavailable(f"Solana node unreachable: {first_line(e)}") from e

    def _await(self, sig: Signature, raw: bytes) -> bool | None:
        deadline = time.monotonic() + self.tx_timeout
        blockhash = VersionedTransaction.from_bytes(raw).message.recent_blockhash
        while True:
            landed = self._status(sig)
            if landed is not None:
                return landed
            if not self._blockhash_valid(str(blockhash)):
                return self._status(sig)  # expired: it can no longer land
            if time.monotonic() > deadline:
                raise Unavailable(f"refund {sig} not confirmed in {self.tx_timeout:.0f}s")
            time.sleep(self.poll_seconds)

    def _blockhash_valid(self, blockhash: str) -> bool:
        return blockhash_valid(self.rpc_url, blockhash, self.rpc_timeout)

    def _status(self, sig: Signature) -> bool | None:
        status = self.client.get_signature_statuses([sig], search_transaction_history=True)
        found = status.value[0]
        if found is None:
            return None
        return found.err is None


def message_id(tx: VersionedTransaction) -> str:
    """A payment's one-time id: "0x" + hex SHA-256 of its transaction message."""
    return "0x" + hashlib.sha256(bytes(tx.message)).hexdigest()


def _payload(payment: Payment) -> PaymentPayload:
    return PaymentPayload.model_validate_json(payment.payload_json)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
