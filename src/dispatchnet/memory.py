"""Gives freed heap back to the OS after big requests (glibc's malloc_trim).

grpc and protobuf copy a multi-MiB request several times; after a burst of them the memory
is free but glibc keeps it (measured: a coordinator at ~60 MB stayed at ~260 MB after 200
requests of 4 MiB; MALLOC_ARENA_MAX did not help, malloc_trim(0) did). A trim is cheap, runs
in a thread, and happens at most once per `delay` seconds while big requests arrive, then
once more after the last. Where there is no malloc_trim (not glibc), this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("dispatch.memory")

# A request at least this big schedules a trim.
TRIM_AFTER_BYTES = 1024 * 1024
TRIM_DELAY_SECONDS = 1.0


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
