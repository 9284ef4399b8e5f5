"""Operating a coordinator (README "Observability"): Prometheus metrics on their own port,
JSON logs, the dashboard's HTTP surface (auth, errors, server-sent events). The browser
test is test_dashboard_browser.py; traces across processes are in test_tracing.py."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Cluster, Proc, make_profile, wait_until
from prometheus_client.parser import text_string_to_metric_families

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.observability import logs
from dispatchnet.observability.feed import Feed
from dispatchnet.observability.metrics import BoundedLabel, requeue_cause
from dispatchnet.observability.sampler import Sample
from dispatchnet.profiles import ProfileError
from dispatchnet.server import start_coordinator
from dispatchnet.store.registry import redacted
from dispatchnet.worker.runtime import Worker

ECHO = task_spec("echo", b'"hi"')


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    """Every sample of the /metrics page: (name, labels) -> value."""
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_jobs_rejections_requeues_and_workers(cluster: Cluster) -> None:
    url = cluster.coord.metrics_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    refusals = ["battery_low"]  # a seeker whose battery is low, once
    picky = Worker(
        cluster.address,
        KeyPair.generate(),
        offer_filter=lambda offer: refusals.pop() if refusals else "",
        backoff_initial=0.05,
    )
    task = asyncio.create_task(picky.run())
    cluster.workers.append((picky, task))
    await asyncio.wait_for(picky.connected.wait(), 10)
    c = cluster.client()
    first = await c.submit(ECHO)
    assert (await c.wait(first.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    assert picky.rejected == 1
    await cluster.worker()
    observability = cluster.coord.observability
    assert observability is not None and observability.sampler is not None
    await observability.sampler.sample()

    m = await scrape(url)
    assert value(m, "dispatch_jobs_committed_total", type="task") == 1
    assert value(m, "dispatch_job_transitions_total", state="offered", type="task") == 2
    assert value(m, "dispatch_job_transitions_total", state="queued", type="task") == 2
    assert value(m, "dispatch_job_transitions_total", state="completed", type="task") == 1
    assert value(m, "dispatch_offers_rejected_total", reason="battery_low") == 1
    assert value(m, "dispatch_job_requeues_total", cause="rejected") == 1
    assert value(m, "dispatch_job_dispatch_seconds_count", type="task") == 1
    assert value(m, "dispatch_job_duration_seconds_count", type="task", outcome="completed") == 1
    assert value(m, "dispatch_workers_connected", kind="seeker") == 2
    assert value(m, "dispatch_worker_connections_total", kind="seeker") == 2
    assert value(m, "dispatch_open_jobs", state="queued") == 0
    assert value(m, "dispatch_coordinator_info", profile="local", version="0.1.0") == 1
    assert ("process_cpu_seconds_total", frozenset()) in m
    # bounded label sets: no id of a job, worker or client is ever a label value
    ids = {
        first.job_id,
        first.client_id,
        picky.worker_id,
        *(w.worker_id for w, _ in cluster.workers),
    }
    labels = {v for _, ls in m for _, v in ls}
    assert not labels & ids
    assert not any(len(v) > 48 for v in labels)

    picky.stop()
    await task

    async def dropped() -> bool:
        return value(await scrape(url), "dispatch_workers_connected", kind="seeker") == 1

    await wait_until(dropped, what="the gauge to drop")
    m = await scrape(url)
    gone = {dict(ls)["reason"] for n, ls in m if n == "dispatch_worker_disconnections_total"}
    assert gone and gone <= {"closed", "disconnected"}


def test_outside_words_become_a_bounded_set_of_label_values() -> None:
    label = BoundedLabel(("busy",), limit=3)
    assert [label(r) for r in ("busy", "battery_low", "Battery Low!", "x" * 49)] == [
        "busy", "battery_low", "other", "other",
    ]  # fmt: skip
    assert [label(r) for r in ("a1", "b2", "c3", "b2")] == ["a1", "b2", "other", "b2"]
    assert requeue_cause("rejected: battery_low") == "rejected"
    assert requeue_cause("bad receipt: output hash") == "bad_receipt"
    assert requeue_cause("failed: llm_backend_unavailable") == "failed"
    assert requeue_cause("worker_disconnected") == "worker_disconnected"


def test_observability_settings_are_checked() -> None:
    for bad, needle in [
        ({"metrics_listen": "9090"}, "metrics_listen must be HOST:PORT"),
        ({"dashboard_listen": "localhost:99999"}, "dashboard_listen must be HOST:PORT"),
        ({"sample_seconds": 0.0}, "sample_seconds"),
        ({"explorer_tx_urls": {"eip155:1": "javascript:alert(1)//{tx}"}}, "http(s) URL"),
        ({"explorer_tx_urls": {"eip155:1": "https://x.example/tx/"}}, "one {tx}"),
    ]:
        with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            make_profile(observability=bad)


async def test_tools_are_off_when_the_profile_says_so(tmp_path: Path) -> None:
    profile = make_profile(observability={"metrics_listen": "", "dashboard_listen": ""})
    coord = await start_coordinator(profile, tmp_path / "c", "127.0.0.1:0")
    try:
        assert coord.observability is None and coord.metrics_url == coord.dashboard_url == ""
        assert not (tmp_path / "c" / "dashboard.token").exists()
    finally:
        await coord.stop(grace=0.2)


async def test_a_port_in_use_fails_the_start_and_leaves_nothing_running(
    tmp_path: Path, cluster: Cluster
) -> None:
    taken = cluster.coord.metrics_url.split("/")[2]  # HOST:PORT of another coordinator
    profile = make_profile(observability={"metrics_listen": taken})
    with pytest.raises(OSError):
        await start_coordinator(profile, tmp_path / "c2", "127.0.0.1:0")
    # the first coordinator still answers
    assert value(await scrape(cluster.coord.metrics_url), "dispatch_coordinator_info",
                 profile="local", version="0.1.0") == 1  # fmt: skip


# --- the dashboard's HTTP surface ----------------------------------------------------------


async def test_the_dashboard_needs_the_operator_token(cluster: Cluster, tmp_path: Path) -> None:
    obs = cluster.coord.observability
    assert obs is not None and obs.dashboard is not None
    base = cluster.coord.dashboard_url
    token_file = tmp_path / "coord" / "dashboard.token"
    token = token_file.read_text().strip()
    assert len(token) >= 43 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # unsafe=True: keep cookies of an IP address, as browsers do
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base) as r:  # the page itself holds no data and no token
            page = await r.text()
            assert r.status == 200 and token not in page
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
            assert r.headers["X-Frame-Options"] == "DENY"
            # nothing loaded from elsewhere: no src=, no <link>, no @import
            assert not any(x in page for x in ('src="', "<link", "@import", "url("))
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": token}):
            async with http.get(base + "api/snapshot", headers=headers) as r:
                assert r.status == 401 and "dashboard.token" in (await r.json())["error"]
        async with http.get(base + "api/events") as r:
            assert r.status == 401
        async with http.post(base + "api/login", data=b"{not json") as r:
            assert r.status == 400 and "token" in (await r.json())["error"]
        async with http.post(base + "api/login", json={"token": "guess"}) as r:
            assert r.status == 401
        async with http.post(base + "api/login", json={"token": ["x"]}) as r:
            assert r.status == 401
        async with http.post(base + "api/login", data=b"x" * 10_000) as r:
            assert r.status == 413 and "error" in await r.json()
        async with http.get(base + "nope") as r:
            assert r.status == 404 and "error" in await r.json()
        async with http.delete(base + "api/snapshot") as r:
            assert r.status == 405 and "error" in await r.json()
        # odd bytes are refused as they are, never a 500 (nor a traceback in the log)
        host, port = base.split("/")[2].rsplit(":", 1)
        odd = [
            b"GET /api/snapshot HTTP/1.1\r\nAuthorization: Bearer \xc3(\r\n",
            b"GET /api/events HTTP/1.1\r\nCookie: dispatch_dashboard=\xff\r\n",
            post(b"/api/login", b'{"token": "\\ud800"}'),
            post(b"/api/login", b"[" * 4000),
        ]
        for request in odd:
            status = await raw_status(host, int(port), request)
            assert status in (b"400", b"401"), (request[:40], status)
        mhost, mport = cluster.coord.metrics_url.split("/")[2].rsplit(":", 1)
        accept = b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=abc\r\n"
        assert await raw_status(mhost, int(mport), accept) == b"200"
        async with http.post(base + "api/login", json={"token": token}) as r:
            assert r.status == 200
            cookie = r.cookies["dispatch_dashboard"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
        async with http.get(base + "api/snapshot") as r:  # the cookie from now on
            snap = await r.json()
            assert r.status == 200 and snap["coordinator"]["profile"] == "local"
    # the token stays across restarts (the file is reused)
    await cluster.coord.stop(grace=0.2)
    again = await start_coordinator(make_profile(), tmp_path / "coord", "127.0.0.1:0")
    try:
        assert again.observability is not None and again.observability.dashboard is not None
        assert again.observability.dashboard.token == token
    finally:
        await again.stop(grace=0.2)
    cluster.coord = again  # closed again by the fixture: stop() is idempotent


def post(path: bytes, body: bytes) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def raw_status(host: str, port: int, request: bytes) -> bytes:
    """The status code of one request sent as raw bytes (an HTTP client would refuse to
    send such headers)."""
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.rstrip(b"\r\n") + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return status_line.split(b" ")[1]


async def read_event(stream: aiohttp.StreamReader) -> dict[str, Any]:
    """The next `event: snapshot` of an SSE stream."""
    event = ""
    while True:
        line = (await asyncio.wait_for(stream.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: ") and event == "snapshot":
            data: dict[str, Any] = json.loads(line[len("data: ") :])
            return data


async def test_the_dashboard_streams_jobs_as_they_move(cluster: Cluster) -> None:
    obs = cluster.coord.observability
    assert obs is not None and obs.dashboard is not None
    headers = {"Authorization": f"Bearer {obs.dashboard.token}"}
    await cluster.worker()
    c = cluster.client()
    async with (
        aiohttp.ClientSession() as http,
        http.get(cluster.coord.dashboard_url + "api/events", headers=headers) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await read_event(r.content)
        assert first["workers"]["connected"] == 1 and first["jobs"] == []
        job = await c.submit(ECHO)
        await c.wait(job.job_id)
        while True:  # snapshots follow the job to its end
            snap = await read_event(r.content)
            rows = [j for j in snap["jobs"] if j["job_id"] == job.job_id]
            if rows and rows[0]["state"] == "completed":
                break
        row = rows[0]
        assert row["what"] == "echo" and row["type"] == "task" and row["attempts"] == 1
        assert row["client"] == job.client_id[:16] and row["payment"] == {}
        assert "output" not in json.dumps(snap)  # no payloads or results
        assert snap["flow"]["totals"]["completed"] == 1
        assert snap["flow"]["per_minute"]["completed"] > 0
        [worker] = snap["workers"]["shown"]
        assert worker["kind"] == "seeker" and worker["slots"] == 4


# --- logs ------------------------------------------------------------------------------------


def test_json_log_lines_carry_ids_and_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    record = logging.LogRecord("dispatch.jobs", logging.INFO, __file__, 1, "job %s moved",
                               ("job_1",), None)  # fmt: skip
    record.job_id = "job_1"
    formatter = logs.JsonFormatter()
    with logs.bound(worker_id="w" * 64, client_id="c" * 64):
        line = json.loads(formatter.format(record))
    assert line["message"] == "job job_1 moved" and line["level"] == "INFO"
    assert line["logger"] == "dispatch.jobs" and line["time"].endswith("Z")
    assert (line["job_id"], line["worker_id"], line["client_id"]) == ("job_1", "w" * 64, "c" * 16)
    assert "trace_id" not in line
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("s") as span:
        line = json.loads(formatter.format(record))
    ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}" and line["span_id"] == f"{ctx.span_id:016x}"
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = __import__("sys").exc_info()
    assert "ValueError: boom" in json.loads(formatter.format(record))["exception"]


def test_a_write_to_a_peer_that_went_away_is_an_info_line() -> None:
    f = logs.PeerGoneFilter()
    try:
        raise RuntimeError("batch failed")
    except RuntimeError:
        exc = sys.exc_info()
    gone = logging.LogRecord(
        logs.GRPC_AIO_LOGGER, logging.ERROR, "server.pyx", 1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/dispatch.v1.WorkerService/Connect",), exc,
    )  # fmt: skip
    assert f.filter(gone)
    assert (gone.levelno, gone.exc_info) == (logging.INFO, None)
    assert gone.getMessage() == (
        "a write on /dispatch.v1.WorkerService/Connect failed: the peer went away"
    )
    other = logging.LogRecord(
        logs.GRPC_AIO_LOGGER, logging.ERROR, "server.pyx", 1, "Unexpected [%s]", ("x",), exc
    )
    assert f.filter(other) and other.levelno == logging.ERROR and other.exc_info is exc


def test_coordinator_and_worker_log_json_lines_and_print_their_urls(
    procs: Any, tmp_path: Path
) -> None:
    coord: Proc = procs(["--log-format", "json", "coordinator", "--listen", "127.0.0.1:0",
                         "--data-dir", str(tmp_path / "c"), "--metrics-listen", "127.0.0.1:0",
                         "--dashboard-listen", "[::1]:0"])  # fmt: skip
    info = coord.info
    assert info["metrics"].startswith("http://127.0.0.1:")
    assert info["dashboard"].startswith("http://[::1]:")
    assert info["dashboard_token_file"] == str(tmp_path / "c" / "dashboard.token")
    assert "token" not in json.dumps({k: v for k, v in info.items() if "token" not in k})
    worker: Proc = procs(["--log-format", "json", "worker", "--coordinator", info["listening"]])

    async def run_job() -> None:
        async with CoordinatorClient(info["listening"], KeyPair.generate()) as c:
            job = await c.submit(ECHO)
            assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED

    asyncio.run(run_job())
    with urllib.request.urlopen(info["metrics"], timeout=5) as r:
        assert b'dispatch_jobs_committed_total{type="task"} 1.0' in r.read()
    try:
        urllib.request.urlopen(info["dashboard"] + "api/snapshot", timeout=5)
        raise AssertionError("the snapshot needs the token")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    worker.kill(15)
    coord.kill(15)

    def lines(p: Proc) -> list[dict[str, Any]]:
        return [json.loads(x) for x in p.log.read_text().splitlines() if x.strip()]

    coordinator_lines = lines(coord)
    assert any(x.get("worker_id") == worker.info["worker_id"] for x in coordinator_lines)
    worker_lines = lines(worker)
    done = [x for x in worker_lines if x["message"].endswith("completed")]
    assert done and done[0]["job_id"].startswith("job_")
    assert done[0]["worker_id"] == worker.info["worker_id"]


async def test_outbox_chain_trouble_counts_as_a_chain_error() -> None:
    from dispatchnet.loops import OutboxLoop
    from dispatchnet.observability.metrics import CoordinatorMetrics, MetricsServer

    metrics = CoordinatorMetrics("test")
    loop = OutboxLoop()
    loop.outbox, loop.chain, loop.observer = "feedback", "eip155:1", metrics
    loop.backed_off("node unreachable")
    loop.backed_off("node unreachable", chain="eip155:2")
    server = MetricsServer(metrics.registry)
    await server.start("127.0.0.1:0")
    try:
        m = await scrape(server.url)
    finally:
        await server.close()
    assert value(m, "dispatch_chain_errors_total", chain="eip155:1", source="feedback") == 1
    assert value(m, "dispatch_chain_errors_total", chain="eip155:2", source="feedback") == 1


def test_tracing_is_off_unless_the_otel_variables_ask_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dispatchnet.observability import tracing

    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert tracing.provider_from_environment("dispatch-test") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.exporters_from_environment() == ["otlp"]
    provider = tracing.provider_from_environment("dispatch-test")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "dispatch-test"
    provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "coordinator-1")
    provider = tracing.provider_from_environment("dispatch-test")
    assert provider is not None and provider.resource.attributes["service.name"] == "coordinator-1"
    provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.provider_from_environment("dispatch-test") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.exporters_from_environment() == []
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(tracing.TracingConfigError, match="http/protobuf"):
        tracing.provider_from_environment("dispatch-test")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(tracing.TracingConfigError, match="otlp, console and none"):
        tracing.provider_from_environment("dispatch-test")
    # the CLI says so in one line
    from dispatchnet import cli

    assert cli.main(["auth", "whoami"]) == 1


def test_the_flow_rates_count_the_last_minute() -> None:
    """The dashboard's per-minute figures count the jobs of the last minute: not since a
    snapshot an hour ago, and not a few seconds' jobs scaled up to a minute."""
    now = [1000.0]
    feed = Feed({}, clock=lambda: now[0])

    def run(seconds: float, jobs_per_second: int) -> None:
        end = now[0] + seconds
        while now[0] < end:
            now[0] += 1.0
            feed.totals["completed"] += jobs_per_second
            if int(now[0]) % 2 == 0:
                feed.sampled(Sample(at=now[0]))  # the sampler's tick

    def per_minute() -> float:
        return float(feed.snapshot([], {})["flow"]["per_minute"]["completed"])

    run(3, 3)
    assert per_minute() == 9  # its first seconds: what they saw, not 180 a minute
    run(57, 0)
    run(3540, 0)  # an hour without a look
    assert per_minute() == 0
    run(60, 10)
    assert 590 <= per_minute() <= 600
    run(30, 0)
    assert 290 <= per_minute() <= 310


def test_store_urls_are_shown_without_passwords() -> None:
    assert redacted("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redacted("postgresql://u@h/db?password=s3cret&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert "x" not in redacted("postgresql://u@h/db?sslpassword=x").split("?")[1]
    assert redacted("postgresql://u@h/db?application_name=a%20b") == (
        "postgresql://u@h/db?application_name=a%20b"
    )
