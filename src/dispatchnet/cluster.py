"""A local cluster for trying failover by hand (`dispatch cluster up`) and for the cluster
demo: a throwaway PostgreSQL (store/local_postgres.py: the machine's initdb and pg_ctl, a
free loopback port, its directory under the data dir) and N `dispatch coordinator`
processes on free ports sharing it, each with its own data dir (key, instance id).

The database's password reaches the coordinators through PGPASSWORD, never their command
lines; the url printed has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dispatchnet.store.local_postgres import ROLE, LocalPostgres

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ClusterError(Exception):
    """A coordinator of the cluster did not start."""


@dataclass
class Member:
    """One coordinator process of the cluster."""

    index: int
    data_dir: Path
    address: str = ""  # fixed at the first start: a restart listens there again
    public_key: str = ""
    proc: asyncio.subprocess.Process | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class LocalCluster:
    """`async with LocalCluster(profile, data_dir, 3) as cluster:` starts PostgreSQL and the
    coordinators (undoing itself when a start fails); leaving it stops them all, the
    database last, and deletes the database's directory. kill(i) SIGKILLs a coordinator,
    start(i) starts it again on its address."""

    def __init__(
        self, profile: str, data_dir: Path, coordinators: int = 3, env: dict[str, str] | None = None
    ) -> None:
        if not 1 <= coordinators <= 16:
            raise ValueError("--coordinators must be 1-16")
        self.profile = profile
        self.data_dir = data_dir
        self.env = dict(env if env is not None else os.environ)
        self.members = [Member(i, data_dir / f"coordinator-{i}") for i in range(coordinators)]
        self.postgres: LocalPostgres | None = None

    @property
    def store_url(self) -> str:
        """The database's url, without its password (PGPASSWORD carries it)."""
        assert self.postgres is not None
        return f"postgresql://{ROLE}@127.0.0.1:{self.postgres.port}/postgres"

    @property
    def addresses(self) -> list[str]:
        return [m.address for m in self.members]

    async def __aenter__(self) -> LocalCluster:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.postgres = await asyncio.to_thread(LocalPostgres.create, parent=self.data_dir)
            self.env["PGPASSWORD"] = self.postgres.password
            self.env.pop("DISPATCH_COORDINATOR", None)
            for m in self.members:
                await self.start(m.index)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def describe(self) -> dict[str, Any]:
        assert self.postgres is not None
        return {
            "coordinators": self.addresses,
            "coordinator_keys": [m.public_key for m in self.members],
            "store": self.store_url,
            "postgres_dir": str(self.postgres.directory),
            "data_dir": str(self.data_dir),
            "profile": self.profile,
            "use": f"--coordinator {','.join(self.addresses)}",
        }

    async def start(self, i: int) -> dict[str, Any]:
        """Starts coordinator i (on a free port the first time, on its address after);
        its JSON status line."""
        m = self.members[i]
        m.data_dir.mkdir(parents=True, exist_ok=True)
        if m.log is None:
            m.log = (self.data_dir / f"coordinator-{i}.log").open("ab")
        m.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatchnet.cli", "coordinator", "--profile", self.profile,
            "--listen", m.address or "127.0.0.1:0", "--data-dir", str(m.data_dir),
            "--store", self.store_url,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=m.log,
            env=self.env,
        )  # fmt: skip
        assert m.proc.stdout is not None
        try:
            line = await asyncio.wait_for(m.proc.stdout.readline(), START_TIMEOUT)
            info = json.loads(line)
            m.address, m.public_key = info["listening"], info["coordinator_public_key"]
        except (TimeoutError, ValueError, KeyError, TypeError):
            raise ClusterError(
                f"coordinator {i} did not start (see {self.data_dir / f'coordinator-{i}.log'})"
            ) from None
        return dict(info)

    def kill(self, i: int) -> None:
        """SIGKILLs coordinator i (as a crash would)."""
        m = self.members[i]
        if m.running:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM to every coordinator (SIGKILL after STOP_TIMEOUT), then the database;
        idempotent."""
        for m in self.members:
            if m.running:
                assert m.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            if m.proc is not None:
                try:
                    await asyncio.wait_for(m.proc.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        m.proc.kill()
                    await m.proc.wait()
            if m.log is not None:
                m.log.close()
                m.log = None
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
