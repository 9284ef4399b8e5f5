"""The seeker simulator: many phone-like seekers in one process (worker/seekers.py)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import pytest
from conftest import Cluster, Proc, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.receipts.core import sha256
from dispatchnet.worker import seekers
from dispatchnet.worker.seekers import Device, SeekerSwarm

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED
SEEKER = common_pb2.WORKER_KIND_SEEKER
T = TypeVar("T")


def quick_swarm(address: str, count: int, seed: int, **kwargs: Any) -> SeekerSwarm:
    """A swarm that reconnects fast and logs no periodic status lines."""
    kwargs = {"backoff_initial": 0.05, "backoff_max": 0.5, "status_seconds": None, **kwargs}
    return SeekerSwarm(address, count, seed=seed, **kwargs)


async def bounded(coros: Iterable[Awaitable[T]], limit: int = 50) -> list[T]:
    """Runs the awaitables concurrently, at most `limit` at a time, in order."""
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with sem:
            return await aw

    return await asyncio.gather(*(one(aw) for aw in coros))


async def seeker_ids(c: CoordinatorClient) -> set[str]:
    return {w.worker_id for w in await c.list_workers() if w.kind == SEEKER}


def all_connected(swarm: SeekerSwarm) -> Callable[[], bool]:
    return lambda: swarm.stats().connected == len(swarm.seekers)


async def test_two_hundred_seekers_share_four_hundred_jobs(cluster: Cluster) -> None:
    t0 = time.monotonic()
    async with quick_swarm(cluster.address, 200, seed=7) as swarm:
        await wait_until(all_connected(swarm), within=60, what="200 seekers connected")
        t_connected = time.monotonic()
        c = cluster.client()
        ids = {s.worker.key.public_hex for s in swarm.seekers}
        assert await seeker_ids(c) == ids

        inputs = [f"job {i}".encode() for i in range(400)]
        jobs = await bounded(c.submit(task_spec("sha256", data)) for data in inputs)
        t_submitted = time.monotonic()
        done = await bounded(c.wait(j.job_id) for j in jobs)
        t_done = time.monotonic()

        assert [d.state for d in done] == [COMPLETED] * 400
        assert [d.result.output.decode() for d in done] == [sha256(x).hex() for x in inputs]
        used = {d.worker_id for d in done}
        assert used <= ids
        assert len(used) >= 50, f"only {len(used)} distinct seekers ran jobs"
        stats = swarm.stats()
        assert stats.completed >= 400 and stats.failed == 0
    print(
        f"\nswarm: connect {t_connected - t0:.1f}s, submit {t_submitted - t_connected:.1f}s, "
        f"run {t_done - t_submitted:.1f}s, {len(used)} seekers used, "
        f"total {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )


async def test_low_batteries_reject_offers_until_charged(cluster: Cluster) -> None:
    # At 5% and 0.05%/s, no battery reaches 20% within 300 s: every offer is rejected.
    async with quick_swarm(
        cluster.address,
        4,
        seed=1,
        battery=True,
        battery_level=5.0,
    ) as swarm:
        await wait_until(all_connected(swarm), what="seekers connected")
        c = cluster.client()
        job = await c.submit(task_spec("sha256", b"low"))
        done = await c.wait(job.job_id)
        assert done.state == FAILED
        assert done.failure.code == "max_attempts_exceeded"
        assert done.attempts == 3
        reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
        # two requeues, then the third rejection fails the job
        assert reasons.count("rejected: battery_low") == 3
        assert reasons[-1] == "rejected: battery_low"
        assert "battery_low" in done.failure.message
        assert swarm.stats().rejections == {"battery_low": 3}
        assert swarm.stats().completed == 0

        # Charged, the same seekers take work again.
        for s in swarm.seekers:
            s.device.battery_level = 100.0
        done = await c.wait((await c.submit(task_spec("sha256", b"charged"))).job_id)
        assert done.state == COMPLETED and done.attempts == 1
        assert swarm.stats().rejections == {"battery_low": 3}


async def test_hot_devices_reject_offers(cluster: Cluster) -> None:
    async with quick_swarm(cluster.address, 2, seed=1, heat=True) as swarm:
        for s in swarm.seekers:
            s.device.temperature = seekers.MAX_TEMPERATURE
        await wait_until(all_connected(swarm), what="seekers connected")
        c = cluster.client()
        done = await c.wait((await c.submit(task_spec("echo", b"1"))).job_id)
        assert done.state == FAILED and done.failure.code == "max_attempts_exceeded"
        assert swarm.stats().rejections == {"device_hot": 3}


async def test_dropped_seekers_reconnect_and_jobs_complete(cluster: Cluster) -> None:
    async with quick_swarm(
        cluster.address,
        20,
        seed=3,
        flaky=0.0,  # no periodic drops: the test ticks by hand
        offline_seconds=(0.1, 0.5),
    ) as swarm:
        await wait_until(all_connected(swarm), what="seekers connected")
        c = cluster.client()
        sleepy = json.dumps({"ms": 400}).encode()
        jobs = [await c.submit(task_spec("sleep", sleepy)) for _ in range(20)]
        await wait_until(
            lambda: sum(s.device.running for s in swarm.seekers) >= 5, what="jobs running"
        )

        assert swarm.tick(drop_probability=1.0) == 20
        assert swarm.stats().drops == 20
        await wait_until(
            lambda: (
                all(s.worker.sessions >= 2 for s in swarm.seekers) and swarm.stats().connected == 20
            ),
            what="every seeker reconnected",
        )
        assert await seeker_ids(c) == {s.worker.key.public_hex for s in swarm.seekers}

        done = await bounded(c.wait(j.job_id) for j in jobs)
        assert [d.state for d in done] == [COMPLETED] * 20
        later = await bounded(c.submit(task_spec("sha256", str(i).encode())) for i in range(20))
        done = await bounded(c.wait(j.job_id) for j in later)
        assert [d.state for d in done] == [COMPLETED] * 20


async def test_periodic_ticks_drop_connections(cluster: Cluster) -> None:
    async with quick_swarm(
        cluster.address,
        5,
        seed=5,
        flaky=1.0,
        tick_seconds=0.2,
        offline_seconds=(0.0, 0.1),
    ) as swarm:
        await wait_until(lambda: swarm.stats().drops >= 10, what="periodic drops")
        await wait_until(lambda: swarm.stats().sessions >= 10, what="reconnections")


async def test_swarm_drains_and_seekers_leave(cluster: Cluster) -> None:
    swarm = quick_swarm(cluster.address, 5, seed=2)
    await swarm.start()
    try:
        await wait_until(all_connected(swarm), what="seekers connected")
        c = cluster.client()
        assert len(await seeker_ids(c)) == 5
        await swarm.drain(timeout=10)
        assert swarm.stats().connected == 0

        async def gone() -> bool:
            return not await seeker_ids(c)

        await wait_until(gone, what="seekers gone from ListWorkers")
    finally:
        swarm.stop()
        await swarm.wait()


def test_the_seed_fixes_each_devices_behaviour() -> None:
    def devices(count: int, seed: int) -> list[tuple[float, float, float]]:
        swarm = SeekerSwarm("127.0.0.1:1", count, seed=seed, slow=4.0, executors=[])
        return [
            (s.device.speed, s.device.battery_level, s.device.temperature) for s in swarm.seekers
        ]

    first = devices(5, 42)
    assert devices(5, 42) == first
    assert devices(3, 42) == first[:3]  # seeker i does not depend on the swarm's size
    assert devices(5, 43) != first
    assert all(1.0 <= speed <= 4.0 for speed, _, _ in first)
    assert isinstance(SeekerSwarm("127.0.0.1:1", 1, executors=[]).seed, int)  # random


def test_device_battery_heat_and_speed() -> None:
    now = [0.0]
    device = Device(
        random.Random(0),
        battery=True,
        heat=True,
        slow=1.0,
        battery_level=21.0,
        clock=lambda: now[0],
    )
    device.temperature = seekers.AMBIENT
    assert device.rejection() == ""
    device.job_started()  # -0.5%
    now[0] += 2.0  # two seconds of work: -1%
    device.job_finished()
    assert device.battery_level == pytest.approx(19.5)
    assert device.rejection() == "battery_low"
    now[0] += 20.0  # idle charging: +1%
    assert device.rejection() == ""
    assert device.battery_level == pytest.approx(20.5)

    device.temperature = seekers.HOT + 1
    assert device.rejection() == "device_hot"
    now[0] += 60.0  # cools towards ambient
    assert device.rejection() == ""
    assert device.delay(0.01) == 0.0  # speed 1: no delay

    slow = Device(random.Random(0), slow=3.0)
    assert 1.0 <= slow.speed <= 3.0
    assert slow.delay(0.0) == pytest.approx((slow.speed - 1) * seekers.SLOW_BASE_SECONDS)
    assert slow.delay(1.0) == pytest.approx(slow.speed - 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0},
        {"flaky": 1.5},
        {"flaky": -0.1},
        {"slow": 0.5},
        {"battery_level": 101.0},
        {"max_concurrency": 0},
        {"offline_seconds": (3.0, 1.0)},
    ],
)
def test_bad_swarm_settings_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"count": 2, "executors": [], **kwargs}
    with pytest.raises(ValueError):
        SeekerSwarm("127.0.0.1:1", **args)  # type: ignore[arg-type]


async def test_seekers_command(cluster: Cluster, procs: Callable[[list[str]], Proc]) -> None:
    p = procs(["seekers", "--coordinator", cluster.address, "--count", "20", "--seed", "1"])
    assert p.info == {"seekers": 20, "coordinator": cluster.address, "seed": 1}
    c = cluster.client()

    async def twenty() -> bool:
        return len(await seeker_ids(c)) == 20

    await wait_until(twenty, within=30, what="20 seekers in ListWorkers")
    done = await c.wait((await c.submit(task_spec("summarize", b'{"text": "One. Two."}'))).job_id)
    assert done.state == COMPLETED

    p.p.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(p.p.wait, 30) == 0

    async def none_left() -> bool:
        return not await seeker_ids(c)

    await wait_until(none_left, what="seekers gone after SIGTERM")


def _connections_to(port: int) -> int:
    """ESTABLISHED TCP connections from this process's network namespace to port."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def test_each_simulated_seeker_holds_its_own_connection(cluster: Cluster) -> None:
    # N simulated phones must be N sockets, not N streams on one shared connection.
    before = _connections_to(cluster.coord.port)
    async with quick_swarm(cluster.address, 12, seed=3) as swarm:
        await wait_until(all_connected(swarm), within=30, what="12 seekers connected")
        assert _connections_to(cluster.coord.port) - before >= 12
