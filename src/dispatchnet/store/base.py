"""The Store port: everything the coordinator keeps durably, as coroutines.

The event loop never waits on storage: an implementation does its I/O, lock waits and
sweeps elsewhere (store/threaded.py: SQLite served by its own connection threads, one
writer and parallel readers under WAL) and the awaiting coroutine resumes when the answer
is there. A write is acknowledged (its coroutine returns) only once it is committed.

Every method that changes a job is atomic: the job row and its event commit together or
not at all, and conditional updates (compare-and-set on state and attempt) make concurrent
coordinators safe. Implementations: store/threaded.py over store/sqlite.py (the embedded
default, whose synchronous SqliteStore has the same methods and is what tools and tests of
the SQL itself use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dispatchnet.coordinator.models import (
    AnchorStatus,
    Balance,
    Earning,
    Event,
    FeedbackEntry,
    FeedbackStatus,
    Job,
    JobState,
    Pairing,
    Payment,
    PaymentStatus,
    PayoutDue,
    PayoutRecord,
    PayoutRowState,
    Quote,
    ReceiptBatch,
    ReceiptLeaf,
    Split,
    UnbatchedReceipt,
)


@dataclass(frozen=True)
class Runnable:
    """What the connected workers with free slots can run: TASK jobs with these names
    (without an LLM), and jobs that need an LLM when `llm` is true."""

    task_names: frozenset[str]
    llm: bool


@dataclass(frozen=True)
class QuoteUsage:
    """Stored quotes not yet released, and the bytes they count."""

    quotes: int
    bytes: int


class Store(Protocol):
    # quotes
    async def put_quote(
        self, quote: Quote, owner: str = "", size: int = 0, module: bytes | None = None
    ) -> None:
        """Stores quote for owner (a client id, "" for anonymous) and counts `size` bytes
        toward owner's and the total usage until it is released; stores `module` (the
        WebAssembly module of its spec, content-addressed) with it. One transaction."""
        ...

    async def get_quote(self, quote_id: str) -> Quote | None: ...
    async def quote_usage(self, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
        """What owner's unreleased quotes hold, and what everyone's do."""
        ...

    async def release_expired_quotes(self, now: float) -> int:
        """Quotes that expired before `now` give their usage back and drop their spec (the
        row stays, so CommitJob still says "expired", until purge_expired); then modules
        that no stored quote and no open job references are deleted. How many quotes."""
        ...

    async def purge_expired(self, before: float) -> int:
        """Deletes released quotes and pairing codes that expired before `before`; how many."""
        ...

    # jobs
    async def create_job(
        self, job: Job, event: Event, payment: Payment | None = None
    ) -> tuple[Job, bool]:
        """Inserts job with its first event (and its payment, in the same transaction); if
        (client_id, idempotency_key) exists already, returns that job and False instead and
        stores no payment. Raises PaymentReused when the payment's (network, asset, payer,
        authorization_id) belongs to another job already."""
        ...

    # payments
    async def get_payment(self, job_id: str) -> Payment | None: ...
    async def payment_used(
        self, network: str, asset: str, payer: str, authorization_id: str
    ) -> bool:
        """Whether a job was committed with this payment already."""
        ...

    async def open_payments(self, limit: int = 100) -> list[tuple[Payment, JobState]]:
        """Payments that are not final, with their job's state, oldest first."""
        ...

    async def due_payments(self, now: float, limit: int = 100) -> list[tuple[Payment, JobState]]:
        """Payments the settlement loop has something to do for, with their job's state,
        oldest first: authorized ones whose job is final or whose settle_by has come, held
        ones whose job is final, and refunds due. Payments of jobs still running wait
        outside the page, so they never hide the ones behind them."""
        ...

    async def update_payment(
        self,
        job_id: str,
        from_statuses: Sequence[PaymentStatus],
        changes: dict[str, Any],
        credit: Split | None = None,
    ) -> Payment | None:
        """Compare-and-set on the payment's status; updates the job's payment reference in
        the same transaction. None when the status was not one of from_statuses. With
        `credit`, the job's worker is credited that split of the payment in the same
        transaction (once per job: a second credit of a job is ignored); a payment moving
        to REFUND_DUE or REFUNDED reverses its job's credit, if any."""
        ...

    # earnings
    async def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        """A worker's credits, newest first (by credited_at, then job_id), those before
        the (credited_at, job_id) cursor when given; at most `limit`."""
        ...

    async def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        """The earnings of each of worker_ids that has any, per (network, asset), in one
        read (the caller bounds the ids)."""
        ...

    # payouts (coordinator/ports.py PayoutLedger has the contracts)
    async def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]: ...
    async def create_payout(self, payout: PayoutRecord) -> bool: ...
    async def update_payout(
        self, payout_id: str, from_states: Sequence[PayoutRowState], changes: dict[str, Any]
    ) -> PayoutRecord | None: ...
    async def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]: ...
    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]: ...

    async def get_job(self, job_id: str) -> Job | None: ...
    async def get_job_by_key(self, client_id: str, idempotency_key: str) -> Job | None: ...

    async def transition(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event | None,
        feedback: FeedbackEntry | None = None,
        outcome: tuple[str, bool] | None = None,
    ) -> Job | None:
        """Applies changes (Job field names) if the job is in one of from_states (and at
        attempt, when given), appending event, adding `feedback` to the feedback outbox (at
        most one entry per job) and counting `outcome` (worker_id, success) in the worker's
        completed/failed totals, all in the same transaction; the job as it is then, or None
        when the condition did not hold."""
        ...

    async def append_progress(self, events: Sequence[Event]) -> bool:
        """Stores progress events of one job, one attempt, with consecutive sequence
        numbers (given by the caller), as one row, and makes the last one the job's
        last_sequence. False (nothing written) when the job is final or unknown, or its
        last_sequence is not the one before the first event's."""
        ...

    async def offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        """When the job's history shows worker_id was offered the given attempt; None if
        it never was."""
        ...

    async def held_attempts(self, worker_id: str, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        """The (job_id, attempt) pairs among job_ids that worker_id was offered, in one
        read whatever the number of ids (the caller bounds them)."""
        ...

    async def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[Event]:
        """At most `limit` events after `sequence`, in order; progress events stored
        together (append_progress) come back one by one, as they were given."""
        ...

    async def queued_jobs(
        self, limit: int, after: tuple[float, str] | None = None, runnable: Runnable | None = None
    ) -> list[Job]:
        """QUEUED jobs oldest first, after the (queued_at, job_id) cursor, and only those
        `runnable` admits (None admits all)."""
        ...

    async def lapsed_leases(self, now: float) -> list[Job]: ...
    async def stale_queued(self, queued_before: float) -> list[Job]: ...
    async def active_jobs(self, worker_id: str | None = None) -> list[Job]: ...

    # pairing
    async def put_pairing_code(
        self, code_hash: bytes, client_id: str, expires_at: float
    ) -> None: ...
    async def pairing_code_owner(self, code_hash: bytes, now: float) -> str | None:
        """The client of an unexpired, unused code (does not use it)."""
        ...

    async def claim_pairing_code(self, code_hash: bytes, now: float) -> str | None:
        """Marks an unexpired, unused code used and returns its client_id (atomic)."""
        ...

    async def put_pairing(self, pairing: Pairing) -> Pairing:
        """Stores a pairing; an existing active pairing of the same pair is returned instead."""
        ...

    async def get_pairing(self, pairing_id: str) -> Pairing | None: ...
    async def list_pairings(self, party_id: str, include_revoked: bool) -> list[Pairing]: ...
    async def revoke_pairing(self, pairing_id: str, now: float) -> Pairing | None: ...
    async def paired_workers(self, client_id: str) -> set[str]: ...

    # WebAssembly modules, content-addressed (stored with quotes, see put_quote)
    async def get_module(self, sha256: bytes) -> bytes | None: ...

    # workers
    async def record_worker_seen(
        self, worker_id: str, kind: int, now: float, agent_id: str = ""
    ) -> None:
        """Notes a connection; a non-empty (verified) agent id replaces the stored one."""
        ...

    async def record_task_names(self, names: Sequence[str], now: float, keep: int) -> None:
        """Notes that a worker declared these task names now; keeps only the `keep` names
        declared most recently."""
        ...

    async def task_name_known(self, name: str) -> bool:
        """Whether a worker declared this task name (and it was not dropped since)."""
        ...

    async def task_names(self, limit: int) -> list[str]:
        """At most `limit` declared task names, most recently declared first."""
        ...

    async def worker_stats(self, worker_id: str) -> tuple[int, int]:
        """(completed, failed) counts of a worker."""
        ...

    # receipt batches (Merkle trees over receipt hashes) and their anchors
    async def unbatched_receipts(self, limit: int) -> list[UnbatchedReceipt]:
        """Receipts of COMPLETED jobs that belong to no batch yet, oldest completion first
        (ties by job_id), at most `limit`."""
        ...

    async def create_receipt_batch(
        self, batch: ReceiptBatch, leaves: Sequence[UnbatchedReceipt]
    ) -> bool:
        """Stores batch and makes leaves[i] its leaf i, all in one transaction. Refuses
        (returns False, writes nothing) when any leaf is already in a batch, is not a
        completed job, or has another receipt hash: two batchers never share a receipt."""
        ...

    async def get_receipt_batch(self, batch_id: str) -> ReceiptBatch | None: ...

    async def receipt_leaf(self, job_id: str) -> ReceiptLeaf | None:
        """Where a job's receipt sits in its batch; None while it is in none."""
        ...

    async def batch_leaves(self, batch_id: str) -> list[ReceiptLeaf]:
        """Every leaf of a batch, by leaf_index (0..leaf_count-1)."""
        ...

    async def receipt_batches(
        self, statuses: Sequence[AnchorStatus] | None = None, limit: int = 100
    ) -> list[ReceiptBatch]:
        """Batches oldest first (ties by batch_id), only those in `statuses` when given."""
        ...

    async def update_anchor(
        self,
        batch_id: str,
        status: AnchorStatus,
        network: str = "",
        transaction: str = "",
        error: str = "",
        anchored_at: float | None = None,
    ) -> ReceiptBatch | None:
        """Records an anchoring outcome on a batch that is PENDING or FAILED (a final
        status, NONE or ANCHORED, never changes); None when the batch is unknown or final."""
        ...

    async def feedback_entries(
        self, statuses: Sequence[FeedbackStatus] | None = None, limit: int = 1000
    ) -> list[FeedbackEntry]:
        """Feedback outbox entries, oldest first, only those in `statuses` when given."""
        ...

    async def update_feedback(
        self, job_id: str, status: FeedbackStatus, transaction: str = "", error: str = ""
    ) -> bool:
        """Records a sending outcome on a PENDING entry (counting the attempt); False when
        the entry is unknown or final."""
        ...

    async def close(self) -> None: ...
