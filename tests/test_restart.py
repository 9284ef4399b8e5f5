"""A coordinator restart is nobody's fault: held jobs wait for their worker, no attempt lost."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from conftest import Cluster, Proc, RawWorker, StoreFactory, make_profile, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import (
    Failure,
    Job,
    JobSpec,
    JobState,
    JobType,
    Policy,
    Privacy,
)
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import PROFILE_DIR, JobsConfig, PricingConfig
from dispatchnet.receipts.notary import Notary
from dispatchnet.reputation.local import LocalReputation
from dispatchnet.server import start_coordinator
from dispatchnet.store.base import Store

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
RUNNING = coordinator_pb2.JOB_STATE_RUNNING
SPEC_BYTES = b"\x12\x06\n\x04echo"
SPEC = JobSpec(
    JobType.TASK,
    Policy.CHEAP,
    Privacy.PUBLIC,
    "echo",
    "",
    SPEC_BYTES,
    hashlib.sha256(SPEC_BYTES).digest(),
)
GRACE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def start(
    store: Store, clock: Clock, coordinator_id: str = "", max_attempts: int = 1
) -> JobService:
    """A JobService as a (re)started coordinator builds it, recover() included."""
    cfg = dataclasses.replace(JobsConfig(), max_attempts=max_attempts, restart_grace_seconds=GRACE)
    jobs = JobService(
        store,
        cfg,
        PricingConfig(),
        Notary(KeyPair.generate()),
        LocalReputation(store),
        clock=clock,
        coordinator_id=coordinator_id,
    )
    await jobs.recover()
    return jobs


async def running(jobs: JobService, key: str, worker: str = "w1") -> Job:
    quote = await jobs.quote(SPEC)
    job, _ = await jobs.commit("client", quote.quote_id, key)
    assert await jobs.offer(job, worker) is not None
    accepted = await jobs.accept(job.job_id, 1, worker)
    assert accepted is not None and accepted.state is JobState.RUNNING
    await jobs.write_accepts()  # as its timer does: RUNNING in the store before the "crash"
    stored = await jobs.store.get_job(job.job_id)
    assert stored is not None and stored.state is JobState.RUNNING
    return stored


async def reasons(store: Store, job_id: str) -> list[str]:
    return [e.reason for e in await store.events_after(job_id, 0) if e.reason]


async def test_a_restart_holds_running_jobs_for_their_worker_and_costs_no_attempt(
    store_factory: StoreFactory,
) -> None:
    store, clock = await store_factory.open(), Clock()
    try:
        job = await running(await start(store, clock), "k1")  # its last attempt (max_attempts 1)
        jobs = await start(store, clock)  # restarted
        held = await store.get_job(job.job_id)
        assert held is not None and held.state is JobState.RUNNING and held.worker_id == "w1"
        assert held.lease_expires_at == clock.now + GRACE
        clock.now += GRACE - 1
        await jobs.sweep()  # nobody else may take it during the grace
        assert await store.queued_jobs(10) == []
        jobs = await start(store, clock)  # restarted again: a fresh grace
        clock.now += GRACE - 1
        await jobs.sweep()
        assert (await store.get_job(job.job_id)).state is JobState.RUNNING  # type: ignore[union-attr]
        clock.now += 2
        await jobs.sweep()  # the worker never came back: requeued, not failed
        after = await store.get_job(job.job_id)
        assert after is not None and after.state is JobState.QUEUED
        assert (after.attempts, after.max_attempts) == (1, 2)
        assert (await reasons(store, job.job_id))[-1] == "coordinator_restarted"
        # the interrupted attempt did not count: the next one is a real (last) attempt
        assert await jobs.offer(after, "w2") is not None
        assert await jobs.fail(
            job.job_id, 2, "w2", Failure("worker_error", "crashed"), retryable=True
        )
        final = await store.get_job(job.job_id)
        assert final is not None and final.state is JobState.FAILED
        assert final.failure is not None and final.failure.code == "max_attempts_exceeded"
    finally:
        await store.close()


async def test_the_returning_worker_resumes_what_it_lists_and_frees_the_rest(
    store_factory: StoreFactory,
) -> None:
    store, clock = await store_factory.open(), Clock()
    try:
        first = await start(store, clock)
        kept, dropped = await running(first, "k1"), await running(first, "k2")
        jobs = await start(store, clock)
        assert await jobs.resume(kept.job_id, 1, "w2") is None  # only its own worker
        resumed = await jobs.resume(kept.job_id, 1, "w1")
        assert resumed is not None and resumed.state is JobState.RUNNING
        await jobs.worker_returned("w1", {kept.job_id})
        freed = await store.get_job(dropped.job_id)
        assert freed is not None and freed.state is JobState.QUEUED
        assert (freed.attempts, freed.max_attempts) == (1, 2)
        clock.now += GRACE + 1
        await jobs.sweep()  # the resumed job runs on under its time limit
        again = await store.get_job(kept.job_id)
        assert again is not None and again.state is JobState.RUNNING and again.attempts == 1
        assert (await reasons(store, kept.job_id))[-2:] == ["coordinator_restarted", "resumed"]
    finally:
        await store.close()


async def test_coordinators_on_one_store_recover_and_requeue_only_their_own(
    store_factory: StoreFactory,
) -> None:
    store_a, store_b, clock = await store_factory.open(), await store_factory.open(), Clock()
    a, b = await start(store_a, clock, "A"), await start(store_b, clock, "B")
    on_a, on_b = await running(a, "k1", "w1"), await running(b, "k2", "w2")
    gone = await running(a, "k3", "w3")
    assert (on_a.coordinator_id, on_b.coordinator_id) == ("A", "B")
    b = await start(store_b, clock, "B")  # B restarts: it holds its own job only
    held, other = await store_b.get_job(on_b.job_id), await store_b.get_job(on_a.job_id)
    assert held is not None and held.lease_expires_at == clock.now + GRACE
    assert other == on_a  # A's job is untouched: no restart event, its lease as it was
    assert "coordinator_restarted" not in await reasons(store_b, on_a.job_id)
    # w1 fails over to B and resumes there; A then notices its stream gone
    resumed = await b.resume(on_a.job_id, 1, "w1")
    assert resumed is not None and resumed.coordinator_id == "B"
    assert await a.worker_lost("w1", {on_a.job_id: 1}, "stream_closed") == []
    kept = await store_a.get_job(on_a.job_id)
    assert kept is not None and kept.state is JobState.RUNNING and kept.worker_id == "w1"
    # A is gone for good with w3's job: B takes it back once its lease lapses, once
    clock.now += JobsConfig().time_limit_seconds - 1
    await b.sweep()
    assert (await store_b.get_job(gone.job_id)).state is JobState.RUNNING  # type: ignore[union-attr]
    clock.now += 2
    await b.sweep()
    await b.sweep()
    back = await store_b.get_job(gone.job_id)
    assert back is not None and back.state is JobState.FAILED  # its only attempt (max 1)
    assert (await reasons(store_b, gone.job_id)).count("time_limit_exceeded") == 1


async def test_another_coordinator_frees_a_restart_hold_without_costing_an_attempt(
    store_factory: StoreFactory,
) -> None:
    store_a, store_b, clock = await store_factory.open(), await store_factory.open(), Clock()
    job = await running(await start(store_a, clock, "A"), "k1")
    await start(store_a, clock, "A")  # A restarts, holds the job for w1, then is gone
    b = await start(store_b, clock, "B")
    clock.now += GRACE + 1
    await b.sweep()  # B's sweep (whichever coordinator holds the sweep's lock) frees it
    after = await store_b.get_job(job.job_id)
    assert after is not None and after.state is JobState.QUEUED
    assert (after.attempts, after.max_attempts) == (1, 2)
    assert (await reasons(store_b, job.job_id))[-1] == "coordinator_restarted"


async def test_reconnecting_does_not_stretch_an_attempts_time_limit(
    store_factory: StoreFactory,
) -> None:
    """A worker resuming its job after its stream dropped keeps the attempt's time limit,
    counted from the offer: dropping and resuming its stream again and again used to
    give it a whole time limit each time, holding the job for ever. A restart of the
    coordinator still gives a whole one (test above)."""
    store, clock = await store_factory.open(), Clock()
    jobs = await start(store, clock, max_attempts=3)
    job = await running(jobs, "k1")
    limit = JobsConfig().time_limit_seconds
    offered_at = clock.now
    clock.now += limit - 10
    assert [j.state for j in await jobs.worker_lost("w1", {job.job_id: 1}, "closed")] == [
        JobState.QUEUED
    ]
    resumed = await jobs.resume(job.job_id, 1, "w1")
    assert resumed is not None and resumed.lease_expires_at == offered_at + limit
    clock.now += 11
    await jobs.sweep()  # its time is up: taken back
    lapsed = await store.get_job(job.job_id)
    assert lapsed is not None and lapsed.state is JobState.QUEUED and lapsed.attempts == 1
    assert await jobs.resume(job.job_id, 1, "w1") is None  # and not resumed again
    assert await store.held_attempts("w1", [job.job_id]) == set()


class ResumedOnRead:
    """The store, where the next get_job runs `meanwhile` after its read and before its
    answer: a worker resuming its job between a coordinator's read and its write."""

    def __init__(self, store: Store, meanwhile: Callable[[], Awaitable[object]]) -> None:
        self._store = store
        self._meanwhile: Callable[[], Awaitable[object]] | None = meanwhile

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def get_job(self, job_id: str) -> Job | None:
        job = await self._store.get_job(job_id)
        if self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            await meanwhile()
        return job


