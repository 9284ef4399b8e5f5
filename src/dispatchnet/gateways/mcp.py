"""The MCP server: the Dispatch network as MCP tools (the official `mcp` SDK), a thin layer
over ComputeRouter. README "MCP" is the manual.

Tools: run_llm, run_task (paid), get_job, verify_receipt, list_workers (free). Every
result is structured content plus text (the output first, then the same JSON); every
failure is a tool error (isError) with `{"error": {"code", "message", ...}}`, never a
traceback. Arguments are bounded by the input schemas (and checked again here).

Who pays for a job (README "MCP", payment):
- a call that carries a payment in `_meta["x402/payment"]` (x402's MCP transport) is paid
  by its caller: the payment, signed for the coordinator's own requirements, is relayed
  as CommitJob's payment-signature (sdk.RelayedPayment). The server holds no money: the
  coordinator verifies it, settles it only once a worker completed the job, and the
  receipt names the caller as payer;
- a call without one is paid from the server's wallet (the profile's [wallet], or
  --wallet-key) within the server's limits; with no wallet (or --no-wallet) it is answered
  with x402's PaymentRequired (isError, the coordinator's `accepts`), so an x402 client
  signs and calls again.
A refused caller payment is answered the same way (its `error` says why); it never falls
back to the server's wallet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

import anyio
import betterproto
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError
from x402.mcp.constants import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY
from x402.schemas import PaymentRequired, ResourceInfo, SettleResponse

from dispatchnet import __version__, protocol
from dispatchnet.gateways import without_addresses
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import LimitsConfig
from dispatchnet.sdk import (
    ComputeResult,
    ComputeRouter,
    DispatchError,
    Expected,
    InvalidRequest,
    Network,
    PaymentError,
    PaymentRejected,
    ReceiptInvalid,
    RelayedPayment,
    SpendingLimits,
    llm_spec,
    task_spec,
    types,
    verify_receipt,
)

log = logging.getLogger("dispatch.mcp")

SERVER_NAME = "dispatch"
# Bounds of the tools' arguments: the coordinator's default [limits] (it checks its own)
# and the protocol's limits.
_LIMITS = LimitsConfig()
MAX_PROMPT_CHARS = _LIMITS.max_prompt_chars  # the prompt and all messages together
MAX_MESSAGES = _LIMITS.max_llm_messages
MAX_NAME_CHARS = 64  # task names, as workers announce them
MAX_MODEL_CHARS = 128
MAX_TOKENS = _LIMITS.max_llm_tokens
MAX_INPUT_BYTES = _LIMITS.max_task_input_bytes
MAX_WASM_BYTES = _LIMITS.max_wasm_module_bytes
MAX_ID_CHARS = protocol.MAX_ID_CHARS
MAX_TIMEOUT_SECONDS = 600.0
MAX_PROOF_WAIT_SECONDS = 60.0
MAX_LISTED_WORKERS = 500


def _b64_chars(n: int) -> int:
    """The base64 length of n bytes."""
    return 4 * ((n + 2) // 3)


UNPAID = ("", "none")
T = TypeVar("T")

Policy = Annotated[
    Literal["auto", "fast", "cheap"],
    Field(description="auto (LLM jobs run fast, tasks cheap), fast or cheap; sets the price"),
]
Privacy = Annotated[
    Literal["public", "private"],
    Field(description="private: only workers paired with this server's client key run it"),
]
MaxPrice = Annotated[
    int | None,
    Field(
        ge=0,
        description="refuse (before paying) when the job costs more than this many micro-USD "
        "(1 USD = 1000000); the server's own limit applies too",
    ),
]
Timeout = Annotated[
    float,
    Field(
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        description="seconds until the job is cancelled (not charged) if it has not finished",
    ),
]
JobId = Annotated[
    str, Field(min_length=1, max_length=MAX_ID_CHARS, description="a job id (job_...)")
]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ReceiptIn(BaseModel):
    """A Dispatch receipt as run_llm / run_task / get_job return it (bytes in base64)."""

    body: Annotated[
        str,
        Field(
            min_length=1,
            max_length=_b64_chars(protocol.MAX_RECEIPT_BODY_BYTES),
            description="the signed ReceiptBody bytes, base64",
        ),
    ]
    worker_signature: Annotated[
        str, Field(max_length=_b64_chars(protocol.MAX_SIGNATURE_BYTES), description="base64")
    ] = ""
    coordinator_signature: Annotated[
        str, Field(max_length=_b64_chars(protocol.MAX_SIGNATURE_BYTES), description="base64")
    ] = ""
    receipt_sha256: Annotated[str, Field(max_length=64, description="base64 (not checked)")] = ""


@dataclass(frozen=True)
class McpSettings:
    """What `dispatch mcp` serves.

    network: the profile's network: its coordinators, and the wallet that pays for calls
    that carry no x402 payment (None: their callers are asked to pay). max_price_micros:
    the most one job may cost, whoever pays. budget_micros: the most the server itself
    spends while it runs (its wallet's payments and hosted estimates; None: no limit).
    hosted: allow the SDK's hosted fallback (the operator's API keys, from the
    environment) for calls that carry no x402 payment, within the budget."""

    network: Network
    key: KeyPair
    max_price_micros: int | None = 100_000
    budget_micros: int | None = 1_000_000
    hosted: bool = False

    @property
    def wallet_pays(self) -> bool:
        return self.network.wallet is not None


class DispatchMcp:
    """The tools, over two ComputeRouters with one client key (so the same jobs):

    - `own`: calls that carry no payment: paid from the server's wallet within its budget,
      or (without one) answered with the payment the caller must make; the hosted
      fallback, when enabled, runs here only;
    - `relay`: calls that carry the caller's x402 payment. Its network has no wallet and
      its session has no budget: the caller's money never counts against the server's,
      and a caller's payment never falls back to the server's wallet.
    """

    def __init__(self, settings: McpSettings) -> None:
        self.settings = settings
        net = settings.network
        per_job = settings.max_price_micros
        self.own = ComputeRouter(
            [net],
            key=settings.key,
            hosted=None if settings.hosted else [],
            limits=SpendingLimits(per_job, settings.budget_micros),
            decentralized_only=not settings.hosted,
        )
        callers = Network(
            net.name, net.coordinators, None, net.coordinator_key, net.coordinator_keys
        )
        self.relay = ComputeRouter(
            [callers],
            key=settings.key,
            hosted=[],
            limits=SpendingLimits(per_job, None),
            decentralized_only=True,
        )
        self._inflight: set[asyncio.Future[Any]] = set()
        self._stopping = False
        self.server = _Server(
            SERVER_NAME,
            title="Dispatch compute network",
            instructions=INSTRUCTIONS,
            version=__version__,
            log_level="WARNING",
        )
        self._register()

    async def close(self) -> None:
        await self.own.close()
        await self.relay.close()

    # --- the tools --------------------------------------------------------------------------

    def _register(self) -> None:
        paid = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True)
        read = ToolAnnotations(read_only_hint=True, open_world_hint=True)
        add = self.server.add_tool
        add(self.run_llm, name="run_llm", description=RUN_LLM, annotations=paid)
        add(self.run_task, name="run_task", description=RUN_TASK, annotations=paid)
        add(self.get_job, name="get_job", description=GET_JOB, annotations=read)
        add(self.verify_receipt, name="verify_receipt", description=VERIFY, annotations=read)
        add(self.list_workers, name="list_workers", description=LIST_WORKERS, annotations=read)

    async def run_llm(
        self,
        ctx: Context,
        prompt: Annotated[
            str | None,
            Field(max_length=MAX_PROMPT_CHARS, description="the user's message (or give messages)"),
        ] = None,
        messages: Annotated[
            list[ChatMessage] | None,
            Field(max_length=MAX_MESSAGES, description="a conversation instead of prompt"),
        ] = None,
        model: Annotated[
            str | None,
            Field(
                max_length=MAX_MODEL_CHARS,
                description="a model a connected desktop serves (list_workers); "
                "omitted: any desktop's model",
            ),
        ] = None,
        max_tokens: Annotated[
            int, Field(ge=0, le=MAX_TOKENS, description="0: the coordinator's default")
        ] = 0,
        temperature: Annotated[
            float, Field(ge=0.0, le=2.0, description="sampling temperature; 0 is greedy")
        ] = 0.0,
        policy: Policy = "auto",
        privacy: Privacy = "public",
        max_price_micros: MaxPrice = None,
        timeout_seconds: Timeout = 300.0,
    ) -> CallToolResult:
        def spec() -> types.JobSpec:
            if (prompt is None) == (messages is None):
                raise InvalidRequest("give either prompt or messages")
            if messages is not None:
                chars = sum(len(m.content) for m in messages)
                if chars > MAX_PROMPT_CHARS:
                    raise InvalidRequest(
                        f"messages have {chars} characters; the limit is {MAX_PROMPT_CHARS}"
                    )
                convo = [{"role": m.role, "content": m.content} for m in messages]
                return llm_spec(convo, model, max_tokens, temperature, policy, privacy)
            return llm_spec(prompt or "", model, max_tokens, temperature, policy, privacy)

        return await self._run("run_llm", ctx, spec, max_price_micros, timeout_seconds)

    async def run_task(
        self,
        ctx: Context,
        name: Annotated[
            str,
            Field(
                min_length=1,
                max_length=MAX_NAME_CHARS,
                description="a task connected workers run (list_workers): echo, sha256, "
                "word_count, sleep, summarize, classify, extract_json, wasm, ...",
            ),
        ],
        input: Annotated[
            str | int | float | bool | list[Any] | dict[str, Any] | None,
            Field(
                description="the task's input: a string is sent as its UTF-8 text, any "
                'other JSON value as compact JSON (e.g. {"text": "..."} for summarize)'
            ),
        ] = "",
        input_base64: Annotated[
            str | None,
            Field(
                max_length=_b64_chars(MAX_INPUT_BYTES),
                description="raw input bytes in base64, instead of input",
            ),
        ] = None,
        wasm_base64: Annotated[
            str | None,
            Field(
                max_length=_b64_chars(MAX_WASM_BYTES),
                description='a WebAssembly module (binary, base64) to run; name must be "wasm"',
            ),
        ] = None,
        use_llm: Annotated[
            bool, Field(description="run a text task with a desktop's LLM instead")
        ] = False,
        policy: Policy = "auto",
        privacy: Privacy = "public",
        max_price_micros: MaxPrice = None,
        timeout_seconds: Timeout = 300.0,
    ) -> CallToolResult:
        def spec() -> types.JobSpec:
            data: bytes | str | object = input  # str: UTF-8; anything else: JSON
            if input_base64 is not None:
                if input != "":
                    raise InvalidRequest("give input or input_base64, not both")
                data = _b64("input_base64", input_base64)
            module = None if wasm_base64 is None else _b64("wasm_base64", wasm_base64)
            built = task_spec(name, data, policy, privacy, use_llm, module)
            if len(built.task.input) > MAX_INPUT_BYTES:
                raise InvalidRequest(
                    f"the input is {len(built.task.input)} bytes; the limit is {MAX_INPUT_BYTES}"
                )
            return built

        return await self._run("run_task", ctx, spec, max_price_micros, timeout_seconds)

    async def get_job(self, job_id: JobId) -> CallToolResult:
        async def call() -> CallToolResult:
            job = await self.relay.get_job(job_id)
            view = job_view(job)
            text = view.pop("output_text", None)
            return ok(view, text if isinstance(text, str) else None)

        return await _guarded("get_job", call, self.settings.network.coordinators)

    async def verify_receipt(
        self,
        job_id: Annotated[
            str | None,
            Field(
                max_length=MAX_ID_CHARS,
                description="verify the receipt of this job (one this server ran), also "
                "checking it is that job's receipt",
            ),
        ] = None,
        receipt: Annotated[
            ReceiptIn | None,
            Field(description="or verify this receipt (as run_* and get_job return it)"),
        ] = None,
        check_proof: Annotated[
            bool,
            Field(
                description="with job_id: also fetch and check the receipt's Merkle inclusion "
                "proof (its batch closes within seconds of the job)"
            ),
        ] = False,
        proof_wait_seconds: Annotated[
            float,
            Field(ge=0, le=MAX_PROOF_WAIT_SECONDS, description="how long to wait for the proof"),
        ] = 15.0,
        coordinator_key: Annotated[
            str | None,
            Field(
                pattern="^[0-9a-fA-F]{64}$",
                description="require the coordinator countersignature of this ed25519 key (hex)",
            ),
        ] = None,
    ) -> CallToolResult:
        async def call() -> CallToolResult:
            if (job_id is None) == (receipt is None):
                raise InvalidRequest("give either job_id or receipt")
            key: bytes | frozenset[bytes] = (
                bytes.fromhex(coordinator_key) if coordinator_key else b""
            )
            key = key or self.settings.network.pinned_keys
            if receipt is not None:
                if check_proof:
                    raise InvalidRequest("check_proof needs job_id")
                check = verify_receipt(_receipt(receipt), expected_coordinator_key=key)
                return verdict(check.problems, check.body, False)
            assert job_id is not None
            job = await self.relay.get_job(job_id)
            if job.receipt is None or not job.receipt.body:
                raise InvalidRequest(f"job {job_id} has no receipt ({job.state.name})")
            expected = Expected(
                job_id=job.job_id,
                client_id=self.relay.client_id,
                output=job.result.output if job.result is not None else b"",
                worker_id=job.worker_id,
            )
            check = verify_receipt(job.receipt, expected_coordinator_key=key, expected=expected)
            problems = list(check.problems)
            proof: types.GetReceiptProofResponse | None = None
            if check_proof:
                try:
                    proof = await self.relay.receipt_proof(job_id, wait=proof_wait_seconds)
                except ReceiptInvalid as e:
                    problems += e.problems
            return verdict(problems, check.body, check_proof, proof)

        return await _guarded("verify_receipt", call, self.settings.network.coordinators)

    async def list_workers(
        self,
        limit: Annotated[
            int,
            Field(ge=0, le=MAX_LISTED_WORKERS, description="list at most this many workers"),
        ] = 20,
    ) -> CallToolResult:
        async def call() -> CallToolResult:
            workers = await self.relay.list_workers()
            return ok(workers_view(workers, limit))

        return await _guarded("list_workers", call, self.settings.network.coordinators)

    async def drain(self, within: float) -> None:
        """The server is stopping: cancels the calls in flight (each answers with a
        server_stopping tool error) and waits, at most `within` seconds, for the SDK to
        cancel their jobs (uncharged) at the coordinator."""
        self._stopping = True
        for task in self._inflight:
            task.cancel()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=within)

    # --- running a job ----------------------------------------------------------------------

    async def _detached(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs coro in its own task. When the MCP request is cancelled, that task is
        cancelled once and awaited shielded, so the SDK can cancel the job (uncharged) on the
        way out: an anyio cancel scope would cancel every await of that cleanup."""
        if self._stopping:
            coro.close()
            raise ServerStopping("the server is stopping; try again later")
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # drain() cancelled the job, not the caller: answer them
                raise ServerStopping(
                    "the server is stopping; the job was cancelled (not charged)"
                ) from None
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
            raise

    async def _run(
        self,
        tool: str,
        ctx: Context,
        spec: Callable[[], types.JobSpec],
        max_price_micros: int | None,
        timeout_seconds: float,
    ) -> CallToolResult:
        """Runs the job on the router of whoever pays (see DispatchMcp); LLM tokens and task
        progress go out as progress notifications when the caller asked for them."""

        async def call() -> CallToolResult:
            job = spec()
            payment = _payment_meta(ctx)
            relay: RelayedPayment | None = None
            router, paid_by = self.own, "server"
            if payment is not None:  # the caller pays: relayed, on the router with no wallet
                relay, router, paid_by = RelayedPayment.from_payload(payment), self.relay, "caller"
            elif not self.settings.wallet_pays:  # ask the caller (when the network wants pay)
                relay, paid_by = RelayedPayment(), "caller"
            options: dict[str, Any] = {"timeout": timeout_seconds}
            if max_price_micros is not None:
                options["max_price_micros"] = max_price_micros
            if relay is not None:
                options["payer"] = relay
            try:
                result = await self._detached(self._stream(router, job, ctx, options))
            except PaymentError as e:
                if relay is None or relay.required is None:
                    raise
                reason = e.reason if isinstance(e, PaymentRejected) else ""
                return payment_required(tool, relay.required, reason or relay.required.error or "")
            if result.route != "dispatch":
                paid_by = "server"  # the hosted fallback bills the operator's API key
            elif not _charged(result):
                paid_by = ""
            return run_result(result, paid_by, relay)

        return await _guarded(tool, call, self.settings.network.coordinators)

    @staticmethod
    async def _stream(
        router: ComputeRouter, spec: types.JobSpec, ctx: Context, options: dict[str, Any]
    ) -> ComputeResult:
        async with router.stream(spec, **options) as stream:
            n = 0
            async for piece in stream:
                n += 1
                await ctx.report_progress(n, None, piece)  # a no-op unless asked for
            return stream.result


