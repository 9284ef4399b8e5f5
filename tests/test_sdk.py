"""The SDK's decentralized route (dispatchnet.sdk.ComputeRouter) against a real in-process
coordinator and real workers (the embedded llama.cpp model for LLM jobs): results and their
receipts, streaming, Merkle proofs, tampering caught, the chain preference over several
coordinators, typed errors, the sync wrapper. Payments: test_sdk_paid.py; the hosted
fallback: test_sdk_hosted.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import betterproto
import grpc
import pytest
from conftest import Cluster, make_profile, wait_until
from test_cli import free_port

from dispatch.v1 import receipt_pb2
from dispatchnet.coordinator.models import JobState
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile, load_profile
from dispatchnet.sdk import (
    ComputeResult,
    ComputeRouter,
    DeadlineExceeded,
    DispatchError,
    Expected,
    InvalidRequest,
    JobFailed,
    Network,
    NoCapacity,
    NotFound,
    PermissionDenied,
    ReceiptInvalid,
    SyncComputeRouter,
    llm_spec,
    task_spec,
    types,
    verify_receipt,
)
from dispatchnet.server import start_coordinator
from dispatchnet.worker.executors import default_executors
from dispatchnet.worker.llm import DEFAULT_MODEL_NAME, EmbeddedLlama, LlmExecutor
from dispatchnet.worker.lying import lying

CHEAP_TASK = 1000  # the local profile's price of a CHEAP (auto) task, micro-USD
FAST_LLM = 10000
TEXT = "to be or not to be"


@pytest.fixture
def profile() -> Profile:
    # receipt batches close within 0.3 s, so a Merkle proof is there soon after a job
    return make_profile(receipts={"batch_max_age_seconds": 0.3})


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedLlama]:
    """The shipped model, loaded once for the module."""
    backend = EmbeddedLlama(n_ctx=512)
    yield backend
    backend.close()


def router_for(*addresses: str, **kw: object) -> ComputeRouter:
    """A router on one network "local" with no hosted fallback and a fresh client key."""
    kw.setdefault("hosted", [])
    kw.setdefault("key", KeyPair.generate())
    return ComputeRouter([Network("local", list(addresses))], **kw)  # type: ignore[arg-type]


@pytest.fixture
async def router(cluster: Cluster) -> AsyncIterator[ComputeRouter]:
    r = router_for(cluster.address)
    yield r
    await r.close()


async def desktop(cluster: Cluster, embedded: EmbeddedLlama) -> None:
    executors = [*default_executors(), LlmExecutor(embedded, DEFAULT_MODEL_NAME)]
    await cluster.worker("desktop", executors=executors)


def job_ids(cluster: Cluster) -> list[str]:
    """Every job the coordinator stored."""
    with sqlite3.connect(cluster.coord.store.path) as db:
        return [row[0] for row in db.execute("SELECT job_id FROM jobs ORDER BY created_at")]


def tampered(receipt: types.Receipt, at: int = 10) -> types.Receipt:
    body = bytearray(receipt.body)
    body[at] ^= 0x01
    return dataclasses.replace(receipt, body=bytes(body))


# --- the decentralized route ----------------------------------------------------------------


async def test_a_task_returns_a_verified_result(cluster: Cluster, router: ComputeRouter) -> None:
    worker = await cluster.worker()
    result = await router.run_task("word_count", TEXT)

    assert result.route == "dispatch"
    assert result.json() == {"words": 6, "characters": 18}
    assert result.output == json.dumps(result.json(), separators=(",", ":"))
    assert result.content_type == "application/json"
    assert result.price.amount_micros == CHEAP_TASK and not result.price.estimated
    assert result.latency_ms > 0
    assert result.network == "local" and result.coordinator == cluster.address
    assert result.worker is not None and result.worker.worker_id == worker.key.public_hex
    assert result.payment is not None and result.payment.status == "none"
    assert router.spent_micros == 0  # payments off: nothing was charged
    assert not result.skipped
    # the receipt was verified, and is this job's
    assert result.receipt is not None and result.receipt_body is not None
    assert result.receipt_body.job_id == result.job_id
    assert result.receipt_body.client_id == router.client_id
    assert result.receipt_body.coordinator_public_key == cluster.coord.public_key
    assert router.verify_receipt(
        result.receipt, expected_coordinator_key=cluster.coord.public_key
    ).valid
    json.dumps(result.to_dict())  # JSON-ready


async def test_a_verified_task_returns_the_majority_with_its_record(
    cluster: Cluster, router: ComputeRouter
) -> None:
    honest = [await cluster.worker() for _ in range(2)]
    liar = await cluster.worker(executors=lying(default_executors(), 1.0))
    result = await router.run_task("word_count", TEXT, verify=3)
    assert result.json() == {"words": 6, "characters": 18}  # the majority's, not the lie
    assert result.price.amount_micros == 3 * CHEAP_TASK  # three runs
    assert result.receipt_body is not None
    v = result.receipt_body.verification
    assert v.mode == types.VerificationMode.REDUNDANT and v.runs == 3
    assert set(v.agreeing_worker_keys) == {w.key.public_key for w in honest}
    assert v.dissenting_worker_keys == [liar.key.public_key]
    assert result.receipt is not None

    # a receipt without the record of the runs asked for is refused
    single = await router.run_task("word_count", TEXT, policy="fast")
    assert single.receipt is not None
    check = verify_receipt(single.receipt, expected=Expected(verified_runs=2))
    assert check.problems == ["receipt verification does not match the job"]
    assert verify_receipt(result.receipt, expected=Expected(verified_runs=3)).valid
    with pytest.raises(InvalidRequest, match="2 or 3"):
        await router.run_task("word_count", TEXT, verify=4)


async def test_a_verified_task_never_falls_back_to_a_hosted_provider(cluster: Cluster) -> None:
    from dispatchnet.sdk import OpenAIProvider

    provider = OpenAIProvider(api_key="unused", base_url="http://127.0.0.1:9/v1", model="m")
    async with router_for(cluster.address, hosted=[provider]) as router:
        with pytest.raises(NoCapacity, match="2 independent runs compared"):
            await router.run_task("summarize", {"text": "One. Two."}, verify=2)


async def test_public_types_are_betterproto_dataclasses_of_the_same_bytes(
    cluster: Cluster, router: ComputeRouter
) -> None:
    await cluster.worker()
    result = await router.run_task("sha256", "hello")
    for value in (result.receipt, result.receipt_body, result.payment, result.job, result.usage):
        assert isinstance(value, betterproto.Message) and dataclasses.is_dataclass(value)
    assert isinstance(result.job, types.Job)
    assert result.job.state == types.JobState.COMPLETED
    assert betterproto.which_one_of(result.job.spec, "work")[0] == "task"
    # the dataclass carries exactly the bytes the coordinator sent
    pb = (await cluster.client(router.key).get(result.job_id)).receipt
    assert result.receipt is not None and bytes(result.receipt) == pb.SerializeToString()
    assert receipt_pb2.Receipt.FromString(bytes(result.receipt)) == pb


async def test_an_llm_reply_streams_its_tokens_then_the_result(
    cluster: Cluster, router: ComputeRouter, embedded: EmbeddedLlama
) -> None:
    await desktop(cluster, embedded)
    stream = router.stream_llm("Name three colors.", max_tokens=12)
    tokens = [t async for t in stream]
    result = stream.result
    assert len(tokens) > 1 and "".join(tokens) == result.output
    assert result.route == "dispatch" and result.price.amount_micros == FAST_LLM
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 12
    assert result.content_type.startswith("text/plain")

    conversation = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What color is the sky?"},
    ]
    reply = await router.run_llm(conversation, max_tokens=8, model=DEFAULT_MODEL_NAME)
    assert reply.output.strip() and reply.model == DEFAULT_MODEL_NAME
    assert reply.job is not None and len(reply.job.spec.llm.messages) == 2


async def test_closing_a_stream_early_cancels_the_job(
    cluster: Cluster, router: ComputeRouter, embedded: EmbeddedLlama
) -> None:
    await desktop(cluster, embedded)
    async with router.stream_llm("Write a long story about a dragon.", max_tokens=400) as stream:
        first = await anext(stream)
        assert first
    with pytest.raises(RuntimeError):
        stream.result  # noqa: B018
    (job_id,) = job_ids(cluster)
    job = await router.get_job(job_id)
    assert job.state == types.JobState.CANCELLED
    assert job.failure.message == "the client stopped waiting"


async def test_cancelling_a_call_cancels_its_job(cluster: Cluster, router: ComputeRouter) -> None:
    await cluster.worker()
    call = asyncio.create_task(router.run_task("sleep", '{"ms": 30000}'))

    async def running() -> bool:
        ids = job_ids(cluster)
        return bool(ids) and (await router.get_job(ids[0])).state == types.JobState.RUNNING

    await wait_until(running, 10, "the job running")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    (job_id,) = job_ids(cluster)
    assert (await router.get_job(job_id)).state == types.JobState.CANCELLED


async def test_the_merkle_proof_is_verified_on_request(
    cluster: Cluster, router: ComputeRouter
) -> None:
    await cluster.worker()
    result = await router.run_task("echo", '"proved"', verify_proof=True)
    assert result.proof is not None and result.receipt is not None
    assert len(result.proof.merkle_root) == 32
    assert result.proof.receipt_sha256 == result.receipt.receipt_sha256
    assert router.verify_receipt(result.receipt, result.proof).valid
    again = await router.receipt_proof(result.job_id)
    assert again.merkle_root == result.proof.merkle_root


async def test_a_tampered_receipt_or_proof_is_caught(
    cluster: Cluster, router: ComputeRouter
) -> None:
    await cluster.worker()
    first = await router.run_task("echo", '"one"', verify_proof=True)
    second = await router.run_task("echo", '"two"', verify_proof=True)
    assert first.receipt is not None and first.proof is not None and second.proof is not None

    check = router.verify_receipt(tampered(first.receipt))
    assert not check.valid
    assert any("worker signature" in p for p in check.problems)
    assert any("coordinator signature" in p for p in check.problems)
    forged = dataclasses.replace(first.receipt, coordinator_signature=bytes(64))
    assert router.verify_receipt(forged).problems == [
        "coordinator signature does not verify against coordinator_public_key"
    ]
    other = router.verify_receipt(
        first.receipt, expected_coordinator_key=KeyPair.generate().public_key
    )
    assert other.problems == ["receipt was countersigned by a different coordinator"]

    bad_root = dataclasses.replace(first.proof, merkle_root=bytes(32))
    assert (
        "the proof does not recompute merkle_root"
        in router.verify_receipt(first.receipt, bad_root).problems
    )
    # a valid proof, but of another receipt
    assert any(
        "another receipt" in p for p in router.verify_receipt(first.receipt, second.proof).problems
    )


async def test_a_receipt_from_another_coordinator_than_expected_is_refused(
    cluster: Cluster,
) -> None:
    await cluster.worker()
    pinned = Network("local", [cluster.address], coordinator_key=KeyPair.generate().public_key)
    async with ComputeRouter([pinned], hosted=[], key=KeyPair.generate()) as router:
        with pytest.raises(ReceiptInvalid) as e:
            await router.run_task("echo", '"x"')
    assert e.value.problems == ["receipt was countersigned by a different coordinator"]
    assert e.value.result is not None and e.value.result.output == '"x"'
    assert e.value.http_status == 502 and e.value.to_dict()["error"]["code"] == "receipt_invalid"


# --- networks and the chain preference ------------------------------------------------------


async def test_the_chain_preference_picks_coordinators_and_fails_over(
    cluster: Cluster, tmp_path: Path, profile: Profile
) -> None:
    """Network "a" is a coordinator with no worker, "b" one with a worker: "any" tries a then
    runs on b; naming a network runs only there. A dead address before a live one in the
    same network is skipped."""
    other = await start_coordinator(profile, tmp_path / "other", "127.0.0.1:0")
    try:
        await cluster.worker()
        dead = f"127.0.0.1:{free_port()}"
        nets = [
            Network("a", [f"127.0.0.1:{other.port}"]),
            Network("b", [dead, cluster.address]),
        ]
        async with ComputeRouter(nets, hosted=[], key=KeyPair.generate()) as router:
            result = await router.run_task("echo", '"hi"')
            assert (result.network, result.coordinator) == ("b", cluster.address)
            assert [(s.network, s.reason) for s in result.skipped] == [("a", "no_eligible_worker")]

            assert (await router.run_task("echo", '"hi"', chain="b")).network == "b"
            with pytest.raises(NoCapacity) as e:
                await router.run_task("echo", '"hi"', chain="a")
            assert [r.reason for r in e.value.reasons] == ["no_eligible_worker"]
            assert e.value.http_status == 503

            quote = await router.quote(task_spec("echo", '"hi"'))  # b's: a has no worker
            assert quote.eligible_workers == 1 and quote.price.amount_micros == CHEAP_TASK
            assert (await router.quote(llm_spec("hi"))).eligible_workers == 0

            workers = await router.list_workers()
            assert [w.kind for w in workers] == [types.WorkerKind.SEEKER]
            assert (await router.get_job(result.job_id)).job_id == result.job_id
    finally:
        await other.stop(grace=0.2)


def test_networks_come_from_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A profile names its chain track; its [wallet] is the network's wallet (none here: no
    local chain was started in this DISPATCH_HOME, and the public profiles need a key)."""
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    local = Network.from_profile("local", ["127.0.0.1:1"])
    assert (local.name, list(local.coordinators), local.wallet) == ("local", ["127.0.0.1:1"], None)
    assert Network.from_profile("local", name="x").coordinators
    assert Network.from_profile("local-monad", ["127.0.0.1:1"]).name == "monad"
    assert Network.from_profile("local-solana", ["127.0.0.1:1"]).name == "solana"
    with pytest.raises(InvalidRequest, match="wallet key file"):
        Network.from_profile("monad-testnet", ["127.0.0.1:1"])
    with pytest.raises(InvalidRequest):
        Network.from_profile("no-such-profile")
    with pytest.raises(InvalidRequest, match=r"^profile 'local-monad': no wallet key file") as e:
        Network.from_profile(load_profile("local-monad"), wallet_key_file=str(tmp_path / "none"))
    assert "Profile(" not in e.value.message  # named, not dumped
    with pytest.raises(ValueError):
        Network("any", ["127.0.0.1:1"])
    with pytest.raises(ValueError):
        ComputeRouter([local], chain="solana", hosted=[], key=KeyPair.generate())


