"""The worker runtime: the client side of WorkerService.Connect.

A Worker keeps one Connect stream open at a time, reconnecting with jittered exponential
backoff (to the next of its coordinator addresses when it has several: failover), runs the
TASK jobs it accepts concurrently, and reports each result with a signed receipt body.
Results are kept until the coordinator acknowledges them and are resent after a reconnect,
their receipt bodies signed again for the coordinator of the new session when it is
another one (a receipt names the coordinator that countersigns it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, NoReturn, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

import dispatchnet
from dispatch.v1 import common_pb2, receipt_pb2, worker_pb2, worker_pb2_grpc
from dispatchnet.agent_identity import solana_link_message
from dispatchnet.keys import KeyPair
from dispatchnet.observability import logs, tracing
from dispatchnet.protocol import (
    HELLO_CONTEXT,
    HTTP2_CHANNEL_OPTIONS,
    MAX_CONCURRENCY,
    MAX_FAILURE_CODE_CHARS,
    MAX_FAILURE_MESSAGE_CHARS,
    MAX_PROGRESS_TEXT_CHARS,
    MAX_RUNNING_JOBS,
    MAX_VERSION_CHARS,
    coordinator_addresses,
)
from dispatchnet.receipts.core import RECEIPT_VERSION, serialize_body, sha256, sign_body
from dispatchnet.sealing import (
    SEALED_CONTENT_TYPE,
    OpenedInput,
    SealError,
    open_input,
    private_hash,
    seal_output,
)
from dispatchnet.worker.executors import Executor, default_executors
from dispatchnet.worker.tasks import TaskError, TaskOutput

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

HANDSHAKE_TIMEOUT_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10
# Heartbeats drift apart: workers that connected together (a reconnect wave after a
# coordinator restart) would otherwise heartbeat together, every interval, for good. A
# session's first heartbeat comes after its interval, each next after 0.9-1.1 of it: on
# average on time (the rate the coordinator counts on), never later than 1.1 intervals
# (the eviction time is several).
HEARTBEAT_JITTER = 0.1

_KINDS = {"seeker": common_pb2.WORKER_KIND_SEEKER, "desktop": common_pb2.WORKER_KIND_DESKTOP}

ConnectRequest = worker_pb2.ConnectRequest
ConnectCall = grpc.aio.StreamStreamCall[ConnectRequest, worker_pb2.ConnectResponse]
JobKey = tuple[str, int]


# One INFO line per finished job while jobs finish at most JOB_LINES_PER_SECOND on average
# (bursts of JOB_LINES_BURST); beyond that the lines left out are counted, and one summary
# line per JOB_SUMMARY_SECONDS says how many jobs finished meanwhile. A busy worker's log
# stays readable, and a line per job (~40 us of this process's CPU each, formatting and
# writing) is not paid hundreds of times a second.
JOB_LINES_PER_SECOND = 1.0
JOB_LINES_BURST = 10
JOB_SUMMARY_SECONDS = 10.0


class JobLines:
    """The worker's per-job log lines, rate limited (see JOB_LINES_PER_SECOND)."""

    def __init__(
        self,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
        per_second: float = JOB_LINES_PER_SECOND,
        burst: int = JOB_LINES_BURST,
        summary_seconds: float = JOB_SUMMARY_SECONDS,
    ) -> None:
        self.log = log
        self.clock = clock
        self.per_second = per_second
        self.burst = burst
        self.summary_seconds = summary_seconds
        self._tokens = float(burst)
        self._at = clock()
        self._left_out = {"completed": 0, "failed": 0}
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def finished(self, key: JobKey, outcome: str, detail: str = "") -> None:
        """Job `key` ended: `outcome` "completed" or "failed" (`detail`: the failure code)."""
        if not self.log.isEnabledFor(logging.INFO):
            return
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.log.info(
                "job %s attempt %d %s%s", *key, outcome, f": {detail}" if detail else "",
                extra={"job_id": key[0]},
            )  # fmt: skip
            return
        if not any(self._left_out.values()):
            self._since = now
            self._timer = asyncio.get_running_loop().call_later(self.summary_seconds, self.flush)
        self._left_out[outcome] += 1

    def flush(self) -> None:
        """Logs the summary of the lines left out, if any (at the end of each period, and
        when the worker stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, failed = self._left_out["completed"], self._left_out["failed"]
        if done or failed:
            self._left_out = {"completed": 0, "failed": 0}
            self.log.info(
                "%d more jobs completed and %d failed in the last %.0fs (a line per job "
                "again below %g a second)",
                done, failed, self.clock() - self._since, self.per_second,
            )  # fmt: skip


class SessionEnded(Exception):
    """A session ended without a transport error; retry_after is a GoAway's minimum delay."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _now() -> Timestamp:
    # not Timestamp.GetCurrentTime(): it goes through a datetime in Python (~5 us a call,
    # two per job), this is one C constructor
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


