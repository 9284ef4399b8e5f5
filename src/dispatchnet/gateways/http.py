"""The OpenAI-compatible HTTP gateway: a FastAPI app over one ComputeRouter (README
"Gateway").

    POST /v1/chat/completions   an LLM job (JSON, or SSE chunks with `stream: true`)
    GET  /v1/models             the models connected desktops serve (ListWorkers)
    GET  /v1/models/{model}
    POST /v1/tasks/{name}       a task job

Every job is paid by the HTTP caller with x402 over HTTP, relayed to the coordinator
(gateways/relay.py): 402 with PAYMENT-REQUIRED, the retry with PAYMENT-SIGNATURE,
PAYMENT-RESPONSE on success. The job's verified receipt comes back in X-Dispatch-Receipt
(base64 of the Receipt message) and in the body's `dispatch` field (the last SSE chunk's
when streaming). Errors are JSON in OpenAI's shape, never a traceback; request bodies and
requests in flight are bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from x402.http import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER

from dispatchnet.gateways import relay, wire, without_addresses
from dispatchnet.gateways.wire import HttpError
from dispatchnet.sdk import (
    CallOptions,
    ComputeResult,
    ComputeRouter,
    ComputeStream,
    CoordinatorUnavailable,
    DispatchError,
    InvalidRequest,
    NoCapacity,
    PaymentError,
    SpendingLimitExceeded,
    types,
)

RECEIPT_HEADER = "X-Dispatch-Receipt"
JOB_HEADER = "X-Dispatch-Job-Id"
ROUTE_HEADER = "X-Dispatch-Route"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # the coordinator's own message limit
DEFAULT_MAX_CONCURRENT = 64
MODEL_CACHE = 10_000  # workers whose model is remembered
STREAM_BUFFER = 64  # tokens read ahead of a slow HTTP client
UNKNOWN_TASK = "ever offered task"  # the coordinator's words for a task no worker has
T = TypeVar("T")


class Gateway:
    """The gateway's routes over `router`, whose networks must pay with RelayPayer (the
    caller's own payment) or not at all: the gateway never pays from a wallet.

    max_body_bytes: the largest request body (413 beyond). max_concurrent: job requests
    in flight (streams included) before new ones get 503. hosted_budget_micros: what
    hosted fallbacks (the router's hosted providers, on the operator's keys, free to the
    caller) may cost in total; 0 turns the fallback off."""

    def __init__(
        self,
        router: ComputeRouter,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        hosted_budget_micros: int = 0,
    ) -> None:
        for net in router.networks:
            if net.wallet is not None and not isinstance(net.wallet, relay.RelayPayer):
                raise ValueError(
                    f"network {net.name!r} pays from a wallet; a gateway's networks relay "
                    "the HTTP caller's payment (wallet=RelayPayer())"
                )
        if max_body_bytes < 1 or max_concurrent < 1 or hosted_budget_micros < 0:
            raise ValueError(
                "max_body_bytes and max_concurrent must be positive, "
                "hosted_budget_micros not negative"
            )
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.hosted_budget_micros = hosted_budget_micros
        self.hosted_spent_micros = 0
        self.running = 0
        self._models: dict[str, str] = {}  # worker id -> the model it serves
        self._jobs: set[asyncio.Task[Any]] = set()  # the SDK calls of requests in flight
        self.app = self._build()

    async def close(self) -> None:
        """Cancels the jobs of requests still in flight (not charged), then closes the
        router."""
        jobs = list(self._jobs)
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self.router.close()

    def _track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    # --- the app ------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(
            title="Dispatch gateway",
            summary="OpenAI-compatible access to the Dispatch network, paid with x402",
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
            redirect_slashes=False,  # /v1/tasks/echo/ is a JSON 404, not a redirect
        )
        app.add_exception_handler(HttpError, _http_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, _starlette_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _internal_error)
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/tasks/{name}", self.task, methods=["POST"])
        return app

    async def chat(self, request: Request) -> Response:
        chat = wire.parse_chat(wire.parse_json(await self._body(request)))
        payment = _caller_payment(request)
        release = self._acquire()
        try:
            if chat.stream:
                response = await self._stream_chat(request, chat, payment, release)
                release = _nothing  # the stream releases it when it ends
                return response
            result = await self._run(request, chat.spec, chat.options, payment, chat.model)
        finally:
            await release()
        model = result.model or await self._model_of(result) or chat.model
        body = wire.completion(
            result, model, chat.max_tokens, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        )
        return JSONResponse(body, headers=self._headers(result, payment))

    async def task(self, request: Request, name: str) -> Response:
        task = wire.parse_task(name, wire.parse_json(await self._body(request) or b"{}"))
        payment = _caller_payment(request)
        release = self._acquire()
        try:
            result = await self._run(request, task.spec, task.options, payment, "", name)
        finally:
            await release()
        return JSONResponse(wire.task_answer(result, name), headers=self._headers(result, payment))

    async def models(self) -> Response:
        return JSONResponse({"object": "list", "data": wire.models(await self._workers())})

    async def model(self, model: str) -> Response:
        for m in wire.models(await self._workers()):
            if m["id"] == model:
                return JSONResponse(m)
        raise HttpError(404, f"no connected desktop serves model {model!r}", "model_not_found")

    # --- running a job ------------------------------------------------------------------------

    async def _run(
        self,
        request: Request,
        spec: types.JobSpec,
        options: wire.Options,
        payment: relay.CallerPayment,
        model: str,
        task: str = "",
    ) -> ComputeResult:
        """The job's result. A caller who hangs up first gets its job cancelled (so not
        charged) instead of paying for an answer nobody reads."""
        token = relay.bind(payment)  # the task below runs in a copy of this context
        try:
            run = self._track(asyncio.create_task(self.router.run(spec, **self._options(options))))
        finally:
            relay.reset(token)
        try:
            result = await _unless_gone(request, run)
        except DispatchError as e:
            raise await self._refusal(e, request, payment, model, task) from None
        self._count(result)
        return result

    async def _stream_chat(
        self,
        request: Request,
        chat: wire.ChatRequest,
        payment: relay.CallerPayment,
        release: Callable[[], Awaitable[None]],
    ) -> Response:
        """Waits for the first token, so that payment, capacity and input errors are HTTP
        statuses, then streams the rest as chat.completion.chunk events."""
        token = relay.bind(payment)
        try:
            pump = _Pump(self.router.stream(chat.spec, **self._options(chat.options)))
            self._track(pump.task)
        finally:
            relay.reset(token)
        try:
            first = await _unless_gone(request, asyncio.ensure_future(pump.queue.get()))
        except BaseException:
            await pump.close()
            raise
        if isinstance(first, DispatchError):
            await pump.close()
            raise await self._refusal(first, request, payment, chat.model, "")

        async def close() -> None:
            await pump.close()
            await release()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if payment.relayed:
            headers[PAYMENT_RESPONSE_HEADER] = relay.accepted_header(payment)
        return _EventStream(self._events(chat, first, pump), close, headers)

    async def _events(
        self, chat: wire.ChatRequest, first: str | ComputeResult, pump: _Pump
    ) -> AsyncIterator[bytes]:
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), chat.model
        yield wire.sse(wire.chunk(cid, created, model, {"role": "assistant", "content": ""}))
        item: str | ComputeResult | DispatchError = first
        while isinstance(item, str):
            yield wire.sse(wire.chunk(cid, created, model, {"content": item}))
            item = await pump.queue.get()
        if isinstance(item, DispatchError):
            yield wire.sse(self._public(item).body())  # the openai SDK raises it
            return
        self._count(item)
        info = wire.dispatch_info(item)
        finish = wire.finish_reason(item, chat.max_tokens)
        if chat.include_usage:
            yield wire.sse(wire.chunk(cid, created, model, {}, finish))
            last = wire.chunk(cid, created, model, None, usage=wire.usage(item), dispatch=info)
        else:
            last = wire.chunk(cid, created, model, {}, finish, dispatch=info)
        yield wire.sse(last)
        yield wire.sse("[DONE]")

    async def _refusal(
        self,
        e: DispatchError,
        request: Request,
        payment: relay.CallerPayment,
        model: str,
        task: str,
    ) -> HttpError:
        """The HTTP answer to an SDK error: 402 with the coordinator's requirements when
        the job waits for the caller's payment, 404 for a model or task nobody serves."""
        if isinstance(e, SpendingLimitExceeded):
            return HttpError(
                400,
                f"this job costs {e.price_micros} micro-USD, more than the "
                f"{'request' if e.scope == 'job' else 'gateway'}'s limit of "
                f"{e.limit_micros}",
                "price_over_limit",
                details={"price_micros": e.price_micros, "limit_micros": e.limit_micros},
            )
        if isinstance(e, PaymentError) and payment.required is not None:
            what = f"Dispatch task {task}" if task else "Dispatch LLM job (chat completion)"
            header = await relay.required_header(payment, str(request.url), what)
            return _payment_required(payment, header)
        if task and isinstance(e, InvalidRequest) and UNKNOWN_TASK in e.message:
            return HttpError(404, self._public(e).message, "task_not_found", "name")
        if (
            model
            and isinstance(e, NoCapacity)
            and not isinstance(e, CoordinatorUnavailable)
            and not await self._serves(model)
        ):
            return HttpError(
                404,
                f"no connected desktop serves model {model!r} (GET /v1/models lists them)",
                "model_not_found",
                "model",
            )
        return self._public(e)

    def _public(self, e: DispatchError) -> HttpError:
        """The SDK error for HTTP callers: the coordinators' addresses are the operator's
        business, so they are not named."""
        err = HttpError.of(e)
        addresses = [a for net in self.router.networks for a in net.coordinators]
        err.message = without_addresses(err.message, addresses)
        err.details = without_addresses(err.details, addresses)
        return err

    async def _serves(self, model: str) -> bool:
        with contextlib.suppress(DispatchError, HttpError):
            return any(m["id"] == model for m in wire.models(await self._workers()))
        return True  # unknown: the network's own answer (503) stands

    async def _workers(self) -> list[types.WorkerInfo]:
        try:
            return await self.router.list_workers()
        except DispatchError as e:
            raise self._public(e) from None

    async def _model_of(self, result: ComputeResult) -> str:
        """The model of the desktop that answered a job that let any model answer ("" when
        it is not connected any more)."""
        if result.worker is None:
            return ""
        worker_id = result.worker.worker_id
        if worker_id not in self._models:
            with contextlib.suppress(DispatchError, HttpError):
                if len(self._models) > MODEL_CACHE:
                    self._models.clear()
                for w in await self._workers():
                    self._models[w.worker_id] = w.llm_models[0] if w.llm_models else ""
        return self._models.get(worker_id, "")

    def _options(self, options: wire.Options) -> CallOptions:
        hosted = bool(self.router.hosted) and self.hosted_spent_micros < self.hosted_budget_micros
        call: CallOptions = {"decentralized_only": not hosted}
        if options.max_price_micros is not None:
            call["max_price_micros"] = options.max_price_micros
        return call

    def _count(self, result: ComputeResult) -> None:
        if result.route != "dispatch":
            self.hosted_spent_micros += result.price.amount_micros

    def _headers(self, result: ComputeResult, payment: relay.CallerPayment) -> dict[str, str]:
        headers = {"Cache-Control": "no-store", ROUTE_HEADER: result.route}
        if result.job_id:
            headers[JOB_HEADER] = result.job_id
        if result.receipt is not None:
            headers[RECEIPT_HEADER] = base64.b64encode(bytes(result.receipt)).decode()
        if payment.relayed and result.payment is not None and result.route == "dispatch":
            headers[PAYMENT_RESPONSE_HEADER] = relay.response_header(result.payment, result.job_id)
        return headers

    # --- bounds -------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The request body, at most max_body_bytes (413 beyond, before reading it all)."""
        too_big = HttpError(
            413,
            f"the request body is over the gateway's limit of {self.max_body_bytes} bytes",
            "request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise wire.bad("Content-Length is not a number", code="invalid_request")
            if int(declared) > self.max_body_bytes:
                raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    def _acquire(self) -> Callable[[], Awaitable[None]]:
        """Counts a job request in flight (503 past max_concurrent); returns its release."""
        if self.running >= self.max_concurrent:
            raise HttpError(
                503,
                f"the gateway has {self.running} requests in flight, its limit: try again",
                "overloaded",
            )
        self.running += 1
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running -= 1

        return release


async def _nothing() -> None:
    return None


async def _unless_gone(request: Request, work: asyncio.Future[T]) -> T:
    """work's result, unless the HTTP client disconnects first: then work is cancelled
    (a job the SDK was running is cancelled with it) and 499 is raised, which nobody reads.
    Also cancelled when this handler is."""
    gone = asyncio.create_task(_disconnected(request))
    either: set[asyncio.Future[Any]] = {work, gone}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            with anyio.CancelScope(shield=True):
                work.cancel()
                await asyncio.wait({work})
    if work.cancelled():
        raise HttpError(499, "the client closed the request", "client_closed_request")
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already: receive() now only
    says http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _caller_payment(request: Request) -> relay.CallerPayment:
    try:
        return relay.CallerPayment.from_header(request.headers.get(PAYMENT_SIGNATURE_HEADER))
    except relay.InvalidPayment as e:
        raise wire.bad(str(e), PAYMENT_SIGNATURE_HEADER, "invalid_payment") from None


def _payment_required(payment: relay.CallerPayment, header: str) -> HttpError:
    assert payment.required is not None
    offers = "; ".join(
        f"{a.amount} atomic units of {a.asset} on {a.network} to {a.pay_to}"
        for a in payment.required.accepts
    )
    reason = payment.required.error or "refused"
    message, code = {
        "required": (
            f"this request is paid with x402: sign one of PAYMENT-REQUIRED's accepts "
            f"({offers}) and send it again with PAYMENT-SIGNATURE",
            "payment_required",
        ),
        "mismatch": (
            "the PAYMENT-SIGNATURE does not pay this request (its terms or price changed): "
            f"sign one of PAYMENT-REQUIRED's accepts ({offers})",
            "no_matching_requirements",
        ),
    }.get(payment.outcome) or (
        f"the coordinator refused the payment: {reason}; nothing was charged",
        "payment_rejected",
    )
    return HttpError(
        402,
        message,
        code,
        PAYMENT_SIGNATURE_HEADER,
        headers={
            PAYMENT_REQUIRED_HEADER: header,
            "Cache-Control": "no-store",
        },
    )


class _Pump:
    """Reads a ComputeStream in a task of its own (`queue`: tokens, then the ComputeResult
    or the DispatchError that ended it), so that an HTTP client going away (Starlette
    cancels the response) never cancels the SDK's stream halfway: close() cancels the task
    once, and the stream's own clean-up cancels the job (not charged)."""

    def __init__(self, stream: ComputeStream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[str | ComputeResult | DispatchError] = asyncio.Queue(
            STREAM_BUFFER
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for token in self.stream:
                await self.queue.put(token)
            await self.queue.put(self.stream.result)
        except DispatchError as e:
            await self.queue.put(e)
        finally:
            await self.stream.aclose()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class _EventStream(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends (client gone
    included), shielded from the cancellation that ended it."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


# --- errors as OpenAI-shaped JSON ---------------------------------------------------------------


def _json_error(e: HttpError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


async def _http_error(request: Request, e: HttpError) -> Response:
    return _json_error(e)


async def _starlette_error(request: Request, e: StarletteHTTPException) -> Response:
    if e.status_code == 404:
        message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
    elif e.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}", "bad_method"
    else:
        message, code = str(e.detail), "http_error"
    answer = _json_error(HttpError(e.status_code, message, code))
    for k, v in (e.headers or {}).items():
        answer.headers[k] = v
    return answer


async def _validation_error(request: Request, e: RequestValidationError) -> Response:
    first: dict[str, Any] = (e.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _json_error(wire.bad(f"{where}: {first.get('msg', 'invalid')}", where or None))


async def _internal_error(request: Request, e: Exception) -> Response:
    # Starlette raises `e` again once this answer is sent: the server's log has its traceback
    return _json_error(
        HttpError(500, "internal error (the gateway's log has the details)", "internal_error")
    )
