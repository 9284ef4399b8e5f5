"""The reputation formula: one pure function from a worker's evidence to its score.

Evidence is a list of observations, each of one kind:
- SUCCESS: a job's outcome (ERC-8004 tag1 "successRate"), value 1 completed, 0 failed;
- SPOT_CHECK: a redundant run's verdict (tag1 "spotCheck"), value 1 when the worker agreed
  with the majority, 0 when it was in the minority.

Each observation weighs d = 0.5 ** (age / half_life): one half_life_days old counts half.
With the decayed sums

    n = sum d             over successes       s = sum d * value    over successes
    a = sum d * value     over spot checks     x = sum d * (1 - value) over spot checks

the score is the product of two estimates (in [0, 1]):

    success   = (s + prior_weight * prior) / (n + prior_weight)
    agreement = (a + 1) / (a + spot_check_penalty * x + 1)
    score     = success * agreement

`success` is the Bayesian success rate: a new worker (or one without an agent id) scores
`prior`, below the middle, and earns more only through outcomes its trusted reviewers
report. `agreement` estimates how often its completed answers are right; it starts at 1
(one virtual agreeing check) and a disagreement counts like `spot_check_penalty` checks,
so one caught lie weighs as much as many agreements: a worker that always lies drops near
0 at its first disagreement, whatever its success count, and one caught in more than about
1 check in 10 (with the defaults) ranks below a new worker. The product is the chance that a
job sent to the worker comes back right.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

DAY = 86400.0
# an observation older than this many half-lives weighs < 0.01% and may be forgotten
HORIZON_HALF_LIVES = 14


class Kind(enum.Enum):
    SUCCESS = "successRate"
    SPOT_CHECK = "spotCheck"


@dataclass(frozen=True)
class ScoreParams:
    """The profile's [reputation] settings the formula uses."""

    prior: float = 0.3
    prior_weight: float = 3.0
    half_life_days: float = 30.0
    spot_check_penalty: float = 20.0

    @property
    def horizon_seconds(self) -> float:
        """How far back an observation still matters (HORIZON_HALF_LIVES half-lives)."""
        return HORIZON_HALF_LIVES * self.half_life_days * DAY


@dataclass(frozen=True)
class Observation:
    kind: Kind
    value: float  # 0..1 (clamped)
    at: float  # unix seconds
    count: float = 1.0  # identical observations at the same time


@dataclass(frozen=True)
class Evidence:
    """Decayed sums of a worker's observations, as of time `at`."""

    at: float = 0.0
    success_weight: float = 0.0  # n
    success_sum: float = 0.0  # s
    agreed: float = 0.0  # a
    disagreed: float = 0.0  # x

    def decayed_to(self, now: float, half_life_days: float) -> Evidence:
        """The same evidence seen at `now` (weights shrink with the time elapsed)."""
        f = decay(now - self.at, half_life_days)
        return Evidence(
            max(now, self.at),
            self.success_weight * f,
            self.success_sum * f,
            self.agreed * f,
            self.disagreed * f,
        )

    def plus(self, other: Evidence) -> Evidence:
        """Both sums (taken at the same time; the later `at` is kept)."""
        return Evidence(
            max(self.at, other.at),
            self.success_weight + other.success_weight,
            self.success_sum + other.success_sum,
            self.agreed + other.agreed,
            self.disagreed + other.disagreed,
        )


@dataclass(frozen=True)
class Score:
    evidence: Evidence
    success: float
    agreement: float
    score: float


def decay(age_seconds: float, half_life_days: float) -> float:
    """0.5 ** (age / half-life); an age below 0 (a clock ahead of ours) counts as 0."""
    return math.pow(0.5, max(0.0, age_seconds) / (half_life_days * DAY))


def evidence(observations: Iterable[Observation], now: float, half_life_days: float) -> Evidence:
    """The decayed sums of `observations` as of `now`."""
    n = s = a = x = 0.0
    for o in observations:
        d = decay(now - o.at, half_life_days) * o.count
        v = min(1.0, max(0.0, o.value))
        if o.kind is Kind.SUCCESS:
            n += d
            s += d * v
        else:
            a += d * v
            x += d * (1.0 - v)
    return Evidence(now, n, s, a, x)


def combine(e: Evidence, p: ScoreParams) -> Score:
    """The score of evidence `e` (see the module docstring)."""
    success = (e.success_sum + p.prior_weight * p.prior) / (e.success_weight + p.prior_weight)
    agreement = (e.agreed + 1.0) / (e.agreed + p.spot_check_penalty * e.disagreed + 1.0)
    success = min(1.0, max(0.0, success))
    agreement = min(1.0, max(0.0, agreement))
    return Score(e, success, agreement, success * agreement)


def score(observations: Iterable[Observation], now: float, p: ScoreParams) -> Score:
    """combine(evidence(observations, now, p.half_life_days), p)."""
    return combine(evidence(observations, now, p.half_life_days), p)
