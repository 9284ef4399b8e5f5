"""Dispatching with thousands of connected workers looks only at the ones that can run the
job (the hub's worker index), and at a bounded sample of those."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
import statistics

import pytest
from conftest import Cluster, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator import matching
from dispatchnet.coordinator.hub import (
    STRETCH_PER_CHECK,
    HeartbeatSettings,
    WorkerHello,
    WorkerHub,
    WorkerSession,
)
from dispatchnet.coordinator.models import Privacy, WorkerKind

SEEKERS = 5000


async def _connect(cluster: Cluster, n: int, tasks: frozenset[str]) -> list[WorkerSession]:
    """n sessions opened through the hub itself (no stream: their offers stay queued)."""
    hub = cluster.coord.hub
    return [
        await hub.register(
            WorkerHello(secrets.token_bytes(32), WorkerKind.SEEKER, tasks, frozenset(), 1)
        )
        for _ in range(n)
    ]


@pytest.fixture
def eligibility_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    checked: list[str] = []
    real = matching.eligible

    def counting(spec: object, w: matching.Candidate, paired: set[str] | None) -> bool:
        checked.append(w.worker_id)
        return real(spec, w, paired)  # type: ignore[arg-type]

    monkeypatch.setattr(matching, "eligible", counting)
    return checked


async def test_a_job_among_5000_seekers_checks_a_bounded_number_of_sessions(
    cluster: Cluster, eligibility_checks: list[str]
) -> None:
    hub = cluster.coord.hub
    sessions = await _connect(cluster, SEEKERS, frozenset({"echo"}))
    others = await _connect(cluster, 3, frozenset({"sha256"}))
    c = cluster.client()
    assert (await c.quote(task_spec("echo", b"1"))).eligible_workers == SEEKERS
    assert (await c.quote(task_spec("sha256", b"1"))).eligible_workers == 3
    eligibility_checks.clear()

    job = await c.submit(task_spec("echo", b"1"))
    await wait_until(
        lambda: any(job.job_id in s.active for s in sessions), what="the job to be offered"
    )
    assert 1 <= len(eligibility_checks) <= matching.DRAWS
    assert not any(s.active for s in others)  # never even looked at: not their task
    assert not {s.worker_id for s in others} & set(eligibility_checks)
    assert hub.index.free_slots == SEEKERS + 3 - 1

    # a PRIVATE job considers the client's paired workers only, not the 5,000
    held = await hub.store.get_job(job.job_id)
    assert held is not None
    private = dataclasses.replace(
        held, spec=dataclasses.replace(held.spec, privacy=Privacy.PRIVATE)
    )
    paired = {sessions[7].worker_id, sessions[8].worker_id, "gone"}
    eligibility_checks.clear()
    chosen = hub._choose(private, paired)
    assert chosen is not None and chosen.worker_id in paired
    assert len(eligibility_checks) <= 2


async def test_free_slots_follow_offers_and_results(cluster: Cluster) -> None:
    hub = cluster.coord.hub
    c = cluster.client()
    w = await cluster.worker(max_concurrency=2)
    assert hub.index.free_slots == 2
    job = await c.submit(task_spec("echo", b"hello"))
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
    await wait_until(lambda: hub.index.free_slots == 2, what="the slot to be free again")
    session = hub.sessions[w.key.public_hex]
    hub.drain(session)
    assert hub.index.free_slots == 0 and not hub.index.free_task_names()
    await hub.unregister(session, "test")
    assert len(hub.index) == 0


async def test_heartbeats_are_stretched_as_workers_crowd_in(cluster: Cluster) -> None:
    # 5,000 idle seekers at a 10 s interval were 500 heartbeats a second, most of a
    # coordinator's idle CPU: the interval each worker is given grows with the crowd.
    hub = cluster.coord.hub
    await _pause(hub)  # this test runs the hub's periodic work itself
    hub.workers_cfg = dataclasses.replace(
        hub.workers_cfg, heartbeat_interval_seconds=1, eviction_seconds=5,
        max_heartbeats_per_second=100,
    )  # fmt: skip
    first = (await _connect(cluster, 1, frozenset({"echo"})))[0]
    assert (first.heartbeat_interval, first.eviction_seconds) == (1, 5)
    crowd = await _connect(cluster, 999, frozenset({"echo"}))
    last = (await _connect(cluster, 1, frozenset({"echo"})))[0]
    assert last.heartbeat_interval == 11  # 1,001 workers at 100 a second
    assert last.eviction_seconds == 55
    # the whole crowd sends about the cap, not one a second each
    rate = sum(1 / s.heartbeat_interval for s in [first, *crowd, last])
    assert rate < 100 * 3
    # eviction follows each session's own time
    stretched = crowd[150]  # connected when 2 s was enough: sends too often once all are in
    hub.clock = lambda: last.last_seen + 6
    await hub.evict_silent()
    assert last.worker_id in hub.sessions and first.worker_id not in hub.sessions
    # the early sessions' intervals are stretched (a HeartbeatSettings message each), at
    # most STRETCH_PER_CHECK a check, earliest first, until all of them together keep to
    # the cap (the hub checks every eviction_seconds / 6)
    target = math.ceil(len(hub.sessions) / 100)
    order = list(hub.sessions.values())
    short = [s for s in order if s.heartbeat_interval < target]
    assert short, f"more than {STRETCH_PER_CHECK} were due: some wait for the next check"
    assert all(s.heartbeat_interval == target for s in order[: order.index(short[0])])
    await hub.evict_silent()
    assert sum(1 / s.heartbeat_interval for s in hub.sessions.values()) <= 100
    told = [m for m in _drain(stretched) if isinstance(m, HeartbeatSettings)]
    assert told[-1] == HeartbeatSettings(target, 5 * target)


async def _pause(hub: WorkerHub) -> None:
    """Stops the hub's background loop (dispatching, sweeps, evictions)."""
    if hub._task is not None:
        hub._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hub._task
        hub._task = None


