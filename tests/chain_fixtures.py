"""Shared by the tests that need a real local chain: `dispatch` as a subprocess, one anvil
per test module (`dispatch chain up --port 0` in a temporary DISPATCH_HOME, stopped at the
end), and coordinators on that chain's deployment. Import the fixtures `home` and `chain`
into a test module to use them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, Cluster

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatchnet.chains.evm.node import load_or_create_chain_key, web3_for
from dispatchnet.devchain.anvil import _rpc
from dispatchnet.devchain.local_chain import pid_alive, stop_pid
from dispatchnet.profiles import Profile, load_profile
from dispatchnet.server import start_coordinator


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "DISPATCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def dispatch(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatchnet.cli", *args],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def adispatch(home: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatchnet.cli",
        *args,
        env=_env(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dispatch-home")


@pytest.fixture(scope="module")
def chain(home: Path) -> Iterator[dict[str, Any]]:
    r = dispatch(home, "chain", "up", "--profile", "local-monad", "--port", "0")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    try:
        yield data
    finally:
        if (home / "chains" / "local-monad.json").exists():  # the last test did not run
            dispatch(home, "chain", "down", "--profile", "local-monad")
        stop_pid(int(data["anvil_pid"]))  # whatever happened above
        assert not pid_alive(int(data["anvil_pid"]))


def chain_profile(deployment: str, payments: dict[str, Any] | None = None, **chain: Any) -> Profile:
    """local-monad with fast job timings and small batches, on the test's deployment;
    payments off unless `payments` gives [payments] settings (enabled by default then)."""
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    sections["receipts"] = {"batch_size": 2, "batch_max_age_seconds": 30}
    sections["chain"] = {"deployment": deployment, **chain}
    sections["payments"] = {"enabled": True, **payments} if payments is not None else {}
    sections["payments"].setdefault("enabled", False)
    return load_profile("local-monad").with_overrides(**sections)


@contextlib.asynccontextmanager
async def cluster_for(profile: Profile, data: Path) -> AsyncIterator[Cluster]:
    coord = await start_coordinator(profile, data, "127.0.0.1:0")
    assert coord.batcher is not None
    # retry quickly in tests (the defaults back off up to a minute)
    coord.batcher.anchoring.retry_initial, coord.batcher.anchoring.retry_max = 0.1, 0.3
    c = Cluster(coord, data)
    try:
        yield c
    finally:
        await c.close()


class TcpProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>; stop() makes the port refuse connections
    (and cuts the open ones), start() listens on the same port again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()
        self.server = None

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}


async def unreachable_proxy(chain: dict[str, Any]) -> TcpProxy:
    """A proxy to the chain's node, stopped: its URL refuses connections until start()."""
    proxy = TcpProxy(int(chain["rpc_url"].rsplit(":", 1)[1]))
    await proxy.start()
    await proxy.stop()
    return proxy


def funded_chain_key(chain: dict[str, Any], key_file: Path) -> str:
    """Creates a chain key file for the coordinator's own account, funds it with test
    ether, and returns its address."""
    key = load_or_create_chain_key(key_file)
    address = web3_for(chain["rpc_url"], 5).eth.account.from_key(key).address
    _rpc(chain["rpc_url"], "anvil_setBalance", [address, hex(10**18)], timeout=5)
    return str(address)


class FacilitatorServer:
    """An x402 facilitator (the SDK's, any scheme) served over HTTP on 127.0.0.1:<free
    port>, behind the /supported, /verify and /settle endpoints the SDK's
    HTTPFacilitatorClient calls (how a remote facilitator settles); stop() shuts it down."""

    def __init__(self, facilitator: Any) -> None:
        from x402.schemas import PaymentPayload, PaymentRequirements

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, model: Any) -> None:
                body = model.model_dump_json(by_alias=True, exclude_none=True).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.reply(facilitator.get_supported())

            def do_POST(self) -> None:
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                payload = PaymentPayload.model_validate(data["paymentPayload"])
                requirement = PaymentRequirements.model_validate(data["paymentRequirements"])
                call = facilitator.verify if self.path == "/verify" else facilitator.settle
                self.reply(call(payload, requirement))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
