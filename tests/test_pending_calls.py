"""[server] max_pending_calls: the calls gRPC holds until the coordinator's event loop
takes them (a wave of workers connecting at once waits there instead of being refused)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from conftest import make_profile
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatchnet.profiles import ProfileError
from dispatchnet.server import start_coordinator

CALLS = 12


async def test_calls_past_max_pending_calls_are_refused_and_the_held_ones_served(
    tmp_path: Path,
) -> None:
    """While the loop is busy, gRPC holds max_pending_calls calls for it and refuses the
    ones past them at once (CANCELLED); the held ones are answered when the loop is free.
    With gRPC's own default the first 1,000 would be held, so nothing here would be refused."""
    coord = await start_coordinator(
        make_profile(server={"max_pending_calls": 1}), tmp_path / "coord", "127.0.0.1:0"
    )
    address = f"127.0.0.1:{coord.port}"
    refused = threading.Event()
    codes: list[grpc.StatusCode] = []

    def check() -> None:
        with grpc.insecure_channel(address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=60
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                if e.code() is grpc.StatusCode.CANCELLED:
                    refused.set()

    threads = [threading.Thread(target=check) for _ in range(CALLS)]
    try:
        for t in threads:
            t.start()
        # the event loop is busy (this wait holds it) until gRPC has refused a call
        held_up = refused.wait(timeout=30)
        for t in threads:
            await asyncio.to_thread(t.join)
    finally:
        await coord.stop(grace=0)
    assert held_up, f"no call was refused past max_pending_calls=1: {codes}"
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, codes
    assert len(codes) == CALLS


def test_max_pending_calls_must_be_positive() -> None:
    with pytest.raises(ProfileError, match=r"max_pending_calls must be between 1 and 1000000"):
        make_profile(server={"max_pending_calls": 0})
