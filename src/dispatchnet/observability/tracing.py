"""OpenTelemetry traces (README "Observability"): off by default, configured by the
standard OTEL_* environment variables, through the official SDK and gRPC instrumentation.

A job's trace: the client's CommitJob span -> the coordinator's CommitJob span, with the
payment's `x402.verify` under it, and the job's phases as its children (`job queued`,
`job offered`, `job running`) -> the worker's `job execute` (a child of `job offered`: its
context travels in JobOffer.traceparent) -> the coordinator's `job result` (a child of the
worker's span, whose context comes back in JobCompleted/JobFailed.traceparent) -> the
payment's `x402.settle`. The coordinator keeps each job's context in memory (the last
KEEP_JOBS jobs): a job committed before a restart or on another coordinator starts a trace
of its own here.

Tracing is on when OTEL_TRACES_EXPORTER names an exporter ("otlp": OTLP over HTTP/protobuf,
configured by OTEL_EXPORTER_OTLP_*; "console": spans printed on stdout), or when an OTLP
endpoint variable is set; off when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none.
Sampling (OTEL_TRACES_SAMPLER), batching (OTEL_BSP_*), the service name and resource
attributes (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) follow the SDK's own variables.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import dispatchnet
from dispatchnet.coordinator.models import ACTIVE_STATES, Job, JobState, Payment
from dispatchnet.coordinator.observer import NullObserver
from dispatchnet.protocol import MAX_TRACEPARENT_CHARS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("dispatch.tracing")

KEEP_JOBS = 10_000  # jobs whose trace context the coordinator keeps
TRACER = "dispatchnet"
PROPAGATOR = TraceContextTextMapPropagator()
# gRPC methods never traced: a worker's Connect stream lives as long as its session, and
# health checks are noise.
UNTRACED_METHODS = ("Connect", "Check", "Watch")


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this build cannot do."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def exporters_from_environment() -> list[str]:
    """The trace exporters the OTEL_* variables ask for ([] when tracing is off)."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names:
        endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = ["otlp"] if endpoint else []
    return [n for n in names if n != "none"]


def _exporter(name: str) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol != "http/protobuf":
            raise TracingConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this build exports OTLP over "
                "http/protobuf only (the collector's port 4318)"
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise TracingConfigError(
        f"OTEL_TRACES_EXPORTER={name}: this build knows otlp, console and none"
    )


def provider_from_environment(service_name: str) -> SdkTracerProvider | None:
    """A TracerProvider exporting as the OTEL_* variables say; None when tracing is off.
    Raises TracingConfigError for an exporter or protocol this build lacks."""
    names = exporters_from_environment()
    if not names:
        return None
    # the SDK only when tracing is on (the API alone is light)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = _env("OTEL_SERVICE_NAME") or "service.name=" in _env("OTEL_RESOURCE_ATTRIBUTES")
    attributes = {} if named else {"service.name": service_name}
    attributes["service.version"] = dispatchnet.__version__
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


_configured: SdkTracerProvider | None = None
_lock = threading.Lock()


def configure(service_name: str) -> TracerProvider | None:
    """Sets this process's tracing up from the environment (once; later calls return the
    first result). The `dispatch` command calls it for every command."""
    global _configured
    with _lock:
        if _configured is None:
            _configured = provider_from_environment(service_name)
            if _configured is not None:
                trace.set_tracer_provider(_configured)
                log.info(
                    "tracing on: exporting spans (%s)", ", ".join(exporters_from_environment())
                )
        return _configured


