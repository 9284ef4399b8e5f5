"""The gRPC edge: one interceptor doing, in one wrapper per call, what every RPC needs
before and around its servicer.

EdgeInterceptor, in this order:
- decoding: every method answers INVALID_ARGUMENT to bytes that do not parse as its
  request type (grpc.aio decodes before any interceptor runs, and would answer UNKNOWN
  with a traceback per request), logging at most one line per DECODE_LOG_SECONDS, and to
  client ids over their limits (api/bounds.py) before anything looks them up;
- authentication: the `authorization` metadata is checked on every method that is not
  public (and on GetQuote when it is sent), and the caller is available through
  `caller()` / `optional_caller()` (and in the log context as client_id);
- the one error mapping: typed domain errors become their status codes, anything
  unexpected is INTERNAL without a traceback.
Requests carrying fields this server does not know are served (protobuf's forward
compatibility: unknown fields are ignored).

The wrapper of a method is built once and reused for every call, and a streamed response
passes through one generator layer (not one per concern).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dispatchnet import errors
from dispatchnet.api.bounds import has_limits, oversized_id
from dispatchnet.auth.tokens import METADATA_KEY, Caller, TokenCache, verify_header
from dispatchnet.memory import MemoryTrimmer
from dispatchnet.observability import logs
from dispatchnet.observability.logs import RateLimitedLog

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


class Undecodable:
    """Stands in for a request whose bytes do not parse; keeps no reference to them."""


UNDECODABLE = Undecodable()
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _cut(e: BaseException) -> BaseException:
    """e without the frames it went through. An RPC's context keeps its abort exception,
    whose traceback keeps the frames, whose locals keep the context: a cycle only the
    garbage collector frees, holding every frame's locals, the request among them (measured:
    ~0.6 MB kept per refused 4 MiB request, until a full collection). Callers drop their
    own reference to the request first."""
    return e.with_traceback(None)


Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]


def _status(e: BaseException, trailers: bool) -> Status:
    """The status an error ends its RPC with (a streamed response carries no trailers).
    Read inside the except clause: a local holding e would make a cycle (e -> traceback ->
    the frame holding it)."""
    code, message = status_for(e)
    return code, message, trailers_for(e) if trailers else ()


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Decode check, authentication and error mapping of every RPC (see the module's
    docstring), as one wrapper around each method's handler.

    Decoding: bytes that are not a valid request get INVALID_ARGUMENT "request is not a
    valid <type> message" (the request deserializer is wrapped), and an id over its limit
    (api/bounds.py) gets INVALID_ARGUMENT naming the field. A bad message mid-stream ends
    the stream. Each request's size goes to `trimmer` (memory.py), which returns memory to
    the OS after big ones; errors leave with their tracebacks cut (see _cut)."""

    def __init__(
        self,
        max_token_ttl_seconds: int,
        log_interval: float = DECODE_LOG_SECONDS,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.max_ttl = max_token_ttl_seconds
        self.tokens = TokenCache()  # one signature check per token, not per call
        self.log = RateLimitedLog(log, log_interval)
        self.trimmer = trimmer
        # method -> (the handler it wrapped, the wrapper): built once per method
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def authenticate(self, context: Context, method_name: str) -> Caller | None:
        """The caller of a method that is not public (None for a public one, or for an
        optional-auth one called without a token); raises Unauthenticated."""
        if method_name in PUBLIC_METHODS or method_name.startswith(PUBLIC_PREFIXES):
            return None
        for k, v in context.invocation_metadata() or ():
            if k == METADATA_KEY:
                return verify_header(str(v), self.max_ttl, cache=self.tokens)
        if method_name in OPTIONAL_AUTH_METHODS:
            return None
        raise errors.Unauthenticated(
            f"{method_name} needs '{METADATA_KEY}: Dispatch <token>' metadata; "
            "`dispatch auth header` prints one"
        )

    def _wrap(self, handler: Any, method_name: str) -> Any:
        deserialize = handler.request_deserializer
        decoding = deserialize is not None
        cls = getattr(deserialize, "__self__", None)
        descriptor = getattr(cls, "DESCRIPTOR", None)
        type_name = str(getattr(descriptor, "full_name", "request"))
        # ids are looked at only in the request types that have bounded ones
        limited = descriptor is None or has_limits(descriptor)
        public = method_name in PUBLIC_METHODS or method_name.startswith(PUBLIC_PREFIXES)
        authenticate = self.authenticate
        trimmer, rate_log = self.trimmer, self.log

        def safe_deserialize(data: bytes) -> Any:
            if trimmer is not None:
                trimmer.saw(len(data))
            try:
                return deserialize(data)
            except Exception:
                return UNDECODABLE

        def problem_of(request: Any) -> str | None:
            """Why the request is refused (undecodable, an oversized id), or None."""
            if request is UNDECODABLE:
                rate_log.warning("refused an undecodable %s on %s", type_name, method_name)
                return f"request is not a valid {type_name} message"
            return oversized_id(request) if limited else None

        def enter(context: Context) -> None:
            # Each RPC runs in its own task: what is set here ends with the RPC.
            who = None if public else authenticate(context, method_name)
            _caller.set(who)
            if who is not None:
                logs.bind(client_id=who.id)

        async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                if request is UNDECODABLE or limited:
                    problem = problem_of(request)
                    if problem is not None:
                        del request  # see _cut
                        await context.abort(INVALID, problem)
                yield request

        async def refuse(context: Context, status: Status) -> None:
            try:
                await context.abort(status[0], status[1], trailing_metadata=status[2])
            except BaseException as aborted:
                raise _cut(aborted) from None

        if handler.request_streaming or handler.response_streaming:
            if handler.request_streaming and handler.response_streaming:
                inner_ss = handler.stream_stream

                def start(request: Any, context: Context) -> Any:
                    return inner_ss(checked(request, context) if decoding else request, context)
            elif handler.request_streaming:
                inner_su = handler.stream_unary

                async def stream_unary(requests: Any, context: Context) -> Any:
                    try:
                        enter(context)
                        return await inner_su(
                            checked(requests, context) if decoding else requests, context
                        )
                    except (grpc.aio.AbortError, grpc.RpcError, asyncio.CancelledError) as e:
                        raise _cut(e) from None
                    except Exception as e:
                        status = _status(e, trailers=True)  # no local keeps e (see _status)
                    await refuse(context, status)

                return self._replace(handler, decoding, safe_deserialize, stream_unary=stream_unary)
            else:
                inner_us = handler.unary_stream

                def start(request: Any, context: Context) -> Any:
                    return inner_us(request, context)

            async def streamed(request: Any, context: Context) -> Any:
                if decoding and not handler.request_streaming:
                    problem = problem_of(request)
                    if problem is not None:
                        del request
                        await context.abort(INVALID, problem)
                try:
                    enter(context)
                    async for r in start(request, context):
                        yield r
                    return
                except (grpc.aio.AbortError, grpc.RpcError, asyncio.CancelledError) as e:
                    del request
                    raise _cut(e) from None
                except Exception as e:
                    status = _status(e, trailers=False)  # no local keeps e (see _status)
                del request
                await refuse(context, status)

            if handler.request_streaming:
                return self._replace(handler, decoding, safe_deserialize, stream_stream=streamed)
            return self._replace(handler, decoding, safe_deserialize, unary_stream=streamed)

        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if decoding and (request is UNDECODABLE or limited):
                problem = problem_of(request)
                if problem is not None:
                    del request
                    await context.abort(INVALID, problem)
            try:
                enter(context)
                return await inner(request, context)
            except (grpc.aio.AbortError, grpc.RpcError, asyncio.CancelledError) as e:
                del request
                raise _cut(e) from None
            except Exception as e:
                status = _status(e, trailers=True)  # no local keeps e (see _status)
            del request
            await refuse(context, status)

        return self._replace(handler, decoding, safe_deserialize, unary_unary=unary_unary)

    @staticmethod
    def _replace(handler: Any, decoding: bool, deserialize: Any, **behaviour: Any) -> Any:
        if decoding:
            behaviour["request_deserializer"] = deserialize
        return handler._replace(**behaviour)
