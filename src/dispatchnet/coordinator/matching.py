"""Which connected workers may take a job, and a weighted choice among them.

Eligibility: not draining, a free slot, LLM jobs only on desktops serving the model, TASK
jobs only on workers that list the task, PRIVATE jobs only on workers paired with the owner.
Preference (the seed's): desktops for FAST, seekers for CHEAP. The choice is weighted random,
so reputation steers the share of work without starving newcomers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from dispatchnet.coordinator.models import JobSpec, JobType, Policy, Privacy, WorkerKind

PREFERRED = 1.0
OTHER = 0.35
REPUTATION_FLOOR = 0.1


class Candidate(Protocol):
    worker_id: str
    kind: WorkerKind
    tasks: frozenset[str]
    llm_models: frozenset[str]
    max_concurrency: int
    draining: bool

    @property
    def load(self) -> int: ...


def eligible(spec: JobSpec, w: Candidate, paired: set[str] | None) -> bool:
    if w.draining or w.load >= w.max_concurrency:
        return False
    if spec.privacy is Privacy.PRIVATE and (paired is None or w.worker_id not in paired):
        return False
    return can_ever_run(spec, w)


def can_ever_run(spec: JobSpec, w: Candidate) -> bool:
    """Eligible but for load, draining and pairing (for quotes)."""
    if spec.needs_llm:
        if w.kind is not WorkerKind.DESKTOP or not w.llm_models:
            return False
        if spec.llm_model and spec.llm_model not in w.llm_models:
            return False
        if spec.job_type is JobType.LLM:
            return True
    return spec.task_name in w.tasks


def weight(spec: JobSpec, w: Candidate, reputation: float) -> float:
    fast = spec.policy is Policy.FAST
    preferred = (fast and w.kind is WorkerKind.DESKTOP) or (
        not fast and w.kind is WorkerKind.SEEKER
    )
    free = 1.0 - w.load / max(1, w.max_concurrency)
    return (PREFERRED if preferred else OTHER) * (REPUTATION_FLOOR + reputation) * (0.5 + free)


def choose(
    spec: JobSpec,
    candidates: Sequence[Candidate],
    reputation: dict[str, float],
    rng: random.Random,
) -> Candidate:
    weights = [weight(spec, w, reputation.get(w.worker_id, 0.5)) for w in candidates]
    return rng.choices(list(candidates), weights=weights, k=1)[0]
