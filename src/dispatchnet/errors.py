"""Typed domain errors. The gRPC edge maps each to one status code (api/errors.py).

Domain code raises these and nothing grpc-specific; every other exception that reaches
the edge is logged and reported as INTERNAL with no traceback.
"""

from __future__ import annotations


class DispatchError(Exception):
    """Base of every error a caller is meant to see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DispatchError):
    """The request is malformed or out of range."""


class NotFound(DispatchError):
    """The thing asked for does not exist (or the caller may not know it exists)."""


class PermissionDenied(DispatchError):
    """The caller is authenticated but may not do this."""


class Unauthenticated(DispatchError):
    """The caller did not prove who it is."""


class FailedPrecondition(DispatchError):
    """The system is not in a state that allows this (expired quote, final job...)."""


class AlreadyExists(DispatchError):
    """The thing being created already exists."""


class ResourceExhausted(DispatchError):
    """A quota or limit is exhausted (or, at the payment edge, payment is required)."""


class TooManyOpenJobs(ResourceExhausted):
    """The client already has `limit` open jobs (queued, offered or running): the most
    one client may have at once ([jobs] client_max_open_jobs). The new job is not stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you have {limit} open jobs (queued or running), the most one client may have "
            "at once ([jobs] client_max_open_jobs); retry once one has finished (or cancel one)"
        )
        self.limit = limit


class TooManyPairingCodes(ResourceExhausted):
    """The client already holds `limit` unused, unexpired pairing codes ([pairing]
    max_live_codes). The new code is not stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you hold {limit} unused pairing codes, the most one client may hold at once "
            "([pairing] max_live_codes); use one, or wait for one to expire"
        )
        self.limit = limit


class TooManyPairings(ResourceExhausted):
    """The client (or the worker) of a new pairing has `limit` active pairings already
    ([pairing] max_pairings). Nothing is stored."""

    def __init__(self, limit: int, party: str) -> None:
        super().__init__(
            f"the {party} has {limit} active pairings, the most one {party} may have "
            f"([pairing] max_pairings); the {party} must revoke one first (`dispatch pair "
            "revoke`)"
        )
        self.limit = limit
        self.party = party


class Unavailable(DispatchError):
    """A dependency (chain node, facilitator) is down; retrying later may work."""


class DeadlineExceeded(DispatchError):
    """The caller took too long to do its part (e.g. a worker's Connect handshake)."""


class PaymentRequired(ResourceExhausted):
    """CommitJob needs a payment it does not have: none was sent, or the one sent was
    refused (`reason`: the x402 reason code, e.g. "invalid_exact_evm_insufficient_balance").
    The payment edge answers RESOURCE_EXHAUSTED with a `payment-required` trailer listing
    what it accepts (`required_header`, filled in by the edge)."""

    def __init__(self, message: str, reason: str = "", required_header: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.required_header = required_header


class PaymentReused(PaymentRequired):
    """The payment's one-time authorization was already used for another job."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="payment_already_used")


QUOTE_CHARS = 40


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """Caller input as an error message may show it: short printable text as it is, anything
    else as the repr of its first `limit` characters, with its length when cut. Messages
    never echo a whole request (a multi-MiB id would come back as a multi-MiB status)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isprintable():
        return text
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
