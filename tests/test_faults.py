"""Faults that span processes: a worker killed mid-job, a coordinator killed and restarted."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from conftest import Cluster, Proc, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair

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
    assert w.p.wait(15) == 0
