"""ThreadedStore: SQLite off the event loop, group commit, parallel reads, real lock waits."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_store import _payment as payment
from test_store import make_job, queued

from dispatchnet.coordinator.models import (
    AnchorStatus,
    Event,
    EventKind,
    Job,
    JobState,
    Receipt,
    ReceiptBatch,
    UnbatchedReceipt,
)
from dispatchnet.errors import PaymentReused, Unavailable
from dispatchnet.store.base import Store
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.store.threaded import ThreadedStore, open_store


def offered(job_id: str) -> Event:
    return Event(job_id, EventKind.STATE, JobState.OFFERED, 102.0, from_state=JobState.QUEUED)


def offer_changes(attempts: int = 1) -> dict[str, Any]:
    return {"state": JobState.OFFERED, "worker_id": "w1", "attempts": attempts}


def new_job(n: int) -> tuple[Job, Event]:
    return make_job(f"job_{n}", key=f"k{n}"), queued(f"job_{n}")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coord.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[ThreadedStore]:
    s = await open_store(db_path, readers=2)
    yield s
    await s.close()


@pytest.fixture(params=["thread", "process"])
async def either_store(
    db_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ThreadedStore]:
    """A store with each writer (tests that need no function on the writer thread)."""
    s = await open_store(db_path, readers=2, writer=request.param)
    assert s.writer == request.param
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def writer_held(store: ThreadedStore) -> AsyncIterator[None]:
    """Keeps the writer thread busy for the block, so the writes queued in it are taken
    together as one group when it ends."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    release = threading.Event()

    def block(_: SqliteStore) -> None:
        loop.call_soon_threadsafe(started.set_result, None)
        release.wait(10)

    held = asyncio.create_task(store.run_write(block))
    await started
    try:
        yield
        await asyncio.sleep(0)  # the tasks created in the block run up to their await
    finally:
        release.set()
        await held


