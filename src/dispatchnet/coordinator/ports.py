"""Protocols the coordinator's domain services depend on (implemented elsewhere).

The store is split by aggregate, one port each: QuoteStore, JobRepository,
VerificationRuns, PaymentLedger,
EarningsLedger, PayoutLedger, PairingRepository, ReceiptBatches, FeedbackOutbox and
WorkerRegistry, plus PassLocks (background work once across coordinators) and JobChanges
(other coordinators' job changes); a consumer asks for the ones it uses.
dispatchnet.store.base.Store is their union, and store/ implements it once per engine
(SQLite, PostgreSQL), each passing the same contract suite (tests/test_store.py).

Every store port is async: an implementation never blocks the event loop, and a write's
coroutine returns only once it is committed. A method that changes a job commits the job
row and its event together or not at all, and conditional updates (compare-and-set on
state and attempt) are what keeps concurrent writers (coordinators, or one coordinator's
concurrent requests) safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
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
    PriorMove,
    Quote,
    Receipt,
    ReceiptBatch,
    ReceiptLeaf,
    Result,
    Run,
    Split,
    UnbatchedReceipt,
    WorkerDay,
)


class ReceiptNotary(Protocol):
    """Checks a worker's signed receipt body for a result and countersigns it."""

    @property
    def public_key(self) -> bytes: ...

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
        """The countersigned receipt for a result of the job's `attempt`; raises
        InvalidArgument listing what does not match (worker_agent_id: the session's
        verified agent id, which the body must carry). The body's times must fit the
        attempt: started no earlier than `offered_at` and completed no later than `now`,
        each within the notary's allowed clock skew, and started before completed."""
        ...

    def verified(
        self, receipt: Receipt, mode: str, runs: int, agreeing: list[str], dissenting: list[str]
    ) -> Receipt:
        """The receipt with a verification record appended (README "Verification"):
        the mode, the number of runs compared, the agreeing and dissenting workers."""
        ...


class ReputationSource(Protocol):
    """Scores in [0, 1]; must answer from memory (never a chain call on the hot path)."""

    def score(self, worker_id: str) -> float: ...

    async def warm(self, worker_id: str) -> None:
        """Loads or refreshes a worker's score off the hot path (e.g. when it connects)."""
        ...

    def record(self, worker_id: str, success: bool) -> None:
        """Takes note of a finished attempt in memory (the store counts it durably in the
        transaction of the job's transition)."""
        ...

    async def record_spot_check(self, worker_id: str, agreed: bool) -> None:
        """Takes note of a spot-check verdict on the worker: agreed with the majority of a
        redundant run, or was in its minority (the local source stores it; the erc8004
        source counts it until its next refresh reads the spotCheck feedback on chain)."""
        ...


class JobListener(Protocol):
    """What the job service tells the worker hub."""

    def job_queued(self, job: Job) -> None:
        """`job` became QUEUED here (dispatching may be possible)."""
        ...

    def job_released(
        self, job: Job, worker_id: str, attempt: int, reason: str, tell_worker: bool
    ) -> None:
        """worker_id no longer holds the job's attempt; tell_worker: send it a cancel."""
        ...

    async def reserve(self, job: Job) -> str | None:
        """A worker for the new job `job` (CommitJob, before it is written): a free one the
        dispatcher would choose, and only while no older queued job waits for a worker;
        its slot is held for the job until `reserved`. None: the job is written QUEUED."""
        ...

    def offer_now(self, job_id: str, offering: Job) -> bool:
        """Sends the offer of `offering` (the job reserved for, OFFERED to that worker, as
        it is being written) at once; False when that worker went away (nothing sent)."""
        ...

    async def reserved(self, job_id: str, offered: Job | None, sent: bool) -> None:
        """The end of the hold `reserve` made for job_id: `offered` is the job as written,
        OFFERED to that worker (the job is requeued if the worker went away before or
        after its offer went out); None: it was not written so (the slot is free, and an
        offer that went out (`sent`) is withdrawn)."""
        ...


