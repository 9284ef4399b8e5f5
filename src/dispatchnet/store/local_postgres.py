"""A throwaway PostgreSQL cluster on this machine: `initdb` + `pg_ctl` in a directory, on
a loopback port, for tests and local trials (never for data you want to keep).

    with LocalPostgres.create() as pg:   # initdb + pg_ctl start -w on a free port
        pg.url("postgres")               # postgresql://dispatch:<password>@127.0.0.1:<port>/postgres

The server binaries are the machine's (PostgreSQL 15 from the system packages; `make setup`
installs them): found through `pg_config --bindir`, /usr/lib/postgresql/<version>/bin, or
PATH. initdb refuses to run as root, so under root the cluster runs as the `postgres`
system user (`runuser -u postgres --`) in a directory it owns. The cluster listens on
127.0.0.1 only, with no Unix socket, and its one role, `dispatch`, has a random password
(SCRAM). pg_ctl's -w waits until the server accepts connections, and until it has stopped;
stop() also waits for the server's process to end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from dispatchnet.devchain.processes import pid_alive

ROLE = "dispatch"  # the cluster's superuser
SYSTEM_USER = "postgres"  # who runs the server when we are root
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found: install PostgreSQL 15 "
    "(`make setup` does it with the system package manager: apt-get install postgresql)"
)


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresStartError(RuntimeError):
    """initdb or pg_ctl failed; the message ends with the server log's tail."""


def _bindir_candidates() -> list[Path]:
    found: list[Path] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
        found.append(Path(out.stdout.strip()))

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if (initdb := shutil.which("initdb")) is not None:
        found.append(Path(initdb).resolve().parent)
    return found


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl; raises PostgresNotFound."""
    for d in _bindir_candidates():
        if all(os.access(d / name, os.X_OK) for name in ("initdb", "pg_ctl")):
            return d
    raise PostgresNotFound(INSTALL_HINT)


def has_library(name: str) -> bool:
    """Whether the server binaries come with the loadable module `name` (e.g.
    pg_stat_statements, one of PostgreSQL's contrib modules), in the lib directory beside
    their bin directory."""
    try:
        return (find_bindir().parent / "lib" / f"{name}.so").is_file()
    except PostgresNotFound:
        return False


def _searchable(path: Path) -> bool:
    """Whether any user may reach into path (every directory up to it world-searchable)."""
    p = path.resolve()
    return all(d.stat().st_mode & 0o001 for d in (p, *p.parents))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPostgres:
    """A running cluster; stop() (or leaving its `with` block) stops it and deletes its
    directory."""

    directory: Path
    port: int
    password: str
    bindir: Path
    run_as: str | None = None  # the system user running the server (None: this process's)
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def create(
        cls,
        durable: bool = False,
        attempts: int = 3,
        parent: Path | None = None,
        settings: Sequence[str] = (),
    ) -> LocalPostgres:
        """initdb in a new temporary directory (under `parent` when given, unless this
        process is root and the server's user could not reach it there: then in /tmp),
        then starts the server on a free port (another free port when the chosen one was
        taken meanwhile, up to `attempts`). durable=False turns fsync off: fast, and lost
        on a machine crash. settings: more postgresql.conf lines (e.g.
        "shared_preload_libraries = 'pg_stat_statements'")."""
        bindir = find_bindir()
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresNotFound(
                    f"running as root, and there is no {SYSTEM_USER!r} system user to run "
                    f"PostgreSQL as; {INSTALL_HINT}"
                ) from None
        # the server's user must reach the directory: under root, in /tmp (world-searchable)
        where = str(parent) if parent is not None else None
        if owner is not None and (parent is None or not _searchable(parent)):
            where = "/tmp"
        directory = Path(tempfile.mkdtemp(prefix="dispatch-pg-", dir=where))
        pg = cls(directory, 0, secrets.token_urlsafe(24), bindir, owner and owner.pw_name)
        try:
            if owner is not None:
                os.chown(directory, owner.pw_uid, owner.pw_gid)
            pg._initdb(durable, settings)
            for attempt in range(attempts):
                pg.port = _free_port()
                try:
                    pg._run("pg_ctl", "-D", str(pg.data), "-l", str(pg.log), "-w", "-t", "60",
                            "-o", f"-p {pg.port}", "start")  # fmt: skip
                    break
                except PostgresStartError:
                    if attempt + 1 == attempts or "could not bind" not in pg.log_tail():
                        raise
        except BaseException:
            pg.stop()
            raise
        return pg

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        """A connection URL for `database` as the cluster's superuser."""
        return (
            f"postgresql://{ROLE}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/"
            f"{quote(database, safe='')}"
        )

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if p.returncode != 0:
            raise PostgresStartError(
                f"{tool} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}\n"
                f"server log: {self.log_tail()}"
            )

    def _initdb(self, durable: bool, extra: Sequence[str] = ()) -> None:
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            self._run(
                "initdb", "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                *(() if durable else ("--no-sync",)),
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        settings = [
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",  # TCP on loopback only
            "max_connections = 200",
        ]
        if not durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        settings += extra
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# dispatch (store/local_postgres.py)\n" + "\n".join(settings) + "\n")

    def stop(self) -> None:
        """Stops the server (pg_ctl stop -m fast -w: returns once it has exited) and deletes
        the directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            pid = self.server_pid()
            if pid is not None:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
                # pg_ctl returns when the pid file is gone, just before the process ends
                deadline = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def server_pid(self) -> int | None:
        """The running server's process id (from its pid file); None when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
