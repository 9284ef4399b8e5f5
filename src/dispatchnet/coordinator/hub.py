"""WorkerHub: connected worker sessions, the handshake, dispatching and the sweeper.

Transport-agnostic: the WorkerService servicer converts messages and calls these methods;
outbound messages go through each session's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from dispatchnet.agent_identity import IdentityVerifier
from dispatchnet.coordinator import matching, verification
from dispatchnet.coordinator.background import BackgroundTasks
from dispatchnet.coordinator.catalogue import TaskCatalogue
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import Failure, Job, JobSpec, Privacy, Result, WorkerKind
from dispatchnet.coordinator.observer import NULL_OBSERVER, Observer
from dispatchnet.coordinator.ports import ReputationSource
from dispatchnet.coordinator.worker_index import WorkerIndex
from dispatchnet.errors import (
    DispatchError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    quoted,
)
from dispatchnet.keys import verify
from dispatchnet.profiles import JobsConfig, WorkersConfig
from dispatchnet.protocol import (
    ACK_DELAY_SECONDS,
    HELLO_CONTEXT,
    MAX_ACKS_PER_MESSAGE,
    MAX_CONCURRENCY,
    MAX_PROGRESS_CHARS_PER_ATTEMPT,
)
from dispatchnet.store.base import Runnable, Store

# A dispatch pass reads the queue in pages of 2x the free slots (within these bounds) and
# looks at no more than DISPATCH_SCAN_MAX jobs.
DISPATCH_PAGE_MIN = 16
DISPATCH_PAGE_MAX = 500
DISPATCH_SCAN_MAX = 5000
# At most this many jobs queued here are remembered between passes (see WorkerHub._fresh).
FRESH_MAX = 10_000
# Messages that carry a job's result; a refused one is answered with a ResultAck.
RESULT_KINDS = frozenset({"completed", "failed"})
# Heartbeats may pass [workers] max_heartbeats_per_second by this factor before earlier
# sessions' intervals are stretched (see WorkerHub.evict_silent).
HEARTBEAT_SLACK = 1.1
EVICTION_CHECKS_PER_WINDOW = 6  # silent-worker checks per [workers] eviction_seconds
# At most this many sessions have their heartbeat intervals stretched at once (by a
# silent-worker check, then by each sweep while more are due). Telling ~4,000 at once (a
# HeartbeatSettings message each), 1-2 s after a wave of 5,000 workers connected, held
# health checks ~0.4 s.
STRETCH_PER_CHECK = 500
# After an internal error ends a session, the worker waits this long before reconnecting.
INTERNAL_ERROR_RETRY_AFTER_SECONDS = 5
# ... and after the store could not record a message (the worker sends it again)
UNAVAILABLE_RETRY_AFTER_SECONDS = 1
# A session's backlog toward its worker (messages in its outbox, acks waiting to ride on
# one): from OUTBOX_HIGH on, the worker's next message is read only once the backlog is
# down to OUTBOX_LOW. A worker that sends and never reads (every result is answered)
# then waits on gRPC's flow control instead of growing the coordinator's memory; a
# healthy worker's backlog is a few messages (at most max_concurrency offers).
OUTBOX_HIGH = 1024
OUTBOX_LOW = 256
log = logging.getLogger("dispatch.hub")


@dataclass(frozen=True)
class Offer:
    job: Job
    time_limit_seconds: int


@dataclass(frozen=True)
class Cancel:
    job_id: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class ResultAck:
    job_id: str
    attempt: int
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class GoAway:
    reason: str
    retry_after_seconds: int = 0


@dataclass(frozen=True)
class HeartbeatSettings:
    interval_seconds: int
    eviction_seconds: int


@dataclass(frozen=True)
class AcksDue:
    """A batched-acks session's acks waited ACK_DELAY_SECONDS with nothing to ride on:
    they go alone (unless a message took them meanwhile; see WorkerSession.take_acks)."""


Outbound = Offer | Cancel | ResultAck | GoAway | HeartbeatSettings | AcksDue


@dataclass(frozen=True)
class WorkerHello:
    public_key: bytes
    kind: WorkerKind
    tasks: frozenset[str]
    llm_models: frozenset[str]
    max_concurrency: int
    version: str = ""
    agent_id: str = ""
    running: tuple[tuple[str, int], ...] = ()  # (job_id, attempt) still running from before
    agent_owner: str = ""  # the verified agent's owner (ownerOf), "" without one
    batched_acks: bool = False  # it reads ConnectResponse.acks


@dataclass(eq=False)
class WorkerSession:
    worker_id: str
    public_key: bytes
    kind: WorkerKind
    tasks: frozenset[str]
    llm_models: frozenset[str]
    max_concurrency: int
    agent_id: str
    session_id: str
    connected_at: float
    last_seen: float
    agent_owner: str = ""  # the verified agent's owner: verified runs need other owners
    # what this session was told in Welcome (see WorkerHub.heartbeat_interval)
    heartbeat_interval: int = 10
    eviction_seconds: float = 30.0
    draining: bool = False
    closed: bool = False
    active: dict[str, int] = field(default_factory=dict)  # job_id -> attempt
    # jobs the worker runs that this session does not hold (taken over elsewhere meanwhile);
    # only jobs this worker was offered: anything else a worker lists is in `ignored`
    foreign: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)
    warned_ignored: bool = False  # their WARNING was logged (once a session)
    outbox: asyncio.Queue[Outbound | None] = field(default_factory=asyncio.Queue)
    # acks wait here for the next message to this worker (see ack)
    batched_acks: bool = False
    acks: list[ResultAck] = field(default_factory=list)
    _acks_due: asyncio.TimerHandle | None = None  # sends an AcksDue after ACK_DELAY_SECONDS
    _acks_queued: bool = False  # an AcksDue is in the outbox
    _room: asyncio.Event = field(default_factory=asyncio.Event)  # backlog below OUTBOX_LOW

    @property
    def backlog(self) -> int:
        """Messages waiting for the worker: the outbox's, and acks not yet sent."""
        return self.outbox.qsize() + len(self.acks)

    async def room(self) -> None:
        """Returns at once while the backlog is under OUTBOX_HIGH; else once it is down
        to OUTBOX_LOW (the worker read), or the session is closed."""
        if self.backlog < OUTBOX_HIGH:
            return
        while self.backlog > OUTBOX_LOW and not self.closed:
            self._room.clear()
            await self._room.wait()

    def _taken(self) -> None:
        if self.backlog <= OUTBOX_LOW:
            self._room.set()

    @property
    def load(self) -> int:
        return len(self.active) + len(self.foreign)

    def send(self, msg: Outbound) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    def ack(self, msg: ResultAck) -> None:
        """Answers a result (call it once the job has left `active`): a ResultAck message,
        or, to a worker that reads ConnectResponse.acks and still runs other jobs of this
        session, an ack for the next message to carry (one message less per job under
        load), sent alone after ACK_DELAY_SECONDS if none goes before. An idle worker's
        acks go at once: nothing else is likely to go its way soon (a crowd of seekers
        with a job each), and a late lone ack would wake it a second time."""
        if not self.batched_acks:
            self.send(msg)
            return
        if self.closed:
            return
        self.acks.append(msg)
        if self._acks_queued:
            return  # an AcksDue waits in the outbox already
        if len(self.acks) >= MAX_ACKS_PER_MESSAGE or not self.active:
            self._due()
        elif self._acks_due is None:
            self._acks_due = asyncio.get_running_loop().call_later(ACK_DELAY_SECONDS, self._due)

    def _due(self) -> None:
        self._cancel_due()
        self._acks_queued = True
        self.send(AcksDue())

    def _cancel_due(self) -> None:
        if self._acks_due is not None:
            self._acks_due.cancel()
            self._acks_due = None

    def take_acks(self) -> list[ResultAck]:
        """The acks waiting, at most MAX_ACKS_PER_MESSAGE, for the message going out now."""
        taken = self.acks[:MAX_ACKS_PER_MESSAGE]
        del self.acks[:MAX_ACKS_PER_MESSAGE]
        self._taken()
        self._acks_queued = False
        if self.acks:  # more than one message holds: the rest go in the next at once
            self._due()
        else:
            self._cancel_due()
        return taken

    def close(self, reason: str, retry_after_seconds: int = 0) -> None:
        if not self.closed:
            self.outbox.put_nowait(GoAway(reason, retry_after_seconds))
            self.end()

    def end(self) -> None:
        """Ends the stream without a GoAway (the stream's status says why)."""
        if not self.closed:
            self.outbox.put_nowait(None)
            self.closed = True
            self._room.set()
            self._cancel_due()  # the worker resends what was not acked

    async def next_outbound(self) -> Outbound | None:
        msg = await self.outbox.get()
        self._taken()
        return msg