class ServerStopping(DispatchError):
    """The MCP server is shutting down (its job, if any, was cancelled: not charged)."""

    code = "server_stopping"
    http_status = 503


class _Server(MCPServer):
    """MCPServer whose argument errors read as one line per argument (not pydantic's)."""

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context | None = None
    ) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if not isinstance(cause, ValidationError):
                raise
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in cause.errors()
            )
            return error_result(InvalidRequest(f"{name}: invalid arguments: {problems}"))


# --- results ----------------------------------------------------------------------------------


def ok(
    data: dict[str, Any], text: str | None = None, meta: dict[str, Any] | None = None
) -> CallToolResult:
    """A tool result: `data` as structured content and as JSON text, after `text`."""
    content: list[ContentBlock] = [] if text is None else [TextContent(type="text", text=text)]
    content.append(TextContent(type="text", text=json.dumps(data)))
    return CallToolResult(content=content, structured_content=data, _meta=meta)


def error_result(e: DispatchError, addresses: Sequence[str] = ()) -> CallToolResult:
    """A tool error: the SDK error's code and message, then its JSON body (also the
    structured content); the coordinators' addresses are not named (see
    without_addresses)."""
    body = without_addresses(e.to_dict(), addresses)
    result = ok(body, without_addresses(f"{e.code}: {e.message}", addresses))
    result.is_error = True
    return result


