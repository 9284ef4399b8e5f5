"""Receipt verification for SDK users, offline: nothing here asks the coordinator.

A receipt is valid when both the worker's and the coordinator's ed25519 signatures verify
over its exact signed bytes (receipts/core.py, the same checks as VerifyReceipt), and, for
a job you ran, when it is that job's receipt: its job id, client, input hash (the quote's
spec hash), output hash (of the output bytes you got), price and worker all match. With a
Merkle proof (GetReceiptProof), the proof must be for this receipt and recompute its batch
root (checking the root's anchor on chain is `dispatch receipt verify --onchain`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dispatch.v1 import receipt_pb2
from dispatchnet.receipts.core import check_receipt_proof, sha256, verify_receipt_message
from dispatchnet.sdk import types
from dispatchnet.sdk.convert import to_pb, to_types


@dataclass(frozen=True)
class Expected:
    """What a receipt must say for a job you ran (empty / negative fields are not checked)."""

    job_id: str = ""
    client_id: str = ""
    output: bytes | None = None
    input_sha256: bytes = b""
    price_micros: int = -1
    worker_id: str = ""
    verified_runs: int = 0
    """JobSpec.verify of the job: above 1, the receipt must carry the coordinator's
    REDUNDANT verification record of at least that many runs (whose consistency, a
    majority agreeing on this output, verify_receipt_message checks)."""


@dataclass(frozen=True)
class ReceiptCheck:
    """The outcome of verify_receipt: `problems` names every failed check."""

    problems: list[str] = field(default_factory=list)
    body: types.ReceiptBody | None = None
    """The signed body, decoded (None when it does not parse)."""
    proof_checked: bool = False

    @property
    def valid(self) -> bool:
        return not self.problems


def verify_receipt(
    receipt: types.Receipt,
    *,
    expected_coordinator_key: bytes | Iterable[bytes] = b"",
    proof: types.GetReceiptProofResponse | None = None,
    expected: Expected | None = None,
) -> ReceiptCheck:
    """Checks a receipt (and a proof, when given) offline.

    expected_coordinator_key: the receipt must be countersigned by this coordinator key
    (32 bytes), or by one of these keys (a cluster's coordinators); without it any
    coordinator's valid signature passes."""
    pb = to_pb(receipt, receipt_pb2.Receipt)
    v = verify_receipt_message(pb, expected_coordinator_key)
    problems = list(v.problems)
    body = v.body
    if body is not None and expected is not None:
        e = expected
        checks: list[tuple[str, bool]] = [
            ("job_id", not e.job_id or body.job_id == e.job_id),
            ("client_id", not e.client_id or body.client_id == e.client_id),
            ("output_sha256", e.output is None or body.output_sha256 == sha256(e.output)),
            ("input_sha256", not e.input_sha256 or body.input_sha256 == e.input_sha256),
            ("price", e.price_micros < 0 or body.price.amount_micros == e.price_micros),
            ("worker_public_key", not e.worker_id or body.worker_public_key.hex() == e.worker_id),
            ("verification", e.verified_runs <= 1 or _redundant(body, e.verified_runs)),
        ]
        problems += [f"receipt {name} does not match the job" for name, ok in checks if not ok]
    if proof is not None:
        problems += check_receipt_proof(to_pb(proof, receipt_pb2.GetReceiptProofResponse), pb)
    return ReceiptCheck(
        problems,
        None if body is None else to_types(body, types.ReceiptBody),
        proof_checked=proof is not None,
    )


def _redundant(body: receipt_pb2.ReceiptBody, runs: int) -> bool:
    """Whether the body records a comparison of at least `runs` independent runs."""
    v = body.verification
    return (
        body.HasField("verification")
        and v.mode == receipt_pb2.VERIFICATION_MODE_REDUNDANT
        and v.runs >= runs
    )
