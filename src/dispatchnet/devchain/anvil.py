"""A local EVM chain: the anvil binary shipped by the npm package @foundry-rs/anvil.

`npm install` (run by `make setup`) puts the binary for this platform in
node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil; the package's own `anvil` command is
a Node wrapper around it, which this module skips. Nothing is downloaded at run time.

    with Anvil() as chain:               # or: async with Anvil() as chain:
        chain.rpc_url                    # http://127.0.0.1:<free port>
        chain.accounts[0].private_key    # deterministic dev accounts (anvil's default mnemonic)

anvil listens on port 0 by default (the kernel picks a free port, so there is no race between
choosing a port and binding it; `port=N` asks for one) and logs to a file, from which the
bound address is read. `Anvil(detached=True, log_path=...)` plus detach() leaves a node
running after the Python process exits (`dispatch chain up`).
start() returns once eth_chainId answers with the expected chain id.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from eth_utils.address import to_checksum_address

from dispatchnet.chains.deployments import DevChainError

# Anvil's (and Hardhat's) well-known development mnemonic: its accounts are public and hold
# test ether only. Never use them on a public network.
DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
# The conventional local development chain id (anvil's and Hardhat's default).
DEFAULT_CHAIN_ID = 31337
# Overrides the binary lookup (a path to an anvil executable).
ANVIL_ENV = "DISPATCH_ANVIL"

_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")
_PKG = "@foundry-rs"


class AnvilError(DevChainError):
    """anvil could not be found, or did not start."""


@dataclass(frozen=True)
class DevAccount:
    address: str
    private_key: str


def _platform_package() -> str:
    system = {"linux": "linux", "darwin": "darwin", "win32": "win32"}.get(sys.platform)
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if system is None or arch is None:
        raise AnvilError(f"no anvil package for {sys.platform}/{machine}")
    return f"anvil-{system}-{arch}"


def _node_modules_dirs() -> list[Path]:
    """node_modules of the repository this module lives in, then of the working directory
    and its parents."""
    starts = [Path(__file__).resolve().parent, Path.cwd()]
    seen: list[Path] = []
    for start in starts:
        for d in (start, *start.parents):
            nm = d / "node_modules"
            if nm.is_dir() and nm not in seen:
                seen.append(nm)
    return seen


def find_anvil() -> Path:
    """The anvil executable: $DISPATCH_ANVIL, else the npm package's platform binary, else
    `anvil` on PATH."""
    override = os.environ.get(ANVIL_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise AnvilError(f"{ANVIL_ENV}={override} is not an executable file")
        return path
    exe = "anvil.exe" if sys.platform == "win32" else "anvil"
    candidates: list[Path] = []
    try:
        pkg = _platform_package()
    except AnvilError:
        pkg = None
    for nm in _node_modules_dirs():
        if pkg:
            candidates.append(nm / _PKG / pkg / "bin" / exe)
        candidates.append(nm / _PKG / "anvil" / exe)  # where the package's postinstall puts it
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise AnvilError(
        "anvil not found: run `make setup` (npm install puts it in node_modules/"
        f"{_PKG}/) or set {ANVIL_ENV}"
    )


def _rpc(url: str, method: str, params: list[object], timeout: float) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise AnvilError(f"{method}: {reply['error']}")
    return reply["result"]


class Anvil:
    """One anvil process on 127.0.0.1. Use it with `with`, `async with`, or start()/stop()."""

    def __init__(
        self,
        *,
        chain_id: int = DEFAULT_CHAIN_ID,
        accounts: int = 10,
        mnemonic: str = DEFAULT_MNEMONIC,
        block_time: float | None = None,
        log_path: Path | None = None,
        binary: Path | None = None,
        startup_timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
        port: int = 0,
        detached: bool = False,
    ) -> None:
        self.chain_id = chain_id
        self.n_accounts = accounts
        self.mnemonic = mnemonic
        self.block_time = block_time
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.requested_port = port
        # detached: anvil runs in its own session and outlives this process (see detach()).
        self.detached = detached
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_path = log_path
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.accounts: list[DevAccount] = []
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        if self.port is None:
            raise AnvilError("anvil is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self._proc is not None:
            raise AnvilError("anvil already started")
        binary = self.binary or find_anvil()
        self._tmp = tempfile.TemporaryDirectory(prefix="dispatch-anvil-")
        tmp = Path(self._tmp.name)
        log_path = self.log_path or tmp / "anvil.log"
        config_path = tmp / "anvil.json"
        args = [
            str(binary),
            "--host", self.host,
            "--port", str(self.requested_port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self.n_accounts),
            "--mnemonic", self.mnemonic,
            "--config-out", str(config_path),
            "--color", "never",
            *(["--block-time", str(self.block_time)] if self.block_time else []),
            *self.extra_args,
        ]  # fmt: skip
        began = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
            )
        self.log_path = log_path
        atexit.register(self.stop)
        try:
            self._await_ready(log_path, offset, config_path, began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _log_tail(self, path: Path) -> str:
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _await_ready(self, log_path: Path, offset: int, config: Path, deadline: float) -> None:
        assert self._proc is not None
        while self.port is None:
            if self._proc.poll() is not None:
                raise AnvilError(f"anvil exited with {self._proc.returncode}: "
                                 f"{self._log_tail(log_path)}")  # fmt: skip
            with log_path.open("rb") as f:
                f.seek(offset)
                m = _LISTENING.search(f.read())
            if m:
                self.port = int(m.group(2))
                break
            if time.monotonic() > deadline:
                raise AnvilError(f"anvil did not start listening: {self._log_tail(log_path)}")
            time.sleep(0.01)
        while True:
            try:
                got = _rpc(self.rpc_url, "eth_chainId", [], timeout=1.0)
                if int(str(got), 16) != self.chain_id:
                    raise AnvilError(f"anvil answers chain id {got}, expected {self.chain_id}")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise AnvilError(
                        f"anvil did not answer eth_chainId: {self._log_tail(log_path)}"
                    ) from None
                time.sleep(0.01)
        data = json.loads(config.read_text())
        self.accounts = [
            DevAccount(address=to_checksum_address(a), private_key=k)
            for a, k in zip(data["available_accounts"], data["private_keys"], strict=True)
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def detach(self) -> int:
        """Lets anvil outlive this object and this process (`dispatch chain up`); returns its
        pid. stop() no longer touches it: end it with a signal to that pid."""
        if self._proc is None or self._proc.poll() is not None:
            raise AnvilError("anvil is not running")
        atexit.unregister(self.stop)
        pid = self._proc.pid
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()  # only the --config-out file, read at start-up
            self._tmp = None
        return pid

    def stop(self, timeout: float = 5.0) -> None:
        """Terminates anvil (SIGTERM, then SIGKILL after `timeout`). Safe to call twice."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        self.port = None
        if self._tmp is not None:
            if self.log_path is not None and self.log_path.parent == Path(self._tmp.name):
                self.log_path = None
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
