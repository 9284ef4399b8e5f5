"""The SDK's errors: every failure a ComputeRouter call raises is a DispatchError.

No grpc.aio.AioRpcError, x402 or provider SDK exception reaches the caller; each is
mapped to one of these, keeping its message. Each class names the HTTP status a gateway
answers with (`http_status`) and a stable machine-readable `code`.

    DispatchError                     500  anything else (e.g. the coordinator's INTERNAL)
    ├── InvalidRequest                400  bad arguments, INVALID_ARGUMENT, a task no worker knows
    ├── AuthError                     401  UNAUTHENTICATED
    │   └── PermissionDenied          403  not your job
    ├── NotFound                      404
    ├── RateLimited                   429  the coordinator's quote limits (RESOURCE_EXHAUSTED)
    ├── PaymentError                  402
    │   ├── PaymentRequired                the coordinator wants x402 and this network has no wallet
    │   ├── PaymentDeclined                the wallet would not sign (its own per-job cap, asset)
    │   ├── PaymentRejected                the coordinator refused the signed payment
    │   └── SpendingLimitExceeded          the router's per-job / per-session limit; nothing sent
    ├── JobFailed                     502  the job ran and failed (or was cancelled elsewhere)
    ├── ReceiptInvalid                502  the result's receipt or Merkle proof does not verify
    ├── HostedError                   502  every hosted provider tried failed
    ├── NoCapacity                    503  the network could not serve and no fallback applies
    │   └── CoordinatorUnavailable         ... because no coordinator answered
    └── DeadlineExceeded              504  the call's timeout passed (the job was cancelled)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import grpc
from x402.http.utils import decode_payment_required_header

if TYPE_CHECKING:
    from dispatchnet.sdk.result import ComputeResult


class DispatchError(Exception):
    """Base of every SDK error: `code` (stable, snake_case), `message`, `http_status`."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        """A JSON body for HTTP and MCP surfaces: {"error": {"code", "message", ...}}."""
        return {"error": {"code": self.code, "message": self.message, **self._details()}}

    def _details(self) -> dict[str, object]:
        return {}


class InvalidRequest(DispatchError, ValueError):
    """Bad arguments or configuration (also a ValueError), or a request the coordinator
    refused as such."""

    code = "invalid_request"
    http_status = 400


class AuthError(DispatchError):
    code = "unauthenticated"
    http_status = 401


class PermissionDenied(AuthError):
    code = "permission_denied"
    http_status = 403


class NotFound(DispatchError):
    code = "not_found"
    http_status = 404


class RateLimited(DispatchError):
    code = "rate_limited"
    http_status = 429


class PaymentError(DispatchError):
    code = "payment_error"
    http_status = 402


class PaymentRequired(PaymentError):
    """The coordinator asks for an x402 payment and the network was given no wallet."""

    code = "payment_required"


class PaymentDeclined(PaymentError):
    """The wallet would not sign: over its own per-job cap, an asset or network it does not
    know. Nothing was paid."""

    code = "payment_declined"


class PaymentRejected(PaymentError):
    """The coordinator refused the signed payment (`reason` is x402's error, e.g.
    insufficient_funds). Nothing was charged."""

    code = "payment_rejected"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason

    def _details(self) -> dict[str, object]:
        return {"reason": self.reason}


class SpendingLimitExceeded(PaymentError):
    """A job would pass the router's per-job or per-session limit; refused before anything
    was signed or sent. Amounts in micro-USD."""

    code = "spending_limit_exceeded"

    def __init__(self, message: str, price_micros: int, limit_micros: int, scope: str) -> None:
        super().__init__(message)
        self.price_micros = price_micros
        self.limit_micros = limit_micros
        self.scope = scope  # "job" or "session"

    def _details(self) -> dict[str, object]:
        return {
            "price_micros": self.price_micros,
            "limit_micros": self.limit_micros,
            "scope": self.scope,
        }


class JobFailed(DispatchError):
    """The job ended FAILED (failure_code from the coordinator, e.g. task_error,
    max_attempts_exceeded) or CANCELLED by someone else. A job that no worker completed is
    not charged."""

    code = "job_failed"
    http_status = 502

    def __init__(self, message: str, job_id: str, failure_code: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.failure_code = failure_code

    def _details(self) -> dict[str, object]:
        return {"job_id": self.job_id, "failure_code": self.failure_code}


class ReceiptInvalid(DispatchError):
    """The result came back but its receipt (or Merkle proof) does not check out: `problems`
    names each failed check, `result` is the unverified result."""

    code = "receipt_invalid"
    http_status = 502

    def __init__(
        self, message: str, problems: Sequence[str], result: ComputeResult | None = None
    ) -> None:
        super().__init__(message)
        self.problems = list(problems)
        self.result = result

    def _details(self) -> dict[str, object]:
        return {"problems": self.problems}


class HostedError(DispatchError):
    """Hosted providers failed; `failures` is (provider, message) for each one tried."""

    code = "hosted_error"
    http_status = 502

    def __init__(
        self, message: str, failures: Sequence[tuple[str, str]] = (), status_code: int = 0
    ) -> None:
        super().__init__(message)
        self.failures = list(failures)
        self.status_code = status_code

    def _details(self) -> dict[str, object]:
        return {"failures": [{"provider": p, "message": m} for p, m in self.failures]}


@dataclass(frozen=True)
class Skip:
    """Why one network did not serve a job (ComputeResult.skipped, NoCapacity.reasons).

    reason: "coordinator_unavailable", "no_eligible_worker" (the quote counted none),
    "no_paired_worker" (PRIVATE, no paired worker connected), "not_picked_up" (committed,
    no worker took it within pickup_timeout: cancelled, so not charged), "no_network"
    (no network configured for the chain preference)."""

    network: str
    reason: str
    detail: str = ""
    coordinator: str = ""
    job_id: str = ""  # the cancelled job of "not_picked_up"

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


class NoCapacity(DispatchError):
    """No network served the job and no hosted fallback applied (decentralized_only, no
    hosted equivalent for the task, or no provider configured); `reasons` says why each
    network did not serve."""

    code = "no_capacity"
    http_status = 503

    def __init__(self, message: str, reasons: Sequence[Skip] = ()) -> None:
        super().__init__(message)
        self.reasons = list(reasons)

    def _details(self) -> dict[str, object]:
        return {"reasons": [r.to_dict() for r in self.reasons]}


class CoordinatorUnavailable(NoCapacity):
    code = "coordinator_unavailable"


class DeadlineExceeded(DispatchError):
    """The call's timeout passed; the job, if one was committed, was cancelled."""

    code = "deadline_exceeded"
    http_status = 504


_BY_STATUS: dict[grpc.StatusCode, type[DispatchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Codes that mean the coordinator did not answer (try another one)."""


def from_rpc(e: grpc.aio.AioRpcError, where: str) -> DispatchError:
    """The typed error of a failed call to a coordinator; `where` names it (address)."""
    details = e.details() or e.code().name
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CoordinatorUnavailable(f"{where}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        reason = payment_error(e)
        if reason is not None:
            return PaymentRejected(f"{where}: payment refused: {reason or details}", reason)
    return _BY_STATUS.get(code, DispatchError)(f"{where}: {code.name}: {details}")


def payment_error(e: grpc.aio.AioRpcError) -> str | None:
    """x402's error text when the call failed for want of a (good) payment, else None."""
    for key, value in e.trailing_metadata() or ():
        if key != "payment-required":
            continue
        raw = value if isinstance(value, str) else bytes(value).decode()
        try:
            return str(getattr(decode_payment_required_header(raw), "error", "") or "")
        except Exception:  # a trailer that does not parse still means "pay"
            return ""
    return None
