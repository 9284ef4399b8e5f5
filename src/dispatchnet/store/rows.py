"""Rows <-> domain types, shared by the SQL stores (store/sqlite.py, store/postgres.py):
the same columns, read by name from a sqlite3.Row or an asyncpg Record."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any, Protocol

from dispatchnet.coordinator.models import (
    GIVEN_UP,
    AnchorStatus,
    Earning,
    Event,
    EventKind,
    Failure,
    FeedbackEntry,
    FeedbackStatus,
    Job,
    JobSpec,
    JobState,
    JobType,
    Pairing,
    Payment,
    PaymentRef,
    PaymentStatus,
    PayoutRecord,
    PayoutRowState,
    Policy,
    Privacy,
    Receipt,
    ReceiptBatch,
    Result,
    Run,
)


class Row(Protocol):
    """A result row: its columns by name."""

    def __getitem__(self, key: str, /) -> Any: ...


TOTAL_OWNER = "*"  # the quote_usage row of all owners together (client ids are hex)

NO_RUNS = (None, "", "[]")  # a verify_seen column with no run in it

# Job fields stored as they are, in columns of the same name.
JOB_SIMPLE = {
    "job_id",
    "client_id",
    "quote_id",
    "idempotency_key",
    "attempts",
    "max_attempts",
    "created_at",
    "updated_at",
    "queued_at",
    "last_sequence",
    "worker_id",
    "lease_expires_at",
    "coordinator_id",
    "price_micros",
    "currency",
    "verify_mode",
    "verify_runs",
}


# Payouts recorded and not final (pending, signed), as an SQL condition on their state
OPEN_PAYOUT_STATE = f"state IN ('{PayoutRowState.PENDING.value}', '{PayoutRowState.SIGNED.value}')"
# A worker's open payout of the same network and asset as worker_earnings row `e` (a due
# balance waits for it): the same SQL on SQLite and PostgreSQL
OPEN_PAYOUT_OF_E = (
    "SELECT 1 FROM payouts o WHERE o.worker_id = e.worker_id AND o.network = e.network "
    f"AND o.asset = e.asset AND o.{OPEN_PAYOUT_STATE}"
)

# A payment verified and stored but not moved on chain yet: the payer's balance must still
# cover it (PaymentService.authorize), as an SQL condition on a payments row
PAYMENT_OWED = f"status = '{PaymentStatus.AUTHORIZED.value}'"
# The index those are summed by, per payer (network, asset and payer as the replay index
# compares them), on SQLite and PostgreSQL
PAYMENTS_OWED_INDEX = f"(network, lower(asset), lower(payer)) WHERE {PAYMENT_OWED}"


def not_given_up(events: str = "events", reasons: tuple[str, ...] = GIVEN_UP) -> str:
    """A condition on a row of the events table (named `events` in the query) that
    records an offer: true unless a move of the same attempt, held by the same worker,
    back to QUEUED has a reason beginning with one of `reasons` (models.GIVEN_UP: its
    worker gave it up; models.NOT_HELD: nor can it resume it). The same SQL on SQLite and
    PostgreSQL; the reasons are constants, written into the text."""
    prefixes = " OR ".join(f"substr(g.reason, 1, {len(p)}) = '{p}'" for p in reasons)
    return (
        f"NOT EXISTS (SELECT 1 FROM events g WHERE g.job_id = {events}.job_id "
        f"AND g.kind = '{EventKind.STATE.value}' AND g.state = {int(JobState.QUEUED)} "
        f"AND g.worker_id = {events}.worker_id AND g.attempt = {events}.attempt "
        f"AND ({prefixes}))"
    )


def spec_of(r: Row) -> JobSpec:
    return JobSpec(
        job_type=JobType(r["job_type"]),
        policy=Policy(r["policy"]),
        privacy=Privacy(r["privacy"]),
        task_name=r["task_name"] or "",
        llm_model=r["llm_model"] or "",
        spec_bytes=r["spec_bytes"],
        spec_sha256=r["spec_sha256"],
        use_llm=bool(r["use_llm"]),
        verify=r["verify"] or 0,
        recipients=frozenset((r["recipients"] or "").split()),
    )


def recipients_text(spec: JobSpec) -> str:
    """The recipients column: a sealed job's worker ids, sorted, space-separated."""
    return " ".join(sorted(spec.recipients))


