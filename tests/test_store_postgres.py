"""What only the PostgreSQL store does, and a coordinator running on it.

Its migrations (versioned in schema_version, run once by coordinators opening together),
the errors of a database that is missing, refuses us or goes away, and claims that skip
what another transaction holds. Then a coordinator on PostgreSQL, in process and as
`dispatch coordinator --store postgresql://...`, runs jobs end to end and finds them again
after a restart. The behaviour it shares with SQLite is the contract in test_store.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from conftest import Cluster, Proc, make_profile, wait_until
from test_cli import cli_env, failed, ok_json, run
from test_progress import TEXT, Streamer, Watcher, consecutive
from test_receipt_batches import holds, proof_of
from test_store import SPEC, make_job, queued

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator.models import (
    AnchorStatus,
    Event,
    EventKind,
    JobState,
    Quote,
    Receipt,
    ReceiptBatch,
    UnbatchedReceipt,
)
from dispatchnet.devchain.processes import pid_alive
from dispatchnet.errors import Unavailable
from dispatchnet.keys import KeyPair
from dispatchnet.loops import OutboxLoop
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.server import start_coordinator
from dispatchnet.store.base import QuoteUsage
from dispatchnet.store.local_postgres import ROLE, LocalPostgres
from dispatchnet.store.postgres import SCHEMA_VERSION, open_postgres_store
from dispatchnet.worker.runtime import Worker
from dispatchnet.worker.tasks import TaskOutput

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


# --- the throwaway cluster ------------------------------------------------------------------


async def test_the_test_cluster_listens_on_loopback_and_wants_a_password(
    postgres: LocalPostgres,
) -> None:
    conn = await asyncpg.connect(postgres.url())
    try:
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW server_version_num") >= "150000"
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'postgres'"
        )
        assert owner == ROLE
    finally:
        await conn.close()
    pid = postgres.server_pid()
    assert pid is not None
    uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()
    # initdb refuses root: under root the server runs as the postgres system user
    assert int(uids[0]) == (pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid())
    wrong = postgres.url().replace(postgres.password, "wrong")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


# --- migrations -------------------------------------------------------------------------------


async def test_coordinators_opening_together_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(open_postgres_store(pg_url, pool_size=2) for _ in range(4)))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 4
    finally:
        for s in stores:
            await s.close()
    conn = await asyncpg.connect(pg_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {"jobs", "events", "payments", "payouts", "receipt_batches"} <= tables
    finally:
        await conn.close()


async def test_the_quote_total_is_spread_over_rows_and_summed(pg_url: str) -> None:
    """Every GetQuote counts its quote in the total of quote_usage: kept in several rows
    (summed when read), so quotes at several coordinators do not all wait for one row's
    lock; released quotes give their usage back to the row that counted them."""
    store = await open_postgres_store(pg_url, pool_size=2)
    conn = await asyncpg.connect(pg_url)
    try:
        for n in range(40):
            await store.put_quote(Quote(f"q_{n}", SPEC, 1, "USD", 1.0, 10.0), f"c{n % 3}", 10)
        totals = await conn.fetch("SELECT owner FROM quote_usage WHERE owner LIKE '*%'")
        assert len(totals) > 1
        assert await store.quote_usage("c0") == (QuoteUsage(14, 140), QuoteUsage(40, 400))
        assert await store.release_expired_quotes(now=11.0) == 40
        assert await store.quote_usage("c0") == (QuoteUsage(0, 0), QuoteUsage(0, 0))
        assert await conn.fetch("SELECT owner FROM quote_usage WHERE quotes <> 0") == []
    finally:
        await conn.close()
        await store.close()


async def test_a_newer_schema_refuses_to_open(pg_url: str) -> None:
    await (await open_postgres_store(pg_url)).close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(
        RuntimeError, match=rf"schema v{SCHEMA_VERSION + 1} is newer.*v{SCHEMA_VERSION}"
    ):
        await open_postgres_store(pg_url)


# --- a database that is not there, refuses us, or goes away --------------------------------------


async def test_a_database_that_is_down_refuses_or_does_not_exist_says_so(
    postgres: LocalPostgres,
) -> None:
    with pytest.raises(Unavailable, match="cannot reach"):
        await open_postgres_store(f"postgresql://{ROLE}:x@127.0.0.1:{_free_port()}/postgres")
    with pytest.raises(ValueError, match="refused"):
        await open_postgres_store(postgres.url().replace(postgres.password, "wrong"))
    with pytest.raises(ValueError, match="does not exist"):
        await open_postgres_store(postgres.url("no_such_database"))


async def test_losing_the_database_makes_calls_unavailable_and_stop_leaves_no_server() -> None:
    cluster = LocalPostgres.create()
    try:
        pid = cluster.server_pid()
        assert pid is not None and pid_alive(pid)
        store = await open_postgres_store(cluster.url())
        await store.create_job(make_job("job_1"), queued("job_1"))
        assert await store.get_job("job_1") is not None
    finally:
        cluster.stop()  # pg_ctl stop -w: returns once the server has exited
    assert not cluster.directory.exists() and not pid_alive(pid)
    with pytest.raises(Unavailable):
        await store.get_job("job_1")
    with pytest.raises(Unavailable):
        await store.create_job(make_job("job_2", key="k2"), queued("job_2"))
    await asyncio.wait_for(store.close(), 10)


# --- claims ------------------------------------------------------------------------------------


async def test_a_batch_skips_receipts_another_transaction_holds_without_waiting(
    pg_url: str,
) -> None:
    store = await open_postgres_store(pg_url)
    holder = await asyncpg.connect(pg_url)
    try:
        await store.create_job(make_job("job_1"), queued("job_1"))
        body = b"receipt"
        receipt = Receipt(body, b"w", b"c", hashlib.sha256(body).digest())
        await store.transition(
            "job_1",
            (JobState.QUEUED,),
            None,
            {"state": JobState.COMPLETED, "receipt": receipt},
            None,
        )
        [leaf] = await store.unbatched_receipts(10)
        assert leaf == UnbatchedReceipt("job_1", receipt.sha256, leaf.completed_at)
        batch = ReceiptBatch("b1", b"r" * 32, 1, 1.0, AnchorStatus.NONE)
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM jobs WHERE job_id='job_1' FOR UPDATE")
        # another batcher holds the receipt: refused at once, not after the holder ends
        assert not await asyncio.wait_for(store.create_receipt_batch(batch, [leaf]), 2)
        await tx.rollback()
        assert await store.create_receipt_batch(batch, [leaf])
        assert await store.receipt_leaf("job_1") is not None
    finally:
        await holder.close()
        await store.close()


# --- background work once across coordinators ------------------------------------------------


async def test_a_pass_lock_has_one_holder_and_a_dead_holder_frees_it(pg_url: str) -> None:
    a, b = await open_postgres_store(pg_url), await open_postgres_store(pg_url)
    admin = await asyncpg.connect(pg_url)
    try:
        async with a.pass_lock("payment-settler") as held:
            assert held and await a.pass_still_held("payment-settler")
            assert not await a.pass_still_held("feedback-sender")  # not taken
            async with b.pass_lock("payment-settler") as other:
                assert not other  # at once, not after a's pass
            async with b.pass_lock("feedback-sender") as free:
                assert free  # another loop's lock is another lock
        async with b.pass_lock("payment-settler") as held:
            assert held  # a's pass ended: b's turn
        async with a.pass_lock("jobs-sweep") as held:
            assert held
            # a dies mid-pass (its session ends): the lock is free for b's next pass
            await admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks "  # waits for its end
                "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
            )
            # fencing: a's pass learns it lost the lock before its next side effect
            assert not await a.pass_still_held("jobs-sweep")
            async with b.pass_lock("jobs-sweep") as taken:
                assert taken and await b.pass_still_held("jobs-sweep")
                assert not await a.pass_still_held("jobs-sweep")
                async with a.pass_lock("jobs-sweep") as again:
                    assert not again  # a reconnects for its next pass, and waits its turn
        async with a.pass_lock("jobs-sweep") as held:
            assert held
    finally:
        await admin.close()
        await a.close()
        await b.close()


class _CountingLoop(OutboxLoop):
    """A loop whose passes note how many of its kind run at once."""

    name = "counting"
    running = 0
    most = 0
    passes = 0

    async def run_pass(self) -> int:
        cls = _CountingLoop
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        try:
            await asyncio.sleep(0.002)  # a pass's work, for another coordinator to overlap
        finally:
            cls.running -= 1  # also when a stop cancels it
        cls.passes += 1
        return 0


async def test_a_loop_on_three_coordinators_runs_one_pass_at_a_time(pg_url: str) -> None:
    stores = [await open_postgres_store(pg_url) for _ in range(3)]
    loops = [_CountingLoop(tick_seconds=0.001) for _ in stores]
    try:
        for loop, store in zip(loops, stores, strict=True):
            loop.locks = store
            loop.start()
        await wait_until(lambda: _CountingLoop.passes >= 60, what="60 passes")
        assert _CountingLoop.most == 1
        await loops[0].stop()  # its holder gone, the others carry on
        done = _CountingLoop.passes
        await wait_until(lambda: _CountingLoop.passes >= done + 20, what="20 more passes")
        assert _CountingLoop.most == 1
    finally:
        for loop in loops:
            await loop.stop()
        for store in stores:
            await store.close()


# --- job changes across coordinators ----------------------------------------------------------


async def test_a_store_hears_the_job_changes_other_stores_commit(pg_url: str) -> None:
    a, b = await open_postgres_store(pg_url), await open_postgres_store(pg_url)
    heard: list[tuple[str, JobState]] = []
    try:
        await a.listen_jobs(lambda job_id, state: heard.append((job_id, state)))
        await b.create_job(make_job("job_b"), queued("job_b"))
        await a.create_job(make_job("job_a", key="k2"), queued("job_a"))  # its own: not told
        await b.transition(
            "job_b",
            (JobState.QUEUED,),
            None,
            {"state": JobState.CANCELLED},
            Event("job_b", EventKind.STATE, JobState.CANCELLED, 1.0, reason="cancelled"),
        )
        await wait_until(lambda: len(heard) == 2, what="two notifications")
        assert heard == [("job_b", JobState.QUEUED), ("job_b", JobState.CANCELLED)]
    finally:
        await a.close()
        await b.close()


async def test_a_store_listens_again_whatever_the_first_try_raises(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its listening connection ends (a PostgreSQL restart); the first try to listen again
    fails as a reused pooled connection did after a restart (InternalClientError, which
    ended the retrying task for good): it tries again, and hears the others' changes."""
    a, b = await open_postgres_store(pg_url), await open_postgres_store(pg_url)
    heard: list[str] = []
    try:
        await a.listen_jobs(lambda job_id, state: heard.append(job_id))
        listen = a._listen
        failures = iter([asyncpg.InternalClientError("cannot switch to state 11")])

        async def flaky() -> None:
            failure = next(failures, None)
            if failure is not None:
                raise failure
            await listen()

        monkeypatch.setattr(a, "_listen", flaky)
        assert a._listen_conn is not None
        pid = a._listen_conn.get_server_pid()
        admin = await asyncpg.connect(pg_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()

        async def listening_again() -> bool:
            return a._listen_conn is not None and a._listen_conn.get_server_pid() != pid

        await wait_until(listening_again, what="listening again")
        await b.create_job(make_job("job_b"), queued("job_b"))
        await wait_until(lambda: heard == ["job_b"], what="the other store's change heard")
    finally:
        await a.close()
        await b.close()


async def test_a_statement_on_a_connection_the_server_closed_is_unavailable(pg_url: str) -> None:
    """What asyncpg raises on a pooled connection a restarted server closed (not one of its
    connection errors) is the database being away, not an internal error."""
    store = await open_postgres_store(pg_url)
    try:
        for error in (
            asyncpg.InterfaceError(
                "cannot call Transaction.__aexit__(): the underlying connection is closed"
            ),
            asyncpg.InternalClientError("cannot switch to state 12"),
        ):

            async def op(c: Any, error: Exception = error) -> None:
                raise error

            with pytest.raises(Unavailable, match="database is unavailable"):
                await store._read(op)
            with pytest.raises(Unavailable, match="database is unavailable"):
                await store._write(op)
    finally:
        await store.close()


class _Cancellable(Streamer):
    """A Streamer that notes being cancelled mid-run."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = asyncio.Event()

    async def run(self, spec: common_pb2.JobSpec, progress: Any) -> TaskOutput:
        try:
            return await super().run(spec, progress)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_coordinators_on_one_database_wake_each_other(tmp_path: Path, pg_url: str) -> None:
    """A job committed at A is offered at once by B, whose worker runs it; WatchJob at A
    follows it (progress as B flushes it), and a cancel at A reaches B's worker. Sweeps
    are a minute apart and the watch's poll is 5 s: only notifications are this fast."""
    profile = make_profile(
        store={"url": pg_url},
        jobs={"sweep_interval_seconds": 60, "progress_flush_seconds": 0.1},
    )
    a = Cluster(await start_coordinator(profile, tmp_path / "a", "127.0.0.1:0"), tmp_path)
    b = Cluster(await start_coordinator(profile, tmp_path / "b", "127.0.0.1:0"), tmp_path)
    try:
        streamer = _Cancellable()
        await b.worker(executors=[streamer])
        c = a.client()
        job = await c.submit(task_spec("echo", b"x"))
        live = Watcher(c, job.job_id)
        half = len(TEXT) // 2
        await wait_until(lambda: len(live.progress()) == half, within=3, what="progress at A")
        cancelled = await c.cancel(job.job_id)
        assert cancelled.state == coordinator_pb2.JOB_STATE_CANCELLED
        await asyncio.wait_for(streamer.cancelled.wait(), 3)  # B's worker was told
        await asyncio.wait_for(live.task, 3)
        states = [e.state_change.to_state for e in live.events if e.HasField("state_change")]
        assert states == [
            coordinator_pb2.JOB_STATE_QUEUED,
            coordinator_pb2.JOB_STATE_OFFERED,
            coordinator_pb2.JOB_STATE_RUNNING,
            coordinator_pb2.JOB_STATE_CANCELLED,
        ]
        assert consecutive(live.events, 1)
        streamer.gate.set()
        done = await c.submit(task_spec("echo", b"y"))
        finished = await asyncio.wait_for(c.wait(done.job_id), 3)
        assert finished.state == COMPLETED
    finally:
        await a.close()
        await b.close()


# --- a coordinator on PostgreSQL -----------------------------------------------------------------


async def test_a_coordinator_on_postgresql_runs_jobs_end_to_end_and_after_a_restart(
    tmp_path: Path, pg_url: str
) -> None:
    profile = make_profile(
        store={"url": pg_url}, receipts={"batch_size": 2, "batch_max_age_seconds": 0.5}
    )
    data, client_key = tmp_path / "coord", KeyPair.generate()
    cluster = Cluster(await start_coordinator(profile, data, "127.0.0.1:0"), tmp_path)
    try:
        streamer = Streamer()
        streamer.gate.set()
        await cluster.worker(executors=[streamer])
        c = cluster.client(client_key)
        jobs = [await c.submit(task_spec("echo", f"[{i}]".encode())) for i in range(3)]
        live = Watcher(c, jobs[0].job_id)
        done = [await c.wait(j.job_id) for j in jobs]
        await live.done()
        assert all(d.state == COMPLETED for d in done)
        assert [p.progress.text for p in live.progress()] == TEXT and consecutive(live.events, 1)
        for d in done:
            assert verify_receipt_message(d.receipt, cluster.coord.public_key).valid
        assert holds(await proof_of(c, done[0].job_id))
    finally:
        await cluster.close()
    assert not (data / "coordinator.db").exists()  # nothing went to SQLite

    again = Cluster(await start_coordinator(profile, data, "127.0.0.1:0"), tmp_path)
    try:
        c = again.client(client_key)
        for d in done:
            job = await c.get(d.job_id)
            assert job.state == COMPLETED and job.receipt == d.receipt
        # every event, progress chunk by chunk, read back from PostgreSQL
        stored = [item.event async for item in c.watch(jobs[0].job_id, 0)]
        assert stored == live.events
        assert holds(await proof_of(c, done[1].job_id))
    finally:
        await again.close()


async def test_dispatch_coordinator_store_flag_runs_on_postgresql(
    tmp_path: Path,
    pg_url: str,
    procs: Callable[[list[str]], Proc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = urlsplit(pg_url).password
    assert password is not None
    monkeypatch.setenv("PGPASSWORD", password)  # the url names no password: libpq's variable
    url = _without_password(pg_url)
    coord = procs(["coordinator", "--listen", "127.0.0.1:0", "--store", url])
    assert coord.info["store"] == url
    worker = Worker(coord.info["listening"], KeyPair.generate(), backoff_initial=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        env = cli_env(tmp_path / "home")
        submit = ["job", "submit", "--task", "sha256", "--input", json.dumps("hi"), "--wait"]
        job = ok_json(await run(*submit, "--coordinator", coord.info["listening"], env=env))
        assert job["state"] == "JOB_STATE_COMPLETED"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10)
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 4") == 1
    finally:
        await conn.close()


async def test_a_store_that_cannot_be_used_is_a_one_line_error(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    base = ["coordinator", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    err = failed(await run(*base, "--store", "mysql://db/x", env=env))
    assert "[store] url 'mysql://db/x' must be empty" in err and "Traceback" not in err
    down = f"postgresql://{ROLE}:secret@127.0.0.1:{_free_port()}/x"
    err = failed(await run(*base, "--store", down, env=env))
    assert "cannot reach the store's database" in err and "Traceback" not in err
    assert "secret" not in err
