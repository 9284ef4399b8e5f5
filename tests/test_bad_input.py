"""Bad input gets a clear status and message, never UNKNOWN."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import HELLO, Cluster, make_profile, rpc_code

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, receipt_pb2_grpc, worker_pb2
from dispatchnet.auth import tokens
from dispatchnet.client import task_spec
from dispatchnet.errors import quoted
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def profile() -> Profile:
    return make_profile(limits={"max_task_input_bytes": 1024})


async def _code(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return rpc_code(e.value), e.value.details() or ""


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (None, "spec is required"),
        (common_pb2.JobSpec(), "set exactly one"),
        (common_pb2.JobSpec(task=common_pb2.TaskRequest(name="")), "spec.task.name"),
        (common_pb2.JobSpec(task=common_pb2.TaskRequest(name="Bad Name!")), "spec.task.name"),
        (
            common_pb2.JobSpec(task=common_pb2.TaskRequest(name="echo", input=b"x" * 1025)),
            "the limit is 1024",
        ),
        (
            common_pb2.JobSpec(task=common_pb2.TaskRequest(name="echo"), policy=99),  # type: ignore[arg-type]
            "spec.policy: unknown value 99",
        ),
        (
            common_pb2.JobSpec(task=common_pb2.TaskRequest(name="echo"), privacy=7),  # type: ignore[arg-type]
            "spec.privacy",
        ),
        (common_pb2.JobSpec(llm=common_pb2.LlmRequest()), "set prompt or messages"),
        (common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="x", temperature=3.0)), "temperature"),
        (
            common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="x", max_tokens=100000)),
            "max_tokens",
        ),
        (
            common_pb2.JobSpec(
                llm=common_pb2.LlmRequest(
                    messages=[common_pb2.ChatMessage(role="robot", content="x")]
                )
            ),
            "role",
        ),
        (common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="x" * 40000)), "the limit is"),
        (  # empty messages cost no characters, but each costs the model its template
            common_pb2.JobSpec(
                llm=common_pb2.LlmRequest(
                    messages=[common_pb2.ChatMessage(role="user", content="")] * 257
                )
            ),
            "has 257 messages; the limit is 256",
        ),
    ],
)
async def test_bad_specs_are_invalid_argument(
    cluster: Cluster, spec: common_pb2.JobSpec | None, needle: str
) -> None:
    c = cluster.client()
    req = coordinator_pb2.GetQuoteRequest(spec=spec) if spec else coordinator_pb2.GetQuoteRequest()
    code, msg = await _code(c.jobs.GetQuote(req))
    assert code == INVALID
    assert needle in msg


async def test_unknown_fields_are_ignored(cluster: Cluster) -> None:
    """A client built from newer protos still works: fields this server does not know
    are ignored, as protobuf intends (top level and inside sub-messages)."""
    c = cluster.client()
    spec = task_spec("echo", b"1").SerializeToString() + b"\x90\x06\x01"  # field 98 in spec
    # field 1 (spec) re-encoded with the extra field, then field 99, varint 1
    raw = b"\x0a" + bytes([len(spec)]) + spec + b"\x98\x06\x01"
    call = c.channel.unary_unary(
        "/dispatch.v1.CoordinatorService/GetQuote",
        response_deserializer=coordinator_pb2.GetQuoteResponse.FromString,
    )
    resp = await call(raw)
    assert resp.quote.quote_id


async def test_unknown_and_missing_ids(cluster: Cluster) -> None:
    c = cluster.client()
    assert (await _code(c.get("job_nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _code(c.get("")))[0] == INVALID
    assert (await _code(c.commit("q_nope", "k")))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _code(c.commit("", "k")))[0] == INVALID
    q = await c.quote(task_spec("echo", b"1"))
    assert (await _code(c.commit(q.quote_id, "k" * 200)))[0] == INVALID
    assert (await _code(c.cancel("job_nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _code(c.receipt("job_nope")))[0] == grpc.StatusCode.NOT_FOUND


async def test_another_clients_job_is_off_limits(cluster: Cluster) -> None:
    await cluster.worker()
    owner, other = cluster.client(), cluster.client()
    job = await owner.submit(task_spec("echo", b"1"))
    await owner.wait(job.job_id)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert (await _code(other.get(job.job_id)))[0] == denied
    assert (await _code(other.cancel(job.job_id)))[0] == denied
    assert (await _code(other.receipt(job.job_id)))[0] == denied

    async def watch() -> None:
        async for _ in other.watch(job.job_id):
            pass

    assert (await _code(watch()))[0] == denied


async def test_receipt_of_unfinished_job_is_failed_precondition(cluster: Cluster) -> None:
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    code, msg = await _code(c.receipt(job.job_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "QUEUED" in msg


async def test_authentication_is_required_and_checked(cluster: Cluster) -> None:
    c = cluster.client()
    q = await c.quote(task_spec("echo", b"1"))
    req = coordinator_pb2.CommitJobRequest(quote_id=q.quote_id, idempotency_key="k")
    unauth = grpc.StatusCode.UNAUTHENTICATED
    code, msg = await _code(c.jobs.CommitJob(req))
    assert code == unauth and "dispatch auth header" in msg
    key, other = KeyPair.generate(), KeyPair.generate()
    bad: list[tuple[str, str]] = [
        ("Bearer abc", "authorization must be"),
        ("Dispatch v1.abc", "malformed"),
        (tokens.metadata_value(key, ttl_seconds=-10), "expired"),
        (tokens.metadata_value(key, ttl_seconds=10**7), "lifetime"),
    ]
    # a token whose signature was made by another key: claiming someone else's identity
    good = tokens.make_token(key).split(".")
    forged = tokens.make_token(other).split(".")
    bad.append((f"Dispatch v1.{good[1]}.{good[2]}.{forged[3]}", "signature"))
    for value, needle in bad:
        code, msg = await _code(c.jobs.CommitJob(req, metadata=(("authorization", value),)))
        assert code == unauth, value
        assert needle in msg, (value, msg)


async def test_a_token_signature_is_checked_once_per_token(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[bytes] = []
    real = tokens.verify

    def counting(public_key: bytes, context: bytes, message: bytes, signature: bytes) -> bool:
        checked.append(signature)
        return real(public_key, context, message, signature)

    monkeypatch.setattr(tokens, "verify", counting)
    key, other = KeyPair.generate(), KeyPair.generate()
    token = tokens.make_token(key)
    good = (("authorization", f"Dispatch {token}"),)
    parts = token.split(".")
    forged_sig = tokens.make_token(other).split(".")[3]
    forged = (("authorization", f"Dispatch {'.'.join([*parts[:3], forged_sig])}"),)
    stub = cluster.client(key).jobs
    for _ in range(5):
        code, _ = await _code(stub.GetJob(coordinator_pb2.GetJobRequest(job_id="j"), metadata=good))
        assert code == grpc.StatusCode.NOT_FOUND  # past authentication
    assert len(checked) == 1
    for _ in range(2):  # a forged signature is checked (and refused) every time
        code, _ = await _code(
            stub.GetJob(coordinator_pb2.GetJobRequest(job_id="j"), metadata=forged)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert len(checked) == 3


async def test_public_methods_need_no_credentials(cluster: Cluster) -> None:
    c = cluster.client()
    await c.jobs.GetQuote(coordinator_pb2.GetQuoteRequest(spec=task_spec("echo", b"1")))
    await c.jobs.ListWorkers(coordinator_pb2.ListWorkersRequest())
    stub = receipt_pb2_grpc.ReceiptServiceStub(c.channel)
    resp = await stub.VerifyReceipt(receipt_pb2.VerifyReceiptRequest())
    assert not resp.valid and resp.problems


async def test_list_workers_rejects_unknown_kind(cluster: Cluster) -> None:
    c = cluster.client()
    code, _ = await _code(c.jobs.ListWorkers(coordinator_pb2.ListWorkersRequest(kind=9)))  # type: ignore[arg-type]
    assert code == INVALID


async def test_oversized_message_is_refused_by_grpc(cluster: Cluster) -> None:
    c = cluster.client()
    big = task_spec("echo", b"x" * (5 * 1024 * 1024))
    code, _ = await _code(c.quote(big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("after", [2**63 - 1, 2**63, 2**64 - 1])
async def test_watch_after_any_uint64_is_served(cluster: Cluster, after: int) -> None:
    """after_sequence is a uint64: a value past every sequence (even past SQLite's int64)
    sends no events, like any value past the job's last one."""
    await cluster.worker()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    done = await c.wait(job.job_id)
    assert [item async for item in c.watch(job.job_id, after)] == []
    # and the job's own history is intact
    events = [item.event.sequence async for item in c.watch(job.job_id, 0)]
    assert events[-1] == done.last_sequence


GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no message type parses it


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _garbage_after_handshake(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    """A worker that completes the handshake, then sends bytes that are no ConnectRequest."""
    key = KeyPair.generate()
    out: asyncio.Queue[bytes] = asyncio.Queue()

    async def requests() -> AsyncIterator[bytes]:
        while True:
            yield await out.get()

    call = channel.stream_stream("/dispatch.v1.WorkerService/Connect")(requests())
    hello = worker_pb2.Hello(
        public_key=key.public_key,
        kind=common_pb2.WORKER_KIND_SEEKER,
        capabilities=worker_pb2.Capabilities(tasks=["echo"], max_concurrency=1),
    )
    out.put_nowait(worker_pb2.ConnectRequest(hello=hello).SerializeToString())
    challenge = worker_pb2.ConnectResponse.FromString(await call.read()).challenge
    proof = key.sign(HELLO, challenge.nonce + challenge.coordinator_public_key)
    response = worker_pb2.ChallengeResponse(signature=proof)
    out.put_nowait(worker_pb2.ConnectRequest(challenge_response=response).SerializeToString())
    assert worker_pb2.ConnectResponse.FromString(await call.read()).HasField("welcome")
    out.put_nowait(GARBAGE)
    try:
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    try:
        return await asyncio.wait_for(call.code(), 10), await call.details()
    finally:
        call.cancel()


async def test_undecodable_requests_are_invalid_argument_on_every_method(
    cluster: Cluster, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that do not parse as the method's request type: INVALID_ARGUMENT on every
    method (unary, server streaming, bidi, public or not, ours or grpc's), and the log
    gets at most one line, with no traceback."""
    caplog.set_level(logging.INFO)
    for method in (
        "/dispatch.v1.CoordinatorService/GetQuote",  # public
        "/dispatch.v1.CoordinatorService/GetJob",  # needs credentials: none are sent
        "/dispatch.v1.TrustService/ClaimPairing",
        "/grpc.health.v1.Health/Check",
    ):
        code, msg = await _code(channel.unary_unary(method)(GARBAGE))
        assert code == INVALID, method
        assert msg.startswith("request is not a valid ") and msg.endswith(" message"), msg
    watch = channel.unary_stream("/dispatch.v1.CoordinatorService/WatchJob")(GARBAGE)
    code, msg = await _code(_drain(watch))
    assert (code, msg) == (INVALID, "request is not a valid dispatch.v1.WatchJobRequest message")
    connect = channel.stream_stream("/dispatch.v1.WorkerService/Connect")(iter([GARBAGE]))
    bad_connect = (INVALID, "request is not a valid dispatch.v1.ConnectRequest message")
    assert await _code(_drain(connect)) == bad_connect
    assert await _garbage_after_handshake(channel) == bad_connect
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in records]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "undecodable" in records[0].getMessage()


BIG = "x" * (1024 * 1024)


@pytest.mark.parametrize(
    ("call", "field", "limit"),
    [
        (lambda c: c.get(BIG), "job_id", 64),
        (lambda c: c.cancel(BIG), "job_id", 64),
        (lambda c: c.cancel("job_x", reason=BIG), "reason", 512),
        (lambda c: c.commit(BIG, "k"), "quote_id", 64),
        (lambda c: c.commit("q_x", BIG), "idempotency_key", 128),
        (lambda c: c.receipt(BIG), "job_id", 64),
        (lambda c: c.receipt_proof(BIG), "job_id", 64),
        (lambda c: c.claim_pairing(BIG), "code", 32),
        (lambda c: c.revoke_pairing(BIG), "pairing_id", 64),
        (lambda c: _drain(c.watch(BIG)), "job_id", 64),
    ],
)
async def test_oversized_ids_are_refused_with_a_short_message(
    cluster: Cluster, call: Any, field: str, limit: int
) -> None:
    """Every id a client sends has a documented maximum length, checked before anything
    looks it up; the message names the field and never echoes the id back."""
    code, msg = await _code(call(cluster.client()))
    assert (code, msg) == (INVALID, f"{field} is {len(BIG)} characters; the limit is {limit}")


def test_error_messages_quote_a_short_prefix_of_caller_input() -> None:
    assert quoted("job_abc") == "job_abc"
    assert quoted("a\nb") == "'a\\nb'"
    long = quoted("y" * 10**6)
    assert long.startswith("'yyyy") and long.endswith("… (1000000 characters)")
    assert len(long) < 80


async def test_the_edge_wraps_each_method_once_and_checks_every_call() -> None:
    """The edge's wrapper of a method is built once and reused; each call is still
    authenticated on its own (a token on one call does not carry over to the next)."""
    from types import SimpleNamespace

    from dispatchnet.api.edge import EdgeInterceptor, caller

    seen: list[str] = []

    async def get_job(request: Any, context: Any) -> Any:
        seen.append(caller().id)
        return coordinator_pb2.GetJobResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        get_job,
        coordinator_pb2.GetJobRequest.FromString,
        coordinator_pb2.GetJobResponse.SerializeToString,
    )
    edge = EdgeInterceptor(3600)
    details = SimpleNamespace(method="/dispatch.v1.CoordinatorService/GetJob")

    async def continuation(_details: Any) -> Any:
        return handler

    first = await edge.intercept_service(continuation, details)
    assert await edge.intercept_service(continuation, details) is first

    class Context:
        def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
            self.metadata, self.aborted = metadata, None

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return self.metadata

        async def abort(self, code: Any, message: str, trailing_metadata: Any = ()) -> None:
            self.aborted = (code, message)
            raise grpc.aio.AbortError()

    key = KeyPair.generate()
    signed = Context(((tokens.METADATA_KEY, tokens.metadata_value(key)),))
    request = coordinator_pb2.GetJobRequest(job_id="j")
    for _ in range(2):
        await asyncio.create_task(first.unary_unary(request, signed))
    assert seen == [key.public_hex] * 2
    anonymous = Context(())
    with pytest.raises(grpc.aio.AbortError):
        await asyncio.create_task(first.unary_unary(request, anonymous))
    assert anonymous.aborted is not None
    assert anonymous.aborted[0] == grpc.StatusCode.UNAUTHENTICATED and len(seen) == 2
