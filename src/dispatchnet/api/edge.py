"""The gRPC edge: one exception-to-status mapping and client authentication, as interceptors.

ErrorInterceptor (outermost) turns typed domain errors into their status codes, refuses
requests carrying fields this server does not know, and reports anything unexpected as
INTERNAL without a traceback. AuthInterceptor checks the `authorization` metadata on every
method that is not public (and on GetQuote when it is sent) and makes the caller available
through `caller()` / `optional_caller()`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf import unknown_fields
from google.protobuf.message import Message
from grpc_interceptor.server import AsyncServerInterceptor

from dispatchnet import errors
from dispatchnet.auth.tokens import METADATA_KEY, Caller, verify_header

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


def unknown_field_paths(msg: Message, prefix: str = "") -> list[str]:
    # The stub lacks __iter__; the set iterates through __getitem__.
    fields = cast(Iterable[Any], unknown_fields.UnknownFieldSet(msg))
    found = [f"{prefix}#{f.field_number}" for f in fields]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        values = value if fd.is_repeated else [value]
        for i, v in enumerate(values):
            if isinstance(v, Message):
                name = f"{prefix}{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
                found += unknown_field_paths(v, name + ".")
    return found


Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Any]


class ErrorInterceptor(AsyncServerInterceptor):
    async def intercept(
        self, method: Handler, request: Any, context: Context, method_name: str
    ) -> Any:
        if isinstance(request, Message):
            unknown = unknown_field_paths(request)
            if unknown:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request has fields this server does not know: {', '.join(unknown)}",
                )
        response = method(request, context)
        if hasattr(response, "__aiter__"):
            return self._stream(response, context)
        failure: BaseException
        try:
            return await response
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:
            failure = e
        code, message = status_for(failure)
        await context.abort(code, message, trailing_metadata=trailers_for(failure))

    async def _stream(self, response: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        failure: BaseException
        try:
            async for item in response:
                yield item
            return
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:
            failure = e
        code, message = status_for(failure)
        await context.abort(code, message)


class AuthInterceptor(AsyncServerInterceptor):
    def __init__(self, max_token_ttl_seconds: int) -> None:
        self.max_ttl = max_token_ttl_seconds

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
        return verify_header(str(values[0]), self.max_ttl)

    async def intercept(
        self, method: Handler, request: Any, context: Context, method_name: str
    ) -> Any:
        who = self._authenticate(context, method_name)
        token = _caller.set(who)
        try:
            response = method(request, context)
            if hasattr(response, "__aiter__"):
                return self._stream(response, who)
            return await response
        finally:
            _caller.reset(token)

    async def _stream(self, response: AsyncIterator[Any], who: Caller | None) -> AsyncIterator[Any]:
        # The generator runs in the RPC's own task; its context ends with the RPC.
        _caller.set(who)
        async for item in response:
            yield item
