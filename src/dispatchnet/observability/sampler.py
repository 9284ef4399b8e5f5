"""Sampler: what the metrics' gauges and the dashboard read from the store, every
`[observability] sample_seconds`, in a background task (never on a job's path).

Each sample reads: the jobs queued (a page at a time, counted up to OPEN_COUNT_MAX), offered
and running; the outboxes' backlogs with the age of their oldest item (payments due for
settlement, pending feedback, batches waiting for their anchor, payouts recorded but not
landed; each counted up to BACKLOG_MAX); and, for the dashboard, the earnings of the
connected workers it shows. Ages count from the item's creation: the job's commit for a
payment, the job's final state for feedback, the batch's close, the payout's record.
A failed read keeps the previous sample (and counts the failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dispatchnet.coordinator.models import (
    AnchorStatus,
    Balance,
    FeedbackStatus,
    JobState,
)
from dispatchnet.observability.metrics import CoordinatorMetrics
from dispatchnet.store.base import Store

log = logging.getLogger("dispatch.observability")

OPEN_COUNT_MAX = 10_000  # queued jobs counted per sample, at most
MIN_GAP_SECONDS = 0.5  # between two samples, whatever asks for one (kick)
QUEUE_PAGE = 500
BACKLOG_MAX = 1000  # items of one outbox counted per sample, at most
EARNINGS_WORKERS = 50  # connected workers whose earnings a sample reads (the dashboard's)
TO_ANCHOR = (AnchorStatus.PENDING, AnchorStatus.FAILED)


@dataclass(frozen=True)
class Backlog:
    outbox: str  # settlement, feedback, anchoring, payouts
    chain: str  # its CAIP-2 network
    count: int
    oldest_age_seconds: float  # 0 when empty
    capped: bool = False  # count reached BACKLOG_MAX: there may be more


@dataclass(frozen=True)
class Sample:
    at: float = 0.0
    open_jobs: dict[str, int] = field(default_factory=dict)  # queued, offered, running
    open_capped: bool = False  # the queue reached OPEN_COUNT_MAX
    backlogs: tuple[Backlog, ...] = ()
    earnings: dict[str, list[Balance]] = field(default_factory=dict)  # worker_id -> balances


@dataclass(frozen=True)
class Outboxes:
    """Which outboxes this coordinator runs, and on which chain (CAIP-2 network) each."""

    settlement: tuple[str, ...] = ()  # the networks CommitJob takes payments on
    feedback: str | None = None
    anchoring: str | None = None
    payouts: tuple[str, ...] = ()


class Sampler:
    def __init__(
        self,
        store: Store,
        outboxes: Outboxes,
        interval_seconds: float,
        metrics: CoordinatorMetrics | None = None,
        workers: Callable[[int], Sequence[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """workers(n): the ids of up to n connected workers, whose earnings to read (None:
        no earnings). Taking n, not all of them: a walk over every session each sample was
        most of the sampler's time with 10,000 seekers connected."""
        self.store = store
        self.outboxes = outboxes
        self.interval = interval_seconds
        self.metrics = metrics
        self.workers = workers
        self.clock = clock
        self.last = Sample()
        self.listeners: list[Callable[[Sample], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def sample(self) -> Sample:
        """Reads a sample, publishes it (metrics, listeners) and returns it."""
        now = self.clock()
        queued, capped = await self._queued()
        open_jobs = {"queued": queued, "offered": 0, "running": 0}
        for job in await self.store.active_jobs():
            open_jobs[job.state.name.lower()] = open_jobs.get(job.state.name.lower(), 0) + 1
        backlogs = await self._backlogs(now)
        earnings: dict[str, list[Balance]] = {}
        if self.workers is not None:
            ids = list(self.workers(EARNINGS_WORKERS))
            earnings = await self.store.balances(ids) if ids else {}
        sample = Sample(now, open_jobs, capped, tuple(backlogs), earnings)
        self.last = sample
        self._publish(sample)
        return sample

    async def _queued(self) -> tuple[int, bool]:
        count, after = 0, None
        while count < OPEN_COUNT_MAX:
            page = await self.store.queued_jobs(QUEUE_PAGE, after)
            count += len(page)
            if len(page) < QUEUE_PAGE:
                return count, False
            after = (page[-1].queued_at, page[-1].job_id)
        return count, True

    async def _backlogs(self, now: float) -> list[Backlog]:
        o = self.outboxes
        out: list[Backlog] = []

        def add(outbox: str, chain: str, created: Sequence[float]) -> None:
            oldest = now - min(created) if created else 0.0
            out.append(Backlog(outbox, chain, len(created), max(0.0, oldest),
                               len(created) >= BACKLOG_MAX))  # fmt: skip

        if o.settlement:
            by_network: dict[str, list[float]] = defaultdict(list)
            for payment, _ in await self.store.due_payments(now, BACKLOG_MAX):
                by_network[payment.network].append(payment.created_at)
            for network in sorted({*o.settlement, *by_network}):
                add("settlement", network, by_network.get(network, []))
        if o.feedback is not None:
            entries = await self.store.feedback_entries([FeedbackStatus.PENDING], BACKLOG_MAX)
            add("feedback", o.feedback, [e.created_at for e in entries])
        if o.anchoring is not None:
            batches = await self.store.receipt_batches(TO_ANCHOR, BACKLOG_MAX)
            add("anchoring", o.anchoring, [b.created_at for b in batches])
        for network in o.payouts:
            payouts = await self.store.open_payouts(network, BACKLOG_MAX)
            add("payouts", network, [p.created_at for p in payouts])
        return out

    def _publish(self, sample: Sample) -> None:
        m = self.metrics
        if m is not None:
            for state in (JobState.QUEUED, JobState.OFFERED, JobState.RUNNING):
                name = state.name.lower()
                m.open_jobs(name).set(sample.open_jobs.get(name, 0))
            for b in sample.backlogs:
                m.backlog(b.outbox, b.chain).set(b.count)
                m.oldest(b.outbox, b.chain).set(b.oldest_age_seconds)
        for listener in self.listeners:
            listener(sample)

    def kick(self) -> None:
        """Samples soon (MIN_GAP_SECONDS after the last sample at the earliest) rather than
        at the next tick."""
        self._wake.set()

    async def _loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.sample()
                failures = 0
            except Exception as e:
                failures += 1
                if self.metrics is not None:
                    self.metrics.samples_failed.inc()
                if failures == 1 or failures % 60 == 0:
                    log.warning("sampling the store for metrics failed (%d in a row): %s",
                                failures, e)  # fmt: skip
            gap = min(MIN_GAP_SECONDS, self.interval)
            await asyncio.sleep(gap)  # kicks meanwhile make one sample
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval - gap):
                    await self._wake.wait()
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="observability-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
