"""The Observer port: what the coordinator tells the operators' tools (metrics, traces,
the dashboard; implemented in observability/), and NullObserver, which tells nobody.

Every call happens on the event loop, on the hot path of the job it is about, after the
change it reports is durable (but job_offering and job_not_made, which say so): an
implementation must return at once, never block, never await, never call the store or a
chain, and never raise.
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

    def job_offering(self, queued: Job, offered: Job) -> None:
        """A new job's offer goes out while the job is written (in the committing call's
        context, before anything is durable): job_committed(queued) and job_moved(queued,
        offered) follow once it is stored, or job_not_made(offered) if it is not."""
        ...

    def job_not_made(self, job: Job) -> None:
        """The job job_offering announced was not stored (its write failed, or its key
        found a job already made)."""
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

    def job_offering(self, queued: Job, offered: Job) -> None:
        pass

    def job_not_made(self, job: Job) -> None:
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
