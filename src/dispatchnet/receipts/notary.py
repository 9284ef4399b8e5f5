"""The coordinator's side of receipts: check the worker's body, countersign it."""

from __future__ import annotations

from dispatch.v1 import common_pb2, receipt_pb2
from dispatchnet.coordinator.models import (
    VERIFY_REDUNDANT,
    VERIFY_SPOT_CHECK,
    Job,
    PaymentRef,
    Receipt,
    Result,
)
from dispatchnet.errors import InvalidArgument
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import (
    ExpectedReceipt,
    append_verification,
    check_worker_receipt,
    sha256,
    sign_body,
)

_MODES = {
    VERIFY_SPOT_CHECK: receipt_pb2.VERIFICATION_MODE_SPOT_CHECK,
    VERIFY_REDUNDANT: receipt_pb2.VERIFICATION_MODE_REDUNDANT,
}


def payment_to_proto(p: PaymentRef) -> common_pb2.PaymentReference:
    return common_pb2.PaymentReference(
        network=p.network,
        payer=p.payer,
        transaction=p.transaction,
        amount=p.amount,
        asset=p.asset,
        status=p.status,
        refund_transaction=p.refund_transaction,
        authorization_id=p.authorization_id,
        pay_to=p.pay_to,
    )


class Notary:
    """max_clock_skew_seconds: how far a worker's clock may be off the coordinator's
    (`[receipts] max_clock_skew_seconds`) when its receipt times are checked."""

    def __init__(self, key: KeyPair, max_clock_skew_seconds: float = 30.0) -> None:
        self.key = key
        self.max_clock_skew_seconds = max_clock_skew_seconds

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    def countersign(
        self,
        job: Job,
        attempt: int,
        worker_public_key: bytes,
        result: Result,
        body: bytes,
        signature: bytes,
        worker_agent_id: str = "",
        *,
        offered_at: float,
        now: float,
    ) -> Receipt:
        expected = ExpectedReceipt(
            job_id=job.job_id,
            attempt=attempt,
            job_type=int(job.spec.job_type),
            input_sha256=job.spec.spec_sha256,
            output_sha256=sha256(result.output),
            worker_public_key=worker_public_key,
            coordinator_public_key=self.key.public_key,
            client_id=job.client_id,
            price_micros=job.price_micros,
            currency=job.currency,
            payment=payment_to_proto(job.payment.signed()),
            worker_agent_id=worker_agent_id,
            offered_at=offered_at,
            now=now,
            max_clock_skew_seconds=self.max_clock_skew_seconds,
            sealed=job.spec.sealed,
        )
        problems = check_worker_receipt(body, signature, expected)
        if problems:
            raise InvalidArgument("; ".join(problems))
        return Receipt(body, signature, sign_body(self.key, body), sha256(body))

    def verified(
        self,
        receipt: Receipt,
        mode: str,
        runs: int,
        agreeing: list[str],
        dissenting: list[str],
    ) -> Receipt:
        """A run's countersigned receipt with the verification record appended
        (ReceiptBody.verification) and countersigned anew; the worker's signature stays
        (it covers the body before the record). agreeing/dissenting: worker ids (hex
        keys), the receipt's worker first among the agreeing."""
        record = receipt_pb2.Verification(
            mode=_MODES.get(mode, receipt_pb2.VERIFICATION_MODE_SINGLE),
            runs=runs,
            output_sha256=_output_hash(receipt.body),
            agreeing_worker_keys=[bytes.fromhex(w) for w in agreeing],
            dissenting_worker_keys=[bytes.fromhex(w) for w in dissenting],
            # this coordinator signs the whole body; the run's receipt may name another
            # (the coordinator of the session that delivered it, on a shared database)
            concluded_by=self.key.public_key,
        )
        body = append_verification(receipt.body, record)
        return Receipt(body, receipt.worker_signature, sign_body(self.key, body), sha256(body))


def _output_hash(body: bytes) -> bytes:
    decoded = receipt_pb2.ReceiptBody()
    decoded.ParseFromString(body)
    return decoded.output_sha256
