"""The Observer port: what the coordinator tells the operators' tools (metrics, traces,
the dashboard; implemented in observability/), and NullObserver, which tells nobody.

Every call happens on the event loop, on the hot path of the job it is about, after the
change it reports is durable: an implementation must return at once, never block, never
await, never call the store or a chain, and never raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dispatchnet.coordinator.models import (
    Job,
    Payment,
    PayoutRecord,
    ReceiptBatch,
    WorkerKind,
)


class Observer(Protocol):
    def job_committed(self, job: Job) -> None:
        """CommitJob made a new QUEUED job (called in the CommitJob call's context)."""
        ...

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        """A job's transition (after.state may equal before.state: a hold after a
        coordinator restart); reason is its event's reason."""
        ...

    def worker_connected(self, worker_id: str, kind: WorkerKind) -> None: ...

    def worker_disconnected(self, worker_id: str, kind: WorkerKind, reason: str) -> None:
        """Called once per session that worker_connected announced."""
        ...

    def receipt_batch_closed(self, batch: ReceiptBatch, job_ids: Sequence[str]) -> None: ...

    def receipt_batch_anchored(self, batch: ReceiptBatch) -> None: ...

    def payment_changed(self, payment: Payment) -> None:
        """A job's payment moved on (its new status, transaction, refund)."""
        ...

    def payout_changed(self, payout: PayoutRecord) -> None:
        """A payout reached a final state (landed or failed)."""
        ...

    def chain_trouble(self, outbox: str, chain: str, error: str) -> None:
        """An outbox loop (settlement, feedback, anchoring, payouts) backed off after chain
        trouble on `chain` (a CAIP-2 network, "" when unknown)."""
        ...


class NullObserver:
    """Tells nobody; also a base class for observers interested in a few calls."""

    def job_committed(self, job: Job) -> None:
        pass

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        pass

    def worker_connected(self, worker_id: str, kind: WorkerKind) -> None:
        pass

    def worker_disconnected(self, worker_id: str, kind: WorkerKind, reason: str) -> None:
        pass

    def receipt_batch_closed(self, batch: ReceiptBatch, job_ids: Sequence[str]) -> None:
        pass

    def receipt_batch_anchored(self, batch: ReceiptBatch) -> None:
        pass

    def payment_changed(self, payment: Payment) -> None:
        pass

    def payout_changed(self, payout: PayoutRecord) -> None:
        pass

    def chain_trouble(self, outbox: str, chain: str, error: str) -> None:
        pass


NULL_OBSERVER = NullObserver()