# --- typed errors ---------------------------------------------------------------------------


async def test_errors_are_typed_never_raw_grpc(cluster: Cluster, router: ComputeRouter) -> None:
    await cluster.worker()

    async def error_of(coro: object) -> DispatchError:
        with pytest.raises(DispatchError) as e:
            await coro  # type: ignore[misc]
        assert not isinstance(e.value, grpc.aio.AioRpcError)
        assert not isinstance(e.value.__context__, grpc.aio.AioRpcError) or e.value.message
        return e.value

    e = await error_of(router.run_task("no_such_task", "x"))
    assert isinstance(e, InvalidRequest) and "no_such_task" in e.message and e.http_status == 400
    assert isinstance(await error_of(router.run_llm("hi", temperature=3)), InvalidRequest)
    assert isinstance(await error_of(router.run_llm("hi", policy="fastest")), InvalidRequest)
    assert isinstance(await error_of(router.run_task("echo", "x", chain="mars")), InvalidRequest)
    assert isinstance(
        await error_of(router.run_task("echo", "x", bogus=1)),  # type: ignore[call-arg]
        InvalidRequest,
    )

    failed = await error_of(router.run_task("sleep", '{"ms": "soon"}'))
    assert isinstance(failed, JobFailed) and failed.failure_code == "bad_input"
    assert failed.to_dict()["error"]["failure_code"] == "bad_input"
    assert router.spent_micros == 0

    assert isinstance(await error_of(router.get_job("job_nope")), NotFound)
    mine = await router.run_task("echo", '"mine"')
    async with router_for(cluster.address) as stranger:
        assert isinstance(await error_of(stranger.get_job(mine.job_id)), PermissionDenied)


