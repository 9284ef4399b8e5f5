"""Reputation from the coordinator's own records: a Beta(1, 1) prior over success.

score = (completed + 1) / (completed + failed + 2), so a new worker starts at 0.5.
Scores are answered from memory; the store is read when a worker connects (warm).
"""

from __future__ import annotations

from dispatchnet.coordinator.ports import WorkerRegistry


class LocalReputation:
    def __init__(self, store: WorkerRegistry) -> None:
        self.store = store
        self._stats: dict[str, tuple[int, int]] = {}

    async def warm(self, worker_id: str) -> None:
        self._stats[worker_id] = await self.store.worker_stats(worker_id)

    def score(self, worker_id: str) -> float:
        completed, failed = self._stats.get(worker_id, (0, 0))
        return (completed + 1) / (completed + failed + 2)

    def record(self, worker_id: str, success: bool) -> None:
        # (counted durably by the job's transition: Store.transition's outcome)
        completed, failed = self._stats.get(worker_id, (0, 0))
        self._stats[worker_id] = (completed + success, failed + (not success))
