"""Live job events in this process: wake-ups for watchers (JobNotifier) and each running
job's recent events in memory (LiveEvents), so progress reaches watchers without a store
write per chunk. Durable history lives in the store; watchers fall back to it for anything
memory no longer (or never) held, and re-read it periodically, so events written by
another coordinator process are seen too."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field, replace

from dispatchnet.coordinator.models import Event, Job, JobState

# What a job's memory keeps of events already in the store, for watchers a little behind
# (older ones are read from the store).
TAIL_EVENTS = 256
TAIL_CHARS = 64 * 1024
# Jobs nobody watches any more (or yet) whose events and last state stay in memory, most
# recently changed kept (a paid job only while open), so that a WatchJob of a job
# committed or moved here lately needs no store read: at most this many, holding at most
# RECENT_BYTES (spec, result and event text), each at most RECENT_JOB_BYTES (a larger one
# is not kept).
RECENT_JOBS = 4096
RECENT_BYTES = 16 * 1024 * 1024
RECENT_JOB_BYTES = 16 * 1024


class JobNotifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        for ev in self._waiters.get(job_id, ()):
            ev.set()

    def subscribe(self, job_id: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters[job_id].add(ev)
        return ev

    def unsubscribe(self, job_id: str, ev: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self._waiters[job_id]

    def watched(self, job_id: str) -> bool:
        """Whether anyone in this process watches the job."""
        return bool(self._waiters.get(job_id))


@dataclass
class _Tail:
    """One job's events in memory: every event with a sequence above `floor`, in order
    with no gap; those above `durable` (progress only) are not in the store yet."""

    floor: int
    durable: int
    state: JobState
    events: deque[Event] = field(default_factory=deque)
    chars: int = 0  # text held by events
    pending_chars: int = 0  # text held by events above durable
    pending_since: float = 0.0  # clock time of the oldest event above durable
    timer: asyncio.TimerHandle | None = None
    job: Job | None = None  # the job as its last state change here left it

    @property
    def last(self) -> int:
        return self.events[-1].sequence if self.events else self.floor

    @property
    def pending(self) -> int:
        return self.last - self.durable


class LiveEvents:
    """Recent events of the jobs that sent progress or are watched, by job (so watchers
    of this process read neither progress nor state changes from the store). Holds no
    store: JobService decides when pending progress is written (take_pending / flushed)
    and tells this about state changes it committed (state)."""

    def __init__(self) -> None:
        self._tails: dict[str, _Tail] = {}
        # released tails kept for later watchers (see RECENT_JOBS), oldest first, with
        # the bytes each counts; a tail that changes again leaves it until released again
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._recent_bytes = 0

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._tails

    def last(self, job_id: str) -> int:
        """The job's last sequence held in memory (0: none)."""
        tail = self._tails.get(job_id)
        return tail.last if tail is not None else 0

    def progress(self, event: Event, durable_last: int, now: float) -> Event:
        """Appends a progress event with the next sequence number: after the store's last
        (durable_last) and after anything in memory. Returns the numbered event."""
        self._in_use(event.job_id)
        tail = self._tails.get(event.job_id)
        if tail is None or durable_last > tail.last:
            # first progress, or the store moved on without us (another process):
            # memory restarts at the store's end
            self._drop(event.job_id)
            tail = self._tails[event.job_id] = _Tail(durable_last, durable_last, event.state)
        numbered = Event(**{**event.__dict__, "sequence": tail.last + 1})
        if tail.pending == 0:
            tail.pending_since = now
        self._append(tail, numbered)
        tail.pending_chars += len(numbered.text)
        return numbered

    def state(self, event: Event, job: Job, watched: bool) -> None:
        """A state change committed to the store as event (its sequence set), leaving
        the job as `job`: appended when memory holds the job's events up to the one
        before; otherwise memory of the job restarts with it (when the job is held in
        memory already, or `watched`: someone in this process watches it)."""
        self._in_use(event.job_id)
        tail = self._tails.get(event.job_id)
        if tail is None and not watched:
            return
        if tail is None or event.sequence != tail.last + 1 or tail.pending:
            self._drop(event.job_id)
            tail = self._tails[event.job_id] = _Tail(
                event.sequence - 1, event.sequence - 1, event.state
            )
        tail.state = event.state
        tail.durable = event.sequence
        tail.job = job
        self._append(tail, event)

    def known(self, job_id: str) -> Job | None:
        """The job as its last state change here left it, with every event of it in
        memory from its first (None: not so held), for a new watcher: held for it until
        released again."""
        tail = self._tails.get(job_id)
        if tail is None or tail.job is None or tail.floor != 0 or _changes_later(tail):
            return None
        self._in_use(job_id)
        job = tail.job
        return job if job.last_sequence >= tail.last else replace(job, last_sequence=tail.last)

    def job(self, job_id: str) -> Job | None:
        """The job as its last state change in this process left it (None: not held)."""
        tail = self._tails.get(job_id)
        return tail.job if tail is not None else None

    def after(self, job_id: str, sequence: int) -> list[Event] | None:
        """The job's events after `sequence` from memory; None when memory cannot tell
        (the job has no events in memory, or some after `sequence` are only in the store)."""
        tail = self._tails.get(job_id)
        if tail is None or sequence < tail.floor:
            return None
        start = sequence - tail.floor  # events are consecutive from floor + 1
        return list(itertools.islice(tail.events, start, None))

    def pending(self, job_id: str) -> tuple[int, int, float]:
        """(events, text characters, clock time of the oldest) not in the store yet."""
        tail = self._tails.get(job_id)
        if tail is None or not tail.pending:
            return 0, 0, 0.0
        return tail.pending, tail.pending_chars, tail.pending_since

    def take_pending(self, job_id: str) -> list[Event]:
        """The job's progress events not in the store yet, oldest first (stay pending
        until flushed)."""
        tail = self._tails.get(job_id)
        if tail is None or not tail.pending:
            return []
        return list(itertools.islice(tail.events, len(tail.events) - tail.pending, None))

    def flushed(self, job_id: str, through: int) -> None:
        """Events up to `through` are in the store (or given up); memory may let them go."""
        tail = self._tails.get(job_id)
        if tail is None:
            return
        tail.durable = max(tail.durable, min(through, tail.last))
        if not tail.pending:
            tail.pending_chars = 0
            if tail.timer is not None:
                tail.timer.cancel()
                tail.timer = None
        self._trim(tail)

    def set_timer(self, job_id: str, timer: asyncio.TimerHandle) -> bool:
        """Keeps the flush timer of the job's pending events; False (timer cancelled)
        when one is set already or nothing is pending."""
        tail = self._tails.get(job_id)
        if tail is None or not tail.pending or tail.timer is not None:
            timer.cancel()
            return False
        tail.timer = timer
        return True

    def with_pending(self) -> list[str]:
        """Jobs with progress not in the store yet."""
        return [job_id for job_id, tail in self._tails.items() if tail.pending]

    def release(self, job_id: str) -> None:
        """No watcher needs the job now: when nothing of it is pending and it no longer
        runs, it is kept among the recent jobs (RECENT_JOBS) while it is small enough,
        else forgotten (watchers of a forgotten job read the store)."""
        tail = self._tails.get(job_id)
        if tail is None or tail.pending or tail.state is JobState.RUNNING:
            return
        self._in_use(job_id)
        size = tail.chars + _job_bytes(tail.job)
        if tail.job is None or tail.floor != 0 or _changes_later(tail) or size > RECENT_JOB_BYTES:
            self._drop(job_id)
            return
        self._recent[job_id] = size
        self._recent_bytes += size
        while len(self._recent) > RECENT_JOBS or self._recent_bytes > RECENT_BYTES:
            old, old_size = self._recent.popitem(last=False)
            self._recent_bytes -= old_size
            self._drop(old)

    def forget(self, job_id: str) -> None:
        """Forgets the job unless something of it is pending (its store row changed
        elsewhere: memory may be behind)."""
        tail = self._tails.get(job_id)
        if tail is not None and not tail.pending:
            self._drop(job_id)

    def jobs(self) -> int:
        return len(self._tails)

    def _in_use(self, job_id: str) -> None:
        """The job leaves the recent jobs (it changes, or someone watches it)."""
        size = self._recent.pop(job_id, None)
        if size is not None:
            self._recent_bytes -= size

    def _append(self, tail: _Tail, event: Event) -> None:
        tail.events.append(event)
        tail.chars += len(event.text)
        self._trim(tail)

    def _trim(self, tail: _Tail) -> None:
        while (
            tail.events
            and tail.events[0].sequence <= tail.durable
            and (len(tail.events) > TAIL_EVENTS or tail.chars > TAIL_CHARS)
        ):
            old = tail.events.popleft()
            tail.chars -= len(old.text)
            tail.floor = old.sequence

    def _drop(self, job_id: str) -> None:
        self._in_use(job_id)
        tail = self._tails.pop(job_id, None)
        if tail is not None and tail.timer is not None:
            tail.timer.cancel()


def _changes_later(tail: _Tail) -> bool:
    """Whether the held job may still change in the store without a move here: a final
    job's payment settles (or is refunded) afterwards. An unpaid final job never changes
    again, so it is held like an open one (a watch that starts after a trivial job ended,
    the usual case, reads nothing)."""
    return tail.state.final and tail.job is not None and tail.job.payment.status != "none"


def _job_bytes(job: Job | None) -> int:
    """What a job held in memory counts besides its events: its spec and its result."""
    if job is None:
        return 0
    result = job.result.output if job.result is not None else b""
    return len(job.spec.spec_bytes) + len(result) + 512
