"""Processes of local development chains (anvil, the Solana node), which outlive the
command that started them: whether a recorded pid still runs, and stopping it without
ever signalling a recycled pid. No chain library is imported here."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True when `pid` runs (a zombie, exited but not reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def stop_pid(pid: int, is_ours: Callable[[int], bool], timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`, for a pid that is_ours(pid) recognises (its
    command line is the chain's: guards against a recycled pid); True if it was running."""
    if not (pid_alive(pid) and is_ours(pid)):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    return True
