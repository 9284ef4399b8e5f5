"""In-process wake-ups for job watchers. Durable history lives in the store; this only
shortens the wait. Watchers also re-read the store periodically, so events written by
another coordinator process are seen too."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class JobNotifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        for ev in self._waiters.get(job_id, ()):
            ev.set()

    def subscribe(self, job_id: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters[job_id].add(ev)
        return ev

    def unsubscribe(self, job_id: str, ev: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self._waiters[job_id]
