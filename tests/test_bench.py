"""`dispatch bench` runs end to end (its numbers are printed, never asserted)."""

from __future__ import annotations

import re

import pytest

from dispatchnet.bench import run_bench


async def test_bench_runs_paid_jobs_and_prints_the_x402_latencies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await run_bench(jobs=3) == 0
    out = capsys.readouterr().out
    assert "payments: 3 settled, 3 in all" in out
    for series in ("x402.verify", "x402.settle", "commit", "job"):
        assert re.search(rf"{re.escape(series)}: n=3 mean=[\d.]+ms p50=", out), out
