"""`dispatch bench` (`make bench`): measured numbers, never asserted ones.

One run, one process tree, so every figure is a ratio to a baseline measured on the same
machine under the same load:

1. raw: a bare grpc.aio server in a child process (a bytes-in, bytes-out unary method and a
   bidi echo stream; no interceptors, no storage); this process calls it with 64 concurrent
   callers, then with 1, then round trips on 100 streams. This is gRPC's own ceiling here.
2. unpaid: `dispatch coordinator --profile local` in a child process and `dispatch worker`
   children (TASK workers with many slots); this process submits trivial `echo` jobs
   (GetQuote -> CommitJob -> WatchJob to the end) from 1, 4, 16 and 64 submitters.
   Then the write lock: this process opens its own connection to the coordinator's
   database and holds BEGIN IMMEDIATE plus a write for LOCK_HOLD_SECONDS (well under the
   coordinator's busy_timeout, so its writes wait and then complete), while one caller
   probes grpc health Check (no storage) back to back and LOCK_SUBMITTERS submit trivial
   jobs; the figure is the longest Check latency during the hold, beside the same probe
   before it; every job submitted during the hold is then watched to its end.
   Then a desktop worker (the shipped model) runs one 128-token LLM job, watched to the
   end, and the coordinator's store is read for how many event rows the job left. That
   job warms the worker up; then, alternating, `llm_runs` more such jobs (time from just
   before CommitJob to the first progress event on WatchJob) and as many generations of
   the same spec by the worker's own executor and llama.cpp in this process (time from
   the call to the first token), after one warm-up of its own: medians of each. Each
   measured run follows a LLM_WARMUP_TOKENS-token run on its own side (see bench_llm).
3. scale: the unpaid section's coordinator (its workers gone) with N connected seekers
   (`dispatch seekers` children, at most SEEKERS_PER_PROCESS each, every seeker its own
   TCP connection) for N = SCALE_BASE, `scale` and `most`: after SCALE_SETTLE_SECONDS of
   health checks (the wave's aftermath), burst jobs/s (BURST submitters,
   fewer than SCALE_BASE so that free seekers never run out) and the end-to-end p50 with
   1 submitter, then the coordinator's RSS and its CPU while idle (all seekers connected,
   no jobs: heartbeats only). At `scale` the comparison with SCALE_BASE is measured in
   rounds: the seekers beyond SCALE_BASE stop, the jobs are measured with SCALE_BASE
   again, the same seekers come back, settle, and their jobs are measured (see
   alternate_scale); then `most` connect. The seekers add no artificial delay (no
   --slow, --battery or --heat): a figure is matching, the stream round trips and the
   `echo` task itself.
4. paid: a local anvil chain, `dispatch coordinator --profile local-monad` (x402 on, the
   deployment's test USDC) in a child process, the same workers; CommitJob p50 with 4
   submitters, jobs/s with 16, then how long settlement takes to drain what was paid and
   how many settlement transactions it sent.
5. cluster (bench_cluster.py): trivial jobs/s from `many` submitters on one coordinator on
   SQLite, then one and two coordinators on one throwaway PostgreSQL (workers split over
   them, submitters spread over their addresses), with the CPU each part used and, on
   PostgreSQL, the statements per job and what its backends waited for.

Each section prints p50/p99 and the 1-minute load average when it ended, and the summary
table prints each figure as a ratio to its baseline, with the issue's target beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from dispatchnet import eventloop, keys

if TYPE_CHECKING:
    from dispatchnet.client import CoordinatorClient
    from dispatchnet.payments.wallet import Wallet
    from dispatchnet.worker.llm import LlmExecutor

RAW_SERVICE = "dispatch.bench.Raw"
UNARY_CALLERS = 64
JOB_UNARY_CALLS = 3  # a trivial job's client calls: GetQuote, CommitJob, WatchJob
RUN_JOB_CALLS = 1  # or one: RunJob
# and its worker stream's messages, as round trips: offer -> result (which answers the
# offer: a built-in task sends no accept); the result's ack rides on a later message
# (Hello.batched_acks), under load the worker's next offer
JOB_STREAM_ROUND_TRIPS = 1.0
STREAMS = 100
WORKERS = 2
WORKER_SLOTS = 32
PAYLOAD = b"x" * 32
START_TIMEOUT = 60.0
LLM_TOKENS = 128
LLM_PROMPT = "Write a long story about a dragon."  # the shipped model writes 400+ tokens
LLM_RUNS = 5  # time-to-first-token runs through the network and raw, after a warm-up each
# tokens of the short job run on the same path just before each measured one (see bench_llm)
LLM_WARMUP_TOKENS = 4
LOCK_HOLD_SECONDS = 2.0  # under the coordinator's busy_timeout (5 s): its writes wait, then run
LOCK_WAIT_SECONDS = 5.0  # this process's own busy_timeout to take the lock
LOCK_SUBMITTERS = 4
# The write held with the lock: the oldest job's row rewritten unchanged.
LOCK_WRITE = "UPDATE jobs SET updated_at = updated_at WHERE rowid = (SELECT min(rowid) FROM jobs)"
SCALE_BASE = 50
# The comparisons nearest their targets (RunJob against raw unary, at 64 and 1; paid
# against unpaid, 16 submitters; burst jobs/s and the job p50 with `scale` against
# SCALE_BASE connected seekers) are measured this many more rounds, each side in turn, and
# the figure is the median of the rounds' ratios (see Rounds).
ALTERNATE_ROUNDS = 2
VERIFY_PROCESSES = 1  # the paid coordinator verifies payments in this many child processes
SEEKERS_PER_PROCESS = 1000
BURST = 32
IDLE_SECONDS = 3.0  # at most: never more than a measurement's `seconds` (at least 1)
# After a wave of seekers has connected, health checks run this long (at most 1.2 x a
# measurement's `seconds`) before jobs are measured, and the longest is printed: a wave's
# aftermath, while the coordinator stretches the early sessions' heartbeat intervals
# (hub.STRETCH_PER_CHECK at a time, at every sweep once a silent-worker check found them
# due; told all at once, they held a check ~0.4 s). The jobs are measured after it.
SCALE_SETTLE_SECONDS = 6.0
GIB = 1024**3
OPEN_FILES_SPARE = 256  # the coordinator's files besides its seekers' connections


# --- measurement ------------------------------------------------------------------------


@dataclass
class Series:
    """Latencies (seconds) of operations finished within `elapsed` seconds."""

    name: str
    samples: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.samples) / self.elapsed if self.elapsed else 0.0

    def pct(self, p: float) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(p * len(s)))]

    @property
    def p50_ms(self) -> float:
        return self.pct(0.5) * 1000

    @property
    def p99_ms(self) -> float:
        return self.pct(0.99) * 1000

    @property
    def longest_ms(self) -> float:
        return max(self.samples) * 1000 if self.samples else float("nan")

    def line(self) -> str:
        errors = f", {self.errors} errors" if self.errors else ""
        return (
            f"{self.name}: {len(self.samples)} in {self.elapsed:.1f}s = {self.rate:,.0f}/s, "
            f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms{errors}"
        )


async def closed_loop(
    name: str, callers: int, seconds: float, op: Callable[[], Awaitable[object]]
) -> Series:
    """`callers` concurrent loops each running op back to back for `seconds`."""
    deadline = time.perf_counter() + seconds
    return await loop_while(name, callers, lambda: time.perf_counter() < deadline, op)


async def loop_while(
    name: str, callers: int, going: Callable[[], bool], op: Callable[[], Awaitable[object]]
) -> Series:
    """`callers` concurrent loops each running op back to back while going() is true (an
    op started then is timed to its end)."""
    series = Series(name)

    async def caller() -> None:
        while going():
            t = time.perf_counter()
            try:
                await op()
            except (grpc.RpcError, TimeoutError):
                series.errors += 1
                continue
            series.samples.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    series.elapsed = time.perf_counter() - start
    return series


def load_average() -> float:
    return os.getloadavg()[0]


class CpuMeter:
    """CPU time (user + system) used by named child processes and this process while an
    awaited measurement runs; `parts` then holds each one's seconds, `total` their sum."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.parts: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        now = {"this process": usage.ru_utime + usage.ru_stime}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                now[name] = cpu_seconds(pid)
        return now

    async def measure(self, run: Awaitable[Series]) -> Series:
        before = self._now()
        series = await run
        after = self._now()
        self.parts = {k: after[k] - before[k] for k in after if k in before}
        return series

    def merge(self, prefix: str) -> None:
        """Counts the parts whose name starts with prefix as one, named prefix."""
        merged = sum(v for k, v in self.parts.items() if k.startswith(prefix))
        self.parts = {k: v for k, v in self.parts.items() if not k.startswith(prefix)}
        self.parts[prefix] = merged

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def ms_per(self, count: int) -> float:
        return 1000 * self.total / max(1, count)

    def line(self, count: int, what: str) -> str:
        each = ", ".join(f"{k} {1000 * v / max(1, count):.2f}" for k, v in self.parts.items())
        return f"CPU ms per {what}: {self.ms_per(count):.2f} ({each})"


