"""`dispatch mcp`, the MCP server, driven by the official `mcp` SDK's client over stdio (a
`dispatch mcp` subprocess) and over streamable HTTP (a free port), against a real
coordinator and workers (the embedded llama.cpp model for LLM jobs): the tools and their
schemas, results as structured content and text, receipts verified (and tampering caught),
tool errors for bad input, bearer-token auth, cancellation. Payments on anvil: a caller
paying through x402's MCP transport (x402's own MCP client), and the server's wallet."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from chain_fixtures import chain, chain_profile, cluster_for, home  # noqa: F401
from conftest import Cluster, make_profile, send_oversized_headers, wait_until
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult, TextContent
from test_payments import balance, new_payer
from test_sdk import embedded  # noqa: F401
from test_sdk_hosted import AnthropicServer
from x402 import x402Client
from x402.mcp import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY, x402MCPClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import ExactEvmClientScheme

from dispatchnet import keys
from dispatchnet.chains.evm.node import CHAIN_KEY_HEADER
from dispatchnet.coordinator.models import JobState
from dispatchnet.gateways import MAX_HEADER_BYTES
from dispatchnet.payments.wallet import Wallet
from dispatchnet.profiles import Profile
from dispatchnet.worker.executors import default_executors
from dispatchnet.worker.llm import DEFAULT_MODEL_NAME, EmbeddedLlama, LlmExecutor

TOOLS = {"run_llm", "run_task", "get_job", "verify_receipt", "list_workers"}
PRICE = 1000  # a CHEAP (auto) task on the test profiles, micro-USD = test USDC units


@pytest.fixture
def profile() -> Profile:
    # receipt batches close within 0.3 s, so Merkle proofs are there soon after a job
    return make_profile(receipts={"batch_max_age_seconds": 0.3})


async def desktop_worker(cluster: Cluster, embedded: EmbeddedLlama) -> str:  # noqa: F811
    """A desktop running the shipped model; its worker id."""
    executors = [*default_executors(), LlmExecutor(embedded, DEFAULT_MODEL_NAME)]
    return (await cluster.worker("desktop", executors=executors)).key.public_hex


def server_env(dispatch_home: Path) -> dict[str, str]:
    return {**os.environ, "DISPATCH_HOME": str(dispatch_home), "PYTHONUNBUFFERED": "1"}


def mcp_args(cluster: Cluster, *args: str, profile: str = "local") -> list[str]:
    return [
        "-m",
        "dispatchnet.cli",
        "mcp",
        "--profile",
        profile,
        "--coordinator",
        cluster.address,
        *args,
    ]


@contextlib.asynccontextmanager
async def stdio_server(
    dispatch_home: Path, args: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    """A `dispatch mcp` subprocess on stdio, and an MCP client on it (the SDK stops the
    process when the client closes)."""
    env = env or server_env(dispatch_home)
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with Client(params, read_timeout_seconds=120) as client:
        yield client


@contextlib.asynccontextmanager
async def http_server(dispatch_home: Path, args: list[str]) -> AsyncIterator[dict[str, Any]]:
    """A `dispatch mcp --transport http` subprocess on a free port; yields its JSON line
    (and the process, as "process")."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        "--transport",
        "http",
        "--listen",
        "127.0.0.1:0",
        env=server_env(dispatch_home),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "dispatch mcp ended before it listened"
        yield {**json.loads(line), "process": proc}
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def http_client(url: str, token: str = "") -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    transport = streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
    return Client(transport, read_timeout_seconds=120)


def text(result: CallToolResult, i: int = 0) -> str:
    block = result.content[i]
    assert isinstance(block, TextContent)
    return block.text


def data(result: CallToolResult) -> dict[str, Any]:
    assert result.structured_content is not None, text(result)
    assert json.loads(text(result, -1)) == result.structured_content  # the same JSON as text
    return result.structured_content


def required_of(result: CallToolResult) -> dict[str, Any]:
    """x402's PaymentRequired of a paid tool's answer: structured, and as the first text."""
    assert result.is_error and result.structured_content is not None
    assert json.loads(text(result)) == result.structured_content
    return result.structured_content


