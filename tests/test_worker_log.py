"""A worker logs one line per finished job while jobs are few, and a summary when many."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import Cluster, wait_until

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.worker.runtime import JobLines

LOG = "test.worker.lines"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


async def test_a_line_per_job_until_the_burst_is_spent_then_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOG)
    clock = Clock()
    lines = JobLines(logging.getLogger(LOG), clock, per_second=1.0, burst=3, summary_seconds=60)
    for n in range(3):
        lines.finished((f"job_{n}", 1), "completed")
    lines.finished(("job_3", 2), "failed", "bad_input")
    lines.finished(("job_4", 1), "completed")
    lines.finished(("job_5", 1), "completed")
    assert messages(caplog) == [f"job job_{n} attempt 1 completed" for n in range(3)]

    clock.now += 1.0  # one line's worth of time: the next job is logged again
    lines.finished(("job_6", 1), "failed", "timeout")
    assert messages(caplog)[-1] == "job job_6 attempt 1 failed: timeout"

    clock.now += 0.5
    lines.flush()  # what the period's timer (or the worker's stop) does
    assert messages(caplog)[-1] == (
        "2 more jobs completed and 1 failed in the last 2s (a line per job again below 1 a second)"
    )
    lines.flush()  # nothing more left out: nothing logged
    assert len(messages(caplog)) == 5


async def test_the_summary_comes_at_the_end_of_its_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOG)
    lines = JobLines(logging.getLogger(LOG), per_second=0.001, burst=1, summary_seconds=0.05)
    for n in range(4):
        lines.finished((f"job_{n}", 1), "completed")
    await wait_until(lambda: len(messages(caplog)) == 2, what="the summary")
    assert messages(caplog)[1].startswith("3 more jobs completed and 0 failed in the last")


async def test_nothing_is_counted_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOG)
    lines = JobLines(logging.getLogger(LOG), burst=0, summary_seconds=0.01)
    lines.finished(("job_0", 1), "completed")
    assert lines._timer is None
    lines.flush()
    assert messages(caplog) == []


async def test_a_busy_worker_logs_its_jobs_as_a_summary(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dispatchnet.worker.runtime")
    worker = await cluster.worker(max_concurrency=8)
    c = cluster.client()
    jobs = await asyncio.gather(*(c.run(task_spec("echo", f"job {n}".encode())) for n in range(40)))
    assert all(j.state == coordinator_pb2.JOB_STATE_COMPLETED for j in jobs)
    running = next(task for w, task in cluster.workers if w is worker)
    worker.stop()
    await asyncio.wait_for(running, 10)  # run() ends with the summary of what it left out
    lines = runtime_lines(caplog)
    per_job = [m for m in lines if m.startswith("job ") and m.endswith(" completed")]
    summaries = [int(m.split()[0]) for m in lines if "more jobs completed" in m]
    assert summaries and len(per_job) < 40
    assert len(per_job) + sum(summaries) == 40


def runtime_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dispatchnet.worker.runtime"]
