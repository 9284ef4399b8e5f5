"""x402 over gRPC: the interceptor that gates CommitJob (and RunJob) with a payment.

The mapping follows x402's HTTP transport (README "Payments"):

- request metadata `payment-signature`: base64 JSON of an x402 v2 PaymentPayload;
- no payment, or one refused: RESOURCE_EXHAUSTED with trailing metadata `payment-required`,
  base64 JSON of a PaymentRequired listing the quote's `accepts` (set by the edge's one
  error mapping from the PaymentRequired error);
- a malformed payment: INVALID_ARGUMENT; facilitator or chain node down: UNAVAILABLE;
- success: trailing metadata `payment-response`, base64 JSON of a SettleResponse (its
  transaction stays empty until the job completes and the payment is settled).

GetQuote answers with the same `payment-required` trailing metadata (status OK) for the
quote it returns, so a client can sign the payment at once and commit in one call instead
of being refused first.

A CommitJob whose idempotency key names an existing job needs no payment: it returns that
job, charged once.

RunJob with a quote_id is paid exactly as CommitJob is (its `payment-response` comes with the
final job). RunJob with a spec is refused (RESOURCE_EXHAUSTED, reason `quote_required`): the
price is paid for a quote, so the client asks GetQuote first.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc

from dispatchnet.api.edge import PAYMENT_REQUIRED, Context, Handler, caller
from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import PaymentRequired
from dispatchnet.payments.service import PaymentService

PAYMENT_SIGNATURE = "payment-signature"
PAYMENT_RESPONSE = "payment-response"
COMMIT_JOB = "/dispatch.v1.CoordinatorService/CommitJob"
GET_QUOTE = "/dispatch.v1.CoordinatorService/GetQuote"
RUN_JOB = "/dispatch.v1.CoordinatorService/RunJob"

_payment: contextvars.ContextVar[Payment | None] = contextvars.ContextVar("payment", default=None)


_service: contextvars.ContextVar[PaymentService | None] = contextvars.ContextVar(
    "payment_service", default=None
)


def current_payment() -> Payment | None:
    """The verified payment of the current CommitJob or RunJob (None while payments are
    off, or when the call returns an existing job)."""
    return _payment.get()


def payment_stored() -> None:
    """The current call's job is stored with its payment (or was found by its key): the
    payment stops reserving the payer's balance (PaymentService.committed); the store
    counts it from now on. Without this, the call's end does it (a RunJob waits for its
    job to end)."""
    payment, service = _payment.get(), _service.get()
    if payment is not None and service is not None:
        service.committed(payment)


class PaymentInterceptor(grpc.aio.ServerInterceptor):
    """Wraps GetQuote, CommitJob and RunJob (each wrapper built once); other methods pass as
    they are."""

    def __init__(self, service: PaymentService) -> None:
        self.service = service
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method_name = handler_call_details.method
        if handler is None or method_name not in (GET_QUOTE, COMMIT_JOB, RUN_JOB):
            return handler
        known = self._wrapped.get(method_name)
        if known is not None and known[0] is handler:
            return known[1]
        inner = handler.unary_unary
        intercept = self.intercept

        async def unary_unary(request: Any, context: Context) -> Any:
            return await intercept(inner, request, context, method_name)

        wrapped = handler._replace(unary_unary=unary_unary)
        self._wrapped[method_name] = (handler, wrapped)
        return wrapped

    async def intercept(
        self, method: Handler, request: Any, context: Context, method_name: str
    ) -> Any:
        if method_name == GET_QUOTE:
            response = await method(request, context)
            required = await self.service.quote_header(response.quote.quote_id)
            context.set_trailing_metadata(((PAYMENT_REQUIRED, required),))
            return response
        if method_name == RUN_JOB and request.WhichOneof("job") != "quote_id":
            raise PaymentRequired(
                "this coordinator charges for jobs, and a payment is for a quote: call "
                "GetQuote (its payment-required trailer says what to pay), then RunJob with "
                "that quote_id and `payment-signature` metadata (README: Payments)",
                "quote_required",
            )
        values = [v for k, v in (context.invocation_metadata() or ()) if k == PAYMENT_SIGNATURE]
        header = str(values[0]) if values else None
        payment = await self.service.authorize(
            caller().id, request.quote_id, request.idempotency_key, header
        )
        token, serving = _payment.set(payment), _service.set(self.service)
        try:
            response = await method(request, context)
        except PaymentRequired as e:
            if e.required_header:
                raise
            raise await self.service.refusal_for(request.quote_id, e) from None
        finally:
            _payment.reset(token)
            _service.reset(serving)
            if payment is not None:
                self.service.committed(payment)
        # CommitJob: as stored with the job just made; RunJob's job is final: as it is now
        stored = payment if response.created and method_name == COMMIT_JOB else None
        value = await self.service.response_header(response.job, stored)
        if value:
            context.set_trailing_metadata(((PAYMENT_RESPONSE, value),))
        return response