class CompletionListener(Protocol):
    """Told about every job that completes (e.g. the receipt batcher's wake-up). Called on
    the hot path: it must return at once and never block or call a chain."""

    def job_completed(self, job: Job) -> None: ...


# --- store ports, one per aggregate ----------------------------------------------------


class PassLocks(Protocol):
    """Background work (sweeps, receipt batching and anchoring, feedback, settlement,
    payouts) runs once across the coordinators sharing a store: each pass of a loop runs
    inside pass_lock(loop name) and only when it yields True."""

    def pass_lock(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Held while inside: True when this process holds the store-wide lock `name`
        (no other process runs the same pass meanwhile); False, at once, when another
        does or the lock cannot be taken now (the caller skips this pass and tries at its
        next; a holder that dies frees the lock). A store only one process uses always
        yields True."""
        ...

    async def pass_still_held(self, name: str) -> bool:
        """Inside pass_lock(name) that yielded True: whether this process still holds the
        lock (fencing: a pass checks it before each side effect it cannot take back, so
        a pass whose lock went with its database connection stops, instead of running
        beside the pass another coordinator has started meanwhile). Always True for a
        store only one process uses."""
        ...


class JobChanges(Protocol):
    """Job changes committed by the other coordinators sharing a store."""

    async def listen_jobs(self, on_change: Callable[[str, JobState], None]) -> None:
        """From now on, calls on_change(job_id, state) (on the event loop, soon after the
        commit) for each change of a job, progress included, that another process
        sharing the store commits; `state` is the job's state then. A store only one
        process uses calls it never. Changes made while the store has lost its database
        are not passed on (the callers' polls and sweeps catch up)."""
        ...


@contextlib.asynccontextmanager
async def _always_held(_name: str) -> AsyncIterator[bool]:
    yield True


class OneProcess:
    """PassLocks of a store only one process opens: every pass runs."""

    def pass_lock(self, name: str) -> AbstractAsyncContextManager[bool]:
        return _always_held(name)

    async def pass_still_held(self, name: str) -> bool:
        return True


ONE_PROCESS = OneProcess()


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


@dataclass(frozen=True)
class QuoteLimits:
    """What stored quotes may hold ([quotes] in the profile): an anonymous caller's count
    (owner ""), a client's bytes, and everyone's bytes together."""

    anonymous_quotes: int
    client_bytes: int
    total_bytes: int

    def passed(self, owner: str, size: int, mine: QuoteUsage, everyone: QuoteUsage) -> str | None:
        """The limit a quote of `size` bytes for owner would pass ("anonymous_quotes",
        "client_bytes" or "total_bytes"), given what owner's and everyone's stored quotes
        hold without it; None when it passes none."""
        if not owner and mine.quotes >= self.anonymous_quotes:
            return "anonymous_quotes"
        if owner and mine.bytes + size > self.client_bytes:
            return "client_bytes"
        if everyone.bytes + size > self.total_bytes:
            return "total_bytes"
        return None

    def refuses(self, owner: str, size: int, mine: QuoteUsage, everyone: QuoteUsage) -> bool:
        """Whether a quote of `size` bytes for owner would pass a limit (see passed)."""
        return self.passed(owner, size, mine, everyone) is not None


class QuoteStore(Protocol):
    """Quotes, the storage they hold per owner, and the WebAssembly modules stored with
    them (content-addressed)."""

    async def put_quote(
        self,
        quote: Quote,
        owner: str = "",
        size: int = 0,
        module: bytes | None = None,
        limits: QuoteLimits | None = None,
    ) -> tuple[QuoteUsage, QuoteUsage] | None:
        """Stores quote for owner (a client id, "" for anonymous) and counts `size` bytes
        toward owner's and the total usage until it is released; stores `module` (the
        WebAssembly module of its spec, content-addressed) with it. One transaction, which
        first checks `limits` against the usage it sees: when they refuse the quote,
        nothing is stored and the usage (owner's, everyone's) is returned; None: stored.
        (An engine whose usage is spread over several rows may let the quotes committing
        at the same moment on the other rows through: see its docstring.)"""
        ...

    async def get_quote(self, quote_id: str) -> Quote | None: ...

    async def quote_usage(self, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
        """What owner's unreleased quotes hold, and what everyone's do."""
        ...

    async def release_expired_quotes(self, now: float) -> int:
        """Quotes that expired before `now` give their usage back and drop their spec (the
        row stays, so CommitJob still says "expired", until purge_expired); then modules
        that no stored quote and no open job references are deleted. How many quotes
        (each is released once, also when several sweeps run at the same time)."""
        ...

    async def purge_expired(self, before: float) -> int:
        """Deletes released quotes and pairing codes that expired before `before`; how many."""
        ...

    async def get_module(self, sha256: bytes) -> bytes | None: ...


class JobRepository(Protocol):
    """Jobs and their sequence-numbered events."""

    async def create_job(
        self,
        job: Job,
        event: Event,
        payment: Payment | None = None,
        offered: Event | None = None,
        max_open: int = 0,
    ) -> tuple[Job, bool]:
        """Inserts job with its first event (and its payment, in the same transaction); if
        (client_id, idempotency_key) exists already, returns that job and False instead and
        stores no payment (nor `offered`). Raises PaymentReused when the payment's (network,
        asset, payer, authorization_id) belongs to another job already. offered: the job
        is written already offered to its worker (job says so: state OFFERED, worker_id,
        attempts, lease, coordinator_id), and this is its second event (sequence 2), stored
        in the same transaction after `event` (sequence 1). max_open > 0: raises
        TooManyOpenJobs, storing nothing, when the client has that many open jobs (QUEUED,
        OFFERED, RUNNING) already (exact on SQLite's one writer; on a shared database up
        to the jobs of that client being created at the same moment)."""
        ...

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
        prior: PriorMove | None = None,
        expect: dict[str, Any] | None = None,
    ) -> Job | None:
        """Applies changes (Job field names; KeyError for another name) if the job is in
        one of from_states (and at attempt, when given, and with the fields of `expect`
        equal to its values, as the job is stored before this write), appending event, adding
        `feedback` to the feedback outbox (at most one entry per job) and counting
        `outcome` (worker_id, success) in the worker's completed/failed totals and in its
        tally of the event's UTC day (worker_days), all in the
        same transaction; the job as it is then, or None when the condition did not hold.
        prior: a transition applied first in the same transaction, with its own
        compare-and-set and event (the event before `event`); when either condition
        does not hold, nothing is written (None)."""
        ...

    async def append_progress(self, events: Sequence[Event]) -> bool:
        """Stores progress events of one job, one attempt, with consecutive sequence
        numbers (given by the caller; ValueError otherwise), as one row, and makes the
        last one the job's last_sequence. False (nothing written) when the job is final or
        unknown, or its last_sequence is not the one before the first event's."""
        ...

    async def offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        """When the job's history shows worker_id was offered the given attempt; None if
        it never was, or if the worker gave that attempt up (models.GIVEN_UP)."""
        ...

    async def held_attempts(self, worker_id: str, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        """The (job_id, attempt) pairs among job_ids that worker_id was offered and has
        not given up (models.GIVEN_UP), in one read whatever the number of ids (the
        caller bounds them)."""
        ...

    async def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[Event]:
        """At most `limit` events after `sequence`, in order; progress events stored
        together (append_progress) come back one by one, as they were given."""
        ...

    async def queued_jobs(
        self, limit: int, after: tuple[float, str] | None = None, runnable: Runnable | None = None
    ) -> list[Job]:
        """QUEUED jobs oldest first, after the (queued_at, job_id) cursor, and only those
        `runnable` admits (None admits all), in one read whatever the number of task
        names. A plain read: taking one is the offer's compare-and-set (transition)."""
        ...

    async def lapsed_leases(self, now: float) -> list[Job]:
        """OFFERED and RUNNING jobs whose lease expired before `now`."""
        ...

    async def stale_queued(self, queued_before: float) -> list[Job]:
        """QUEUED jobs queued before `queued_before`."""
        ...

    async def active_jobs(self, worker_id: str | None = None) -> list[Job]:
        """OFFERED and RUNNING jobs (of worker_id, when given)."""
        ...


class VerificationRuns(Protocol):
    """The runs of verified jobs (README "Verification"): each completed run of a job
    that runs on several independent workers, kept with its receipt until the runs are
    compared. A job's runs move with the job: each write below is one compare-and-set of
    the job (as JobRepository.transition) committed with its run rows."""

    async def record_run(
        self,
        run: Run,
        from_states: Sequence[JobState],
        changes: dict[str, Any],
        event: Event,
    ) -> Job | None:
        """Stores run (one per (job_id, attempt)) and applies changes to its job, if the
        job is in one of from_states at run.attempt, with event, in one transaction; the
        job as it is then, or None (nothing stored) when the condition did not hold."""
        ...

    async def job_runs(self, job_id: str) -> list[Run]:
        """The job's recorded runs, in attempt order."""
        ...

    async def conclude_runs(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event,
        verdicts: dict[int, str],
        feedback: Sequence[FeedbackEntry] = (),
        outcomes: Sequence[tuple[str, bool]] = (),
        run: Run | None = None,
    ) -> Job | None:
        """The comparison's outcome, in one transaction with the job's compare-and-set
        (as transition): each run's verdict (attempt -> AGREED / DISAGREED), the feedback
        outbox entries (each once: an entry's key already there is kept) and the workers'
        outcomes counted in their completed/failed totals; `run`, the run that
        completed the set, is stored with them (as record_run). Once a job has runs AGREED,
        update_payment credits those runs' workers (Split.among) instead of job.worker_id.
        None when the condition did not hold (nothing written)."""
        ...


class PaymentLedger(Protocol):
    """x402 payments, one per paid job (stored with the job by create_job)."""

    async def get_payment(self, job_id: str) -> Payment | None: ...

    async def payment_standing(
        self, network: str, asset: str, payer: str, authorization_id: str
    ) -> tuple[bool, int]:
        """Whether a job was committed with this payment already, and the sum of the
        payer's stored payments of this network and asset not moved on chain yet
        (AUTHORIZED: its balance must still cover them); asset, payer and authorization_id
        compared without case."""
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

    async def audit_flows(
        self, network: str
    ) -> tuple[list[tuple[str, str, str, int]], dict[str, int]]:
        """What the store says moved through the coordinator's account on `network`:
        (what, asset, transaction, amount into the account) per settlement, refund and
        landed payout; and the fees kept per asset (credits not reversed). For
        `dispatch payouts audit`."""
        ...


class EarningsLedger(Protocol):
    """The workers' credits (written by the store with each settlement)."""

    async def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        """A worker's credits newest first, those before the (credited_at, job_id) cursor."""
        ...

    async def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        """Each worker's earnings per (network, asset), in one read."""
        ...

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        """A worker's payouts, newest first."""
        ...


class PayoutLedger(Protocol):
    """The payouts table and the balances it debits (written by coordinator/payouts.py)."""

    async def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]:
        """Workers with an agent id whose unpaid balance on `network` is >= min_amount, or
        part of it credited at or before unpaid_before; longest waiting first, those past
        the `after` cursor (PayoutDue.cursor of the previous page)."""
        ...

    async def create_payout(self, payout: PayoutRecord) -> bool:
        """Records the payout and debits its amount from the worker's balance in one
        transaction; False (nothing written) when the balance is below the amount."""
        ...

    async def update_payout(
        self, payout_id: str, from_states: Sequence[PayoutRowState], changes: dict[str, Any]
    ) -> PayoutRecord | None:
        """Compare-and-set on the payout's state (changes: state, raw, transaction, error,
        updated_at); None when its state was not one of from_states. Moving to FAILED
        returns its amount to the worker's balance in the same transaction."""
        ...

    async def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]:
        """Payouts on `network` not known to have landed or failed, oldest first."""
        ...

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        """A worker's payouts, newest first."""
        ...


class PairingRepository(Protocol):
    """Pairing codes (stored hashed, single use) and the client-worker pairings they make."""

    async def put_pairing_code(
        self, code_hash: bytes, client_id: str, expires_at: float, now: float = 0.0, most: int = 0
    ) -> None:
        """Stores a new code (the hash of a fresh random code: it is not there yet);
        TooManyPairingCodes, storing nothing, when the client holds `most` (> 0) codes
        unused and unexpired at `now` (exact on SQLite's one writer; on a shared database
        up to the codes of that client made at the same moment)."""
        ...

    async def pairing_code_owner(self, code_hash: bytes, now: float) -> str | None:
        """The client of an unexpired, unused code (does not use it)."""
        ...

    async def claim_pairing_code(self, code_hash: bytes, now: float) -> str | None:
        """Marks an unexpired, unused code used and returns its client_id (atomic: of
        concurrent claims of one code, one gets it)."""
        ...

    async def put_pairing(self, pairing: Pairing, most: int = 0) -> Pairing:
        """Stores a pairing; an existing active pairing of the same pair is returned
        instead (a pair has at most one active pairing, also under concurrent calls).
        most (> 0): the pairings kept per client and per worker, revoked ones included;
        a party that has that many forgets its oldest revoked ones to make room, and
        TooManyPairings (nothing written) when they are all active."""
        ...

    async def get_pairing(self, pairing_id: str) -> Pairing | None: ...

    async def list_pairings(self, party_id: str, include_revoked: bool) -> list[Pairing]:
        """Pairings where party_id is the client or the worker, oldest first."""
        ...

    async def revoke_pairing(self, pairing_id: str, now: float) -> Pairing | None:
        """Revokes an active pairing at `now`; the pairing as it is then (a revoked one
        keeps its first revocation time), None when it is unknown."""
        ...

    async def paired_workers(self, client_id: str) -> set[str]:
        """The workers with an active pairing to client_id."""
        ...


class ReceiptBatches(Protocol):
    """Batches of receipt hashes (Merkle trees), each receipt's leaf, and their anchors."""

    async def unbatched_receipts(self, limit: int) -> list[UnbatchedReceipt]:
        """Receipts of COMPLETED jobs that belong to no batch yet, oldest completion first
        (ties by job_id), at most `limit`."""
        ...

    async def create_receipt_batch(
        self, batch: ReceiptBatch, leaves: Sequence[UnbatchedReceipt]
    ) -> bool:
        """Stores batch and makes leaves[i] its leaf i, all in one transaction. Refuses
        (returns False, writes nothing) when any leaf is already in a batch (or being put
        in one by a concurrent call), is not a completed job, or has another receipt hash:
        two batchers never share a receipt. ValueError unless len(leaves) ==
        batch.leaf_count >= 1."""
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


class FeedbackOutbox(Protocol):
    """ERC-8004 feedback owed for finished jobs (entries are added by
    JobRepository.transition, with the job's final move)."""

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


class WorkerRegistry(Protocol):
    """What the coordinator remembers of workers (their outcomes are counted by
    JobRepository.transition) and of the task names they declared."""

    async def record_worker_seen(
        self, worker_id: str, kind: int, now: float, agent_id: str = ""
    ) -> None:
        """Notes a connection; a non-empty (verified) agent id replaces the stored one."""
        ...

    async def worker_stats(self, worker_id: str) -> tuple[int, int]:
        """(completed, failed) counts of a worker."""
        ...

    async def record_spot_check(self, worker_id: str, agreed: bool, now: float) -> None:
        """Counts a spot-check verdict on the worker (agreed with the majority, or in the
        minority) in the tally of now's UTC day."""
        ...

    async def worker_days(self, worker_id: str, since_day: int) -> list[WorkerDay]:
        """The worker's daily tallies from UTC day `since_day` on, oldest first (job
        outcomes counted by transition() on the day of its event, spot checks by
        record_spot_check())."""
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
