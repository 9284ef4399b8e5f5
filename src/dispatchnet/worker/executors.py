"""What runs a job on a worker. The runtime asks each executor in turn whether it takes an
offered spec and runs it with the first that does.

An executor advertises the task names and LLM models it serves (they go into Hello), says
whether it takes a spec, and runs it, reporting partial output (e.g. LLM tokens) through
`progress`. Failures are TaskError (retryable=False when the job itself is at fault).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from dispatch.v1 import common_pb2
from dispatchnet.worker.tasks import TASK_NAMES, TaskOutput, run_task
from dispatchnet.worker.wasm import WasmExecutor

Progress = Callable[[str, float], None]
"""progress(text_chunk, fraction): fraction in [0, 1], or 0 when unknown."""


class Executor(Protocol):
    @property
    def tasks(self) -> list[str]:
        """Task names this executor runs."""
        ...

    @property
    def llm_models(self) -> list[str]:
        """LLM models this executor serves (desktops only)."""
        ...

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        """True if this executor can run spec."""
        ...

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        """Runs spec; raises TaskError on failure."""
        ...


class WrappingExecutor:
    """An executor that wraps another: the same tasks, models and takes(); subclasses
    change run() (a slower device, a lying worker)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    @property
    def tasks(self) -> list[str]:
        return self.inner.tasks

    @property
    def llm_models(self) -> list[str]:
        return self.inner.llm_models

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return self.inner.takes(spec)

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        return await self.inner.run(spec, progress)


class BuiltinTasks:
    """The deterministic built-in tasks of tasks.py (no LLM, no WebAssembly)."""

    def __init__(self, names: list[str] | None = None) -> None:
        names = list(TASK_NAMES if names is None else names)
        unknown = sorted(set(names) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"unknown tasks: {', '.join(unknown)}")
        self._names = names

    @property
    def tasks(self) -> list[str]:
        return list(self._names)

    @property
    def llm_models(self) -> list[str]:
        return []

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return (
            spec.WhichOneof("work") == "task"
            and not spec.task.use_llm
            and spec.task.name in self._names
        )

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        return await run_task(spec.task.name, spec.task.input)


def default_executors() -> list[Executor]:
    """What a worker runs unless told otherwise: the built-in tasks and WebAssembly modules."""
    return [BuiltinTasks(), WasmExecutor()]