# --- child processes --------------------------------------------------------------------


class Child:
    """A child process that prints one JSON line when it is ready."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = log.stem
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True
        )

    async def ready(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), START_TIMEOUT)
        if not line:
            raise RuntimeError(
                f"{self.proc.args!r} exited before it was ready; see {self.log.name}"
            )
        info: dict[str, object] = json.loads(line)
        return info

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


class Children:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "DISPATCH_HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}
        self.started: list[Child] = []

    async def start(self, name: str, *args: str) -> dict[str, object]:
        child = Child([sys.executable, *args], self.env, self.tmp / f"{name}.log")
        self.started.append(child)
        return await child.ready()

    def pid(self, name: str) -> int:
        return next(c.proc.pid for c in self.started if c.name == name)

    def pids(self, *prefixes: str) -> dict[str, int]:
        """The running children whose name starts with one of prefixes, by name."""
        return {c.name: c.proc.pid for c in self.started if c.name.startswith(prefixes)}

    def stop(self, prefix: str, keep: tuple[str, ...] = ()) -> None:
        """Stops the children whose name starts with prefix, but for those named in keep."""
        for child in [c for c in reversed(self.started) if c.name.startswith(prefix)]:
            if child.name not in keep:
                child.stop()
                self.started.remove(child)

    async def dispatch(self, name: str, *args: str) -> dict[str, object]:
        return await self.start(name, "-m", "dispatchnet.cli", *args)

    def stop_all(self) -> None:
        for child in reversed(self.started):
            child.stop()
        self.started.clear()


# --- the raw baseline -------------------------------------------------------------------


async def serve_raw() -> None:
    """The baseline server: no interceptors, no storage, bytes in and out."""

    async def echo(request: bytes, context: object) -> bytes:
        return request

    async def stream(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                RAW_SERVICE,
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"listening": f"127.0.0.1:{port}"}), flush=True)
    await server.wait_for_termination()


@dataclass
class Rounds:
    """One comparison measured in rounds, its two sides one after the other in each (the
    sections' own runs are the first round). The raw rate moves by +-10% from one minute
    to the next on a shared machine, so a figure and a baseline measured minutes apart
    carry that drift; the median of the rounds' ratios does much less."""

    pairs: list[tuple[float, float]] = field(default_factory=list)  # (figure, baseline)

    def ratios(self) -> list[float]:
        return [a / b if b else float("nan") for a, b in self.pairs]

    def ratio(self) -> float:
        """The median ratio (the lower middle one of an even number: always a round's)."""
        return statistics.median_low(self.ratios())

    def value(self) -> float:
        """The figure of the round whose ratio is the median."""
        return self.pairs[self.ratios().index(self.ratio())][0]

    def line(self, what: str) -> str:
        shown = ", ".join(f"{r:.2f}" for r in self.ratios())
        return f"{what}, round by round: {shown} (median {self.ratio():.2f})"


@dataclass
class Raw:
    unary: Series
    unary_one: Series
    bidi: Series
    bidi_one: Series  # round trips on one stream, one at a time
    unary_cpu_ms: float  # CPU of both sides (server child + this process) per unary RPC
    bidi_cpu_ms: float  # likewise per bidi round trip (two messages)
    address: str = ""  # the raw server's, still running for the later rounds

    def job_floor_cpu_ms(self, calls: int = JOB_UNARY_CALLS) -> float:
        """The CPU (all processes) a trivial job's messages would cost at the raw rate:
        its client calls (GetQuote, CommitJob, WatchJob; or RunJob alone) as unary RPCs
        and its worker-stream messages (offer, result; the ack rides on a later offer) as 1
        round trip. A lower bound: WatchJob's several events and the job's own work are
        left out."""
        return calls * self.unary_cpu_ms + JOB_STREAM_ROUND_TRIPS * self.bidi_cpu_ms

    def ceiling_jobs_per_second(self, cores: int, calls: int = JOB_UNARY_CALLS) -> float:
        """Trivial jobs/s with every core busy and nothing but the raw cost per job."""
        return 1000 * cores / self.job_floor_cpu_ms(calls)

    def floor_p50_ms(self, calls: int = JOB_UNARY_CALLS) -> float:
        """The shortest job end to end from one submitter: its unary calls one after
        another plus one stream round trip (the offer out, the result back)."""
        return calls * self.unary_one.p50_ms + self.bidi_one.p50_ms


async def bench_raw(children: Children, seconds: float) -> Raw:
    info = await children.start("raw", "-m", "dispatchnet.bench", "raw-server")
    async with grpc.aio.insecure_channel(str(info["listening"])) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{RAW_SERVICE}/Echo"
        )
        await echo(PAYLOAD)
        cpu = CpuMeter({"raw server": children.pid("raw")})
        unary = await cpu.measure(
            closed_loop(
                f"raw unary, {UNARY_CALLERS} callers",
                UNARY_CALLERS,
                seconds,
                lambda: echo(PAYLOAD),
            )
        )
        unary_cpu_ms = cpu.ms_per(len(unary.samples))
        unary_one = await closed_loop("raw unary, 1 caller", 1, seconds / 2, lambda: echo(PAYLOAD))
        open_stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            f"/{RAW_SERVICE}/Stream"
        )
        calls = [open_stream() for _ in range(STREAMS)]
        queue: asyncio.Queue[grpc.aio.StreamStreamCall[bytes, bytes]] = asyncio.Queue()
        for call in calls:
            queue.put_nowait(call)

        async def round_trip() -> None:
            call = await queue.get()
            try:
                await call.write(PAYLOAD)
                await call.read()
            finally:
                queue.put_nowait(call)

        bidi = await cpu.measure(
            closed_loop(f"raw bidi round trips, {STREAMS} streams", STREAMS, seconds, round_trip)
        )
        bidi_cpu_ms = cpu.ms_per(len(bidi.samples))
        bidi_one = await closed_loop("raw bidi round trips, 1 stream", 1, seconds / 2, round_trip)
        for call in calls:
            call.cancel()
    return Raw(unary, unary_one, bidi, bidi_one, unary_cpu_ms, bidi_cpu_ms, str(info["listening"]))