def process_provider() -> TracerProvider | None:
    """The provider configure() made, else the application's own SDK provider (an SDK
    user who set one up), else None: no tracing."""
    if _configured is not None:
        return _configured
    global_provider = trace.get_tracer_provider()
    if isinstance(global_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return global_provider


def shutdown() -> None:
    """Flushes and stops configure()'s provider (at process exit)."""
    if _configured is not None:
        _configured.shutdown()


# --- gRPC ------------------------------------------------------------------------------------


def _traced(details: Any) -> bool:
    method = str(getattr(details, "method", "") or "")
    return method.rsplit("/", 1)[-1] not in UNTRACED_METHODS


def server_interceptor(provider: TracerProvider) -> Any:
    """The gRPC instrumentation's server interceptor (place it first)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(tracer_provider=provider, filter_=_traced)  # type: ignore[no-untyped-call]


def client_interceptors(provider: TracerProvider) -> list[Any]:
    """The gRPC instrumentation's client interceptors, for a channel."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    made = aio_client_interceptors(tracer_provider=provider, filter_=_traced)  # type: ignore[no-untyped-call]
    return list(made)


# --- carrying a context in a message -------------------------------------------------------


def traceparent(span: Span) -> str:
    """span's context as a W3C traceparent ("" for a span that is not recording)."""
    if not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    value = carrier.get("traceparent", "")
    return value if len(value) <= MAX_TRACEPARENT_CHARS else ""


def context_of(value: str) -> Context | None:
    """The context a traceparent carries; None for an empty or malformed one."""
    if not value:
        return None
    ctx = PROPAGATOR.extract({"traceparent": value})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


# --- the coordinator's spans of a job ------------------------------------------------------


@dataclass
class _JobTrace:
    root: Context  # the job's CommitJob (or a span of its own)
    phase: Span | None = None  # the open `job <state>` span
    offer: str = ""  # traceparent of the `job offered` span, for the worker
    result: tuple[Context, int] | None = None  # the worker's span, when its result came
    attributes: dict[str, Any] = field(default_factory=dict)
    early: bool = False  # opened by job_offering: its commit and offer are traced already


class VerifySpan:
    def __init__(self, span: Span) -> None:
        self.span = span

    def end_with(self, failure: str | None) -> None:
        if failure is not None:
            self.span.set_status(Status(StatusCode.ERROR, failure))
            self.span.set_attribute("dispatch.x402.failure", failure)
        self.span.end()


class JobTracing(NullObserver):
    """The coordinator's spans of each job; an Observer of the domain."""

    def __init__(self, provider: TracerProvider, keep: int = KEEP_JOBS) -> None:
        self.tracer = provider.get_tracer(TRACER, dispatchnet.__version__)
        self.keep = keep
        self._jobs: OrderedDict[str, _JobTrace] = OrderedDict()  # open jobs
        self._done: OrderedDict[str, Context] = OrderedDict()  # finished: for x402.settle

    def _attributes(self, job: Job) -> dict[str, Any]:
        return {
            "dispatch.job_id": job.job_id,
            "dispatch.job_type": job.spec.job_type.name.lower(),
            "dispatch.client_id": job.client_id[:16],
        }

    def _own_root(self, job: Job, note: str) -> Context:
        """A `job` span to hang the job's spans on, when no CommitJob span can be."""
        span = self.tracer.start_span("job", attributes=self._attributes(job))
        span.set_attribute("dispatch.note", note)
        span.end()
        return trace.set_span_in_context(span)

    def _trace_of(self, job: Job) -> _JobTrace:
        t = self._jobs.get(job.job_id)
        if t is None:  # committed before a restart, or elsewhere: a trace of its own here
            root = self._own_root(job, "committed before this coordinator saw it")
            t = self._remember(job, root)
        return t

    def _remember(self, job: Job, root: Context) -> _JobTrace:
        t = self._jobs[job.job_id] = _JobTrace(root, attributes=self._attributes(job))
        while len(self._jobs) > self.keep:
            _, old = self._jobs.popitem(last=False)
            if old.phase is not None:
                old.phase.end()
        return t

    def job_offering(self, queued: Job, offered: Job) -> None:
        # the offer leaves before the job is stored: its traceparent must exist by then
        self.job_committed(queued)
        self.job_moved(queued, offered, "offered")
        self._jobs[offered.job_id].early = True

    def job_not_made(self, job: Job) -> None:
        t = self._jobs.pop(job.job_id, None)
        if t is not None and t.phase is not None:
            t.phase.set_attribute("dispatch.next", "not made")
            t.phase.end()

    def job_committed(self, job: Job) -> None:
        known = self._jobs.get(job.job_id)
        if known is not None and known.early:  # traced at its offer (job_offering)
            return
        root = otel_context.get_current()  # CommitJob's
        if not trace.get_current_span(root).get_span_context().is_valid:
            root = self._own_root(job, "CommitJob was not traced")
        t = self._remember(job, root)
        self._open(t, JobState.QUEUED, job)

    def _open(self, t: _JobTrace, state: JobState, job: Job) -> None:
        attributes = {**t.attributes, "dispatch.attempt": job.attempts}
        if job.worker_id and state in ACTIVE_STATES:
            attributes["dispatch.worker_id"] = job.worker_id[:16]
        t.phase = self.tracer.start_span(f"job {state.name.lower()}", t.root,
                                         attributes=attributes)  # fmt: skip
        t.offer = traceparent(t.phase) if state is JobState.OFFERED else ""

    def job_moved(self, before: Job, after: Job, reason: str) -> None:
        if after.state is before.state:
            return
        t = self._trace_of(after)
        if t.early:  # its offer at commit, traced by job_offering already
            t.early = False
            if after.state is JobState.OFFERED:
                return
        if t.phase is not None:
            t.phase.set_attribute("dispatch.next", f"{after.state.name.lower()}: {reason}")
            t.phase.end()
            t.phase = None
        if not after.state.final:
            self._open(t, after.state, after)
            return
        del self._jobs[after.job_id]
        last = t.root
        if t.result is not None:  # the worker's span, then ours of its result
            parent, received_ns = t.result
            span = self.tracer.start_span(
                "job result", parent, start_time=received_ns, attributes=t.attributes
            )
            span.set_attribute("dispatch.outcome", f"{after.state.name.lower()}: {reason}")
            if after.state is not JobState.COMPLETED:
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
            last = trace.set_span_in_context(span)
        self._done[after.job_id] = last
        while len(self._done) > self.keep:
            self._done.popitem(last=False)

    # --- the worker stream's (api/servicers.py) -------------------------------------------

    def offer_traceparent(self, job_id: str) -> str:
        """The traceparent to send with the job's offer ("" when none)."""
        t = self._jobs.get(job_id)
        return t.offer if t is not None else ""

    def worker_result(self, job_id: str, value: str) -> None:
        """A worker's result for the job arrived, with its span's traceparent."""
        t = self._jobs.get(job_id)
        ctx = context_of(value)
        if t is not None and ctx is not None:
            t.result = (ctx, time.time_ns())

    # --- payments (observability/payments.py, in worker threads) ---------------------------

    def verify_span(self, payment: Payment) -> VerifySpan:
        """`x402.verify`, a child of the current context (CommitJob's)."""
        return VerifySpan(
            self.tracer.start_span(
                "x402.verify",
                attributes={"dispatch.network": payment.network, "dispatch.amount": payment.amount},
            )
        )

    def settle_spans(
        self,
        payments: Sequence[Payment],
        outcome: Mapping[str, object],
        start_ns: int,
        end_ns: int,
    ) -> None:
        """`x402.settle` in each payment's job trace (one settlement call may carry many)."""
        for p in payments:
            parent = self._done.get(p.job_id)
            if parent is None:
                t = self._jobs.get(p.job_id)
                parent = t.root if t is not None else None
            span = self.tracer.start_span(
                "x402.settle",
                parent,
                kind=SpanKind.CLIENT,
                start_time=start_ns,
                attributes={
                    "dispatch.job_id": p.job_id,
                    "dispatch.network": p.network,
                    "dispatch.batch_size": len(payments),
                },
            )
            result = outcome.get(p.job_id)
            if isinstance(result, str):
                span.set_attribute("dispatch.transaction", result)
            else:
                why = str(getattr(result, "reason", "no result"))
                span.set_status(Status(StatusCode.ERROR, why))
            span.end(end_time=end_ns)


# --- the worker's span of a job -------------------------------------------------------------


class WorkerTracing:
    """A worker's `job execute` spans, children of the offer's traceparent."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer(TRACER, dispatchnet.__version__)

    def start(self, job_id: str, attempt: int, offer_traceparent: str, kind: str) -> Span:
        return self.tracer.start_span(
            "job execute",
            context_of(offer_traceparent),
            attributes={
                "dispatch.job_id": job_id,
                "dispatch.attempt": attempt,
                "dispatch.worker_kind": kind,
            },
        )

    @staticmethod
    def finish(span: Span, failure: str | None) -> str:
        """Ends span (an error when failure is given); its traceparent."""
        if failure is not None:
            span.set_status(Status(StatusCode.ERROR, failure))
        value = traceparent(span)
        span.end()
        return value
