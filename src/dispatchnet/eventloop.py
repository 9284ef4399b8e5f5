"""The event loop the `dispatch` commands run on: uvloop (libuv's loop, in C) where it is
installed, else asyncio's own. `DISPATCH_EVENT_LOOP=asyncio` chooses asyncio's,
`DISPATCH_EVENT_LOOP=uvloop` insists on uvloop.

A coordinator spends a good part of each job in the loop's own machinery (waking on
gRPC's completions, scheduling callbacks and tasks), which asyncio runs in Python; with
uvloop trivial jobs ran ~6% faster in the bench, end to end and under load. The bench's
raw gRPC baseline runs on the same loop, so its ratios compare like with like."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "DISPATCH_EVENT_LOOP"
CHOICES = ("", "uvloop", "asyncio")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop to run on (None: asyncio's default); ValueError for a
    DISPATCH_EVENT_LOOP that is not one of CHOICES, or that asks for uvloop when uvloop
    is not installed."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as e:
        if choice == "uvloop":
            raise ValueError(f"{ENV}=uvloop, but uvloop is not installed ({e})") from None
        return None
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
