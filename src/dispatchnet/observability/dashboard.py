"""The operator dashboard: a read-only page served by the coordinator on
`[observability] dashboard_listen`, updated live over server-sent events (README
"Observability").

- GET / is the page (dashboard.html: its script and styles are inline, nothing is loaded
  from elsewhere; a Content-Security-Policy with a fresh nonce allows only them).
- Everything under /api/ needs the operator token: 32 random bytes (URL-safe base64)
  written to <data dir>/dashboard.token (mode 0600) at the first start. A client sends it
  as `Authorization: Bearer <token>`, or POSTs it once to /api/login (JSON {"token": ...})
  to get an HttpOnly, SameSite=Strict cookie, which the page's EventSource then carries.
- GET /api/snapshot: the dashboard's data (feed.py) as JSON; GET /api/events: the same, as
  an SSE stream (`event: snapshot`), sent at each change (at most every MIN_INTERVAL
  seconds) with a comment line every KEEPALIVE_SECONDS; at most MAX_STREAMS at once.
- Errors are JSON ({"error": ...}) with their HTTP status; nothing changes state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dispatchnet.observability.feed import Feed, WorkerView
from dispatchnet.observability.logs import RateLimitedLog

if TYPE_CHECKING:
    from dispatchnet.coordinator.hub import WorkerHub

log = logging.getLogger("dispatch.dashboard")

TOKEN_FILE = "dashboard.token"
COOKIE = "dispatch_dashboard"
MIN_INTERVAL = 0.25  # seconds between two snapshots of one stream, at least
KEEPALIVE_SECONDS = 15.0
MAX_STREAMS = 16
MAX_BODY = 4096  # bytes of a login request
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def load_or_create_token(path: Path) -> str:
    """The operator token in `path`, created (0600) when missing."""
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=HEADERS)


_failures = RateLimitedLog(log, 60.0)  # unexpected errors: a line a minute at most


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every HTTP error as JSON, with the security headers; anything unexpected is a JSON
    500, logged a line a minute at most (anyone can send requests)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason or "error")
    except ConnectionError:  # the peer went away: nothing to answer
        raise
    except Exception as e:
        _failures.warning("dashboard request %s failed: %s", request.path[:200], repr(e)[:300])
        return _error(500, "the dashboard could not answer this request")


def _same(given: str, expected: str) -> bool:
    """Whether a token sent (text the HTTP layer decoded, perhaps with surrogate escapes,
    or any JSON string) is the expected one, in constant time."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


class Dashboard:
    def __init__(
        self,
        feed: Feed,
        hub: WorkerHub,
        data_dir: Path,
        about: dict[str, Any],
    ) -> None:
        self.feed = feed
        self.hub = hub
        self.about = about
        self.token_file = data_dir / TOKEN_FILE
        self.token = load_or_create_token(self.token_file)
        self.page = (
            resources.files("dispatchnet.observability")
            .joinpath("dashboard.html")
            .read_text(encoding="utf-8")
        )
        self.streams = 0
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._cache: tuple[int, str] = (-1, "")
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The page with the token in its fragment (never sent to the server by browsers)."""
        return f"{self.url}#token={self.token}"

    # --- serving --------------------------------------------------------------------------

    async def start(self, listen: str) -> None:
        host, port = listen.rsplit(":", 1)
        self.host = host.strip("[]")
        app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY)
        app.router.add_get("/", self._page)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_post("/api/login", self._login)
        app.router.add_post("/api/logout", self._logout)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/events", self._events)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, int(port))
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, request: web.Request) -> bool:
        given = request.cookies.get(COOKIE, "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer ") :].strip()
        return bool(given) and _same(given, self.token)

    def _check(self, request: web.Request) -> None:
        if not self._authorized(request):
            raise web.HTTPUnauthorized(
                reason="the operator token is needed: it is in the coordinator's data dir, "
                f"{TOKEN_FILE}"
            )

    async def _page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'"
        )
        return web.Response(
            text=self.page.replace("{{nonce}}", nonce),
            content_type="text/html",
            charset="utf-8",
            headers={**HEADERS, "Content-Security-Policy": csp},
        )

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=HEADERS)

    async def _login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error(400, 'send JSON {"token": "..."}')
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not _same(token.strip(), self.token):
            return _error(401, f"wrong token: see {TOKEN_FILE} in the coordinator's data dir")
        response = web.json_response({"ok": True}, headers=HEADERS)
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/api")
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        response = web.json_response({"ok": True}, headers=HEADERS)
        response.del_cookie(COOKIE, path="/api")
        return response

    def _workers(self) -> list[WorkerView]:
        score = self.hub.reputation.score
        return [
            WorkerView(
                s.worker_id,
                s.kind,
                s.agent_id,
                score(s.worker_id),
                s.load,
                s.max_concurrency,
                s.draining,
                s.connected_at,
            )
            for s in self.hub.sessions.values()
        ]

    def snapshot_json(self) -> str:
        """The current snapshot, serialized once per change whatever the number of readers."""
        version, text = self._cache
        if version != self.feed.version or not text:
            text = json.dumps(self.feed.snapshot(self._workers(), self.about))
            self._cache = (self.feed.version, text)
        return text

    async def _snapshot(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.Response(text=self.snapshot_json(), content_type="application/json",
                            headers=HEADERS)  # fmt: skip

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        if self.streams >= MAX_STREAMS:
            return _error(503, f"at most {MAX_STREAMS} live dashboards at once")
        response = web.StreamResponse(
            headers={**HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        self.streams += 1
        changed = self.feed.subscribe()
        try:
            while not self._stopping.is_set():
                if changed.is_set():
                    changed.clear()
                    data = self.snapshot_json()
                    await response.write(f"event: snapshot\ndata: {data}\n\n".encode())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(MIN_INTERVAL):
                            await self._stopping.wait()  # changes meanwhile go out together
                    continue
                try:
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        await changed.wait()
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.feed.unsubscribe(changed)
            self.streams -= 1
        return response
