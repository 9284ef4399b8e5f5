"""`dispatch bench` runs end to end (its numbers are printed, never asserted)."""

from __future__ import annotations

import re

import pytest

from dispatchnet.bench import run_bench


async def test_bench_prints_every_figure_as_a_ratio_to_the_raw_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await run_bench(seconds=0.4, many=8, scale=60, llm_runs=1, most=70) == 0
    out = capsys.readouterr().out
    for series in (
        "raw unary, 64 callers",
        "raw unary, 1 caller",
        "raw bidi round trips, 100 streams",
        "raw bidi round trips, 1 stream",
        "unpaid job end to end, 1 submitter",
        "unpaid jobs, 8 submitters",
        "unpaid job end to end with RunJob, 1 submitter",
        "unpaid jobs with RunJob, 8 submitters",
        "health Check before the hold, 1 caller",
        "health Check during the hold, 1 caller",
        "jobs submitted during the hold, 4 submitters",
        "paid CommitJob, 4 submitters",
        "paid jobs, 16 submitters",
        "50 seekers: job end to end, 1 submitter",
        "50 seekers: burst jobs, 32 submitters",
        "60 seekers: job end to end, 1 submitter",
        "60 seekers: burst jobs, 32 submitters",
        "70 seekers: job end to end, 1 submitter",
        "70 seekers: burst jobs, 32 submitters",
        "SQLite, 1 coordinator: jobs, 8 submitters",
        "PostgreSQL, 1 coordinator: jobs, 8 submitters",
        "PostgreSQL, 2 coordinators: jobs, 8 submitters",
        # the comparisons measured in more rounds, each side in turn
        "round 2: raw unary, 64 callers",
        "round 2: unpaid jobs with RunJob, 8 submitters",
        "round 3: raw unary, 1 caller",
        "round 3: unpaid job end to end with RunJob, 1 submitter",
        "round 2: unpaid jobs, 16 submitters",
        "round 3: paid jobs, 16 submitters",
        "round 2: 50 seekers: burst jobs, 32 submitters",
        "round 2: 60 seekers: job end to end, 1 submitter",
        "round 3: 60 seekers: burst jobs, 32 submitters",
    ):
        assert re.search(rf"{re.escape(series)}: \d+ in [\d.]+s = [\d,.]+/s, p50 [\d.]+ ms", out), (
            series,
            out,
        )
    assert re.search(r"settled (\d+) of \1 in", out), out
    for label in ("50 seekers", "60 seekers", "round 3: 60 seekers"):
        assert re.search(
            rf"{label}: CPU ms per burst job: [\d.]+ \(this process [\d.]+, coordinator "
            r"[\d.]+, seekers [\d.]+\), [\d.]+ cores busy",
            out,
        ), out
    for what in (
        "RunJob jobs/s / raw unary RPC/s",
        "RunJob p50 / raw unary p50",
        "paid jobs/s / unpaid jobs/s",
        "burst jobs/s, 60 / 50 seekers",
        "job p50, 60 / 50 seekers",
    ):
        assert re.search(
            rf"{re.escape(what)}, round by round: [\d.]+, [\d.]+, [\d.]+ \(median [\d.]+\)", out
        ), out
    # how far settlement lags completion, and its rate beside the rate jobs completed at
    assert re.search(
        r"completion -> settled: \d+ in [\d.]+s = [\d,]+/s, p50 [\d.]+ ms, p99 [\d.]+ ms "
        r"\(settled .*\); the same jobs completed over [\d.]+s: [\d,]+/s offered",
        out,
    ), out
    # where a job's CPU goes, beside what its messages cost at the raw rate
    assert re.search(r"CPU ms \(server \+ this process\): [\d.]+ per unary RPC", out), out
    runs = ("unpaid jobs, 8 submitters", "unpaid jobs with RunJob, 8 submitters")
    for run in (*runs, "paid jobs, 16 submitters"):
        assert re.search(
            rf"CPU ms per job \({re.escape(run)}\): [\d.]+ \(this process [\d.]+, "
            r"coordinator\S* [\d.]+, worker0 [\d.]+, worker1 [\d.]+\)",
            out,
        ), out
    # nothing submitted while another process held the write lock is lost
    assert re.search(r"lock held [\d.]+s; ([1-9]\d*) of \1 jobs submitted during the hold", out), (
        out
    )
    assert re.search(
        r"time to first token, median: network [\d.]+ ms .*raw llama\.cpp [\d.]+ ms", out
    ), out
    assert out.count("load average") >= 5
    for n in (50, 60, 70):
        assert re.search(
            rf"{n} seekers connected in [\d.]+s; coordinator RSS [\d,]+ MiB, "
            r"idle CPU [\d.]+% of a core",
            out,
        ), out
    # the cluster section: where the CPU went, what the database did, what limits scaling
    cluster = out[out.index("cluster:") : out.index("summary")]
    assert len(re.findall(r"CPU, % of one core .*coordinators \d+", cluster)) == 3, cluster
    assert len(re.findall(r"coordinators \d+, PostgreSQL \d+; the machine \d+", cluster)) == 2
    assert len(re.findall(r"PostgreSQL CPU [\d.]+ ms per job", cluster)) == 2, cluster
    assert len(re.findall(r"database per job: [\d.]+ statements .* [\d.]+ NOTIFYs", cluster)) == 2
    busy = r"database backends (busy: [\d.]+ on average|: none seen busy)"
    assert len(re.findall(busy, cluster)) == 2, cluster
    assert re.search(
        r"2 / 1 coordinators on one PostgreSQL: [\d.]+ \(load average \(1 min\) [\d.]+.*"
        r"no linear scaling can show",
        cluster,
    ), cluster
    summary = out[out.index("summary") :]
    assert re.search(
        r"trivial jobs/s, 8 submitters: 2 / 1 coordinators on one PostgreSQL +"
        r"[\d,]+/s +[\d.]+ +none",
        summary,
    ), summary
    assert re.search(
        r"trivial jobs/s, 8 submitters, 1 coordinator: PostgreSQL / SQLite +"
        r"[\d,]+/s +[\d.]+ +none",
        summary,
    ), summary
    # the targets on RunJob's rows; the three-call path printed beside them
    assert re.search(
        r"trivial jobs/s with RunJob, 8 submitters / raw unary RPC/s \* +[\d,]+/s +[\d.]+ +"
        r">= 0\.2 \(raw-cost ceiling here: [\d.]+\)",
        summary,
    ), summary
    assert re.search(
        r"job p50 end to end with RunJob, 1 submitter / raw unary p50 \* +[\d.]+ ms +[\d.]+ +"
        r"<= 5 \(raw-cost floor here: [\d.]+\)",
        summary,
    ), summary
    assert re.search(r"quote \+ commit \+ watch, 8 submitters .* none \(3 calls; raw-cost", summary)
    assert re.search(r"quote \+ commit \+ watch, 1 submitter .* none \(3 calls; raw-cost", summary)
    assert len(re.findall(r"CPU per trivial job.* [\d.]+ ms +[\d.]+ +none", summary)) == 2
    assert re.search(r"^  128 progress events, \d+ events, \d+ durable rows$", out, re.M), out
    assert len(re.findall(r"^  \S.*\s[\d.]+\s+(>=|<=|diff)", summary, re.M)) == 12, summary
    # jobs compared at `scale` (the targets), memory and idle CPU at `most`
    assert re.search(
        r"burst jobs/s, 60 / 50 connected seekers \* +[\d,]+/s +[\d.]+ +>= 0\.8", summary
    )
    assert re.search(
        r"job p50 end to end, 60 / 50 connected seekers \* +[\d.]+ ms +[\d.]+ +<= 1\.5", summary
    )
    assert re.search(
        r"burst jobs/s, 70 / 50 connected seekers .* none \(the target is at 60\)", summary
    )
    assert re.search(r"coordinator RSS, 70 connected seekers / 1 GiB .* <= 1", summary), summary
    assert re.search(r"coordinator idle CPU, 70 connected seekers .* <= 1", summary), summary
    assert re.search(
        r"longest health-check latency while another process holds the write lock +"
        r"[\d.]+ ms +[\d.]+ +<= 20 ms",
        summary,
    ), summary
    assert re.search(
        r"LLM time to first token, network / raw llama\.cpp +[\d.]+ / [\d.]+ ms +[\d.]+ +<= 1\.3",
        summary,
    ), summary
