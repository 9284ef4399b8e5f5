"""The OpenAI-compatible HTTP gateway (dispatchnet.gateways), served by uvicorn in-process on
a free port, over a real coordinator and workers (the embedded llama.cpp model behind a
desktop). Paid requests: the official `openai` client and plain httpx, both through the
x402 SDK's httpx transport (402 -> sign -> retry), on the local anvil chain (and once on
the local Solana node); the money is read on chain. Unpaid: /v1/models, bad input, bounds,
callers hanging up, no worker, the hosted fallback's budget, `dispatch gateway` as a
process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto
import chain_fixtures
import httpx
import openai
import pytest
from conftest import Cluster, Proc, make_profile, send_oversized_headers, wait_until
from test_cli import free_port
from test_payments import new_payer
from test_sdk import desktop, embedded, job_ids  # noqa: F401
from test_sdk_hosted import CLAUDE, PRICES, AnthropicServer
from test_tracks import Track, _evm, _solana, evm_chain, solana_chain  # noqa: F401
from x402 import x402Client, x402ClientSync
from x402.http import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.http.clients import x402_httpx_transport
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.mechanisms.svm import KeypairSigner
from x402.mechanisms.svm.exact import ExactSvmClientScheme
from x402.schemas import PaymentRequired

from dispatchnet import protocol
from dispatchnet.cli import load_receipt_file
from dispatchnet.gateways import MAX_HEADER_BYTES, wire
from dispatchnet.gateways.http import Gateway
from dispatchnet.gateways.relay import RelayPayer
from dispatchnet.gateways.serve import GatewayServer, gateway_router
from dispatchnet.gateways.wire import HttpError
from dispatchnet.keys import KeyPair
from dispatchnet.payments.wallet import Wallet
from dispatchnet.profiles import Profile
from dispatchnet.sdk import ComputeRouter, InvalidRequest, Network, llm_spec, types, verify_receipt
from dispatchnet.server import start_coordinator
from dispatchnet.worker.llm import DEFAULT_MODEL_NAME

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

home = chain_fixtures.home
FAST_LLM = 10_000  # micro-USD = test USDC atomic units: an AUTO LLM job runs FAST
CHEAP_TASK = 1_000
HELLO = [{"role": "user", "content": "Say hello."}]
ECHO = {"input": {"text": "hi"}}


@dataclass
class Served:
    cluster: Cluster
    server: GatewayServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def router(self) -> ComputeRouter:
        return self.server.gateway.router


@contextlib.asynccontextmanager
async def serve(cluster: Cluster, profile: Profile, tmp: Path, **kw: Any) -> AsyncIterator[Served]:
    router = gateway_router(profile, [cluster.address], key_file=tmp / "gateway.key")
    async with GatewayServer(Gateway(router, **kw), log_level="warning") as server:
        yield Served(cluster, server)


def paying(wallet: Wallet, **kw: Any) -> httpx.AsyncClient:
    """An httpx client that pays 402s from `wallet`'s account with the official x402 SDK
    (its httpx transport: 402 -> sign -> retry with PAYMENT-SIGNATURE)."""
    client = x402Client()
    client.register("eip155:*", ExactEvmClientScheme(EthAccountSigner(wallet.account)))
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": a.network, "asset": a.address, "max_amount_per_payment": "100000"}
                for a in wallet.extra_assets
            ]
        }
    )
    return httpx.AsyncClient(transport=x402_httpx_transport(client), timeout=120, **kw)


def sign(wallet: Wallet, required: str) -> str:
    """A PAYMENT-SIGNATURE for a PAYMENT-REQUIRED value, signed with the x402 SDK."""
    client = x402ClientSync()
    client.register("eip155:*", ExactEvmClientScheme(EthAccountSigner(wallet.account)))
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": a.network, "asset": a.address, "max_amount_per_payment": "100000"}
                for a in wallet.extra_assets
            ]
        }
    )
    return encode_payment_signature_header(
        client.create_payment_payload(decode_payment_required_header(required))
    )


def chat(url: str, http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0
    )


def receipt_of(header: str) -> types.Receipt:
    return types.Receipt().parse(base64.b64decode(header))


async def settled(router: ComputeRouter, job_id: str) -> types.Job:
    job = types.Job()

    async def done() -> bool:
        nonlocal job
        job = await router.get_job(job_id)
        return job.payment.status == "settled"

    await wait_until(done, 30, "the payment settled")
    return job


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert "Traceback" not in r.text
    error: dict[str, Any] = r.json()["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert error["code"] == code, error
    return error


# --- paid, on the local anvil chain -------------------------------------------------------------


@pytest.fixture
def evm(home: Path, evm_chain: dict[str, Any]) -> Track:  # noqa: F811
    return _evm(home, evm_chain)


@pytest.fixture
async def paid(evm: Track, embedded: Any, tmp_path: Path) -> AsyncIterator[Served]:  # noqa: F811
    async with chain_fixtures.cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
        await desktop(cluster, embedded)
        async with serve(cluster, evm.profile(True), tmp_path) as served:
            yield served


async def test_a_chat_completion_paid_with_x402_through_the_openai_client(
    paid: Served,
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
) -> None:
    payer = new_payer(evm_chain)
    payee_before = evm.balance(evm.payee)
    async with paying(payer) as http:
        raw = await chat(paid.url, http).chat.completions.with_raw_response.create(
            model="auto", messages=HELLO, max_tokens=8
        )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == DEFAULT_MODEL_NAME  # the desktop's, as it answered "auto"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
    info = (completion.model_extra or {})["dispatch"]
    assert info["route"] == "dispatch" and info["price"]["amount_micros"] == FAST_LLM
    assert info["worker"]["worker_id"] == paid.cluster.workers[0][0].key.public_hex

    # the receipt travels in a header and in the body, and verifies offline
    receipt = receipt_of(raw.headers["x-dispatch-receipt"])
    assert receipt.to_dict(casing=betterproto.Casing.SNAKE) == info["receipt"]
    check = verify_receipt(receipt, expected_coordinator_key=paid.cluster.coord.public_key)
    assert check.valid and check.body is not None and check.body.job_id == info["job_id"]
    assert raw.headers["x-dispatch-job-id"] == info["job_id"]

    # x402: PAYMENT-RESPONSE names the payment; the payer paid the coordinator, once
    settle = decode_payment_response_header(raw.headers["payment-response"])
    assert settle.success and settle.payer == payer.address
    assert settle.network == evm_chain["network"] and settle.amount == str(FAST_LLM)
    assert (settle.extra or {})["jobId"] == info["job_id"]
    job = await settled(paid.router, info["job_id"])
    assert job.result.output.decode() == completion.choices[0].message.content
    assert evm.balance(payer.address) == 1_000_000 - FAST_LLM
    assert evm.balance(evm.payee) == payee_before + FAST_LLM
    assert job_ids(paid.cluster) == [info["job_id"]]


async def test_a_streamed_chat_completion_ends_with_its_receipt(
    paid: Served,
    evm_chain: dict[str, Any],  # noqa: F811
) -> None:
    payer = new_payer(evm_chain)
    async with paying(payer) as http:
        stream = await chat(paid.url, http).chat.completions.create(
            model="auto",
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        headers = stream.response.headers
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    info = (last.model_extra or {})["dispatch"]
    assert info["route"] == "dispatch" and info["payment"]["payer"] == payer.address
    receipt = types.Receipt().from_dict(info["receipt"])
    assert verify_receipt(receipt, expected_coordinator_key=paid.cluster.coord.public_key).valid
    job = await paid.router.get_job(info["job_id"])
    assert job.result.output.decode() == text  # the receipt's output hash is these bytes

    # the PAYMENT-RESPONSE of a stream comes before the job ends: the payment is accepted
    settle = decode_payment_response_header(headers["payment-response"])
    assert settle.success and (settle.extra or {})["status"] == "accepted"
    assert settle.amount == str(FAST_LLM)


async def test_a_task_without_payment_gets_402_that_the_x402_sdk_pays(
    paid: Served,
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"{paid.url}/v1/tasks/echo"
    async with httpx.AsyncClient(timeout=60) as plain:
        r = await plain.post(url, json=ECHO)
    error = assert_error(r, 402, "payment_required")
    assert error["type"] == "payment_required"
    assert r.headers["cache-control"] == "no-store"
    required = decode_payment_required_header(r.headers["payment-required"])
    assert isinstance(required, PaymentRequired) and required.x402_version == 2
    assert required.resource is not None and required.resource.url == url
    (accept,) = required.accepts
    assert accept.pay_to == evm.payee  # the coordinator's account: one payment, no custody
    assert accept.amount == str(CHEAP_TASK) and accept.network == evm_chain["network"]
    assert job_ids(paid.cluster) == []  # nothing committed, nothing signed

    payer = new_payer(evm_chain)
    async with paying(payer) as http:
        r = await http.post(url, json=ECHO)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "task.result" and body["output"] == {"text": "hi"}
    assert body["dispatch"]["price"]["amount_micros"] == CHEAP_TASK
    assert decode_payment_response_header(r.headers["payment-response"]).payer == payer.address
    await settled(paid.router, body["dispatch"]["job_id"])
    assert evm.balance(payer.address) == 1_000_000 - CHEAP_TASK

    # the receipt header, saved as it is, verifies with the CLI
    saved = tmp_path / "receipt.b64"
    saved.write_text(r.headers["x-dispatch-receipt"])
    key = paid.cluster.coord.public_key.hex()
    done = chain_fixtures.dispatch(
        tmp_path, "receipt", "verify", str(saved), "--coordinator-key", key
    )
    assert done.returncode == 0, done.stderr
    verified = json.loads(done.stdout)
    assert verified["valid"] and verified["receipt"]["job_id"] == body["dispatch"]["job_id"]
    # ... and so does the JSON answer, whose `dispatch` field holds it
    answer = tmp_path / "answer.json"
    answer.write_text(r.text)
    header = base64.b64decode(r.headers["x-dispatch-receipt"])
    assert load_receipt_file(answer).SerializeToString() == header


async def test_refused_and_mismatched_payments_get_402_and_cost_nothing(
    paid: Served,
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
) -> None:
    url = f"{paid.url}/v1/tasks/echo"
    broke = new_payer(evm_chain, amount=0)
    async with paying(broke) as http:
        r = await http.post(url, json=ECHO)
    assert_error(r, 402, "payment_rejected")
    required = decode_payment_required_header(r.headers["payment-required"])
    assert "insufficient" in (required.error or "")
    assert len(required.accepts) == 1  # the fresh requirements, to pay again

    payer = new_payer(evm_chain)
    async with httpx.AsyncClient(timeout=60) as plain:
        asked = await plain.post(
            f"{paid.url}/v1/chat/completions", json={"model": "auto", "messages": HELLO}
        )
        assert asked.status_code == 402
        for_chat = sign(payer, asked.headers["payment-required"])  # 10000, not 1000
        r = await plain.post(url, json=ECHO, headers={"PAYMENT-SIGNATURE": for_chat})
        assert_error(r, 402, "no_matching_requirements")
        assert decode_payment_required_header(r.headers["payment-required"]).accepts
        r = await plain.post(url, json=ECHO, headers={"PAYMENT-SIGNATURE": "bm90IGpzb24="})
        assert assert_error(r, 400, "invalid_payment")["param"] == "PAYMENT-SIGNATURE"
    assert job_ids(paid.cluster) == []
    assert evm.balance(payer.address) == 1_000_000


async def test_a_client_leaving_a_stream_cancels_the_job_uncharged(
    paid: Served,
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
) -> None:
    payer = new_payer(evm_chain)
    request = {
        "model": "auto",
        "messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
        "max_tokens": 300,
        "stream": True,
    }
    async with (
        paying(payer) as http,
        http.stream("POST", f"{paid.url}/v1/chat/completions", json=request) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # a first token came: hang up
    (job_id,) = job_ids(paid.cluster)

    async def cancelled() -> bool:
        job = await paid.router.get_job(job_id)
        return job.state == types.JobState.CANCELLED and job.payment.status == "released"

    await wait_until(cancelled, 15, "the job cancelled and its payment released")
    assert paid.server.gateway.running == 0
    assert evm.balance(payer.address) == 1_000_000


async def test_a_solana_coordinator_is_paid_the_same_way(
    home: Path,
    evm_chain: dict[str, Any],  # noqa: F811
    solana_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    svm = _solana(home, solana_chain)
    wallet = svm.wallet()
    start = svm.balance(wallet.address)
    client = x402Client()
    client.register(
        "solana:*", ExactSvmClientScheme(KeypairSigner(wallet.keypair), solana_chain["rpc_url"])
    )
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": a.network, "asset": a.address, "max_amount_per_payment": "100000"}
                for a in wallet.extra_assets
            ]
        }
    )
    async with (
        chain_fixtures.cluster_for(svm.profile(True), tmp_path / "coord") as cluster,
        serve(cluster, svm.profile(True), tmp_path) as served,
        httpx.AsyncClient(transport=x402_httpx_transport(client), timeout=60) as http,
    ):
        await cluster.worker()
        r = await http.post(f"{served.url}/v1/tasks/echo", json=ECHO)
        assert r.status_code == 200, r.text
        info = r.json()["dispatch"]
        assert info["network"] == "solana" and info["payment"]["payer"] == wallet.address
        settle = decode_payment_response_header(r.headers["payment-response"])
        assert settle.network == solana_chain["network"] and settle.amount == str(CHEAP_TASK)
        await settled(served.router, info["job_id"])
    assert svm.balance(wallet.address) == start - CHEAP_TASK


async def test_models_are_what_connected_desktops_serve(paid: Served) -> None:
    async with httpx.AsyncClient() as http:
        client = chat(paid.url, http)
        listed = [m.id async for m in client.models.list()]
        assert listed == [DEFAULT_MODEL_NAME]
        model = await client.models.retrieve(DEFAULT_MODEL_NAME)
        assert model.owned_by == "dispatch"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")


# --- unpaid: a coordinator with payments off -------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[tuple[Cluster, Profile]]:
    profile = make_profile()
    coord = await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0")
    cluster = Cluster(coord, tmp_path)
    try:
        yield cluster, profile
    finally:
        await cluster.close()


async def test_bad_input_gets_json_errors_never_a_traceback(
    local: tuple[Cluster, Profile], tmp_path: Path
) -> None:
    cluster, profile = local
    await cluster.worker()
    completions = "/v1/chat/completions"
    async with (
        serve(cluster, profile, tmp_path, max_body_bytes=2048) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):

        def chat_with(**fields: Any) -> dict[str, Any]:
            return {"model": "auto", "messages": HELLO, **fields}

        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        cases: list[tuple[str, str, Any, int, str]] = [
            ("POST", completions, b"{", 400, "invalid_json"),
            ("POST", completions, b"[]", 400, "invalid_json"),
            ("POST", completions, b"", 400, "invalid_json"),
            ("POST", completions, b"[" * 1020 + b"]" * 1020, 400, "invalid_json"),
            ("POST", completions, {"model": "auto"}, 400, "invalid_request"),
            ("POST", completions, {"messages": HELLO}, 400, "invalid_request"),
            ("POST", completions, chat_with(model=7), 400, "invalid_request"),
            ("POST", completions, chat_with(messages=[{"role": "tool"}]), 400, "invalid_request"),
            ("POST", completions, chat_with(messages=image), 400, "unsupported_content"),
            ("POST", completions, chat_with(n=2), 400, "unsupported_parameter"),
            ("POST", completions, chat_with(n=True), 400, "unsupported_parameter"),
            ("POST", completions, chat_with(tools=[{}]), 400, "unsupported_parameter"),
            ("POST", completions, chat_with(stop=["\n"]), 400, "unsupported_parameter"),
            ("POST", completions, chat_with(max_tokens=-1), 400, "invalid_request"),
            ("POST", completions, chat_with(temperature=9), 400, "invalid_request"),
            ("POST", completions, chat_with(temperature=10**400), 400, "invalid_request"),
            ("POST", completions, chat_with(dispatch={"policy": "now"}), 400, "invalid_request"),
            ("POST", completions, chat_with(model="x" * 4000), 413, "request_too_large"),
            (
                "POST",
                "/v1/tasks/echo",
                {"input": 1, "input_base64": "AA=="},
                400,
                "invalid_request",
            ),
            ("POST", "/v1/tasks/echo", {"input_base64": "not base64!"}, 400, "invalid_request"),
            ("POST", "/v1/tasks/echo", {"colour": "red"}, 400, "invalid_request"),
            ("POST", "/v1/tasks/bad%20name", {}, 400, "invalid_request"),
            ("POST", "/v1/tasks/Echo", {}, 400, "invalid_request"),
            ("POST", "/v1/tasks/no_such_task", {}, 404, "task_not_found"),
            ("POST", "/v1/tasks/echo", {"max_price_micros": 999}, 400, "price_over_limit"),
            ("GET", completions, None, 405, "bad_method"),
            ("GET", "/v1/nothing", None, 404, "not_found"),
            ("POST", "/v1/tasks/echo/", {"input": "x"}, 404, "not_found"),  # no redirect
            ("POST", "/v1/tasks/echo", b'{"input": NaN}', 400, "invalid_json"),
            ("POST", "/v1/tasks/echo", b'{"input": {"a": -Infinity}}', 400, "invalid_json"),
            ("POST", "/v1/tasks/echo", b'{"input": 1e999}', 400, "invalid_json"),
        ]
        for method, path, body, status, code in cases:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body)
            r = await http.request(method, path, content=content)
            assert_error(r, status, code)
            assert "127.0.0.1" not in r.text  # the coordinator's address is not shown
        # the bounds hold for a body without Content-Length too
        chunks = [b'{"model": "auto", "messages": [', b'{"role": "user", "content": "', b"x" * 4000]

        async def body() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        r = await http.post(completions, content=body())
        assert_error(r, 413, "request_too_large")
        # a request line and headers beyond MAX_HEADER_BYTES: refused, not read whole
        status = await send_oversized_headers(served.url + "/v1/models", 16 * MAX_HEADER_BYTES)
        assert status.startswith(b"4") or status == b"reset", status
        # the same gateway still works
        r = await http.post("/v1/tasks/word_count", json={"input": "to be or not"})
        assert r.status_code == 200 and r.json()["output"]["words"] == 4
        assert "payment-response" not in r.headers  # payments are off: nothing was paid
        assert job_ids(cluster) == [r.headers["x-dispatch-job-id"]]
        # output JSON that no JSON answer can carry (NaN) comes back as its text
        r = await http.post("/v1/tasks/echo", json={"input": "NaN"})
        assert r.status_code == 200 and r.json()["output"] == "NaN", r.text


def test_a_conversation_is_bounded_before_it_is_sent() -> None:
    """At most 256 messages (the coordinator's default [limits] max_llm_messages): empty
    ones cost no characters but each costs the model its template's tokens (an anonymous
    caller held a worker for its whole time limit with 120,000 of them, and paid
    nothing, the job having failed)."""
    many = [{"role": "user", "content": ""}] * (protocol.MAX_LLM_MESSAGES + 1)
    with pytest.raises(HttpError) as refused:
        wire.parse_chat({"model": "auto", "messages": many})
    assert refused.value.status == 400 and refused.value.param == "messages"
    with pytest.raises(InvalidRequest, match="at most 256 messages"):
        llm_spec(many)
    assert wire.parse_chat({"model": "auto", "messages": many[:-1]})
    assert llm_spec(many[:-1]).llm is not None


async def test_requests_in_flight_are_bounded_and_a_caller_hanging_up_cancels_its_job(
    local: tuple[Cluster, Profile], tmp_path: Path
) -> None:
    cluster, profile = local
    await cluster.worker()
    async with (
        serve(cluster, profile, tmp_path, max_concurrent=1) as served,
        httpx.AsyncClient(base_url=served.url) as http,
    ):
        gateway = served.server.gateway
        slow = asyncio.create_task(http.post("/v1/tasks/sleep", json={"input": {"ms": 60000}}))
        await wait_until(lambda: bool(job_ids(cluster)), 10, "the slow job committed")
        assert gateway.running == 1
        r = await http.post("/v1/tasks/echo", json=ECHO)
        assert_error(r, 503, "overloaded")
        slow.cancel()  # the caller hangs up before the answer
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        (job_id,) = job_ids(cluster)

        async def cancelled() -> bool:
            return (await served.router.get_job(job_id)).state == types.JobState.CANCELLED

        await wait_until(cancelled, 10, "the job of the caller who left cancelled")
        await wait_until(lambda: gateway.running == 0, 10, "the request's slot freed")
        r = await http.post("/v1/tasks/echo", json=ECHO)
        assert r.status_code == 200 and r.json()["output"] == {"text": "hi"}


async def test_no_worker_is_503_and_an_unserved_model_404(
    local: tuple[Cluster, Profile], tmp_path: Path
) -> None:
    cluster, profile = local
    async with serve(cluster, profile, tmp_path) as served, httpx.AsyncClient() as http:
        client = chat(served.url, http)
        with pytest.raises(openai.APIStatusError) as unavailable:
            await client.chat.completions.create(model="auto", messages=HELLO)
        assert unavailable.value.status_code == 503
        body = unavailable.value.body
        assert isinstance(body, dict) and body["code"] == "no_capacity"
        assert body["reasons"] == [
            {
                "network": "local",
                "reason": "no_eligible_worker",
                "detail": "no connected worker can run it",
            }
        ]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-7", messages=HELLO)
        assert isinstance(missing.value.body, dict)
        assert missing.value.body["code"] == "model_not_found"
        with pytest.raises(openai.APIStatusError) as streaming:
            await client.chat.completions.create(model="auto", messages=HELLO, stream=True)
        assert streaming.value.status_code == 503
        assert (await client.models.list()).data == []
    assert job_ids(cluster) == []


async def test_no_coordinator_answering_is_503_without_its_address(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    router = gateway_router(make_profile(), [dead], key_file=tmp_path / "gateway.key")
    router.connect_timeout = 2
    async with GatewayServer(Gateway(router), log_level="warning") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            for r in (
                await http.get("/v1/models"),
                await http.get(f"/v1/models/{DEFAULT_MODEL_NAME}"),
                await http.post("/v1/tasks/echo", json={"input": "x"}),
            ):
                assert_error(r, 503, "coordinator_unavailable")
                assert dead not in r.text, r.text


async def test_the_hosted_fallback_answers_within_its_budget(
    local: tuple[Cluster, Profile], tmp_path: Path
) -> None:
    cluster, _ = local
    claude = AnthropicServer(reply="Hello there.")
    router = ComputeRouter(
        [Network("local", [cluster.address], RelayPayer())],
        key=KeyPair.generate(),
        hosted=[claude.provider()],
        prices=PRICES,
    )
    try:
        gateway = Gateway(router, hosted_budget_micros=1)
        async with (
            GatewayServer(gateway, log_level="warning") as server,
            httpx.AsyncClient() as http,
        ):
            client = chat(server.url, http)
            raw = await client.chat.completions.with_raw_response.create(
                model="auto",
                messages=HELLO,
            )
            completion = raw.parse()
            assert completion.choices[0].message.content == "Hello there."
            assert completion.model == CLAUDE
            info = (completion.model_extra or {})["dispatch"]
            assert info["route"] == "anthropic" and info["price"]["estimated"]
            assert info["receipt"] is None and "x-dispatch-receipt" not in raw.headers
            assert raw.headers["x-dispatch-route"] == "anthropic"
            assert gateway.hosted_spent_micros == info["price"]["amount_micros"] > 1
            # the budget is spent: no more hosted answers
            with pytest.raises(openai.APIStatusError) as spent:
                await client.chat.completions.create(model="auto", messages=HELLO)
            assert spent.value.status_code == 503
        assert len(claude.requests) == 1
    finally:
        claude.close()


async def test_dispatch_gateway_runs_as_a_process(
    local: tuple[Cluster, Profile], procs: Any, tmp_path: Path
) -> None:
    cluster, _ = local
    await cluster.worker()
    gw: Proc = procs(
        [
            "gateway",
            "--profile",
            "local",
            "--listen",
            "127.0.0.1:0",
            "--coordinator",
            cluster.address,
        ]
    )
    url = gw.info["listening"]
    assert gw.info["network"] == "local" and gw.info["coordinators"] == [cluster.address]
    assert gw.info["hosted"] == [] and gw.info["max_price_micros"] == 100_000
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/tasks/sha256", json={"input": "abc"})
        assert r.status_code == 200, r.text
        assert r.json()["dispatch"]["route"] == "dispatch"
        assert (await http.get("/v1/models")).json() == {"object": "list", "data": []}
    gw.p.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.p.wait, 20) == 0, gw.log.read_text()[-2000:]