def _drain(session: WorkerSession) -> list[object]:
    out = []
    while not session.outbox.empty():
        out.append(session.outbox.get_nowait())
    return out


async def test_a_worker_follows_new_heartbeat_settings(cluster: Cluster) -> None:
    w = await cluster.worker()
    assert w.heartbeat_interval != 37
    session = cluster.coord.hub.sessions[w.key.public_hex]
    session.send(HeartbeatSettings(37, 111))
    await wait_until(lambda: w.heartbeat_interval == 37, what="the new interval")


def test_heartbeats_drift_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers that connected together (a reconnect wave) do not heartbeat together for
    good: a session's first heartbeat comes after its interval, each next after 0.9-1.1
    of it (on average on time), so the phases the wave lined up drift apart. Before, every
    worker slept exactly the interval: after a wave of 5,000 seekers, 500-600 heartbeats
    arrived in single seconds, every 10-25 s, for as long as they stayed connected."""
    from dispatchnet.keys import KeyPair
    from dispatchnet.worker import runtime

    class Done(Exception):
        pass

    def schedule(worker: runtime.Worker, beats: int) -> list[float]:
        delays: list[float] = []

        async def sleep(seconds: float) -> None:
            delays.append(seconds)
            if len(delays) > beats:
                raise Done

        with monkeypatch.context() as m:
            m.setattr(runtime.asyncio, "sleep", sleep)
            with contextlib.suppress(Done):
                asyncio.run(worker._heartbeat_loop(asyncio.Queue()))
        return delays[:beats]

    interval = 10
    beats = 20
    phases = []  # when each of 200 workers connected together sends its 20th heartbeat
    nexts = []
    for _ in range(200):
        w = runtime.Worker("127.0.0.1:1", KeyPair.generate())
        w.heartbeat_interval = interval
        first, *rest = schedule(w, beats)
        assert first == interval
        nexts += rest
        phases.append(first + sum(rest))
    assert all(0.9 * interval <= d <= 1.1 * interval for d in nexts)
    assert abs(sum(nexts) / len(nexts) - interval) < 0.1  # the rate the hub counts on
    assert statistics.pstdev(nexts) > 0.04 * interval  # U(0.9, 1.1): 0.058
    # 20 heartbeats on, the 200 that began in the same instant are spread over seconds
    assert statistics.pstdev(phases) > 0.15 * interval  # sqrt(19) * 0.058 * 10 = 2.5 s