async def raw_unary(address: str, callers: int, seconds: float, name: str) -> Series:
    """The raw server's unary rate from `callers`, as bench_raw measures it."""
    async with grpc.aio.insecure_channel(address) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{RAW_SERVICE}/Echo"
        )
        await echo(PAYLOAD)
        return await closed_loop(name, callers, seconds, lambda: echo(PAYLOAD))


# --- jobs through a coordinator ---------------------------------------------------------


async def start_workers(children: Children, address: str, tmp: Path, name: str = "worker") -> None:
    for n in range(WORKERS):
        await children.dispatch(
            f"{name}{n}",
            "worker",
            "--coordinator",
            address,
            "--kind",
            "seeker",
            "--max-concurrency",
            str(WORKER_SLOTS),
            "--key-file",
            str(tmp / f"{name}{n}.key"),
        )


@dataclass
class JobFigures:
    e2e_one: Series
    commit_four: Series
    jobs_sixteen: Series
    jobs_many: Series | None
    load: float
    cpu: CpuMeter  # over the busiest run (`many` submitters, else 16)
    cpu_jobs: int  # the jobs of that run
    # the same jobs with RunJob (unpaid only): 1 submitter, and `many` with its CPU
    run_one: Series | None = None
    run_many: Series | None = None
    run_cpu: CpuMeter | None = None


async def bench_jobs(
    label: str,
    address: str,
    client_key: keys.KeyPair,
    wallet: Wallet | None,
    seconds: float,
    many: int | None,
    pids: dict[str, int],
) -> tuple[JobFigures, list[str]]:
    """Trivial jobs from 1, 4, 16 (and `many`) submitters; the job ids committed. The CPU
    of the processes in pids and of this one is measured over the busiest run."""
    from dispatchnet.client import CoordinatorClient, task_spec

    committed: list[str] = []
    async with CoordinatorClient(address, client_key, wallet) as c:
        commits = Series(f"{label} CommitJob, 4 submitters")
        counter = iter(range(10**9))
        job = three_calls(c, committed, "job")
        timed_job = three_calls(c, committed, "timed job", commits)

        async def run_job() -> None:
            j = await c.run(task_spec("echo", f"job {next(counter)}".encode()))
            committed.append(j.job_id)

        await job()  # warm up (connections, token, first payment's token metadata)
        e2e_one = await closed_loop(f"{label} job end to end, 1 submitter", 1, seconds / 2, job)
        run_one = None
        if wallet is None:
            await run_job()
            run_one = await closed_loop(
                f"{label} job end to end with RunJob, 1 submitter", 1, seconds / 2, run_job
            )
        four = await closed_loop(f"{label} jobs, 4 submitters", 4, seconds / 2, timed_job)
        commits.elapsed = four.elapsed
        cpu = CpuMeter(pids)
        run_sixteen = closed_loop(f"{label} jobs, 16 submitters", 16, seconds, job)
        sixteen = await (run_sixteen if many else cpu.measure(run_sixteen))
        many_series = (
            await cpu.measure(closed_loop(f"{label} jobs, {many} submitters", many, seconds, job))
            if many
            else None
        )
        run_many, run_cpu = None, None
        if wallet is None and many:
            run_cpu = CpuMeter(pids)
            run_many = await run_cpu.measure(
                closed_loop(f"{label} jobs with RunJob, {many} submitters", many, seconds, run_job)
            )
        load = load_average()
    busiest = many_series or sixteen
    for s in (e2e_one, run_one, commits, four, sixteen, many_series, run_many):
        if s is not None:
            print("  " + s.line())
    print(f"  {cpu.line(len(busiest.samples), f'job ({busiest.name})')}")
    if run_cpu is not None and run_many is not None:
        print(f"  {run_cpu.line(len(run_many.samples), f'job ({run_many.name})')}")
    print(f"  load average (1 min) after the {label} run: {load:.2f}")
    figures = JobFigures(
        e2e_one, commits, sixteen, many_series, load, cpu, len(busiest.samples),
        run_one, run_many, run_cpu,
    )  # fmt: skip
    return figures, committed


def three_calls(
    c: CoordinatorClient, committed: list[str], tag: str, commits: Series | None = None
) -> Callable[[], Awaitable[None]]:
    """A trivial job: GetQuote, CommitJob (paid when c has a wallet), WatchJob to the end;
    each job id committed goes to `committed`, and each CommitJob's time to `commits`."""
    from dispatchnet.client import task_spec

    counter = iter(range(10**9))

    async def job() -> None:
        quote = await c.quote(task_spec("echo", f"{tag} {next(counter)}".encode()))
        t = time.perf_counter()
        j = await c.commit(quote.quote_id)
        if commits is not None:
            commits.samples.append(time.perf_counter() - t)
        committed.append(j.job_id)
        await c.wait(j.job_id, j.last_sequence)

    return job


async def alternate_run_job(
    address: str, raw: Raw, unpaid: JobFigures, seconds: float, many: int
) -> tuple[Rounds, Rounds]:
    """RunJob against raw unary, ALTERNATE_ROUNDS more rounds after the sections' own (raw,
    then the coordinator, as there): jobs/s from `many` submitters over unary RPC/s from
    UNARY_CALLERS callers, and the p50 from 1 submitter over 1 caller's."""
    from dispatchnet.client import CoordinatorClient, task_spec

    assert unpaid.run_many is not None and unpaid.run_one is not None
    rate = Rounds([(unpaid.run_many.rate, raw.unary.rate)])
    p50 = Rounds([(unpaid.run_one.p50_ms, raw.unary_one.p50_ms)])
    counter = iter(range(10**9))
    async with CoordinatorClient(address, keys.KeyPair.generate()) as c:

        async def run_job() -> None:
            await c.run(task_spec("echo", f"round {next(counter)}".encode()))

        await run_job()
        for n in range(2, 2 + ALTERNATE_ROUNDS):
            runs = (
                await raw_unary(
                    raw.address, UNARY_CALLERS, seconds, f"round {n}: raw unary, "
                    f"{UNARY_CALLERS} callers",
                ),
                await closed_loop(
                    f"round {n}: unpaid jobs with RunJob, {many} submitters", many, seconds,
                    run_job,
                ),
                await raw_unary(raw.address, 1, seconds / 2, f"round {n}: raw unary, 1 caller"),
                await closed_loop(
                    f"round {n}: unpaid job end to end with RunJob, 1 submitter", 1,
                    seconds / 2, run_job,
                ),
            )  # fmt: skip
            for series in runs:
                print("  " + series.line())
            rate.pairs.append((runs[1].rate, runs[0].rate))
            p50.pairs.append((runs[3].p50_ms, runs[2].p50_ms))
    return rate, p50