async def test_a_job_past_the_timeout_is_cancelled(cluster: Cluster, router: ComputeRouter) -> None:
    await cluster.worker()
    with pytest.raises(DeadlineExceeded) as e:
        await router.run_task("sleep", '{"ms": 30000}', timeout=1.0)
    assert e.value.http_status == 504
    (job_id,) = job_ids(cluster)
    assert (await router.get_job(job_id)).state == types.JobState.CANCELLED


async def test_no_coordinator_and_no_fallback_is_coordinator_unavailable() -> None:
    from dispatchnet.sdk import CoordinatorUnavailable

    async with router_for(f"127.0.0.1:{free_port()}", connect_timeout=2) as router:
        with pytest.raises(CoordinatorUnavailable) as e:
            await router.run_task("echo", '"x"')
    assert [r.reason for r in e.value.reasons] == ["coordinator_unavailable"]


# --- the sync wrapper -----------------------------------------------------------------------

INTERRUPTED = """
import os, sys
from dispatchnet.keys import KeyPair
from dispatchnet.sdk import Network, SyncComputeRouter
r = SyncComputeRouter([Network("local", [sys.argv[1]])], hosted=[], key=KeyPair.generate())
try:
    r.run_task("sleep", '{"ms": 60000}')
except KeyboardInterrupt:
    print("interrupted", flush=True)
    os._exit(0)  # the script ends there, with no close() of the router
"""


