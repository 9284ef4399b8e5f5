"""A burst of multi-MiB bad requests leaves a coordinator's memory where it was.

Measured on a coordinator process of its own (its RSS from /proc), so nothing the test
itself allocates counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import Proc, wait_until

from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.memory import MemoryTrimmer

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or MemoryTrimmer().trim is None,
    reason="reads RSS from /proc; relies on glibc's malloc_trim",
)

MIB = 1024 * 1024
BURST = 200
CONCURRENCY = 16


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_memory_returns_to_baseline_after_a_burst_of_huge_requests(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    coord = procs(["coordinator", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")])
    pid = coord.p.pid
    huge_id = "j" * (4 * MIB - 100)  # just under [server] max_message_bytes
    huge_input = task_spec("echo", b"x" * (4 * MIB - 200))
    gate = asyncio.Semaphore(CONCURRENCY)
    details: set[str] = set()

    async with CoordinatorClient(coord.info["listening"], KeyPair.generate()) as c:
        await c.list_workers()  # the connection is up before the baseline
        baseline = rss_mb(pid)

        async def one(i: int) -> None:
            async with gate:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await (c.quote(huge_input) if i % 4 == 0 else c.get(huge_id))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details.add(e.value.details() or "")

        await asyncio.gather(*(one(i) for i in range(BURST)))
        peak = rss_mb(pid)
        # the messages are short and echo nothing back
        assert max(len(d) for d in details) < 100, details

        await wait_until(
            lambda: rss_mb(pid) < baseline + 100,
            within=30,
            what=f"RSS back under {baseline + 100:.0f} MB (baseline {baseline:.0f}, "
            f"peak {peak:.0f})",
        )
        assert coord.p.poll() is None


async def test_heap_freezer_freezes_after_a_wave_of_workers_and_reclaims() -> None:
    """Connected workers are frozen out of the cyclic collector shortly after they come;
    a reclaim unfreezes, collects once and freezes again (cycles made meanwhile freed)."""
    import gc

    from dispatchnet.memory import HeapFreezer

    heap = HeapFreezer(delay=0.01, reclaim=0.05)
    try:
        heap.start()
        assert heap.freezes == 1 and gc.get_freeze_count() > 0
        for n in range(1, 4):  # a wave of three: one freeze after it
            heap.sessions_changed(n)
        await wait_until(lambda: heap.freezes == 2, what="a freeze after the wave")
        assert heap.scheduled is None and heap.frozen_since_reclaim
        await wait_until(lambda: not heap.frozen_since_reclaim, what="a reclaim")
        assert gc.get_freeze_count() > 0  # frozen again after the reclaim
    finally:
        await heap.close()
        gc.unfreeze()  # this test process keeps collecting what it made


def test_young_collections_every_sets_only_the_youngest_generation() -> None:
    import gc

    from dispatchnet.memory import YOUNG_COLLECTION_OBJECTS, young_collections_every

    before = gc.get_threshold()
    try:
        young_collections_every()
        assert gc.get_threshold() == (YOUNG_COLLECTION_OBJECTS, *before[1:])
        young_collections_every(1234)
        assert gc.get_threshold() == (1234, *before[1:])
    finally:
        gc.set_threshold(*before)  # this test process keeps CPython's