async def alternate_paid(
    children: Children,
    tmp: Path,
    paid_address: str,
    payer: keys.KeyPair,
    wallet: Wallet,
    paid: JobFigures,
    unpaid: JobFigures,
    seconds: float,
) -> tuple[Rounds, list[str]]:
    """Paid against unpaid jobs/s from 16 submitters, ALTERNATE_ROUNDS more rounds after
    the sections' own: an unpaid coordinator (profile local) and its workers run beside
    the paid one meanwhile (idle while the paid one is measured), and each round measures
    the unpaid one, then the paid one. The paid jobs committed, for settlement."""
    from dispatchnet.client import CoordinatorClient

    rounds = Rounds([(paid.jobs_sixteen.rate, unpaid.jobs_sixteen.rate)])
    committed: list[str] = []
    info = await children.dispatch(
        "unpaid-coordinator", "coordinator", "--profile", "local", "--listen", "127.0.0.1:0",
        "--data-dir", str(tmp / "coord-unpaid"),
    )  # fmt: skip
    unpaid_address = str(info["listening"])
    try:
        await start_workers(children, unpaid_address, tmp, "unpaid-worker")
        async with (
            CoordinatorClient(unpaid_address, keys.KeyPair.generate()) as free,
            CoordinatorClient(paid_address, payer, wallet) as paying,
        ):
            free_job = three_calls(free, [], "unpaid round")
            paid_job = three_calls(paying, committed, "paid round")
            await free_job()
            await paid_job()
            for n in range(2, 2 + ALTERNATE_ROUNDS):
                runs = (
                    await closed_loop(f"round {n}: unpaid jobs, 16 submitters", 16, seconds,
                                      free_job),
                    await closed_loop(f"round {n}: paid jobs, 16 submitters", 16, seconds,
                                      paid_job),
                )  # fmt: skip
                for series in runs:
                    print("  " + series.line())
                rounds.pairs.append((runs[1].rate, runs[0].rate))
    finally:
        children.stop("unpaid-")
    return rounds, committed


@dataclass
class WriteLock:
    before: Series  # health Check, 1 caller, for LOCK_HOLD_SECONDS before the hold
    during: Series  # the same probe: every Check started while the lock was held
    held_seconds: float
    submits: Series  # the submitters' GetQuote + CommitJob, started during the hold
    completed: int  # of the jobs submitted, how many ended COMPLETED
    drained_seconds: float  # from the release until the last submitted job ended


@contextlib.asynccontextmanager
async def write_lock(db: Path) -> AsyncIterator[None]:
    """Holds db's write lock from a connection of this process for the block: BEGIN
    IMMEDIATE and LOCK_WRITE, committed when the block ends (rolled back if it raises).
    The blocking calls run on a thread, so this process's loop keeps probing."""
    conn = sqlite3.connect(
        db, timeout=LOCK_WAIT_SECONDS, isolation_level=None, check_same_thread=False
    )
    try:
        await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
        await asyncio.to_thread(conn.execute, LOCK_WRITE)
        yield
        await asyncio.to_thread(conn.execute, "COMMIT")
    finally:
        conn.close()  # rolls back a transaction still open


async def bench_write_lock(address: str, db: Path, client_key: keys.KeyPair) -> WriteLock:
    """How long a cheap RPC that touches no storage (grpc health Check) takes while another
    process holds the coordinator's database write lock, seen from a client: one caller
    probes Check back to back, first for LOCK_HOLD_SECONDS without the lock (the
    baseline), then while this process holds the lock for LOCK_HOLD_SECONDS and
    LOCK_SUBMITTERS submit trivial jobs (their writes wait for the lock). Then every job
    submitted during the hold is watched to its end."""
    from dispatch.v1 import coordinator_pb2
    from dispatchnet.client import CoordinatorClient, task_spec

    # Its own TCP connection, as another client's would be (not the submitters' one).
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(address, options=options) as channel,
        CoordinatorClient(address, client_key) as c,
    ):
        probe = health_probe(channel)
        await probe()
        before = await closed_loop(
            "health Check before the hold, 1 caller", 1, LOCK_HOLD_SECONDS, probe
        )
        submitted: list[str] = []
        counter = iter(range(10**9))

        async def submit() -> None:
            spec = task_spec("echo", f"during the hold {next(counter)}".encode())
            submitted.append((await c.submit(spec)).job_id)

        async def completes(job_id: str) -> bool:
            """Whether the job ends COMPLETED (False: another end, or none in time)."""
            try:
                job = await asyncio.wait_for(c.wait(job_id), START_TIMEOUT)
            except TimeoutError:
                return False
            return job.state == coordinator_pb2.JOB_STATE_COMPLETED

        released = asyncio.Event()

        def held() -> bool:
            return not released.is_set()

        try:
            async with write_lock(db):
                start = time.perf_counter()
                probing = asyncio.create_task(
                    loop_while("health Check during the hold, 1 caller", 1, held, probe)
                )
                submitting = asyncio.create_task(
                    loop_while(
                        f"jobs submitted during the hold, {LOCK_SUBMITTERS} submitters",
                        LOCK_SUBMITTERS,
                        held,
                        submit,
                    )
                )
                await asyncio.sleep(LOCK_HOLD_SECONDS)  # the hold itself
        finally:
            released.set()
        held_seconds = time.perf_counter() - start
        during, submits = await asyncio.gather(probing, submitting)
        submits.elapsed = during.elapsed = held_seconds
        completed = sum(await asyncio.gather(*map(completes, submitted)))
        drained = time.perf_counter() - start - held_seconds
    return WriteLock(before, during, held_seconds, submits, completed, drained)


@dataclass
class LlmFigures:
    chunks: int  # progress events the first job's watch received
    events: int  # every event of that job (what one row per event would store)
    rows: int  # its durable rows in the events table
    network_ttft: list[float]  # seconds, warm: CommitJob -> first progress on WatchJob
    raw_ttft: list[float]  # seconds, warm: the executor's call -> its first token
    # the same, of the short warm-up runs: each right after the other side's full run
    network_after_raw: list[float] = field(default_factory=list)
    raw_after_network: list[float] = field(default_factory=list)

    @property
    def ttft_ms(self) -> tuple[float, float]:
        """Medians (network, raw) in milliseconds."""
        return (
            statistics.median(self.network_ttft) * 1000,
            statistics.median(self.raw_ttft) * 1000,
        )


async def llm_job(c: CoordinatorClient, tokens: int = LLM_TOKENS) -> tuple[float, int, int, str]:
    """One `tokens`-token LLM job, watched to its end: the seconds from just before
    CommitJob to the first progress event on WatchJob, the progress events, every event,
    and the job id."""
    from dispatchnet.client import llm_spec

    quote = await c.quote(llm_spec(LLM_PROMPT, max_tokens=tokens))
    start = time.perf_counter()
    job = await c.commit(quote.quote_id)
    first = None
    chunks = events = 0
    async for item in c.watch(job.job_id):
        events += 1
        if item.event.WhichOneof("detail") == "progress":
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"the LLM job {job.job_id} streamed no token")
    return first, chunks, events, job.job_id


async def raw_first_token(executor: LlmExecutor, tokens: int = LLM_TOKENS) -> float:
    """Seconds from the call to the first streamed token of the same spec the network job
    runs, generated by the worker's own executor (so the same chat formatting and the same
    prompt tokens) and llama.cpp in this process: no network, no coordinator."""
    from dispatchnet.client import llm_spec

    spec = llm_spec(LLM_PROMPT, max_tokens=tokens)
    first: list[float] = []
    start = time.perf_counter()

    def progress(text: str, fraction: float) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    await executor.run(spec, progress)
    if not first:
        raise RuntimeError("llama.cpp generated no token")
    return first[0]


