"""Wrong answers on purpose, FOR DEMOS AND TESTS ONLY: `--lie-rate P` of `dispatch worker`
and `dispatch seekers` (README "Verification").

With probability P a job's output is replaced by a wrong one (lie()) before the worker
signs its receipt: the receipt is properly signed, the answer is just wrong, which only a
comparison with honest runs (redundant runs, spot checks) catches. An honest worker never
sets it; a registered worker that does is rated down on chain once it is caught.
"""

from __future__ import annotations

import random

from dispatch.v1 import common_pb2
from dispatchnet.worker.executors import Executor, Progress, WrappingExecutor
from dispatchnet.worker.tasks import TaskOutput


def lie(out: TaskOutput) -> TaskOutput:
    """A wrong output for out: different bytes of the same content type, so only a
    comparison with an honest run tells."""
    return TaskOutput(b"LIE:" + out.output[::-1], out.content_type)


def check_rate(rate: float) -> float:
    """rate, or ValueError when it is not a probability."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("lie_rate is a probability per job: between 0 and 1")
    return rate


def warning(rate: float, who: str) -> str:
    """What a process started with --lie-rate logs (who: "these seekers", "this worker")."""
    return (
        f"--lie-rate {rate:g}: {who} return{'s' if who.startswith('this') else ''} WRONG "
        "output on purpose (a demo and test tool for verification; see README 'Verification')"
    )


class LyingExecutor(WrappingExecutor):
    """Wraps an executor: runs the job, then returns lie(output) with probability rate."""

    def __init__(self, inner: Executor, rate: float, rng: random.Random | None = None) -> None:
        super().__init__(inner)
        self.rate = check_rate(rate)
        self.rng = rng or random.Random()
        self.lies = 0

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        out = await self.inner.run(spec, progress)
        if self.rate and self.rng.random() < self.rate:
            self.lies += 1
            return lie(out)
        return out


def lying(
    executors: list[Executor], rate: float, rng: random.Random | None = None
) -> list[Executor]:
    """The executors, each lying with probability rate (unchanged when rate is 0)."""
    check_rate(rate)
    if not rate:
        return executors
    rng = rng or random.Random()
    return [LyingExecutor(e, rate, rng) for e in executors]
