"""WorkerService.Connect hardening: handshake deadline, errors while handling a message,
receipt timestamps. Hand-driven workers against real coordinators on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import Cluster, RawWorker, make_profile

from dispatchnet.server import start_coordinator


@pytest.fixture
async def impatient(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A coordinator that gives a Connect stream half a second to say hello."""
    profile = make_profile(workers={"hello_timeout_seconds": 0.5})
    c = Cluster(await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0"), tmp_path)
    try:
        yield c
    finally:
        await c.close()


async def test_silent_connect_stream_is_closed_after_the_hello_timeout(
    impatient: Cluster,
) -> None:
    async with grpc.aio.insecure_channel(impatient.address) as channel:
        w = RawWorker(channel)  # opens the stream and sends nothing
        assert await w.status() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = await w.call.details() or ""
        assert "no hello within 0.5s" in details and "hello_timeout_seconds" in details
        w.close()


async def test_unanswered_challenge_is_closed_after_the_hello_timeout(
    impatient: Cluster,
) -> None:
    async with grpc.aio.insecure_channel(impatient.address) as channel:
        w = RawWorker(channel)
        w.hello()
        assert (await w.recv()).HasField("challenge")
        assert await w.status() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no challenge_response within 0.5s" in (await w.call.details() or "")
        assert not impatient.coord.hub.sessions
        w.close()
