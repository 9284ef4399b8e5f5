"""The gRPC edge: one exception-to-status mapping and client authentication, as interceptors.

DecodeInterceptor (first) makes every method answer INVALID_ARGUMENT to bytes that do not
parse as its request type (grpc.aio decodes before any interceptor runs, and would answer
UNKNOWN with a traceback per request), logging at most one line per DECODE_LOG_SECONDS,
and to client ids over their limits (api/bounds.py) before anything looks them up.
ErrorInterceptor (next) turns typed domain errors into their status codes and reports
anything unexpected as INTERNAL without a traceback. Requests carrying fields this server
does not know are served (protobuf's forward compatibility: unknown fields are ignored).
AuthInterceptor checks the `authorization` metadata on every method that is not public (and
on GetQuote when it is sent) and makes the caller available through `caller()` /
`optional_caller()`.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor

from dispatchnet import errors
from dispatchnet.api.bounds import oversized_id
from dispatchnet.auth.tokens import METADATA_KEY, Caller, TokenCache, verify_header
from dispatchnet.memory import MemoryTrimmer
from dispatchnet.observability import logs

log = logging.getLogger("dispatch.edge")

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

PUBLIC_METHODS = frozenset(
    {
        "/dispatch.v1.CoordinatorService/ListWorkers",
        "/dispatch.v1.ReceiptService/VerifyReceipt",
        "/dispatch.v1.WorkerService/Connect",  # authenticates with its own challenge
    }
)
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Methods anyone may call, that verify the `authorization` metadata when it is sent (the
# caller is then known; see optional_caller()).
OPTIONAL_AUTH_METHODS = frozenset({"/dispatch.v1.CoordinatorService/GetQuote"})

_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def caller() -> Caller:
    """The authenticated caller of the current RPC."""
    c = _caller.get()
    if c is None:
        raise errors.Unauthenticated("this method needs client authentication")
    return c


def optional_caller() -> Caller | None:
    """The caller of the current RPC if it authenticated, None if it did not."""
    return _caller.get()


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls], getattr(exc, "message", str(exc))
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (details are in the coordinator's log)"


PAYMENT_REQUIRED = "payment-required"


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata an error carries: x402's `payment-required` for PaymentRequired."""
    if isinstance(exc, errors.PaymentRequired) and exc.required_header:
        return ((PAYMENT_REQUIRED, exc.required_header),)
    return ()


Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Any]

DECODE_LOG_SECONDS = 60.0


