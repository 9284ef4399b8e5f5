"""What operators watch a coordinator with (README "Observability").

- metrics.py: Prometheus metrics (the official prometheus-client) fed by the domain's
  Observer port (coordinator/observer.py), served on `[observability] metrics_listen`;
- sampler.py: the periodic store reads behind the gauges and the dashboard (open jobs,
  outbox backlogs, workers' earnings), off the hot path;
- payments.py: the x402 gateway and chain roles wrapped with timings, spans and error counts;
- tracing.py: OpenTelemetry traces configured by the standard OTEL_* variables (off by
  default), a job's trace carried to its worker and back;
- logs.py: human-readable or JSON-lines logs with job, worker, client and trace ids;
- feed.py and dashboard.py (+ dashboard.html): the read-only operator dashboard, live
  over server-sent events;
- observer.py: Observers, which hands every domain call to each of the above.

Nothing here is imported by the domain (tests/test_units.py checks it).
"""
