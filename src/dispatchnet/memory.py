"""Keeps the heap in shape: gives freed heap back to the OS after big requests (glibc's
malloc_trim), and keeps long-lived objects out of the cyclic garbage collector's full passes
(HeapFreezer), and collects young objects less often (young_collections_every).

MemoryTrimmer:
grpc and protobuf copy a multi-MiB request several times; after a burst of them the memory
is free but glibc keeps it (measured: a coordinator at ~60 MB stayed at ~260 MB after 200
requests of 4 MiB; MALLOC_ARENA_MAX did not help, malloc_trim(0) did). A trim is cheap, runs
in a thread, and happens at most once per `delay` seconds while big requests arrive, then
once more after the last. Where there is no malloc_trim (not glibc), this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("dispatch.memory")

# A request at least this big schedules a trim.
TRIM_AFTER_BYTES = 1024 * 1024
TRIM_DELAY_SECONDS = 1.0
# HeapFreezer: workers that connected are frozen this long after the last of a wave, and
# what was frozen is looked at again (one full collection) this often.
FREEZE_DELAY_SECONDS = 2.0
RECLAIM_SECONDS = 3600.0
# young_collections_every: the cyclic collector's youngest generation is collected once this
# many more container objects exist than at its last collection (CPython's default: 700).
YOUNG_COLLECTION_OBJECTS = 5000


def young_collections_every(objects: int = YOUNG_COLLECTION_OBJECTS) -> None:
    """Sets how many new container objects start a young collection, for the coordinator
    and its SQLite writer (long-running, many objects per job). With CPython's 700 a
    collection came every few jobs and walked the objects of the jobs in flight, which
    then lived on into the older generations and were walked there again: under RunJob
    load (64 submitters, 2 cores) the coordinator spent ~36 us per job in the collector
    (timed with gc.callbacks), ~14 us with 5,000 (a young collection of ~0.4 ms every
    ~50 ms instead of ~0.2 ms every ~10 ms), its writer ~6 -> ~1 us. Workers gain
    nothing: few of their objects outlive a job. Garbage without cycles is freed at once
    either way; only cycles wait longer for a collection."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(objects, middle, old)


def _malloc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer:
    def __init__(
        self, threshold: int = TRIM_AFTER_BYTES, delay: float = TRIM_DELAY_SECONDS
    ) -> None:
        self.threshold, self.delay = threshold, delay
        self.trim = _malloc_trim()
        self.scheduled: asyncio.TimerHandle | None = None
        self.running: set[asyncio.Task[object]] = set()
        self.trims = 0

    def saw(self, size: int) -> None:
        """Called with each request's size; a big one schedules a trim. Call in the loop."""
        if size < self.threshold or self.trim is None or self.scheduled is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.scheduled = loop.call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self.scheduled = None
        assert self.trim is not None
        task = asyncio.ensure_future(asyncio.to_thread(self.trim))
        self.running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self.running.discard(task)
        self.trims += 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("malloc_trim failed: %s", task.exception())

    def close(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()
            self.scheduled = None


class HeapFreezer:
    """Moves what exists into the cyclic collector's permanent generation (gc.freeze) once
    a wave of worker sessions has connected, so that full collections scan only what jobs
    made since. Each connected worker is thousands of objects (its stream, its gRPC call,
    its session) that live as long as it stays; with 5,000 seekers connected a full
    collection over them paused the event loop 100-270 ms every one to three seconds
    under load (measured). Frozen objects are never collected as cyclic garbage, so once
    every `reclaim` seconds everything is unfrozen, collected once (one pause of that
    size) and frozen again: cycles left by workers that went away are freed then.
    For long-running processes only (`dispatch coordinator`): a test process that freezes
    keeps every cycle it makes."""

    def __init__(
        self, delay: float = FREEZE_DELAY_SECONDS, reclaim: float = RECLAIM_SECONDS
    ) -> None:
        self.delay, self.reclaim = delay, reclaim
        self.scheduled: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.freezes = 0
        self.frozen_since_reclaim = False

    def start(self) -> None:
        """Freezes what exists now, and reclaims every `reclaim` seconds. In the loop."""
        gc.collect()
        self._freeze()
        if self.task is None:
            self.task = asyncio.create_task(self._reclaim_loop(), name="heap-reclaim")

    def sessions_changed(self, connected: int) -> None:
        """A worker connected: a freeze `delay` seconds from now, unless one is due."""
        if self.scheduled is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
            loop = asyncio.get_running_loop()
            self.scheduled = loop.call_later(self.delay, self._freeze)

    def _freeze(self) -> None:
        self.scheduled = None
        gc.freeze()
        self.freezes += 1
        self.frozen_since_reclaim = True

    async def _reclaim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reclaim)
            if not self.frozen_since_reclaim:
                continue
            start = time.perf_counter()
            gc.unfreeze()
            freed = gc.collect()
            gc.freeze()
            self.frozen_since_reclaim = False
            log.info("heap reclaimed: %d cyclic objects freed in %.0f ms", freed,
                     1000 * (time.perf_counter() - start))  # fmt: skip

    async def close(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()
            self.scheduled = None
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