def payment_required(tool: str, asked: PaymentRequired, error: str) -> CallToolResult:
    """x402's MCP answer to a call that needs a (good) payment: isError, with an x402
    PaymentRequired (the coordinator's `accepts`, this tool as the resource) as structured
    content and as JSON text; a second text says it in words."""
    required = PaymentRequired(
        x402_version=2,
        error=error or "payment_required",
        resource=ResourceInfo(
            url=f"mcp://tool/{tool}",
            description=f"Dispatch {tool}: the job's price, paid to the coordinator",
            mime_type="application/json",
        ),
        accepts=asked.accepts,
    )
    data = required.model_dump(by_alias=True, exclude_none=True)
    offers = "; ".join(
        f"{a.amount} atomic units of {a.asset} on {a.network} to {a.pay_to}" for a in asked.accepts
    )
    words = (
        f"payment required ({data['error']}): this job costs {offers}. An x402 client pays "
        f'by calling again with the payment in _meta["{MCP_PAYMENT_META_KEY}"]; or start '
        "the server with a wallet to pay for its callers."
    )
    return CallToolResult(
        content=[
            TextContent(type="text", text=json.dumps(data)),
            TextContent(type="text", text=words),
        ],
        structured_content=data,
        is_error=True,
    )


def run_result(result: ComputeResult, paid_by: str, relay: RelayedPayment | None) -> CallToolResult:
    """run_llm / run_task: the output as text, the ComputeResult as structured content,
    and x402's payment response in _meta when the caller's payment was taken."""
    data = result.to_dict()
    data["paid_by"] = paid_by
    try:
        result.output_bytes.decode()
    except UnicodeDecodeError:
        data["output_base64"] = base64.b64encode(result.output_bytes).decode()
    meta = None
    payment = result.payment
    if relay is not None and relay.sent and payment is not None and paid_by == "caller":
        response = SettleResponse(
            success=True,
            payer=payment.payer,
            transaction=payment.transaction,
            network=payment.network,
            amount=payment.amount,
            extra={"status": payment.status, "jobId": result.job_id},
        )
        meta = {
            MCP_PAYMENT_RESPONSE_META_KEY: response.model_dump(by_alias=True, exclude_none=True)
        }
    return ok(data, result.output, meta)