_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute(sys.argv[2])
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("committed", flush=True)
"""


@contextlib.asynccontextmanager
async def other_process_holding_the_write_lock(
    path: Path, sql: str = "SELECT 1"
) -> AsyncIterator[None]:
    """Another process runs `sql` in BEGIN IMMEDIATE and holds the write lock for the
    block; it commits when the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        str(path),
        sql,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"locked\n"
        yield
        proc.stdin.write(b"commit\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"committed\n"
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class Heartbeat:
    """Ticks every 10 ms on the loop and records the longest gap between two ticks."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.longest = 0.0
        self.last = self.loop.time()
        self.handle = self.loop.call_later(0.01, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        self.handle = self.loop.call_later(0.01, self._tick)

    def stop(self) -> float:
        self.handle.cancel()
        return self.longest


def test_writes_go_to_the_writer_and_reads_to_the_readers() -> None:
    # a port method writes when its SqliteStore method does (a transaction or a DML
    # statement); a new method classified the wrong way fails here
    writes = re.compile(r"_tx\(\)|\bINSERT\b|\bUPDATE\b|\bDELETE\b")
    port = [
        name
        for name in dir(Store)
        if inspect.iscoroutinefunction(getattr(Store, name))
        # no SQL: closing, other coordinators' changes, the pass lock (one process)
        and name not in ("close", "listen_jobs", "pass_still_held")
    ]
    assert len(port) > 50
    for name in port:
        threaded = inspect.getsource(getattr(ThreadedStore, name))
        # the SqliteStore method it calls (create_job's write is insert_job)
        called = re.search(r"_write_call\(\s*SqliteStore\.(\w+)", threaded)
        sync = getattr(SqliteStore, called.group(1) if called else name)
        sync_writes = bool(writes.search(inspect.getsource(sync)))
        assert inspect.iscoroutinefunction(getattr(ThreadedStore, name)), name
        # (each write as one method call: it can run in the writer process)
        assert ("self._write_call(" in threaded) == sync_writes, name
        assert ("self._read(" in threaded) == (not sync_writes), name


async def test_reads_run_on_reader_threads_that_cannot_write(store: ThreadedStore) -> None:
    # (that a write is visible to the next read is in the store contract, test_store.py)
    port: Store = store  # ThreadedStore implements the Store port (mypy checks this line)
    for n in range(30):
        job, event = new_job(n)
        await port.create_job(job, event)
        assert await port.transition(job.job_id, (JobState.QUEUED,), 0, offer_changes(), None)
        assert await port.get_job(job.job_id) is not None
        assert [e.state for e in await port.events_after(job.job_id, 0)] == [JobState.QUEUED]
    reader = await store.run_read(lambda s: threading.current_thread().name)
    assert reader.startswith("store-reader-")
    assert await store.run_read(lambda s: s.schema_version()) > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await store.run_read(lambda s: s.record_worker_seen("w1", 1, 0.0))  # readers never write
    stats = store.stats()
    assert stats.writes == 60 and stats.reads >= 63


async def test_reads_run_in_parallel(store: ThreadedStore) -> None:
    both = threading.Barrier(2, timeout=5)  # passes only when two readers wait at once

    def meet(s: SqliteStore) -> Job | None:
        both.wait()
        return s.get_job("job_0")

    first, second = await asyncio.gather(store.run_read(meet), store.run_read(meet))
    assert first is None and second is None


async def test_concurrent_writes_commit_in_groups_and_survive_a_reopen(
    either_store: ThreadedStore, db_path: Path
) -> None:
    store = either_store
    created = await asyncio.gather(*(store.create_job(*new_job(n)) for n in range(200)))
    assert all(new for _, new in created)
    moved = await asyncio.gather(
        *(
            store.transition(
                f"job_{n}", (JobState.QUEUED,), 0, offer_changes(), offered(f"job_{n}")
            )
            for n in range(200)
        )
    )
    assert all(j is not None and j.state is JobState.OFFERED for j in moved)
    read = await store.get_job("job_7")  # a reader thread sees what the writer committed
    assert read is not None and read.state is JobState.OFFERED and read.last_sequence == 2
    stats = store.stats()
    assert stats.writes == 400
    assert stats.commits < stats.writes / 4, stats  # far fewer COMMITs than writes
    assert stats.largest_group > 1
    await store.close()

    again = SqliteStore(db_path)
    try:
        for n in range(200):
            job = again.get_job(f"job_{n}")
            assert job is not None and job.state is JobState.OFFERED and job.last_sequence == 2
    finally:
        again.close()


async def test_a_failing_write_fails_only_its_caller_in_a_group(store: ThreadedStore) -> None:
    # a completed job with a receipt, for a batch that is refused halfway
    done, event = new_job(0)
    await store.create_job(done, event)
    receipt = Receipt(b"body", b"w" * 64, b"c" * 64, b"h" * 32)
    await store.transition(
        "job_0", (JobState.QUEUED,), 0, {"state": JobState.COMPLETED, "receipt": receipt}, None
    )
    batch = ReceiptBatch("b1", b"r" * 32, 2, 200.0, AnchorStatus.PENDING)
    leaves = [
        UnbatchedReceipt("job_0", b"h" * 32, 100.0),
        UnbatchedReceipt("ghost", b"g" * 32, 1.0),
    ]

    groups = store.stats().commits
    async with writer_held(store):
        a = asyncio.create_task(store.create_job(*new_job(1), payment("job_1", 1)))
        reused = asyncio.create_task(store.create_job(*new_job(2), payment("job_2", 1)))
        refused = asyncio.create_task(store.create_receipt_batch(batch, leaves))
        c = asyncio.create_task(store.create_job(*new_job(3), payment("job_3", 3)))
    assert (await a)[1] and (await c)[1]
    with pytest.raises(PaymentReused):
        await reused
    assert await refused is False  # its _Conflict rolled back its first leaf, only that
    stats = store.stats()
    assert stats.commits == groups + 2 and stats.largest_group == 4  # the hold, then one group

    assert await store.get_job("job_2") is None  # the failed write left nothing
    assert await store.get_payment("job_1") is not None
    assert await store.get_payment("job_3") is not None
    assert await store.receipt_leaf("job_0") is None
    assert [r.job_id for r in await store.unbatched_receipts(10)] == ["job_0"]


async def test_the_loop_runs_while_another_process_holds_the_write_lock(
    either_store: ThreadedStore, db_path: Path
) -> None:
    store = either_store
    await store.create_job(*new_job(1))
    writes = store.stats().writes
    # the other process moves the job to attempt 7: our write only matches after its commit
    async with other_process_holding_the_write_lock(
        db_path, "UPDATE jobs SET attempts=7 WHERE job_id='job_1'"
    ):
        beat = Heartbeat()
        write = asyncio.create_task(
            store.transition("job_1", (JobState.QUEUED,), 7, offer_changes(8), offered("job_1"))
        )
        await asyncio.sleep(0.3)  # the loop runs on while the write waits on the lock
        if store._pipe is None:
            assert store.stats().writes == writes + 1 and not write.done()  # taken, waiting
        else:  # the child has it (counted once answered)
            assert list(store._pipe._sent) and not write.done()
        read = await store.get_job("job_1")  # WAL: a reader does not wait for the writer
        assert read is not None and read.attempts == 0 and not write.done()
    moved = await asyncio.wait_for(write, 5)
    longest = beat.stop()
    assert moved is not None and moved.attempts == 8 and moved.state is JobState.OFFERED
    assert longest < 0.5, f"the event loop stalled for {longest:.3f} s"


async def test_close_runs_the_queued_writes_then_stops_the_threads(db_path: Path) -> None:
    # (that close finishes what was submitted and refuses later calls is in the contract)
    store = ThreadedStore(db_path, readers=2)
    pending = [asyncio.create_task(store.create_job(*new_job(n))) for n in range(50)]
    await asyncio.sleep(0)  # all queued
    await store.close()
    assert all(t.done() and t.result()[1] for t in pending)
    assert not any(t.is_alive() for t in store._threads)


async def test_a_memory_database_reads_on_the_writer_thread() -> None:
    async with ThreadedStore(":memory:", readers=2) as store:
        assert await store.run_read(lambda s: threading.current_thread().name) == "store-writer"
        # in queue order: each read comes after the write queued before it
        results = await asyncio.gather(
            *(
                c
                for n in range(20)
                for c in (store.create_job(*new_job(n)), store.get_job(f"job_{n}"))
            )
        )
        assert all(r is not None for r in results[1::2])
        stats = store.stats()
        assert stats.writes == 20 and stats.reads == 21


async def test_a_failed_commit_fails_every_write_of_the_group(
    store: ThreadedStore, db_path: Path
) -> None:
    # a real COMMIT failure: a deferred foreign key that job_bad's insert breaks is only
    # checked at COMMIT, so every write of its group is rolled back with it
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.executescript(
        "CREATE TABLE parent (id TEXT PRIMARY KEY);"
        "CREATE TABLE child (pid TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
        "CREATE TRIGGER bad AFTER INSERT ON jobs WHEN NEW.job_id = 'job_bad' "
        "BEGIN INSERT INTO child VALUES ('nobody'); END;"
    )
    raw.close()
    await store.run_write(lambda s: s.db.execute("PRAGMA foreign_keys=ON"))
    bad = make_job("job_bad", key="kbad"), queued("job_bad")
    async with writer_held(store):
        group = [
            asyncio.create_task(store.create_job(*new_job(1))),
            asyncio.create_task(store.create_job(*bad)),
            asyncio.create_task(store.record_worker_seen("w1", 1, 0.0)),
        ]
    for task in group:
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            await task
    assert await store.get_job("job_1") is None and await store.get_job("job_bad") is None
    assert (await store.create_job(*new_job(2)))[1]  # the writer goes on


async def test_a_group_whose_transaction_is_lost_keeps_nothing(store: ThreadedStore) -> None:
    # as when SQLite rolls a transaction back whole (I/O error, full disk): here an
    # operation ends it itself, and every write of its group fails with nothing kept
    async with writer_held(store):
        before = asyncio.create_task(store.create_job(*new_job(1)))
        culprit = asyncio.create_task(store.run_write(lambda s: s.db.execute("ROLLBACK")))
        after = asyncio.create_task(store.create_job(*new_job(2)))
    for task in (before, culprit, after):
        with pytest.raises(sqlite3.OperationalError, match="no such savepoint"):
            await task
    assert await store.get_job("job_1") is None and await store.get_job("job_2") is None
    assert (await store.create_job(*new_job(3)))[1]  # the writer goes on


async def test_a_group_that_cannot_begin_fails_every_write(
    store: ThreadedStore, db_path: Path
) -> None:
    await store.run_write(lambda s: s.db.execute("PRAGMA busy_timeout=100"))
    async with other_process_holding_the_write_lock(db_path):
        async with writer_held(store):
            group = [asyncio.create_task(store.create_job(*new_job(n))) for n in range(3)]
        for task in group:
            with pytest.raises(Unavailable, match="locked") as busy:  # UNAVAILABLE: retry
                await task
            assert isinstance(busy.value.__cause__, sqlite3.OperationalError)
    assert (await store.create_job(*new_job(0)))[1]  # once the lock is free again


async def test_open_store_raises_what_opening_raised(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version=999")
    raw.close()
    with pytest.raises(RuntimeError, match="newer than this build"):
        await open_store(db_path)
