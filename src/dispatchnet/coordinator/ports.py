"""Protocols the coordinator's domain services depend on (implemented elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from dispatchnet.coordinator.models import (
    Balance,
    Earning,
    Job,
    PayoutDue,
    PayoutRecord,
    PayoutRowState,
    Receipt,
    Result,
)


class ReceiptNotary(Protocol):
    """Checks a worker's signed receipt body for a result and countersigns it."""

    @property
    def public_key(self) -> bytes: ...

    def countersign(
        self,
        job: Job,
        attempt: int,
        worker_public_key: bytes,
        result: Result,
        body: bytes,
        signature: bytes,
        worker_agent_id: str = "",
        *,
        offered_at: float,
        now: float,
    ) -> Receipt:
        """The countersigned receipt for a result of the job's `attempt`; raises
        InvalidArgument listing what does not match (worker_agent_id: the session's
        verified agent id, which the body must carry). The body's times must fit the
        attempt: started no earlier than `offered_at` and completed no later than `now`,
        each within the notary's allowed clock skew, and started before completed."""
        ...


class ReputationSource(Protocol):
    """Scores in [0, 1]; must answer from memory (never a chain call on the hot path)."""

    def score(self, worker_id: str) -> float: ...

    async def warm(self, worker_id: str) -> None:
        """Loads or refreshes a worker's score off the hot path (e.g. when it connects)."""
        ...

    def record(self, worker_id: str, success: bool) -> None:
        """Takes note of a finished attempt in memory (the store counts it durably in the
        transaction of the job's transition)."""
        ...


class JobListener(Protocol):
    """What the job service tells the worker hub."""

    def job_queued(self, job: Job) -> None:
        """`job` became QUEUED here (dispatching may be possible)."""
        ...

    def job_released(
        self, job: Job, worker_id: str, attempt: int, reason: str, tell_worker: bool
    ) -> None:
        """worker_id no longer holds the job's attempt; tell_worker: send it a cancel."""
        ...


class CompletionListener(Protocol):
    """Told about every job that completes (e.g. the receipt batcher's wake-up). Called on
    the hot path: it must return at once and never block or call a chain."""

    def job_completed(self, job: Job) -> None: ...


class EarningsLedger(Protocol):
    """The workers' credits (written by the store with each settlement)."""

    async def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        """A worker's credits newest first, those before the (credited_at, job_id) cursor."""
        ...

    async def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        """Each worker's earnings per (network, asset), in one read."""
        ...

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        """A worker's payouts, newest first."""
        ...


class PayoutLedger(Protocol):
    """The payouts table and the balances it debits (written by coordinator/payouts.py)."""

    async def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]:
        """Workers with an agent id whose unpaid balance on `network` is >= min_amount, or
        part of it credited at or before unpaid_before; longest waiting first, those past
        the `after` cursor (PayoutDue.cursor of the previous page)."""
        ...

    async def create_payout(self, payout: PayoutRecord) -> bool:
        """Records the payout and debits its amount from the worker's balance in one
        transaction; False (nothing written) when the balance is below the amount."""
        ...

    async def update_payout(
        self, payout_id: str, from_states: Sequence[PayoutRowState], changes: dict[str, Any]
    ) -> PayoutRecord | None:
        """Compare-and-set on the payout's state (changes: state, raw, transaction, error,
        updated_at); None when its state was not one of from_states. Moving to FAILED
        returns its amount to the worker's balance in the same transaction."""
        ...

    async def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]:
        """Payouts on `network` not known to have landed or failed, oldest first."""
        ...

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        """A worker's payouts, newest first."""
        ...