def job_view(job: types.Job) -> dict[str, Any]:
    """get_job's answer: the job without its input and module bytes, its output as text."""
    snake = cast(betterproto.Casing, betterproto.Casing.SNAKE)
    data: dict[str, Any] = job.to_dict(casing=snake)
    work, value = betterproto.which_one_of(job.spec, "work")
    spec: dict[str, Any] = {"kind": work, "policy": job.spec.policy.name}
    spec["privacy"] = job.spec.privacy.name
    if isinstance(value, types.TaskRequest):
        spec |= {"task": value.name, "input_bytes": len(value.input), "use_llm": value.use_llm}
    elif isinstance(value, types.LlmRequest):
        spec |= {"model": value.model, "max_tokens": value.max_tokens}
    data["spec"] = spec
    result = data.pop("result", None)
    if result is not None and job.result is not None:
        output = job.result.output
        data["content_type"] = job.result.content_type
        data["usage"] = result.get("usage")
        try:
            data["output_text"] = output.decode()
        except UnicodeDecodeError:
            data["output_base64"] = base64.b64encode(output).decode()
        data["output"] = data.get("output_text", "")
    return data


def verdict(
    problems: Sequence[str],
    body: types.ReceiptBody | None,
    proof_checked: bool,
    proof: types.GetReceiptProofResponse | None = None,
) -> CallToolResult:
    """verify_receipt's answer: valid or not, and why (not a tool error either way)."""
    snake = cast(betterproto.Casing, betterproto.Casing.SNAKE)
    data: dict[str, Any] = {
        "valid": not problems,
        "problems": list(problems),
        "proof_checked": proof_checked,
        "body": None if body is None else body.to_dict(casing=snake),
    }
    if proof is not None:
        data["proof"] = proof.to_dict(casing=snake)
    if problems:
        text = "INVALID receipt: " + "; ".join(problems)
    else:
        assert body is not None
        text = (
            f"valid receipt of job {body.job_id}: signed by worker "
            f"{body.worker_public_key.hex()[:16]}… and coordinator "
            f"{body.coordinator_public_key.hex()[:16]}…"
            + (f", included in Merkle batch {proof.batch_id}" if proof is not None else "")
        )
    return ok(data, text)


