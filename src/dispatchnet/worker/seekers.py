"""A swarm of simulated mobile seekers in one process, for load and fault testing.

Each seeker is a runtime.Worker of kind "seeker" (TASK jobs only) with its own ed25519 key
and its own Connect stream (a Worker opens one channel per session), plus a simulated
Device whose behaviour the switches turn on:

- flaky: every tick (tick_seconds) each seeker's connection drops with probability `flaky`
  (Worker.disconnect) and comes back after a random offline period (offline_seconds).
- battery: a charge that drains with each job and while jobs run, and charges slowly while
  idle; below BATTERY_LOW percent the seeker rejects offers with "battery_low".
- heat: a temperature that rises with each job and while jobs run, and cools towards
  AMBIENT; above HOT degrees the seeker rejects offers with "device_hot".
- slow: a per-device speed factor, uniform in [1, slow]; a job on a device with factor f
  takes f times as long as here, counting at least SLOW_BASE_SECONDS of work per job.
- lie_rate (FOR DEMOS AND TESTS ONLY, worker/lying.py): with this probability a job's
  output is replaced by a wrong one before the worker signs its receipt: the receipt is
  properly signed, the answer is just wrong, which is what redundant runs and spot checks
  catch (README "Verification"). An honest seeker never sets it.

The same seed gives every seeker the same device (speed, initial battery and temperature)
and the same sequence of drops and offline periods: seeker i draws from its own generator
seeded with (seed, i), so its behaviour does not depend on how many seekers run or how
their events interleave. Keys are not derived from the seed: they are random (ephemeral),
or kept under key_dir so that a seeker keeps its worker id across runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from dispatch.v1 import common_pb2, worker_pb2
from dispatchnet import keys
from dispatchnet.worker.executors import (
    Executor,
    Progress,
    WrappingExecutor,
    default_executors,
)
from dispatchnet.worker.lying import check_rate, lying
from dispatchnet.worker.runtime import Worker
from dispatchnet.worker.tasks import TaskOutput

WORKER_LOG = "dispatch.seekers.worker"
"""The logger every simulated Worker logs to (one line per job; quiet it for big swarms)."""

BATTERY_LOW = 20.0  # percent: below it, offers are rejected with "battery_low"
BATTERY_PER_JOB = 0.5  # percent taken by each job
BATTERY_DRAIN_PER_SECOND = 0.5  # percent per second per running job
BATTERY_CHARGE_PER_SECOND = 0.05  # percent per second while no job runs
AMBIENT = 30.0  # degrees Celsius
HOT = 45.0  # degrees: above it, offers are rejected with "device_hot"
MAX_TEMPERATURE = 60.0
HEAT_PER_JOB = 1.5  # degrees added by each job
HEAT_PER_SECOND = 1.0  # degrees per second per running job
COOLING_SECONDS = 60.0  # time constant of the cooling towards AMBIENT
SLOW_BASE_SECONDS = 0.1  # the least work a job counts as when the device is slow

log = logging.getLogger("dispatch.seekers")


class Device:
    """A simulated phone: battery, temperature and speed, advanced lazily on `clock`.

    Battery and temperature are always simulated; `battery` and `heat` say whether they
    make the seeker reject offers. `battery_level` overrides the random initial charge.
    """

    def __init__(
        self,
        rng: random.Random,
        battery: bool = False,
        heat: bool = False,
        slow: float = 1.0,
        battery_level: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Always the same draws in the same order, whatever the switches.
        speed, charge, warmth = rng.random(), rng.uniform(40.0, 100.0), rng.uniform(0.0, 5.0)
        self.battery = battery
        self.heat = heat
        self.speed = 1.0 + (slow - 1.0) * speed
        self.battery_level = charge if battery_level is None else battery_level
        self.temperature = AMBIENT + warmth
        self.running = 0
        self.clock = clock
        self._t = clock()

    def advance(self) -> None:
        """Brings battery and temperature up to now."""
        now = self.clock()
        dt, self._t = max(0.0, now - self._t), now
        if self.running:
            self.battery_level -= BATTERY_DRAIN_PER_SECOND * self.running * dt
            self.temperature += HEAT_PER_SECOND * self.running * dt
        else:
            self.battery_level += BATTERY_CHARGE_PER_SECOND * dt
        self.temperature = AMBIENT + (self.temperature - AMBIENT) * math.exp(-dt / COOLING_SECONDS)
        self.battery_level = min(100.0, max(0.0, self.battery_level))
        self.temperature = min(MAX_TEMPERATURE, self.temperature)

    def job_started(self) -> None:
        self.advance()
        self.running += 1
        self.battery_level = max(0.0, self.battery_level - BATTERY_PER_JOB)
        self.temperature = min(MAX_TEMPERATURE, self.temperature + HEAT_PER_JOB)

    def job_finished(self) -> None:
        self.advance()
        self.running -= 1

    def rejection(self) -> str:
        """Why the device refuses work now ("battery_low", "device_hot"), or ""."""
        self.advance()
        if self.battery and self.battery_level < BATTERY_LOW:
            return "battery_low"
        if self.heat and self.temperature > HOT:
            return "device_hot"
        return ""

    def delay(self, elapsed: float) -> float:
        """Extra seconds a job that took `elapsed` here takes on this device."""
        if self.speed <= 1.0:
            return 0.0
        return (self.speed - 1.0) * max(elapsed, SLOW_BASE_SECONDS)


class DeviceExecutor(WrappingExecutor):
    """Wraps an executor: accounts each job to the device and slows it down to its speed."""

    def __init__(self, inner: Executor, device: Device) -> None:
        super().__init__(inner)
        self.device = device

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        self.device.job_started()
        try:
            started = time.monotonic()
            out = await self.inner.run(spec, progress)
            delay = self.device.delay(time.monotonic() - started)
            if delay:
                await asyncio.sleep(delay)
            return out
        finally:
            self.device.job_finished()


@dataclass
class Seeker:
    """One simulated seeker: its Worker, its Device and its random generator."""

    index: int
    worker: Worker
    device: Device
    rng: random.Random
    rejections: Counter[str] = field(default_factory=Counter)
    task: asyncio.Task[None] | None = None

    def offer_filter(self, offer: worker_pb2.JobOffer) -> str:
        reason = self.device.rejection()
        if reason:
            self.rejections[reason] += 1
        return reason


@dataclass(frozen=True)
class SwarmStats:
    seekers: int
    connected: int
    completed: int
    failed: int
    rejected: int  # every rejected offer, whatever the reason
    rejections: dict[str, int]  # those the device policy made, by reason
    drops: int  # connections dropped by flaky ticks
    sessions: int  # sessions opened, reconnections included

    def line(self) -> str:
        """The one-line status the swarm logs periodically."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejections.items()))
        return (
            f"{self.connected}/{self.seekers} connected, {self.completed} done, "
            f"{self.failed} failed, {self.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {self.drops} drops"
        )


