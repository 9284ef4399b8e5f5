"""Observers: the coordinator's Observer (coordinator/observer.py) that hands each call to
every part that observes (metrics, traces, the dashboard's feed), so that a part that fails
costs nothing but its own view: the error is logged (once a minute at most) and the domain
never sees it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from dispatchnet.coordinator.models import Job, Payment, PayoutRecord, ReceiptBatch, WorkerKind
from dispatchnet.coordinator.observer import Observer

log = logging.getLogger("dispatch.observability")

ERROR_LOG_SECONDS = 60.0


class Observers:
    def __init__(self, parts: Sequence[Observer]) -> None:
        self.parts = tuple(parts)
        self._logged_at = -ERROR_LOG_SECONDS

    def _failed(self, part: Observer, call: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= ERROR_LOG_SECONDS:
            self._logged_at = now
            log.error("%s.%s failed (more are not logged for a minute)",
                      type(part).__name__, call, exc_info=e)  # fmt: skip

    def job_committed(self, job: Job) -> None:
        for p in self.parts:
            try:
                p.job_committed(job)
            except Exception as e:
                self._failed(p, "job_committed", e)

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        for p in self.parts:
            try:
                p.job_moved(before, after, reason)
            except Exception as e:
                self._failed(p, "job_moved", e)

    def job_offering(self, queued: Job, offered: Job) -> None:
        for p in self.parts:
            try:
                p.job_offering(queued, offered)
            except Exception as e:
                self._failed(p, "job_offering", e)

    def job_not_made(self, job: Job) -> None:
        for p in self.parts:
            try:
                p.job_not_made(job)
            except Exception as e:
                self._failed(p, "job_not_made", e)

    def worker_connected(self, worker_id: str, kind: WorkerKind) -> None:
        for p in self.parts:
            try:
                p.worker_connected(worker_id, kind)
            except Exception as e:
                self._failed(p, "worker_connected", e)

    def worker_disconnected(self, worker_id: str, kind: WorkerKind, reason: str) -> None:
        for p in self.parts:
            try:
                p.worker_disconnected(worker_id, kind, reason)
            except Exception as e:
                self._failed(p, "worker_disconnected", e)

    def receipt_batch_closed(self, batch: ReceiptBatch, job_ids: Sequence[str]) -> None:
        for p in self.parts:
            try:
                p.receipt_batch_closed(batch, job_ids)
            except Exception as e:
                self._failed(p, "receipt_batch_closed", e)

    def receipt_batch_anchored(self, batch: ReceiptBatch) -> None:
        for p in self.parts:
            try:
                p.receipt_batch_anchored(batch)
            except Exception as e:
                self._failed(p, "receipt_batch_anchored", e)

    def payment_changed(self, payment: Payment) -> None:
        for p in self.parts:
            try:
                p.payment_changed(payment)
            except Exception as e:
                self._failed(p, "payment_changed", e)

    def payout_changed(self, payout: PayoutRecord) -> None:
        for p in self.parts:
            try:
                p.payout_changed(payout)
            except Exception as e:
                self._failed(p, "payout_changed", e)

    def chain_trouble(self, outbox: str, chain: str, error: str) -> None:
        for p in self.parts:
            try:
                p.chain_trouble(outbox, chain, error)
            except Exception as e:
                self._failed(p, "chain_trouble", e)
