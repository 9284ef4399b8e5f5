"""Reputation from the coordinator's own records, with the formula of reputation/score.py.

The store keeps each worker's record per UTC day (WorkerRegistry.worker_days): job outcomes
counted in the transaction of the job's final transition (and of each retried failure),
and spot-check verdicts given to record_spot_check(). warm(worker) (called when a worker
connects) reads the days within the decay horizon into memory as decayed sums (each day's
entries taken at the middle of the day); score() answers from memory, decaying those sums
to the present; record() and record_spot_check() add to them as outcomes happen here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dispatchnet.coordinator.models import DAY_SECONDS, day_of
from dispatchnet.coordinator.ports import WorkerRegistry
from dispatchnet.reputation.score import (
    Evidence,
    Kind,
    Observation,
    Score,
    ScoreParams,
    combine,
    evidence,
)


class LocalReputation:
    def __init__(
        self,
        store: WorkerRegistry,
        params: ScoreParams | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.params = params or ScoreParams()
        self.clock = clock
        self._evidence: dict[str, Evidence] = {}

    async def warm(self, worker_id: str) -> None:
        now = self.clock()
        since = day_of(now - self.params.horizon_seconds)
        observations: list[Observation] = []
        for d in await self.store.worker_days(worker_id, since):
            at = d.day * DAY_SECONDS + DAY_SECONDS / 2
            for kind, value, count in (
                (Kind.SUCCESS, 1.0, d.completed),
                (Kind.SUCCESS, 0.0, d.failed),
                (Kind.SPOT_CHECK, 1.0, d.agreed),
                (Kind.SPOT_CHECK, 0.0, d.disagreed),
            ):
                if count:
                    observations.append(Observation(kind, value, at, count))
        self._evidence[worker_id] = evidence(observations, now, self.params.half_life_days)

    def components(self, worker_id: str) -> Score:
        """The score with its parts (success rate, agreement, decayed sums), as of now."""
        e = self._evidence.get(worker_id)
        if e is None:
            return combine(Evidence(), self.params)
        return combine(e.decayed_to(self.clock(), self.params.half_life_days), self.params)

    def score(self, worker_id: str) -> float:
        return self.components(worker_id).score

    def _add(self, worker_id: str, e: Evidence) -> None:
        now = self.clock()
        old = self._evidence.get(worker_id, Evidence(now))
        self._evidence[worker_id] = old.decayed_to(now, self.params.half_life_days).plus(e)

    def record(self, worker_id: str, success: bool) -> None:
        # (counted durably by the job's transition: Store.transition's outcome)
        self._add(worker_id, Evidence(0.0, 1.0, 1.0 if success else 0.0))

    async def record_spot_check(self, worker_id: str, agreed: bool) -> None:
        """Stores the verdict (the worker's day tally), then counts it in memory with the
        run's outcome (a success when it agreed), which the verified job's conclusion
        counted in the same tallies."""
        await self.store.record_spot_check(worker_id, agreed, self.clock())
        self._add(worker_id, Evidence(0.0, 1.0, float(agreed), float(agreed), float(not agreed)))
