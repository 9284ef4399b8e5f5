"""Shared fixtures: real coordinators on port 0, in-process and subprocess workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pg import create_database, drop_database, pg_url, postgres  # noqa: F401  (fixtures)

from dispatch.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from dispatchnet.client import CoordinatorClient
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile, load_profile
from dispatchnet.server import Coordinator, start_coordinator
from dispatchnet.store import registry as stores
from dispatchnet.store.base import Store
from dispatchnet.store.local_postgres import LocalPostgres
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.worker.executors import Executor
from dispatchnet.worker.runtime import Worker

FAST = {
    "jobs": {
        "offer_lease_seconds": 2,
        "time_limit_seconds": 30,
        "sweep_interval_seconds": 0.1,
        "queue_timeout_seconds": 60,
    },
    "workers": {"heartbeat_interval_seconds": 1, "eviction_seconds": 5},
}


def make_profile(**overrides: dict[str, Any]) -> Profile:
    sections = {k: dict(v) for k, v in FAST.items()}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return load_profile("local").with_overrides(**sections)


async def wait_until(
    cond: Callable[[], Awaitable[bool] | bool], within: float = 15.0, what: str = "condition"
) -> None:
    """Polls cond until true; fails the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        r = cond()
        if isinstance(r, Awaitable):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def send_oversized_headers(url: str, header_bytes: int) -> bytes:
    """Sends an HTTP server at url (http://host:port/path) a request whose one header
    holds header_bytes bytes; returns the status code it answers (b"reset" when it cut
    the connection while the header was still coming: also refused, not read whole)."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, port = hostport.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nX-A: ".encode())
        writer.write(b"a" * header_bytes + b"\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 10)
        return status.split()[1] if status else b"reset"
    except ConnectionResetError:
        return b"reset"
    finally:
        writer.close()


class Cluster:
    """A coordinator plus helpers to add workers and clients; cleans up everything."""

    def __init__(self, coord: Coordinator, tmp: Path) -> None:
        self.coord = coord
        self.tmp = tmp
        self.address = f"127.0.0.1:{coord.port}"
        self.workers: list[tuple[Worker, asyncio.Task[None]]] = []
        self.clients: list[CoordinatorClient] = []
        self._db: SqliteStore | None = None

    @property
    def db(self) -> SqliteStore:
        """The coordinator's database through a connection of the test's own, for
        assertions (synchronous reads of what the coordinator committed)."""
        if self._db is None:
            self._db = SqliteStore(self.coord.store.path)
        return self._db

    async def worker(
        self,
        kind: str = "seeker",
        max_concurrency: int = 4,
        key: KeyPair | None = None,
        executors: list[Executor] | None = None,
    ) -> Worker:
        w = Worker(
            self.address,
            key or KeyPair.generate(),
            kind=kind,  # type: ignore[arg-type]
            max_concurrency=max_concurrency,
            executors=executors,
            backoff_initial=0.05,
            backoff_max=0.5,
        )
        task = asyncio.create_task(w.run())
        self.workers.append((w, task))
        await asyncio.wait_for(w.connected.wait(), 10)
        return w

    def client(self, key: KeyPair | None = None, wallet: Any = None) -> CoordinatorClient:
        c = CoordinatorClient(self.address, key or KeyPair.generate(), wallet)
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for w, _ in self.workers:
            w.stop()
        for _, t in self.workers:
            try:
                await asyncio.wait_for(t, 5)
            except (asyncio.CancelledError, TimeoutError):
                pass
        for c in self.clients:
            await c.close()
        await self.coord.stop(grace=0.2)
        if self._db is not None:
            self._db.close()


@pytest.fixture
def profile() -> Profile:
    return make_profile()


@pytest.fixture
async def cluster(tmp_path: Path, profile: Profile) -> AsyncIterator[Cluster]:
    coord = await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0")
    c = Cluster(coord, tmp_path)
    try:
        yield c
    finally:
        await c.close()


# --- stores: one contract, every engine ------------------------------------------------------

ENGINES = ["sqlite", "postgresql"]


class StoreFactory:
    """Opens stores of one engine, through the store registry (as a coordinator does), on
    the test's one database: a store opened after another sees what it committed, as after
    a restart. Closes them all after the test."""

    def __init__(self, engine: str, url: str, data_dir: Path) -> None:
        self.engine = engine
        self.url = url  # the [store] url ("" for SQLite in data_dir)
        self.data_dir = data_dir
        self.profile = make_profile(store={"url": url})
        self.opened: list[Store] = []

    async def open(self) -> Store:
        store = await stores.open_store(self.profile, self.data_dir)
        self.opened.append(store)
        return store

    async def execute(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Runs sql (`?` placeholders) on the database through a connection of the
        test's own, committed; its rows. For what the port does not expose (row counts,
        fixtures written directly)."""
        if self.engine == "sqlite":
            import sqlite3

            conn = sqlite3.connect(stores.sqlite_path(self.url, self.data_dir))
            try:
                rows = conn.execute(sql, params).fetchall()
                conn.commit()
                return [tuple(r) for r in rows]
            finally:
                conn.close()
        import asyncpg

        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))
        pg = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await pg.fetch(numbered, *params)]
        finally:
            await pg.close()

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=ENGINES)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """A StoreFactory per engine: each test using it runs once on SQLite and once on a
    throwaway PostgreSQL database (the session's cluster, see pg.py)."""
    cluster: LocalPostgres | None = None
    url = ""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgres")
        url = await create_database(cluster)
    factory = StoreFactory(request.param, url, tmp_path / "store")
    try:
        yield factory
    finally:
        await factory.close()
        if cluster is not None:
            await drop_database(cluster, url)


