"""OutboxLoop: the background loop shared by the coordinator's chain outboxes (feedback,
payments). A pass runs every tick, or at once when kick()ed; a pass that handled a full
page runs again straight away. After chain trouble the pass calls backed_off(), which
pauses passes with exponential backoff; a successful step calls recovered(). A pass runs
only under its pass lock (locks, the store's: once across coordinators sharing it).

KeyedOrder: handlers that run side by side, but one after another under one key."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from dispatchnet.coordinator.observer import NULL_OBSERVER, Observer
from dispatchnet.coordinator.ports import ONE_PROCESS, PassLocks

log = logging.getLogger("dispatch.loops")


class OutboxLoop:
    name = "outbox"  # the task's name, and the log's word for it
    outbox = "outbox"  # what it sends, for metrics (a fixed word: a label value)
    page = 100  # a pass that handles this many items is followed by another at once
    # Kicks coalesce: a pass a kick asks for starts no sooner than this after the last one
    # started, so a busy coordinator (a kick per finished job) runs a few passes a second,
    # each over everything that came due meanwhile, not one store read per job.
    min_pass_gap = 0.05

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
    ) -> None:
        self.clock = clock
        self.tick = tick_seconds
        self.retry_initial = retry_initial_seconds
        self.retry_max = retry_max_seconds
        self._failures = 0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pass_at = float("inf")  # a pass wanted no later than this (wake_at)
        self.last_error = ""
        self.observer: Observer = NULL_OBSERVER  # told about chain trouble (set by the server)
        self.chain = ""  # the CAIP-2 network it sends to, when it is one
        self.locks: PassLocks = ONE_PROCESS  # the store's, when it is shared (set by the server)

    async def run_pass(self) -> int:
        """One pass; how many items it handled."""
        raise NotImplementedError

    def kick(self) -> None:
        self._wake.set()

    def wake_at(self, t: float) -> None:
        """Asks for a pass no later than clock time t (sooner than the tick if need be)."""
        self._pass_at = min(self._pass_at, t)

    def backing_off(self) -> bool:
        return self.clock() < self._retry_at

    def backed_off(self, error: str, chain: str = "") -> float:
        """Notes chain trouble (on `chain`, default self.chain); the delay before the next
        pass."""
        self.last_error = error
        self.observer.chain_trouble(self.outbox, chain or self.chain, error)
        self._failures += 1
        delay = float(min(self.retry_max, self.retry_initial * 2 ** (self._failures - 1)))
        self._retry_at = self.clock() + delay
        return delay

    async def fenced(self) -> bool:
        """Whether this pass may take its next side effect (a transaction, a post): its
        pass lock is still this process's (PassLocks.pass_still_held). A pass whose lock
        went with its database connection stops; another coordinator may run it now."""
        if await self.locks.pass_still_held(self.name):
            return True
        log.warning("%s: the pass lock was lost mid-pass; stopping this pass", self.name)
        return False

    def recovered(self) -> None:
        self._failures, self._retry_at, self.last_error = 0, 0.0, ""

    def _wait(self) -> float:
        now = self.clock()
        backoff = self._retry_at - now
        wait = min(self.tick, max(0.01, backoff)) if backoff > 0 else self.tick
        if self._pass_at < float("inf"):
            wait = min(wait, max(0.01, self._pass_at - now))
        return wait

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                async with self.locks.pass_lock(self.name) as held:
                    if held and await self.run_pass() >= self.page:
                        self._wake.set()
            except Exception:
                log.exception("%s pass failed; retrying on the next tick", self.name)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait()):
                    await self._wake.wait()
            await coalesce(started, self.min_pass_gap)
            self._wake.clear()
            self._pass_at = float("inf")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def coalesce(started: float, gap: float) -> None:
    """Waits until `gap` seconds (event-loop time) after `started`, the start of the last
    pass, so the wake-ups that arrive meanwhile share the next pass."""
    rest = started + gap - asyncio.get_running_loop().time()
    if rest > 0:
        await asyncio.sleep(rest)


class KeyedOrder:
    """Runs handlers side by side, except that those under one key run one after another,
    in the order they were submitted; at most `limit` are submitted and unfinished at a
    time (submit waits for room). A worker's stream uses it per job: its results are
    written to the store together, while each job's messages (accept, progress, result)
    keep their order. A handler's exception does not stop the next one (it is logged)."""

    def __init__(self, limit: int) -> None:
        self._room = asyncio.Semaphore(limit)
        self._tails: dict[str, asyncio.Task[None]] = {}

    async def submit(self, key: str, handler: Callable[[], Awaitable[None]]) -> None:
        await self._room.acquire()
        task = asyncio.create_task(self._run(self._tails.get(key), handler))
        self._tails[key] = task
        task.add_done_callback(functools.partial(self._done, key))

    async def _run(
        self, before: asyncio.Task[None] | None, handler: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            if before is not None:
                await asyncio.wait([before])
            await handler()
        except Exception:  # handlers report their own failures; this one is a bug
            log.exception("a handler run in order failed")
        finally:
            self._room.release()

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]

    async def finish(self) -> None:
        """Waits until everything submitted has run (the last of each key's chain)."""
        while self._tails:
            await asyncio.wait(list(self._tails.values()))
