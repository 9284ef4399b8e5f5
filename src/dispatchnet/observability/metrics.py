"""The coordinator's Prometheus metrics (README "Observability" lists them).

CoordinatorMetrics observes the domain (coordinator/observer.py) and the edges (the x402
gateway and chain roles, observability/payments.py); the sampler (sampler.py) sets the
gauges read from the store. Each coordinator has its own registry, served by
MetricsServer on `[observability] metrics_listen`.

Cheap on the hot path: every label set is bounded (job types, states, kinds, outboxes, the
profile's networks, and reasons cut down to a fixed vocabulary by BoundedLabel: never a
job, worker or client id), each child metric is looked up once and then kept, and an
update is a few arithmetic operations under prometheus-client's per-metric lock, which
nothing else holds: scrapes are served on the same event loop (the x402 timings, made in
worker threads, hold it for microseconds).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

from dispatchnet.coordinator.models import (
    ACTIVE_STATES,
    Job,
    JobState,
    Payment,
    PayoutRecord,
    ReceiptBatch,
    WorkerKind,
)
from dispatchnet.coordinator.observer import NullObserver

# Seconds: from a millisecond (a trivial job's dispatch on an idle coordinator) to the
# default queue timeout (600 s) and time limit.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
CHAIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# A reason from outside (a worker's rejection, an x402 refusal) becomes a label value only
# when it looks like a code word; at most this many distinct ones, then "other".
WORD = re.compile(r"[a-z][a-z0-9_]{0,47}")
MAX_REASONS = 32
OTHER = "other"

JOB_TYPES = ("llm", "task")
OUTCOMES = ("completed", "failed", "cancelled")
# the requeue causes JobService and WorkerHub give (the event reason up to its ':')
REQUEUE_CAUSES = (
    "offer_lease_expired", "time_limit_exceeded", "rejected", "failed", "bad_receipt",
    "worker_disconnected", "worker_closed", "worker_replaced", "worker_evicted", "worker_gone",
    "coordinator_restarted",
)  # fmt: skip
REJECT_REASONS = ("busy", "draining", "unsupported", "duplicate", "battery_low", "device_hot")
OUTBOXES = ("settlement", "feedback", "anchoring", "payouts")

M = TypeVar("M", bound=MetricWrapperBase)


class BoundedLabel:
    """Turns outside text into a label value from a bounded set: `known` values, then the
    first `limit` others that look like code words, then "other"."""

    def __init__(self, known: Iterable[str] = (), limit: int = MAX_REASONS) -> None:
        self.known = set(known)
        self.limit = len(self.known) + limit

    def __call__(self, value: str) -> str:
        if value in self.known:
            return value
        if len(self.known) < self.limit and WORD.fullmatch(value):
            self.known.add(value)
            return value
        return OTHER


class Children(Generic[M]):
    """A labelled metric's children, each looked up once (labels() takes the metric's lock
    and builds a tuple every time)."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


def requeue_cause(reason: str) -> str:
    """The cause of a requeue from its event reason ("rejected: busy" -> "rejected")."""
    return reason.split(":", 1)[0].replace(" ", "_")


def chain_label(network: str) -> str:
    return network or "unknown"


