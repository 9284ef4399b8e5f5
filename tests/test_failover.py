"""Failover between coordinators that share one PostgreSQL database: workers move to the
next address and resume their jobs there, signing receipts for the coordinator of their
new session; clients retry what is safe to repeat on the next address, WatchJob resumes
after its last event, and receipts of any coordinator of the cluster verify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, make_profile, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, worker_pb2
from dispatchnet import cli
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.protocol import coordinator_addresses
from dispatchnet.receipts.core import (
    RECEIPT_VERSION,
    serialize_body,
    sign_body,
    verify_receipt,
    verify_receipt_message,
)
from dispatchnet.server import start_coordinator
from dispatchnet.worker.runtime import Worker
from dispatchnet.worker.tasks import TaskOutput

RUNNING = coordinator_pb2.JOB_STATE_RUNNING
COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


def _dead_address() -> str:
    """An address where nothing listens (connections are refused: UNAVAILABLE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Gated:
    """An executor for `echo` whose jobs run until the gate opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def tasks(self) -> list[str]:
        return ["echo"]

    @property
    def llm_models(self) -> list[str]:
        return []

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return spec.WhichOneof("work") == "task" and spec.task.name == "echo"

    async def run(self, spec: common_pb2.JobSpec, progress: Any) -> TaskOutput:
        self.started.set()
        await self.gate.wait()
        return TaskOutput(spec.task.input, "application/json")


def test_coordinator_addresses_are_split_trimmed_and_deduplicated() -> None:
    assert coordinator_addresses(" a:1, b:2,,a:1 ") == ["a:1", "b:2"]
    assert coordinator_addresses(["a:1", "b:2"]) == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="at least one"):
        coordinator_addresses(" , ")


@dataclass
class Pair:
    """Two coordinators on one PostgreSQL, a worker (its jobs gated) that fails over from
    A to B, and a client that knows both."""

    a: Cluster
    b: Cluster
    gated: Gated
    worker: Worker
    client: CoordinatorClient


@contextlib.asynccontextmanager
async def failover_pair(tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    """A Pair whose worker is connected (to A); everything stopped afterwards."""
    profile = make_profile(store={"url": pg_url})
    a = Cluster(await start_coordinator(profile, tmp_path / "a", "127.0.0.1:0"), tmp_path)
    b = Cluster(await start_coordinator(profile, tmp_path / "b", "127.0.0.1:0"), tmp_path)
    gated = Gated()
    worker = Worker(
        [a.address, b.address], KeyPair.generate(), executors=[gated],
        backoff_initial=0.05, backoff_max=0.2,
    )  # fmt: skip
    run = asyncio.create_task(worker.run())
    c = CoordinatorClient(f"{a.address},{b.address}", KeyPair.generate())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        yield Pair(a, b, gated, worker, c)
    finally:
        worker.stop()
        await asyncio.wait_for(run, 5)
        await c.close()
        await b.close()
        await a.close()


async def test_a_worker_fails_over_resumes_its_job_and_signs_for_the_new_coordinator(
    tmp_path: Path, pg_url: str
) -> None:
    async with failover_pair(tmp_path, pg_url) as p:
        a, b, gated, worker, c = p.a, p.b, p.gated, p.worker, p.client
        assert worker.coordinator == a.address
        job = await c.submit(task_spec("echo", b'"x"'))
        await asyncio.wait_for(gated.started.wait(), 10)
        watched = asyncio.create_task(c.wait(job.job_id))  # a WatchJob stream at A
        await wait_until(lambda: c.address == a.address)
        sessions = worker.sessions
        await a.coord.stop(grace=0)  # A goes away: its worker and its watcher move to B

        async def at_b() -> bool:
            return worker.sessions > sessions and worker.coordinator == b.address

        await wait_until(at_b, what="the worker connected to B")
        running = await c.get(job.job_id)  # A is down: answered by B
        assert c.address == b.address and running.state == RUNNING
        gated.gate.set()
        done = await asyncio.wait_for(watched, 15)
        assert done.state == COMPLETED and done.attempts == 1
        body = receipt_pb2.ReceiptBody.FromString(done.receipt.body)
        assert body.coordinator_public_key == b.coord.public_key  # accepted at A, signed for B
        assert verify_receipt_message(done.receipt, b.coord.public_key).valid
        cluster_keys = {a.coord.public_key, b.coord.public_key}
        assert verify_receipt_message(done.receipt, cluster_keys).valid
        assert not verify_receipt_message(done.receipt, a.coord.public_key).valid
        reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
        assert reasons[-2:] == ["resumed", "completed"]


async def test_a_result_waiting_for_its_ack_is_signed_again_for_the_next_coordinator() -> None:
    """A completion built in a session with A and resent in a session with B names B."""
    key, a_key, b_key = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    worker = Worker("127.0.0.1:1", key)
    body = serialize_body(
        receipt_pb2.ReceiptBody(
            version=RECEIPT_VERSION, job_id="job_1", coordinator_public_key=a_key.public_key,
            worker_public_key=key.public_key, input_sha256=b"i" * 32, output_sha256=b"o" * 32,
            attempt=1,
        )
    )  # fmt: skip
    msg = worker_pb2.ConnectRequest(
        completed=worker_pb2.JobCompleted(
            job_id="job_1", attempt=1, receipt_body=body, receipt_signature=sign_body(key, body)
        )
    )
    worker.coordinator_public_key = a_key.public_key
    assert worker._for_session(msg) is msg  # same coordinator: untouched
    worker.coordinator_public_key = b_key.public_key
    again = worker._for_session(msg).completed
    resigned = receipt_pb2.ReceiptBody.FromString(again.receipt_body)
    assert resigned.coordinator_public_key == b_key.public_key
    assert resigned.job_id == "job_1" and resigned.output_sha256 == b"o" * 32
    coordinator_signature = sign_body(b_key, again.receipt_body)
    check = verify_receipt(again.receipt_body, again.receipt_signature, coordinator_signature)
    assert check.valid, check.problems


async def test_a_client_fails_over_and_a_retried_commit_is_the_same_job(
    tmp_path: Path, pg_url: str
) -> None:
    profile = make_profile(store={"url": pg_url})
    a = Cluster(await start_coordinator(profile, tmp_path / "a", "127.0.0.1:0"), tmp_path)
    b = Cluster(await start_coordinator(profile, tmp_path / "b", "127.0.0.1:0"), tmp_path)
    key = KeyPair.generate()
    dead = _dead_address()
    try:
        c = CoordinatorClient([dead, a.address], key)
        quote = await c.quote(task_spec("echo", b"1"))  # the dead one is skipped
        assert c.address == a.address
        job = await c.commit(quote.quote_id, "k1")
        # the same commit at another coordinator (as after A died unanswered): one job
        other = CoordinatorClient([dead, b.address], key)
        again = await other.commit(quote.quote_id, "k1")
        assert again.job_id == job.job_id
        assert len(await c.list_workers()) == 0
        keys = await other.coordinator_keys()
        assert keys == {b.address: b.coord.public_key}  # the dead one is left out
        await c.close()
        await other.close()
        # one address: no retry, UNAVAILABLE at once
        lone = CoordinatorClient(dead, key)
        with pytest.raises(Exception, match="UNAVAILABLE"):
            await lone.get(job.job_id)
        await lone.close()
    finally:
        await b.close()
        await a.close()


async def test_receipt_verify_accepts_any_coordinator_of_the_cluster_it_is_given(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(store={"url": pg_url})
    a = Cluster(await start_coordinator(profile, tmp_path / "a", "127.0.0.1:0"), tmp_path)
    b = Cluster(await start_coordinator(profile, tmp_path / "b", "127.0.0.1:0"), tmp_path)
    try:
        await b.worker()
        c = a.client()
        job = await c.wait((await c.submit(task_spec("echo", b'"r"'))).job_id)
        assert job.state == COMPLETED
        path = tmp_path / "job.json"
        path.write_text(json.dumps(cli.job_json(job)))

        def verify(*flags: str) -> int:
            code = cli.main(["receipt", "verify", str(path), *flags])
            capsys.readouterr()
            return code

        both = f"{a.address},{b.address}"
        keys = f"{a.coord.public_key.hex()},{b.coord.public_key.hex()}"
        assert await asyncio.to_thread(verify, "--coordinator", both) == 0
        assert await asyncio.to_thread(verify, "--coordinator-key", keys) == 0
        assert await asyncio.to_thread(verify, "--coordinator", a.address) == 1
        assert await asyncio.to_thread(verify, "--coordinator-key", "zz") == 2
    finally:
        await b.close()
        await a.close()


async def test_cluster_up_starts_postgresql_and_coordinators_and_stops_them(
    procs: Any, tmp_path: Path
) -> None:
    data = tmp_path / "cluster"
    up = procs(["cluster", "up", "--coordinators", "2", "--data-dir", str(data)])
    info = up.info
    assert len(info["coordinators"]) == 2 and "@" in info["store"]
    assert ":" not in info["store"].split("//")[1].split("@")[0]  # no password in the url
    # under the data dir (as root: unless the server's user cannot reach it)
    assert Path(info["postgres_dir"]).parent in (data, Path("/tmp"))
    key = KeyPair.generate()
    first, second = info["coordinators"]
    async with CoordinatorClient(first, key) as a, CoordinatorClient(second, key) as b:
        job = await a.submit(task_spec("echo", b"1"))
        assert (await b.get(job.job_id)).job_id == job.job_id  # one database
        keys = await CoordinatorClient(info["coordinators"], key).coordinator_keys()
        assert sorted(k.hex() for k in keys.values()) == sorted(info["coordinator_keys"])
    up.p.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(up.p.wait, 60) == 0
    assert not Path(info["postgres_dir"]).exists()


async def test_run_job_waits_at_one_coordinator_for_a_worker_of_another(
    tmp_path: Path, pg_url: str
) -> None:
    """RunJob at A, the only worker at B (one PostgreSQL): A hears the job complete there
    and answers with it final; calling again with the key at B returns the same job."""
    profile = make_profile(store={"url": pg_url})
    a = Cluster(await start_coordinator(profile, tmp_path / "a", "127.0.0.1:0"), tmp_path)
    b = Cluster(await start_coordinator(profile, tmp_path / "b", "127.0.0.1:0"), tmp_path)
    key = KeyPair.generate()
    try:
        w = await b.worker()
        done = await a.client(key).run(task_spec("echo", b'"there"'), "k-a")
        assert done.state == COMPLETED and done.worker_id == w.key.public_hex
        assert verify_receipt_message(done.receipt, b.coord.public_key).valid
        again = await b.client(key).run(task_spec("echo", b'"there"'), "k-a")
        assert again.job_id == done.job_id and again.state == COMPLETED
    finally:
        await b.close()
        await a.close()


async def test_run_job_waiting_at_a_coordinator_that_stops_is_answered_by_the_next(
    tmp_path: Path, pg_url: str
) -> None:
    """A RunJob call waiting at A when A stops is made again at B with the same key: B finds
    the job (the worker resumed it there) and answers with it final, charged and run once."""
    async with failover_pair(tmp_path, pg_url) as p:
        a, b, gated, worker, c = p.a, p.b, p.gated, p.worker, p.client
        waiting = asyncio.create_task(c.run(task_spec("echo", b'"x"'), "once"))
        await asyncio.wait_for(gated.started.wait(), 10)
        await a.coord.stop(grace=0)
        await wait_until(lambda: worker.coordinator == b.address, what="the worker at B")
        gated.gate.set()
        done = await asyncio.wait_for(waiting, 15)
        assert done.state == COMPLETED and done.attempts == 1
        assert c.address == b.address
