"""ThreadedStore with its writes in a process of their own (`sqlite_writer = "process"`):
the same group commit and errors as the writer thread, a real child process that is
replaced when it dies and gone after close."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store import _payment as payment
from test_store_threaded import (
    new_job,
    other_process_holding_the_write_lock,
)

from dispatchnet.errors import PaymentReused, TooManyOpenJobs, Unavailable
from dispatchnet.profiles import check_profile, load_profile
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.store.threaded import ThreadedStore, _translated, open_store
from dispatchnet.store.writer_process import READ_BYTES, decode_error, encode_error


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coord.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[ThreadedStore]:
    s = await open_store(db_path, readers=2, writer="process")
    yield s
    await s.close()


def child_of(store: ThreadedStore) -> subprocess.Popen[bytes]:
    assert store._pipe is not None and store._pipe.process is not None
    return store._pipe.process


async def test_the_child_runs_the_writes_and_exits_when_the_store_closes(
    store: ThreadedStore,
) -> None:
    # (group commit, reads and the write lock, with both writers: test_store_threaded.py)
    assert store.writer == "process"
    child = child_of(store)
    assert child.poll() is None
    assert (await store.create_job(*new_job(1)))[1]
    assert store.stats().writes == 1 and store.stats().commits == 1
    await store.close()
    assert child.poll() == 0  # the child exited on its own when its input ended
    assert store._pipe is not None and store._pipe.process is None


async def test_a_write_and_its_outcome_larger_than_a_read_of_the_pipe_arrive_whole(
    store: ThreadedStore,
) -> None:
    # each way, the frame takes several reads (READ_BYTES each) and is put back together
    job, event = new_job(1)
    spec_bytes = os.urandom(3 * READ_BYTES + 1)
    job = dataclasses.replace(job, spec=dataclasses.replace(job.spec, spec_bytes=spec_bytes))
    created, fresh = await store.create_job(job, event)
    assert fresh and created.spec.spec_bytes == spec_bytes  # the child's answer, read back
    stored = await store.get_job(job.job_id)
    assert stored is not None and stored.spec.spec_bytes == spec_bytes


async def test_errors_come_back_as_the_child_raised_them(store: ThreadedStore) -> None:
    first = await store.create_job(*new_job(1), payment("job_1", 1))
    assert first[1]
    results = await asyncio.gather(
        store.create_job(*new_job(2), payment("job_2", 1)),  # the same authorization
        store.create_job(*new_job(3), payment("job_3", 3)),
        return_exceptions=True,
    )
    reused, fine = results
    assert isinstance(reused, PaymentReused) and reused.reason == "payment_already_used"
    assert "already used" in str(reused)
    assert not isinstance(fine, BaseException) and fine[1]  # its group-mate was kept
    assert await store.get_job("job_2") is None

    job, event = new_job(4)
    with pytest.raises(TooManyOpenJobs) as too_many:
        await store.create_job(dataclasses.replace(job, client_id="client-a"), event, max_open=2)
    assert str(too_many.value) == str(TooManyOpenJobs(2))  # its message, formatted once


def test_an_exception_travels_with_its_message_and_attributes() -> None:
    for e in (TooManyOpenJobs(5), PaymentReused("used"), sqlite3.OperationalError("locked")):
        back = decode_error(encode_error(e))
        assert type(back) is type(e) and str(back) == str(e)
        assert vars(back) == vars(e)
    busy = _translated(decode_error(encode_error(sqlite3.OperationalError("database is locked"))))
    assert isinstance(busy, Unavailable)  # as the thread's error would be

    class Local(Exception):  # not importable by the parent: comes back as its text
        pass

    back = decode_error(encode_error(Local("odd")))
    assert type(back) is RuntimeError and str(back) == "Local: odd"


async def test_a_child_that_dies_fails_its_writes_with_unavailable_and_is_replaced(
    store: ThreadedStore, db_path: Path
) -> None:
    await store.create_job(*new_job(1))
    pipe = store._pipe
    assert pipe is not None
    first = child_of(store)
    # the child waits on the lock with a write in hand when it is killed
    async with other_process_holding_the_write_lock(db_path):
        write = asyncio.create_task(store.create_job(*new_job(2)))
        await asyncio.sleep(0)  # the task queues its write for this turn's frame
        await asyncio.sleep(0)  # the frame goes out
        assert pipe._sent and not pipe._batch
        first.kill()
        with pytest.raises(Unavailable, match="writer process ended"):
            await write
    assert await asyncio.to_thread(first.wait) == -9
    assert (await store.create_job(*new_job(3)))[1]  # a new child took over
    second = child_of(store)
    assert second.pid != first.pid

    # a death seen while no write was out: the next write simply starts another
    second.kill()
    await asyncio.wait_for(pipe.died.wait(), 10)  # the loop read the end of its output
    assert pipe.process is None and pipe.deaths == 2
    assert (await store.create_job(*new_job(4)))[1]
    assert child_of(store).pid not in (first.pid, second.pid)
    for n in (1, 3, 4):
        assert await store.get_job(f"job_{n}") is not None
    assert await store.get_job("job_2") is None  # it never committed: the lock was held


async def test_run_write_needs_the_writer_thread(store: ThreadedStore) -> None:
    with pytest.raises(RuntimeError, match="only the writer thread can"):
        await store.run_write(lambda s: s.schema_version())
    assert (await store.create_job(*new_job(1)))[1]  # the store goes on


async def test_opening_raises_what_the_child_raised(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version=999")
    raw.close()
    with pytest.raises(RuntimeError, match="newer than this build"):
        await open_store(db_path, writer="process")


async def test_a_memory_database_or_no_readers_keep_the_writer_thread(db_path: Path) -> None:
    async with ThreadedStore(":memory:", writer="process") as memory:
        assert memory.writer == "thread" and memory._pipe is None
    async with ThreadedStore(db_path, readers=0, writer="process") as unread:
        assert unread.writer == "thread" and (await unread.create_job(*new_job(1)))[1]
    with pytest.raises(ValueError, match="sqlite_writer"):
        ThreadedStore(db_path, writer="fork")


def test_the_profile_names_the_writer_and_its_niceness() -> None:
    profile = load_profile("local")
    assert profile.server.sqlite_writer == "process"
    assert profile.server.sqlite_writer_nice == 10
    wrong = dataclasses.replace(
        profile,
        server=dataclasses.replace(profile.server, sqlite_writer="fork", sqlite_writer_nice=20),
    )
    problems = check_profile(wrong)
    assert '[server] sqlite_writer must be "process" or "thread"' in problems
    assert "[server] sqlite_writer_nice must be 0-19" in problems


async def test_the_child_runs_at_the_niceness_asked_for(db_path: Path) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (0, 10):
        store = await open_store(db_path, readers=1, writer="process", writer_nice=nice)
        try:
            assert (await store.create_job(*new_job(nice + 1)))[1]  # it writes at it too
            child = child_of(store).pid
            assert os.getpriority(os.PRIO_PROCESS, child) == min(mine + nice, 19)
        finally:
            await store.close()
    with pytest.raises(ValueError, match="sqlite_writer_nice"):
        ThreadedStore(db_path, writer="process", writer_nice=-1)


async def test_a_write_that_finds_the_pipe_broken_goes_to_the_next_child(
    store: ThreadedStore,
) -> None:
    await store.create_job(*new_job(1))
    pipe = store._pipe
    assert pipe is not None
    first = child_of(store)
    first.kill()
    first.wait()  # (on the loop: it has not read the end of the child's output yet)
    # the frame cannot be written: the child never had it, so the next child runs it
    assert (await store.create_job(*new_job(2)))[1]
    assert pipe.deaths == 1 and child_of(store).pid != first.pid
    assert await store.get_job("job_2") is not None


async def test_writes_fail_with_unavailable_when_no_child_can_start(
    store: ThreadedStore,
) -> None:
    pipe = store._pipe
    assert pipe is not None
    child = child_of(store)
    child.kill()
    await asyncio.wait_for(pipe.died.wait(), 10)
    argv = pipe._argv
    pipe._argv = ["/nonexistent/python"]
    with pytest.raises(Unavailable, match="cannot start its database writer"):
        await store.create_job(*new_job(1))
    pipe._argv = argv  # the next write tries again
    assert (await store.create_job(*new_job(1)))[1]


async def test_a_write_whose_arguments_do_not_pickle_fails_alone(store: ThreadedStore) -> None:
    odd = store._write_call(SqliteStore.record_task_names, [lambda: 0], 0.0, 10)  # type: ignore[list-item]
    fine = store.create_job(*new_job(1))
    results = await asyncio.gather(odd, fine, return_exceptions=True)
    assert isinstance(results[0], Exception) and "pickle" in str(results[0]).lower()
    created = results[1]
    assert not isinstance(created, BaseException) and created[1]  # its group-mate ran


async def test_the_child_ignores_sigterm_and_sigint(store: ThreadedStore) -> None:
    child = child_of(store)
    await store.create_job(*new_job(1))  # it has set its handlers: it answered
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGINT)
    assert (await store.create_job(*new_job(2)))[1]
    assert child_of(store).pid == child.pid and child.poll() is None


async def test_a_write_from_another_event_loop_is_answered_on_that_loop(
    store: ThreadedStore,
) -> None:
    # the child is driven from the store's loop; a caller on another loop (thread) is
    # handed over to it and answered on its own loop
    def elsewhere() -> tuple[bool, bool]:
        async def write() -> tuple[bool, bool]:
            created = (await store.create_job(*new_job(2)))[1]
            return created, asyncio.get_running_loop() is not store_loop

        return asyncio.run(write())

    store_loop = asyncio.get_running_loop()
    assert await asyncio.to_thread(elsewhere) == (True, True)
    assert await store.get_job("job_2") is not None
