"""JobService: the durable job state machine.

QUEUED -> OFFERED (lease) -> RUNNING -> COMPLETED | FAILED, CANCELLED from any open state.
A lapsed lease, a rejected offer, a retryable failure or a lost worker returns the job to
QUEUED; once attempts reach max_attempts it FAILS instead. Every transition is a
compare-and-set in the store that commits the job and its event together, before anyone
is told about it.

A coordinator restart is nobody's fault: at start-up (recover) the jobs workers held stay
theirs for jobs.restart_grace_seconds, so a worker that reconnects resumes them; a job
whose worker does not come back is requeued without costing an attempt (its max_attempts
grows by one).

Progress (LLM tokens) is not a state change: each chunk gets its sequence number at once
and reaches watchers from memory (LiveEvents), and the store gets the chunks coalesced,
one row per PROGRESS_FLUSH_CHUNKS chunks or PROGRESS_FLUSH_CHARS characters at most,
written at the latest jobs.progress_flush_seconds after the first unwritten chunk and
always before the job's next state change, so stored sequence numbers stay in order.
A coordinator crash loses the unwritten chunks (never a state change or a result).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import NoReturn

from dispatchnet import protocol
from dispatchnet.coordinator import verification as verify
from dispatchnet.coordinator.background import BackgroundTasks
from dispatchnet.coordinator.catalogue import TaskCatalogue
from dispatchnet.coordinator.events import JobNotifier, LiveEvents
from dispatchnet.coordinator.models import (
    ACTIVE_STATES,
    AGREED,
    BAD_RECEIPT,
    FAILED,
    OFFER_LAPSED,
    OPEN_STATES,
    REJECTED,
    RUN_RECORDED,
    TIME_LAPSED,
    VERIFY_SPOT_CHECK,
    Event,
    EventKind,
    Failure,
    FeedbackEntry,
    Job,
    JobSpec,
    JobState,
    JobType,
    Payment,
    PriorMove,
    Privacy,
    Quote,
    Result,
    Run,
    evolve,
)
from dispatchnet.coordinator.observer import NULL_OBSERVER, Observer
from dispatchnet.coordinator.ports import (
    CompletionListener,
    JobListener,
    QuoteLimits,
    QuoteUsage,
    ReceiptNotary,
    ReputationSource,
)
from dispatchnet.coordinator.pricing import price_micros
from dispatchnet.errors import (
    DispatchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    quoted,
)
from dispatchnet.profiles import JobsConfig, PricingConfig, QuotesConfig, VerificationConfig
from dispatchnet.store.base import Store

MAX_IDEMPOTENCY_KEY = protocol.MAX_IDEMPOTENCY_KEY_CHARS
WATCH_POLL_SECONDS = 5.0
CHANGED_THERE_KEPT = 4096  # job ids changed at another coordinator, kept (see _remember)
# A job's unwritten progress goes to the store when it reaches either bound (or when
# jobs.progress_flush_seconds have passed, or the job changes state): this bounds both
# the memory a running job holds and the rows it writes.
PROGRESS_FLUSH_CHUNKS = 128
PROGRESS_FLUSH_CHARS = 16 * 1024
# An accepted offer is kept in memory (see JobService.accept) only when this much of its
# lease is left, and for ACCEPT_WRITE_WITHIN_SECONDS at most (a small job's result comes
# well within it; a longer job shows RUNNING to its client soon after the accept).
ACCEPT_DEFER_MIN_SECONDS = 1.0
ACCEPT_WRITE_WITHIN_SECONDS = 0.1
# Event sequence numbers are signed 64-bit in the store; no job gets near this.
MAX_SEQUENCE = 2**63 - 1
# Expired quotes stay this long (so a late CommitJob hears "expired", not "not found"),
# without their spec: they stop counting toward [quotes] limits within PURGE_INTERVAL.
EXPIRED_RETENTION_SECONDS = 3600.0
PURGE_INTERVAL_SECONDS = 60.0
QUOTE_ROW_BYTES = 256  # what a stored quote counts besides its spec
# Quotes made here that CommitJob finds without a store read (small specs only)
QUOTE_CACHE = 4096
QUOTE_CACHE_BYTES = 16 * 1024 * 1024
# Feedback for a worker with an agent id (see README "Reputation and feedback"):
FEEDBACK_TAG1 = "successRate"
FEEDBACK_POSITIVE = 100  # a completed job (valueDecimals 0: 100 of 100)
FEEDBACK_NEGATIVE = 0  # a job that failed on the worker (final failure)
# The reason of the events of a job held, then requeued, across a coordinator restart.
RESTARTED = "coordinator_restarted"
# Final failures that are not the worker's fault: no feedback.
NOT_WORKER_FAULT = frozenset({"bad_input", "context_length_exceeded", RESTARTED})

log = logging.getLogger("dispatch.jobs")
ID_RANDOM_BUFFER = 4096  # bytes of randomness read at once for new ids (see _Randomness)


class _Randomness:
    """Bytes from the OS's CSPRNG, read ID_RANDOM_BUFFER at a time: one system call per
    few hundred ids instead of one each (each call also gave up the interpreter lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._buffer):
                self._buffer, self._at = secrets.token_bytes(max(n, ID_RANDOM_BUFFER)), 0
            self._at += n
            return self._buffer[self._at - n : self._at]

    def forget(self) -> None:
        """Drops what is buffered (a forked child must not repeat its parent's ids)."""
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0


_random = _Randomness()
os.register_at_fork(after_in_child=_random.forget)


def new_id(prefix: str) -> str:
    """prefix_ and 32 hex digits: the time in milliseconds (12), then 80 random bits (20).
    Ids made later sort later, so the rows a database indexes by id are appended at the
    end of its index instead of at random places in it: a write touches the same few
    pages as the writes before it (measured on the SQLite store: a group's COMMIT took
    ~40% less time than with ids of 96 random bits). The random part keeps ids
    unguessable and unique among coordinators."""
    ms = time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF
    return f"{prefix}_{ms:012x}{_random.take(10).hex()}"


