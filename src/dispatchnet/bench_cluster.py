"""The bench's cluster section (`make bench`; bench.run_bench runs it): trivial jobs/s from
the same submitters on one coordinator on SQLite, one coordinator on PostgreSQL, and two
coordinators on one PostgreSQL; and where the machine's CPU and the database's work went.

Each run starts its own `dispatch coordinator --profile local` children (on PostgreSQL with
`--store postgresql://…`, the password in PGPASSWORD, each run on a new database of one
throwaway cluster started as `dispatch cluster up` starts it: store/local_postgres.py,
fsync off), WORKERS `dispatch worker` children split over the coordinators (worker n's
`--coordinator` list starts at coordinator n mod k), and this process's submitters, whose
jobs go to each coordinator in turn (a job's GetQuote, CommitJob and WatchJob at one).
Over each timed run it reads:

- the CPU seconds of this process (the submitters), the workers, the coordinators and
  every PostgreSQL process (/proc/<pid>/stat before and after), and the machine's busy
  time (/proc/stat), each as a % of one core;
- on PostgreSQL, from pg_stat_statements (loaded when the machine's PostgreSQL has it):
  statements, COMMITs, NOTIFYs and rows written per job, the database's execution time per
  job, and the mean time of the quote_usage upsert (it includes waiting for the lock of
  the one `total` row every GetQuote updates);
- on PostgreSQL, what its busy backends wait for: pg_stat_activity sampled every
  WAIT_SAMPLE_SECONDS (on CPU, a row lock, the lock every transaction that sent a NOTIFY
  takes at its commit, ...). The sampling's own queries count in PostgreSQL's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispatchnet import keys
from dispatchnet.bench import (
    WORKER_SLOTS,
    WORKERS,
    Children,
    Series,
    children_by_parent,
    closed_loop,
    load_average,
    process_cpu_seconds,
    process_tree,
)
from dispatchnet.store.local_postgres import (
    ROLE,
    LocalPostgres,
    PostgresNotFound,
    PostgresStartError,
    has_library,
)

STATEMENTS = "pg_stat_statements"
TOP_STATEMENTS = 3  # the statements printed, by their share of the database's time
QUERY_CHARS = 70
WAIT_SAMPLE_SECONDS = 0.02
TOP_WAITS = 4
# what a wait event of pg_stat_activity means here
WAIT_MEANINGS = {
    "on CPU": "running",
    "idle in transaction": "in a transaction, waiting for its coordinator's next statement",
    "Client:ClientRead": "reading a statement from its coordinator",
    "Lock:transactionid": "a row lock held by another transaction",
    "Lock:tuple": "a row lock held by another transaction",
    "Lock:object": "the lock a transaction that sent a NOTIFY takes to commit",
    "LWLock:NotifyQueue": "the NOTIFY queue",
    "LWLock:WALWrite": "writing the WAL",
    "IPC:ProcArrayGroupUpdate": "the commit's snapshot bookkeeping",
}
Admin = Any  # an asyncpg connection to the cluster's `postgres` database (asyncpg is untyped)


# --- CPU --------------------------------------------------------------------------------


def _cpu(pid: int) -> float | None:
    try:
        return process_cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None  # gone


def children_of(parent: int) -> list[int]:
    """The processes whose parent is `parent` (/proc/<pid>/stat's ppid)."""
    return children_by_parent().get(parent, [])


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used, over all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Cpu:
    """CPU seconds used by each group of processes over `elapsed` wall seconds."""

    elapsed: float
    used: dict[str, float]  # group -> CPU seconds
    machine: float  # every process on the machine

    def pct(self, seconds: float) -> float:
        return 100 * seconds / self.elapsed if self.elapsed else 0.0

    def line(self) -> str:
        cores = os.cpu_count() or 1
        groups = ", ".join(f"{g} {self.pct(s):.0f}" for g, s in self.used.items())
        others = max(0.0, self.machine - sum(self.used.values()))
        return (
            f"CPU, % of one core ({cores} cores = {100 * cores}): {groups}; the machine "
            f"{self.pct(self.machine):.0f} (other processes {self.pct(others):.0f})"
        )


class CpuMeter:
    """CPU seconds of groups of processes between start() and stop(); each group's pids
    are asked for at both ends (processes that appear count from 0, processes gone before
    stop() count what they had used at start())."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self._machine = 0.0
        self._start = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for group, pids in self.groups.items():
            out[group] = {p: c for p in pids() if (c := _cpu(p)) is not None}
        return out

    def start(self) -> None:
        self._before = self._read()
        self._machine = machine_busy_seconds()
        self._start = time.perf_counter()

    def stop(self) -> Cpu:
        elapsed = time.perf_counter() - self._start
        machine = machine_busy_seconds() - self._machine
        after = self._read()
        used = {}
        for group, before in self._before.items():
            now = after.get(group, {})
            used[group] = sum(now.get(p, c) - c for p, c in before.items()) + sum(
                c for p, c in now.items() if p not in before
            )
        return Cpu(elapsed, used, machine)


# --- the database's work ----------------------------------------------------------------


@dataclass
class DbWork:
    """What the database did over a run (pg_stat_statements), per job completed in it."""

    jobs: int
    statements: int  # besides BEGIN and COMMIT
    commits: int
    notifies: int
    rows_written: int  # by INSERT, UPDATE and DELETE
    exec_ms: float  # every statement's execution time, summed
    quote_usage_ms: float  # the quote_usage upsert's mean
    top: list[tuple[str, int, float]]  # (query, calls, total ms), the longest first

    def per_job(self, n: float) -> float:
        return n / self.jobs if self.jobs else float("nan")

    def lines(self) -> list[str]:
        out = [
            f"database per job: {self.per_job(self.statements):.1f} statements and "
            f"{self.per_job(self.commits):.1f} COMMITs, {self.per_job(self.notifies):.1f} "
            f"NOTIFYs, {self.per_job(self.rows_written):.1f} rows written, "
            f"{self.per_job(self.exec_ms):.2f} ms executing; the quote_usage upsert "
            f"{self.quote_usage_ms:.3f} ms on average (with its wait for the row's lock)"
        ]
        for query, calls, ms in self.top:
            text = " ".join(query.split())
            text = text if len(text) <= QUERY_CHARS else text[: QUERY_CHARS - 1] + "…"
            out.append(f"  {100 * ms / max(1e-9, self.exec_ms):.0f}% of it: {calls} x {text}")
        return out


async def reset_statements(admin: Admin) -> None:
    await admin.execute(f"SELECT {STATEMENTS}_reset()")


async def read_statements(admin: Admin, database: str, jobs: int) -> DbWork:
    """The statements run on `database` since the last reset, over `jobs` jobs."""
    rows = await admin.fetch(
        f"SELECT s.query, s.calls, s.total_exec_time, s.rows FROM {STATEMENTS} s "
        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
        database,
    )
    work = DbWork(jobs, 0, 0, 0, 0, 0.0, 0.0, [])
    upserts = 0.0
    upsert_calls = 0
    for r in rows:
        query, calls, ms, affected = str(r[0]), int(r[1]), float(r[2]), int(r[3])
        head = query.lstrip().upper()
        work.exec_ms += ms
        if head.startswith(("COMMIT", "END")):
            work.commits += calls
            continue
        if head.startswith(("BEGIN", "START TRANSACTION", "ROLLBACK")):
            continue
        work.statements += calls
        if "PG_NOTIFY" in head:
            work.notifies += calls
        if head.startswith(("INSERT", "UPDATE", "DELETE")):
            work.rows_written += affected
        if head.startswith("INSERT INTO QUOTE_USAGE"):
            upserts += ms
            upsert_calls += calls
    work.quote_usage_ms = upserts / upsert_calls if upsert_calls else float("nan")
    longest = sorted(rows, key=lambda r: float(r[2]), reverse=True)[:TOP_STATEMENTS]
    work.top = [(str(r[0]), int(r[1]), float(r[2])) for r in longest]
    return work


@dataclass
class Waits:
    """What the database's busy backends were doing, sampled: per look, each backend of
    the database that is `active` counts once under its wait event (or "on CPU"), and
    each `idle in transaction` once under that (it holds its locks meanwhile)."""

    looks: int = 0
    seen: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        busy = sum(self.seen.values())
        if not busy:
            return f"database backends: none seen busy in {self.looks} looks"
        shares = "; ".join(
            f"{100 * n / busy:.0f}% {WAIT_MEANINGS.get(what, what)}"
            + (f" ({what})" if ":" in what and what in WAIT_MEANINGS else "")
            for what, n in self.seen.most_common(TOP_WAITS)
        )
        return (
            f"database backends busy: {busy / self.looks:.2f} on average (pg_stat_activity, "
            f"{self.looks} looks): {shares}"
        )


async def sample_waits(admin: Admin, database: str, going: asyncio.Event) -> Waits:
    """Looks at `database`'s active backends every WAIT_SAMPLE_SECONDS until `going` is
    set."""
    waits = Waits()
    while not going.is_set():
        rows = await admin.fetch(
            "SELECT state, wait_event_type, wait_event FROM pg_stat_activity WHERE datname = $1 "
            "AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()",
            database,
        )
        waits.looks += 1
        for state, kind, event in rows:
            if state != "active":
                waits.seen[str(state)] += 1
            else:
                waits.seen["on CPU" if kind is None else f"{kind}:{event}"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(going.wait(), WAIT_SAMPLE_SECONDS)
    return waits


# --- the runs ---------------------------------------------------------------------------


@dataclass
class ClusterRun:
    label: str
    coordinators: int
    jobs: Series
    cpu: Cpu
    db: DbWork | None
    waits: Waits | None
    load: float

    def lines(self) -> list[str]:
        out = [self.jobs.line(), self.cpu.line()]
        pg = self.cpu.used.get("PostgreSQL")
        if pg and self.jobs.samples:
            ms = 1000 * pg / len(self.jobs.samples)
            out.append(
                f"PostgreSQL CPU {ms:.2f} ms per job ({self.cpu.pct(pg):.0f}% of one core at "
                f"{self.jobs.rate:,.0f} jobs/s): one core of it would serve ~{1000 / ms:,.0f} "
                f"jobs/s if nothing else limited it"
            )
        if self.db is not None:
            out += self.db.lines()
        if self.waits is not None:
            out.append(self.waits.line())
        out.append(f"load average (1 min) {self.load:.2f}")
        return out


@dataclass
class ClusterFigures:
    sqlite_one: ClusterRun
    pg_one: ClusterRun | None  # None: no PostgreSQL here
    pg_two: ClusterRun | None


async def run_jobs(
    children: Children,
    tmp: Path,
    label: str,
    stores: list[list[str]],
    seconds: float,
    submitters: int,
    postgres: Callable[[], list[int]] | None = None,
    admin: Admin | None = None,
    database: str = "",
    statements: bool = False,
) -> ClusterRun:
    """One coordinator per entry of `stores` (its extra arguments), WORKERS workers split
    over them, `submitters` submitting trivial jobs to each coordinator in turn for
    `seconds`; everything it started is stopped when it returns."""
    from dispatchnet.client import CoordinatorClient, task_spec

    slug = label.replace(" ", "-").replace(",", "").lower()
    try:
        addresses = []
        for i, extra in enumerate(stores):
            info = await children.dispatch(
                f"{slug}-coordinator{i}", "coordinator", "--profile", "local",
                "--listen", "127.0.0.1:0", "--data-dir", str(tmp / f"{slug}-coordinator{i}"),
                *extra,
            )  # fmt: skip
            addresses.append(str(info["listening"]))
        for n in range(WORKERS):
            first = n % len(addresses)
            await children.dispatch(
                f"{slug}-worker{n}", "worker",
                "--coordinator", ",".join(addresses[first:] + addresses[:first]),
                "--kind", "seeker", "--max-concurrency", str(WORKER_SLOTS),
                "--key-file", str(tmp / f"worker{n}.key"),
            )  # fmt: skip
        meter = CpuMeter(
            {
                "submitters (this process)": lambda: [os.getpid()],
                "workers": lambda: [children.pid(f"{slug}-worker{n}") for n in range(WORKERS)],
                "coordinators": lambda: [  # each with its children (its store's writer)
                    p
                    for i in range(len(stores))
                    for p in process_tree(children.pid(f"{slug}-coordinator{i}"))
                ],
                **({"PostgreSQL": postgres} if postgres is not None else {}),
            }
        )
        client_key = keys.KeyPair.generate()
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(CoordinatorClient(a, client_key)) for a in addresses
            ]
            counter = itertools.count()

            async def job() -> None:
                n = next(counter)
                c = clients[n % len(clients)]
                spec = task_spec("echo", f"{slug} job {n}".encode())
                j = await c.commit((await c.quote(spec)).quote_id)
                await c.wait(j.job_id, j.last_sequence)

            for _ in clients:
                await job()  # warm up each coordinator
            if admin is not None and statements:
                await reset_statements(admin)
            stop_sampling = asyncio.Event()
            sampling = (
                asyncio.create_task(sample_waits(admin, database, stop_sampling))
                if admin is not None
                else None
            )
            meter.start()
            try:
                jobs = await closed_loop(
                    f"{label}: jobs, {submitters} submitters", submitters, seconds, job
                )
            finally:
                cpu = meter.stop()
                stop_sampling.set()
                waits = await sampling if sampling is not None else None
            db = None
            if admin is not None and statements:
                db = await read_statements(admin, database, len(jobs.samples))
        return ClusterRun(label, len(stores), jobs, cpu, db, waits, load_average())
    finally:
        children.stop_all()


async def bench_cluster(
    children: Children, tmp: Path, seconds: float, submitters: int
) -> ClusterFigures:
    """The three runs, printed as they end: SQLite, then a throwaway PostgreSQL with one
    coordinator, then two (each on a new database of it)."""
    import asyncpg

    def show(run: ClusterRun) -> None:
        for line in run.lines():
            print("  " + line)

    sqlite_one = await run_jobs(children, tmp, "SQLite, 1 coordinator", [[]], seconds, submitters)
    show(sqlite_one)
    statements = has_library(STATEMENTS)
    try:
        pg = await asyncio.to_thread(
            LocalPostgres.create,
            settings=[f"shared_preload_libraries = '{STATEMENTS}'"] if statements else [],
        )
    except (PostgresNotFound, PostgresStartError) as e:
        print(f"  PostgreSQL runs skipped: {e}")
        return ClusterFigures(sqlite_one, None, None)
    children.env["PGPASSWORD"] = pg.password
    try:
        admin = await asyncpg.connect(pg.url("postgres"))
        try:
            if statements:
                await admin.execute(f"CREATE EXTENSION IF NOT EXISTS {STATEMENTS}")
            else:
                print(f"  (no {STATEMENTS} module here: no statement counts)")
            server = pg.server_pid()
            assert server is not None

            def postgres() -> list[int]:
                return [server, *children_of(server)]

            runs = []
            for coordinators, database in ((1, "bench_one"), (2, "bench_two")):
                await admin.execute(f'CREATE DATABASE "{database}"')
                url = f"postgresql://{ROLE}@127.0.0.1:{pg.port}/{database}"
                plural = "s" if coordinators > 1 else ""
                run = await run_jobs(
                    children, tmp, f"PostgreSQL, {coordinators} coordinator{plural}",
                    [["--store", url]] * coordinators, seconds, submitters, postgres,
                    admin, database, statements,
                )  # fmt: skip
                show(run)
                runs.append(run)
        finally:
            await admin.close()
    finally:
        children.env.pop("PGPASSWORD", None)
        await asyncio.to_thread(pg.stop)
    one, two = runs
    cores = os.cpu_count() or 1
    print(
        f"  2 / 1 coordinators on one PostgreSQL: {two.jobs.rate / one.jobs.rate:.2f} "
        f"(load average (1 min) {two.load:.2f}, the machine {two.cpu.pct(two.cpu.machine):.0f}% "
        f"busy of {100 * cores}%): on {cores} cores the submitters, the workers, PostgreSQL "
        f"and both coordinators share the CPU, so no linear scaling can show"
    )
    return ClusterFigures(sqlite_one, one, two)