class Worker:
    """A worker process: connects to a coordinator, runs offered jobs, reports results.

    coordinator: one address (HOST:PORT), several comma-separated, or a list: coordinators
    sharing one database. The worker starts with the one at `first` (an index, wrapped)
    and, whenever a session ends (the coordinator died, went away, or the stream broke),
    reconnects to the next one with backoff, proves its key there again and resumes the
    jobs it still runs.

    offer_filter, if given, is a device policy consulted for each offer that passes the
    built-in checks (draining, unsupported, duplicate, busy): it returns a rejection reason
    (e.g. "battery_low"), or "" to accept.
    """

    def __init__(
        self,
        coordinator: str | Sequence[str],
        key: KeyPair,
        kind: Literal["seeker", "desktop"] = "seeker",
        max_concurrency: int = 4,
        executors: list[Executor] | None = None,
        version: str = dispatchnet.__version__,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        log: logging.Logger | None = None,
        offer_filter: Callable[[worker_pb2.JobOffer], str] | None = None,
        agent_id: str = "",
        chain_key: str = "",
        solana_key: KeyPair | None = None,
        tracer_provider: TracerProvider | None = None,
        first: int = 0,
    ) -> None:
        """tracer_provider: traces each job in the coordinator's trace (JobOffer.traceparent);
        default: the process's (OTEL_* variables, see observability/tracing.py), if any."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'seeker' or 'desktop', not {kind!r}")
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"max_concurrency must be between 1 and {MAX_CONCURRENCY}")
        self.executors: list[Executor] = executors if executors is not None else default_executors()
        models = sorted({m for e in self.executors for m in e.llm_models})
        if models and kind != "desktop":
            raise ValueError("only desktop workers serve LLM models")
        self.coordinators = coordinator_addresses(
            coordinator if isinstance(coordinator, str) else tuple(coordinator)
        )
        self._current = first % len(self.coordinators)
        self.key = key
        self.kind = kind
        self.max_concurrency = max_concurrency
        self.tasks = sorted({t for e in self.executors for t in e.tasks})
        self.llm_models = models
        self.version = version
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.log = log or logging.getLogger(__name__)
        self._job_lines = JobLines(self.log)
        self.offer_filter = offer_filter
        # On-chain agent id (`dispatch worker register`) and the secp256k1 key (0x hex) of
        # the agent's owner, which signs ChallengeResponse.chain_signature.
        self.agent_id = agent_id
        self.chain_key = chain_key
        # The Solana key the agent's registration names (ChallengeResponse.solana_signature);
        # None: the worker key, which is the Solana address a default registration lists.
        self.solana_key = solana_key
        provider = tracer_provider or tracing.process_provider()
        self.tracing = tracing.WorkerTracing(provider) if provider is not None else None

        # Observable state.
        self.connected = asyncio.Event()
        self.worker_id = ""
        self.verified_agent_id = ""
        self.coordinator_public_key = b""
        self.heartbeat_interval: float = DEFAULT_HEARTBEAT_SECONDS
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.sessions = 0

        self._draining = False
        self._stop = asyncio.Event()
        self._running: dict[JobKey, asyncio.Task[worker_pb2.ConnectRequest]] = {}
        self._pending: dict[JobKey, worker_pb2.ConnectRequest] = {}
        # accepts not sent yet: each job's, until its first step ends or its first progress
        self._unanswered: dict[JobKey, worker_pb2.OfferResponse] = {}
        self._settled = asyncio.Event()  # set while nothing runs and every result is acked
        self._settled.set()
        self._outbox: asyncio.Queue[worker_pb2.ConnectRequest] | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._offline_for = 0.0  # set by disconnect(): the least delay before reconnecting

    @property
    def coordinator(self) -> str:
        """The address of the coordinator this worker talks to (or will try next)."""
        return self.coordinators[self._current]

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keeps a session open, reconnecting with backoff, until stop() or drain() ends it."""
        logs.bind(worker_id=self.key.public_hex)  # this task's log records (JSON logs)
        failures = 0
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                sessions_before = self.sessions
                session = asyncio.create_task(self._session())
                self._session_task = session
                try:
                    await asyncio.wait({session, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    session.cancel()
                    await asyncio.wait({session})
                    self._session_task = None
                retry_after = self._log_session_end(session)
                if self._stop.is_set():
                    break
                if self.sessions > sessions_before:
                    failures = 0
                # failover: the next address; the backoff grows with each round of them all
                self._current = (self._current + 1) % len(self.coordinators)
                rounds = failures // len(self.coordinators)
                delay = max(retry_after, self._offline_for, self._backoff(rounds))
                self._offline_for = 0.0
                failures = min(failures + 1, 32 * len(self.coordinators))
                self.log.info("reconnecting to %s in %.2fs", self.coordinator, delay)
                await asyncio.wait({stop_wait}, timeout=delay)
        finally:
            stop_wait.cancel()
            self._cancel_jobs()
            self.connected.clear()
            self._job_lines.flush()

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (part of the API)
        """Takes no new offers, waits up to timeout for results to be acknowledged, then stops."""
        self._draining = True
        self._send(ConnectRequest(drain=worker_pb2.Drain(reason="worker draining")))
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            self.log.warning(
                "drain timed out with %d running and %d unacknowledged jobs",
                len(self._running),
                len(self._pending),
            )
        self.stop()

    def stop(self) -> None:
        """Stops at once: cancels running jobs and ends run(), which closes the channel.

        A stopped Worker stays stopped; make a new one to reconnect.
        """
        self._stop.set()
        self._cancel_jobs()

    def disconnect(self, offline_for: float = 0.0) -> bool:
        """Drops the current session as a lost connection would, without stopping.

        run() reconnects after at least offline_for seconds (and its usual backoff). Running
        jobs go on, and their results are resent on the next session. Returns False, doing
        nothing, when no session is open or being opened (e.g. during a backoff wait).
        """
        if self._session_task is None or self._session_task.done():
            return False
        self._offline_for = max(0.0, offline_for)
        self._session_task.cancel()
        return True

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(backoff_max, backoff_initial * 2^failures)]."""
        return random.uniform(0, min(self.backoff_max, self.backoff_initial * 2**failures))

    def _log_session_end(self, session: asyncio.Task[None]) -> float:
        """Logs why a session ended; returns the minimum delay before reconnecting."""
        if session.cancelled():
            return 0.0
        exc = session.exception()
        if isinstance(exc, SessionEnded):
            self.log.info("session with %s ended: %s", self.coordinator, exc)
            return exc.retry_after
        if isinstance(exc, grpc.aio.AioRpcError):
            self.log.warning(
                "connection to %s failed: %s %s", self.coordinator, exc.code().name, exc.details()
            )
        elif exc is not None:
            self.log.warning("session with %s failed", self.coordinator, exc_info=exc)
        return 0.0

    # --- one session ----------------------------------------------------------------------

    async def _session(self) -> None:
        """One Connect stream: handshake, then serve it until it ends (always by raising)."""
        # A local subchannel pool: the worker's own TCP connection, even when one process
        # runs many workers (gRPC otherwise shares one connection per target).
        # The same fixed HTTP/2 window as the coordinator's: no probing pings per job.
        options = [("grpc.use_local_subchannel_pool", 1), *HTTP2_CHANNEL_OPTIONS]
        async with grpc.aio.insecure_channel(self.coordinator, options=options) as channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
                    coordinator_key, welcome = await self._handshake(call)
            except TimeoutError as e:
                raise SessionEnded("the coordinator did not complete the handshake") from e
            outbox: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()
            loops = [
                asyncio.create_task(self._read_loop(call)),
                asyncio.create_task(self._write_loop(call, outbox)),
                asyncio.create_task(self._heartbeat_loop(outbox)),
            ]
            try:
                self._on_welcome(coordinator_key, welcome, outbox)
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._outbox = None
                self.connected.clear()
                for loop in loops:
                    loop.cancel()
                await asyncio.wait(loops)
            # The loops never return, so result() re-raises whatever ended the session.
            next(loop for loop in loops if loop in done).result()

    async def _handshake(self, call: ConnectCall) -> tuple[bytes, worker_pb2.Welcome]:
        """Hello, Challenge, ChallengeResponse, Welcome; returns the coordinator key and Welcome."""
        hello = worker_pb2.Hello(
            public_key=self.key.public_key,
            kind=_KINDS[self.kind],
            capabilities=worker_pb2.Capabilities(
                tasks=self.tasks, llm_models=self.llm_models, max_concurrency=self.max_concurrency
            ),
            version=self.version[:MAX_VERSION_CHARS],
            agent_id=self.agent_id,
            batched_acks=True,  # acks ride on offers (_read takes them)
            # jobs still running, or finished but not acknowledged, from an earlier session
            # (within the protocol's limit; the rest are resent as results or given up)
            running=[
                worker_pb2.RunningJob(job_id=job_id, attempt=attempt)
                for job_id, attempt in sorted({*self._running, *self._pending})[:MAX_RUNNING_JOBS]
            ],
        )
        await call.write(ConnectRequest(hello=hello))
        challenge = (await self._read_expected(call, "challenge")).challenge
        signature = self.key.sign(HELLO_CONTEXT, challenge.nonce + challenge.coordinator_public_key)
        response = worker_pb2.ChallengeResponse(signature=signature)
        if self.agent_id and self.chain_key:
            response.chain_signature = _sign_agent_proof(
                self.chain_key,
                challenge.nonce,
                challenge.coordinator_public_key,
                self.key.public_key,
                self.agent_id,
            )
            # for a Solana-track coordinator (others ignore it): the Solana key's proof
            link = solana_link_message(
                challenge.nonce, challenge.coordinator_public_key, self.key.public_key,
                self.agent_id,
            )  # fmt: skip
            solana = self.solana_key or self.key
            response.solana_signature = solana.sign(b"", link)
        await call.write(ConnectRequest(challenge_response=response))
        welcome = (await self._read_expected(call, "welcome")).welcome
        return challenge.coordinator_public_key, welcome

    async def _read(self, call: ConnectCall) -> worker_pb2.ConnectResponse:
        """The next message; raises SessionEnded at end of stream or on GoAway."""
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise SessionEnded("the coordinator closed the stream")
        response = cast(worker_pb2.ConnectResponse, msg)
        for ack in response.acks:  # before the message they ride on (a GoAway too)
            self._on_ack(ack)
        if response.HasField("go_away"):
            go_away = response.go_away
            raise SessionEnded(f"GoAway: {go_away.reason}", go_away.retry_after_seconds)
        return response

    async def _read_expected(self, call: ConnectCall, field: str) -> worker_pb2.ConnectResponse:
        msg = await self._read(call)
        got = msg.WhichOneof("msg")
        if got != field:
            raise SessionEnded(f"expected {field} during the handshake, got {got}")
        return msg

    def _on_welcome(
        self,
        coordinator_key: bytes,
        welcome: worker_pb2.Welcome,
        outbox: asyncio.Queue[worker_pb2.ConnectRequest],
    ) -> None:
        self.worker_id = welcome.worker_id
        self.verified_agent_id = welcome.agent_id  # what receipts must carry
        self.coordinator_public_key = coordinator_key
        self.heartbeat_interval = welcome.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS
        self.sessions += 1
        self._outbox = outbox
        self.connected.set()
        self.log.info(
            "connected to %s as %s (session %s)",
            self.coordinator,
            welcome.worker_id,
            welcome.session_id,
        )
        if self._draining:
            self._send(ConnectRequest(drain=worker_pb2.Drain(reason="worker draining")))
        for key, msg in list(self._pending.items()):
            self._pending[key] = msg = self._for_session(msg)
            self._send(msg)

    async def _read_loop(self, call: ConnectCall) -> NoReturn:
        while True:
            msg = await self._read(call)
            match msg.WhichOneof("msg"):
                case "offer":
                    self._on_offer(msg.offer)
                case "cancel":
                    self._on_cancel(msg.cancel)
                case "result_ack":
                    self._on_ack(msg.result_ack)
                case "heartbeat_settings":
                    interval = msg.heartbeat_settings.heartbeat_interval_seconds
                    self.heartbeat_interval = interval or self.heartbeat_interval
                case None if msg.acks:
                    pass  # acks alone (taken by _read)
                case other:
                    self.log.warning("ignoring unexpected %s from the coordinator", other)

    async def _write_loop(
        self,
        call: ConnectCall,
        outbox: asyncio.Queue[worker_pb2.ConnectRequest],
    ) -> NoReturn:
        """The session's only writer: grpc allows one write in flight per call."""
        while True:
            await call.write(await outbox.get())

    async def _heartbeat_loop(self, outbox: asyncio.Queue[worker_pb2.ConnectRequest]) -> NoReturn:
        delay = float(self.heartbeat_interval)
        while True:
            await asyncio.sleep(delay)
            delay = self.heartbeat_interval * random.uniform(  # see HEARTBEAT_JITTER
                1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER
            )
            running = sorted({job_id for job_id, _ in self._running})[:MAX_RUNNING_JOBS]
            outbox.put_nowait(
                ConnectRequest(heartbeat=worker_pb2.Heartbeat(running_job_ids=running))
            )

    def _send(self, msg: worker_pb2.ConnectRequest) -> None:
        """Queues msg on the live session; dropped when there is none."""
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    # --- jobs -----------------------------------------------------------------------------

    def _executor(self, spec: common_pb2.JobSpec) -> Executor | None:
        return next((e for e in self.executors if e.takes(spec)), None)

    def _rejection(self, offer: worker_pb2.JobOffer) -> str:
        """Why the offer must be refused; empty to accept it."""
        if self._draining:
            return "draining"
        if self._executor(offer.spec) is None:
            return "unsupported"
        if offer.spec.HasField("sealed") and not any(
            e.worker_public_key == self.key.public_key for e in offer.spec.sealed.envelopes
        ):
            return "sealed to other workers"
        key = (offer.job_id, offer.attempt)
        if key in self._running or key in self._pending:
            return "duplicate"
        if len(self._running) >= self.max_concurrency:
            return "busy"
        if self.offer_filter is not None:
            return self.offer_filter(offer)
        return ""

    def _on_offer(self, offer: worker_pb2.JobOffer) -> None:
        reason = self._rejection(offer)
        response = worker_pb2.OfferResponse(
            job_id=offer.job_id, attempt=offer.attempt, accept=not reason, reason=reason
        )
        if reason:
            self._send(ConnectRequest(offer_response=response))
            self.rejected += 1
            self.log.info("rejected job %s attempt %d: %s", offer.job_id, offer.attempt, reason,
                          extra={"job_id": offer.job_id})  # fmt: skip
            return
        key = (offer.job_id, offer.attempt)
        task = asyncio.create_task(self._execute(offer, self.coordinator_public_key))
        self._running[key] = task
        self._settled.clear()
        task.add_done_callback(functools.partial(self._job_done, key))
        # the accept goes once the job has had its first step, or before its first
        # progress: a job that ended in it (a built-in task) sends its result alone, which
        # answers the offer too (one message instead of two, and the result does not wait
        # for the accept's write)
        self._unanswered[key] = response
        asyncio.get_running_loop().call_soon(self._accept, key, task)
        # at DEBUG: how the job ends is logged at INFO (one line per job, not two)
        self.log.debug("accepted job %s attempt %d", offer.job_id, offer.attempt,
                       extra={"job_id": offer.job_id})  # fmt: skip

    def _accept(self, key: JobKey, task: asyncio.Task[worker_pb2.ConnectRequest] | None) -> None:
        """Sends the offer's accept unless it was sent, or the job ended (its result, or
        its cancel, answers it)."""
        response = self._unanswered.pop(key, None)
        if response is not None and (task is None or not task.done()):
            self._send(ConnectRequest(offer_response=response))

    async def _execute(
        self, offer: worker_pb2.JobOffer, coordinator_key: bytes
    ) -> worker_pb2.ConnectRequest:
        """Runs the offered task, in a span of the job's trace when tracing; returns its
        JobCompleted or JobFailed message (with the span's traceparent)."""
        if self.tracing is None:
            return await self._run(offer, coordinator_key)
        span = self.tracing.start(offer.job_id, offer.attempt, offer.traceparent, self.kind)
        try:
            msg = await self._run(offer, coordinator_key)
        except BaseException:  # cancelled
            self.tracing.finish(span, "cancelled")
            raise
        if msg.HasField("completed"):
            msg.completed.traceparent = self.tracing.finish(span, None)
        else:
            msg.failed.traceparent = self.tracing.finish(span, msg.failed.failure.code)
        return msg

    async def _run(
        self, offer: worker_pb2.JobOffer, coordinator_key: bytes
    ) -> worker_pb2.ConnectRequest:
        """Runs the offered task; returns its JobCompleted or JobFailed message."""
        started_at = _now()
        limit = offer.time_limit_seconds or None
        executor = self._executor(offer.spec)
        assert executor is not None  # checked when the offer was accepted

        def progress(text: str, fraction: float) -> None:
            self._accept((offer.job_id, offer.attempt), None)  # accepted before its progress
            # long text goes in several messages, each within the protocol's limit
            for start in range(0, max(len(text), 1), MAX_PROGRESS_TEXT_CHARS):
                msg = worker_pb2.JobProgress(
                    job_id=offer.job_id,
                    attempt=offer.attempt,
                    text=text[start : start + MAX_PROGRESS_TEXT_CHARS],
                    fraction=fraction,
                )
                self._send(ConnectRequest(progress=msg))

        spec, opened = offer.spec, None
        if spec.HasField("sealed"):
            try:  # only the client (offer.client_id) can have sealed it to this key
                opened = open_input(spec, self.key, bytes.fromhex(offer.client_id))
            except (SealError, ValueError) as e:
                return self._failure(offer, "bad_input", f"sealed input refused: {e}", False)
            spec = opened.spec
            executor = self._executor(spec) or executor

            def progress(text: str, fraction: float) -> None:
                pass  # a sealed job's output leaves only sealed, in the result

        try:
            async with asyncio.timeout(limit):
                out = await executor.run(spec, progress)
        except TaskError as e:
            return self._failure(offer, e.code, e.message, e.retryable)
        except TimeoutError:
            message = f"the job ran past its {limit}s time limit"
            return self._failure(offer, "time_limit_exceeded", message, False)
        except Exception as e:
            self.log.exception("job %s attempt %d crashed", offer.job_id, offer.attempt)
            return self._failure(offer, "worker_error", f"{type(e).__name__}: {e}", True)
        return self._completion(offer, coordinator_key, started_at, out, opened)

    def _completion(
        self,
        offer: worker_pb2.JobOffer,
        coordinator_key: bytes,
        started_at: Timestamp,
        out: TaskOutput,
        opened: OpenedInput | None = None,
    ) -> worker_pb2.ConnectRequest:
        """JobCompleted with the receipt body, serialized once and signed over those bytes.
        A sealed job's output is sealed to the client, with the keyed plaintext hashes."""
        output, content_type = out.output, out.content_type
        private_input = private_output = b""
        if opened is not None:
            output = seal_output(
                self.key,
                bytes.fromhex(offer.client_id),
                offer.job_id,
                offer.spec_sha256,
                out.output,
                out.content_type,
            )
            content_type = SEALED_CONTENT_TYPE
            private_input = opened.input_hash
            private_output = private_hash(opened.secret, out.output)
        body = serialize_body(
            receipt_pb2.ReceiptBody(
                version=RECEIPT_VERSION,
                job_id=offer.job_id,
                job_type=(
                    common_pb2.JOB_TYPE_LLM
                    if offer.spec.WhichOneof("work") == "llm"
                    else common_pb2.JOB_TYPE_TASK
                ),
                input_sha256=offer.spec_sha256,
                output_sha256=sha256(output),
                worker_public_key=self.key.public_key,
                coordinator_public_key=coordinator_key,
                worker_agent_id=self.verified_agent_id,
                price=offer.price,
                payment=offer.payment,
                attempt=offer.attempt,
                started_at=started_at,
                completed_at=_now(),
                client_id=offer.client_id,
                private_input_sha256=private_input,
                private_output_sha256=private_output,
            )
        )
        completed = worker_pb2.JobCompleted(
            job_id=offer.job_id,
            attempt=offer.attempt,
            result=common_pb2.JobResult(
                output=output,
                content_type=content_type,
                usage=common_pb2.TokenUsage(
                    prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens
                ),
            ),
            receipt_body=body,
            receipt_signature=sign_body(self.key, body),
        )
        return ConnectRequest(completed=completed)

    def _for_session(self, msg: worker_pb2.ConnectRequest) -> worker_pb2.ConnectRequest:
        """msg as the current session's coordinator must see it: a JobCompleted whose
        receipt body names another coordinator (the job was accepted through one that has
        gone since) or another verified agent id is signed again, naming this session's;
        anything else is msg. Before any session: msg."""
        if not msg.HasField("completed") or not self.coordinator_public_key:
            return msg
        completed = msg.completed
        body = receipt_pb2.ReceiptBody.FromString(completed.receipt_body)
        if (
            body.coordinator_public_key == self.coordinator_public_key
            and body.worker_agent_id == self.verified_agent_id
        ):
            return msg
        body.coordinator_public_key = self.coordinator_public_key
        body.worker_agent_id = self.verified_agent_id
        resigned = worker_pb2.JobCompleted()
        resigned.CopyFrom(completed)
        resigned.receipt_body = serialize_body(body)
        resigned.receipt_signature = sign_body(self.key, resigned.receipt_body)
        return ConnectRequest(completed=resigned)

    @staticmethod
    def _failure(
        offer: worker_pb2.JobOffer, code: str, message: str, retryable: bool
    ) -> worker_pb2.ConnectRequest:
        failed = worker_pb2.JobFailed(
            job_id=offer.job_id,
            attempt=offer.attempt,
            failure=common_pb2.JobFailure(
                code=code[:MAX_FAILURE_CODE_CHARS], message=message[:MAX_FAILURE_MESSAGE_CHARS]
            ),
            retryable=retryable,
        )
        return ConnectRequest(failed=failed)

    def _job_done(self, key: JobKey, task: asyncio.Task[worker_pb2.ConnectRequest]) -> None:
        """Records and sends a finished job's result, unless the job was cancelled."""
        self._unanswered.pop(key, None)  # the result (or the cancel) answers the offer
        if self._running.get(key) is task:
            del self._running[key]
            if not task.cancelled():
                msg = task.result()
                if msg.HasField("completed"):
                    self.completed += 1
                    self._job_lines.finished(key, "completed")
                else:
                    self.failed += 1
                    self._job_lines.finished(key, "failed", msg.failed.failure.code)
                self._pending[key] = msg = self._for_session(msg)
                self._send(msg)
        self._update_settled()

    def _on_cancel(self, cancel: worker_pb2.CancelJobInstruction) -> None:
        key = (cancel.job_id, cancel.attempt)
        task = self._running.pop(key, None)
        if task is not None:
            task.cancel()
        self._pending.pop(key, None)
        self._update_settled()
        self.log.info("job %s attempt %d cancelled: %s", *key, cancel.reason)

    def _on_ack(self, ack: worker_pb2.ResultAck) -> None:
        self._pending.pop((ack.job_id, ack.attempt), None)
        if not ack.accepted:
            self.log.warning(
                "coordinator refused the result of job %s attempt %d: %s",
                ack.job_id,
                ack.attempt,
                ack.reason,
            )
        self._update_settled()

    def _cancel_jobs(self) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()
        self._unanswered.clear()
        self._update_settled()

    def _update_settled(self) -> None:
        if self._running or self._pending:
            self._settled.clear()
        else:
            self._settled.set()


def _sign_agent_proof(
    chain_key: str, nonce: bytes, coordinator_key: bytes, public_key: bytes, agent_id: str
) -> bytes:
    # web3/eth_account only for workers with a chain identity
    import dispatchnet.chains.evm  # noqa: F401  (before eth_account: restores the recursion limit)
    from dispatchnet.chains.evm.identity import sign_agent_proof

    return sign_agent_proof(chain_key, nonce, coordinator_key, public_key, agent_id)
