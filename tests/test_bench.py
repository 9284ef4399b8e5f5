"""`dispatch bench` runs end to end (its numbers are printed, never asserted)."""

from __future__ import annotations

import re

import pytest

from dispatchnet.bench import run_bench


async def test_bench_prints_every_figure_as_a_ratio_to_the_raw_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await run_bench(seconds=0.4, many=8, scale=60) == 0
    out = capsys.readouterr().out
    for series in (
        "raw unary, 64 callers",
        "raw unary, 1 caller",
        "raw bidi round trips, 100 streams",
        "unpaid job end to end, 1 submitter",
        "unpaid jobs, 8 submitters",
        "paid CommitJob, 4 submitters",
        "paid jobs, 16 submitters",
        "50 seekers: job end to end, 1 submitter",
        "50 seekers: burst jobs, 32 submitters",
        "60 seekers: job end to end, 1 submitter",
        "60 seekers: burst jobs, 32 submitters",
    ):
        assert re.search(rf"{re.escape(series)}: \d+ in [\d.]+s = [\d,.]+/s, p50 [\d.]+ ms", out), (
            series,
            out,
        )
    assert re.search(r"settled (\d+) of \1 in", out), out
    assert out.count("load average") >= 5
    for n in (50, 60):
        assert re.search(
            rf"{n} seekers connected in [\d.]+s; coordinator RSS [\d,]+ MiB, "
            r"idle CPU [\d.]+% of a core",
            out,
        ), out
    summary = out[out.index("summary") :]
    assert re.search(r"^  128 progress events, \d+ events, \d+ durable rows$", out, re.M), out
    assert len(re.findall(r"^  \S.*\s[\d.]+\s+(>=|<=|diff)", summary, re.M)) == 10, summary
    assert "burst jobs/s, 60 / 50 connected seekers" in summary