async def test_a_requeue_leaves_a_job_resumed_between_its_read_and_its_write(
    store_factory: StoreFactory,
) -> None:
    """A's lost stream and B's sweep each read a job, and its worker resumes it (through
    B) before they write: the requeue is a compare-and-set on the job as read (who holds
    it, its lease), so the resumed job runs on; it used to be taken back and run twice."""
    store_a, store_b, clock = await store_factory.open(), await store_factory.open(), Clock()
    a, b = await start(store_a, clock, "A"), await start(store_b, clock, "B")
    job = await running(a, "k1", "w1")
    a.store = ResumedOnRead(store_a, lambda: b.resume(job.job_id, 1, "w1"))  # type: ignore[assignment]
    assert await a.worker_lost("w1", {job.job_id: 1}, "stream_closed") == []
    kept = await store_b.get_job(job.job_id)
    assert kept is not None and (kept.state, kept.coordinator_id) == (JobState.RUNNING, "B")
    assert (await reasons(store_b, job.job_id))[-1] == "resumed"

    # A restarts, holds w3's job for it, and is gone; B's sweep finds the hold lapsed, and
    # w3 resumes (through B) just after the sweep read the job again
    gone = await running(a, "k2", "w3")
    await start(store_a, clock, "A")
    clock.now += GRACE + 1
    b.store = ResumedOnRead(store_b, lambda: b.resume(gone.job_id, 1, "w3"))  # type: ignore[assignment]
    await b.sweep()
    after = await store_b.get_job(gone.job_id)
    assert after is not None and (after.state, after.coordinator_id) == (JobState.RUNNING, "B")
    assert after.lease_expires_at > clock.now
    assert (await reasons(store_b, gone.job_id))[-2:] == ["coordinator_restarted", "resumed"]


