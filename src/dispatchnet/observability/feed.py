"""Feed: what the operator dashboard shows, kept up to date from the domain's Observer calls
and the sampler's store reads, and turned into one JSON snapshot per change.

Recent jobs are the last RECENT_JOBS jobs this coordinator saw move (since it started),
with their payment and receipt batch; the job flow counts jobs since start, with rates over
the last minute; workers are the connected ones (their earnings from the last sample);
backlogs and open-job counts come from the last sample. Never a payload, a result or a
whole client id: a job's type, task name or model, its state and money only.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from dispatchnet.coordinator.models import (
    Job,
    JobType,
    Payment,
    ReceiptBatch,
    WorkerKind,
)
from dispatchnet.coordinator.observer import NullObserver
from dispatchnet.observability.sampler import Sample

RECENT_JOBS = 50
WORKERS_SHOWN = 50
RATE_WINDOW_SECONDS = 60.0
CLIENT_ID_CHARS = 16


@dataclass
class JobRow:
    job_id: str
    job_type: str
    what: str  # the task's name or the LLM's model
    state: str
    reason: str
    client: str  # the first characters of the client id
    price_micros: int
    currency: str
    created_at: float
    updated_at: float
    attempts: int = 0
    worker_id: str = ""
    payment: dict[str, str] = field(default_factory=dict)
    receipt: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerView:
    """What the dashboard shows of a connected worker (the hub's session, read on the loop)."""

    worker_id: str
    kind: WorkerKind
    agent_id: str
    reputation: float
    load: int
    slots: int
    draining: bool
    connected_at: float


class Feed(NullObserver):
    def __init__(
        self,
        explorer_tx_urls: Mapping[str, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.explorers = dict(explorer_tx_urls)
        self.clock = clock
        self.started_at = clock()
        self.version = 0  # one more per change
        self.jobs: OrderedDict[str, JobRow] = OrderedDict()
        self._batches: dict[str, set[str]] = {}  # batch_id -> its jobs among self.jobs
        self.totals = {"committed": 0, "completed": 0, "failed": 0, "cancelled": 0}
        self._history: deque[tuple[float, dict[str, int]]] = deque(
            [(self.started_at, dict(self.totals))]
        )
        self.sample = Sample()
        self.chain_errors: dict[tuple[str, str], tuple[str, float]] = {}
        self._listeners: set[asyncio.Event] = set()
        # asks the sampler for fresh open-job counts (set by runtime.py)
        self.wants_sample: Callable[[], None] = lambda: None

    # --- change notification ------------------------------------------------------------

    def subscribe(self) -> asyncio.Event:
        """An event set at every change (clear it after reading a snapshot)."""
        ev = asyncio.Event()
        ev.set()
        self._listeners.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._listeners.discard(ev)

    def _touch(self) -> None:
        self.version += 1
        for ev in self._listeners:
            ev.set()

    # --- Observer -------------------------------------------------------------------------

    def _row(self, job: Job, reason: str) -> JobRow:
        row = self.jobs.get(job.job_id)
        if row is None:
            spec = job.spec
            row = self.jobs[job.job_id] = JobRow(
                job_id=job.job_id,
                job_type=spec.job_type.name.lower(),
                what=(spec.llm_model or "any model")
                if spec.job_type is JobType.LLM
                else spec.task_name,
                state="",
                reason="",
                client=job.client_id[:CLIENT_ID_CHARS],
                price_micros=job.price_micros,
                currency=job.currency,
                created_at=job.created_at,
                updated_at=job.updated_at,
            )
            while len(self.jobs) > RECENT_JOBS:
                old_id, old = self.jobs.popitem(last=False)
                batch = old.receipt.get("batch_id")
                if batch and batch in self._batches:
                    self._batches[batch].discard(old_id)
                    if not self._batches[batch]:
                        del self._batches[batch]
        else:
            self.jobs.move_to_end(job.job_id)
        row.state = job.state.name.lower()
        row.reason = reason
        row.updated_at = job.updated_at
        row.attempts = job.attempts
        row.worker_id = job.worker_id
        if job.payment.status != "none" and not row.payment:
            self._payment(row, job.payment.network, job.payment.status,
                          job.payment.transaction, job.payment.refund_transaction)  # fmt: skip
        return row

    def job_committed(self, job: Job) -> None:
        self.totals["committed"] += 1
        self._row(job, "committed")
        self._touch()
        if self._listeners:
            self.wants_sample()

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        if after.state is before.state:
            return
        if after.state.final:
            self.totals[after.state.name.lower()] += 1
        self._row(after, reason)
        self._touch()
        if self._listeners:  # someone watches: the open-job counts follow
            self.wants_sample()

    def worker_connected(self, worker_id: str, kind: WorkerKind) -> None:
        self._touch()

    def worker_disconnected(self, worker_id: str, kind: WorkerKind, reason: str) -> None:
        self._touch()

    def payment_changed(self, payment: Payment) -> None:
        row = self.jobs.get(payment.job_id)
        if row is not None:
            self._payment(row, payment.network, payment.status.value, payment.transaction,
                          payment.refund_transaction)  # fmt: skip
            self._touch()

    def _payment(self, row: JobRow, network: str, status: str, tx: str, refund: str) -> None:
        row.payment = {"network": network, "status": status}
        if tx:
            row.payment |= {"transaction": tx, "transaction_url": self.tx_url(network, tx)}
        if refund:
            row.payment |= {"refund": refund, "refund_url": self.tx_url(network, refund)}

    def receipt_batch_closed(self, batch: ReceiptBatch, job_ids: Sequence[str]) -> None:
        mine = {j for j in job_ids if j in self.jobs}
        if not mine:
            return
        self._batches[batch.batch_id] = mine
        for job_id in mine:
            self._receipt(self.jobs[job_id], batch)
        self._touch()

    def receipt_batch_anchored(self, batch: ReceiptBatch) -> None:
        for job_id in self._batches.get(batch.batch_id, ()):
            self._receipt(self.jobs[job_id], batch)
        self._touch()

    def _receipt(self, row: JobRow, batch: ReceiptBatch) -> None:
        row.receipt = {"batch_id": batch.batch_id, "anchor": batch.anchor_status.value}
        if batch.anchor_transaction:
            network, tx = batch.anchor_network, batch.anchor_transaction
            row.receipt |= {
                "network": network,
                "transaction": tx,
                "transaction_url": self.tx_url(network, tx),
            }

    def chain_trouble(self, outbox: str, chain: str, error: str) -> None:
        self.chain_errors[(outbox, chain)] = (error[:300], self.clock())
        self._touch()

    def sampled(self, sample: Sample) -> None:
        """Sampler listener (also the clock of the rates' history)."""
        self.sample = sample
        self._record(self.clock())
        self._touch()

    # --- the snapshot -----------------------------------------------------------------------

    def tx_url(self, network: str, tx: str) -> str:
        """The explorer's page of a transaction ("" when the profile names no explorer)."""
        template = self.explorers.get(network)
        return template.replace("{tx}", quote(tx, safe="")) if template else ""

    def _record(self, now: float) -> None:
        """A point of the totals' history (one a second at most; each sample and each
        snapshot adds one), keeping the newest one at least a minute old."""
        h = self._history
        if now - h[-1][0] >= 1.0:
            h.append((now, dict(self.totals)))
        while len(h) > 1 and now - h[1][0] >= RATE_WINDOW_SECONDS:
            h.popleft()

    def _rates(self, now: float) -> dict[str, float]:
        """Jobs in the last minute: since the newest point of the history at least a
        minute old (a sample interval more at most), or since start in a coordinator's
        first minute (a count, never scaled up to a minute)."""
        self._record(now)
        _, base = self._history[0]
        return {k: float(v - base[k]) for k, v in self.totals.items()}

    def snapshot(self, workers: Sequence[WorkerView], about: Mapping[str, Any]) -> dict[str, Any]:
        now = self.clock()
        s = self.sample
        shown = sorted(workers, key=lambda w: w.connected_at)[:WORKERS_SHOWN]
        return {
            "version": self.version,
            "now": now,
            "coordinator": {**about, "uptime_seconds": round(now - self.started_at, 1)},
            "flow": {
                "open": {k: s.open_jobs.get(k, 0) for k in ("queued", "offered", "running")},
                "open_capped": s.open_capped,
                "sampled_at": s.at,
                "totals": dict(self.totals),
                "per_minute": self._rates(now),
            },
            "workers": {
                "connected": len(workers),
                "by_kind": {
                    k.name.lower(): sum(1 for w in workers if w.kind is k) for k in WorkerKind
                },
                "shown": [self._worker(w, now) for w in shown],
            },
            "jobs": [self._job(r) for r in reversed(self.jobs.values())],
            "backlogs": [
                {
                    "outbox": b.outbox,
                    "chain": b.chain,
                    "count": b.count,
                    "capped": b.capped,
                    "oldest_age_seconds": round(b.oldest_age_seconds, 1),
                    "last_error": self.chain_errors.get((b.outbox, b.chain), ("", 0.0))[0],
                }
                for b in s.backlogs
            ],
        }

    def _worker(self, w: WorkerView, now: float) -> dict[str, Any]:
        return {
            "worker_id": w.worker_id,
            "kind": w.kind.name.lower(),
            "agent_id": w.agent_id,
            "reputation": round(w.reputation, 3),
            "load": w.load,
            "slots": w.slots,
            "draining": w.draining,
            "connected_seconds": round(now - w.connected_at, 1),
            "earnings": [
                {
                    "network": b.network,
                    "asset": b.asset,
                    "earned": str(b.earned),
                    "balance": str(b.balance),
                }
                for b in self.sample.earnings.get(w.worker_id, [])
            ],
        }

    @staticmethod
    def _job(r: JobRow) -> dict[str, Any]:
        return {
            "job_id": r.job_id,
            "type": r.job_type,
            "what": r.what,
            "state": r.state,
            "reason": r.reason,
            "client": r.client,
            "worker_id": r.worker_id,
            "attempts": r.attempts,
            "price_micros": r.price_micros,
            "currency": r.currency,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "seconds": round(r.updated_at - r.created_at, 3),
            "payment": r.payment,
            "receipt": r.receipt,
        }
