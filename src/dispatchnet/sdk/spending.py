"""Spending limits: a job is refused before anything is signed or sent when its price would
pass the per-job limit, or the session's spending (jobs in flight included) plus its price
would pass the per-session limit. Amounts are micro-USD (1 USD = 1,000,000).

Dispatch route: the quote's price is reserved before CommitJob and stays spent only when
the job completed with a payment; a job that did not complete (or ran with payments off)
costs nothing and frees its reservation. Hosted route: an upper bound of the call's cost
(one token per byte of the prompt, plus max_tokens, at the price table's rates) is checked
first, and the estimate from the reported usage is what counts as spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatchnet.sdk.errors import InvalidRequest, SpendingLimitExceeded


@dataclass(frozen=True)
class SpendingLimits:
    """None lifts a limit. The defaults: $0.10 per job, $1.00 per router session."""

    per_job_micros: int | None = 100_000
    per_session_micros: int | None = 1_000_000

    def __post_init__(self) -> None:
        for name in ("per_job_micros", "per_session_micros"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequest(f"{name} must not be negative")

    @classmethod
    def unlimited(cls) -> SpendingLimits:
        return cls(None, None)


class Reservation:
    """A job's price held against the session limit until it is kept or released."""

    def __init__(self, ledger: Spending, micros: int) -> None:
        self._ledger = ledger
        self.micros = micros
        self._open = True

    def keep(self, micros: int | None = None) -> None:
        """The job was paid: `micros` (default: the reserved amount) is spent."""
        if self._open:
            self._open = False
            self._ledger.reserved_micros -= self.micros
            self._ledger.spent_micros += self.micros if micros is None else micros

    def release(self) -> None:
        """The job cost nothing; idempotent (and a no-op after keep)."""
        if self._open:
            self._open = False
            self._ledger.reserved_micros -= self.micros


class Spending:
    """One router session's spending against its limits (not thread-safe: one event loop)."""

    def __init__(self, limits: SpendingLimits) -> None:
        self.limits = limits
        self.spent_micros = 0
        self.reserved_micros = 0

    def reserve(
        self, micros: int, job_limit: int | None = None, what: str = "the job"
    ) -> Reservation:
        """Checks `micros` against the limits (job_limit: a per-call limit, applied with the
        per-job one) and holds it; SpendingLimitExceeded, holding nothing, when it passes."""
        limits = [x for x in (self.limits.per_job_micros, job_limit) if x is not None]
        if limits and micros > min(limits):
            raise SpendingLimitExceeded(
                f"{what} costs {micros} micro-USD, over the per-job limit of {min(limits)}",
                micros,
                min(limits),
                "job",
            )
        session = self.limits.per_session_micros
        if session is not None and self.spent_micros + self.reserved_micros + micros > session:
            raise SpendingLimitExceeded(
                f"{what} costs {micros} micro-USD; with {self.spent_micros} spent and "
                f"{self.reserved_micros} in flight that passes the session limit of {session}",
                micros,
                session,
                "session",
            )
        self.reserved_micros += micros
        return Reservation(self, micros)
