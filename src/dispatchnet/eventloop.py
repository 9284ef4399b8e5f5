"""The event loop the `dispatch` commands run on: asyncio's own, or uvloop (libuv's loop, in
C) with `DISPATCH_EVENT_LOOP=uvloop`.

uvloop is not the default because of what the bench measured on 2 cores. With a few
workers, trivial jobs ran ~6-9% faster on it (RunJob from 64 submitters: 531 against 486
jobs/s). With 5,000 seekers connected, bursts ran slower on it (196-204 against 223
jobs/s), and paid jobs did not gain. The bench's raw gRPC baseline server runs on the same
loop as the commands, so its ratios compare like with like."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "DISPATCH_EVENT_LOOP"
CHOICES = ("", "asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop to run on (None: asyncio's own); ValueError for a
    DISPATCH_EVENT_LOOP that is not one of CHOICES, or that asks for uvloop when uvloop
    is not installed."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be asyncio or uvloop, not {choice!r}")
    if choice != "uvloop":
        return None
    try:
        import uvloop
    except ImportError as e:
        raise ValueError(f"{ENV}=uvloop, but uvloop is not installed ({e})") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop loop_factory() chooses."""
    try:
        factory = loop_factory()
    except BaseException:
        main.close()  # never awaited: no warning about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
