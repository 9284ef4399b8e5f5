"""Failure counting with lockouts (used for pairing claims): too many failures by one key
in a window, or by everyone together, lock out further attempts until the window passes.

In memory, per coordinator process (a restart or another coordinator starts from zero),
and bounded: the per-key table keeps at most `max_keys` keys, forgetting the one whose
last failure is oldest; the global count keeps at most `global_max` timestamps.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque


class FailureLimiter:
    def __init__(
        self,
        per_key: int,
        key_window: float,
        global_max: int,
        global_window: float,
        max_keys: int = 10000,
    ) -> None:
        self.per_key, self.key_window = per_key, key_window
        self.global_max, self.global_window = global_max, global_window
        self.max_keys = max_keys
        # key -> its failure times (oldest first, at most per_key); least recent key first
        self._keys: OrderedDict[str, deque[float]] = OrderedDict()
        self._global: deque[float] = deque(maxlen=max(1, global_max))

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        wait = 0.0
        times = self._keys.get(key)
        if times is not None and self.per_key > 0 and len(times) >= self.per_key:
            wait = times[-self.per_key] + self.key_window - now
        if self.global_max > 0 and len(self._global) >= self.global_max:
            wait = max(wait, self._global[-self.global_max] + self.global_window - now)
        return max(0.0, wait)

    def failed(self, key: str, now: float) -> None:
        times = self._keys.pop(key, None)
        if times is None:
            times = deque(maxlen=max(1, self.per_key))
        while times and times[0] <= now - self.key_window:
            times.popleft()
        times.append(now)
        self._keys[key] = times  # now the most recent
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        self._global.append(now)

    def succeeded(self, key: str) -> None:
        self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)


def whole_seconds(seconds: float) -> int:
    """A wait rounded up, at least 1 (for messages)."""
    return max(1, math.ceil(seconds))
