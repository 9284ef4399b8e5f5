"""[jobs] client_max_open_jobs: a client with that many jobs queued, offered or running
gets RESOURCE_EXHAUSTED from CommitJob and RunJob, and nothing of the refused job is
stored or run; other clients, keys it used before and finished jobs are not held back."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest
from conftest import Cluster, make_profile, rpc_code, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.profiles import Profile

LONG = task_spec("sleep", json.dumps({"ms": 60_000}).encode())


@pytest.fixture
def profile() -> Profile:
    return make_profile(jobs={"client_max_open_jobs": 2})


async def _refused(coro: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    assert rpc_code(e.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    return e.value.details() or ""


def _jobs_of(cluster: Cluster, c: CoordinatorClient) -> int:
    row = cluster.db._conn.execute(
        "SELECT count(*) FROM jobs WHERE client_id=?", (c.key.public_hex,)
    ).fetchone()
    return int(row[0])


async def test_a_client_at_its_limit_is_refused_until_a_job_ends(cluster: Cluster) -> None:
    await cluster.worker(max_concurrency=1)  # runs one; the other waits queued
    c = cluster.client()
    running = await c.submit(LONG, idempotency_key="one")
    queued = await c.submit(LONG, idempotency_key="two")
    assert queued.state == coordinator_pb2.JOB_STATE_QUEUED
    message = await _refused(c.submit(LONG))
    assert "you have 2 open jobs" in message and "client_max_open_jobs" in message
    run = coordinator_pb2.RunJobRequest(spec=task_spec("echo", b"hi"), idempotency_key="three")
    assert "you have 2 open jobs" in await _refused(c.jobs.RunJob(run, metadata=c.metadata()))
    assert _jobs_of(cluster, c) == 2  # nothing of the refused ones was stored
    # a key it used before still answers with its job
    assert (await c.commit(queued.quote_id, "two")).job_id == queued.job_id
    # another client is not held back by this one's jobs
    other = cluster.client()
    assert (await other.submit(task_spec("echo", b"x"))).job_id
    # a job that ends gives its place back
    await c.cancel(running.job_id)
    job = await c.submit(task_spec("echo", b"after"))
    assert job.job_id and _jobs_of(cluster, c) == 3


async def test_a_refused_job_offered_at_once_is_withdrawn_from_its_worker(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    w = await cluster.worker(max_concurrency=4)  # free slots: offers go out with the write
    c = cluster.client()
    for key in ("one", "two"):
        await c.submit(LONG, idempotency_key=key)
    await wait_until(lambda: len(w._running) == 2, what="both jobs running")
    run = coordinator_pb2.RunJobRequest(spec=LONG, idempotency_key="three")
    await _refused(c.jobs.RunJob(run, metadata=c.metadata()))
    assert _jobs_of(cluster, c) == 2
    # the offer that went out with the write is withdrawn (a Cancel on the same stream,
    # before the next offer), so the worker's slot serves someone else
    done = await cluster.client().run(task_spec("echo", b"someone else"))
    assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
    assert len(w._running) == 2 and w.completed == 1
    assert "cancelled: the job was not committed" in caplog.text


@pytest.mark.parametrize("profile", [make_profile(jobs={"client_max_watches": 2})])
async def test_a_client_holds_a_bounded_number_of_watches(cluster: Cluster) -> None:
    """[jobs] client_max_watches: WatchJob and RunJob calls one client has open (each holds
    a stream and memory); beyond, RESOURCE_EXHAUSTED, and a RunJob refused so makes no job."""
    c, other = cluster.client(), cluster.client()
    job = await c.submit(task_spec("echo", b"waits"))  # no worker: it stays queued
    request = coordinator_pb2.WatchJobRequest(job_id=job.job_id)
    calls = [c.jobs.WatchJob(request, metadata=c.metadata()) for _ in range(2)]
    for call in calls:
        assert (await call.read()).event.sequence == 1  # open, and served
    refused = c.jobs.WatchJob(request, metadata=c.metadata())
    message = await _refused(refused.read())
    assert "client_max_watches" in message
    run = coordinator_pb2.RunJobRequest(spec=task_spec("echo", b"hi"), idempotency_key="run")
    assert "client_max_watches" in await _refused(c.jobs.RunJob(run, metadata=c.metadata()))
    assert _jobs_of(cluster, c) == 1  # the refused RunJob made none
    mine = await other.submit(task_spec("echo", b"other"))  # another client is not held back
    theirs = other.jobs.WatchJob(
        coordinator_pb2.WatchJobRequest(job_id=mine.job_id), metadata=other.metadata()
    )
    assert (await theirs.read()).event.sequence == 1
    theirs.cancel()
    calls[0].cancel()  # an ended watch gives its place back

    async def room() -> bool:
        again = c.jobs.WatchJob(request, metadata=c.metadata())
        try:
            return (await again.read()).event.sequence == 1
        except grpc.aio.AioRpcError:
            return False
        finally:
            again.cancel()

    await wait_until(room, what="a place given back")
    calls[1].cancel()
