"""Which connected workers may take a job, and a weighted choice among them.

Eligibility: not draining, a free slot, LLM jobs only on desktops serving the model, TASK
jobs only on workers that list the task, PRIVATE jobs only on workers paired with the owner
(and, sealed, only on those it has an envelope for).
Preference (the seed's): desktops for FAST, seekers for CHEAP. The choice is weighted random,
so reputation steers the share of work without starving newcomers.

Among many candidates, choose_among draws the same weighted choice without weighing every
one: it draws candidates uniformly and keeps one with probability weight / max_weight
(rejection sampling), so each eligible worker is chosen with probability proportional to
its weight, as with choose, after a bounded number of eligibility checks (see DRAWS).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol, TypeVar

from dispatchnet.coordinator.models import JobSpec, JobType, Policy, Privacy, WorkerKind

PREFERRED = 1.0
OTHER = 0.35
REPUTATION_FLOOR = 0.1
# choose_among weighs every candidate of a pool this small (as choose does) ...
# (8: weighing a candidate costs about what a draw does, and a draw is kept with
# probability >= ~0.2, so beyond a handful sampling is cheaper: with 50 free seekers,
# weighing them all took ~8% of the coordinator's CPU per job, ~10% of its event loop)
SCAN_MAX = 8
# ... and otherwise draws at most this many before weighing the whole pool; a draw keeps
# a candidate with probability >= ~0.2 for default reputations, so the fallback is
# practically reserved for pools where few candidates are usable (avoid lists, pairing).
DRAWS = 128


class Candidate(Protocol):
    worker_id: str
    kind: WorkerKind
    tasks: frozenset[str]
    llm_models: frozenset[str]
    max_concurrency: int
    draining: bool

    @property
    def load(self) -> int: ...


C = TypeVar("C", bound=Candidate)


def eligible(spec: JobSpec, w: Candidate, paired: set[str] | None) -> bool:
    if w.draining or w.load >= w.max_concurrency:
        return False
    if spec.privacy is Privacy.PRIVATE and (paired is None or w.worker_id not in paired):
        return False
    if spec.recipients and w.worker_id not in spec.recipients:
        return False  # sealed: only a worker with an envelope can run it
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


def max_weight(spec: JobSpec, kinds: Collection[WorkerKind]) -> float:
    """An upper bound of weight() over workers of these kinds (reputations in [0, 1])."""
    preferred = WorkerKind.DESKTOP if spec.policy is Policy.FAST else WorkerKind.SEEKER
    return (PREFERRED if preferred in kinds else OTHER) * (REPUTATION_FLOOR + 1.0) * 1.5


def choose(
    spec: JobSpec,
    candidates: Sequence[C],
    reputation: dict[str, float],
    rng: random.Random,
) -> C:
    weights = [weight(spec, w, reputation.get(w.worker_id, 0.5)) for w in candidates]
    return rng.choices(list(candidates), weights=weights, k=1)[0]


def choose_among(
    spec: JobSpec,
    members: Iterable[C],
    size: int,
    draw: Callable[[], C],
    kinds: Collection[WorkerKind],
    usable: Callable[[C], bool],
    fallback: Callable[[C], bool],
    reputation: Callable[[str], float],
    rng: random.Random,
) -> C | None:
    """A weighted choice (as choose) among the usable ones of `members` (`size` of them);
    when none is usable, among those passing `fallback` instead; None if neither has any.

    Up to SCAN_MAX members are all weighed, in the order given (choose's very draw for a
    given rng). A larger pool is sampled through `draw` (a uniform pick among members) at
    most DRAWS times, each draw kept with probability weight / max_weight(spec, kinds);
    only if none is kept are all members weighed. Either way each usable member is chosen
    with probability proportional to its weight.
    """
    if size > SCAN_MAX:
        cap = max_weight(spec, kinds)
        for _ in range(DRAWS):
            w = draw()
            if usable(w) and rng.random() * cap < weight(spec, w, reputation(w.worker_id)):
                return w
    pool = list(members)
    cands = [w for w in pool if usable(w)] or [w for w in pool if fallback(w)]
    if not cands:
        return None
    return choose(spec, cands, {w.worker_id: reputation(w.worker_id) for w in cands}, rng)
