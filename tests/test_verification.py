"""Verification (README "Verification"): redundant runs (JobSpec.verify) and spot checks.

Real coordinators on port 0 with real in-process workers; a "liar" is a worker whose
executors return wrong output (`--lie-rate` of `dispatch worker` and `dispatch seekers`),
with properly signed receipts.
The on-chain side (registered agents, x402, spotCheck feedback, shares) is in
test_verification_chain.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Cluster, Proc, make_profile, wait_until
from test_cli import cli_env, failed, run

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator import verification as verify
from dispatchnet.coordinator.models import (
    AGREED,
    DISAGREED,
    VERIFY_REDUNDANT,
    VERIFY_SPOT_CHECK,
    Job,
    JobSpec,
    JobState,
    JobType,
    Policy,
    Privacy,
    Receipt,
    Result,
    Run,
    Split,
)
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import (
    append_verification,
    sign_body,
    verify_receipt,
    worker_signed_part,
)
from dispatchnet.server import start_coordinator
from dispatchnet.worker.executors import Executor, default_executors
from dispatchnet.worker.lying import LyingExecutor, lie, lying
from dispatchnet.worker.tasks import run_task

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED


def liars() -> list[Executor]:
    """Executors that always return wrong output (what `--lie-rate 1` does)."""
    return lying(default_executors(), 1.0)


def echo(text: str, runs: int = 0) -> common_pb2.JobSpec:
    spec = task_spec("echo", f'"{text}"'.encode())
    spec.verify = runs
    return spec


async def record_of(cluster: Cluster, c: object, job_id: str) -> receipt_pb2.ReceiptBody:
    got = await c.receipt(job_id)  # type: ignore[attr-defined]
    v = verify_receipt(
        got.receipt.body,
        got.receipt.worker_signature,
        got.receipt.coordinator_signature,
        got.receipt.receipt_sha256,
    )
    assert v.valid, v.problems
    assert v.body is not None
    return v.body


# --- the rules, without servers ------------------------------------------------------------


def _run(attempt: int, output: bytes, worker: str = "") -> Run:
    receipt = Receipt(b"body", b"w", b"c", b"h" * 32)
    return Run("j", attempt, worker or f"w{attempt}", "", Result(output, "text/plain"), receipt, 0)


def _job(**kw: object) -> Job:
    spec = JobSpec(JobType.TASK, Policy.CHEAP, Privacy.PUBLIC, "echo", "", b"", b"", verify=2)
    base = Job("j", "c", JobState.RUNNING, spec, 1, "USD", "q", "k", 1, 3, 0, 0, 0)
    return Job(**{**base.__dict__, **kw})


def test_the_majority_wins_and_two_disagreeing_runs_get_a_tiebreak() -> None:
    t = verify.tally([_run(1, b"a"), _run(2, b"b"), _run(3, b"a")])
    assert t.verdicts == {1: AGREED, 2: DISAGREED, 3: AGREED}
    assert [r.attempt for r in t.agreeing] == [1, 3] and [r.attempt for r in t.dissenting] == [2]
    assert verify.tally([_run(1, b"a"), _run(2, b"b"), _run(3, b"c")]).majority is None
    job = _job(verify_runs=2)
    assert verify.next_runs(job, [_run(1, b"a"), _run(2, b"b")]) == 3  # tiebreak
    assert verify.next_runs(job, [_run(1, b"a"), _run(2, b"a")]) == 2
    assert verify.next_runs(_job(verify_runs=3), [_run(i, bytes([i])) for i in (1, 2, 3)]) == 3


def test_independence_is_another_key_and_another_agent() -> None:
    job = _job(verify_seen=verify.identities("k1", "7"))
    assert not verify.independent(job, "k1", "")  # the same key, whatever it claims
    assert not verify.independent(job, "k2", "7")  # another key of the same agent
    assert verify.independent(job, "k2", "8") and verify.independent(job, "k2", "")
    assert verify.independent(_job(), "k1", "7")  # nothing seen: anyone
    # agents of one owner count once
    owned = _job(verify_seen=verify.identities("k1", "7", "0xAbC"))
    assert not verify.independent(owned, "k2", "8", "0xabc")
    assert verify.independent(owned, "k2", "8", "0xdef")


def test_spot_checks_pick_public_deterministic_jobs_at_the_rate() -> None:
    spec = _job().spec
    single = JobSpec(**{**spec.__dict__, "verify": 0})
    rng = random.Random(1)
    picked = sum(verify.plan(single, 0.25, rng) == (VERIFY_SPOT_CHECK, 2) for _ in range(4000))
    assert 900 < picked < 1100
    assert verify.plan(single, 0.0, rng) == ("", 0)
    private = JobSpec(**{**single.__dict__, "privacy": Privacy.PRIVATE})
    llm = JobSpec(**{**single.__dict__, "use_llm": True})
    assert verify.plan(private, 1.0, rng) == verify.plan(llm, 1.0, rng) == ("", 0)
    assert verify.plan(spec, 0.0, rng) == (VERIFY_REDUNDANT, 2)


def test_shares_among_agreeing_workers() -> None:
    split = Split.of(1001, 1000)  # fee 100, share 901
    assert split.among(VERIFY_REDUNDANT, 1) == [(100, 901)]
    assert split.among(VERIFY_REDUNDANT, 2) == [(100, 451), (0, 450)]
    # a spot check is the coordinator's expense: the checker gets the fee
    assert split.among(VERIFY_SPOT_CHECK, 2) == [(0, 901), (0, 100)]


def test_the_worker_signs_the_body_before_the_verification_record() -> None:
    worker, coordinator = KeyPair.generate(), KeyPair.generate()
    body = receipt_pb2.ReceiptBody(
        version=1,
        job_id="job_1",
        input_sha256=b"i" * 32,
        output_sha256=b"o" * 32,
        worker_public_key=worker.public_key,
        coordinator_public_key=coordinator.public_key,
    ).SerializeToString(deterministic=True)
    signature = sign_body(worker, body)
    record = receipt_pb2.Verification(
        mode=receipt_pb2.VERIFICATION_MODE_REDUNDANT,
        runs=3,
        output_sha256=b"o" * 32,
        agreeing_worker_keys=[worker.public_key, b"k" * 32],
        dissenting_worker_keys=[b"x" * 32],
    )
    full = append_verification(body, record)
    assert worker_signed_part(full) == body and worker_signed_part(body) == body
    assert verify_receipt(full, signature, sign_body(coordinator, full)).valid
    # a record the coordinator did not sign, or one that is not a majority, is refused
    assert not verify_receipt(full, signature, sign_body(coordinator, body)).valid
    minority = receipt_pb2.Verification(runs=3, output_sha256=b"o" * 32)
    minority.agreeing_worker_keys.append(worker.public_key)
    bad = append_verification(body, minority)
    problems = verify_receipt(bad, signature, sign_body(coordinator, bad)).problems
    assert any("majority" in p for p in problems)

    # on a shared database another coordinator may conclude: its key is in the record and
    # it signs the whole body; pinning needs both coordinators' keys
    other = KeyPair.generate()
    by_other = receipt_pb2.Verification()
    by_other.CopyFrom(record)
    by_other.concluded_by = other.public_key
    elsewhere = append_verification(body, by_other)
    assert verify_receipt(elsewhere, signature, sign_body(other, elsewhere)).valid
    assert not verify_receipt(elsewhere, signature, sign_body(coordinator, elsewhere)).valid
    pinned = [coordinator.public_key, other.public_key]
    assert verify_receipt(elsewhere, signature, sign_body(other, elsewhere), b"", pinned).valid
    assert not verify_receipt(
        elsewhere, signature, sign_body(other, elsewhere), b"", coordinator.public_key
    ).valid


# --- a real coordinator and workers -------------------------------------------------------


async def test_agreeing_runs_complete_with_a_verified_receipt_at_n_times_the_price(
    cluster: Cluster,
) -> None:
    workers = [await cluster.worker() for _ in range(3)]
    c = cluster.client()
    single = await c.quote(echo("hi"))
    triple = await c.quote(echo("hi", 3))
    assert triple.price.amount_micros == 3 * single.price.amount_micros
    job = await c.submit(echo("hi", 3))
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED, done.failure
    assert done.result.output == b'"hi"'
    body = await record_of(cluster, c, job.job_id)
    v = body.verification
    assert v.mode == receipt_pb2.VERIFICATION_MODE_REDUNDANT and v.runs == 3
    assert set(v.agreeing_worker_keys) == {w.key.public_key for w in workers}
    assert not v.dissenting_worker_keys and v.output_sha256 == body.output_sha256
    runs = cluster.db.job_runs(job.job_id)
    assert [r.verdict for r in runs] == [AGREED] * 3
    assert len({r.worker_id for r in runs}) == 3
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert "run 1 of 3 done" in reasons and reasons[-1] == "completed: 3 of 3 runs agree"
    for w in workers:
        assert cluster.db.worker_stats(w.key.public_hex) == (1, 0)


async def test_a_lying_worker_is_outvoted_and_scored_down(cluster: Cluster) -> None:
    honest = [await cluster.worker() for _ in range(2)]
    liar = await cluster.worker(executors=liars())
    c = cluster.client()
    job = await c.submit(echo("truth", 3))
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED and done.result.output == b'"truth"'
    v = (await record_of(cluster, c, job.job_id)).verification
    assert set(v.agreeing_worker_keys) == {w.key.public_key for w in honest}
    assert list(v.dissenting_worker_keys) == [liar.key.public_key]
    assert cluster.db.worker_stats(liar.key.public_hex) == (0, 1)
    rep = cluster.coord.jobs.reputation
    # in the minority once: far below a new worker (the prior); the honest ones above it
    # (each verdict is stored, then counted in memory, after the job completes)
    await wait_until(
        lambda: (
            rep.score(liar.key.public_hex) < 0.1
            and all(rep.score(w.key.public_hex) > rep.params.prior for w in honest)
        ),
        10,
        "the liar scored down, the honest ones up",
    )


async def test_verify_is_refused_for_llm_private_and_too_many_runs(cluster: Cluster) -> None:
    import grpc

    c = cluster.client()
    private = echo("p", 2)
    private.privacy = common_pb2.PRIVACY_PRIVATE
    llm = common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="hi"), verify=2)
    for spec, words in ((echo("x", 4), "0-3"), (private, "PUBLIC"), (llm, "deterministic")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.quote(spec)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert words in str(e.value.details())


@pytest.fixture
def profile() -> object:
    return make_profile(jobs={"queue_timeout_seconds": 1.5})


async def test_no_majority_fails_the_job_and_says_why(cluster: Cluster) -> None:
    await cluster.worker()
    await cluster.worker(executors=liars())
    c = cluster.client()
    job = await c.submit(echo("tie", 2))
    done = await c.wait(job.job_id)  # the tiebreaker never comes (no third worker)
    assert done.state == FAILED and done.failure.code == verify.VERIFICATION_FAILED
    assert "disagree" in done.failure.message and "not charged" in done.failure.message
    assert len(cluster.db.job_runs(job.job_id)) == 2


async def test_one_owner_is_never_counted_twice(cluster: Cluster) -> None:
    a = await cluster.worker()
    b = await cluster.worker()
    for w in (a, b):  # two keys, one agent: not independent
        cluster.coord.hub.sessions[w.key.public_hex].agent_id = "42"
        w.verified_agent_id = "42"  # what its receipts carry
    c = cluster.client()
    job = await c.submit(echo("same", 2))
    done = await c.wait(job.job_id)
    assert done.state == FAILED and done.failure.code == verify.NOT_ENOUGH_WORKERS
    (run,) = cluster.db.job_runs(job.job_id)
    assert run.verdict == ""


async def test_a_spot_check_runs_a_second_worker_or_is_skipped(tmp_path: Path) -> None:
    profile = make_profile(
        # the check waits its own (short) time for a checker, not the queue timeout
        jobs={"queue_timeout_seconds": 600},
        verification={"spot_check_rate": 1.0, "spot_check_wait_seconds": 1.0},
    )
    cluster = Cluster(await start_coordinator(profile, tmp_path / "c", "127.0.0.1:0"), tmp_path)
    try:
        first = await cluster.worker()
        c = cluster.client()
        alone = await c.submit(echo("alone"))
        done = await c.wait(alone.job_id)  # no second worker: the check is skipped
        assert done.state == COMPLETED and done.result.output == b'"alone"'
        assert not (await record_of(cluster, c, alone.job_id)).HasField("verification")
        reasons = [i.event.state_change.reason async for i in c.watch(alone.job_id)]
        assert "spot check skipped (no independent worker within 1s)" in reasons[-1]

        await cluster.worker(executors=liars())
        await cluster.worker()
        checked = await c.submit(echo("checked"))
        done = await c.wait(checked.job_id)
        assert done.state == COMPLETED and done.result.output == b'"checked"'
        v = (await record_of(cluster, c, checked.job_id)).verification
        assert v.mode == receipt_pb2.VERIFICATION_MODE_SPOT_CHECK and v.runs in (2, 3)
        assert first.key.public_key in v.agreeing_worker_keys or v.runs == 3
        # the client paid a single run's price
        assert done.price.amount_micros == (await c.quote(echo("x"))).price.amount_micros
    finally:
        await cluster.close()


async def test_a_restart_between_runs_loses_nothing(tmp_path: Path) -> None:
    profile = make_profile()
    data = tmp_path / "coord"
    cluster = Cluster(await start_coordinator(profile, data, "127.0.0.1:0"), tmp_path)
    try:
        first = await cluster.worker()
        c = cluster.client()
        job = await c.submit(echo("durable", 2))
        await wait_until(lambda: len(cluster.db.job_runs(job.job_id)) == 1, what="run 1 stored")
        await cluster.coord.stop(grace=0.2)
        cluster.coord = await start_coordinator(profile, data, cluster.address)
        await wait_until(lambda: first.connected.is_set(), what="first worker back")
        second = await cluster.worker()
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED and done.result.output == b'"durable"'
        runs = cluster.db.job_runs(job.job_id)
        assert [r.worker_id for r in runs] == [first.key.public_hex, second.key.public_hex]
        assert [r.verdict for r in runs] == [AGREED, AGREED]
        for w in (first, second):
            assert cluster.db.worker_stats(w.key.public_hex) == (1, 0)  # counted once
    finally:
        await cluster.close()


# --- --lie-rate (demos and tests only) ------------------------------------------------------


async def test_a_lying_executor_lies_at_its_rate() -> None:
    spec = echo("x")
    honest = await run_task("echo", spec.task.input)
    assert lie(honest) != honest and lie(honest).content_type == honest.content_type
    for rate, lies in ((0.0, 0), (1.0, 200)):
        e = LyingExecutor(default_executors()[0], rate)
        outs = [await e.run(spec, lambda *_: None) for _ in range(200)]
        assert sum(o == lie(honest) for o in outs) == e.lies == lies
    half = LyingExecutor(default_executors()[0], 0.5, random.Random(7))
    for _ in range(400):
        await half.run(spec, lambda *_: None)
    assert 150 < half.lies < 250
    with pytest.raises(ValueError, match="between 0 and 1"):
        lying(default_executors(), 1.5)


async def test_the_worker_command_lies_when_told_and_says_so(
    cluster: Cluster, procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    key = str(tmp_path / "liar.key")
    for argv in (
        ["worker", "--coordinator", cluster.address, "--key-file", key, "--lie-rate", "1.5"],
        ["seekers", "--coordinator", cluster.address, "--count", "1", "--lie-rate", "-0.1"],
    ):
        err = failed(await run(*argv, env=cli_env(tmp_path / "home")), code=2)
        assert "argument --lie-rate: must be between 0 and 1" in err
    p = procs(["worker", "--coordinator", cluster.address, "--key-file", key, "--lie-rate", "1"])
    assert p.info["lie_rate"] == 1.0 and p.info["kind"] == "seeker"
    warned = "--lie-rate 1: this worker returns WRONG output on purpose"
    await wait_until(lambda: warned in p.log.read_text(), what="the warning")
    c = cluster.client()
    done = await c.wait((await c.submit(echo("truth"))).job_id)
    assert done.state == COMPLETED and done.worker_id == p.info["worker_id"]
    assert done.result.output == b"LIE:" + b'"truth"'[::-1]  # signed, and wrong