class SeekerSwarm:
    """`count` simulated seekers against a coordinator; see the module docstring.

    coordinator: one address, or several (comma-separated or a list) of coordinators that
    share one database: seeker i starts at address i (wrapped), so the swarm is spread
    over them, and each fails over to the next when its coordinator goes (runtime.Worker).

    Use start() then drain() or stop() + wait(), or `async with` (start, then stop + wait).
    Besides the command's switches: battery_level sets every initial charge (percent);
    tick_seconds and offline_seconds (low, high) shape the flaky drops, and tick() runs one
    tick by hand; status_seconds (None: never) paces the status log line; executors (default:
    the worker defaults, shared by all seekers) are what each device wraps; clock drives the
    devices' battery and temperature.
    """

    def __init__(
        self,
        coordinator: str | Sequence[str],
        count: int,
        *,
        seed: int | None = None,
        max_concurrency: int = 1,
        flaky: float = 0.0,
        battery: bool = False,
        heat: bool = False,
        slow: float = 1.0,
        key_dir: Path | None = None,
        battery_level: float | None = None,
        tick_seconds: float = 5.0,
        offline_seconds: tuple[float, float] = (2.0, 30.0),
        status_seconds: float | None = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        executors: list[Executor] | None = None,
        clock: Callable[[], float] = time.monotonic,
        lie_rate: float = 0.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        if not 0.0 <= flaky <= 1.0:
            raise ValueError("flaky is a probability per tick: between 0 and 1")
        check_rate(lie_rate)
        if slow < 1.0:
            raise ValueError("slow is the largest speed factor: at least 1")
        if battery_level is not None and not 0.0 <= battery_level <= 100.0:
            raise ValueError("battery_level is a percentage: between 0 and 100")
        if tick_seconds <= 0:
            raise ValueError("tick_seconds must be positive")
        if not 0.0 <= offline_seconds[0] <= offline_seconds[1]:
            raise ValueError("offline_seconds must be (low, high) with 0 <= low <= high")
        self.coordinator = coordinator
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.flaky = flaky
        self.tick_seconds = tick_seconds
        self.offline_seconds = offline_seconds
        self.status_seconds = status_seconds
        self.drops = 0
        # One set of executors for the whole process, wrapped per device.
        base = executors if executors is not None else default_executors()
        worker_log = logging.getLogger(WORKER_LOG)
        self.seekers: list[Seeker] = []
        for i in range(count):
            rng = random.Random(f"{self.seed}/{i}")
            device = Device(rng, battery, heat, slow, battery_level, clock)
            key = (
                keys.load_or_create(key_dir / f"seeker-{i:04d}.key")
                if key_dir is not None
                else keys.KeyPair.generate()
            )
            worker = Worker(
                coordinator,
                key,
                kind="seeker",
                max_concurrency=max_concurrency,
                executors=[
                    DeviceExecutor(e, device)
                    for e in lying(base, lie_rate, random.Random(f"{self.seed}/{i}/lie"))
                ],
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
                log=worker_log,
                first=i,
            )
            seeker = Seeker(i, worker, device, rng)
            worker.offer_filter = seeker.offer_filter
            self.seekers.append(seeker)
        self._loops: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every seeker (each connects on its own) and the tick and status loops."""
        if self._stopped.is_set():
            raise RuntimeError("a stopped swarm stays stopped; make a new one")
        for s in self.seekers:
            if s.task is None:
                s.task = asyncio.create_task(s.worker.run(), name=f"seeker-{s.index}")
        if not self._loops:
            if self.flaky > 0:
                self._loops.append(asyncio.create_task(self._every(self.tick_seconds, self.tick)))
            if self.status_seconds:
                self._loops.append(asyncio.create_task(self._every(self.status_seconds, self._log)))

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (like Worker.drain)
        """Every seeker takes no new offers and waits up to timeout for its results to be
        acknowledged; then all stop. stop() meanwhile cuts the wait short."""
        self._stop_loops()
        started = [s.worker for s in self.seekers if s.task is not None]

        async def drain_all() -> None:
            await asyncio.gather(*(w.drain(timeout) for w in started))

        waiters: set[asyncio.Task[Any]] = {
            asyncio.create_task(drain_all()),
            asyncio.create_task(self._stopped.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.wait(waiters)
            self.stop()
            await self.wait()

    def stop(self) -> None:
        """Stops every seeker at once (running jobs are cancelled); wait() for them to end."""
        self._stopped.set()
        self._stop_loops()
        for s in self.seekers:
            s.worker.stop()

    async def wait(self) -> None:
        """Waits until every started seeker and loop has ended."""
        tasks = [s.task for s in self.seekers if s.task is not None] + self._loops
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> SeekerSwarm:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        await self.wait()

    # --- behaviour ------------------------------------------------------------------------

    def tick(self, drop_probability: float | None = None) -> int:
        """One flaky tick: each connected seeker drops its connection with the probability
        (default: flaky) and stays offline for a random period. Returns how many dropped.

        Every seeker draws its two numbers whether or not it is connected, so the drops
        depend on the seed and the number of ticks only."""
        p = self.flaky if drop_probability is None else drop_probability
        dropped = 0
        for s in self.seekers:
            roll, offline = s.rng.random(), s.rng.uniform(*self.offline_seconds)
            if roll < p and s.task is not None and s.worker.disconnect(offline):
                dropped += 1
        self.drops += dropped
        return dropped

    def stats(self) -> SwarmStats:
        rejections: Counter[str] = Counter()
        for s in self.seekers:
            rejections.update(s.rejections)
        workers = [s.worker for s in self.seekers]
        return SwarmStats(
            seekers=len(workers),
            connected=sum(w.connected.is_set() for w in workers),
            completed=sum(w.completed for w in workers),
            failed=sum(w.failed for w in workers),
            rejected=sum(w.rejected for w in workers),
            rejections=dict(rejections),
            drops=self.drops,
            sessions=sum(w.sessions for w in workers),
        )

    def _log(self) -> None:
        log.info("seekers: %s", self.stats().line())

    async def _every(self, seconds: float, fn: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            fn()

    def _stop_loops(self) -> None:
        for loop in self._loops:
            loop.cancel()
