"""The reputation formula (reputation/score.py) and the two sources that use it without a
chain: the local one over the coordinator's own records (a real SQLite store), and the
erc8004 one's cache fed by a reader that answers pages of feedback (the on-chain reader is
tested on anvil in test_reputation_chain.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store import make_job, offer, queued

from dispatchnet.coordinator.models import Event, EventKind, JobState
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import load_profile
from dispatchnet.reputation.erc8004 import Erc8004Reputation, FeedbackPage, FeedbackRecord
from dispatchnet.reputation.local import LocalReputation
from dispatchnet.reputation.score import (
    DAY,
    Evidence,
    Kind,
    Observation,
    ScoreParams,
    combine,
    decay,
    evidence,
    score,
)
from dispatchnet.store.threaded import ThreadedStore

P = ScoreParams()  # prior 0.3 weighted 3, half-life 30 days, spot-check penalty 20
NOW = 1_000 * DAY


def ok(n: int, age_days: float = 0.0, value: float = 1.0) -> Observation:
    return Observation(Kind.SUCCESS, value, NOW - age_days * DAY, n)


def check(agreed: bool, n: int = 1, age_days: float = 0.0) -> Observation:
    return Observation(Kind.SPOT_CHECK, float(agreed), NOW - age_days * DAY, n)


# --- the formula -----------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    r = load_profile("local").reputation
    assert r.score_params() == P
    assert (P.prior, P.prior_weight, P.half_life_days, P.spot_check_penalty) == (0.3, 3, 30, 20)


def test_a_new_worker_scores_the_prior_below_the_middle() -> None:
    s = score([], NOW, P)
    assert (s.success, s.agreement, s.score) == (0.3, 1.0, 0.3)
    assert s.score < 0.5


def test_success_rate_is_a_bayesian_average_with_the_prior() -> None:
    s = score([ok(7)], NOW, P)
    assert s.success == pytest.approx((7 + 3 * 0.3) / (7 + 3))
    assert s.agreement == 1.0 and s.score == s.success
    failed = score([ok(7), ok(3, value=0.0)], NOW, P)
    assert failed.success == pytest.approx((7 + 0.9) / 13)


def test_feedback_weighs_half_per_half_life() -> None:
    assert decay(0, 30) == 1.0 and decay(30 * DAY, 30) == pytest.approx(0.5)
    assert decay(90 * DAY, 30) == pytest.approx(0.125)
    assert decay(-DAY, 30) == 1.0  # a clock ahead of ours: no bonus
    e = evidence([ok(4, age_days=30), ok(2, age_days=60, value=0.0)], NOW, 30)
    assert e.success_weight == pytest.approx(4 * 0.5 + 2 * 0.25)
    assert e.success_sum == pytest.approx(2.0)


def test_an_old_record_fades_back_towards_the_prior() -> None:
    fresh = score([ok(50)], NOW, P).score
    year_old = score([ok(50, age_days=365)], NOW, P).score
    assert fresh > 0.95 and P.prior < year_old < 0.5
    # recent failures count more than old successes
    s = score([ok(20, age_days=120), ok(5, value=0.0)], NOW, P)
    assert s.success < 0.5


def test_a_disagreement_weighs_much_more_than_a_success() -> None:
    honest = score([ok(100), check(True, 5)], NOW, P)
    liar = score([ok(100), check(False)], NOW, P)  # completes everything, caught once
    new = score([], NOW, P)
    assert honest.score > 0.95
    assert liar.success == honest.success  # it "completed" as many jobs
    assert liar.agreement == pytest.approx(1 / 21)
    assert liar.score < new.score / 5  # far below an honest newcomer
    # more successes do not wash a disagreement out: agreement ignores job volume
    assert score([ok(10_000), check(False)], NOW, P).score < new.score
    # an honest worker's rare slip costs it, but it stays above a newcomer
    slip = score([ok(100), check(True, 40), check(False)], NOW, P)
    assert new.score < slip.score < honest.score


def test_a_worker_caught_in_more_than_one_check_in_ten_ranks_below_a_new_one() -> None:
    def after(agreed: int, disagreed: int) -> float:
        return score([ok(1000), check(True, agreed), check(False, disagreed)], NOW, P).score

    assert after(850, 150) < P.prior < after(920, 80)


def test_a_disagreement_fades_with_its_age() -> None:
    recent = score([ok(30), check(True, 10), check(False)], NOW, P).score
    old = score([ok(30), check(True, 10), check(False, age_days=120)], NOW, P).score
    assert recent < old


def test_evidence_decays_and_adds_like_the_observations_it_sums() -> None:
    later = NOW + 30 * DAY
    one_more = Observation(Kind.SUCCESS, 1.0, later)
    e = evidence([ok(4), check(False)], NOW, 30)
    added = e.decayed_to(later, 30).plus(evidence([one_more], later, 30))
    assert added == pytest.approx(evidence([ok(4), check(False), one_more], later, 30))
    assert combine(Evidence(), P).score == P.prior


# --- the local source ------------------------------------------------------------------------


async def test_local_source_scores_its_own_records_with_decay_and_spot_checks(
    tmp_path: Path,
) -> None:
    store = ThreadedStore(tmp_path / "db.sqlite")
    now = [NOW]
    rep = LocalReputation(store, P, clock=lambda: now[0])
    try:
        assert rep.score("w1") == P.prior  # never seen
        await store.record_worker_seen("w1", 1, NOW)
        # 10 jobs completed 60 days ago, recorded durably by the jobs' transitions
        for i in range(10):
            job, _ = await store.create_job(make_job(f"j{i}", key=f"k{i}"), queued(f"j{i}"))
            await offer(store, job)
            done = Event(job.job_id, EventKind.STATE, JobState.COMPLETED, NOW - 60 * DAY)
            await store.transition(
                job.job_id, (JobState.OFFERED,), 1, {"state": JobState.COMPLETED}, done,
                outcome=("w1", True),
            )  # fmt: skip
        await rep.warm("w1")
        aged = rep.score("w1")
        assert aged == pytest.approx((10 * 0.25 + 0.9) / (10 * 0.25 + 3), rel=0.01)

        rep.record("w1", True)  # a completion here: counted in memory at once
        assert rep.score("w1") > aged
        await rep.record_spot_check("w1", False)  # in the minority: stored and counted
        caught = rep.components("w1")
        assert caught.agreement == pytest.approx(1 / 21) and caught.score < P.prior / 5
        assert [d.disagreed for d in await store.worker_days("w1", 0)] == [0, 1]

        # a restarted coordinator reads the same record back (the job counted by record()
        # is not in the store: its transition would have counted it)
        again = LocalReputation(store, P, clock=lambda: now[0])
        await again.warm("w1")
        assert again.components("w1").agreement == pytest.approx(1 / 21)
        # ... and time heals: four half-lives later the disagreement weighs 1/16
        now[0] = NOW + 120 * DAY
        assert again.components("w1").agreement == pytest.approx(1 / (1 + 20 / 16), rel=0.05)
    finally:
        await store.close()


# --- the erc8004 source's cache --------------------------------------------------------------


class PagedReader:
    """Answers the pages a chain would: the records at or after from_block."""

    reviewers = ["0xAa"]

    def __init__(self) -> None:
        self.records: list[FeedbackRecord] = []
        self.revoked: list[tuple[str, int]] = []
        self.block = 1
        self.now = NOW
        self.calls: list[int] = []
        self.down = False

    def post(self, tag1: str, value: float, reviewer: str = "0xAa") -> None:
        index = 1 + sum(r.reviewer == reviewer for r in self.records)
        self.records.append(
            FeedbackRecord(reviewer, index, tag1, "task", value, self.now, self.block)
        )
        self.block += 1

    def feedback(self, agent_id: int, from_block: int) -> FeedbackPage:
        self.calls.append(from_block)
        if self.down:
            raise Unavailable("down")
        new = [r for r in self.records if r.block >= from_block]
        return FeedbackPage(new, list(self.revoked), self.block, self.now)

    def summary(self, agent_id: int) -> tuple[int, float]:
        raise AssertionError("not used by the score")


async def test_erc8004_scores_come_from_the_cache_and_refresh_incrementally() -> None:
    reader = PagedReader()
    agents = {"w1": "5", "w2": ""}
    rep = Erc8004Reputation(reader, lambda w: agents.get(w, ""), params=P, ttl_seconds=60)
    assert rep.score("w1") == rep.score("w2") == P.prior and reader.calls == []
    for _ in range(4):
        reader.post("successRate", 100)
    reader.post("starred", 0)  # other tags do not count
    await rep.warm("w1")
    await rep.warm("w1")  # one refresh in flight at a time
    await rep._refreshing[5]
    assert reader.calls == [0] and rep.score("w1") == pytest.approx((4 + 0.9) / 7)
    await rep.warm("w1")  # fresh: no chain read
    assert reader.calls == [0]

    rep.record("w1", False)  # nudged locally until the next refresh
    assert rep.score("w1") == pytest.approx((4 + 0.9) / 8)
    await rep.record_spot_check("w1", False)
    assert rep.components("w1").agreement == pytest.approx(1 / 21)

    reader.post("successRate", 0)
    reader.post("spotCheck", 0)
    reader.now += 30 * DAY  # a month later
    await rep.refresh(5)
    assert reader.calls == [0, 6]  # only the blocks not read yet
    s = rep.components("w1")
    assert s.evidence.success_weight == pytest.approx(5 * 0.5)
    assert s.evidence.success_sum == pytest.approx(4 * 0.5)
    assert s.evidence.disagreed == pytest.approx(0.5)

    reader.revoked = [("0xaa", 7)]  # the reviewer revoked its spotCheck entry (#7)
    await rep.refresh(5)
    assert rep.components("w1").agreement == 1.0

    reader.down = True
    before = rep.score("w1")
    await rep.refresh(5)  # a failed refresh keeps the last score
    assert rep.score("w1") == before
    rep.record("w2", True)  # no agent id: the prior, always
    assert rep.score("w2") == P.prior
    await rep.stop()
