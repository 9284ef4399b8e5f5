"""In-process latency metrics: named series of durations, summarised as count, mean and
percentiles. Recorded where the work happens (e.g. x402 verification and settlement) and
printed by `make bench` and the demo; never asserted by tests."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

KEEP = 10000  # most recent samples kept per series


@dataclass(frozen=True)
class Summary:
    name: str
    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    max_ms: float

    def line(self) -> str:
        return (
            f"{self.name}: n={self.count} mean={self.mean_ms:.1f}ms p50={self.p50_ms:.1f}ms "
            f"p95={self.p95_ms:.1f}ms max={self.max_ms:.1f}ms"
        )


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=KEEP))
        self._counts: dict[str, int] = defaultdict(int)

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._series[name].append(seconds)
            self._counts[name] += 1

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Records the block's duration, whether it returns or raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start)

    def summary(self, name: str) -> Summary | None:
        with self._lock:
            samples = sorted(self._series.get(name, ()))
            count = self._counts.get(name, 0)
        if not samples:
            return None

        def pct(p: float) -> float:
            return samples[min(len(samples) - 1, int(p * len(samples)))] * 1000

        return Summary(
            name, count, sum(samples) / len(samples) * 1000, pct(0.5), pct(0.95), samples[-1] * 1000
        )

    def summaries(self) -> list[Summary]:
        with self._lock:
            names = sorted(self._series)
        return [s for s in (self.summary(n) for n in names) if s is not None]

    def reset(self) -> None:
        with self._lock:
            self._series.clear()
            self._counts.clear()


METRICS = Metrics()
