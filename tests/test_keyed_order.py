"""KeyedOrder: a worker stream's job messages run side by side, each job's in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from dispatchnet.loops import KeyedOrder


async def test_one_keys_handlers_run_in_order_and_other_keys_alongside() -> None:
    order = KeyedOrder(limit=8)
    log: list[str] = []
    gates = {k: asyncio.Event() for k in ("a1", "b1")}

    def handler(name: str, gate: asyncio.Event | None = None) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            log.append(f"{name} start")
            if gate is not None:
                await gate.wait()
            log.append(f"{name} end")

        return run

    await order.submit("a", handler("a1", gates["a1"]))
    await order.submit("a", handler("a2"))
    await order.submit("b", handler("b1", gates["b1"]))
    await asyncio.sleep(0)  # let them start
    assert log == ["a1 start", "b1 start"]  # a2 waits for a1; b1 does not
    gates["b1"].set()
    gates["a1"].set()
    await order.finish()
    assert log.index("a1 end") < log.index("a2 start")
    assert sorted(log) == sorted(f"{n} {w}" for n in ("a1", "a2", "b1") for w in ("start", "end"))


async def test_a_failed_handler_does_not_stop_the_next_and_room_is_bounded() -> None:
    order = KeyedOrder(limit=2)
    ran: list[str] = []
    release = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("a bug in a handler: logged")

    def waits(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await release.wait()
            ran.append(name)

        return run

    await order.submit("a", fails)
    await order.submit("a", waits("a"))  # runs after the failure all the same
    await order.submit("b", waits("b"))
    third = asyncio.ensure_future(order.submit("c", waits("c")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done()  # two unfinished already: no room
    release.set()
    await third
    await order.finish()
    assert sorted(ran) == ["a", "b", "c"]