def workers_view(workers: Sequence[types.WorkerInfo], limit: int) -> dict[str, Any]:
    """list_workers' answer: totals, the models and tasks on offer, and the first `limit`
    workers (most reputable first)."""
    snake = cast(betterproto.Casing, betterproto.Casing.SNAKE)
    kinds: dict[str, int] = {}
    models: set[str] = set()
    tasks: set[str] = set()
    for w in workers:
        kind = w.kind.name or str(int(w.kind))
        kinds[kind] = kinds.get(kind, 0) + 1
        if not w.draining:
            models.update(w.llm_models)
            tasks.update(w.tasks)
    ranked = sorted(workers, key=lambda w: -w.reputation)[:limit]
    return {
        "count": len(workers),
        "by_kind": kinds,
        "llm_models": sorted(models),
        "tasks": sorted(tasks),
        "workers": [w.to_dict(casing=snake) for w in ranked],
    }


# --- helpers ----------------------------------------------------------------------------------


async def _guarded(
    tool: str, call: Callable[[], Awaitable[CallToolResult]], addresses: Sequence[str]
) -> CallToolResult:
    """call(), its SDK errors as tool errors (without the coordinators' addresses);
    anything else is logged and answered with a generic tool error (never a traceback)."""
    try:
        return await call()
    except DispatchError as e:
        return error_result(e, addresses)
    except Exception:
        log.exception("%s failed unexpectedly", tool)
        return error_result(DispatchError(f"{tool} failed unexpectedly; see the server's log"))


