"""x402 over HTTP for the gateway, relayed: the HTTP caller's payment pays the coordinator
that runs the job. The gateway holds no wallet and never holds the caller's money.

One request, one payment (README "Gateway", "Paying with x402"):

1. No PAYMENT-SIGNATURE: the SDK quotes the job and, at CommitJob, asks the network's wallet
   (RelayPayer) to pay the coordinator's `payment-required` (its accepts: network, asset,
   amount = the quote's price, payTo = the coordinator). RelayPayer keeps that ask and
   declines, so nothing is committed; the gateway answers 402 with it as PAYMENT-REQUIRED,
   its resource this request's URL.
2. The retry with PAYMENT-SIGNATURE: the job is quoted again; RelayPayer matches the
   caller's payment to the new quote's accepts (the official SDK's server-side matching:
   scheme, network, asset, amount, payTo, maxTimeoutSeconds and extra) and hands it on
   unchanged as CommitJob's payment-signature. The coordinator verifies it and settles it
   only once a worker has completed the job (EVM; on Solana it settles at commit and
   refunds a job that fails). A payment that no longer matches (the price changed) or
   that the coordinator refuses is answered with 402 and the fresh requirements.
3. PAYMENT-RESPONSE: an x402 SettleResponse of the job's payment as the coordinator
   reports it (status, transaction once settled).

The caller's request travels to RelayPayer.pay (called by the SDK's CoordinatorClient, in a
thread) in a context variable: each HTTP request sets its own CallerPayment.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from x402 import x402ResourceServer
from x402.http import (
    decode_payment_required_header,
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.schemas import PaymentPayload, PaymentRequired, ResourceInfo, SettleResponse

from dispatchnet.client import PaymentDeclined
from dispatchnet.sdk import types

# the official SDK's resource server, for its 402 body and its payment matching (the
# coordinator's own resource server verifies and settles)
_SERVER = x402ResourceServer()
MAX_SIGNATURE_CHARS = 16384  # a PAYMENT-SIGNATURE is about 1-2 KB


class InvalidPayment(ValueError):
    """A PAYMENT-SIGNATURE that is not base64 JSON of an x402 v2 PaymentPayload (HTTP 400)."""


@dataclass
class CallerPayment:
    """One HTTP request's payment, on its way to the coordinator.

    header/payload: what the caller sent (empty/None: no payment). required: the
    coordinator's latest `payment-required` for this request's job (None until it asked).
    relayed: the payment went to the coordinator. outcome: why no job was committed
    ("required": none sent, "mismatch": it does not pay this quote, "refused": the
    coordinator refused it, `required.error` says why)."""

    header: str = ""
    payload: PaymentPayload | None = None
    required: PaymentRequired | None = None
    relayed: bool = False
    outcome: str = ""

    @classmethod
    def from_header(cls, header: str | None) -> CallerPayment:
        """The request's PAYMENT-SIGNATURE, decoded (InvalidPayment when it does not)."""
        if not header:
            return cls()
        if len(header) > MAX_SIGNATURE_CHARS:
            raise InvalidPayment(f"PAYMENT-SIGNATURE is over {MAX_SIGNATURE_CHARS} characters")
        try:
            payload = decode_payment_signature_header(header.strip())
        except Exception as e:  # base64, JSON or schema: the SDK raises each differently
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise InvalidPayment(
                f"PAYMENT-SIGNATURE must be base64 JSON of an x402 PaymentPayload: {first}"
            ) from None
        if not isinstance(payload, PaymentPayload) or payload.x402_version != 2:
            raise InvalidPayment("PAYMENT-SIGNATURE: only x402 version 2 payments are accepted")
        return cls(header.strip(), payload)


_CURRENT: contextvars.ContextVar[CallerPayment | None] = contextvars.ContextVar(
    "dispatch_gateway_payment", default=None
)


def bind(payment: CallerPayment) -> contextvars.Token[CallerPayment | None]:
    """Makes `payment` the one RelayPayer relays for the current task (and the threads it
    starts with asyncio.to_thread); reset(token) when the request is done."""
    return _CURRENT.set(payment)


def reset(token: contextvars.Token[CallerPayment | None]) -> None:
    _CURRENT.reset(token)


class RelayPayer:
    """The gateway network's wallet (client.Payer): it pays with the HTTP caller's own
    signed payment, never with a key of its own."""

    pays_offline = True  # it only matches the caller's payment (client.Payer)

    def pay(self, required_header: str) -> str:
        payment = _CURRENT.get()
        try:
            required = decode_payment_required_header(required_header)
        except Exception as e:
            raise PaymentDeclined(f"the coordinator's payment-required does not parse: {e}") from e
        if not isinstance(required, PaymentRequired):
            raise PaymentDeclined("the coordinator asks for x402 version 1; the gateway needs 2")
        if payment is None:
            raise PaymentDeclined("no HTTP request is paying for this job")
        payment.required = required
        if payment.payload is None:
            payment.outcome = "required"
            raise PaymentDeclined("the HTTP caller sent no PAYMENT-SIGNATURE")
        if payment.relayed:  # asked again after CommitJob: the coordinator refused it
            payment.outcome = "refused"
            raise PaymentDeclined(f"the coordinator refused the payment: {required.error or ''}")
        if _SERVER.find_matching_requirements(required.accepts, payment.payload) is None:
            payment.outcome = "mismatch"
            raise PaymentDeclined("the payment does not match this job's payment requirements")
        payment.relayed = True
        return payment.header


async def required_header(payment: CallerPayment, url: str, description: str) -> str:
    """PAYMENT-REQUIRED for a 402: the coordinator's accepts for this request's job, with
    this request as the resource and why it is asked (x402's `error`)."""
    assert payment.required is not None
    error = {
        "required": "payment_required",
        "mismatch": "no_matching_requirements",
    }.get(payment.outcome) or (payment.required.error or "payment_required")
    answer = await _SERVER.create_payment_required_response(
        payment.required.accepts,
        ResourceInfo(url=url, description=description, mime_type="application/json"),
        error,
    )
    return encode_payment_required_header(answer)


def response_header(payment: types.PaymentReference, job_id: str) -> str:
    """PAYMENT-RESPONSE for a completed job: its payment as the coordinator reports it
    (extra.status "authorized" until it is settled; transaction set once it is)."""
    return encode_payment_response_header(
        SettleResponse(
            success=True,
            payer=payment.payer or None,
            transaction=payment.transaction,
            network=payment.network,
            amount=payment.amount or None,
            extra={"status": payment.status, "jobId": job_id},
        )
    )


def accepted_header(payment: CallerPayment) -> str:
    """PAYMENT-RESPONSE for a stream (sent before the job ends): the coordinator accepted
    the relayed payment for a job that is running. The stream's last chunk has the payment
    as it stands when the job ended."""
    assert payment.payload is not None
    accepted = payment.payload.accepted
    return encode_payment_response_header(
        SettleResponse(
            success=True,
            transaction="",
            network=accepted.network,
            amount=accepted.amount,
            extra={"status": "accepted"},
        )
    )