class JobService:
    def __init__(
        self,
        store: Store,
        jobs: JobsConfig,
        pricing: PricingConfig,
        notary: ReceiptNotary,
        reputation: ReputationSource,
        notifier: JobNotifier | None = None,
        clock: Callable[[], float] = time.time,
        catalogue: TaskCatalogue | None = None,
        quotes: QuotesConfig | None = None,
        coordinator_id: str = "",
        verification: VerificationConfig | None = None,
    ) -> None:
        self.store = store
        # redundant runs and spot checks (coordinator/verification.py)
        self.verification = verification or VerificationConfig()
        self.rng = random.Random()
        # this coordinator's instance id, stable across its restarts: recorded on the jobs
        # its workers take, so that several coordinators on one store each recover and
        # requeue only their own (another's jobs come back when their leases lapse)
        self.coordinator_id = coordinator_id
        self.quotes = quotes or QuotesConfig()
        # the task names quotes may ask for (None: any)
        self.catalogue = catalogue
        self.cfg = jobs
        self.pricing = pricing
        self.notary = notary
        self.reputation = reputation
        self.notifier = notifier or JobNotifier()
        self.live = LiveEvents()
        self.clock = clock
        self.listener: JobListener | None = None
        self.observer: Observer = NULL_OBSERVER  # metrics, traces, dashboard (observability/)
        self.completion_listeners: list[CompletionListener] = []
        # called with the job after every final transition (completed, failed, cancelled)
        self.final_listeners: list[Callable[[Job], None]] = []
        self._next_purge = 0.0
        # progress flushes the timers started, reactions to other coordinators' changes
        self._tasks = BackgroundTasks()
        self._flushing: dict[str, asyncio.Future[None]] = {}  # job_id -> its write under way
        # Accepts not written yet (see accept): job_id -> the job OFFERED as stored, and
        # the accept to write first in its next transaction
        self._accepts: dict[str, tuple[Job, PriorMove]] = {}
        self._accepting: dict[str, asyncio.Future[None]] = {}  # a write carrying one
        self._accepts_due = math.inf  # when the timer writes every pending accept
        self._accept_timer: asyncio.TimerHandle | None = None
        # The jobs this process's workers hold (OFFERED or RUNNING), as this process last
        # moved them, with when each attempt was offered: what a worker's messages about
        # them are checked against without a store read. The store stays the authority:
        # every move is a compare-and-set, and a job not found here is read from the store.
        self._active: dict[str, tuple[Job, float | None]] = {}
        # jobs CommitJob is writing, offered already: their workers' messages wait for it
        self._writing: dict[str, asyncio.Future[None]] = {}
        # job_id -> the moves of it under way (from their progress flush to their write):
        # progress waits for them, so that no chunk is numbered between the two
        self._moving: dict[str, list[asyncio.Future[None]]] = {}
        self._watches: dict[str, int] = {}  # client_id -> its WatchJob / RunJob waits
        # the quotes this process made lately (immutable until they expire)
        self._quotes: OrderedDict[str, Quote] = OrderedDict()
        self._quote_bytes = 0  # their specs' bytes
        # Jobs held for their worker since start-up (recover): worker_id -> job_id -> attempt.
        # Rebuilt from the store at every start, so it survives repeated restarts.
        self._restart_holds: dict[str, dict[str, int]] = {}
        # how many changes other coordinators committed to each job watched here
        # (job_changed_elsewhere): a watcher re-reads the job when the count moved
        self._elsewhere: dict[str, int] = {}
        # jobs lately changed by another coordinator while nobody here watched them (the
        # newest CHANGED_THERE_KEPT): a commit here that ends after such a change must not
        # hold the job in memory as it wrote it (see _remember)
        self._changed_there: OrderedDict[str, None] = OrderedDict()
        # Feedback outbox: off while feedback_uri_base is None. agent_of(worker_id) is the
        # agent id (decimal) of a connected worker, "" for none (set by the server).
        self.feedback_uri_base: str | None = None
        self.agent_of: Callable[[str], str] = lambda _worker_id: ""

    # --- client side --------------------------------------------------------------------

    async def stored_module(self, sha256: bytes) -> bytes | None:
        """A WebAssembly module sent with an earlier quote, by its SHA-256."""
        return await self.store.get_module(sha256)

    async def quote(
        self, spec: JobSpec, wasm_module: bytes | None = None, client_id: str = ""
    ) -> Quote:
        """Prices spec and stores the quote under client_id ("" for an anonymous caller).
        FailedPrecondition for a TASK no worker has ever offered (see TaskCatalogue);
        Unauthenticated for an anonymous spec over [quotes] anonymous_max_spec_bytes;
        ResourceExhausted beyond the other [quotes] limits on stored quotes."""
        await self._check_task(spec)
        size = self._quote_size(spec, client_id)
        q = self._priced(spec, new_id("q"))
        cfg = self.quotes
        limits = QuoteLimits(cfg.anonymous_max_quotes, cfg.client_max_bytes, cfg.max_bytes)
        refused = await self.store.put_quote(q, client_id, size, wasm_module, limits)
        if refused is not None:
            self._refuse_quote(limits, client_id, size, *refused)
        if len(spec.spec_bytes) <= QUOTE_CACHE_BYTES // QUOTE_CACHE:
            self._quotes[q.quote_id] = q
            self._quote_bytes += len(spec.spec_bytes)
            while len(self._quotes) > QUOTE_CACHE or self._quote_bytes > QUOTE_CACHE_BYTES:
                _, old = self._quotes.popitem(last=False)
                self._quote_bytes -= len(old.spec.spec_bytes)
        return q

    async def _check_task(self, spec: JobSpec) -> None:
        """FailedPrecondition for a TASK no worker has ever offered (see TaskCatalogue)."""
        if spec.job_type is JobType.TASK and self.catalogue is not None:
            await self.catalogue.check(spec.task_name)

    def _priced(self, spec: JobSpec, quote_id: str) -> Quote:
        """A quote for spec at the profile's prices, valid from now for quote_ttl_seconds."""
        now = self.clock()
        return Quote(
            quote_id=quote_id,
            spec=spec,
            price_micros=price_micros(self.pricing, spec.job_type, spec.policy) * spec.runs,
            currency=self.pricing.currency,
            created_at=now,
            expires_at=now + self.cfg.quote_ttl_seconds,
        )

    def _quote_size(self, spec: JobSpec, client_id: str) -> int:
        """The bytes a quote for spec counts; Unauthenticated for an anonymous spec over
        [quotes] anonymous_max_spec_bytes (checked before any store call)."""
        cfg = self.quotes
        spec_bytes = len(spec.spec_bytes)
        if not client_id and spec_bytes > cfg.anonymous_max_spec_bytes:
            raise Unauthenticated(
                f"this spec is {spec_bytes} bytes; GetQuote without authorization takes "
                f"{cfg.anonymous_max_spec_bytes} at most: send 'authorization: Dispatch "
                "<token>' metadata (`dispatch auth header` prints one; the CLI and the "
                "Python client send it)"
            )
        return spec_bytes + QUOTE_ROW_BYTES

    def _refuse_quote(
        self, limits: QuoteLimits, client_id: str, size: int, mine: QuoteUsage, everyone: QuoteUsage
    ) -> NoReturn:
        """Raises ResourceExhausted for the limit that the store's put_quote found a
        quote of `size` would pass, given the usage it saw."""
        held = self.cfg.quote_ttl_seconds + PURGE_INTERVAL_SECONDS
        retry = f"a quote's storage is released within {held:g}s of its making"
        passed = limits.passed(client_id, size, mine, everyone)
        if passed == "anonymous_quotes":
            raise ResourceExhausted(
                f"anonymous callers hold {mine.quotes} unexpired quotes, the most this "
                f"coordinator stores; send 'authorization' metadata with GetQuote (`dispatch "
                f"auth header`), or retry later ({retry})"
            )
        if passed == "client_bytes":
            raise ResourceExhausted(
                f"your unexpired quotes hold {mine.bytes} bytes and this one needs {size}; "
                f"the limit per client is {limits.client_bytes}; retry later ({retry})"
            )
        raise ResourceExhausted(
            f"this coordinator's quote storage is full ({limits.total_bytes} bytes); "
            f"retry later ({retry})"
        )

    async def get_quote(self, quote_id: str) -> Quote:
        if not quote_id:
            raise InvalidArgument("quote_id is required (get one from GetQuote)")
        quote = self._quotes.get(quote_id)
        if quote is not None and quote.expires_at >= self.clock():
            return quote
        quote = await self.store.get_quote(quote_id)
        if quote is None:
            raise NotFound(f"quote {quoted(quote_id)} does not exist")
        return quote

    async def check_commit(
        self, client_id: str, quote_id: str, idempotency_key: str, look_up: bool = True
    ) -> tuple[Quote, Job | None]:
        """Whether CommitJob(quote_id, idempotency_key) can go ahead: the quote, and the
        client's job already committed with this key (None: a new job would be made).
        Raises what commit would: a bad key, an unknown or expired quote, a key used for
        another quote, a PRIVATE job without a pairing. The payment edge asks this before
        it verifies a payment. look_up=False: the key is looked up only when the quote
        could not make a new job (commit's create_job finds an existing one anyway)."""
        if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        quote = await self.get_quote(quote_id)
        if look_up:
            existing = await self.store.get_job_by_key(client_id, idempotency_key)
            if existing is not None:
                return quote, _same_quote(existing, quote_id)
        problem = None
        expired = quote.expires_at < self.clock()
        # one read of the pairings serves both PRIVATE checks (none for a PUBLIC job)
        private = quote.spec.privacy is Privacy.PRIVATE or quote.spec.sealed
        paired = await self.store.paired_workers(client_id) if private and not expired else set()
        if expired:
            problem = FailedPrecondition(f"quote {quoted(quote_id)} expired; ask for a new quote")
        elif private:
            problem = _unpaired(quote.spec, paired)
        if problem is None:
            return quote, None
        if not look_up:  # a job committed with the key is returned whatever its quote's state
            existing = await self.store.get_job_by_key(client_id, idempotency_key)
            if existing is not None:
                return quote, _same_quote(existing, quote_id)
        raise problem

    async def commit(
        self,
        client_id: str,
        quote_id: str,
        idempotency_key: str,
        payment: Payment | None = None,
    ) -> tuple[Job, bool]:
        """Turns the quote into a queued job. payment: the verified payment for it (job_id
        is filled in here); stored with the job in one transaction, and not stored when the
        idempotency key returns an existing job."""
        quote, existing = await self.check_commit(
            client_id, quote_id, idempotency_key, look_up=False
        )
        if existing is not None:
            return existing, False
        return await self._create(client_id, quote, idempotency_key, payment)

    async def run(
        self, client_id: str, spec: JobSpec, wasm_module: bytes | None, idempotency_key: str
    ) -> tuple[Job, bool]:
        """quote() and commit() in one step, without storing the quote when the spec brings
        no WebAssembly module to store (RunJob with a spec; unpaid). A key used before
        returns its job if that was for the same spec (FailedPrecondition if not)."""
        if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        if wasm_module is not None:  # the module is stored with a quote, as GetQuote does
            existing = await self.store.get_job_by_key(client_id, idempotency_key)
            if existing is None:
                q = await self.quote(spec, wasm_module, client_id)
                try:
                    return await self.commit(client_id, q.quote_id, idempotency_key)
                except FailedPrecondition:  # the same call, committed meanwhile?
                    existing = await self.store.get_job_by_key(client_id, idempotency_key)
                    if existing is None:
                        raise
            return _same_spec(existing, spec), False
        try:
            await self._check_task(spec)
            if spec.privacy is Privacy.PRIVATE or spec.sealed:
                _check_paired(spec, await self.store.paired_workers(client_id))
        except FailedPrecondition:  # a job run with the key is returned whatever changed since
            existing = await self.store.get_job_by_key(client_id, idempotency_key)
            if existing is None:
                raise
            return _same_spec(existing, spec), False
        quote = self._priced(spec, "")  # none stored
        job, created = await self._create(client_id, quote, idempotency_key, None)
        return (job if created else _same_spec(job, spec)), created

    async def _create(
        self, client_id: str, quote: Quote, idempotency_key: str, payment: Payment | None
    ) -> tuple[Job, bool]:
        """A new job for quote, committed (and offered when a free worker can take it)."""
        quote_id = quote.quote_id
        now = self.clock()
        mode, runs = verify.plan(quote.spec, self.verification.spot_check_rate, self.rng)
        job = Job(
            job_id=new_id("job"),
            client_id=client_id,
            state=JobState.QUEUED,
            spec=quote.spec,
            price_micros=quote.price_micros,
            currency=quote.currency,
            quote_id=quote_id,
            idempotency_key=idempotency_key,
            attempts=0,
            max_attempts=self.cfg.max_attempts,
            created_at=now,
            updated_at=now,
            queued_at=now,
            verify_mode=mode,
            verify_runs=runs,
        )
        event = Event(job.job_id, EventKind.STATE, JobState.QUEUED, now, reason="committed")
        if payment is not None:
            payment = dataclasses.replace(payment, job_id=job.job_id)
        most = self.cfg.client_max_open_jobs  # TooManyOpenJobs beyond (nothing stored)
        # a free worker that can take it now gets it in the same write (see reserve)
        worker_id = await self.listener.reserve(job) if self.listener else None
        if worker_id is None:
            stored, created = await self.store.create_job(job, event, payment, max_open=most)
            if created:
                self._remember(stored, [event])
                self._changed(stored)
                self.observer.job_committed(stored)
                if self.listener:
                    self.listener.job_queued(stored)
            else:
                _same_quote(stored, quote_id)
            return stored, created
        assert self.listener is not None
        offered: Job | None = None
        offer_event = self._offer_event(job, worker_id, now)
        offering = self._offered(job, worker_id, now)
        if payment is not None:  # as the store writes it (the offer carries it to the receipt)
            offering = dataclasses.replace(offering, payment=payment.ref())
        # The offer goes out while the job is written, not after: what the worker answers
        # waits for the write (see _written), and the caller's answer waits for it too, so
        # nothing is acknowledged before it is stored. A job whose write fails (or that
        # its key finds already made) is withdrawn from the worker: its result is refused.
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writing[job.job_id] = written
        queued = job if payment is None else dataclasses.replace(job, payment=offering.payment)
        self.observer.job_offering(queued, offering)  # the offer carries its trace
        sent = self.listener.offer_now(job.job_id, offering)
        try:
            stored, created = await self.store.create_job(
                offering, event, payment, offer_event, most
            )
            if not created:
                return _same_quote(stored, quote_id), False
            offered = stored
            self._remember(stored, [event, offer_event])
            self._active[job.job_id] = (stored, now)
            self._changed(stored)
            self.observer.job_committed(queued)
            self.observer.job_moved(queued, stored, "offered")
            return stored, True
        finally:
            if offered is None:
                self.observer.job_not_made(offering)
            del self._writing[job.job_id]
            written.set_result(None)
            await self.listener.reserved(job.job_id, offered, sent)

    async def _written(self, job_id: str) -> None:
        """Returns once the job is written if CommitJob is writing it now (its offer went
        out before the write ended, so its worker can answer first)."""
        writing = self._writing.get(job_id)
        if writing is not None:
            await asyncio.shield(writing)

    def _offered(self, job: Job, worker_id: str, now: float) -> Job:
        """job (QUEUED, never offered) as offer() would make it: offered to worker_id."""
        return evolve(
            job,
            state=JobState.OFFERED,
            worker_id=worker_id,
            attempts=job.attempts + 1,
            lease_expires_at=now + self.cfg.offer_lease_seconds,
            coordinator_id=self.coordinator_id,
        )

    @staticmethod
    def _offer_event(job: Job, worker_id: str, now: float) -> Event:
        """The event of offering job (QUEUED) to worker_id, as offer() writes it."""
        return Event(
            job.job_id,
            EventKind.STATE,
            JobState.OFFERED,
            now,
            from_state=job.state,
            reason="offered",
            worker_id=worker_id,
            attempt=job.attempts + 1,
        )

    async def get(self, client_id: str, job_id: str) -> Job:
        if not job_id:
            raise InvalidArgument("job_id is required")
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {quoted(job_id)} does not exist")
        if job.client_id != client_id:
            raise PermissionDenied(f"job {quoted(job_id)} belongs to another client")
        if self.live.last(job_id) > job.last_sequence:  # progress not written yet
            job = dataclasses.replace(job, last_sequence=self.live.last(job_id))
        return job

    async def cancel(self, client_id: str, job_id: str, reason: str) -> Job:
        job = await self.get(client_id, job_id)
        if job.state is JobState.CANCELLED:
            return job
        if job.state.final:
            raise FailedPrecondition(f"job {quoted(job_id)} is already {job.state.name}")
        failure = Failure("cancelled", reason or "cancelled by its owner")
        updated = await self._move(
            job,
            OPEN_STATES,
            None,
            JobState.CANCELLED,
            "cancelled",
            failure=failure,
            lease_expires_at=0.0,
        )
        if updated is None:  # it moved on meanwhile; report what it is now
            return await self.cancel(client_id, job_id, reason)
        if job.state in ACTIVE_STATES and self.listener:
            self.listener.job_released(updated, job.worker_id, job.attempts, "cancelled", True)
        return updated

    async def watch(
        self, client_id: str, job_id: str, after: int
    ) -> AsyncGenerator[tuple[Event, Job | None], None]:
        """Events after sequence `after`, live, until the final state's event (which comes
        with the job as it ended, when this process knows it; else None): from memory
        while this process holds them (see LiveEvents: every event of a watched job that
        changes here), else from the store. Any `after` past MAX_SEQUENCE means the same as
        MAX_SEQUENCE: past every event."""
        self.watch_room(client_id)
        self._watches[client_id] = self._watches.get(client_id, 0) + 1
        wake = self.notifier.subscribe(job_id)  # before the read: no change is missed
        try:
            seen = self._elsewhere.get(job_id, 0)  # before the read, likewise
            # a job committed or moved here lately is in memory with all its events
            job = self._known(client_id, job_id) or await self.get(client_id, job_id)
            seq = min(max(after, 0), MAX_SEQUENCE)
            woken = False  # by a change here since the store was last read
            while True:
                wake.clear()
                if self._elsewhere.get(job_id, 0) != seen:  # changed by another coordinator
                    seen = self._elsewhere.get(job_id, 0)
                    job = await self.get(client_id, job_id)
                live = self.live.after(job_id, seq)
                events = live or []
                # not (or no longer) in memory: the store has them (after a change here
                # that memory cannot tell, whatever the job last read here says: it may be
                # older than them)
                if not events and (seq < job.last_sequence or (live is None and woken)):
                    woken = False
                    events = await self.store.events_after(job_id, seq)
                    if not events:  # the store ends at seq: the rest, if any, is in memory
                        events = self.live.after(job_id, seq) or []
                for e in events:
                    seq = e.sequence
                    if e.final:
                        # the job as it ended here; a copy from before it ended elsewhere
                        # (another coordinator, since) is stale: None, read from the store
                        ended = self.live.job(job_id)
                        yield e, ended if ended is not None and ended.state.final else None
                        return
                    yield e, None
                if events:
                    continue
                if job.state.final and seq >= job.last_sequence:
                    return
                woken = await _wait(wake, WATCH_POLL_SECONDS)
                if not woken:
                    # nothing happened here: the job may have moved on elsewhere
                    job = await self.get(client_id, job_id)
        finally:
            self.notifier.unsubscribe(job_id, wake)
            if not self.notifier.watched(job_id):
                self.live.release(job_id)
                self._elsewhere.pop(job_id, None)
            left = self._watches[client_id] - 1
            if left:
                self._watches[client_id] = left
            else:
                del self._watches[client_id]

    def watch_room(self, client_id: str) -> None:
        """ResourceExhausted when the client already waits on [jobs] client_max_watches
        WatchJob and RunJob calls (each holds a stream and memory here)."""
        most = self.cfg.client_max_watches
        if most and self._watches.get(client_id, 0) >= most:
            raise ResourceExhausted(
                f"you have {most} WatchJob and RunJob calls open, the most one client may "
                "have at once ([jobs] client_max_watches); end one first"
            )

    async def wait_final(self, client_id: str, job: Job) -> Job:
        """job (just committed, or found by its key) as it is once final."""
        if job.state.final:
            return job
        # closed here, not left to the loop's finalizer of unfinished generators (a task
        # and a wake-up of the loop per job)
        async with contextlib.aclosing(
            self.watch(client_id, job.job_id, job.last_sequence)
        ) as events:
            async for event, ended in events:
                if event.final:
                    return ended if ended is not None else await self.get(client_id, job.job_id)
        return await self.get(client_id, job.job_id)  # the watch ended: final before it began

    # --- worker side --------------------------------------------------------------------

    async def offer(self, job: Job, worker_id: str) -> Job | None:
        """QUEUED -> OFFERED to worker_id under a lease; None if someone else got there."""
        now = self.clock()
        return await self._move(
            job,
            (JobState.QUEUED,),
            job.attempts,
            JobState.OFFERED,
            "offered",
            worker_id=worker_id,
            attempts=job.attempts + 1,
            lease_expires_at=now + self.cfg.offer_lease_seconds,
            coordinator_id=self.coordinator_id,
        )

    async def accept(self, job_id: str, attempt: int, worker_id: str) -> Job | None:
        """OFFERED -> RUNNING on worker_id; None when the worker no longer holds the offer.

        An offer this process made (in this life) is accepted in memory (unless the job
        streams model output: its first token would wait for the write): the job runs on
        the worker as far as this process knows, and the accept is written with the job's
        next write (its result, failure, cancel, requeue, in one transaction), before its
        first progress, or by a timer within ACCEPT_WRITE_WITHIN_SECONDS (far within the
        offer lease left, so no sweep, here or at another coordinator, takes it for an
        unanswered offer), whichever is first.
        Watchers see "accepted" when it is written, always before what follows it."""
        await self._written(job_id)
        job = await self._held(job_id, attempt, worker_id, (JobState.OFFERED,))
        if job is None:
            return None
        now = self.clock()
        changes: dict[str, object] = {
            "state": JobState.RUNNING,
            "updated_at": now,
            "lease_expires_at": now + self.cfg.time_limit_seconds,
        }
        left = job.lease_expires_at - now
        if (
            job.spec.needs_llm  # its first token follows soon: written now, off its path
            or self._offered_at(job_id, worker_id, attempt) is None
            or left < ACCEPT_DEFER_MIN_SECONDS
            or job_id in self._accepts
            or job_id in self._accepting
            or job_id in self._restart_holds.get(worker_id, {})
        ):
            return await self._move(
                job,
                (JobState.OFFERED,),
                attempt,
                JobState.RUNNING,
                "accepted",
                lease_expires_at=changes["lease_expires_at"],
            )
        event = Event(
            job_id,
            EventKind.STATE,
            JobState.RUNNING,
            now,
            from_state=JobState.OFFERED,
            reason="accepted",
            worker_id=worker_id,
            attempt=attempt,
        )
        running = evolve(job, **changes)
        self._accepts[job_id] = (job, PriorMove((JobState.OFFERED,), attempt, changes, event))
        held = self._active.get(job_id)
        self._active[job_id] = (running, held[1] if held else now)
        self._accepts_later(now + min(left / 2, ACCEPT_WRITE_WITHIN_SECONDS))
        return running

    def _accepts_later(self, due: float) -> None:
        """The pending accepts are written by `due` (this clock's time) at the latest."""
        if due >= self._accepts_due:
            return
        self._accepts_due = due
        if self._accept_timer is not None:
            self._accept_timer.cancel()
        delay = max(0.0, due - self.clock())
        loop = asyncio.get_running_loop()
        self._accept_timer = loop.call_later(delay, self._accepts_timer_fired)

    def _accepts_timer_fired(self) -> None:
        self._accept_timer = None
        self._accepts_due = math.inf
        self._tasks.start(self.write_accepts(), "writing accepts")

    async def write_accepts(self, due_by: float = math.inf) -> None:
        """Writes the pending accepts (those due by `due_by`, this clock's time; all by
        default) now, together (the store may commit them in one transaction)."""
        ids = [j for j, (job, _) in self._accepts.items() if job.lease_expires_at <= due_by]
        if ids:
            await asyncio.gather(*(self._write_accept(j) for j in ids))

    async def _accept_written(self, job_id: str) -> None:
        """Waits while a write carrying the job's accept is under way."""
        while (writing := self._accepting.get(job_id)) is not None:
            await writing

    @contextlib.contextmanager
    def _carrying_accept(self, job_id: str) -> Iterator[None]:
        """Marks the block as the write carrying the job's accept (see _accept_written)."""
        done = asyncio.get_running_loop().create_future()
        self._accepting[job_id] = done
        try:
            yield
        finally:
            del self._accepting[job_id]
            done.set_result(None)

    async def _write_accept(self, job_id: str) -> None:
        """Writes the job's pending accept alone (none pending: nothing)."""
        await self._accept_written(job_id)
        pending = self._accepts.pop(job_id, None)
        if pending is None:
            return
        offered, prior = pending
        with self._carrying_accept(job_id):
            moved = await self.store.transition(
                job_id, prior.from_states, prior.attempt, prior.changes, prior.event
            )
            if moved is not None:
                self._moved(offered, moved, prior.event, "accepted")
            else:  # the offer lapsed meanwhile (or the job moved on at another coordinator)
                await self._accept_lost(job_id, offered)

    async def _accept_lost(self, job_id: str, offered: Job) -> None:
        """A pending accept could not be written (the job is no longer the worker's
        offer): the worker is told to stop."""
        held = self._active.get(job_id)
        if held is not None and (held[0].worker_id, held[0].attempts) == (
            offered.worker_id,
            offered.attempts,
        ):
            del self._active[job_id]
        now = await self.store.get_job(job_id) or offered
        self._release(now, offered.worker_id, offered.attempts, "offer no longer valid", True)

    async def resume(self, job_id: str, attempt: int, worker_id: str) -> Job | None:
        """A reconnecting worker still runs an attempt: if the job still waits for it
        (queued since that attempt after the worker's stream dropped, or still held by
        the worker since a coordinator restart), it goes back to RUNNING on that worker."""
        states = (JobState.QUEUED, *ACTIVE_STATES)
        job = await self._held(job_id, attempt, worker_id, states)
        if job is None:
            return None
        if job.state is JobState.QUEUED and not await self._may_take(job, worker_id):
            return None  # back in the queue, it is a new assignment: the pairing is checked
        until = self.clock() + self.cfg.time_limit_seconds
        if not await self._held_since_restart(job):
            # the attempt's time limit runs from its offer, across reconnections (a worker
            # dropping and resuming its stream does not get the job for longer); a restart
            # of the coordinator is nobody's fault: it gives a whole time limit again
            offered_at = self._offered_at(job_id, worker_id, attempt)
            if offered_at is None:
                offered_at = await self.store.offered_at(job_id, worker_id, attempt)
            if offered_at is None:
                return None
            until = min(until, offered_at + self.cfg.time_limit_seconds)
            if until <= self.clock():
                return None
        return await self._move(
            job,
            states,
            attempt,
            JobState.RUNNING,
            "resumed",
            lease_expires_at=until,
            coordinator_id=self.coordinator_id,
        )

    async def worker_returned(self, worker_id: str, resumed: set[str]) -> None:
        """A worker reconnected after a coordinator restart: the jobs held for it that it
        did not resume (it no longer runs them) are requeued now, costing no attempt."""
        for job_id, attempt in list(self._restart_holds.get(worker_id, {}).items()):
            if job_id in resumed:
                continue
            job = await self._held(job_id, attempt, worker_id, ACTIVE_STATES)
            if job is None:
                self._drop_hold(worker_id, job_id)
            else:
                await self.requeue(job, RESTARTED, tell_worker=False, costs_attempt=False)

    async def reject(self, job_id: str, attempt: int, worker_id: str, reason: str) -> Job | None:
        await self._written(job_id)
        job = await self._held(job_id, attempt, worker_id, (JobState.OFFERED,))
        if job is None:
            return None
        return await self.requeue(job, f"{REJECTED}{reason or 'no reason'}", tell_worker=False)

    async def progress(
        self, job_id: str, attempt: int, worker_id: str, text: str, fraction: float
    ) -> None:
        """A chunk of output of the running attempt: numbered and sent to watchers now,
        written to the store with the chunks around it (see the module docstring)."""
        await self._written(job_id)
        if job_id in self._accepts or job_id in self._accepting:
            await self._write_accept(job_id)  # "accepted" comes before its progress
        while True:
            job = await self._held(job_id, attempt, worker_id, (JobState.RUNNING,))
            if job is None:
                return
            moving = self._moving.get(job_id)
            if not moving:
                break  # numbered now, with no await before: no move can start in between
            # a move's state event takes the next number first (a chunk numbered now
            # would share it); then the job is looked at again (cancelled: dropped)
            await asyncio.wait(list(moving))
        if job.spec.sealed:
            text = ""  # a sealed job's output exists only sealed: never stored or forwarded
        now = self.clock()
        e = Event(
            job_id,
            EventKind.PROGRESS,
            job.state,
            now,
            worker_id=worker_id,
            attempt=attempt,
            text=text,
            fraction=fraction,
        )
        self.live.progress(e, job.last_sequence, now)
        self.notifier.notify(job_id)
        chunks, chars, _ = self.live.pending(job_id)
        delay = self.cfg.progress_flush_seconds
        if chunks >= PROGRESS_FLUSH_CHUNKS or chars >= PROGRESS_FLUSH_CHARS or delay <= 0:
            await self.flush_progress(job_id)
        elif chunks == 1:
            loop = asyncio.get_running_loop()
            self.live.set_timer(job_id, loop.call_later(delay, self._flush_later, job_id))

    def _flush_later(self, job_id: str) -> None:
        """The flush timer of a job fired: writes its progress in a task of its own."""
        self._tasks.start(self.flush_progress(job_id), "progress flush")

    # --- other coordinators' changes (several on one store) ------------------------------

    def job_changed_elsewhere(self, job_id: str, state: JobState) -> None:
        """Another coordinator sharing the store committed a change of the job (the
        store's JobChanges): watchers here look again; a job queued there is offered
        here at once; a job this process's worker holds that moved on there (cancelled,
        requeued after its lease lapsed) is taken back from the worker."""
        if self.notifier.watched(job_id):
            self._elsewhere[job_id] = self._elsewhere.get(job_id, 0) + 1
            self.notifier.notify(job_id)
        else:
            self.live.forget(job_id)  # a later watcher reads the store, not stale memory
            self._changed_there[job_id] = None
            self._changed_there.move_to_end(job_id)
            if len(self._changed_there) > CHANGED_THERE_KEPT:
                self._changed_there.popitem(last=False)
        if state is JobState.QUEUED or job_id in self._active:
            self._tasks.start(self._changed_elsewhere(job_id), "another coordinator's change")

    async def _changed_elsewhere(self, job_id: str) -> None:
        job = await self.store.get_job(job_id)
        if job is None:
            return
        held = self._active.get(job_id)
        if held is not None:
            mine = held[0]
            if (
                job.state not in ACTIVE_STATES
                or (job.worker_id, job.attempts) != (mine.worker_id, mine.attempts)
            ) and self._active.pop(job_id, None) is not None:
                self._accepts.pop(job_id, None)  # its accept is moot
                reason = "cancelled" if job.state is JobState.CANCELLED else "moved_elsewhere"
                self._release(job, mine.worker_id, mine.attempts, reason, tell_worker=True)
        if job.state is JobState.QUEUED and self.listener:
            self.listener.job_queued(job)

    async def drain(self) -> None:
        """Writes the pending accepts and waits for the tasks this service started
        (before the store closes)."""
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None
            self._accepts_due = math.inf
        await self.write_accepts()
        await self._tasks.drain()

    async def flush_progress(self, job_id: str | None = None) -> None:
        """Writes the job's (None: every job's) progress not in the store yet, one row
        per job. Chunks of a job that became final meanwhile (on another coordinator)
        are dropped."""
        for jid in [job_id] if job_id is not None else self.live.with_pending():
            while (writing := self._flushing.get(jid)) is not None:
                await writing  # one write of a job's progress at a time, in order
            pending = self.live.take_pending(jid)
            if not pending:
                continue
            done = asyncio.get_running_loop().create_future()
            self._flushing[jid] = done
            try:
                if not await self.store.append_progress(pending):
                    log.warning(
                        "job %s: %d progress chunk(s) not stored (the job moved on)",
                        jid,
                        len(pending),
                    )
                self.live.flushed(jid, pending[-1].sequence)
            finally:
                del self._flushing[jid]
                done.set_result(None)

    async def complete(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        worker_key: bytes,
        result: Result,
        receipt_body: bytes,
        signature: bytes,
        worker_agent_id: str = "",
        worker_agent_owner: str = "",
    ) -> tuple[bool, str]:
        """Records a result with its countersigned receipt; (accepted, reason).
        worker_agent_id: the delivering session's verified agent id ("" for none); the
        receipt's worker_agent_id must equal it. worker_agent_owner: that agent's owner
        (a verified job's later runs need other owners).

        A result for an offer the worker has not answered accepts it first (the worker
        sent the result alone: the job ended before its accept went out).
        The first valid result wins: besides the worker running the current attempt, a
        worker that held an earlier attempt (its stream dropped, the job was requeued) may
        still deliver, as long as the job is not final. Whoever holds the job then is told
        to stop."""
        await self._written(job_id)
        await self._answered_by_result(job_id, attempt, worker_id)
        job = await self._held(job_id, attempt, worker_id, (JobState.RUNNING,))
        late = job is None
        if late:
            job = await self.store.get_job(job_id)
        if (
            job is not None
            and job.state is JobState.COMPLETED
            and job.worker_id == worker_id
            and job.receipt is not None
            and job.receipt.body == receipt_body
        ):  # the same result again (its ack was lost with a session): it is recorded
            return True, ""
        offered_at = self._offered_at(job_id, worker_id, attempt)
        if offered_at is None:
            offered_at = await self.store.offered_at(job_id, worker_id, attempt)
        if job is None or job.state.final or offered_at is None:
            return False, "stale: this worker holds no open attempt of the job"
        if late and not await self._may_take(job, worker_id):
            return False, "stale: the job's client is no longer paired with this worker"
        try:
            receipt = self.notary.countersign(
                job,
                attempt,
                worker_key,
                result,
                receipt_body,
                signature,
                worker_agent_id,
                offered_at=offered_at,
                now=self.clock(),
            )
        except DispatchError as e:
            if not late:
                await self.requeue(job, f"{BAD_RECEIPT}{e.message}", tell_worker=False)
            return False, e.message
        if job.verify_runs:
            if late:  # a verified job compares the runs it offered, in turn
                return False, "stale: this worker holds no open attempt of the job"
            run = Run(
                job_id, attempt, worker_id, worker_agent_id, result, receipt, self.clock(),
                agent_owner=worker_agent_owner,
            )  # fmt: skip
            return await self._run_completed(job, run)
        done = await self._move(
            job,
            OPEN_STATES if late else (JobState.RUNNING,),
            job.attempts,
            JobState.COMPLETED,
            "completed_late" if late else "completed",
            result=result,
            receipt=receipt,
            worker_id=worker_id,
            lease_expires_at=0.0,
            feedback=self._feedback(job, worker_id, True, receipt.sha256, worker_agent_id),
            outcome=(worker_id, True),
        )
        if done is None:
            return False, "stale: the job changed state meanwhile"
        self.reputation.record(worker_id, True)
        if late and job.state in ACTIVE_STATES and job.worker_id:
            self._release(done, job.worker_id, job.attempts, "completed_elsewhere", True)
        self._release(done, worker_id, attempt, "completed", tell_worker=False)
        for listener in self.completion_listeners:
            listener.job_completed(done)
        return True, ""

    async def _answered_by_result(self, job_id: str, attempt: int, worker_id: str) -> None:
        """A result (or failure) for an offer this process made and the worker has not
        answered: the offer is accepted first, as an OfferResponse would have."""
        known = self._active.get(job_id)
        if (
            known is not None
            and known[0].state is JobState.OFFERED
            and known[0].worker_id == worker_id
            and known[0].attempts == attempt
        ):
            await self.accept(job_id, attempt, worker_id)

    async def fail(
        self, job_id: str, attempt: int, worker_id: str, failure: Failure, retryable: bool
    ) -> bool:
        await self._written(job_id)
        await self._answered_by_result(job_id, attempt, worker_id)
        job = await self._held(job_id, attempt, worker_id, ACTIVE_STATES)
        if job is None:
            return False
        outcome = (worker_id, False)
        if retryable:
            moved = await self.requeue(
                job, f"{FAILED}{failure.code}", tell_worker=False, outcome=outcome
            )
        else:
            moved = await self._move(
                job,
                ACTIVE_STATES,
                attempt,
                JobState.FAILED,
                failure.code,
                failure=failure,
                lease_expires_at=0.0,
                feedback=None
                if failure.code in NOT_WORKER_FAULT
                else self._feedback(job, worker_id, False, _failure_hash(job, attempt, failure)),
                outcome=outcome,
            )
            if moved is not None:
                self._release(moved, worker_id, attempt, failure.code, tell_worker=False)
        if moved is not None:
            self.reputation.record(worker_id, False)
        return moved is not None

    async def requeue(
        self,
        job: Job,
        reason: str,
        tell_worker: bool,
        costs_attempt: bool = True,
        outcome: tuple[str, bool] | None = None,
        expect: dict[str, object] | None = None,
    ) -> Job | None:
        """Takes an active job back from its worker: QUEUED again, or FAILED past max
        attempts. costs_attempt=False (the attempt was cut short by a coordinator
        restart): always QUEUED, with one more attempt allowed. outcome: the worker's
        failure to count with the move (see Store.transition). expect: fields of the job
        as stored that must not have changed since it was read (see Store.transition):
        None when the caller knows it holds the job."""
        if not costs_attempt:
            moved = await self._move(
                job,
                ACTIVE_STATES,
                job.attempts,
                JobState.QUEUED,
                reason,
                queued_at=self.clock(),
                lease_expires_at=0.0,
                outcome=outcome,
                expect=expect,
                max_attempts=job.max_attempts + 1,
            )
        elif job.attempts >= job.max_attempts:
            failure = Failure(
                "max_attempts_exceeded",
                f"gave up after {job.attempts} attempt(s); last: {reason}",
            )
            feedback = (
                None
                if reason in NOT_WORKER_FAULT
                else self._feedback(
                    job, job.worker_id, False, _failure_hash(job, job.attempts, failure)
                )
            )
            moved = await self._move(
                job,
                ACTIVE_STATES,
                job.attempts,
                JobState.FAILED,
                reason,
                failure=failure,
                lease_expires_at=0.0,
                outcome=outcome,
                expect=expect,
                feedback=feedback,
            )
            if moved is not None and feedback is not None:
                # the negative feedback posted for it counts in the cached score now, as
                # a failure the worker reported does (fail)
                self.reputation.record(job.worker_id, False)
        else:
            moved = await self._move(
                job,
                ACTIVE_STATES,
                job.attempts,
                JobState.QUEUED,
                reason,
                queued_at=self.clock(),
                lease_expires_at=0.0,
                outcome=outcome,
                expect=expect,
            )
        if moved is not None:
            self._release(moved, job.worker_id, job.attempts, reason, tell_worker)
            if moved.state is JobState.QUEUED and self.listener:
                self.listener.job_queued(moved)
        return moved

    async def worker_lost(self, worker_id: str, held: dict[str, int], reason: str) -> list[Job]:
        """Requeues the attempts (job id -> attempt) a lost session of the worker held
        (stream dropped, evicted), where the worker still holds them through this
        coordinator: a job it resumed through another coordinator meanwhile is that one's."""
        out = []
        for job_id, attempt in held.items():
            job = await self.store.get_job(job_id)
            if job is None or (job.worker_id, job.attempts) != (worker_id, attempt):
                continue
            if not self._holds(job):
                continue
            # still this coordinator's when written: a resume through another one between
            # the read and the write (it takes the job over) is not undone
            owner: dict[str, object] = {"coordinator_id": job.coordinator_id}
            moved = await self.requeue(job, reason, tell_worker=False, expect=owner)
            if moved is not None:
                out.append(moved)
        return out

    async def sweep(self) -> None:
        """Lapsed leases go back to the queue; jobs nobody could take in time fail; expired
        quotes give their storage back, and with pairing codes long expired are deleted
        (GetQuote is public, so they must not pile up). Progress this process holds is
        flushed here; the rest runs on one coordinator at a time (the store's pass lock)."""
        now = self.clock()
        # backstop for the accept timer: an accept whose offer lease is about to lapse
        await self.write_accepts(now + self.cfg.offer_lease_seconds / 2)
        for job_id in self.live.with_pending():  # backstop for the flush timers
            if self.live.pending(job_id)[2] + self.cfg.progress_flush_seconds <= now:
                await self.flush_progress(job_id)
        async with self.store.pass_lock("jobs-sweep") as held:
            if held:
                await self._sweep_store(now)

    async def _sweep_store(self, now: float) -> None:
        if now >= self._next_purge:
            await self.store.release_expired_quotes(now)
            await self.store.purge_expired(now - EXPIRED_RETENTION_SECONDS)
            self._next_purge = now + PURGE_INTERVAL_SECONDS
        for lapsed in await self.store.lapsed_leases(now):
            # read again: the list may be a while old by now (each requeue waits for the
            # store), and a job its worker resumed meanwhile has a new lease
            job = await self.store.get_job(lapsed.job_id)
            if (
                job is None
                or (job.state, job.attempts) != (lapsed.state, lapsed.attempts)
                or job.lease_expires_at > now
            ):
                continue
            # and when written: a resume (any coordinator's) or an accept between this
            # read and the write gives the job a new lease, and it is not taken back
            lapsed_as_read: dict[str, object] = {
                "coordinator_id": job.coordinator_id,
                "lease_expires_at": job.lease_expires_at,
            }
            if await self._held_since_restart(job):
                # its worker did not come back within the restart grace
                await self.requeue(
                    job, RESTARTED, tell_worker=True, costs_attempt=False, expect=lapsed_as_read
                )
                continue
            reason = OFFER_LAPSED if job.state is JobState.OFFERED else TIME_LAPSED
            await self.requeue(job, reason, tell_worker=True, expect=lapsed_as_read)
        timeout = self.cfg.queue_timeout_seconds
        # a spot check waits for its checker a shorter time than a job waits for a worker:
        # one read of the queue with the shorter cutoff serves both
        check_wait = self.verification.spot_check_wait_seconds
        spot_checks = self.verification.spot_check_rate > 0 and check_wait < timeout
        for job in await self.store.stale_queued(now - (check_wait if spot_checks else timeout)):
            if job.verify_mode == VERIFY_SPOT_CHECK and job.verify_seen and spot_checks:
                await self._no_independent_worker(job, check_wait)  # no checker came
                continue
            if job.queued_at >= now - timeout:
                continue  # still within the queue timeout
            if job.verify_seen:  # runs are in: no independent worker came for the next
                await self._no_independent_worker(job, timeout)
                continue
            failure = Failure(
                "no_eligible_worker",
                f"no eligible worker took the job within {timeout:g}s",
            )
            await self._move(
                job,
                (JobState.QUEUED,),
                job.attempts,
                JobState.FAILED,
                "no_eligible_worker",
                failure=failure,
            )

    async def recover(self) -> int:
        """At start-up, no worker is connected to this process yet: each job a worker held
        stays held for it, under a lease of jobs.restart_grace_seconds, for the worker to
        reconnect and resume (resume); past the lease, or when the worker comes back
        without it (worker_returned), the job is requeued without costing an attempt.
        Only this coordinator's jobs: another's, on a shared store, stay its own (they
        come back to the queue when their leases lapse, if it is gone for good).
        Returns how many jobs are held."""
        grace_until = self.clock() + self.cfg.restart_grace_seconds
        held = 0
        for job in await self.store.active_jobs():
            if not self._holds(job):
                continue
            moved = await self._move(
                job, (job.state,), job.attempts, job.state, RESTARTED, lease_expires_at=grace_until
            )
            if moved is not None:
                self._restart_holds.setdefault(job.worker_id, {})[job.job_id] = job.attempts
                held += 1
        return held

    # --- verified jobs (coordinator/verification.py) -----------------------------------

    async def _run_completed(self, job: Job, run: Run) -> tuple[bool, str]:
        """A run of a verified job is in: stored, and the job queued for its next run,
        or, with every run in, the runs compared and the job concluded."""
        runs = [*(await self.store.job_runs(job.job_id)), run]
        needed = verify.next_runs(job, runs)
        if len(runs) < needed:
            seen = (
                *job.verify_seen,
                *verify.identities(run.worker_id, run.agent_id, run.agent_owner),
            )

            async def record(changes: dict[str, object], event: Event) -> Job | None:
                return await self.store.record_run(run, (JobState.RUNNING,), changes, event)

            moved = await self._move(
                job,
                (JobState.RUNNING,),
                run.attempt,
                JobState.QUEUED,
                f"{RUN_RECORDED}{len(runs)} of {needed} done"
                + (" (tiebreak)" if needed > job.verify_runs else ""),
                write=record,
                queued_at=self.clock(),
                lease_expires_at=0.0,
                # a run that completed costs the job no attempt
                max_attempts=job.max_attempts + 1,
                verify_runs=needed,
                verify_seen=seen,
            )
            if moved is None:
                return False, "stale: the job changed state meanwhile"
            self._release(moved, run.worker_id, run.attempt, "run_recorded", tell_worker=False)
            if self.listener:
                self.listener.job_queued(moved)
            return True, ""
        return await self._conclude(job, runs, run)

    async def _conclude(self, job: Job, runs: list[Run], last: Run) -> tuple[bool, str]:
        """Compares the runs (last: the one just in, not stored yet) and ends the job:
        COMPLETED with the majority's output, or FAILED without a majority."""
        t = verify.tally(runs)
        if t.majority is None:
            failure = Failure(
                verify.VERIFICATION_FAILED,
                f"the {len(runs)} independent runs gave {len({r.output_sha256 for r in runs})} "
                "different outputs and no majority; you are not charged",
            )

            async def fail(changes: dict[str, object], event: Event) -> Job | None:
                return await self.store.conclude_runs(
                    job.job_id, (JobState.RUNNING,), last.attempt, changes, event, {}, run=last
                )

            moved = await self._move(
                job,
                (JobState.RUNNING,),
                last.attempt,
                JobState.FAILED,
                verify.VERIFICATION_FAILED,
                write=fail,
                failure=failure,
                lease_expires_at=0.0,
            )
            if moved is None:
                return False, "stale: the job changed state meanwhile"
            self._release(moved, last.worker_id, last.attempt, "completed", tell_worker=False)
            return True, ""
        chosen = t.agreeing[0]
        receipt = self.notary.verified(
            chosen.receipt,
            job.verify_mode,
            len(runs),
            [r.worker_id for r in t.agreeing],
            [r.worker_id for r in t.dissenting],
        )
        feedback = [
            f
            for r in runs
            if (f := self._run_feedback(job, r, t.verdicts[r.attempt] == AGREED)) is not None
        ]
        outcomes = [(r.worker_id, t.verdicts[r.attempt] == AGREED) for r in runs]
        last = dataclasses.replace(last, verdict=t.verdicts[last.attempt])

        async def complete(changes: dict[str, object], event: Event) -> Job | None:
            return await self.store.conclude_runs(
                job.job_id,
                (JobState.RUNNING,),
                last.attempt,
                changes,
                event,
                t.verdicts,
                feedback,
                outcomes,
                run=last,
            )

        done = await self._move(
            job,
            (JobState.RUNNING,),
            last.attempt,
            JobState.COMPLETED,
            f"completed: {len(t.agreeing)} of {len(runs)} runs agree",
            write=complete,
            result=chosen.result,
            receipt=receipt,
            worker_id=chosen.worker_id,
            lease_expires_at=0.0,
        )
        if done is None:
            return False, "stale: the job changed state meanwhile"
        for worker_id, agreed in outcomes:
            # the verdict in the worker's record, as the sources count it durably: the
            # local source's tallies (the run's outcome, counted by the conclusion above,
            # and the verdict it stores now), on chain the spotCheck feedback queued above
            await self.reputation.record_spot_check(worker_id, agreed)
        for r in t.dissenting:
            log.warning("job %s: worker %s disagreed with the majority of %d runs", job.job_id,
                        r.worker_id, len(runs), extra={"job_id": job.job_id})  # fmt: skip
        self._release(done, last.worker_id, last.attempt, "completed", tell_worker=False)
        for listener in self.completion_listeners:
            listener.job_completed(done)
        return True, ""

    async def _no_independent_worker(self, job: Job, waited: float) -> None:
        """A verified job with runs in waited `waited` seconds (the queue timeout; a spot
        check [verification] spot_check_wait_seconds) for an independent worker in vain: a
        spot check with its one run is skipped (the job completes with that run, as a job
        run once); otherwise the job fails, not charged."""
        runs = await self.store.job_runs(job.job_id)
        wait = f"{waited:g}s"
        if job.verify_mode == VERIFY_SPOT_CHECK and len(runs) == 1:
            run = runs[0]
            await self._move(
                job,
                (JobState.QUEUED,),
                job.attempts,
                JobState.COMPLETED,
                f"completed: spot check skipped (no independent worker within {wait})",
                result=run.result,
                receipt=run.receipt,
                worker_id=run.worker_id,
                feedback=self._feedback(job, run.worker_id, True, run.receipt.sha256, run.agent_id),
                outcome=(run.worker_id, True),
            )
            return
        if len(runs) >= 2 and verify.tally(runs).majority is None:
            code = verify.VERIFICATION_FAILED
            message = (
                f"{len(runs)} runs disagree and no independent worker came within {wait} to "
                "break the tie; you are not charged"
            )
        else:
            code = verify.NOT_ENOUGH_WORKERS
            message = (
                f"{len(runs)} of {job.verify_runs} runs done; no other independent worker "
                f"(another key and agent) took the job within {wait}; you are not charged"
            )
        await self._move(
            job, (JobState.QUEUED,), job.attempts, JobState.FAILED, code,
            failure=Failure(code, message),
        )  # fmt: skip

    def _run_feedback(self, job: Job, run: Run, agreed: bool) -> FeedbackEntry | None:
        """The spotCheck feedback entry for a compared run (keyed by job and attempt:
        one per run), None when feedback is off or the worker has no agent id."""
        entry = self._feedback(job, run.worker_id, agreed, run.receipt.sha256, run.agent_id)
        if entry is None:
            return None
        return dataclasses.replace(
            entry,
            job_id=f"{job.job_id}#{run.attempt}",
            value=verify.AGREE_VALUE if agreed else verify.DISAGREE_VALUE,
            tag1=verify.SPOT_CHECK_TAG,
        )

    # --- helpers ------------------------------------------------------------------------

    async def _held_since_restart(self, job: Job) -> bool:
        """Whether the job's lease is a restart grace (recover), of this coordinator or,
        on a shared store, of another (its last event says so)."""
        if self._restart_holds.get(job.worker_id, {}).get(job.job_id) == job.attempts:
            return True
        if job.coordinator_id in ("", self.coordinator_id):
            return False
        last = await self.store.events_after(job.job_id, job.last_sequence - 1, limit=1)
        return bool(last) and last[0].kind is EventKind.STATE and last[0].reason == RESTARTED

    def _remember(self, job: Job, events: list[Event]) -> None:
        """A job just created here with `events` (its only ones, in order): held in memory
        (LiveEvents' recent jobs) so that a WatchJob of it needs no store read. Not when it
        moved on meanwhile, here or at another coordinator whose change was heard before
        this write's caller came back to it (memory would start behind, and a watcher
        would wait for a change it already missed)."""
        if (
            job.state is events[-1].state
            and job.last_sequence == len(events)
            and job.job_id not in self._active
            and job.job_id not in self._changed_there
        ):
            for sequence, event in enumerate(events, 1):
                self.live.state(evolve(event, sequence=sequence), job, watched=True)
            if not self.notifier.watched(job.job_id):
                self.live.release(job.job_id)

    def _known(self, client_id: str, job_id: str) -> Job | None:
        """The job from memory, with every event of it (LiveEvents.known), when client_id
        owns it; None when memory cannot tell."""
        job = self.live.known(job_id)
        if job is not None and job.client_id != client_id:
            raise PermissionDenied(f"job {quoted(job_id)} belongs to another client")
        return job

    async def _may_take(self, job: Job, worker_id: str) -> bool:
        """Whether worker_id may take job over now (a resume of a requeued job, a late
        result): as matching allows, a PRIVATE job only while its client is paired with
        the worker (a revoked pairing stops new jobs)."""
        if job.spec.privacy is not Privacy.PRIVATE:
            return True
        return worker_id in await self.store.paired_workers(job.client_id)

    def _holds(self, job: Job) -> bool:
        """Whether this coordinator's worker holds the job (no owner: stored before
        coordinators recorded theirs, when one coordinator had the store): a job its
        worker resumed through another coordinator is that one's to requeue."""
        return job.coordinator_id in ("", self.coordinator_id)

    def _offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        """When this process offered the worker the attempt (None: not known here)."""
        held = self._active.get(job_id)
        if held is None or held[0].worker_id != worker_id or held[0].attempts != attempt:
            return None
        return held[1]

    async def _held(
        self, job_id: str, attempt: int, worker_id: str, states: tuple[JobState, ...]
    ) -> Job | None:
        """The job, when worker_id holds its `attempt` in one of `states`: as this process
        last moved it when it can tell, else as the store has it."""
        known = self._active.get(job_id)
        if (
            known is not None
            and known[0].worker_id == worker_id
            and known[0].attempts == attempt
            and known[0].state in states
        ):
            return known[0]
        job = await self.store.get_job(job_id)
        if (
            job is None
            or job.worker_id != worker_id
            or job.attempts != attempt
            or job.state not in states
        ):
            return None
        return job

    async def _move(
        self,
        job: Job,
        from_states: tuple[JobState, ...],
        attempt: int | None,
        to: JobState,
        reason: str,
        feedback: FeedbackEntry | None = None,
        outcome: tuple[str, bool] | None = None,
        write: Callable[[dict[str, object], Event], Awaitable[Job | None]] | None = None,
        expect: dict[str, object] | None = None,
        **changes: object,
    ) -> Job | None:
        """(write: the store write of the move, when it is more than a transition: it is
        given the changes, with state and updated_at, and the event. expect: see
        Store.transition; not with write.)"""
        job_id = job.job_id
        moving = asyncio.get_running_loop().create_future()  # progress waits (see progress)
        self._moving.setdefault(job_id, []).append(moving)
        try:
            await self.flush_progress(job_id)  # progress first: stored sequences stay in order
            await self._accept_written(job_id)
            prior: PriorMove | None = None
            offered: Job | None = None
            pending = self._accepts.get(job_id)
            if pending is not None:
                fold = (
                    write is None
                    and JobState.RUNNING in from_states
                    and (job.worker_id, job.attempts) == (pending[0].worker_id, pending[0].attempts)
                )
                if not fold:
                    await self._write_accept(job_id)
                else:  # written first in this move's transaction
                    offered, prior = self._accepts.pop(job_id)
                    job = evolve(job, **prior.changes)
            carrying = self._carrying_accept(job_id) if prior else contextlib.nullcontext()
            with carrying:
                return await self._move_now(
                    job, from_states, attempt, to, reason, feedback, outcome, write, offered,
                    prior, changes, expect,
                )  # fmt: skip
        finally:
            under_way = self._moving[job_id]
            under_way.remove(moving)
            if not under_way:
                del self._moving[job_id]
            moving.set_result(None)

    async def _move_now(
        self,
        job: Job,
        from_states: tuple[JobState, ...],
        attempt: int | None,
        to: JobState,
        reason: str,
        feedback: FeedbackEntry | None,
        outcome: tuple[str, bool] | None,
        write: Callable[[dict[str, object], Event], Awaitable[Job | None]] | None,
        offered: Job | None,
        prior: PriorMove | None,
        changes: dict[str, object],
        expect: dict[str, object] | None = None,
    ) -> Job | None:
        """_move's write (prior: the job's pending accept, written first; offered: the
        job as it was offered)."""
        now = self.clock()
        worker_id = str(changes.get("worker_id", job.worker_id))
        new_attempt = int(changes.get("attempts", job.attempts))  # type: ignore[call-overload]
        event = Event(
            job.job_id,
            EventKind.STATE,
            to,
            now,
            from_state=job.state,
            reason=reason,
            worker_id=worker_id,
            attempt=new_attempt,
        )
        changes = {"state": to, "updated_at": now, **changes}
        if write is not None:
            moved = await write(changes, event)
        else:
            moved = await self.store.transition(
                job.job_id, from_states, attempt, changes, event, feedback, outcome, prior=prior,
                expect=expect,
            )  # fmt: skip
        if prior is not None and offered is not None:
            if moved is None:
                await self._accept_lost(job.job_id, offered)
                return None
            # the accept, one before the move's event
            accepted = evolve(
                job, last_sequence=moved.last_sequence - 1, updated_at=prior.event.time
            )
            self._moved(offered, accepted, prior.event, "accepted")
        if moved is not None:
            self._moved(job, moved, event, reason)
        return moved

    def _moved(self, job: Job, moved: Job, event: Event, reason: str) -> None:
        """What follows a written move of job (as it was) to moved, with its event."""
        to = moved.state
        if to in ACTIVE_STATES:
            # when the attempt was offered: known when this process offered it
            known = self._active.get(job.job_id)
            offered = event.time if to is JobState.OFFERED else known[1] if known else None
            self._active[job.job_id] = (moved, offered)
        else:
            self._active.pop(job.job_id, None)
        watched = self.notifier.watched(job.job_id)
        self.live.state(evolve(event, sequence=moved.last_sequence), moved, watched)
        if not self.notifier.watched(job.job_id):
            self.live.release(job.job_id)
        self._drop_hold(job.worker_id, job.job_id)  # any move ends a restart hold
        self._changed(moved)
        self.observer.job_moved(job, moved, reason)
        if to.final:
            for listener in self.final_listeners:
                listener(moved)

    def _feedback(
        self, job: Job, worker_id: str, success: bool, feedback_hash: bytes, agent: str = ""
    ) -> FeedbackEntry | None:
        """The feedback outbox entry owed for the job's final transition, written in the
        same transaction; None when feedback is off or the worker has no agent id. The
        agent id: the one the delivering session gave (complete), else the worker's
        connected session's (agent_of)."""
        if self.feedback_uri_base is None or not worker_id:
            return None
        agent = agent or self.agent_of(worker_id)
        if not agent:
            return None
        try:
            agent_id = int(agent)
        except ValueError:
            log.warning("worker %s has agent id %r, not a number: no feedback", worker_id, agent)
            return None
        if not 0 <= agent_id < 2**256:
            return None
        return FeedbackEntry(
            job_id=job.job_id,
            agent_id=agent_id,
            value=FEEDBACK_POSITIVE if success else FEEDBACK_NEGATIVE,
            value_decimals=0,
            tag1=FEEDBACK_TAG1,
            tag2=job.spec.job_type.name.lower(),
            feedback_uri=f"{self.feedback_uri_base}/jobs/{job.job_id}",
            feedback_hash=feedback_hash,
            created_at=self.clock(),
        )

    def _drop_hold(self, worker_id: str, job_id: str) -> None:
        holds = self._restart_holds.get(worker_id)
        if holds is not None:
            holds.pop(job_id, None)
            if not holds:
                del self._restart_holds[worker_id]

    def _changed(self, job: Job) -> None:
        self.notifier.notify(job.job_id)

    def _release(
        self, job: Job, worker_id: str, attempt: int, reason: str, tell_worker: bool
    ) -> None:
        if self.listener and worker_id:
            self.listener.job_released(job, worker_id, attempt, reason, tell_worker)


