"""Reputation from ERC-8004 feedback on chain, given by trusted reviewers, served from memory.

Only feedback whose reviewer (clientAddress) the profile trusts counts: the reader asks the
chain for the NewFeedback (and FeedbackRevoked) events of one agent filtered to those
reviewers ([reputation] trusted_reviewers plus the coordinator's own chain account), so
feedback from anyone else is never even read. Entries tagged "successRate" and "spotCheck"
become observations at the time of the block that holds them (ERC-8004 feedback has no
timestamp of its own) and go through the formula of reputation/score.py (decay,
prior, spot-check penalty) as of the latest block's time.

score() never calls the chain: it reads the cache. warm(worker) (called when a worker
connects) starts a background refresh (an asyncio task; the chain calls run in a thread)
when the cached value is older than cache_ttl_seconds; a failed refresh keeps the last
score. A refresh reads only the blocks after the last one it read for that agent (the
first from [reputation] from_block), so its cost follows the new feedback, not the agent's
history; observations older than HORIZON_HALF_LIVES half-lives are forgotten. record()
and record_spot_check() nudge the cached score with an outcome seen here (one more
observation now) until the next refresh replaces it with the chain's entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dispatchnet.reputation.score import (
    Evidence,
    Kind,
    Observation,
    Score,
    ScoreParams,
    combine,
    decay,
    evidence,
)

log = logging.getLogger("dispatch.reputation")

KINDS = {k.value: k for k in Kind}


@dataclass(frozen=True)
class FeedbackRecord:
    """One NewFeedback event from a trusted reviewer."""

    reviewer: str
    index: int  # 1-based per (agent, reviewer)
    tag1: str
    tag2: str
    value: float  # value / 10**valueDecimals (0..100 for successRate and spotCheck)
    at: float  # the timestamp of the block that holds it
    block: int


@dataclass(frozen=True)
class FeedbackPage:
    """What a reader found in blocks [from_block, next_block)."""

    records: list[FeedbackRecord]
    revoked: list[tuple[str, int]]  # (reviewer, index) of FeedbackRevoked events
    next_block: int  # the first block not read yet
    now: float  # the timestamp of the latest block read


class FeedbackReader(Protocol):
    reviewers: list[str]  # the trusted reviewers, each once

    def feedback(self, agent_id: int, from_block: int) -> FeedbackPage:
        """The agent's feedback from the trusted reviewers in blocks from_block..latest;
        blocking. Raises Unavailable when the chain does not answer."""
        ...

    def summary(self, agent_id: int) -> tuple[int, float]:
        """getSummary over the trusted reviewers for the reader's tag1: (count, average
        value 0..100), all time, no decay; blocking."""
        ...


def observation(record: FeedbackRecord) -> Observation | None:
    """The observation a feedback entry makes (None for tags the score does not use)."""
    kind = KINDS.get(record.tag1)
    if kind is None:
        return None
    return Observation(kind, record.value / 100, record.at)


def live(
    records: Iterable[FeedbackRecord], revoked: Iterable[tuple[str, int]]
) -> list[FeedbackRecord]:
    """The records not revoked."""
    gone = {(r.lower(), i) for r, i in revoked}
    return [r for r in records if (r.reviewer.lower(), r.index) not in gone]


def explain(page: FeedbackPage, params: ScoreParams) -> dict[str, object]:
    """The score of a page read from the start, with its parts and each entry's weight
    (what `dispatch chain reputation` shows)."""
    records = live(page.records, page.revoked)
    entries: list[dict[str, object]] = []
    observations = []
    for r in records:
        o = observation(r)
        if o is not None:
            observations.append(o)
        entries.append({
            "client": r.reviewer, "index": r.index, "tag1": r.tag1, "tag2": r.tag2,
            "value": r.value, "block": r.block, "time": r.at,
            "age_days": round(max(0.0, page.now - r.at) / 86400, 3),
            "weight": round(decay(page.now - r.at, params.half_life_days), 4)
            if o is not None else 0.0,
        })  # fmt: skip
    s = combine(evidence(observations, page.now, params.half_life_days), params)
    return {**describe(s, params), "feedback": entries}


def describe(s: Score, params: ScoreParams) -> dict[str, object]:
    e = s.evidence
    return {
        "score": round(s.score, 4),
        "success": {
            "rate": round(s.success, 4),
            "decayed_weight": round(e.success_weight, 4),
            "decayed_successes": round(e.success_sum, 4),
        },
        "spot_checks": {
            "agreement": round(s.agreement, 4),
            "decayed_agreed": round(e.agreed, 4),
            "decayed_disagreed": round(e.disagreed, 4),
        },
        "params": {
            "prior": params.prior,
            "prior_weight": params.prior_weight,
            "half_life_days": params.half_life_days,
            "spot_check_penalty": params.spot_check_penalty,
        },
    }


@dataclass
class _Agent:
    next_block: int
    records: dict[tuple[str, int], FeedbackRecord] = field(default_factory=dict)
    chain: Evidence = field(default_factory=Evidence)  # the records', at the last refresh
    nudges: Evidence = field(default_factory=Evidence)  # outcomes seen here since then
    score: float = 0.0
    read_at: float = float("-inf")


class Erc8004Reputation:
    def __init__(
        self,
        reader: FeedbackReader,
        agent_of: Callable[[str], str],
        *,
        params: ScoreParams | None = None,
        from_block: int = 0,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.agent_of = agent_of
        self.params = params or ScoreParams()
        self.from_block = from_block
        self.ttl = ttl_seconds
        self.clock = clock
        self._cache: dict[int, _Agent] = {}
        self._refreshing: dict[int, asyncio.Task[None]] = {}

    @property
    def prior(self) -> float:
        return self.params.prior

    def _agent(self, worker_id: str) -> int | None:
        agent = self.agent_of(worker_id)
        try:
            return int(agent) if agent else None
        except ValueError:
            return None

    def score(self, worker_id: str) -> float:
        agent = self._agent(worker_id)
        c = self._cache.get(agent) if agent is not None else None
        return self.params.prior if c is None else c.score

    def components(self, worker_id: str) -> Score:
        """The score with its parts (success rate, agreement, decayed sums)."""
        agent = self._agent(worker_id)
        c = self._cache.get(agent) if agent is not None else None
        e = Evidence() if c is None else c.chain.plus(c.nudges)
        return combine(e, self.params)

    async def warm(self, worker_id: str) -> None:
        agent = self._agent(worker_id)
        if agent is None or agent in self._refreshing:
            return
        c = self._cache.get(agent)
        if c is not None and self.clock() - c.read_at < self.ttl:
            return
        self._refreshing[agent] = asyncio.get_running_loop().create_task(self.refresh(agent))

    async def refresh(self, agent_id: int) -> None:
        """Reads the agent's new feedback from the chain (in a thread) into the cache."""
        c = self._cache.get(agent_id) or _Agent(self.from_block)
        try:
            page = await asyncio.to_thread(self.reader.feedback, agent_id, c.next_block)
        except Exception as e:  # keep the last score
            log.warning("reputation of agent %d not refreshed: %s", agent_id, e)
        else:
            records = dict(c.records)
            for r in page.records:
                if r.tag1 in KINDS:
                    records[(r.reviewer.lower(), r.index)] = r
            for reviewer, index in page.revoked:
                records.pop((reviewer.lower(), index), None)
            oldest = page.now - self.params.horizon_seconds
            records = {k: r for k, r in records.items() if r.at >= oldest}
            observations = [o for r in records.values() if (o := observation(r)) is not None]
            chain = evidence(observations, page.now, self.params.half_life_days)
            fresh = _Agent(page.next_block, records, chain, Evidence(), 0.0, self.clock())
            fresh.score = combine(chain, self.params).score
            self._cache[agent_id] = fresh
        finally:
            self._refreshing.pop(agent_id, None)

    def _nudge(self, worker_id: str, e: Evidence) -> None:
        agent = self._agent(worker_id)
        if agent is None:
            return
        c = self._cache.setdefault(agent, _Agent(self.from_block))
        c.nudges = c.nudges.plus(e)
        c.score = combine(c.chain.plus(c.nudges), self.params).score

    def record(self, worker_id: str, success: bool) -> None:
        self._nudge(worker_id, Evidence(0.0, 1.0, 1.0 if success else 0.0))

    async def record_spot_check(self, worker_id: str, agreed: bool) -> None:
        # the durable record is the spotCheck feedback the coordinator posts on chain
        self._nudge(worker_id, Evidence(0.0, 0.0, 0.0, float(agreed), float(not agreed)))

    async def stop(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        self._refreshing.clear()
