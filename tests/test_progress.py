"""Progress is fanned out from memory and stored coalesced: few durable rows per job, every
chunk still seen live, in order, and resumable from any sequence, also after a restart."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, StoreFactory, make_profile, wait_until
from test_restart import Clock, running, start

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.events import TAIL_EVENTS
from dispatchnet.coordinator.jobs import PROGRESS_FLUSH_CHARS, PROGRESS_FLUSH_CHUNKS
from dispatchnet.coordinator.models import EventKind
from dispatchnet.profiles import Profile
from dispatchnet.server import start_coordinator
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.worker.tasks import TaskOutput

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
CHUNKS = 128
TEXT = [f"tok{i} " for i in range(CHUNKS)]


class Streamer:
    """Runs echo as an LLM would: one progress chunk per token (TEXT), stopping halfway
    until `gate` is set."""

    tasks = ["echo"]
    llm_models: list[str] = []

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return spec.WhichOneof("work") == "task" and spec.task.name == "echo"

    async def run(self, spec: common_pb2.JobSpec, progress: Any) -> TaskOutput:
        for i, text in enumerate(TEXT):
            if i == CHUNKS // 2:
                await self.gate.wait()
            progress(text, (i + 1) / CHUNKS)
        return TaskOutput("".join(TEXT).encode(), "text/plain; charset=utf-8")


def rows(store: SqliteStore, job_id: str, kind: EventKind | None = None) -> int:
    sql, args = "SELECT count(*) FROM events WHERE job_id=?", [job_id]
    if kind is not None:
        sql, args = sql + " AND kind=?", [job_id, kind.value]
    return int(store.db.execute(sql, args).fetchone()[0])


class Watcher:
    """WatchJob from `after` in a task, keeping every event."""

    def __init__(self, c: CoordinatorClient, job_id: str, after: int = 0) -> None:
        self.events: list[coordinator_pb2.JobEvent] = []
        self.job: coordinator_pb2.Job | None = None
        self.task = asyncio.create_task(self._run(c, job_id, after))

    async def _run(self, c: CoordinatorClient, job_id: str, after: int) -> None:
        async for item in c.watch(job_id, after):
            self.events.append(item.event)
            if item.HasField("job"):
                self.job = item.job

    def progress(self) -> list[coordinator_pb2.JobEvent]:
        return [e for e in self.events if e.WhichOneof("detail") == "progress"]

    async def done(self) -> None:
        await asyncio.wait_for(self.task, 15)


def consecutive(events: list[coordinator_pb2.JobEvent], first: int) -> bool:
    return [e.sequence for e in events] == list(range(first, first + len(events)))


@pytest.fixture
def profile() -> Profile:
    # no time-based flush within a test: rows are written by the chunk bound and state changes
    return make_profile(jobs={"progress_flush_seconds": 600})


async def test_progress_reaches_watchers_from_memory_and_is_stored_in_few_rows(
    cluster: Cluster,
) -> None:
    streamer = Streamer()
    await cluster.worker(executors=[streamer])
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"x"))
    live = Watcher(c, job.job_id)
    store = cluster.db

    await wait_until(lambda: len(live.progress()) == CHUNKS // 2, what="half the chunks")
    # seen live, none written yet: the store holds only the state changes
    assert rows(store, job.job_id, EventKind.PROGRESS) == 0
    assert (await c.get(job.job_id)).last_sequence == live.events[-1].sequence
    # a watcher resuming from the middle of what is only in memory gets exactly the rest
    mid = live.progress()[9].sequence
    resumed = Watcher(c, job.job_id, after=mid)
    await wait_until(lambda: len(resumed.progress()) == CHUNKS // 2 - 10, what="resumed")

    streamer.gate.set()
    await live.done()
    await resumed.done()
    assert live.job is not None and live.job.state == COMPLETED, live.job
    assert consecutive(live.events, 1)
    assert [p.progress.text for p in live.progress()] == TEXT
    assert [p.progress.fraction for p in live.progress()][-1] == 1.0
    assert live.events[-1].sequence == live.job.last_sequence
    assert consecutive(resumed.events, mid + 1) and resumed.events == live.events[mid:]

    # queued, offered, accepted, completed + one progress row per PROGRESS_FLUSH_CHUNKS
    assert rows(store, job.job_id) <= 10
    assert rows(store, job.job_id, EventKind.PROGRESS) == -(-CHUNKS // PROGRESS_FLUSH_CHUNKS)
    # from the store, resuming anywhere gives the same events, chunk by chunk
    for after in (0, 3, mid, live.job.last_sequence - 2):
        again = [i.event async for i in c.watch(job.job_id, after)]
        assert again == live.events[after:]
    # the job is final and nobody watches: memory keeps it only as one of the recent
    # jobs (bounded by events.RECENT_JOBS and RECENT_BYTES)
    assert job.job_id in cluster.coord.jobs.live._recent


@pytest.mark.parametrize("profile", [make_profile(jobs={"progress_flush_seconds": 0.05})])
async def test_unwritten_progress_is_stored_within_progress_flush_seconds(
    cluster: Cluster,
) -> None:
    streamer = Streamer()
    await cluster.worker(executors=[streamer])
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"x"))
    store = cluster.db
    # the worker stops halfway; what it sent is written after the delay, not at a change
    await wait_until(
        lambda: len(store.events_after(job.job_id, 3)) == CHUNKS // 2, what="progress stored"
    )
    assert rows(store, job.job_id, EventKind.PROGRESS) <= 10
    streamer.gate.set()
    assert (await c.wait(job.job_id)).state == COMPLETED


async def test_memory_per_job_is_bounded_while_a_watcher_lags(cluster: Cluster) -> None:
    """A job sending more than the bounds writes rows as it goes, and memory keeps only a
    bounded tail; a watcher that starts late reads the rest from the store."""
    jobs = cluster.coord.jobs
    store = cluster.db
    streamer = Streamer()
    await cluster.worker(executors=[streamer])
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"x"))
    live = Watcher(c, job.job_id)
    await wait_until(lambda: len(live.progress()) == CHUNKS // 2, what="half the chunks")
    running = store.get_job(job.job_id)
    assert running is not None
    for i in range(3 * TAIL_EVENTS):  # the worker's own attempt, straight into the service
        await jobs.progress(job.job_id, running.attempts, running.worker_id, f"x{i} ", 0.5)
    pending, _, _ = jobs.live.pending(job.job_id)
    assert 0 < pending < PROGRESS_FLUSH_CHUNKS
    big = "y" * (PROGRESS_FLUSH_CHARS // 2)  # two of them pass the character bound
    await jobs.progress(job.job_id, running.attempts, running.worker_id, big, 0.5)
    assert jobs.live.pending(job.job_id)[0] == pending + 1
    await jobs.progress(job.job_id, running.attempts, running.worker_id, big, 0.5)
    assert jobs.live.pending(job.job_id)[0] == 0
    held = jobs.live.after(job.job_id, jobs.live.last(job.job_id) - TAIL_EVENTS - 1)
    assert held is None  # older events left memory (they are in the store)
    late = [i.event async for i in _until(c, job.job_id, jobs.live.last(job.job_id))]
    assert consecutive(late, 1)
    assert [e.progress.text for e in late if e.WhichOneof("detail") == "progress"] == [
        *TEXT[: CHUNKS // 2],
        *(f"x{i} " for i in range(3 * TAIL_EVENTS)),
        big,
        big,
    ]
    streamer.gate.set()
    await live.done()
    assert consecutive(live.events, 1)


async def _until(c: CoordinatorClient, job_id: str, last: int) -> Any:
    async for item in c.watch(job_id):
        yield item
        if item.event.sequence >= last:
            return


async def test_resume_from_a_stored_sequence_after_a_restart(tmp_path: Path) -> None:
    profile = make_profile(jobs={"progress_flush_seconds": 600, "restart_grace_seconds": 15})
    data = tmp_path / "coord"
    cluster = Cluster(await start_coordinator(profile, data, "127.0.0.1:0"), tmp_path)
    try:
        streamer = Streamer()
        await cluster.worker(max_concurrency=1, executors=[streamer])
        c = cluster.client()
        job = await c.submit(task_spec("echo", b"x"))
        live = Watcher(c, job.job_id)
        await wait_until(lambda: len(live.progress()) == CHUNKS // 2, what="half the chunks")
        seen = live.progress()[29].sequence  # inside the row the stop writes
        live.task.cancel()
        with contextlib.suppress(BaseException):
            await live.task
        await cluster.coord.stop(grace=0.2)  # a clean stop writes what is pending
        cluster.coord = await start_coordinator(profile, data, cluster.address)
        store = cluster.db
        assert rows(store, job.job_id, EventKind.PROGRESS) == 1

        async def resumed() -> bool:
            last = store.events_after(job.job_id, 0)[-1]
            return last.reason == "resumed"

        await wait_until(resumed, what="the worker resumes the job")
        rest = Watcher(c, job.job_id, after=seen)
        await wait_until(lambda: len(rest.progress()) == CHUNKS // 2 - 30, what="stored part")
        streamer.gate.set()
        await rest.done()
        assert rest.job is not None and rest.job.state == COMPLETED
        assert consecutive(rest.events, seen + 1)
        assert "".join(e.progress.text for e in rest.progress()) == "".join(TEXT[30:])
        reasons = [e.state_change.reason for e in rest.events if e.HasField("state_change")]
        assert reasons == ["coordinator_restarted", "resumed", "completed"]
    finally:
        await cluster.close()


async def test_progress_during_a_move_waits_for_it_and_never_takes_its_number(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that comes while a move of its job is being written (here a cancel) waits
    for the move: its state event takes the next number, then the chunk is dropped (the
    job no longer runs). It used to be numbered meanwhile: it reached watchers under the
    number the store then gave the CANCELLED event, which they never got."""
    store, clock = await store_factory.open(), Clock()
    jobs = await start(store, clock, max_attempts=3)
    try:
        job = await running(jobs, "k1")
        writing, go_on = asyncio.Event(), asyncio.Event()
        transition = store.transition

        async def held_transition(*args: Any, **kwargs: Any) -> Any:
            writing.set()
            await go_on.wait()
            return await transition(*args, **kwargs)

        monkeypatch.setattr(store, "transition", held_transition)
        seen: list[tuple[int, EventKind, str]] = []

        async def watch() -> None:
            async for e, _ in jobs.watch("client", job.job_id, 0):
                seen.append((e.sequence, e.kind, e.state.name))

        watcher = asyncio.create_task(watch())
        cancel = asyncio.create_task(jobs.cancel("client", job.job_id, "changed my mind"))
        await asyncio.wait_for(writing.wait(), 10)
        chunk = asyncio.create_task(jobs.progress(job.job_id, 1, "w1", "late", 0.5))
        await wait_until(lambda: jobs._moving.get(job.job_id) is not None, what="the move")
        go_on.set()
        await asyncio.wait_for(asyncio.gather(cancel, chunk), 10)
        await asyncio.wait_for(watcher, 10)  # ends with the final event, at once
        stored = [
            (e.sequence, e.kind, e.state.name) for e in await store.events_after(job.job_id, 0)
        ]
        assert seen == stored and seen[-1][2] == "CANCELLED"
        assert [s for s, _, _ in seen] == list(range(1, len(seen) + 1))
        assert all(kind is EventKind.STATE for _, kind, _ in seen)  # the chunk was dropped
    finally:
        await store.close()
