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
    HEARTBEAT_SLACK,
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
    # most STRETCH_PER_CHECK at once, earliest first, until all of them together keep to
    # the cap: the check (every eviction_seconds / 6) starts it, every sweep (1 s) goes on
    target = math.ceil(len(hub.sessions) / 100)
    order = list(hub.sessions.values())
    short = [s for s in order if s.heartbeat_interval < target]
    assert short, f"more than {STRETCH_PER_CHECK} were due: some wait for the next sweep"
    assert all(s.heartbeat_interval == target for s in order[: order.index(short[0])])
    hub.stretch_heartbeats()
    assert sum(1 / s.heartbeat_interval for s in hub.sessions.values()) <= 100 * HEARTBEAT_SLACK
    told = [m for m in _drain(stretched) if isinstance(m, HeartbeatSettings)]
    assert told[-1] == HeartbeatSettings(target, 5 * target)
    # done: the next sweeps and checks tell nobody anything
    for s in hub.sessions.values():
        _drain(s)
    for _ in range(2):
        hub.stretch_heartbeats()
        await hub.evict_silent()
    assert not any(_drain(s) for s in hub.sessions.values())


async def test_the_hub_stretches_heartbeats_at_every_sweep(cluster: Cluster) -> None:
    """The hub's own loop: once a check found the heartbeats over the cap, each sweep
    stretches the next STRETCH_PER_CHECK sessions, without waiting for the next check,
    and it stops once all together keep to the cap (with its slack)."""
    hub, sessions = await _overdue_crowd(cluster)
    # each got one second per session before it: ~7.5 heartbeats a second, against a cap of 1
    target = hub.heartbeat_interval(len(hub.sessions))
    assert target == len(sessions)

    def rate() -> float:
        return sum(1 / s.heartbeat_interval for s in sessions)

    assert rate() > 7
    hub.jobs_cfg = dataclasses.replace(hub.jobs_cfg, sweep_interval_seconds=0.01)
    hub.start()  # its first tick checks (and starts the stretch); the checks then wait 600 s
    await wait_until(lambda: rate() <= HEARTBEAT_SLACK, what="the sweeps to stretch enough")
    told = [s for s in sessions if any(isinstance(m, HeartbeatSettings) for m in _drain(s))]
    assert len(told) > STRETCH_PER_CHECK  # more than the check's own batch
    assert told == sessions[: len(told)]  # the earliest (the shortest intervals) first
    assert all(s.heartbeat_interval == target for s in told)
    # and no more than needed: the later ones keep theirs
    assert len(told) < len(sessions) - 100
    assert rate() > HEARTBEAT_SLACK - 0.01


async def test_stretching_waits_while_a_wave_connects(cluster: Cluster) -> None:
    """A sweep that finds more than STRETCH_PER_CHECK sessions connected since the last
    stretch tells nobody: stretched now, they would be stretched again once the wave is
    in (each new worker raises the interval a session should have)."""
    hub, first = await _overdue_crowd(cluster)
    await hub.evict_silent()  # the check: the first batch, and more are due
    told = [s for s in first if any(isinstance(m, HeartbeatSettings) for m in _drain(s))]
    assert len(told) == STRETCH_PER_CHECK
    await _connect(cluster, STRETCH_PER_CHECK + 1, frozenset({"echo"}))  # a wave
    hub.stretch_heartbeats()  # the next sweep: the wave is still coming in
    assert not any(_drain(s) for s in hub.sessions.values())
    hub.stretch_heartbeats()  # nobody new since: on with the stretch
    target = hub.heartbeat_interval(len(hub.sessions))
    now = [s for s in first if any(isinstance(m, HeartbeatSettings) for m in _drain(s))]
    assert now and all(s.heartbeat_interval == target for s in now)


async def _overdue_crowd(cluster: Cluster) -> tuple[WorkerHub, list[WorkerSession]]:
    """The hub paused, heartbeats capped at 1 a second, checks for silent workers every
    600 s, and 2 x STRETCH_PER_CHECK + 10 sessions, each connected with the interval that
    kept the crowd of its time to the cap: the earliest ones now send far too often."""
    hub = cluster.coord.hub
    await _pause(hub)
    hub.workers_cfg = dataclasses.replace(
        hub.workers_cfg, heartbeat_interval_seconds=1, eviction_seconds=3600,
        max_heartbeats_per_second=1,
    )  # fmt: skip
    return hub, await _connect(cluster, 2 * STRETCH_PER_CHECK + 10, frozenset({"echo"}))


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
