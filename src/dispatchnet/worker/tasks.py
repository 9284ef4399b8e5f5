"""The built-in task catalogue: deterministic executors a worker runs for TASK jobs.

Each task is an async function from input bytes to a TaskOutput, registered in _TASKS by
name. To add a task, write the function and add it to _TASKS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_SLEEP_MS = 600_000


class TaskError(Exception):
    """A task could not produce a result; retryable=False means the job itself is at fault."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class TaskOutput:
    """What a task (or any executor) produced."""

    output: bytes
    content_type: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _parse_json(data: bytes) -> tuple[bool, object]:
    """(True, value) if data is valid UTF-8 JSON, else (False, None)."""
    try:
        return True, json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return False, None


def _json_output(value: object) -> TaskOutput:
    return TaskOutput(json.dumps(value, separators=(",", ":")).encode(), "application/json")


async def _echo(data: bytes) -> TaskOutput:
    is_json, _ = _parse_json(data)
    return TaskOutput(data, "application/json" if is_json else "application/octet-stream")


async def _sha256(data: bytes) -> TaskOutput:
    return TaskOutput(hashlib.sha256(data).hexdigest().encode(), "text/plain")


async def _sleep(data: bytes) -> TaskOutput:
    is_json, value = _parse_json(data)
    ms = value.get("ms") if is_json and isinstance(value, dict) else None
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_SLEEP_MS:
        raise TaskError("bad_input", f'sleep takes JSON {{"ms": N}} with 0 <= N <= {MAX_SLEEP_MS}')
    await asyncio.sleep(ms / 1000)
    return _json_output({"slept_ms": ms})


async def _word_count(data: bytes) -> TaskOutput:
    is_json, value = _parse_json(data)
    if is_json and isinstance(value, str):
        text = value
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError("bad_input", "word_count takes UTF-8 text or a JSON string") from e
    return _json_output({"words": len(text.split()), "characters": len(text)})


_TASKS: dict[str, Callable[[bytes], Awaitable[TaskOutput]]] = {
    "echo": _echo,
    "sha256": _sha256,
    "sleep": _sleep,
    "word_count": _word_count,
}

TASK_NAMES: list[str] = sorted(_TASKS)


async def run_task(name: str, data: bytes) -> TaskOutput:
    """Runs the built-in task name on data; raises TaskError when it cannot."""
    task = _TASKS.get(name)
    if task is None:
        raise TaskError("unknown_task", f"no built-in task named {name!r}")
    return await task(data)