def changes_row(changes: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in changes.items():
        if key in JOB_SIMPLE:
            row[key] = value
        elif key == "state":
            row["state"] = int(value)
        elif key == "result":
            res: Result | None = value
            row["result_output"] = res.output if res else None
            row["result_content_type"] = res.content_type if res else None
            row["prompt_tokens"] = res.prompt_tokens if res else None
            row["completion_tokens"] = res.completion_tokens if res else None
        elif key == "failure":
            f: Failure | None = value
            row["failure_code"] = f.code if f else None
            row["failure_message"] = f.message if f else None
        elif key == "receipt":
            rc: Receipt | None = value
            row["receipt_body"] = rc.body if rc else None
            row["receipt_worker_sig"] = rc.worker_signature if rc else None
            row["receipt_coord_sig"] = rc.coordinator_signature if rc else None
            row["receipt_sha256"] = rc.sha256 if rc else None
        elif key == "payment":
            row["payment"] = json.dumps(value.__dict__)
        elif key == "verify_seen":
            row["verify_seen"] = json.dumps(list(value))
        else:
            raise KeyError(f"job has no field {key!r}")
    return row


def stored_job(job: Job, payment: Payment | None, offered: Event | None) -> Job:
    """The job as create_job stores it: with its payment's ref, and its last sequence (its
    committed event's, or the offered one's after it)."""
    if payment is not None:
        return dataclasses.replace(
            job, payment=payment.ref(), last_sequence=1 if offered is None else 2
        )
    return dataclasses.replace(job, last_sequence=1 if offered is None else 2)


def job_row(job: Job) -> dict[str, Any]:
    s = job.spec
    row = {k: getattr(job, k) for k in sorted(JOB_SIMPLE)}
    row.update(
        state=int(job.state),
        job_type=int(s.job_type),
        policy=int(s.policy),
        privacy=int(s.privacy),
        task_name=s.task_name,
        llm_model=s.llm_model,
        spec_bytes=s.spec_bytes,
        spec_sha256=s.spec_sha256,
        use_llm=int(s.use_llm),
        verify=s.verify,
        recipients=recipients_text(s),
    )
    row.update(
        changes_row(
            {
                "result": job.result,
                "failure": job.failure,
                "receipt": job.receipt,
                "payment": job.payment,
                "verify_seen": job.verify_seen,
            }
        )
    )
    return row


def events_of(r: Row) -> list[Event]:
    """The events an events row holds: itself, or the progress events coalesced in it."""
    e = Event(
        job_id=r["job_id"],
        kind=EventKind(r["kind"]),
        state=JobState(r["state"]),
        time=r["time"],
        sequence=r["sequence"],
        from_state=JobState(r["from_state"]) if r["from_state"] is not None else None,
        reason=r["reason"] or "",
        worker_id=r["worker_id"] or "",
        attempt=r["attempt"] or 0,
        text=r["text"] or "",
        fraction=r["fraction"] or 0.0,
    )
    if r["chunks"] is None:
        return [e]
    out, at = [], 0
    for i, (length, fraction, time) in enumerate(json.loads(r["chunks"])):
        out.append(
            dataclasses.replace(
                e,
                sequence=r["first_sequence"] + i,
                text=e.text[at : at + length],
                fraction=fraction,
                time=time,
            )
        )
        at += length
    return out


def job_of(r: Row) -> Job:
    if isinstance(r, sqlite3.Row):  # each of its reads by name scans the column names
        r = dict(zip(r.keys(), r, strict=True))  # (jobs: 40 columns; ~6 us less a job)
    result = failure = receipt = None
    if r["result_content_type"] is not None:
        result = Result(
            r["result_output"] or b"",
            r["result_content_type"],
            r["prompt_tokens"] or 0,
            r["completion_tokens"] or 0,
        )
    if r["failure_code"] is not None:
        failure = Failure(r["failure_code"], r["failure_message"] or "")
    if r["receipt_body"] is not None:
        receipt = Receipt(
            r["receipt_body"], r["receipt_worker_sig"], r["receipt_coord_sig"], r["receipt_sha256"]
        )
    return Job(
        job_id=r["job_id"],
        client_id=r["client_id"],
        state=JobState(r["state"]),
        spec=spec_of(r),
        price_micros=r["price_micros"],
        currency=r["currency"],
        quote_id=r["quote_id"],
        idempotency_key=r["idempotency_key"],
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        queued_at=r["queued_at"],
        last_sequence=r["last_sequence"],
        worker_id=r["worker_id"] or "",
        lease_expires_at=r["lease_expires_at"] or 0.0,
        coordinator_id=r["coordinator_id"] or "",
        result=result,
        failure=failure,
        receipt=receipt,
        payment=PaymentRef(**json.loads(r["payment"] or "{}")),
        verify_mode=r["verify_mode"] or "",
        verify_runs=r["verify_runs"] or 0,
        verify_seen=tuple(json.loads(seen)) if (seen := r["verify_seen"]) not in NO_RUNS else (),
    )


def run_row(run: Run) -> dict[str, Any]:
    """The job_runs row of a run (the same columns in both engines)."""
    return {
        "job_id": run.job_id,
        "attempt": run.attempt,
        "worker_id": run.worker_id,
        "agent_id": run.agent_id,
        "result_output": run.result.output,
        "result_content_type": run.result.content_type,
        "receipt_body": run.receipt.body,
        "receipt_worker_sig": run.receipt.worker_signature,
        "receipt_coord_sig": run.receipt.coordinator_signature,
        "receipt_sha256": run.receipt.sha256,
        "created_at": run.created_at,
        "verdict": run.verdict,
    }


def payees_order(result_worker: str, agreed: list[str]) -> list[str]:
    """The workers a settled job credits (see Split.among): the result's worker first,
    then the other agreeing workers in run order; the result's worker alone when no run
    agreed (a job run once)."""
    if not agreed:
        return [result_worker]
    return [result_worker] + [w for w in agreed if w != result_worker]


def run_of(r: Row) -> Run:
    return Run(
        job_id=r["job_id"],
        attempt=r["attempt"],
        worker_id=r["worker_id"],
        agent_id=r["agent_id"] or "",
        result=Result(r["result_output"] or b"", r["result_content_type"] or ""),
        receipt=Receipt(
            r["receipt_body"], r["receipt_worker_sig"], r["receipt_coord_sig"], r["receipt_sha256"]
        ),
        created_at=r["created_at"],
        verdict=r["verdict"] or "",
    )


def batch_of(r: Row) -> ReceiptBatch:
    return ReceiptBatch(
        batch_id=r["batch_id"],
        merkle_root=r["merkle_root"],
        leaf_count=r["leaf_count"],
        created_at=r["created_at"],
        anchor_status=AnchorStatus(r["anchor_status"]),
        anchor_network=r["anchor_network"] or "",
        anchor_transaction=r["anchor_transaction"] or "",
        anchor_error=r["anchor_error"] or "",
        anchored_at=r["anchored_at"],
    )


def feedback_of(r: Row) -> FeedbackEntry:
    return FeedbackEntry(
        job_id=r["job_id"],
        agent_id=int(r["agent_id"]),
        value=int(r["value"]),
        value_decimals=int(r["value_decimals"]),
        tag1=r["tag1"],
        tag2=r["tag2"],
        feedback_uri=r["feedback_uri"],
        feedback_hash=bytes(r["feedback_hash"]),
        created_at=float(r["created_at"]),
        status=FeedbackStatus(r["status"]),
        transaction=r["tx"] or "",
        error=r["error"] or "",
        attempts=int(r["attempts"] or 0),
    )


def payment_of(r: Row) -> Payment:
    return Payment(
        job_id=r["job_id"],
        network=r["network"],
        asset=r["asset"],
        pay_to=r["pay_to"],
        payer=r["payer"],
        amount=int(r["amount"]),
        authorization_id=r["authorization_id"],
        valid_before=r["valid_before"],
        settle_by=r["settle_by"],
        payload_json=r["payload_json"],
        requirement_json=r["requirement_json"],
        status=PaymentStatus(r["status"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        transaction=r["tx"] or "",
        refund_transaction=r["refund_tx"] or "",
        refund_raw=r["refund_raw"] or "",
        error=r["error"] or "",
        attempts=r["attempts"] or 0,
    )


def payout_of(r: Row) -> PayoutRecord:
    return PayoutRecord(
        payout_id=r["payout_id"],
        worker_id=r["worker_id"],
        network=r["network"],
        asset=r["asset"],
        to=r["to_address"],
        amount=int(r["amount"]),
        state=PayoutRowState(r["state"]),
        raw=r["raw"] or "",
        transaction=r["tx"] or "",
        error=r["error"] or "",
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def earning_of(r: Row) -> Earning:
    return Earning(
        job_id=r["job_id"],
        worker_id=r["worker_id"],
        network=r["network"],
        asset=r["asset"],
        amount=int(r["amount"]),
        fee_bps=int(r["fee_bps"]),
        fee=int(r["fee"]),
        share=int(r["share"]),
        credited_at=r["credited_at"],
        reversed=r["reversed_at"] is not None,
    )


def pairing_of(r: Row) -> Pairing:
    return Pairing(
        r["pairing_id"], r["client_id"], r["worker_id"], r["created_at"], r["revoked_at"]
    )
