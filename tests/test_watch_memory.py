"""WatchJob of a job committed or moved here lately: answered from memory (LiveEvents'
recent jobs), with no store read, the same events as the store's, for its owner only;
memory stays bounded, and a job another coordinator changed is read from the store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from conftest import Cluster, rpc_code, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator import events
from dispatchnet.coordinator.events import LiveEvents
from dispatchnet.coordinator.models import (
    Event,
    EventKind,
    Job,
    JobSpec,
    JobState,
    JobType,
    PaymentRef,
    Policy,
    Privacy,
    Result,
)

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


def count_reads(cluster: Cluster) -> Counter[str]:
    """Counts the coordinator's job reads (the real store still answers them)."""
    store: Any = cluster.coord.store
    counted: Counter[str] = Counter()

    def wrap(name: str) -> None:
        real: Callable[..., Any] = getattr(store, name)

        async def read(*args: Any, **kwargs: Any) -> Any:
            counted[name] += 1
            return await real(*args, **kwargs)

        setattr(store, name, read)

    for name in ("get_job", "events_after"):
        wrap(name)
    return counted


async def test_a_job_committed_here_is_watched_from_memory(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    reads = count_reads(cluster)
    # a job still running when the watch starts
    job = await c.submit(task_spec("sleep", b'{"ms": 300}'))
    live = [item async for item in c.watch(job.job_id)]
    assert reads == Counter()  # neither the job nor its events were read
    assert live[-1].job.state == COMPLETED
    assert [i.event.sequence for i in live] == list(range(1, len(live) + 1))
    # watched again once it ended (an unpaid final job never changes again): from
    # memory still, the same events and job as the store's
    again = [item async for item in c.watch(job.job_id)]
    assert reads == Counter()
    assert [i.event for i in again] == [i.event for i in live]
    assert again[-1].job == live[-1].job
    # a job that ended before anyone watched it (a trivial one, the usual case), too
    quick = await c.submit(task_spec("echo", b"1"))
    await wait_until(lambda: cluster.db.get_job(quick.job_id).state.final, 10, "job ended")
    watched = [item async for item in c.watch(quick.job_id)]
    assert reads == Counter() and watched[-1].job.state == COMPLETED
    stored = cluster.db.events_after(quick.job_id, 0)
    assert [i.event.sequence for i in watched] == [e.sequence for e in stored]
    # what memory answered is what the store holds
    assert watched[-1].job == await c.get(quick.job_id)
    assert live[-1].job == await c.get(job.job_id)


async def test_only_the_owner_watches_a_job_held_in_memory(cluster: Cluster) -> None:
    owner, other = cluster.client(), cluster.client()
    job = await owner.submit(task_spec("echo", b"1"))  # no worker: it stays QUEUED
    reads = count_reads(cluster)
    try:
        async for _ in other.watch(job.job_id):
            raise AssertionError("another client saw an event")
        raise AssertionError("no error")
    except grpc.aio.AioRpcError as e:
        assert rpc_code(e) == grpc.StatusCode.PERMISSION_DENIED
    try:
        async for _ in other.watch("job_unknown"):
            raise AssertionError("an event of no job")
    except grpc.aio.AioRpcError as e:
        assert rpc_code(e) == grpc.StatusCode.NOT_FOUND
    stream = owner.watch(job.job_id)
    first = await anext(stream)
    await stream.aclose()
    assert first.event.sequence == 1
    assert first.event.state_change.to_state == coordinator_pb2.JOB_STATE_QUEUED
    assert reads["events_after"] == 0 and reads["get_job"] == 1  # the unknown job's


async def test_a_job_changed_elsewhere_is_read_from_the_store(cluster: Cluster) -> None:
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    jobs = cluster.coord.jobs
    assert job.job_id in jobs.live
    jobs.job_changed_elsewhere(job.job_id, JobState.CANCELLED)  # another coordinator's
    assert job.job_id not in jobs.live
    reads = count_reads(cluster)
    stream = c.watch(job.job_id)
    assert (await anext(stream)).event.sequence == 1
    await stream.aclose()
    assert reads == Counter({"get_job": 1, "events_after": 1})


async def test_a_change_heard_from_elsewhere_before_commit_came_back_is_not_hidden(
    cluster: Cluster,
) -> None:
    """Several coordinators on one store: another one may offer, run and finish a job
    committed here, and its notification may come in between this commit's write and the
    commit's caller running again. Memory then must not hold the job as it was written (a
    watcher would wait for a change it already missed, until its 5 s poll)."""
    c = cluster.client()
    jobs = cluster.coord.jobs
    store: Any = cluster.coord.store
    real = store.create_job

    async def create_job(job: Job, *args: Any, **kwargs: Any) -> Any:
        written = await real(job, *args, **kwargs)
        jobs.job_changed_elsewhere(job.job_id, JobState.COMPLETED)  # heard meanwhile
        return written

    store.create_job = create_job
    job = await c.submit(task_spec("echo", b"1"))  # no worker: it stays QUEUED here
    assert job.job_id not in jobs.live
    reads = count_reads(cluster)
    stream = c.watch(job.job_id)
    assert (await anext(stream)).event.sequence == 1
    await stream.aclose()
    assert reads == Counter({"get_job": 1, "events_after": 1})  # from the store


SPEC = JobSpec(JobType.TASK, Policy.CHEAP, Privacy.PUBLIC, "echo", "", b"x" * 10, b"")


def committed(live: LiveEvents, n: int, result: bytes | None = None, paid: bool = False) -> str:
    """A job as commit leaves it in memory (one event), released like commit does."""
    job_id = f"job_{n}"
    state = JobState.QUEUED if result is None else JobState.COMPLETED
    job = Job(
        job_id, "client", state, SPEC, 1, "USD", "q", "k", 0, 3, 1.0, 1.0, 1.0, 1,
        result=Result(result, "text/plain") if result is not None else None,
        payment=PaymentRef(status="authorized") if paid else PaymentRef(),
    )  # fmt: skip
    live.state(Event(job_id, EventKind.STATE, state, 1.0, sequence=1), job, watched=True)
    live.release(job_id)
    return job_id


def test_recent_jobs_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(events, "RECENT_JOBS", 8)
    live = LiveEvents()
    ids = [committed(live, n) for n in range(20)]
    assert live.jobs() == 8
    assert all(live.known(j) is None for j in ids[:12])
    known = live.known(ids[-1])
    assert known is not None and known.last_sequence == 1
    # a watched job (known) leaves the recent ones until released: it is never evicted
    for n in range(20, 40):
        committed(live, n)
    assert live.known(ids[-1]) is not None and live.jobs() == 9
    live.release(ids[-1])  # the newest again: the oldest other one goes
    assert live.jobs() == 8 and live.known(ids[-1]) is not None
    assert live.known("job_32") is None and live.known("job_33") is not None

    monkeypatch.setattr(events, "RECENT_BYTES", 3 * 1024)
    live = LiveEvents()
    for n in range(50, 60):
        committed(live, n)
    assert live.jobs() * (len(SPEC.spec_bytes) + 512) <= 3 * 1024
    big = committed(live, 60, result=b"r" * (events.RECENT_JOB_BYTES + 1))
    assert big not in live  # final, and too large anyway
    small_final = committed(live, 61, result=b"ok")
    assert live.known(small_final) is not None  # unpaid and final: it never changes again
    paid = committed(live, 62, result=b"ok", paid=True)
    assert paid not in live  # its payment may settle later: read from the store
