"""Worker loss at the protocol level: eviction of silent workers, attempts running out."""

from __future__ import annotations

import json

import grpc
import pytest
from conftest import Cluster, RawWorker, make_profile, wait_until

from dispatch.v1 import coordinator_pb2, worker_pb2
from dispatchnet.client import task_spec
from dispatchnet.profiles import Profile


@pytest.fixture
def profile() -> Profile:
    return make_profile(jobs={"max_attempts": 2}, workers={"eviction_seconds": 1.5})


async def test_job_fails_after_max_attempts(cluster: Cluster, channel: grpc.aio.Channel) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    for attempt in (1, 2):
        offer = (await raw.recv()).offer
        assert offer.attempt == attempt
        raw.send(
            offer_response=worker_pb2.OfferResponse(
                job_id=job.job_id, attempt=attempt, accept=False, reason="busy"
            )
        )
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_FAILED
    assert done.failure.code == "max_attempts_exceeded"
    raw.close()


async def test_silent_worker_is_evicted_and_its_job_requeued(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake(tasks=("sleep",))
    c = cluster.client()
    job = await c.submit(task_spec("sleep", json.dumps({"ms": 1}).encode()))
    offer = (await raw.recv()).offer
    assert offer.job_id == job.job_id
    raw.send(
        offer_response=worker_pb2.OfferResponse(
            job_id=job.job_id, attempt=offer.attempt, accept=True
        )
    )
    # no heartbeats from here on
    go_away = (await raw.recv()).go_away
    assert "evicted" in go_away.reason

    async def requeued() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_QUEUED

    await wait_until(requeued, what="requeue after eviction")
    raw.close()


async def test_a_lost_worker_leaves_a_job_it_resumed_at_another_coordinator_alone(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    """On a shared store the worker's stream to this coordinator drops and it resumes
    its job through another (the job's coordinator_id is that one's); when this
    coordinator then forgets the session, the job is not requeued from under it (it was,
    costing an attempt and running it twice)."""
    from dispatchnet.coordinator.models import JobState

    raw = RawWorker(channel)
    await raw.handshake(tasks=("sleep",))
    c = cluster.client()
    job = await c.submit(task_spec("sleep", json.dumps({"ms": 1}).encode()))
    offer = (await raw.recv()).offer
    raw.send(
        offer_response=worker_pb2.OfferResponse(
            job_id=job.job_id, attempt=offer.attempt, accept=True
        )
    )
    jobs, hub = cluster.coord.jobs, cluster.coord.hub

    async def accepted() -> bool:
        await jobs.write_accepts()
        got = await cluster.coord.store.get_job(job.job_id)
        return got is not None and got.state is JobState.RUNNING

    await wait_until(accepted, what="the accept written")
    resumed = await cluster.coord.store.transition(  # as the other coordinator's resume does
        job.job_id, (JobState.RUNNING,), offer.attempt, {"coordinator_id": "elsewhere"}, None
    )
    assert resumed is not None
    raw.close()
    worker_id = raw.key.public_key.hex()
    await wait_until(lambda: worker_id not in hub.sessions, what="the session gone")
    await hub.drain_tasks()
    after = await cluster.coord.store.get_job(job.job_id)
    assert after is not None
    assert (after.state, after.attempts, after.coordinator_id) == (
        JobState.RUNNING,
        offer.attempt,
        "elsewhere",
    )