def _payment_meta(ctx: Context) -> Any:
    """The request's `_meta["x402/payment"]`, None when it has none."""
    meta = ctx.request_context.meta
    return None if not meta else meta.get(MCP_PAYMENT_META_KEY)


def _charged(result: ComputeResult) -> bool:
    return result.payment is not None and result.payment.status not in UNPAID


def _b64(name: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{name} is not base64") from None


def _receipt(r: ReceiptIn) -> types.Receipt:
    return types.Receipt(
        body=_b64("receipt.body", r.body),
        worker_signature=_b64("receipt.worker_signature", r.worker_signature),
        coordinator_signature=_b64("receipt.coordinator_signature", r.coordinator_signature),
        receipt_sha256=_b64("receipt.receipt_sha256", r.receipt_sha256),
    )


# --- descriptions (what an agent reads) ---------------------------------------------------------

INSTRUCTIONS = (
    "Dispatch runs small jobs on a network of workers: LLM replies (run_llm) and tasks "
    "(run_task). Each job returns a receipt signed by the worker and the coordinator; "
    "verify_receipt checks it. Jobs cost a few thousandths of a dollar; a paid tool "
    "answers with an x402 payment request when the server does not pay for you."
)
RUN_LLM = (
    "Ask an LLM on a Dispatch desktop worker for a reply to a prompt (or a conversation). "
    "Returns the reply text, and as structured content the price, the worker, the payment "
    "and the signed receipt (already verified). Costs the job's price (policy fast: more, "
    "cheap: less); a job no worker completed is not charged."
)
RUN_TASK = (
    "Run a task on a Dispatch worker: built-in tasks (echo, sha256, word_count, sleep; "
    'summarize / classify / extract_json take {"text": ...}) or a WebAssembly module. '
    "Returns the task's output (JSON for most tasks), and as structured content the price, "
    "the worker, the payment and the signed receipt (already verified). A job no worker "
    "completed is not charged."
)
GET_JOB = (
    "The state of a job this server ran: QUEUED, RUNNING, COMPLETED, FAILED or CANCELLED, "
    "its output, failure, payment (e.g. settled, with its transaction) and receipt."
)
VERIFY = (
    "Check a Dispatch receipt offline: both signatures over its exact bytes, and with "
    "job_id that it is that job's receipt for exactly its output (and, with check_proof, "
    "its Merkle inclusion proof). Answers valid true/false with the problems found."
)
LIST_WORKERS = (
    "The workers connected to the network: how many of each kind, the LLM models and "
    "tasks on offer, and the most reputable workers with their load."
)


def describe(settings: McpSettings) -> dict[str, Any]:
    """What `dispatch mcp` serves (its JSON line over HTTP, its log line on stdio)."""
    net = settings.network
    return {
        "network": net.name,
        "coordinators": list(net.coordinators),
        "client_id": settings.key.public_hex,
        "wallet": getattr(net.wallet, "address", None),
        "callers_pay": not settings.wallet_pays,
        "max_price_micros": settings.max_price_micros,
        "budget_micros": settings.budget_micros,
        "hosted": settings.hosted,
    }


async def serve_stdio(mcp: DispatchMcp) -> None:
    """Serves on stdin/stdout until stdin closes."""
    await mcp.server.run_stdio_async()