class WorkerHub:
    def __init__(
        self,
        jobs: JobService,
        store: Store,
        reputation: ReputationSource,
        coordinator_public_key: bytes,
        workers_cfg: WorkersConfig,
        jobs_cfg: JobsConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        identity: IdentityVerifier | None = None,
        require_registration: bool = False,
        catalogue: TaskCatalogue | None = None,
    ) -> None:
        self.jobs = jobs
        self.catalogue = catalogue  # told the task names every worker declares
        # checks Hello.agent_id claims on chain (None: no chain, agent ids are dropped)
        self.identity = identity
        self.require_registration = require_registration
        self.store = store
        self.reputation = reputation
        self.public_key = coordinator_public_key
        self.workers_cfg = workers_cfg
        self.jobs_cfg = jobs_cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self.sessions: dict[str, WorkerSession] = {}
        self.observer: Observer = NULL_OBSERVER  # metrics and the dashboard (observability/)
        # called with the number of sessions once a worker has connected (the process's
        # heap keeping: memory.HeapFreezer)
        self.session_listeners: list[Callable[[int], None]] = []
        # the same sessions by what they can run and by free slots: refresh a session in it
        # after every change of its load (active, foreign) or draining flag
        self.index: WorkerIndex[WorkerSession] = WorkerIndex()
        self._avoid: dict[str, set[str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # while sessions' heartbeat intervals are stretched: all sessions' heartbeats a
        # second, as evict_silent counted them and the stretching has lowered them since
        self._stretch_rate = 0.0
        self._stretch_seen = 0  # sessions at the last stretch_heartbeats call
        self._tasks = BackgroundTasks()  # unregister_soon's
        # Jobs that became QUEUED in this process since the last dispatch pass. While
        # _backlog is false, every queued job the store has is among them, and a pass
        # matches them without reading the queue; anything unknown (a start, a job left
        # queued by a pass, too many, and every sweep tick for jobs queued by other
        # processes) sets _backlog and the next pass reads the queue from the store.
        self._fresh: deque[Job] = deque()
        self._backlog = True
        self._passing = False  # a dispatch pass is matching jobs (see reserve)
        self._reserved: dict[str, WorkerSession] = {}  # job_id -> session held by reserve
        # progress text (characters) of each job's latest attempt that sent any, across
        # the worker's reconnects (MAX_PROGRESS_CHARS_PER_ATTEMPT): job_id -> (attempt, n)
        self._progress_chars: dict[str, tuple[int, int]] = {}
        jobs.listener = self
        jobs.final_listeners.append(self._job_ended)

    # --- handshake and sessions ---------------------------------------------------------

    @staticmethod
    def new_challenge() -> bytes:
        return secrets.token_bytes(32)

    def authenticate(self, public_key: bytes, nonce: bytes, signature: bytes) -> None:
        if not verify(public_key, HELLO_CONTEXT, nonce + self.public_key, signature):
            raise Unauthenticated("challenge signature does not verify for the hello's public key")

    async def verify_agent(
        self,
        hello: WorkerHello,
        nonce: bytes,
        chain_signature: bytes,
        solana_signature: bytes = b"",
    ) -> WorkerHello:
        """hello with the agent id to put in the session: hello.agent_id once the identity
        verifier has checked the chain proof (and the agent's owner with it), "" for a
        worker without one (refused when registration is required) or when there is no
        chain. Call after authenticate(); hello.agent_id itself must never reach a session
        unverified."""
        if not hello.agent_id:
            if self.require_registration:
                raise Unauthenticated(
                    "this coordinator admits registered workers only: register the worker "
                    "with `dispatch worker register` and connect with its agent id"
                )
            return dataclasses.replace(hello, agent_id="", agent_owner="")
        if self.identity is None:  # no chain to check the claim against: ignored
            return dataclasses.replace(hello, agent_id="", agent_owner="")
        verified = await self.identity.verify(
            hello.agent_id,
            hello.public_key,
            nonce,
            self.public_key,
            chain_signature,
            solana_signature,
        )
        return dataclasses.replace(hello, agent_id=verified.agent_id, agent_owner=verified.owner)

    async def register(self, hello: WorkerHello) -> WorkerSession:
        """Opens a session; hello.agent_id must be the verified one (see verify_agent)."""
        if hello.kind is WorkerKind.SEEKER and hello.llm_models:
            raise InvalidArgument("seekers run TASK jobs only; llm_models must be empty")
        if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
            raise InvalidArgument(f"max_concurrency must be 1-{MAX_CONCURRENCY}")
        now = self.clock()
        worker_id = hello.public_key.hex()
        old = self.sessions.get(worker_id)
        if old is not None:
            old.close("replaced by a newer session of the same worker")
            await self.unregister(old, "replaced")
        session = WorkerSession(
            worker_id=worker_id,
            public_key=hello.public_key,
            kind=hello.kind,
            tasks=hello.tasks,
            llm_models=hello.llm_models,
            max_concurrency=hello.max_concurrency,
            agent_id=hello.agent_id,
            session_id=secrets.token_hex(8),
            connected_at=now,
            last_seen=now,
            agent_owner=hello.agent_owner,
            batched_acks=hello.batched_acks,
        )
        self._set_heartbeat(session, self.heartbeat_interval())
        self.sessions[worker_id] = session
        self.observer.worker_connected(worker_id, hello.kind)
        try:
            await self._open(session, hello, now)
        except BaseException:
            # (the store failed): no session is left behind to be evicted later; what it
            # resumed stays the worker's, to resume again where it reconnects
            if self.sessions.get(worker_id) is session:
                del self.sessions[worker_id]
                self.observer.worker_disconnected(worker_id, hello.kind, "failed")
            session.closed = True
            session.active.clear()
            raise
        self.index.add(session)
        for listener in self.session_listeners:
            listener(len(self.sessions))
        log.info("worker %s… connected (%s)", worker_id[:12], hello.kind.name.lower(),
                 extra={"worker_id": worker_id})  # fmt: skip
        self.kick()
        return session

    async def _open(self, session: WorkerSession, hello: WorkerHello, now: float) -> None:
        """What registering a session stores: the worker seen, its tasks, and the jobs its
        hello says it still runs, resumed where they still wait for it."""
        worker_id = session.worker_id
        await self.store.record_worker_seen(worker_id, int(hello.kind), now, hello.agent_id)
        if self.catalogue is not None:
            await self.catalogue.declared(hello.tasks)
        await self.reputation.warm(worker_id)
        # one read for the whole (bounded) list; a write only for what really resumes
        ids = [job_id for job_id, _ in hello.running]
        held = await self.store.held_attempts(worker_id, ids) if ids else set()
        for job_id, attempt in hello.running:
            if (job_id, attempt) not in held:
                session.ignored.add(job_id)
            elif await self.jobs.resume(job_id, attempt, worker_id) is not None:
                session.active[job_id] = attempt
            else:
                session.foreign.add(job_id)
        self._log_ignored(session, session.ignored)
        await self.jobs.worker_returned(worker_id, set(session.active))

    async def unregister(self, session: WorkerSession, reason: str) -> None:
        """Forgets a session and requeues what it held (except while the coordinator
        stops: the jobs then stay held, see JobService.recover); safe to call more than
        once."""
        self.index.remove(session)
        if self.sessions.get(session.worker_id) is session:
            del self.sessions[session.worker_id]
            self.observer.worker_disconnected(session.worker_id, session.kind, reason)
        elif session.closed and not session.active:
            return
        session.closed = True
        held = dict(session.active)
        session.active.clear()
        if self._stopping:
            # the coordinator is going down: the jobs stay the workers', and the next
            # start holds them for a while (JobService.recover), as after a crash
            log.info("worker %s… gone (coordinator stopping)", session.worker_id[:12])
            return
        await self.jobs.worker_lost(session.worker_id, held, f"worker_{reason}")
        log.info("worker %s… gone (%s)", session.worker_id[:12], reason)

    def unregister_soon(self, session: WorkerSession, reason: str) -> None:
        """unregister in a task of its own (for a stream's cleanup, which must not wait):
        the session is gone from matching at once, its jobs are requeued by the task."""
        self.index.remove(session)
        self._tasks.start(self.unregister(session, reason), "unregistering a worker")

    async def drain_tasks(self) -> None:
        """Waits for the unregister_soon tasks (before the store closes)."""
        await self._tasks.drain()

    def touch(self, session: WorkerSession) -> None:
        """Notes that the worker is alive."""
        session.last_seen = self.clock()

    async def heartbeat(self, session: WorkerSession, running: list[str]) -> None:
        """A heartbeat with the job ids the worker runs: reconciles the load it carries
        beyond what this session holds. Only jobs this worker was offered count; other ids
        are ignored (and logged once)."""
        self.touch(session)
        ids = set(running) - set(session.active)
        known = ids & session.foreign
        new = ids - known - session.ignored
        held = set()
        if new:
            held = {j for j, _ in await self.store.held_attempts(session.worker_id, sorted(new))}
            self._log_ignored(session, new - held)
        # what changed while the store answered (an offer, a result) wins over this list
        ids -= set(session.active)
        session.foreign = (known | held) & ids
        session.ignored = ((ids & session.ignored) | (new - held)) & ids
        self.index.refresh(session)

    @staticmethod
    def _log_ignored(session: WorkerSession, ids: set[str]) -> None:
        """A WARNING the first time in a session (a worker that lists made-up ids in
        every heartbeat must not flood the log), DEBUG after."""
        if ids:
            level = logging.DEBUG if session.warned_ignored else logging.WARNING
            session.warned_ignored = True
            log.log(
                level,
                "worker %s… lists %d job(s) it was never offered (ignored): %s",
                session.worker_id[:12],
                len(ids),
                ", ".join(repr(i) for i in sorted(ids)[:3]) + (", …" if len(ids) > 3 else ""),
            )

    def drain(self, session: WorkerSession) -> None:
        session.draining = True
        self.index.refresh(session)

    # --- messages from workers ----------------------------------------------------------

    async def offer_response(
        self, s: WorkerSession, job_id: str, attempt: int, accept: bool, reason: str
    ) -> None:
        self.touch(s)
        if accept:
            if await self.jobs.accept(job_id, attempt, s.worker_id) is None:
                s.send(Cancel(job_id, attempt, "offer no longer valid"))
        else:
            self._avoid_for(s, job_id, attempt)
            await self.jobs.reject(job_id, attempt, s.worker_id, reason)

    async def progress(
        self, s: WorkerSession, job_id: str, attempt: int, text: str, fraction: float
    ) -> None:
        self.touch(s)
        if s.active.get(job_id) == attempt:  # counted only for what it holds
            counted, chars = self._progress_chars.get(job_id, (attempt, 0))
            chars = len(text) + (chars if counted == attempt else 0)
            if chars > MAX_PROGRESS_CHARS_PER_ATTEMPT:
                raise InvalidArgument(
                    f"progress text of job {quoted(job_id)} passed "
                    f"{MAX_PROGRESS_CHARS_PER_ATTEMPT} characters in one attempt"
                )
            self._progress_chars[job_id] = (attempt, chars)
        await self.jobs.progress(job_id, attempt, s.worker_id, text, fraction)

    async def completed(
        self,
        s: WorkerSession,
        job_id: str,
        attempt: int,
        result: Result,
        body: bytes,
        signature: bytes,
    ) -> None:
        self.touch(s)
        s.foreign.discard(job_id)
        self.index.refresh(s)
        held = s.active.get(job_id) == attempt  # a refused result takes it from s.active
        ok, reason = await self.jobs.complete(
            job_id,
            attempt,
            s.worker_id,
            s.public_key,
            result,
            body,
            signature,
            worker_agent_id=s.agent_id,  # verified at Connect; the receipt must carry it
            worker_agent_owner=s.agent_owner,
        )
        if not ok and held:
            self._avoid.setdefault(job_id, set()).add(s.worker_id)
        s.ack(ResultAck(job_id, attempt, ok, reason))
        self.kick()

    async def failed(
        self, s: WorkerSession, job_id: str, attempt: int, failure: Failure, retryable: bool
    ) -> None:
        self.touch(s)
        s.foreign.discard(job_id)
        self.index.refresh(s)
        if retryable:
            self._avoid_for(s, job_id, attempt)
        ok = await self.jobs.fail(job_id, attempt, s.worker_id, failure, retryable)
        s.ack(ResultAck(job_id, attempt, ok, "" if ok else "stale"))

    async def message_failed(
        self, s: WorkerSession, kind: str, job_id: str, attempt: int, error: Exception
    ) -> None:
        """Handling one worker message (`kind`: its name in the protocol) raised `error`.

        A typed error refusing a result (completed, failed) is answered with a ResultAck
        refusal carrying its message, and the attempt is given up (requeued like a
        retryable failure); the session goes on. A typed error on any other message ends
        the session with a GoAway carrying its message. Any other error is a bug: it is
        logged once with its traceback, and the session ends with a GoAway naming the
        message (the worker sends unacknowledged results again when it reconnects)."""
        about = f"{kind} for job {quoted(job_id)}" if job_id else kind
        if isinstance(error, Unavailable):
            # the store could not answer (the database restarting): nothing is refused;
            # the worker keeps its unacknowledged result and sends it again when it
            # reconnects, here or at another coordinator
            log.warning("%s from worker %s… not recorded: %s", about, s.worker_id[:12],
                        error.message)  # fmt: skip
            s.close(f"{about} not recorded now: {error.message}", UNAVAILABLE_RETRY_AFTER_SECONDS)
            return
        if isinstance(error, DispatchError):
            if kind not in RESULT_KINDS or not job_id:
                s.close(f"{about} refused: {error.message}")
                return
            try:
                await self._refuse_result(s, job_id, attempt, error.message)
                return
            except Exception as e:  # giving the attempt up failed too: a bug
                error = e
        log.error(
            "internal error handling %s from worker %s (attempt %d)",
            about,
            s.worker_id,
            attempt,
            exc_info=error,
        )
        s.close(
            f"internal error handling {about} (details are in the coordinator's log)",
            INTERNAL_ERROR_RETRY_AFTER_SECONDS,
        )

    async def _refuse_result(
        self, s: WorkerSession, job_id: str, attempt: int, reason: str
    ) -> None:
        s.foreign.discard(job_id)
        self.index.refresh(s)
        self._avoid_for(s, job_id, attempt)
        await self.jobs.fail(job_id, attempt, s.worker_id, Failure("result_refused", reason), True)
        s.ack(ResultAck(job_id, attempt, False, reason))

    def _avoid_for(self, s: WorkerSession, job_id: str, attempt: int) -> None:
        """The job is not offered to this worker again (it refused or gave up the attempt
        it holds). Only for an attempt this session holds: ids a worker makes up, or of
        attempts no longer its, leave nothing behind (the entry goes when the job ends)."""
        if s.active.get(job_id) == attempt:
            self._avoid.setdefault(job_id, set()).add(s.worker_id)

    # --- JobListener --------------------------------------------------------------------

    def job_queued(self, job: Job) -> None:
        if len(self._fresh) < FRESH_MAX:
            self._fresh.append(job)
        else:
            self._backlog = True  # too many to remember: the store has them
        self.kick()

    def job_released(
        self, job: Job, worker_id: str, attempt: int, reason: str, tell_worker: bool
    ) -> None:
        s = self.sessions.get(worker_id)
        if s is not None and s.active.get(job.job_id) == attempt:
            del s.active[job.job_id]
            self.index.refresh(s)
            if tell_worker:
                s.send(Cancel(job.job_id, attempt, reason))
        self.kick()

    def _job_ended(self, job: Job) -> None:
        """A job reached a final state (whoever held it, if anyone): what was kept about
        it goes."""
        self._avoid.pop(job.job_id, None)
        self._progress_chars.pop(job.job_id, None)

    async def reserve(self, job: Job) -> str | None:
        # FIFO: only while no older job may wait (nothing queued here since the last pass,
        # no backlog in the store, no pass matching right now)
        if self._backlog or self._fresh or self._passing or self._stopping:
            return None
        allowed = None
        if job.spec.privacy is Privacy.PRIVATE:
            allowed = await self.store.paired_workers(job.client_id)
            if self._backlog or self._fresh or self._passing:
                return None
        session = self._choose(job, allowed)
        if session is None or job.job_id in session.active:
            return None
        session.active[job.job_id] = job.attempts + 1
        self.index.refresh(session)
        self._reserved[job.job_id] = session
        return session.worker_id

    def offer_now(self, job_id: str, offering: Job) -> bool:
        session = self._reserved[job_id]
        if session.closed or session.active.get(job_id) != offering.attempts:
            return False
        session.send(Offer(offering, self.jobs_cfg.time_limit_seconds))
        return True

    async def reserved(self, job_id: str, offered: Job | None, sent: bool) -> None:
        session = self._reserved.pop(job_id)
        if offered is None:
            attempt = session.active.pop(job_id, None)
            if attempt is not None:
                self.index.refresh(session)
                self.kick()  # the slot is free again
            if sent and not session.closed:  # the job was not made: its offer is void
                session.send(Cancel(job_id, attempt or 1, "the job was not committed"))
            return
        if not sent or session.closed or session.active.get(job_id) != offered.attempts:
            # the worker went away (or gave the job up) before or while the job was written
            session.active.pop(job_id, None)
            self.index.refresh(session)
            await self.jobs.requeue(offered, "worker_gone", tell_worker=False)

    # --- dispatching --------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def _runnable(self) -> Runnable:
        return Runnable(task_names=self.index.free_task_names(), llm=self.index.any_free_llm())

    async def _queued(self, free: int) -> AsyncGenerator[Job, None]:
        """Queued jobs some free worker could run, oldest first: the fresh ones alone when
        they are all there is (see _fresh), else from the store a page at a time, so that
        jobs nobody can take do not hold up the ones behind them."""
        if not self._backlog:
            fresh, self._fresh = list(self._fresh), deque()
            for job in fresh:
                yield job
            return
        seen = len(self._fresh)  # jobs queued from here on may be missing from the pages
        self._backlog = False
        runnable, after, scanned = self._runnable(), None, 0
        page_size = min(DISPATCH_PAGE_MAX, max(DISPATCH_PAGE_MIN, 2 * free))
        while True:
            if scanned >= DISPATCH_SCAN_MAX:
                self._backlog = True
                return
            page = await self.store.queued_jobs(page_size, after, runnable)
            if scanned == 0:
                for _ in range(min(seen, len(self._fresh))):
                    self._fresh.popleft()  # the store's pages have them
            for job in page:
                yield job
            if len(page) < page_size:
                return
            scanned += len(page)
            after = (page[-1].queued_at, page[-1].job_id)

    async def dispatch_once(self) -> int:
        """Matches queued jobs to free workers and offers them, all offers of the pass
        at once (so the store commits them together). A chosen worker's slot is held
        for the job while its offer is written."""
        free = self.index.free_slots
        if free <= 0:
            return 0
        self._passing = True
        try:
            chosen, left = await self._match(free)
        finally:
            self._passing = False
        if left:
            self._backlog = True
        if not chosen:
            return 0
        return await self._offer_chosen(chosen)

    async def _match(self, free: int) -> tuple[list[tuple[Job, WorkerSession]], bool]:
        """Queued jobs (oldest first) matched to free workers, each worker's slot held for
        its job; and whether a queued job was left (the next pass reads the store)."""
        chosen: list[tuple[Job, WorkerSession]] = []
        paired: dict[str, set[str]] = {}
        left = False
        async with contextlib.aclosing(self._queued(free)) as queued:  # closed at the break
            async for job in queued:
                if len(chosen) >= free:
                    left = True
                    break
                allowed = None
                if job.spec.privacy is Privacy.PRIVATE:
                    if job.client_id not in paired:
                        paired[job.client_id] = await self.store.paired_workers(job.client_id)
                    allowed = paired[job.client_id]
                session = self._choose(job, allowed)
                if session is None:
                    left = True
                    continue
                if job.job_id in session.active:
                    # a stale copy (e.g. fresh and on a page read since): the worker has it,
                    # and the failed offer's clean-up below must not forget that it does
                    continue
                session.active[job.job_id] = job.attempts + 1  # held while it is written
                self.index.refresh(session)
                chosen.append((job, session))
        return chosen, left

    async def _offer_chosen(self, chosen: list[tuple[Job, WorkerSession]]) -> int:
        moved = await asyncio.gather(*(self.jobs.offer(j, s.worker_id) for j, s in chosen))
        offered = 0
        for (job, session), m in zip(chosen, moved, strict=True):
            if session.active.get(job.job_id) == job.attempts + 1 and m is None:
                del session.active[job.job_id]  # someone else got there first
                self.index.refresh(session)
            if m is None:
                continue
            if session.closed or session.active.get(job.job_id) != m.attempts:
                # the worker went away (or gave the job up) while the offer was written
                session.active.pop(job.job_id, None)
                await self.jobs.requeue(m, "worker_gone", tell_worker=False)
                continue
            session.send(Offer(m, self.jobs_cfg.time_limit_seconds))
            offered += 1
        return offered

    def _choose(self, job: Job, allowed: set[str] | None) -> WorkerSession | None:
        """A worker for job among the free ones able to run it (paired ones only when
        `allowed` is given), steering clear of those it avoids unless nobody else can."""
        spec = job.spec
        pool = self.index.free.for_spec(spec)
        if pool is None:
            return None
        members: list[WorkerSession] | None = None
        if allowed is not None and len(allowed) < len(pool):
            members = [s for w in allowed if (s := self.sessions.get(w)) is not None]
        elif len(pool) <= matching.SCAN_MAX:
            members = list(pool)
        if members is not None:
            members.sort(key=self.index.order)  # the order a scan of all sessions had
        some = members if members is not None else pool
        kinds = {s.kind for s in members} if members is not None else set(pool.kinds)
        avoid = self._avoid.get(job.job_id) or set()

        def eligible(s: WorkerSession) -> bool:
            # a verified job's next run goes to a worker independent of its earlier runs
            return matching.eligible(spec, s, allowed) and verification.independent(
                job, s.worker_id, s.agent_id, s.agent_owner
            )

        return matching.choose_among(
            spec,
            some,
            len(some),
            lambda: pool.pick(self.rng) if members is None else self.rng.choice(members),
            kinds,
            lambda s: eligible(s) and s.worker_id not in avoid,
            eligible,
            self.reputation.score,
            self.rng,
        )

    def heartbeat_interval(self, sessions: int | None = None) -> int:
        """The heartbeat interval for a worker connecting now (or, given `sessions`, for
        that many connected): the profile's, stretched so that all connected workers
        together send at most [workers] max_heartbeats_per_second."""
        cfg = self.workers_cfg
        if cfg.max_heartbeats_per_second <= 0:
            return cfg.heartbeat_interval_seconds
        n = len(self.sessions) + 1 if sessions is None else sessions
        needed = math.ceil(n / cfg.max_heartbeats_per_second)
        return max(cfg.heartbeat_interval_seconds, needed)

    def _set_heartbeat(self, session: WorkerSession, interval: int) -> None:
        """The session's heartbeat interval, and its eviction time scaled with it."""
        session.heartbeat_interval = interval
        scale = interval / max(1, self.workers_cfg.heartbeat_interval_seconds)
        session.eviction_seconds = self.workers_cfg.eviction_seconds * scale

    async def evict_silent(self) -> None:
        """Evicts the sessions silent for longer than their eviction time; then, when the
        sessions given short intervals while few workers were connected now send more
        heartbeats together than [workers] max_heartbeats_per_second, starts stretching
        theirs (stretch_heartbeats)."""
        now = self.clock()
        rate = 0.0
        for s in list(self.sessions.values()):
            if s.last_seen < now - s.eviction_seconds:
                s.close("evicted: no heartbeat")
                await self.unregister(s, "evicted")
            else:
                rate += 1 / max(1, s.heartbeat_interval)
        cap = self.workers_cfg.max_heartbeats_per_second
        self._stretch_rate = rate if cap > 0 and rate > cap * HEARTBEAT_SLACK else 0.0
        self._stretch_seen = len(self.sessions)
        self.stretch_heartbeats()

    def stretch_heartbeats(self) -> None:
        """While a stretch is due (see evict_silent): gives the next STRETCH_PER_CHECK
        sessions, the earliest connected (the shortest intervals) first, whose interval is
        shorter than a worker connecting now would get, that interval (a HeartbeatSettings
        message each), until all sessions together send at most the cap (with its slack).
        The hub calls it at every sweep until then (skipping sweeps while a wave of workers
        is still connecting), so that after a wave of 10,000 seekers the ~9,100 due are
        told within ~25 s; one batch per silent-worker check took ~80 s, while the early
        sessions heartbeated at up to twice the cap."""
        cap = self.workers_cfg.max_heartbeats_per_second * HEARTBEAT_SLACK
        if self._stretch_rate <= cap:
            return
        grown, self._stretch_seen = len(self.sessions) - self._stretch_seen, len(self.sessions)
        if grown > STRETCH_PER_CHECK:
            return  # a wave is still connecting: stretched now, they would be again after it
        target = self.heartbeat_interval(len(self.sessions))
        told = 0
        for s in self.sessions.values():
            if s.heartbeat_interval < target:
                self._stretch_rate -= 1 / max(1, s.heartbeat_interval) - 1 / target
                self._set_heartbeat(s, target)
                s.send(HeartbeatSettings(target, int(s.eviction_seconds)))
                told += 1
                if told == STRETCH_PER_CHECK or self._stretch_rate <= cap:
                    return
        self._stretch_rate = 0.0

    def eligible_count(self, spec: JobSpec) -> int:
        return self.index.able(spec)

    async def run(self) -> None:
        """Dispatch on every kick; sweep leases, queue timeouts and silent workers periodically."""
        interval = self.jobs_cfg.sweep_interval_seconds
        # Silent workers are looked for less often than leases: a walk over every session
        # (thousands of seekers) each second was most of an idle coordinator's Python. An
        # eviction then comes at most EVICTION_CHECKS_PER_WINDOW-th of its time late.
        evict_every = max(interval, self.workers_cfg.eviction_seconds / EVICTION_CHECKS_PER_WINDOW)
        next_sweep = next_evict = 0.0
        while not self._stopping:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self.clock() >= next_sweep:
                    self._backlog = True  # jobs queued by other processes, if any
                    await self.jobs.sweep()
                    next_sweep = self.clock() + interval
                    if self.clock() >= next_evict:
                        await self.evict_silent()
                        next_evict = self.clock() + evict_every
                    else:
                        self.stretch_heartbeats()
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed; retrying on the next tick")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="dispatch-hub")

    async def stop(self) -> None:
        self._stopping = True
        self.kick()
        for s in list(self.sessions.values()):
            s.close("coordinator shutting down", retry_after_seconds=1)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def snapshot(self, kind: WorkerKind | None) -> list[tuple[WorkerSession, float]]:
        return [
            (s, self.reputation.score(s.worker_id))
            for s in self.sessions.values()
            if kind is None or s.kind is kind
        ]
