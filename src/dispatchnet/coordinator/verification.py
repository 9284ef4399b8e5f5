"""Verification of deterministic jobs by independent runs (README "Verification").

A job runs on several workers when its client asks (JobSpec.verify = 2 or 3: REDUNDANT)
or when the coordinator picks it for a spot check ([verification] spot_check_rate of the
PUBLIC deterministic jobs run once: SPOT_CHECK, two runs at the coordinator's expense).
The runs happen one after another on the job's own row: a completed run is stored
(Store.record_run) and the job goes back to the queue for the next, offered only to a
worker independent of every earlier one (another key, and another agent id when either
has one). When all runs are in, their output hashes are compared (tally): a majority's
output is the job's result; two runs that disagree get a third, tiebreaker run (at the
coordinator's expense); no majority after three fails the job (verification_failed),
which releases or refunds its payment.

Pure rules here; JobService (coordinator/jobs.py) runs them against the store.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from dispatchnet.coordinator.models import (
    AGREED,
    DISAGREED,
    VERIFY_REDUNDANT,
    VERIFY_SPOT_CHECK,
    Job,
    JobSpec,
    Privacy,
    Run,
)

MAX_RUNS = 3  # JobSpec.verify's largest value, and the most runs a tiebreak takes
# ERC-8004 feedback for a compared run (README "Verification"): tag1 SPOT_CHECK_TAG,
# tag2 the job type; value AGREE_VALUE when the run agreed with the majority, else 0.
SPOT_CHECK_TAG = "spotCheck"
AGREE_VALUE = 100
DISAGREE_VALUE = 0
# failure codes
VERIFICATION_FAILED = "verification_failed"
NOT_ENOUGH_WORKERS = "not_enough_independent_workers"


def plan(spec: JobSpec, spot_check_rate: float, rng: random.Random) -> tuple[str, int]:
    """(mode, runs) for a job committed with spec: ("", 0) for one unchecked run."""
    if spec.verify > 1:
        return VERIFY_REDUNDANT, spec.verify
    if (
        spot_check_rate > 0
        and spec.deterministic
        and spec.privacy is Privacy.PUBLIC
        and rng.random() < spot_check_rate
    ):
        return VERIFY_SPOT_CHECK, 2
    return "", 0


def identities(worker_id: str, agent_id: str, owner: str = "") -> tuple[str, ...]:
    """What makes a worker the same as another for independence: its key, its agent, and
    the agent's owner (one account's agents count once)."""
    return (
        (f"key:{worker_id}",)
        + ((f"agent:{agent_id}",) if agent_id else ())
        + ((f"owner:{owner.lower()}",) if owner else ())
    )


def independent(job: Job, worker_id: str, agent_id: str, owner: str = "") -> bool:
    """Whether the worker may run the job's next run: no earlier run of it had the same
    key, agent id or agent owner. Always true for a job without verification."""
    if not job.verify_seen:
        return True
    return not set(identities(worker_id, agent_id, owner)) & set(job.verify_seen)


@dataclass(frozen=True)
class Tally:
    """The comparison of a job's runs."""

    majority: bytes | None  # the output hash more than half the runs agree on
    verdicts: dict[int, str]  # attempt -> AGREED / DISAGREED (empty without a majority)
    agreeing: list[Run]  # in attempt order
    dissenting: list[Run]


def tally(runs: list[Run]) -> Tally:
    counts = Counter(r.output_sha256 for r in runs)
    best, n = counts.most_common(1)[0]
    if 2 * n <= len(runs):
        return Tally(None, {}, [], [])
    agreeing = [r for r in runs if r.output_sha256 == best]
    dissenting = [r for r in runs if r.output_sha256 != best]
    verdicts = {r.attempt: AGREED if r.output_sha256 == best else DISAGREED for r in runs}
    return Tally(best, verdicts, agreeing, dissenting)


def next_runs(job: Job, runs: list[Run]) -> int:
    """How many runs the job needs now that `runs` are in: its planned number, or one
    more (a tiebreaker) when they are all in, two of them, and they disagree."""
    target = job.verify_runs
    if len(runs) >= target and target < MAX_RUNS and tally(runs).majority is None:
        return target + 1
    return target