async def bench_llm(children: Children, address: str, tmp: Path, db: Path, runs: int) -> LlmFigures:
    """One LLM job of LLM_TOKENS tokens on a desktop worker (the shipped model), watched
    to the end; then how many durable event rows it left in the coordinator's store. That
    job also warms the worker up (its model is loaded before it connects); then `runs`
    times, alternating, the time to first token through the network and raw (the shipped
    model loaded in this process, warmed up by one generation first).

    Each measured run follows a short run (LLM_WARMUP_TOKENS tokens) on its own side, so
    both sides are measured warm. Without it the network side was measured cold: its
    processes (client, coordinator, worker) had sat idle through the raw side's 128
    tokens, and on this kind of machine a job after idle takes several milliseconds
    longer at each hop (a raw run after the network one has no such hops). The short
    runs' own times, each right after the other side's full run, are kept as well."""
    from dispatchnet.client import CoordinatorClient
    from dispatchnet.worker.llm import EmbeddedLlama, LlmExecutor

    await children.dispatch(
        "desktop", "worker", "--coordinator", address, "--kind", "desktop",
        "--max-concurrency", "1", "--key-file", str(tmp / "desktop.key"),
    )  # fmt: skip
    async with CoordinatorClient(address, keys.KeyPair.generate()) as c:
        _, chunks, events, job_id = await llm_job(c)
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            sql = "SELECT count(*) FROM events WHERE job_id=?"
            (rows,) = conn.execute(sql, (job_id,)).fetchone()
        backend = await asyncio.to_thread(EmbeddedLlama)  # the worker's defaults
        try:
            executor = LlmExecutor(backend)
            await raw_first_token(executor)  # warm-up
            figures = LlmFigures(chunks, events, int(rows), [], [])
            for _ in range(runs):  # alternating: a change in the machine's load hits both
                figures.network_after_raw.append((await llm_job(c, LLM_WARMUP_TOKENS))[0])
                figures.network_ttft.append((await llm_job(c))[0])
                figures.raw_after_network.append(await raw_first_token(executor, LLM_WARMUP_TOKENS))
                figures.raw_ttft.append(await raw_first_token(executor))
        finally:
            backend.close()
    return figures


@dataclass
class Settlement:
    drained_seconds: float
    transactions: int
    settled: int
    delays: Series  # completion -> settled, each paid job (from the coordinator's store)
    completing_seconds: float  # from the first paid job's completion to the last's
    settling_seconds: float  # from the first settlement to the last


async def wait_settled(
    address: str, client_key: keys.KeyPair, job_ids: list[str], db: Path
) -> Settlement:
    """Polls every paid job until its payment leaves "authorized"; then reads from the
    coordinator's store (db) when each job completed and when its payment was settled."""
    from dispatchnet.client import CoordinatorClient

    start = time.perf_counter()
    txs: set[str] = set()
    settled = 0
    pending = list(job_ids)
    async with CoordinatorClient(address, client_key) as c:
        while pending:
            still = []
            for job_id in pending:
                j = await c.get(job_id)
                if j.payment.status == "authorized":
                    still.append(job_id)
                    continue
                if j.payment.status == "settled":
                    settled += 1
                    txs.add(j.payment.transaction)
            pending = still
            if pending:
                await asyncio.sleep(0.2)
    drained = time.perf_counter() - start
    delays, completing, settling = settlement_times(db, job_ids)
    return Settlement(drained, len(txs), settled, delays, completing, settling)


def settlement_times(db: Path, job_ids: list[str]) -> tuple[Series, float, float]:
    """Completion -> settled of each settled job of job_ids: its payment row's last change
    (the settlement) minus its COMPLETED event's time, both the coordinator's clock; and
    how long the completions and the settlements each took from first to last."""
    from dispatchnet.coordinator.models import JobState

    wanted = set(job_ids)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT p.job_id, e.time, p.updated_at FROM payments p JOIN events e "
            "ON e.job_id = p.job_id AND e.state = ? WHERE p.status = 'settled'",
            (JobState.COMPLETED.value,),
        ).fetchall()
    times = [(done, paid) for job_id, done, paid in rows if job_id in wanted]
    delays = Series("completion -> settled", [max(0.0, paid - done) for done, paid in times])
    if not times:
        return delays, 0.0, 0.0
    completing = max(d for d, _ in times) - min(d for d, _ in times)
    settling = max(p for _, p in times) - min(p for _, p in times)
    delays.elapsed = settling
    return delays, completing, settling


# --- many connected seekers -------------------------------------------------------------


def children_by_parent() -> dict[int, list[int]]:
    """Every live process, listed under its parent's pid (/proc/<pid>/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """pid and every live process descending from it (a coordinator's store writer and
    payment verifiers are its children)."""
    children = children_by_parent()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def process_rss_bytes(pid: int) -> int:
    """One process's resident set size (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time one process has used (/proc/<pid>/stat utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_sum(pid: int, one: Callable[[int], float]) -> float:
    """one(p) summed over pid and its live descendants; OSError when pid itself is gone
    (a descendant that ends meanwhile counts nothing)."""
    total = one(pid)
    for p in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):
            total += one(p)
    return total


def rss_bytes(pid: int) -> int:
    """The resident set size of a process and its live descendants."""
    return int(_tree_sum(pid, process_rss_bytes))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used by a process and its live descendants."""
    return _tree_sum(pid, process_cpu_seconds)


def raise_open_files_limit() -> int:
    """Raises the soft limit of open files to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Scale:
    seekers: int
    e2e_one: Series
    burst: Series
    rss: int
    idle_cpu_percent: float
    connect_seconds: float
    settle: Series | None = None  # health checks right after the wave (see bench_scale)


async def connected_seekers(address: str, client_key: keys.KeyPair) -> int:
    """Workers that can run `echo` (a quote counts them)."""
    from dispatchnet.client import CoordinatorClient, task_spec

    async with CoordinatorClient(address, client_key) as c:
        return int((await c.quote(task_spec("echo", b"null"))).eligible_workers)


async def add_seekers(
    children: Children,
    address: str,
    client_key: keys.KeyPair,
    have: int,
    want: int,
    suffix: str = "",
) -> float:
    """Starts `dispatch seekers` children until `want` seekers run (named seekersN + suffix,
    N the number of their first seeker, which is also their seed: the same devices when
    they come back, with new keys); waits until the coordinator counts them all. Returns
    how long they took to connect."""
    start = time.perf_counter()
    n = have
    while n < want:
        count = min(SEEKERS_PER_PROCESS, want - n)
        await children.dispatch(
            f"seekers{n}{suffix}", "seekers", "--coordinator", address, "--count", str(count),
            "--seed", str(n),
        )  # fmt: skip
        n += count
    await until_connected(address, client_key, want)
    return time.perf_counter() - start


async def until_connected(address: str, client_key: keys.KeyPair, want: int) -> None:
    """Waits until the coordinator counts exactly `want` connected seekers (more leave as
    their processes stop; fewer are still connecting)."""
    deadline = time.perf_counter() + START_TIMEOUT + want / 50
    while (connected := await connected_seekers(address, client_key)) != want:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{connected} seekers connected, not {want}; see seekers*.log")
        await asyncio.sleep(0.5)


