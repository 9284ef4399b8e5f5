"""Starting a coordinator on an address it cannot have: a clear error, nothing left open."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_profile

from dispatchnet.errors import Unavailable
from dispatchnet.server import start_coordinator


async def test_a_taken_port_is_unavailable_and_the_second_store_is_closed(tmp_path: Path) -> None:
    profile = make_profile()
    first = await start_coordinator(profile, tmp_path / "first", "127.0.0.1:0")
    try:
        with pytest.raises(
            Unavailable, match=r"cannot listen on 127\.0\.0\.1:\d+: the port is in use"
        ):
            await start_coordinator(profile, tmp_path / "second", f"127.0.0.1:{first.port}")
        # the second's store was closed: a third start on its data directory takes it
        third = await start_coordinator(profile, tmp_path / "second", "127.0.0.1:0")
        await third.stop(grace=0)
    finally:
        await first.stop(grace=0)


async def test_an_address_that_is_not_host_port_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="cannot listen on nonsense"):
        await start_coordinator(make_profile(), tmp_path / "c", "nonsense")