@pytest.fixture
async def ledgers(store_factory: StoreFactory) -> AsyncIterator[Callable[..., Any]]:
    """Makes test_earnings.Ledger objects (a store of the engine under test, job and payment
    services over a fake chain); their stores close after the test."""
    from test_earnings import Ledger

    async def make(fee_bps: int = 1000) -> Ledger:
        return Ledger(await store_factory.open(), fee_bps)

    yield make


HELLO = b"dispatch.v1.WorkerHello\n"


class RawWorker:
    """Speaks WorkerService.Connect message by message."""

    def __init__(self, channel: grpc.aio.Channel, key: KeyPair | None = None) -> None:
        self.key = key or KeyPair.generate()
        self.out: asyncio.Queue[worker_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = worker_pb2_grpc.WorkerServiceStub(channel).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[worker_pb2.ConnectRequest]:
        while (m := await self.out.get()) is not None:
            yield m

    def send(self, **kw: object) -> None:
        self.out.put_nowait(worker_pb2.ConnectRequest(**kw))  # type: ignore[arg-type]

    async def recv(self) -> worker_pb2.ConnectResponse:
        msg = await asyncio.wait_for(self.call.read(), 10)
        assert msg is not grpc.aio.EOF, "stream ended"
        return msg  # type: ignore[no-any-return]

    def hello(
        self,
        kind: int = common_pb2.WORKER_KIND_SEEKER,
        tasks: tuple[str, ...] = ("echo",),
        models: tuple[str, ...] = (),
        public_key: bytes | None = None,
        batched_acks: bool = False,
        running: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.send(
            hello=worker_pb2.Hello(
                public_key=public_key or self.key.public_key,
                kind=kind,  # type: ignore[arg-type]
                capabilities=worker_pb2.Capabilities(
                    tasks=tasks, llm_models=models, max_concurrency=1
                ),
                batched_acks=batched_acks,
                running=[worker_pb2.RunningJob(job_id=j, attempt=a) for j, a in running],
            )
        )

    async def handshake(self, **kw: object) -> worker_pb2.Welcome:
        self.hello(**kw)  # type: ignore[arg-type]
        ch = (await self.recv()).challenge
        self.send(
            challenge_response=worker_pb2.ChallengeResponse(
                signature=self.key.sign(HELLO, ch.nonce + ch.coordinator_public_key)
            )
        )
        return (await self.recv()).welcome

    async def status(self) -> grpc.StatusCode:
        return await asyncio.wait_for(self.call.code(), 10)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.out.put_nowait(None)
        self.call.cancel()


@pytest.fixture
async def channel(cluster: Cluster) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(cluster.address)
    yield ch
    await ch.close()


def rpc_code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code()


# --- processes ---------------------------------------------------------------------------


class Proc:
    """A `dispatch` subprocess whose first stdout line is JSON."""

    def __init__(self, args: list[str], home: Path, log: Path) -> None:
        self.log = log
        env = {**os.environ, "DISPATCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(
            [sys.executable, "-m", "dispatchnet.cli", *args],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            env=env,
            text=True,
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"process exited early: {log.read_text()[-2000:]}")
        self.info: dict[str, Any] = json.loads(line)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[[list[str]], Proc]]:
    started: list[Proc] = []

    def start(args: list[str]) -> Proc:
        p = Proc(args, tmp_path / "home", tmp_path / f"proc{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
