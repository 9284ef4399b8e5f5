"""Reputation from ERC-8004 feedback on chain, served from memory.

A worker's score comes from ReputationRegistry.getSummary(agentId, trusted reviewers,
"successRate", "") = (count n, average value v in 0..100), as a Bayesian average with the
profile's prior p weighted like k = prior_weight feedback entries:

    score = (n * v/100 + k * p) / (n + k)        (clamped to [0, 1])

A worker with no agent id, or not yet read, scores p. score() never calls the chain: it
reads the cache. warm(worker) (called when a worker connects) starts a background refresh
(an asyncio task; the chain call runs in a thread) when the cached value is older than
cache_ttl_seconds; a failed refresh keeps the last score. record() nudges the cached score
with the outcome of a job finished here (one more observation, 1 or 0) until the next
refresh replaces it with the chain's numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("dispatch.reputation")


class SummaryReader(Protocol):
    def summary(self, agent_id: int) -> tuple[int, float]:
        """(count, average value 0..100); blocking."""
        ...


@dataclass
class _Cached:
    count: int = 0
    mean: float = 0.0  # average normalized value in [0, 1]
    local_n: int = 0  # outcomes recorded here since the last refresh
    local_sum: float = 0.0
    read_at: float = float("-inf")


class Erc8004Reputation:
    def __init__(
        self,
        reader: SummaryReader,
        agent_of: Callable[[str], str],
        *,
        prior: float = 0.5,
        prior_weight: float = 2.0,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.agent_of = agent_of
        self.prior = prior
        self.k = prior_weight
        self.ttl = ttl_seconds
        self.clock = clock
        self._cache: dict[int, _Cached] = {}
        self._refreshing: dict[int, asyncio.Task[None]] = {}

    def _agent(self, worker_id: str) -> int | None:
        agent = self.agent_of(worker_id)
        try:
            return int(agent) if agent else None
        except ValueError:
            return None

    def score(self, worker_id: str) -> float:
        agent = self._agent(worker_id)
        c = self._cache.get(agent) if agent is not None else None
        if c is None:
            return self.prior
        n = c.count + c.local_n
        s = (c.count * c.mean + c.local_sum + self.k * self.prior) / (n + self.k)
        return min(1.0, max(0.0, s))

    async def warm(self, worker_id: str) -> None:
        agent = self._agent(worker_id)
        if agent is None or agent in self._refreshing:
            return
        c = self._cache.get(agent)
        if c is not None and self.clock() - c.read_at < self.ttl:
            return
        self._refreshing[agent] = asyncio.get_running_loop().create_task(self.refresh(agent))

    async def refresh(self, agent_id: int) -> None:
        """Reads the agent's summary from the chain (in a thread) into the cache."""
        try:
            count, value = await asyncio.to_thread(self.reader.summary, agent_id)
        except Exception as e:  # keep the last score
            log.warning("reputation of agent %d not refreshed: %s", agent_id, e)
        else:
            self._cache[agent_id] = _Cached(
                count=count, mean=min(1.0, max(0.0, value / 100)), read_at=self.clock()
            )
        finally:
            self._refreshing.pop(agent_id, None)

    def record(self, worker_id: str, success: bool) -> None:
        agent = self._agent(worker_id)
        if agent is None:
            return
        c = self._cache.setdefault(agent, _Cached())
        c.local_n += 1
        c.local_sum += 1.0 if success else 0.0

    async def stop(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        self._refreshing.clear()