def tool_error(result: CallToolResult) -> tuple[str, str]:
    """(code, message) of a tool error."""
    assert result.is_error, text(result)
    error = data(result)["error"]
    assert text(result) == f"{error['code']}: {error['message']}"
    assert "Traceback" not in text(result)
    return str(error["code"]), str(error["message"])


def tampered(receipt: dict[str, str]) -> dict[str, str]:
    body = bytearray(base64.b64decode(receipt["body"]))
    body[10] ^= 0x01
    return {**receipt, "body": base64.b64encode(bytes(body)).decode()}


async def exercise(client: Client, seeker_id: str, desktop_id: str) -> None:
    """Every tool, and bad input to each, through one MCP client."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    task_schema = tools["run_task"].input_schema
    assert task_schema["required"] == ["name"]
    assert task_schema["properties"]["name"]["maxLength"] == 64
    assert task_schema["properties"]["policy"]["enum"] == ["auto", "fast", "cheap"]
    for name in ("run_llm", "run_task", "get_job", "verify_receipt", "list_workers"):
        properties = tools[name].input_schema["properties"].items()
        assert all(p.get("description") for k, p in properties if k != "messages"), name
    llm_schema = tools["run_llm"].input_schema["properties"]
    assert llm_schema["max_tokens"]["maximum"] == 4096
    assert tools["get_job"].annotations is not None and tools["get_job"].annotations.read_only_hint
    assert tools["run_task"].annotations is not None
    assert not tools["run_task"].annotations.read_only_hint

    # run_task echo: the output as text, the verified result as structured content
    echo = await client.call_tool("run_task", {"name": "echo", "input": {"a": 1}})
    assert not echo.is_error, text(echo)
    assert text(echo) == '{"a":1}'
    result = data(echo)
    assert result["route"] == "dispatch" and result["output"] == '{"a":1}'
    assert result["price"]["amount_micros"] == PRICE
    assert result["worker"]["worker_id"] in (seeker_id, desktop_id)
    assert result["paid_by"] == ""  # payments are off
    assert result["receipt_body"]["job_id"] == result["job_id"]
    job_id = result["job_id"]

    words = await client.call_tool("run_task", {"name": "word_count", "input": "to be or not"})
    assert json.loads(text(words)) == {"words": 4, "characters": 12}

    # run_llm on the desktop's embedded model
    tokens: list[str] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        tokens.append(message or "")

    llm = await client.call_tool(
        "run_llm",
        {"prompt": "Say hello.", "max_tokens": 8, "policy": "fast"},
        progress_callback=progress,
    )
    assert not llm.is_error, text(llm)
    reply = data(llm)
    assert text(llm) == reply["output"] and reply["output"]
    assert "".join(tokens) == reply["output"]  # streamed as progress notifications
    assert reply["route"] == "dispatch" and reply["worker"]["worker_id"] == desktop_id
    assert reply["usage"]["completion_tokens"] >= 1
    convo = await client.call_tool(
        "run_llm",
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a color."},
            ],
            "max_tokens": 4,
        },
    )
    assert not convo.is_error, text(convo)

    # get_job
    job = data(await client.call_tool("get_job", {"job_id": job_id}))
    assert job["state"] == "COMPLETED" and job["output"] == '{"a":1}'
    assert job["spec"] == {
        "kind": "task",
        "policy": "CHEAP",  # auto, resolved
        "privacy": "PUBLIC",
        "task": "echo",
        "input_bytes": 7,
        "use_llm": False,
    }
    assert job["receipt"]["body"] == result["receipt"]["body"]

    # verify_receipt: by job (with its Merkle proof), a receipt as given, a tampered one
    valid = await client.call_tool("verify_receipt", {"job_id": job_id, "check_proof": True})
    verdict = data(valid)
    assert verdict["valid"] and verdict["proof_checked"], verdict["problems"]
    assert verdict["body"]["job_id"] == job_id and verdict["proof"]["merkle_root"]
    assert text(valid).startswith(f"valid receipt of job {job_id}")
    given = data(await client.call_tool("verify_receipt", {"receipt": result["receipt"]}))
    assert given["valid"] and not given["proof_checked"]
    bad = await client.call_tool("verify_receipt", {"receipt": tampered(result["receipt"])})
    assert not bad.is_error  # a verdict, not a failure
    assert not data(bad)["valid"] and data(bad)["problems"]
    assert text(bad).startswith("INVALID receipt")
    other = await client.call_tool(
        "verify_receipt", {"receipt": result["receipt"], "coordinator_key": "ab" * 32}
    )
    assert not data(other)["valid"]

    # list_workers
    workers = data(await client.call_tool("list_workers", {}))
    assert workers["count"] == 2 and workers["by_kind"] == {"SEEKER": 1, "DESKTOP": 1}
    assert DEFAULT_MODEL_NAME in workers["llm_models"] and "echo" in workers["tasks"]
    assert len(data(await client.call_tool("list_workers", {"limit": 1}))["workers"]) == 1

    # bad input: tool errors, never tracebacks
    too_long = await client.call_tool("run_task", {"name": "x" * 65})
    code, message = tool_error(too_long)
    assert code == "invalid_request" and "name: String should have at most 64" in message
    code, message = tool_error(await client.call_tool("run_task", {"name": "echo", "policy": "x"}))
    assert code == "invalid_request" and message.startswith("run_task: invalid arguments: policy")
    code, message = tool_error(await client.call_tool("run_llm", {}))
    assert (code, message) == ("invalid_request", "give either prompt or messages")
    code, _ = tool_error(await client.call_tool("run_llm", {"prompt": "hi", "max_tokens": 10**6}))
    assert code == "invalid_request"
    bad_role = {"messages": [{"role": "tool", "content": "x"}]}
    assert tool_error(await client.call_tool("run_llm", bad_role))[0] == "invalid_request"
    code, message = tool_error(await client.call_tool("run_task", {"name": "no_such_task"}))
    assert code == "invalid_request" and "no_such_task" in message
    unknown = await client.call_tool("get_job", {"job_id": "job_nope"})
    assert tool_error(unknown)[0] == "not_found"
    # the coordinators' addresses are the operator's business: not in errors
    assert "127.0.0.1" not in message and "127.0.0.1" not in json.dumps(data(unknown))
    assert "127.0.0.1" not in tool_error(unknown)[1]
    assert tool_error(await client.call_tool("get_job", {"job_id": "j" * 65}))[0] == (
        "invalid_request"
    )
    b64 = await client.call_tool("run_task", {"name": "echo", "input_base64": "%%%"})
    assert tool_error(b64) == ("invalid_request", "input_base64 is not base64")
    both = await client.call_tool("verify_receipt", {})
    assert tool_error(both) == ("invalid_request", "give either job_id or receipt")
    garbage = await client.call_tool("verify_receipt", {"receipt": {"body": "!!"}})
    assert tool_error(garbage)[0] == "invalid_request"
    assert (await client.call_tool("no_such_tool", {})).is_error


async def test_stdio_serves_every_tool(
    cluster: Cluster,
    embedded: EmbeddedLlama,  # noqa: F811
    tmp_path: Path,
) -> None:
    seeker = await cluster.worker()
    desktop_id = await desktop_worker(cluster, embedded)
    async with stdio_server(tmp_path, mcp_args(cluster)) as client:
        assert client.server_info is not None and client.server_info.name == "dispatch"
        await exercise(client, seeker.key.public_hex, desktop_id)


async def test_streamable_http_serves_every_tool(
    cluster: Cluster,
    embedded: EmbeddedLlama,  # noqa: F811
    tmp_path: Path,
) -> None:
    seeker = await cluster.worker()
    desktop_id = await desktop_worker(cluster, embedded)
    async with http_server(tmp_path, mcp_args(cluster)) as info:
        assert info["mcp"].startswith("http://127.0.0.1:") and info["mcp"].endswith("/mcp")
        assert info["callers_pay"] and info["wallet"] is None  # the local profile has none
        async with http_client(info["mcp"]) as client:
            await exercise(client, seeker.key.public_hex, desktop_id)
        # the SDK's DNS-rebinding check: a foreign Host is refused; that answer, and the
        # other plain-text ones of the SDK and Starlette, go out as JSON like the rest
        async with httpx.AsyncClient() as h:
            r = await h.post(info["mcp"], json={}, headers={"Host": "evil.example"})
            assert r.status_code in (400, 403, 421)
            for answer in (r, await h.get(info["mcp"].replace("/mcp", "/nothing"))):
                assert answer.status_code >= 400, answer
                assert answer.headers["content-type"] == "application/json", answer.text
                assert answer.json()["error"]["code"] and answer.json()["error"]["message"]


async def test_http_needs_a_token_off_loopback_and_checks_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *mcp_args(cluster, "--transport", "http", "--listen", "0.0.0.0:0"),
        env=server_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and not out
    assert "needs a bearer token (--token-file)" in err.decode()

    await cluster.worker()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    async with http_server(tmp_path, mcp_args(cluster, "--token-file", str(token_file))) as info:
        async with httpx.AsyncClient() as h:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = await h.post(info["mcp"], json={}, headers=headers)
                assert r.status_code == 401
                assert r.json()["error"]["code"] == "unauthenticated"
                assert r.headers["www-authenticate"].startswith("Bearer")
        async with http_client(info["mcp"], "s3cret-token") as client:
            echo = await client.call_tool("run_task", {"name": "echo", "input": "hi"})
            assert text(echo) == "hi"
        # headers past MAX_HEADER_BYTES are refused before the token is looked at, not
        # read whole (the token guards the app, not the HTTP parser)
        status = await send_oversized_headers(info["mcp"], 16 * MAX_HEADER_BYTES)
        assert status.startswith(b"4") or status == b"reset", status


async def test_the_hosted_fallback_only_when_asked_for(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.worker()  # a seeker: no desktop, so no LLM on the network
    claude = AnthropicServer()
    env = {k: v for k, v in server_env(tmp_path).items() if not k.startswith("OPENAI_")}
    env |= {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": claude.url}
    prompt = {"prompt": "What is the capital of France?", "max_tokens": 16}
    try:
        async with stdio_server(tmp_path, mcp_args(cluster), env) as client:
            code, message = tool_error(await client.call_tool("run_llm", prompt))
            assert code == "no_capacity" and "no_eligible_worker" in message
        assert claude.requests == []
        async with stdio_server(tmp_path, mcp_args(cluster, "--hosted"), env) as client:
            hosted = await client.call_tool("run_llm", prompt)
            assert text(hosted) == claude.reply
            result = data(hosted)
            assert result["route"] == "anthropic" and result["paid_by"] == "server"
            assert result["price"]["estimated"] and result["receipt"] is None
            assert result["skipped"][0]["reason"] == "no_eligible_worker"
        assert len(claude.requests) == 1
    finally:
        claude.close()


def job_states(cluster: Cluster) -> list[str]:
    with sqlite3.connect(cluster.coord.store.path) as db:
        return [JobState(row[0]).name for row in db.execute("SELECT state FROM jobs")]


async def test_a_cancelled_call_cancels_its_job(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.worker()
    async with stdio_server(tmp_path, mcp_args(cluster)) as client:
        call = asyncio.create_task(
            client.call_tool("run_task", {"name": "sleep", "input": {"ms": 20000}})
        )
        await wait_until(lambda: job_states(cluster) == ["RUNNING"], 15, "the job running")
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        await wait_until(lambda: job_states(cluster) == ["CANCELLED"], 15, "the job cancelled")
        # the session still works
        assert text(await client.call_tool("run_task", {"name": "echo", "input": "x"})) == "x"


async def test_sigterm_cancels_the_jobs_in_flight(cluster: Cluster, tmp_path: Path) -> None:
    """Stopping the server with calls open: their jobs are cancelled (never charged), and
    the process exits at once, on either transport."""
    await cluster.worker()
    sleep = {"name": "run_task", "arguments": {"name": "sleep", "input": {"ms": 30000}}}

    # stdio, spoken by hand: JSON-RPC messages, one per line
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *mcp_args(cluster),
        env=server_env(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}}
        hello["clientInfo"] = {"name": "test", "version": "1"}
        for message in (
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": sleep},
        ):
            proc.stdin.write(json.dumps(message).encode() + b"\n")
        await proc.stdin.drain()
        initialized = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert initialized["result"]["serverInfo"]["name"] == "dispatch"
        await wait_until(lambda: job_states(cluster) == ["RUNNING"], 15, "the job running")
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert job_states(cluster) == ["CANCELLED"]

    # streamable HTTP
    async with http_server(tmp_path, mcp_args(cluster)) as info:
        try:
            async with http_client(info["mcp"]) as client:
                call = asyncio.create_task(client.call_tool(sleep["name"], sleep["arguments"]))
                running = ["CANCELLED", "RUNNING"]
                await wait_until(lambda: sorted(job_states(cluster)) == running, 15, "running")
                info["process"].terminate()
                assert await asyncio.wait_for(info["process"].wait(), 15) == 0
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(call, 5)
        except* AssertionError:
            raise
        except* Exception:
            pass  # the client's transport fails as the server goes away
    assert job_states(cluster) == ["CANCELLED", "CANCELLED"]


# --- payments on anvil ---------------------------------------------------------------------


@pytest.fixture
async def paid(home: Path, chain: dict[str, Any], tmp_path: Path) -> AsyncIterator[Cluster]:  # noqa: F811
    """A paying coordinator (x402 on the module's anvil) with one seeker."""
    profile = chain_profile(str(home / "chains" / "local-monad.json"), payments={})
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        assert cluster.coord.payments is not None
        cluster.coord.payments.retry_initial, cluster.coord.payments.retry_max = 0.1, 0.3
        await cluster.worker()
        yield cluster


def x402_client(payer: Wallet, chain: dict[str, Any]) -> x402Client:  # noqa: F811
    """x402's async client with the EVM exact scheme, allowed to pay the test USDC."""
    client = x402Client()
    client.register("eip155:*", ExactEvmClientScheme(EthAccountSigner(payer.account)))
    usdc = chain["contracts"]["usdc"]
    return client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": chain["network"], "asset": usdc, "max_amount_per_payment": "100000"}
            ]
        }
    )


