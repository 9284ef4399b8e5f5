"""Faults that span processes: a worker killed mid-job, a coordinator killed and restarted."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from conftest import Cluster, Proc, RawWorker, wait_until

from dispatch.v1 import coordinator_pb2, receipt_pb2, worker_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import verify_receipt_message

RUNNING = coordinator_pb2.JOB_STATE_RUNNING
COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


def sleep_spec(ms: int) -> bytes:
    return json.dumps({"ms": ms}).encode()


async def test_worker_killed_mid_job_completes_elsewhere(
    cluster: Cluster, procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    doomed = procs(
        ["worker", "--coordinator", cluster.address, "--key-file", str(tmp_path / "doomed.key")]
    )
    c = cluster.client()

    async def connected() -> bool:
        return any(w.worker_id == doomed.info["worker_id"] for w in await c.list_workers())

    await wait_until(connected, what="subprocess worker connected")
    job = await c.submit(task_spec("sleep", sleep_spec(1500)))

    async def running_on_doomed() -> bool:
        j = await c.get(job.job_id)
        return j.state == RUNNING and j.worker_id == doomed.info["worker_id"]

    await wait_until(running_on_doomed, what="job running on the doomed worker")
    survivor = await cluster.worker()
    doomed.kill(signal.SIGKILL)
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED
    assert done.worker_id == survivor.key.public_hex
    assert done.attempts == 2
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert "worker_disconnected" in reasons


async def test_coordinator_restart_keeps_jobs_and_workers_reconnect(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    data = tmp_path / "coord-data"
    coord = procs(["coordinator", "--listen", "127.0.0.1:0", "--data-dir", str(data)])
    address = coord.info["listening"]
    key = KeyPair.generate()

    async with CoordinatorClient(address, key) as c:
        queued = [await c.submit(task_spec("sha256", str(i).encode()), f"q{i}") for i in range(3)]
        procs(["worker", "--coordinator", address, "--key-file", str(tmp_path / "w.key")])
        slow = await c.submit(task_spec("sleep", sleep_spec(1000)), "slow")

        async def slow_running() -> bool:
            return (await c.get(slow.job_id)).state == RUNNING

        await wait_until(slow_running, what="slow job running")
        ids = [j.job_id for j in queued] + [slow.job_id]

    coord.kill(signal.SIGKILL)
    procs(["coordinator", "--listen", address, "--data-dir", str(data)])

    async with CoordinatorClient(address, key) as c:
        for job_id in ids:
            job = await c.get(job_id)  # every committed job is still there
            assert job.job_id == job_id
        done = [await c.wait(i) for i in ids]
        assert all(d.state == COMPLETED for d in done), [d.state for d in done]
        assert all(d.receipt.body for d in done)
        # the worker found its way back by itself
        assert len(await c.list_workers()) == 1
        # an idempotent retry after the restart returns the same job
        again = await c.commit(queued[0].quote_id, "q0")
        assert again.job_id == queued[0].job_id


async def test_sigterm_drains_the_worker(
    cluster: Cluster, procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    w = procs(["worker", "--coordinator", cluster.address, "--key-file", str(tmp_path / "w.key")])
    c = cluster.client()
    job = await c.submit(task_spec("sleep", sleep_spec(800)))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == RUNNING

    await wait_until(running, what="job running")
    w.p.send_signal(signal.SIGTERM)
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED and done.attempts == 1
    assert done.worker_id == w.info["worker_id"]
    # waited for off the loop: the coordinator in this process acknowledges the result
    assert await asyncio.to_thread(w.p.wait, 15) == 0


async def test_worker_that_reconnects_resumes_its_running_job(cluster: Cluster) -> None:
    w = await cluster.worker(max_concurrency=1)
    c = cluster.client()
    job = await c.submit(task_spec("sleep", sleep_spec(600)))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == RUNNING

    await wait_until(running, what="job running")
    sessions = w.sessions
    # the coordinator loses the stream mid-job; the worker keeps running the job
    cluster.coord.hub.sessions[w.key.public_hex].close("test: connection lost")
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED and done.attempts == 1
    assert done.worker_id == w.key.public_hex
    assert w.sessions > sessions  # it reconnected by itself
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert reasons == ["committed", "offered", "accepted", "worker_closed", "resumed", "completed"]
    assert verify_receipt_message(done.receipt, cluster.coord.public_key).valid


async def test_late_result_wins_over_a_slower_retry(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    w = await cluster.worker(max_concurrency=1)
    c = cluster.client()
    job = await c.submit(task_spec("sleep", sleep_spec(400)))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == RUNNING

    await wait_until(running, what="job running")
    other = RawWorker(channel)  # takes the retry and never finishes it
    await other.handshake(tasks=("sleep",))
    # the stream drops and the worker stays away for a second: the retry goes to `other`
    cluster.coord.hub.sessions[w.key.public_hex].close("test", retry_after_seconds=1)
    offer = (await other.recv()).offer
    assert offer.job_id == job.job_id and offer.attempt == 2
    other.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=2, accept=True))
    cancel = (await other.recv()).cancel  # the first worker's result arrived and won
    assert cancel.job_id == job.job_id and cancel.reason == "completed_elsewhere"
    done = await c.get(job.job_id)
    assert done.state == COMPLETED and done.worker_id == w.key.public_hex
    body = receipt_pb2.ReceiptBody.FromString(done.receipt.body)
    assert body.attempt == 1
    assert verify_receipt_message(done.receipt, cluster.coord.public_key).valid
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert "completed_late" in reasons
    other.close()