def _unpaired(spec: JobSpec, paired: set[str]) -> FailedPrecondition | None:
    """Why a PRIVATE or sealed spec cannot be committed by a client paired with `paired`."""
    if spec.privacy is Privacy.PRIVATE and not paired:
        return FailedPrecondition(
            "a PRIVATE job needs at least one paired worker; pair one with "
            "`dispatch pair create` / `dispatch pair claim` first"
        )
    if spec.sealed and not spec.recipients & paired:
        return FailedPrecondition(
            "none of the workers this job is sealed to is paired with you "
            "(`dispatch pair list`); seal it to a paired worker"
        )
    return None


def _check_paired(spec: JobSpec, paired: set[str]) -> None:
    problem = _unpaired(spec, paired)
    if problem is not None:
        raise problem


def _same_spec(job: Job, spec: JobSpec) -> Job:
    """job, committed earlier with the idempotency key now run again with spec."""
    if job.spec.spec_sha256 != spec.spec_sha256:
        raise FailedPrecondition("idempotency_key was already used for another job")
    return job


def _same_quote(job: Job, quote_id: str) -> Job:
    """job, committed earlier with the idempotency key now used with quote_id."""
    if job.quote_id != quote_id:
        raise FailedPrecondition("idempotency_key was already used for another quote")
    return job


def _failure_hash(job: Job, attempt: int, failure: Failure) -> bytes:
    """sha256 of the failure record a negative feedback entry points at."""
    record = {
        "job_id": job.job_id,
        "attempt": attempt,
        "worker_id": job.worker_id,
        "code": failure.code,
        "message": failure.message,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()


async def _wait(ev: asyncio.Event, seconds: float) -> bool:
    """Whether ev was set within `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await ev.wait()
    return ev.is_set()