class RateLimitedLog:
    """Logs at most one line per `interval` seconds, counting the lines it held back."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger, self.interval = logger, interval
        self.last = -interval
        self.held = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        held, self.held, self.last = self.held, 0, now
        suffix = f" ({held} more since the last report)" if held else ""
        self.logger.warning(msg + suffix, *args)


class Undecodable:
    """Stands in for a request whose bytes do not parse; keeps no reference to them."""


UNDECODABLE = Undecodable()


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Checks every request message, unary or streamed, before any other code sees it:
    bytes that are not a valid request get INVALID_ARGUMENT "request is not a valid <type>
    message" (its request deserializer is wrapped), and an id over its limit (api/bounds.py)
    gets INVALID_ARGUMENT naming the field. A bad message mid-stream ends the stream.
    Each request's size goes to `trimmer` (memory.py), which returns memory to the OS
    after big ones; errors leave with their tracebacks cut (see _cut)."""

    def __init__(
        self, log_interval: float = DECODE_LOG_SECONDS, trimmer: MemoryTrimmer | None = None
    ) -> None:
        self.log = RateLimitedLog(log, log_interval)
        self.trimmer = trimmer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method_name = handler_call_details.method
        deserialize = handler.request_deserializer
        cls = getattr(deserialize, "__self__", None)
        descriptor = getattr(cls, "DESCRIPTOR", None)
        type_name = str(getattr(descriptor, "full_name", "request"))

        def safe_deserialize(data: bytes) -> Any:
            if self.trimmer is not None:
                self.trimmer.saw(len(data))
            try:
                return deserialize(data)
            except Exception:
                return UNDECODABLE

        def problem_of(request: Any) -> str | None:
            """Why the request is refused (undecodable, an oversized id), or None."""
            if isinstance(request, Undecodable):
                self.log.warning("refused an undecodable %s on %s", type_name, method_name)
                return f"request is not a valid {type_name} message"
            return oversized_id(request)

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                problem = problem_of(request)
                if problem is not None:
                    del request  # see _cut
                    await context.abort(INVALID, problem)
                yield request

        def replaced(**behaviour: Any) -> Any:
            return handler._replace(request_deserializer=safe_deserialize, **behaviour)

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> Any:
                try:
                    async for r in inner(checked(requests, context), context):
                        yield r
                except BaseException as e:
                    raise _cut(e) from None

            return replaced(stream_stream=stream_stream)
        if handler.request_streaming:
            inner = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
                try:
                    return await inner(checked(requests, context), context)
                except BaseException as e:
                    raise _cut(e) from None

            return replaced(stream_unary=stream_unary)
        if handler.response_streaming:
            inner = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> Any:
                problem = problem_of(request)
                if problem is not None:
                    del request
                    await context.abort(INVALID, problem)
                try:
                    async for r in inner(request, context):
                        yield r
                except BaseException as e:
                    del request
                    raise _cut(e) from None

            return replaced(unary_stream=unary_stream)
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            problem = problem_of(request)
            if problem is not None:
                del request
                await context.abort(INVALID, problem)
            try:
                return await inner(request, context)
            except BaseException as e:
                del request
                raise _cut(e) from None

        return replaced(unary_unary=unary_unary)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _cut(e: BaseException) -> BaseException:
    """e without the frames it went through. An RPC's context keeps its abort exception,
    whose traceback keeps the frames, whose locals keep the context: a cycle only the
    garbage collector frees, holding every frame's locals, the request among them (measured:
    ~0.6 MB kept per refused 4 MiB request, until a full collection). Callers drop their
    own reference to the request first."""
    return e.with_traceback(None)


class ErrorInterceptor(AsyncServerInterceptor):
    async def intercept(
        self, method: Handler, request: Any, context: Context, method_name: str
    ) -> Any:
        response = method(request, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, context)
        try:
            return await response
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:
            # read here: a local holding e would make a cycle (e -> traceback -> this frame)
            code, message = status_for(e)
            trailers = trailers_for(e)
        del request, response
        await context.abort(code, message, trailing_metadata=trailers)

    async def _stream(self, response: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        try:
            async for item in response:
                yield item
            return
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:
            code, message = status_for(e)  # no local keeps e (see intercept)
        del response
        await context.abort(code, message)


class AuthInterceptor(AsyncServerInterceptor):
    def __init__(self, max_token_ttl_seconds: int) -> None:
        self.max_ttl = max_token_ttl_seconds
        self.tokens = TokenCache()  # one signature check per token, not per call

    def _authenticate(self, context: Context, method_name: str) -> Caller | None:
        if method_name in PUBLIC_METHODS or method_name.startswith(PUBLIC_PREFIXES):
            return None
        values = [v for k, v in (context.invocation_metadata() or ()) if k == METADATA_KEY]
        if not values:
            if method_name in OPTIONAL_AUTH_METHODS:
                return None
            raise errors.Unauthenticated(
                f"{method_name} needs '{METADATA_KEY}: Dispatch <token>' metadata; "
                "`dispatch auth header` prints one"
            )
        return verify_header(str(values[0]), self.max_ttl, cache=self.tokens)

    async def intercept(
        self, method: Handler, request: Any, context: Context, method_name: str
    ) -> Any:
        who = self._authenticate(context, method_name)
        token = _caller.set(who)
        log_token = logs.bind(client_id=who.id) if who is not None else None
        try:
            response = method(request, context)
            if hasattr(response, "__aiter__"):
                return self._stream(response, who)
            return await response
        finally:
            _caller.reset(token)
            if log_token is not None:
                logs.reset(log_token)

    async def _stream(self, response: AsyncIterator[Any], who: Caller | None) -> AsyncIterator[Any]:
        # The generator runs in the RPC's own task; its context ends with the RPC.
        _caller.set(who)
        if who is not None:
            logs.bind(client_id=who.id)
        async for item in response:
            yield item