async def test_ctrl_c_on_a_blocking_call_cancels_its_job(cluster: Cluster) -> None:
    """Ctrl-C in a script blocked in a SyncComputeRouter call cancels the job there and
    then (uncharged), as cancelling the async call does; the job used to run on."""
    await cluster.worker()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INTERRUPTED, cluster.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        def states() -> list[str]:
            rows = cluster.db._conn.execute("SELECT state FROM jobs").fetchall()
            return [JobState(r[0]).name for r in rows]

        await wait_until(lambda: states() == ["RUNNING"], 30, "the job running")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert out.decode().strip() == "interrupted", err.decode()
        assert states() == ["CANCELLED"]  # already, before the call gave up
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_sync_wrapper_runs_the_same_calls(
    cluster: Cluster, embedded: EmbeddedLlama
) -> None:
    await cluster.worker()
    await desktop(cluster, embedded)

    def use() -> tuple[ComputeResult, list[str], ComputeResult, str]:
        nets = [Network("local", [cluster.address])]
        with SyncComputeRouter(nets, hosted=[], key=KeyPair.generate()) as router:
            done = router.run_task("word_count", TEXT)
            with router.stream_llm("Name a color.", max_tokens=8) as stream:
                tokens = list(stream)
            try:
                router.run_task("no_such_task", "x")
                error = ""
            except InvalidRequest as e:
                error = e.code
            assert router.verify_receipt(done.receipt or types.Receipt()).valid
            spec = task_spec("echo", '"x"')
            assert router.quote(spec).eligible_workers >= 1
            with router.stream(spec) as echoed:
                list(echoed)
            assert echoed.result.output == '"x"'
            return done, tokens, stream.result, error

    public = {n for n in dir(ComputeRouter) if not n.startswith("_")}
    assert public <= set(dir(SyncComputeRouter)), "the same calls, blocking (README)"
    done, tokens, streamed, error = await asyncio.to_thread(use)
    assert done.json() == {"words": 6, "characters": 18}
    assert tokens and "".join(tokens) == streamed.output
    assert error == "invalid_request"