class V1Results:
    """x402's MCP client (x402MCPClient, x402 2.25) calls `call_tool(params, **options)` on
    the MCP client it wraps and reads results by mcp 1.x names (isError, structuredContent,
    _meta); mcp 2.x's Client takes name and arguments and names them is_error,
    structured_content, meta. This adapts one to the other, nothing more."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call_tool(
        self, params: dict[str, Any], read_timeout_seconds: Any = None, **_: Any
    ) -> SimpleNamespace:
        if isinstance(read_timeout_seconds, timedelta):
            read_timeout_seconds = read_timeout_seconds.total_seconds()
        r = await self.client.call_tool(
            params["name"],
            params.get("arguments"),
            read_timeout_seconds=read_timeout_seconds,
            meta=params.get("_meta"),
        )
        return SimpleNamespace(
            content=[c.model_dump(by_alias=True, exclude_none=True) for c in r.content],
            isError=r.is_error,
            structuredContent=r.structured_content,
            _meta=r.meta or {},
        )


async def settled(client: Client, job_id: str) -> dict[str, Any]:
    payment: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal payment
        payment = data(await client.call_tool("get_job", {"job_id": job_id}))["payment"]
        return payment.get("status") == "settled"

    await wait_until(done, 30, "the payment settled")
    return payment


async def test_a_caller_pays_through_x402s_mcp_transport(
    paid: Cluster,
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
) -> None:
    payer = new_payer(chain)
    start = balance(chain, payer.address)
    args = mcp_args(paid, "--no-wallet", profile="local-monad")
    async with http_server(home, args) as info:
        assert info["callers_pay"] and info["wallet"] is None and info["network"] == "monad"
        async with http_client(info["mcp"]) as client:
            # unpaid: x402's PaymentRequired, the coordinator's own requirements
            asked = await client.call_tool("run_task", {"name": "echo", "input": "paid"})
            assert asked.is_error
            required = required_of(asked)
            assert required["x402Version"] == 2 and required["error"] == "payment_required"
            assert required["resource"]["url"] == "mcp://tool/run_task"
            (offer,) = required["accepts"]
            assert offer["amount"] == str(PRICE) and offer["network"] == chain["network"]
            assert offer["payTo"] == chain["accounts"]["coordinator"]["address"]
            assert "payment required" in text(asked, 1)
            assert balance(chain, payer.address) == start  # nothing was committed

            # x402's MCP client pays and calls again
            x402_mcp = x402MCPClient(V1Results(client), x402_client(payer, chain))
            done = await x402_mcp.call_tool("run_task", {"name": "echo", "input": "paid"})
            assert done.payment_made and not done.is_error, done.content
            assert done.content[0]["text"] == "paid"
            response = done.payment_response
            assert response is not None
            assert response.success and response.payer == payer.address
            assert response.amount == str(PRICE) and response.network == chain["network"]
            assert response.extra is not None and response.extra["status"] == "authorized"
            result = json.loads(done.content[-1]["text"])
            assert result["paid_by"] == "caller"
            assert result["payment"]["payer"] == payer.address
            assert result["receipt_body"]["payment"]["payer"] == payer.address
            settlement = await settled(client, result["job_id"])
            assert settlement["transaction"].startswith("0x")
            assert balance(chain, payer.address) == start - PRICE

            # the same payment again: refused, answered with x402's PaymentRequired
            payload = await x402_client(payer, chain).create_payment_payload(
                _payment_required(required)
            )
            meta = {MCP_PAYMENT_META_KEY: payload.model_dump(by_alias=True, exclude_none=True)}
            first = await client.call_tool("run_task", {"name": "echo", "input": "a"}, meta=meta)
            assert not first.is_error and first.meta is not None
            assert first.meta[MCP_PAYMENT_RESPONSE_META_KEY]["success"]
            again = await client.call_tool("run_task", {"name": "echo", "input": "b"}, meta=meta)
            assert required_of(again)["error"] == "payment_already_used"
            assert required_of(again)["accepts"][0]["payTo"] == offer["payTo"]
            # a payment that is not an x402 payload is a tool error
            junk = {MCP_PAYMENT_META_KEY: {"x402Version": 2}}
            code, _ = tool_error(await client.call_tool("run_task", {"name": "echo"}, meta=junk))
            assert code == "invalid_request"
    await settled_balance(chain, payer.address, start - 2 * PRICE)


def _payment_required(required: dict[str, Any]) -> Any:
    from x402.schemas import PaymentRequired

    return PaymentRequired.model_validate(required)


async def settled_balance(chain: dict[str, Any], address: str, expected: int) -> None:  # noqa: F811
    await wait_until(lambda: balance(chain, address) == expected, 30, "the balance on chain")


async def test_the_servers_wallet_pays_for_clients_that_cannot(
    paid: Cluster,
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
) -> None:
    payer = new_payer(chain)  # the server's own wallet, a key file of the CLI's format
    key_file = home / f"mcp-wallet-{payer.address}.key"
    key_file.write_text(f"{CHAIN_KEY_HEADER}\n0x{bytes(payer.account.key).hex()}\n")
    wallet = payer.address
    start = balance(chain, wallet)
    budget = str(PRICE + PRICE // 2)
    args = mcp_args(paid, "--budget", budget, "--wallet-key", str(key_file), profile="local-monad")
    async with stdio_server(home, args) as client:
        first = await client.call_tool("run_task", {"name": "echo", "input": "on the house"})
        assert not first.is_error, text(first)
        assert text(first) == "on the house"
        assert MCP_PAYMENT_RESPONSE_META_KEY not in (first.meta or {})  # the caller paid nothing
        result = data(first)
        assert result["paid_by"] == "server" and result["payment"]["payer"] == wallet
        # the budget: a second job would pass it; refused before paying
        over = await client.call_tool("run_task", {"name": "echo", "input": "more"})
        code, message = tool_error(over)
        assert code == "spending_limit_exceeded" and "session limit" in message
        assert data(over)["error"]["scope"] == "session"
        capped = await client.call_tool(
            "run_task", {"name": "echo", "input": "x", "max_price_micros": PRICE - 1}
        )
        assert data(capped)["error"]["scope"] == "job"
        await settled(client, result["job_id"])
    assert balance(chain, wallet) == start - PRICE


async def test_a_key_file_is_the_servers_identity(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.worker()
    key_file = tmp_path / "mcp.key"
    key = keys.load_or_create(key_file)
    args = mcp_args(cluster, "--key-file", str(key_file))
    async with http_server(tmp_path, args) as info:
        assert info["client_id"] == key.public_hex
