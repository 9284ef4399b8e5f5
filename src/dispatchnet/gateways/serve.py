"""Running the gateway: its router built from a deployment profile, served by uvicorn.

router = gateway_router("local-monad", ["127.0.0.1:50051"])
async with GatewayServer(Gateway(router), "127.0.0.1", 0) as server:
    print(server.url)            # http://127.0.0.1:<port>
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import uvicorn

from dispatchnet import keys
from dispatchnet.gateways import MAX_HEADER_BYTES
from dispatchnet.gateways.http import Gateway
from dispatchnet.gateways.relay import RelayPayer
from dispatchnet.profiles import Profile, load_profile
from dispatchnet.sdk import ComputeRouter, Network, SpendingLimits, providers_from_env

DEFAULT_LISTEN = "127.0.0.1:8402"
DEFAULT_MAX_PRICE_MICROS = 100_000  # $0.10 a job, the SDK's default per-job limit
GRACEFUL_SECONDS = 10  # open streams get this long to end when the gateway stops


def gateway_router(
    profile: str | Profile,
    coordinators: Sequence[str] = (),
    *,
    key_file: str | Path | None = None,
    max_price_micros: int | None = DEFAULT_MAX_PRICE_MICROS,
    hosted: bool = False,
    coordinator_key: bytes = b"",
) -> ComputeRouter:
    """The gateway's ComputeRouter: one network, the profile's chain track, at
    `coordinators` (default $DISPATCH_COORDINATOR, else the profile's [server] listen),
    paid by each HTTP caller through RelayPayer. Its client identity is key_file (default
    $DISPATCH_HOME/gateway.key): every job through the gateway is this client's, and
    PRIVATE jobs go to the workers paired with it. max_price_micros: the most one job may
    cost (None: no limit). hosted: OpenAI / Anthropic providers from the environment as
    the fallback (the Gateway's hosted budget decides whether they are used)."""
    from dispatchnet.chains import registry

    p = load_profile(profile) if isinstance(profile, str) else profile
    addresses = [a for a in coordinators if a]
    if not addresses:
        env = os.environ.get("DISPATCH_COORDINATOR", "")
        addresses = [a.strip() for a in env.split(",") if a.strip()] or [p.server.listen]
    network = Network(registry.track(p.chain.kind), addresses, RelayPayer(), coordinator_key)
    key = keys.load_or_create(Path(key_file or keys.default_home() / "gateway.key"))
    return ComputeRouter(
        [network],
        key=key,
        hosted=providers_from_env() if hosted else [],
        limits=SpendingLimits(per_job_micros=max_price_micros, per_session_micros=None),
    )


class GatewayServer:
    """uvicorn serving a Gateway on host:port (0: a free port), in this event loop. The
    socket listens once the object is entered (connections wait in its backlog until
    uvicorn takes them); leaving stops uvicorn (open streams get GRACEFUL_SECONDS) and
    closes the gateway's router."""

    def __init__(
        self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(
                gateway.app,
                log_config=None,  # the process's logging (stderr): stdout is for the JSON line
                log_level=log_level,
                access_log=log_level in ("debug", "info"),
                server_header=False,
                timeout_graceful_shutdown=GRACEFUL_SECONDS,
                lifespan="off",
                # h11 bounds a request's line and headers (httptools, uvicorn's
                # default when installed, read a 400 MiB header whole)
                http="h11",
                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            )
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> GatewayServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError:
            sock.close()
            await self.gateway.close()
            raise
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]))
        return self

    async def wait(self) -> None:
        """Until uvicorn stops (a signal, or stop())."""
        assert self._task is not None
        await asyncio.shield(self._task)

    def stop(self) -> None:
        self.server.should_exit = True

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._task is not None:
                self.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self.gateway.close()


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); ValueError for anything else."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)
