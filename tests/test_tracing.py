"""A paid job's trace, across processes (README "Observability"): the client's CommitJob ->
the coordinator's (with x402.verify) -> the job's phases -> the worker's `job execute`, in
a `dispatch worker` process exporting OTLP/HTTP as the standard OTEL_* variables say, to a
collector this test runs -> the coordinator's `job result` -> x402.settle. The client and
the coordinator collect their spans in memory. The same paid job shows in the metrics and
on the dashboard, with links to the explorer the profile names."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from chain_fixtures import chain, chain_profile, home  # noqa: F401
from conftest import Cluster, Proc, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_observability import scrape, value
from test_payments import NETWORK, new_payer

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.server import start_coordinator

EXPLORER = "https://explorer.test/tx/{tx}"


class Collector:
    """An OTLP/HTTP trace receiver on a free port: POST /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in rs.resource.attributes
                         if a.key == "service.name"), "",
                    )  # fmt: skip
                    for ss in rs.scope_spans:
                        collector.spans += [(service, s) for s in ss.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def one(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind is kind)]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


async def test_a_paid_job_is_one_trace_from_the_client_to_the_worker_and_back(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    collector: Collector,
    procs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    profile = chain_profile(str(home / "chains" / "local-monad.json"), payments={}).with_overrides(
        receipts={"batch_size": 1, "batch_max_age_seconds": 1},
        observability={"explorer_tx_urls": {NETWORK: EXPLORER}},
    )
    coord = await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0", provider)
    cluster = Cluster(coord, tmp_path)
    try:
        # the worker process traces as the standard variables say
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "test-worker")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        worker: Proc = procs(["worker", "--coordinator", cluster.address])
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        wallet = await asyncio.to_thread(new_payer, chain)
        async with CoordinatorClient(cluster.address, KeyPair.generate(), wallet, provider) as c:
            job = await c.submit(task_spec("echo", b'"traced"'))
            assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED

        def settled() -> bool:
            p = cluster.db.get_payment(job.job_id)
            return p is not None and p.status.value == "settled"

        await wait_until(settled, 30, "the settlement")

        def named(name: str) -> bool:
            return any(s.name == name for s in exporter.get_finished_spans())

        await wait_until(lambda: named("x402.settle"), what="the settle span")
        await wait_until(
            lambda: any(s.name == "job execute" for _, s in collector.spans),
            what="the worker's span at the collector",
        )

        spans = [s for s in exporter.get_finished_spans()
                 if s.attributes is None or s.attributes.get("dispatch.job_id", job.job_id)
                 == job.job_id]  # fmt: skip
        commit = "/dispatch.v1.CoordinatorService/CommitJob"
        client = one(spans, commit, SpanKind.CLIENT)
        server = one(spans, commit, SpanKind.SERVER)
        trace_id = client.context.trace_id
        assert all(
            s.context.trace_id == trace_id
            for s in spans
            if s.name.startswith(("job", "x402", commit))
        )
        assert parent_of(server) == client.context.span_id  # across the gRPC call
        assert parent_of(one(spans, "x402.verify")) == server.context.span_id
        for phase in ("job queued", "job offered", "job running"):
            assert parent_of(one(spans, phase)) == server.context.span_id, phase
        offered = one(spans, "job offered")
        [(service, execute)] = [(n, s) for n, s in collector.spans if s.name == "job execute"]
        assert service == "test-worker"  # from the worker process, over OTLP/HTTP
        assert int.from_bytes(execute.trace_id, "big") == trace_id
        assert int.from_bytes(execute.parent_span_id, "big") == offered.context.span_id
        result = one(spans, "job result")
        assert parent_of(result) == int.from_bytes(execute.span_id, "big")  # and back
        settle = one(spans, "x402.settle")
        assert parent_of(settle) == result.context.span_id
        assert str(settle.attributes and settle.attributes["dispatch.transaction"]).startswith("0x")

        # the same job in the metrics and on the dashboard
        await wait_until(lambda: _anchored(cluster), 30, "the receipt batch's anchor")
        assert coord.observability is not None and coord.observability.sampler is not None
        await coord.observability.sampler.sample()
        m = await scrape(coord.metrics_url)
        assert value(m, "dispatch_x402_verify_seconds_count") == 1
        assert value(m, "dispatch_x402_settle_seconds_count") >= 1
        assert value(m, "dispatch_payments_total", status="authorized") == 1
        assert value(m, "dispatch_payments_total", status="settled") == 1
        assert value(m, "dispatch_receipt_batches_anchored_total", chain=NETWORK) == 1
        for outbox in ("settlement", "anchoring", "payouts", "feedback"):
            assert (("dispatch_outbox_backlog", frozenset({("outbox", outbox), ("chain", NETWORK)}))
                    in m), outbox  # fmt: skip
        token = coord.observability.dashboard.token if coord.observability.dashboard else ""
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                coord.dashboard_url + "api/snapshot", headers={"Authorization": f"Bearer {token}"}
            ) as r,  # fmt: skip
        ):
            snap = await r.json()
        [row] = [j for j in snap["jobs"] if j["job_id"] == job.job_id]
        tx = row["payment"]["transaction"]
        assert row["payment"]["status"] == "settled"
        assert row["payment"]["transaction_url"] == EXPLORER.replace("{tx}", tx)
        assert row["receipt"]["anchor"] == "anchored"
        assert row["receipt"]["transaction_url"].startswith("https://explorer.test/tx/0x")
        assert {b["outbox"] for b in snap["backlogs"]} >= {"settlement", "anchoring", "payouts"}
        worker.kill(15)
    finally:
        await cluster.close()
        provider.shutdown()


def _anchored(cluster: Cluster) -> bool:
    from dispatchnet.coordinator.models import AnchorStatus

    return bool(cluster.db.receipt_batches([AnchorStatus.ANCHORED]))
