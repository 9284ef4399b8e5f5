"""RelayedPayment: a payer for one call that passes on a payment its caller signed.

A gateway in front of the network (the MCP server, an HTTP gateway) lets its callers pay
for their own jobs without holding their money: the caller signs an x402 payment for the
coordinator's own requirements (payTo the coordinator, the quote's price), and the
gateway sends it with CommitJob as it is. The coordinator verifies it, settles it only
once a worker completed the job (or refunds it on chain), and its receipt names the
caller as the payer.

    relay = RelayedPayment.from_payload(payload)   # or RelayedPayment() to learn the price
    try:
        result = await router.run_task("echo", "hi", payer=relay)
    except PaymentError:
        if relay.required is None:
            raise
        ...  # answer the caller with relay.required (x402's PaymentRequired): pay this

A RelayedPayment without a payment, or whose payment the coordinator refused, declines
(the router raises PaymentDeclined or PaymentRejected) and keeps what the coordinator
asked for in `required`. It never signs anything itself, and it sends its payment at most
once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentRequired

from dispatchnet.client import PaymentDeclined
from dispatchnet.sdk.errors import InvalidRequest


class RelayedPayment:
    """A Payer (ComputeRouter's `payer=` call option) for one call: the caller's x402
    payment, sent as CommitJob's `payment-signature`.

    signature: the `payment-signature` value (base64 JSON of an x402 v2 PaymentPayload,
    what x402's HTTP transport sends as PAYMENT-SIGNATURE); "" for none, to learn what
    the job costs."""

    pays_offline = True  # it hands on the caller's signature (client.Payer)

    def __init__(self, signature: str = "") -> None:
        self.signature = signature
        self.required: PaymentRequired | None = None
        """What the coordinator asked for last: the quote's requirements, or, after it
        refused the payment, its refusal (`error` says why). None: it asked for nothing
        (payments are off there, or the call never got as far as CommitJob)."""
        self.sent = False
        """Whether the payment went to the coordinator."""

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any] | PaymentPayload) -> RelayedPayment:
        """From an x402 PaymentPayload (a parsed object, or its JSON as a mapping: x402's
        MCP transport carries it in `_meta["x402/payment"]`). InvalidRequest when it is
        not an x402 version 2 payment."""
        try:
            parsed = (
                payload
                if isinstance(payload, PaymentPayload)
                else PaymentPayload.model_validate(dict(payload))
            )
        except (ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidRequest(f"the payment is not an x402 PaymentPayload: {first}") from None
        if parsed.x402_version != 2:
            raise InvalidRequest("only x402 version 2 payments are accepted")
        return cls(encode_payment_signature_header(parsed))

    def pay(self, required_header: str) -> str:
        """The caller's payment, the first time the coordinator asks; PaymentDeclined
        without one, or when asked again (the coordinator refused it)."""
        try:
            required = decode_payment_required_header(required_header)
        except Exception as e:
            raise PaymentDeclined(f"the payment-required value does not parse: {e}") from None
        if not isinstance(required, PaymentRequired):
            raise PaymentDeclined("only x402 version 2 payments are supported")
        self.required = required
        if not self.signature:
            raise PaymentDeclined("the caller has not paid yet")
        if self.sent:
            raise PaymentDeclined(
                f"the coordinator refused the caller's payment: {required.error or 'no reason'}"
            )
        self.sent = True
        return self.signature
