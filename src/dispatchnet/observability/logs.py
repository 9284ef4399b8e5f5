"""Logs for people (the default) or JSON lines for log pipelines (`dispatch --log-format
json`, or DISPATCH_LOG_FORMAT=json).

A JSON line: {"time", "level", "logger", "message"} plus, when known, "job_id",
"worker_id", "client_id" (its first 16 characters: enough to tell clients apart, not
an identity to act as), "trace_id" and "span_id" (the current OpenTelemetry span, when
tracing is on), and "exception" (the traceback). The ids come from the log call's
`extra={...}`, else from what the code handling the record bound with bind(): the gRPC
edge binds the authenticated client, a worker's stream its worker id, a worker message
its job id.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

FORMATS = ("human", "json")
HUMAN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("job_id", "worker_id", "client_id")
CLIENT_ID_CHARS = 16

_bound: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "dispatch_log_fields", default=MappingProxyType({})
)


def bind(**fields: str) -> contextvars.Token[Mapping[str, str]]:
    """Adds fields to every record logged in this context from now on; reset(token) undoes."""
    return _bound.set({**_bound.get(), **{k: v for k, v in fields.items() if v}})


def reset(token: contextvars.Token[Mapping[str, str]]) -> None:
    _bound.reset(token)


@contextmanager
def bound(**fields: str) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def _trace_ids() -> tuple[str, str]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover (a dependency)
        return "", ""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _bound.get()
        for name in FIELDS:
            value = getattr(record, name, None) or context.get(name)
            if value:
                out[name] = str(value)[:CLIENT_ID_CHARS] if name == "client_id" else str(value)
        trace_id, span_id = _trace_ids()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(fmt: str = "human", verbose: bool = False) -> None:
    """Logs of this process on stderr, in `fmt` (human or json), INFO (DEBUG: verbose);
    like logging.basicConfig, nothing changes when logging is set up already."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(HUMAN))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_WRITE_FAILED = "ExecuteBatchError raised in core by servicer method"


class PeerGoneFilter(logging.Filter):
    """grpc.aio logs an ERROR with a traceback when a streaming RPC's write fails because
    its peer went away while the write waited (a worker that stopped reading, then
    disconnected). That is a disconnect, not an error of ours: the record becomes one
    INFO line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(_WRITE_FAILED):
            text = record.getMessage()  # "... servicer method [/pkg.Service/Method]"
            method = text[text.find("[") + 1 : text.rfind("]")] if "[" in text else "a stream"
            record.msg, record.args = "a write on %s failed: the peer went away", (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_peer_gone() -> None:
    """Installs PeerGoneFilter on grpc.aio's logger (once)."""
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, PeerGoneFilter) for f in logger.filters):
        logger.addFilter(PeerGoneFilter())


class RateLimitedLog:
    """Logs at most one line per `interval` seconds, counting the lines it held back."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger, self.interval = logger, interval
        self.last = -interval
        self.held = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        held, self.held, self.last = self.held, 0, now
        suffix = f" ({held} more since the last report)" if held else ""
        self.logger.warning(msg + suffix, *args)