def sleep_spec(ms: int) -> bytes:
    return json.dumps({"ms": ms}).encode()


async def test_a_stopped_and_restarted_coordinator_lets_the_worker_resume(
    tmp_path: Path,
) -> None:
    """A graceful stop and start: the job on its last attempt is neither failed nor
    offered to a worker that connects first; its own worker resumes it."""
    profile = make_profile(jobs={"max_attempts": 1, "restart_grace_seconds": 15})
    data = tmp_path / "coord"
    cluster = Cluster(await start_coordinator(profile, data, "127.0.0.1:0"), tmp_path)
    channel = grpc.aio.insecure_channel(cluster.address)
    other: RawWorker | None = None
    try:
        w = await cluster.worker(max_concurrency=1)
        c = cluster.client()
        job = await c.submit(task_spec("sleep", sleep_spec(1500)))

        async def running_on_w() -> bool:
            return (await c.get(job.job_id)).state == RUNNING

        await wait_until(running_on_w, what="job running")
        await cluster.coord.stop(grace=0.2)  # w is told to come back in a second
        cluster.coord = await start_coordinator(profile, data, cluster.address)
        other = RawWorker(channel)  # connects first and could run the job
        await other.handshake(tasks=("sleep",))
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED, done.failure
        assert done.attempts == 1 and done.worker_id == w.key.public_hex
        got = [i.event.state_change.reason async for i in c.watch(job.job_id)]
        assert got == [
            "committed",
            "offered",
            "accepted",
            "coordinator_restarted",
            "resumed",
            "completed",
        ]
    finally:
        if other is not None:
            other.close()
        await channel.close()
        await cluster.close()


async def test_a_killed_coordinator_does_not_fail_a_job_on_its_last_attempt(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    text = (PROFILE_DIR / "local.toml").read_text()
    assert "max_attempts = 3" in text
    profile = tmp_path / "one-attempt.toml"
    profile.write_text(text.replace("max_attempts = 3", "max_attempts = 1"))
    data = tmp_path / "coord-data"
    args = ["coordinator", "--profile", str(profile), "--data-dir", str(data)]
    coord = procs([*args, "--listen", "127.0.0.1:0"])
    address = coord.info["listening"]
    key = KeyPair.generate()
    async with CoordinatorClient(address, key) as c:
        procs(["worker", "--coordinator", address, "--key-file", str(tmp_path / "w.key")])
        job = await c.submit(task_spec("sleep", sleep_spec(2000)))

        async def running() -> bool:
            return (await c.get(job.job_id)).state == RUNNING

        await wait_until(running, what="job running")
    coord.kill(signal.SIGKILL)
    procs([*args, "--listen", address])
    async with CoordinatorClient(address, key) as c:
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED, done.failure
        assert done.attempts == 1 and done.max_attempts == 1
        got = [i.event.state_change.reason async for i in c.watch(job.job_id)]
        assert "resumed" in got and "max_attempts_exceeded" not in got
