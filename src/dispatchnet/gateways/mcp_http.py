"""The MCP server over streamable HTTP (MCP's HTTP transport, the `mcp` SDK's app under
uvicorn), at http://HOST:PORT/mcp.

Security by default: it listens on loopback unless told otherwise, where the SDK checks
Host and Origin (DNS rebinding); anywhere else it needs a bearer token, since whoever
reaches it acts as its client key and spends from its wallet. With a token, every request
must carry `Authorization: Bearer <token>` (401 otherwise, as JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dispatchnet.gateways import MAX_HEADER_BYTES
from dispatchnet.gateways.mcp import DispatchMcp

PATH = "/mcp"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BearerAuth:
    """ASGI middleware: HTTP requests without `Authorization: Bearer <token>` get 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps(
                    {
                        "error": {
                            "code": "unauthenticated",
                            "message": "send Authorization: Bearer <the server's token>",
                        }
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="dispatch-mcp"'),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "request_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
}
MAX_ERROR_TEXT = 300  # characters of a non-JSON error's text kept in its JSON message


class JsonErrors:
    """ASGI middleware: an error answer (4xx, 5xx) that is not JSON (the SDK's and
    Starlette's plain-text 413, 404, 405, 421...) goes out as JSON,
    {"error": {"code", "message"}}, like every other error of this server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, object] | None = None  # the start of a non-JSON error
        text = bytearray()

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or ())
                kind = headers.get(b"content-type", b"").split(b";")[0].strip()
                if message["status"] >= 400 and kind != b"application/json":
                    held = dict(message)
                    return
            elif held is not None and message["type"] == "http.response.body":
                if len(text) < MAX_ERROR_TEXT * 4:
                    text.extend(message.get("body", b"")[: MAX_ERROR_TEXT * 4])
                if message.get("more_body"):
                    return
                status = int(held["status"])  # type: ignore[call-overload]
                said = text.decode("utf-8", "replace").strip()[:MAX_ERROR_TEXT]
                body = json.dumps(
                    {
                        "error": {
                            "code": ERROR_CODES.get(status, f"http_{status}"),
                            "message": said or f"HTTP {status}",
                        }
                    }
                ).encode()
                kept = [
                    (k, v)
                    for k, v in held.get("headers") or ()  # type: ignore[attr-defined]
                    if k.lower() not in (b"content-type", b"content-length")
                ]
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            *kept,
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


class _Uvicorn(uvicorn.Server):
    """SIGINT/SIGTERM stop serving, as in uvicorn; unlike uvicorn, the signal is not raised
    again once it has stopped, so the calls still open get to cancel their jobs before the
    process exits (DispatchMcp.drain)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.exiting: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exiting is None:
            self.exiting = asyncio.ensure_future(self.on_exit())
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)


async def serve_http(
    mcp: DispatchMcp,
    host: str,
    port: int,
    token: str = "",
    announce: Callable[[str], None] = lambda url: None,
) -> None:
    """Serves until SIGINT/SIGTERM; announce(url) once it listens (port 0: a free port).
    ValueError for a non-loopback host without a token."""
    if not token and not is_loopback(host):
        raise ValueError(
            f"listening on {host} needs a bearer token (--token-file): whoever reaches the "
            "server acts as its client key and spends from its wallet"
        )
    app: ASGIApp = JsonErrors(mcp.server.streamable_http_app(streamable_http_path=PATH, host=host))
    if token:
        app = BearerAuth(app, token)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    # on SIGTERM, calls still open are cut after 2 s (their jobs are cancelled, uncharged)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        http="h11",  # bounds the request line and headers (see gateways/serve.py)
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    # a signal first stops the calls in flight (their jobs cancelled), so that their
    # requests end before uvicorn's graceful shutdown has to cut them
    server = _Uvicorn(config, lambda: mcp.drain(10))
    where = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    url = f"http://{where}:{bound}{PATH}"

    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    announce(url)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