def health_probe(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
    """One gRPC health Check on channel per call (it touches no storage)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    check = health_pb2_grpc.HealthStub(channel).Check
    request = health_pb2.HealthCheckRequest()

    def probe() -> Awaitable[object]:
        return check(request)  # type: ignore[no-any-return]

    return probe


async def settle_after_wave(address: str, seconds: float) -> Series:
    """Health checks back to back for `seconds` (see SCALE_SETTLE_SECONDS)."""
    async with grpc.aio.insecure_channel(address) as channel:
        probe = health_probe(channel)
        return await closed_loop("health Check after the wave, 1 caller", 1, seconds, probe)


async def scale_jobs(
    children: Children, address: str, client_key: keys.KeyPair, label: str, seconds: float
) -> tuple[Series, Series]:
    """Trivial jobs end to end from 1 submitter, then from BURST submitters (printing the
    burst's CPU per job: this process, the coordinator, the seekers' processes together)."""
    from dispatchnet.client import CoordinatorClient, task_spec

    async with CoordinatorClient(address, client_key) as c:
        counter = iter(range(10**9))

        async def job() -> None:
            spec = task_spec("echo", f"{label} job {next(counter)}".encode())
            j = await c.commit((await c.quote(spec)).quote_id)
            await c.wait(j.job_id, j.last_sequence)

        await job()  # warm up
        e2e = await closed_loop(f"{label}: job end to end, 1 submitter", 1, seconds / 2, job)
        cpu = CpuMeter(children.pids("coordinator", "seekers"))
        name = f"{label}: burst jobs, {BURST} submitters"
        burst = await cpu.measure(closed_loop(name, BURST, seconds, job))
    cpu.merge("seekers")
    busy = cpu.total / max(1e-9, burst.elapsed)
    print(f"  {label}: {cpu.line(len(burst.samples), 'burst job')}, {busy:.2f} cores busy")
    return e2e, burst


@dataclass
class ScaleRounds:
    """The scale comparison (`compared` connected seekers against SCALE_BASE) in rounds."""

    burst: Rounds  # (burst jobs/s with `compared`, with SCALE_BASE)
    e2e: Rounds  # (job p50 end to end with `compared`, with SCALE_BASE)


async def alternate_scale(
    children: Children,
    address: str,
    client_key: keys.KeyPair,
    seconds: float,
    base: Scale,
    compared: Scale,
) -> ScaleRounds:
    """ALTERNATE_ROUNDS more rounds of the scale comparison after the first (base, then
    compared, as bench_scale measured them): the seekers beyond base's stop and the
    coordinator is left with base's, their jobs are measured; then as many seekers connect
    again (from the same seeds, with new keys: new workers to the coordinator), the wave
    settles as in bench_scale, and their jobs are measured. A round's two sides are about
    half a minute apart."""
    burst = Rounds([(compared.burst.rate, base.burst.rate)])
    e2e = Rounds([(compared.e2e_one.p50_ms, base.e2e_one.p50_ms)])
    keep = tuple(f"seekers{n}" for n in range(0, base.seekers, SEEKERS_PER_PROCESS))
    for r in range(2, 2 + ALTERNATE_ROUNDS):
        children.stop("seekers", keep=keep)
        await until_connected(address, client_key, base.seekers)
        low = await scale_jobs(
            children, address, client_key, f"round {r}: {base.seekers} seekers", seconds
        )
        took = await add_seekers(
            children, address, client_key, base.seekers, compared.seekers, f"-r{r}"
        )
        settle = await settle_after_wave(address, min(SCALE_SETTLE_SECONDS, 1.2 * seconds))
        high = await scale_jobs(
            children, address, client_key, f"round {r}: {compared.seekers} seekers", seconds
        )
        for series in (*low, *high):
            print("  " + series.line())
        print(
            f"  round {r}: {compared.seekers} seekers connected again in {took:.1f}s, "
            f"then {settle.line()}, longest {settle.longest_ms:.0f} ms"
        )
        e2e.pairs.append((high[0].p50_ms, low[0].p50_ms))
        burst.pairs.append((high[1].rate, low[1].rate))
    return ScaleRounds(burst, e2e)


async def bench_scale(
    children: Children,
    address: str,
    coordinator_pid: int,
    seconds: float,
    sizes: list[int],
    compared: int,
) -> tuple[list[Scale], ScaleRounds]:
    """Trivial jobs with each number of connected seekers in `sizes` (ascending, the first
    SCALE_BASE); at `compared` (one of them) the comparison with the first is measured in
    rounds (alternate_scale) before more seekers connect."""
    figures: list[Scale] = []
    client_key, have = keys.KeyPair.generate(), 0
    rounds: ScaleRounds | None = None
    for n in sizes:
        took = await add_seekers(children, address, client_key, have, n)
        have = n
        settle = await settle_after_wave(address, min(SCALE_SETTLE_SECONDS, 1.2 * seconds))
        print(f"  {n} seekers: {settle.line()}, longest {settle.longest_ms:.0f} ms")
        e2e, burst = await scale_jobs(children, address, client_key, f"{n} seekers", seconds)
        cpu = cpu_seconds(coordinator_pid)
        t = time.perf_counter()
        await asyncio.sleep(min(IDLE_SECONDS, max(1.0, seconds)))
        idle = 100 * (cpu_seconds(coordinator_pid) - cpu) / (time.perf_counter() - t)
        rss = rss_bytes(coordinator_pid)
        for series in (e2e, burst):
            print("  " + series.line())
        print(
            f"  {n} seekers connected in {took:.1f}s; coordinator RSS {rss / 2**20:,.0f} MiB, "
            f"idle CPU {idle:.1f}% of a core over {time.perf_counter() - t:.1f}s (no jobs); "
            f"load average (1 min) {load_average():.2f}"
        )
        figures.append(Scale(n, e2e, burst, rss, idle, took, settle))
        if n == compared and n != figures[0].seekers:
            rounds = await alternate_scale(
                children, address, client_key, seconds, figures[0], figures[-1]
            )
    if rounds is None:  # nothing compared with the base but itself
        base = figures[0]
        rounds = ScaleRounds(
            Rounds([(base.burst.rate, base.burst.rate)]),
            Rounds([(base.e2e_one.p50_ms, base.e2e_one.p50_ms)]),
        )
    return figures, rounds


# --- the run ----------------------------------------------------------------------------


def with_verify_processes(profile_text: str, processes: int = VERIFY_PROCESSES) -> str:
    """A profile's text with `[payments] verify_processes` set (see payments/verifier.py)."""
    header = "[payments]\n"
    if header not in profile_text or "verify_processes" in profile_text:
        raise ValueError("the profile has no [payments] table to add verify_processes to")
    return profile_text.replace(header, f"{header}verify_processes = {processes}\n", 1)


def ms_list(seconds: list[float]) -> str:
    return ", ".join(f"{s * 1000:.1f}" for s in seconds)


FIGURE_WIDTH = 72
VALUE_WIDTH = 16


def ratio_row(figure: str, value: str, ratio: float, target: str) -> str:
    return f"  {figure:<{FIGURE_WIDTH}} {value:>{VALUE_WIDTH}} {ratio:>8.2f}   {target}"


async def run_bench(
    seconds: float = 5.0,
    many: int = 64,
    scale: int = 5000,
    llm_runs: int = LLM_RUNS,
    most: int = 10000,
) -> int:
    """The whole bench: each measurement runs `seconds`; the throughput run has `many`
    submitters; the time to first token is the median of `llm_runs` warm runs each way;
    the scale section compares SCALE_BASE connected seekers with `scale` (jobs), then
    connects `most` (memory and idle CPU; jobs too, printed beside).
    0 when every job submitted during the write-lock hold completed and every paid job
    settled."""
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    children = Children(tmp)
    old_home = os.environ.get("DISPATCH_HOME")
    os.environ["DISPATCH_HOME"] = children.env["DISPATCH_HOME"]
    chain_profile = None
    open_files = raise_open_files_limit()
    print(
        f"dispatch bench: {os.cpu_count()} cores, {seconds:g} s per measurement, "
        f"open files limit {open_files}"
    )
    try:
        print("raw grpc.aio baseline (child process)")
        raw = await bench_raw(children, seconds)
        for s in (raw.unary, raw.unary_one, raw.bidi, raw.bidi_one):
            print("  " + s.line())
        print(
            f"  CPU ms (server + this process): {raw.unary_cpu_ms:.3f} per unary RPC, "
            f"{raw.bidi_cpu_ms:.3f} per bidi round trip; a trivial job's {JOB_UNARY_CALLS} "
            f"calls and {JOB_STREAM_ROUND_TRIPS:g} stream round trip (offer, result) at "
            "that cost: "
            f"{raw.job_floor_cpu_ms():.2f} ms, at most "
            f"{raw.ceiling_jobs_per_second(os.cpu_count() or 1):,.0f} jobs/s on "
            f"{os.cpu_count()} cores; end to end at least {raw.floor_p50_ms():.2f} ms "
            f"(with RunJob, {RUN_JOB_CALLS} call: "
            f"{raw.job_floor_cpu_ms(RUN_JOB_CALLS):.2f} ms, "
            f"{raw.ceiling_jobs_per_second(os.cpu_count() or 1, RUN_JOB_CALLS):,.0f} jobs/s, "
            f"{raw.floor_p50_ms(RUN_JOB_CALLS):.2f} ms)"
        )
        print(f"  load average (1 min): {load_average():.2f}")
        # the raw server stays up (idle) for the later rounds (alternate_run_job)

        print("unpaid trivial TASK jobs: coordinator (profile local) and workers in children")
        info = await children.dispatch(
            "coordinator", "coordinator", "--profile", "local", "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp / "coord-local"),
        )  # fmt: skip
        address = str(info["listening"])
        await start_workers(children, address, tmp)
        unpaid, _ = await bench_jobs(
            "unpaid", address, keys.KeyPair.generate(), None, seconds, many,
            children.pids("coordinator", "worker"),
        )  # fmt: skip
        run_rounds: tuple[Rounds, Rounds] | None = None
        if unpaid.run_many is not None and unpaid.run_one is not None:
            run_rounds = await alternate_run_job(address, raw, unpaid, seconds, many)
            print("  " + run_rounds[0].line("RunJob jobs/s / raw unary RPC/s"))
            print("  " + run_rounds[1].line("RunJob p50 / raw unary p50"))
        children.stop("raw")
        db = tmp / "coord-local/coordinator.db"
        print(
            f"the same coordinator while this process holds its database's write lock "
            f"for {LOCK_HOLD_SECONDS:g}s (BEGIN IMMEDIATE and a write)"
        )
        lock = await bench_write_lock(address, db, keys.KeyPair.generate())
        for s in (lock.before, lock.during, lock.submits):
            print(f"  {s.line()}, longest {s.longest_ms:.2f} ms")
        print(
            f"  lock held {lock.held_seconds:.2f}s; {lock.completed} of "
            f"{len(lock.submits.samples)} jobs submitted during the hold completed, "
            f"the last {lock.drained_seconds:.2f}s after the release; "
            f"load average (1 min) {load_average():.2f}"
        )
        print(
            f"one {LLM_TOKENS}-token LLM job on a desktop worker (the shipped model), then "
            f"time to first token, {llm_runs} warm runs each: through the network and raw"
        )
        from dispatchnet.worker.llm import LlmSetupError

        llm: LlmFigures | None = None
        try:
            llm = await bench_llm(children, address, tmp, db, llm_runs)
            print(f"  {llm.chunks} progress events, {llm.events} events, {llm.rows} durable rows")
            network_ms, raw_ms = llm.ttft_ms
            print(
                f"  time to first token, median: network {network_ms:.1f} ms (CommitJob to "
                f"the first progress on WatchJob; runs {ms_list(llm.network_ttft)}), raw "
                f"llama.cpp {raw_ms:.1f} ms (runs {ms_list(llm.raw_ttft)}); each run "
                f"right after a {LLM_WARMUP_TOKENS}-token one on its own side"
            )
            print(
                f"  those {LLM_WARMUP_TOKENS}-token runs, each right after the other side's "
                f"full run (its processes idle meanwhile): network "
                f"{ms_list(llm.network_after_raw)}, raw {ms_list(llm.raw_after_network)}"
            )
        except (RuntimeError, TimeoutError, grpc.aio.AioRpcError, LlmSetupError) as e:
            print(f"  skipped: {e}")
        children.stop("worker")
        children.stop("desktop")

        room = open_files - OPEN_FILES_SPARE  # the coordinator: one per seeker
        compared, most_fit = min(scale, room), min(max(most, scale), room)
        sizes = sorted({SCALE_BASE, compared, most_fit})
        print(
            f"scale: the same coordinator with {' then '.join(map(str, sizes))} seekers connected"
            + (
                f" ({max(most, scale)} do not fit in {open_files} open files)"
                if most_fit < max(most, scale)
                else ""
            )
        )
        scaled, scale_rounds = await bench_scale(
            children, address, children.pid("coordinator"), seconds, sizes, compared
        )
        print("  " + scale_rounds.burst.line(f"burst jobs/s, {compared} / {SCALE_BASE} seekers"))
        print("  " + scale_rounds.e2e.line(f"job p50, {compared} / {SCALE_BASE} seekers"))
        children.stop_all()

        print("paid trivial TASK jobs: local anvil, coordinator (profile local-monad), x402")
        import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
        from dispatchnet.devchain.local_chain import chain_up
        from dispatchnet.payments.wallet import Wallet
        from dispatchnet.profiles import load_profile, resolve_path

        chain_profile = load_profile("local-monad")
        chain = await asyncio.to_thread(chain_up, chain_profile, 0)
        paid_profile = tmp / "local-monad-bench.toml"  # with a payment verifier process
        paid_profile.write_text(with_verify_processes(resolve_path("local-monad").read_text()))
        info = await children.dispatch(
            "coordinator-paid", "coordinator", "--profile", str(paid_profile), "--listen",
            "127.0.0.1:0", "--data-dir", str(tmp / "coord-paid"),
        )  # fmt: skip
        address = str(info["listening"])
        await start_workers(children, address, tmp)
        wallet = Wallet.of_deployment(chain, chain_profile.wallet.max_per_job_micros)
        payer = keys.KeyPair.generate()
        paid, paid_ids = await bench_jobs(
            "paid", address, payer, wallet, seconds, None, children.pids("coordinator", "worker")
        )
        paid_rounds, more_ids = await alternate_paid(
            children, tmp, address, payer, wallet, paid, unpaid, seconds
        )
        paid_ids += more_ids
        print("  " + paid_rounds.line("paid jobs/s / unpaid jobs/s"))
        print(f"  waiting for settlement of {len(paid_ids)} paid jobs")
        settlement = await wait_settled(address, payer, paid_ids, tmp / "coord-paid/coordinator.db")
        print(
            f"  settled {settlement.settled} of {len(paid_ids)} in "
            f"{settlement.drained_seconds:.1f}s after the load stopped, "
            f"{settlement.transactions} settlement transactions"
        )
        offered = len(settlement.delays.samples) / max(1e-9, settlement.completing_seconds)
        print(
            f"  {settlement.delays.line()} (settled from the first settlement to the last, "
            f"read from the store); the same jobs completed over "
            f"{settlement.completing_seconds:.1f}s: {offered:,.0f}/s offered"
        )
        children.stop_all()

        print(
            f"cluster: trivial TASK jobs from {many} submitters on 1 coordinator on SQLite, "
            f"then 1 and 2 coordinators on one PostgreSQL (a throwaway local cluster, fsync "
            f"off, as `dispatch cluster up` starts it); {WORKERS} workers ({WORKER_SLOTS} "
            f"slots each) split over the coordinators, jobs sent to each in turn"
        )
        from dispatchnet.bench_cluster import bench_cluster

        cluster = await bench_cluster(children, tmp, seconds, many)

        base, top = scaled[0], scaled[-1]
        mid = next(f for f in scaled if f.seekers == compared)
        per100 = 100 * settlement.transactions / max(1, settlement.settled)
        many_rate = unpaid.jobs_many.rate if unpaid.jobs_many else float("nan")
        print(
            "summary (ratio = figure / its baseline in this run; *: the median of "
            f"{1 + ALTERNATE_ROUNDS} rounds, the two sides measured in turn)"
        )
        print(f"  {'figure':<{FIGURE_WIDTH}} {'value':>{VALUE_WIDTH}} {'ratio':>8}   target")
        cores = os.cpu_count() or 1
        ceiling = raw.ceiling_jobs_per_second(cores) / raw.unary.rate
        run_ceiling = raw.ceiling_jobs_per_second(cores, RUN_JOB_CALLS) / raw.unary.rate
        if run_rounds is not None:
            print(ratio_row(
                f"trivial jobs/s with RunJob, {many} submitters / raw unary RPC/s *",
                f"{run_rounds[0].value():,.0f}/s", run_rounds[0].ratio(),
                f">= 0.2 (raw-cost ceiling here: {run_ceiling:.2f})",
            ))  # fmt: skip
        print(ratio_row(
            f"trivial jobs/s, quote + commit + watch, {many} submitters / raw unary RPC/s",
            f"{many_rate:,.0f}/s", many_rate / raw.unary.rate,
            f"none (3 calls; raw-cost ceiling here: {ceiling:.2f})",
        ))  # fmt: skip
        if run_rounds is not None:
            print(ratio_row(
                "job p50 end to end with RunJob, 1 submitter / raw unary p50 *",
                f"{run_rounds[1].value():.2f} ms", run_rounds[1].ratio(),
                f"<= 5 (raw-cost floor here: "
                f"{raw.floor_p50_ms(RUN_JOB_CALLS) / raw.unary_one.p50_ms:.1f})",
            ))  # fmt: skip
        print(ratio_row(
            "job p50 end to end, quote + commit + watch, 1 submitter / raw unary p50",
            f"{unpaid.e2e_one.p50_ms:.2f} ms", unpaid.e2e_one.p50_ms / raw.unary_one.p50_ms,
            f"none (3 calls; raw-cost floor here: "
            f"{raw.floor_p50_ms() / raw.unary_one.p50_ms:.1f})",
        ))  # fmt: skip
        if unpaid.run_cpu is not None and unpaid.run_many is not None:
            run_cpu_ms = unpaid.run_cpu.ms_per(len(unpaid.run_many.samples))
            print(ratio_row(
                "CPU per trivial job with RunJob, all processes / at the raw cost",
                f"{run_cpu_ms:.2f} ms", run_cpu_ms / raw.job_floor_cpu_ms(RUN_JOB_CALLS),
                "none (explains jobs/s)",
            ))  # fmt: skip
        print(ratio_row(
            "CPU per trivial job, quote + commit + watch / at the raw cost",
            f"{unpaid.cpu.ms_per(unpaid.cpu_jobs):.2f} ms",
            unpaid.cpu.ms_per(unpaid.cpu_jobs) / raw.job_floor_cpu_ms(), "none (explains jobs/s)",
        ))  # fmt: skip
        print(ratio_row(
            "longest health-check latency while another process holds the write lock",
            f"{lock.during.longest_ms:.1f} ms", lock.during.longest_ms / 20, "<= 20 ms",
        ))  # fmt: skip
        diff = paid.commit_four.p50_ms - unpaid.commit_four.p50_ms
        print(ratio_row(
            "paid - unpaid CommitJob p50, 4 submitters (ms)",
            f"{diff:.1f} ms", diff / max(1e-9, unpaid.commit_four.p50_ms), "diff <= 25 ms",
        ))  # fmt: skip
        print(ratio_row(
            "paid jobs/s / unpaid jobs/s, 16 submitters *",
            f"{paid_rounds.value():,.1f}/s", paid_rounds.ratio(), ">= 0.5",
        ))  # fmt: skip
        print(ratio_row(
            "settlement transactions per 100 paid jobs", f"{per100:.0f}", per100 / 100, "<= 10",
        ))  # fmt: skip
        if llm is not None:
            print(ratio_row(
                f"durable event rows, {LLM_TOKENS}-token LLM job / its events",
                f"{llm.rows} rows", llm.rows / max(1, llm.events), "<= 10 rows",
            ))  # fmt: skip
            network_ms, raw_ms = llm.ttft_ms
            print(ratio_row(
                "LLM time to first token, network / raw llama.cpp",
                f"{network_ms:.1f} / {raw_ms:.1f} ms", network_ms / raw_ms, "<= 1.3",
            ))  # fmt: skip
        print(ratio_row(
            f"burst jobs/s, {mid.seekers} / {base.seekers} connected seekers *",
            f"{scale_rounds.burst.value():,.0f}/s", scale_rounds.burst.ratio(), ">= 0.8",
        ))  # fmt: skip
        print(ratio_row(
            f"job p50 end to end, {mid.seekers} / {base.seekers} connected seekers *",
            f"{scale_rounds.e2e.value():.2f} ms", scale_rounds.e2e.ratio(), "<= 1.5",
        ))  # fmt: skip
        if top is not mid:
            print(ratio_row(
                f"burst jobs/s, {top.seekers} / {base.seekers} connected seekers",
                f"{top.burst.rate:,.0f}/s", top.burst.rate / base.burst.rate,
                f"none (the target is at {mid.seekers})",
            ))  # fmt: skip
            print(ratio_row(
                f"job p50 end to end, {top.seekers} / {base.seekers} connected seekers",
                f"{top.e2e_one.p50_ms:.2f} ms", top.e2e_one.p50_ms / base.e2e_one.p50_ms,
                f"none (the target is at {mid.seekers})",
            ))  # fmt: skip
        print(ratio_row(
            f"coordinator RSS, {top.seekers} connected seekers / 1 GiB",
            f"{top.rss / 2**20:,.0f} MiB", top.rss / GIB, "<= 1",
        ))  # fmt: skip
        print(ratio_row(
            f"coordinator idle CPU, {top.seekers} connected seekers / 10% of a core",
            f"{top.idle_cpu_percent:.1f}%", top.idle_cpu_percent / 10, "<= 1",
        ))  # fmt: skip
        if cluster.pg_one is not None and cluster.pg_two is not None:
            lite, one, two = cluster.sqlite_one.jobs, cluster.pg_one.jobs, cluster.pg_two.jobs
            print(ratio_row(
                f"trivial jobs/s, {many} submitters: 2 / 1 coordinators on one PostgreSQL",
                f"{two.rate:,.0f}/s", two.rate / one.rate,
                f"none ({os.cpu_count()} cores shared)",
            ))  # fmt: skip
            print(ratio_row(
                f"trivial jobs/s, {many} submitters, 1 coordinator: PostgreSQL / SQLite",
                f"{one.rate:,.0f}/s", one.rate / lite.rate, "none",
            ))  # fmt: skip
        lock_lost = lock.submits.errors or lock.completed < len(lock.submits.samples)
        return 0 if settlement.settled == len(paid_ids) and not lock_lost else 1
    finally:
        children.stop_all()
        if chain_profile is not None:
            from dispatchnet.devchain.local_chain import chain_down

            await asyncio.to_thread(chain_down, chain_profile)
        if old_home is None:
            os.environ.pop("DISPATCH_HOME", None)
        else:
            os.environ["DISPATCH_HOME"] = old_home
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["raw-server"]:
        with contextlib.suppress(KeyboardInterrupt):
            eventloop.run(serve_raw())  # on the loop the coordinator runs on