class CoordinatorMetrics(NullObserver):
    """Every dispatch_* metric, in its own registry; an Observer of the domain."""

    def __init__(self, profile_name: str = "", version: str = "") -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("dispatch_coordinator", "The coordinator's profile and version.", registry=r).info(
            {"profile": profile_name, "version": version}
        )
        # jobs
        self.committed = Children(
            Counter(
                "dispatch_jobs_committed",
                "Jobs committed (CommitJob or RunJob made a new job).",
                ["type"],
                registry=r,
            )
        )
        self.transitions = Children(
            Counter(
                "dispatch_job_transitions",
                "Jobs entering each state (a requeue enters queued again).",
                ["state", "type"],
                registry=r,
            )
        )
        self.open_jobs = Children(
            Gauge(
                "dispatch_open_jobs",
                "Jobs queued, offered or running in the store "
                "(sampled; counted up to a bound, see README).",
                ["state"],
                registry=r,
            )
        )
        self.dispatch_latency = Children(
            Histogram(
                "dispatch_job_dispatch_seconds",
                "From CommitJob (or RunJob) to the job's first offer to a worker.",
                ["type"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.duration = Children(
            Histogram(
                "dispatch_job_duration_seconds",
                "From CommitJob (or RunJob) to the job's final state (end to end).",
                ["type", "outcome"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.rejected = Children(
            Counter(
                "dispatch_offers_rejected",
                "Offers workers rejected, by their reason.",
                ["reason"],
                registry=r,
            )
        )
        self.requeues = Children(
            Counter(
                "dispatch_job_requeues",
                "Jobs taken back from a worker and queued again, by cause.",
                ["cause"],
                registry=r,
            )
        )
        # workers
        self.workers = Children(
            Gauge(
                "dispatch_workers_connected",
                "Workers connected to this coordinator.",
                ["kind"],
                registry=r,
            )
        )
        self.connections = Children(
            Counter("dispatch_worker_connections", "Worker sessions opened.", ["kind"], registry=r)
        )
        self.disconnections = Children(
            Counter(
                "dispatch_worker_disconnections",
                "Worker sessions ended, by why.",
                ["kind", "reason"],
                registry=r,
            )
        )
        # payments
        self.verify_seconds = Histogram(
            "dispatch_x402_verify_seconds", "x402 payment verification at CommitJob or RunJob "
            "(facilitator or chain simulation), whatever its outcome.", buckets=CHAIN_BUCKETS,
            registry=r)  # fmt: skip
        self.verify_failures = Children(
            Counter(
                "dispatch_x402_verify_failures",
                "x402 payments refused or not verified at CommitJob or RunJob, by reason.",
                ["reason"],
                registry=r,
            )
        )
        self.settle_seconds = Histogram(
            "dispatch_x402_settle_seconds", "One x402 settlement call (a batch of payments, "
            "or one), whatever its outcome.", buckets=CHAIN_BUCKETS, registry=r)  # fmt: skip
        self.settle_failures = Children(
            Counter(
                "dispatch_x402_settle_failures",
                "x402 payments whose settlement failed, "
                "by reason (unavailable: retried later; others are final).",
                ["reason"],
                registry=r,
            )
        )
        self.payments = Children(
            Counter(
                "dispatch_payments",
                "Payments reaching each status (authorized at "
                "commit, then held, settled, released, refund_due, refunded or failed).",
                ["status"],
                registry=r,
            )
        )
        self.payouts = Children(
            Counter(
                "dispatch_payouts",
                "Worker payouts that landed or failed for good.",
                ["chain", "state"],
                registry=r,
            )
        )
        # outboxes and chains
        self.backlog = Children(
            Gauge(
                "dispatch_outbox_backlog",
                "Items waiting in an outbox (settlement, "
                "feedback, anchoring, payouts; sampled, counted up to a bound).",
                ["outbox", "chain"],
                registry=r,
            )
        )
        self.oldest = Children(
            Gauge(
                "dispatch_outbox_oldest_age_seconds",
                "Age of the oldest item waiting in an outbox (0 when empty; sampled).",
                ["outbox", "chain"],
                registry=r,
            )
        )
        self.chain_errors = Children(
            Counter(
                "dispatch_chain_errors",
                "Chain (or facilitator) calls that failed and "
                "will be retried, by chain and by what made them.",
                ["chain", "source"],
                registry=r,
            )
        )
        self.batches_closed = Counter(
            "dispatch_receipt_batches_closed", "Receipt batches closed (Merkle root computed "
            "and stored).", registry=r)  # fmt: skip
        self.batches_anchored = Children(
            Counter(
                "dispatch_receipt_batches_anchored",
                "Receipt batch roots anchored on chain.",
                ["chain"],
                registry=r,
            )
        )
        self.samples_failed = Counter(
            "dispatch_observability_sample_failures", "Store samples (open jobs, backlogs) "
            "that failed; the gauges keep their last values.", registry=r)  # fmt: skip
        self._rejects = BoundedLabel(REJECT_REASONS)
        self._causes = BoundedLabel(REQUEUE_CAUSES)
        self._verify_reasons = BoundedLabel(("invalid_argument", "unavailable", "error"))
        self._settle_reasons = BoundedLabel(("unavailable", "error"))
        self._disconnects = BoundedLabel()
        for t in JOB_TYPES:  # every series exists from the start (rates need a zero)
            self.committed(t)
            for s in JobState:
                self.transitions(s.name.lower(), t)
        for kind in WorkerKind:
            self.workers(kind.name.lower())
            self.connections(kind.name.lower())

    # --- the domain (Observer) ------------------------------------------------------------

    def job_committed(self, job: Job) -> None:
        self.committed(job.spec.job_type.name.lower()).inc()
        self.transitions(JobState.QUEUED.name.lower(), job.spec.job_type.name.lower()).inc()
        if job.payment.status != "none":  # stored with the job: authorized
            self.payments(job.payment.status).inc()

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        to = after.state
        if to is before.state:
            return  # a hold after a restart
        job_type = after.spec.job_type.name.lower()
        self.transitions(to.name.lower(), job_type).inc()
        if to is JobState.OFFERED:
            if after.attempts == 1:
                self.dispatch_latency(job_type).observe(after.updated_at - after.created_at)
        elif to.final:
            self.duration(job_type, to.name.lower()).observe(after.updated_at - after.created_at)
        elif to is JobState.QUEUED and before.state in ACTIVE_STATES:
            self.requeues(self._causes(requeue_cause(reason))).inc()
        if reason.startswith("rejected: "):
            self.rejected(self._rejects(reason[len("rejected: ") :])).inc()

    def worker_connected(self, worker_id: str, kind: WorkerKind) -> None:
        self.workers(kind.name.lower()).inc()
        self.connections(kind.name.lower()).inc()

    def worker_disconnected(self, worker_id: str, kind: WorkerKind, reason: str) -> None:
        self.workers(kind.name.lower()).dec()
        self.disconnections(kind.name.lower(), self._disconnects(reason)).inc()

    def receipt_batch_closed(self, batch: ReceiptBatch, job_ids: Sequence[str]) -> None:
        self.batches_closed.inc()

    def receipt_batch_anchored(self, batch: ReceiptBatch) -> None:
        self.batches_anchored(chain_label(batch.anchor_network)).inc()

    def payment_changed(self, payment: Payment) -> None:
        self.payments(payment.status.value).inc()

    def payout_changed(self, payout: PayoutRecord) -> None:
        self.payouts(chain_label(payout.network), payout.state.value).inc()

    def chain_trouble(self, outbox: str, chain: str, error: str) -> None:
        self.chain_errors(chain_label(chain), outbox).inc()

    # --- the edges (observability/payments.py) ----------------------------------------------

    def verified(self, seconds: float, failure: str | None) -> None:
        """One x402 verification: how long, and why it failed (None: it passed)."""
        self.verify_seconds.observe(seconds)
        if failure is not None:
            self.verify_failures(self._verify_reasons(failure)).inc()

    def settled(self, seconds: float, failures: Sequence[str]) -> None:
        """One settlement call: how long, and the reason of each payment that failed."""
        self.settle_seconds.observe(seconds)
        for reason in failures:
            self.settle_failures(self._settle_reasons(reason)).inc()


class MetricsServer:
    """/metrics for one registry, served on the coordinator's event loop (aiohttp): a scrape
    renders the registry there (about a millisecond), so nothing else ever holds the
    metrics' locks while the loop updates them, and stopping is immediate."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0

    async def start(self, listen: str) -> None:
        host, port = listen.rsplit(":", 1)
        self.host = host.strip("[]")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, int(port)).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        except Exception:  # an Accept header prometheus_client cannot read: plain text
            encoder, content_type = choose_encoder("")
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="Dispatch coordinator: metrics at /metrics\n")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
