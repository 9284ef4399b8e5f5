"""The SDK's hosted fallback: each condition under which the network does not serve a job
(no eligible worker, not picked up in time, PRIVATE with no paired worker, no coordinator),
and the cases where no fallback applies (decentralized_only, a task with no hosted form).

The OpenAI adapter runs against a real OpenAI-compatible server on this machine: llama.cpp's
(`python -m llama_cpp.server`) with the shipped SmolLM2 model, through the official `openai`
SDK. The Anthropic adapter runs against AnthropicServer below, a small local HTTP server
speaking the Messages API (JSON and SSE streaming) as Anthropic documents it: the one part
that cannot run for real here (no network access, no key); it checks what the official
`anthropic` SDK sends."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import Cluster, wait_until
from test_cli import free_port
from test_llm import LlamaServer
from test_sdk import job_ids

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.sdk import (
    AnthropicProvider,
    ComputeRouter,
    CoordinatorUnavailable,
    DeadlineExceeded,
    HostedError,
    InvalidRequest,
    ModelPrice,
    Network,
    NoCapacity,
    OpenAIProvider,
    PriceTable,
    SpendingLimitExceeded,
    SpendingLimits,
    providers_from_env,
    types,
)
from dispatchnet.sdk.hosted import HostedRequest

LOCAL_MODEL = "smollm2-local"  # what the tests call llama.cpp's model in the price table
CLAUDE = "claude-test"
PRICES = PriceTable(
    {LOCAL_MODEL: ModelPrice(100_000, 200_000), CLAUDE: ModelPrice(1_000_000, 5_000_000)}
)
ARTICLE = {
    "text": "The river flooded the town. Volunteers filled sandbags all night. "
    "By morning the water had started to fall."
}


# --- a real OpenAI-compatible server: llama.cpp's -------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama.cpp's server with the shipped model, for the module; waits until /v1/models
    answers (polling the server, as a client would)."""
    server = LlamaServer(tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.p.poll() is None, server.log.read_text()[-2000:]
            try:
                server._models()
                break
            except OSError:
                assert time.monotonic() < deadline, "llama_cpp.server did not answer"
                time.sleep(0.1)  # polling the server's readiness, not synchronising the test
        yield server
    finally:
        server.kill()


def openai_at(llama: LlamaServer) -> OpenAIProvider:
    return OpenAIProvider(api_key="local", base_url=llama.url, model=LOCAL_MODEL, max_retries=0)


# --- a local server speaking Anthropic's Messages API ---------------------------------------


class AnthropicServer:
    """POST /v1/messages, answering `reply` (streamed word by word when asked), with usage
    input_tokens=12 and output_tokens = the number of pieces; records each request."""

    def __init__(self, reply: str = "Paris is the capital of France.") -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        # what a misbehaving API does instead: "truncated" (JSON cut short), "hold" (no
        # answer until `release` is set), "overcharge" (usage far past max_tokens), "huge"
        # (a 25 MiB reply)
        self.misbehave = ""
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                pieces = [w + " " for w in outer.reply.split(" ")]
                pieces[-1] = pieces[-1].rstrip()
                model = body["model"]
                if outer.misbehave == "truncated":
                    self._send("application/json", b'{"id": "msg_local", "content": [{"ty')
                    return
                if outer.misbehave == "hold":
                    outer.release.wait(30)
                if outer.misbehave == "huge":  # a reply far past any bound, non-streamed
                    outer.reply = "word " * (5 * 1024 * 1024)
                if outer.misbehave == "overcharge":
                    pieces = pieces * 0 + [outer.reply]  # one piece, usage below says more
                    outer_tokens = 500_000
                else:
                    outer_tokens = len(pieces)
                if not body.get("stream"):
                    self._send(
                        "application/json",
                        json.dumps(
                            {
                                "id": "msg_local",
                                "type": "message",
                                "role": "assistant",
                                "model": model,
                                "content": [{"type": "text", "text": outer.reply}],
                                "stop_reason": "end_turn",
                                "stop_sequence": None,
                                "usage": {"input_tokens": 12, "output_tokens": outer_tokens},
                            }
                        ).encode(),
                    )
                    return
                events: list[tuple[str, dict[str, Any]]] = [
                    (
                        "message_start",
                        {
                            "message": {
                                "id": "msg_local",
                                "type": "message",
                                "role": "assistant",
                                "model": model,
                                "content": [],
                                "stop_reason": None,
                                "stop_sequence": None,
                                "usage": {"input_tokens": 12, "output_tokens": 1},
                            }
                        },
                    ),
                    (
                        "content_block_start",
                        {"index": 0, "content_block": {"type": "text", "text": ""}},
                    ),
                    ("ping", {}),
                    *[
                        (
                            "content_block_delta",
                            {"index": 0, "delta": {"type": "text_delta", "text": p}},
                        )
                        for p in pieces
                    ],
                    ("content_block_stop", {"index": 0}),
                    (
                        "message_delta",
                        {
                            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": outer_tokens},
                        },
                    ),
                    ("message_stop", {}),
                ]
                sse = "".join(
                    f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
                    for name, data in events
                )
                self._send("text/event-stream", sse.encode())

            def _send(self, content_type: str, data: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def provider(self) -> AnthropicProvider:
        return AnthropicProvider(api_key="sk-test", base_url=self.url, model=CLAUDE, max_retries=0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def claude() -> Iterator[AnthropicServer]:
    s = AnthropicServer()
    yield s
    s.close()


def dead_network() -> Network:
    return Network("local", [f"127.0.0.1:{free_port()}"])


def router(nets: list[Network], **kw: Any) -> ComputeRouter:
    kw.setdefault("key", KeyPair.generate())
    kw.setdefault("prices", PRICES)
    kw.setdefault("connect_timeout", 2.0)
    return ComputeRouter(nets, **kw)


@pytest.fixture
async def busy_seeker(cluster: Cluster) -> AsyncIterator[str]:
    """A seeker that can run the text tasks but is busy (one slot, a 30 s sleep job)."""
    await cluster.worker(max_concurrency=1)
    c = cluster.client()
    blocker = await c.submit(task_spec("sleep", b'{"ms": 30000}'))

    async def running() -> bool:
        return (await c.get(blocker.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, 10, "the blocker running")
    yield blocker.job_id
    await c.cancel(blocker.job_id)


# --- the OpenAI adapter on llama.cpp's server -----------------------------------------------


async def test_no_eligible_worker_falls_back_to_openai(
    cluster: Cluster, llama: LlamaServer
) -> None:
    async with router([Network("local", [cluster.address])], hosted=[openai_at(llama)]) as r:
        result = await r.run_llm("Name three colors.", max_tokens=16)
    assert result.route == "openai"
    assert result.output.strip() and result.content_type.startswith("text/plain")
    assert [(s.network, s.reason) for s in result.skipped] == [("local", "no_eligible_worker")]
    assert result.receipt is None and result.payment is None and result.worker is None
    usage = result.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    expected = PRICES.cost(LOCAL_MODEL, usage.prompt_tokens, usage.completion_tokens)
    assert result.price.estimated and result.price.amount_micros == expected > 0
    assert r.spent_micros == expected


async def test_the_openai_fallback_streams_tokens(llama: LlamaServer) -> None:
    async with router([dead_network()], hosted=[openai_at(llama)]) as r:
        stream = r.stream_llm(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
            max_tokens=12,
        )
        tokens = [t async for t in stream]
    result = stream.result
    assert result.route == "openai" and len(tokens) > 1
    assert "".join(tokens) == result.output
    assert [s.reason for s in result.skipped] == ["coordinator_unavailable"]


async def test_a_job_not_picked_up_in_time_is_cancelled_then_runs_hosted(
    cluster: Cluster, llama: LlamaServer, busy_seeker: str
) -> None:
    async with router([Network("local", [cluster.address])], hosted=[openai_at(llama)]) as r:
        result = await r.run_task("summarize", ARTICLE, pickup_timeout=0.5)
        (skip,) = result.skipped
        assert (skip.reason, skip.coordinator) == ("not_picked_up", cluster.address)
        job = await r.get_job(skip.job_id)
    # the network's job was cancelled before the hosted call, so it is never paid as well
    assert job.state == types.JobState.CANCELLED
    assert result.route == "openai" and result.content_type == "application/json"
    assert set(result.json()) == {"summary"} and result.json()["summary"]


# --- the Anthropic adapter on a local Messages API server -----------------------------------


async def test_the_anthropic_adapter_speaks_the_messages_api(claude: AnthropicServer) -> None:
    async with router([dead_network()], hosted=[claude.provider()]) as r:
        done = await r.run_llm(
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Capital of France?"},
            ],
            max_tokens=50,
            temperature=0.5,
        )
        stream = r.stream_llm("Capital of France?")
        tokens = [t async for t in stream]
    assert done.route == "anthropic" and done.output == claude.reply
    assert done.model == CLAUDE
    assert done.usage == types.TokenUsage(prompt_tokens=12, completion_tokens=6)
    assert done.price == done.price.__class__(12 * 1 + 6 * 5, "USD", estimated=True)
    first = claude.requests[0]
    assert first["path"] == "/v1/messages"
    headers = first["headers"]  # the key goes as x-api-key or, in this SDK, a bearer token
    assert "sk-test" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    assert headers["anthropic-version"]
    assert first["body"]["system"] == "Answer briefly."
    assert first["body"]["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert first["body"]["max_tokens"] == 50 and "temperature" not in first["body"]
    # streamed: SSE events, piece by piece; max_tokens 0 becomes the default 256
    assert claude.requests[1]["body"]["stream"] is True
    assert claude.requests[1]["body"]["max_tokens"] == 256
    assert len(tokens) == 6 and "".join(tokens) == claude.reply == stream.result.output
    assert stream.result.usage == done.usage


async def test_hosted_providers_are_tried_in_preference_order(
    claude: AnthropicServer, llama: LlamaServer
) -> None:
    unreachable = OpenAIProvider(
        api_key="x", base_url=f"http://127.0.0.1:{free_port()}/v1", model=LOCAL_MODEL, max_retries=0
    )
    async with router([dead_network()], hosted=[unreachable, claude.provider()]) as r:
        assert (await r.run_llm("Hi", max_tokens=8)).route == "anthropic"
    async with router([dead_network()], hosted=[claude.provider(), openai_at(llama)]) as r:
        assert (await r.run_llm("Hi", max_tokens=8)).route == "anthropic"
    async with router([dead_network()], hosted=[openai_at(llama), claude.provider()]) as r:
        assert (await r.run_llm("Hi", max_tokens=8)).route == "openai"
    async with router([dead_network()], hosted=[unreachable]) as r:
        with pytest.raises(HostedError) as e:
            await r.run_llm("Hi", max_tokens=8)
    assert [p for p, _ in e.value.failures] == ["openai"]


def test_providers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert providers_from_env() == []
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("OPENAI_API_KEY", "o")
    found = providers_from_env(("anthropic", "openai"))
    assert [p.route for p in found] == ["anthropic", "openai"]
    assert isinstance(found[0], AnthropicProvider) and found[0].base_url == "http://127.0.0.1:9/"
    with pytest.raises(ValueError):
        providers_from_env(("gemini",))


# --- PRIVATE jobs ---------------------------------------------------------------------------


async def test_a_private_job_with_no_paired_worker_runs_hosted_and_never_commits(
    cluster: Cluster, claude: AnthropicServer
) -> None:
    worker = await cluster.worker()  # connected, able, but not paired with this client
    labels = {"text": "The match ended two to one.", "labels": ["sports", "politics"]}
    claude.reply = "sports"
    async with router([Network("local", [cluster.address])], hosted=[claude.provider()]) as r:
        result = await r.run_task("classify", labels, privacy="private")
        assert result.route == "anthropic"
        assert result.json() == {"label": "sports", "scores": {"sports": 1.0, "politics": 0.0}}
        assert [s.reason for s in result.skipped] == ["no_paired_worker"]
        assert job_ids(cluster) == []  # skipped before CommitJob

        # once the worker is paired with this client, the job runs on it
        code = (await cluster.client(r.key).create_pairing_code()).code
        await cluster.client(worker.key).claim_pairing(code)
        paired = await r.run_task("classify", labels, privacy="private")
    assert paired.route == "dispatch" and paired.worker is not None
    assert paired.worker.worker_id == worker.key.public_hex
    assert paired.json()["label"] == "sports"
    assert len(claude.requests) == 1


# --- no fallback ----------------------------------------------------------------------------


async def test_decentralized_only_never_falls_back(
    cluster: Cluster, claude: AnthropicServer
) -> None:
    async with router([dead_network()], hosted=[claude.provider()]) as r:
        with pytest.raises(CoordinatorUnavailable) as unavailable:
            await r.run_llm("Hi", decentralized_only=True)
    async with router(
        [Network("local", [cluster.address])],
        hosted=[claude.provider()],
        decentralized_only=True,
    ) as r:
        with pytest.raises(NoCapacity) as none:
            await r.run_llm("Hi")
    assert [s.reason for s in unavailable.value.reasons] == ["coordinator_unavailable"]
    assert [s.reason for s in none.value.reasons] == ["no_eligible_worker"]
    assert not isinstance(none.value, CoordinatorUnavailable)
    assert claude.requests == []


async def test_tasks_without_a_hosted_form_do_not_fall_back(claude: AnthropicServer) -> None:
    async with router([dead_network()], hosted=[claude.provider()]) as r:
        with pytest.raises(NoCapacity, match="no hosted form"):
            await r.run_task("sha256", "hello")
        with pytest.raises(NoCapacity, match="no hosted form"):
            await r.run_task("wasm", "x", wasm=b"\0asm\1\0\0\0")
    async with router([dead_network()], hosted=[]) as r:
        with pytest.raises(NoCapacity, match="no hosted provider"):
            await r.run_llm("Hi")
    assert claude.requests == []


async def test_hosted_calls_respect_the_spending_limits(claude: AnthropicServer) -> None:
    # the upper bound of this call: 8+2 prompt bytes and 16 tokens at claude-test's rates
    async with router(
        [dead_network()], hosted=[claude.provider()], limits=SpendingLimits(per_job_micros=50)
    ) as r:
        with pytest.raises(SpendingLimitExceeded) as e:
            await r.run_llm("Hi", max_tokens=16)
        assert e.value.scope == "job" and e.value.limit_micros == 50
        assert claude.requests == []  # refused before calling
        ok = await r.run_llm("Hi", max_tokens=4)
        assert ok.route == "anthropic" and r.spent_micros == ok.price.amount_micros
    unpriced = AnthropicProvider(api_key="k", base_url=claude.url, model="claude-unpriced")
    async with router([dead_network()], hosted=[unpriced]) as r:
        with pytest.raises(HostedError, match="no price"):
            await r.run_llm("Hi")
    async with router([dead_network()], hosted=[unpriced], limits=SpendingLimits.unlimited()) as r:
        free = await r.run_llm("Hi")
    assert free.route == "anthropic" and free.price.amount_micros == 0 and free.price.estimated
    assert len(claude.requests) == 2


async def test_a_hosted_call_ending_any_way_holds_no_money_and_keeps_its_bounds(
    claude: AnthropicServer,
) -> None:
    """Whatever ends a hosted call (closed early, cancelled, an answer its SDK cannot read,
    the call's timeout), its reservation against the session limit is given back: it used
    to stay held for good, and later calls were refused for money never spent. A reply is
    not believed past what was asked (the usage it reports is capped at the call's upper
    bound), and the call's timeout holds on the hosted route too."""
    limits = SpendingLimits(per_job_micros=1000, per_session_micros=5000)
    async with router([dead_network()], hosted=[claude.provider()], limits=limits) as r:
        stream = r.stream_llm("Hi", max_tokens=8)
        assert await anext(stream)
        await stream.aclose()  # as a gateway does when its client hangs up
        assert r.spending.reserved_micros == 0
        claude.misbehave = "hold"
        call = asyncio.create_task(r.run_llm("Hi", max_tokens=8))
        await wait_until(lambda: len(claude.requests) == 2, what="the held request")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert r.spending.reserved_micros == 0
        with pytest.raises(DeadlineExceeded, match="within the call's timeout"):
            await r.run_llm("Hi", max_tokens=8, timeout=0.5)
        claude.release.set()
        assert r.spending.reserved_micros == 0
        claude.misbehave = "truncated"
        with pytest.raises(HostedError, match="malformed reply"):
            await r.run_llm("Hi", max_tokens=8)
        assert r.spending.reserved_micros == 0 and r.spent_micros == 0  # none ended paid
        claude.misbehave = "huge"  # read no further than MAX_REPLY_BYTES, not whole
        with pytest.raises(HostedError, match="larger than 16,777,216 bytes"):
            await r.run_llm("Hi", max_tokens=8)
        assert r.spending.reserved_micros == 0 and r.spent_micros == 0
        claude.misbehave, claude.reply = "overcharge", "Paris is the capital of France."
        before = r.spent_micros
        paid = await r.run_llm("Hi", max_tokens=8)
        bound = PRICES.bound(CLAUDE, HostedRequest([{"role": "user", "content": "Hi"}], 8))
        assert bound is not None and paid.price.amount_micros <= bound <= 1000
        assert r.spent_micros - before == paid.price.amount_micros


async def test_a_bad_task_input_is_refused_before_any_hosted_call(
    claude: AnthropicServer,
) -> None:
    async with router([dead_network()], hosted=[claude.provider()]) as r:
        with pytest.raises(InvalidRequest, match="labels"):
            await r.run_task("classify", {"text": "x", "labels": ["only one"]})
    assert claude.requests == []
