"""Receipts are batched into Merkle trees; owners get inclusion proofs; roots get anchored.

Integration tests run real coordinators on port 0 with in-process workers; the batcher's
timing and anchoring retries are unit-tested against a store of each engine (SQLite and
PostgreSQL, the `store_factory` fixture) with a fake clock and a fake Anchorer (the EVM
anchorer runs against a real anvil in test_chain.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import sqlite_utils
from conftest import Cluster, StoreFactory, make_profile, rpc_code, wait_until
from google.protobuf import json_format

from dispatch.v1 import coordinator_pb2, receipt_pb2
from dispatchnet import keys
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import (
    AnchorStatus,
    Event,
    EventKind,
    Job,
    JobSpec,
    JobState,
    JobType,
    Policy,
    Privacy,
    Receipt,
    ReceiptBatch,
    UnbatchedReceipt,
)
from dispatchnet.coordinator.receipts import ReceiptQueries
from dispatchnet.errors import FailedPrecondition, Unavailable
from dispatchnet.profiles import JobsConfig, PricingConfig, Profile, ReceiptsConfig
from dispatchnet.receipts.anchoring import AnchorResult, NoAnchor
from dispatchnet.receipts.batcher import ReceiptBatcher
from dispatchnet.receipts.core import sha256, verify_merkle_proof
from dispatchnet.receipts.merkle import merkle_root
from dispatchnet.server import start_coordinator
from dispatchnet.store.base import Store
from dispatchnet.store.sqlite import MIGRATIONS, SqliteStore

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
PROCESS_TIMEOUT = 30.0


@pytest.fixture
def profile() -> Profile:
    return make_profile(receipts={"batch_size": 4, "batch_max_age_seconds": 2})


@contextlib.asynccontextmanager
async def cluster_with(data: Path, **receipts: Any) -> AsyncIterator[Cluster]:
    """A cluster whose profile has these [receipts] settings, its data in `data`."""
    coord = await start_coordinator(make_profile(receipts=receipts), data, "127.0.0.1:0")
    c = Cluster(coord, data)
    try:
        yield c
    finally:
        await c.close()


async def complete(c: CoordinatorClient, n: int) -> list[coordinator_pb2.Job]:
    jobs = [await c.submit(task_spec("echo", f"[{i}]".encode())) for i in range(n)]
    done = [await c.wait(j.job_id) for j in jobs]
    assert all(d.state == COMPLETED for d in done)
    return done


async def proof_of(
    c: CoordinatorClient, job_id: str, within: float = 15.0
) -> receipt_pb2.GetReceiptProofResponse:
    """Polls GetReceiptProof while the receipt waits for its batch."""
    got: list[receipt_pb2.GetReceiptProofResponse] = []

    async def ready() -> bool:
        try:
            got.append(await c.receipt_proof(job_id))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            assert "not batched yet" in (e.details() or "")
            return False
        return True

    await wait_until(ready, within, f"the proof of {job_id}")
    return got[-1]


def holds(p: receipt_pb2.GetReceiptProofResponse) -> bool:
    return verify_merkle_proof(
        p.receipt_sha256, p.leaf_index, p.leaf_count, list(p.proof), p.merkle_root
    )


# --- over gRPC ---------------------------------------------------------------------------


async def test_every_receipt_gets_a_proof_of_its_batch(cluster: Cluster) -> None:
    c = cluster.client()
    # queue all ten first so that they complete in one burst: full batches of 4 close
    jobs = [await c.submit(task_spec("echo", f"[{i}]".encode())) for i in range(10)]
    await cluster.worker(max_concurrency=4)
    done = [await c.wait(j.job_id) for j in jobs]
    assert all(d.state == COMPLETED for d in done)

    proofs = [await proof_of(c, d.job_id) for d in done]
    by_batch: dict[str, list[int]] = {}
    store = cluster.db
    for d, p in zip(done, proofs, strict=True):
        assert p.receipt_sha256 == d.receipt.receipt_sha256 == sha256(d.receipt.body)
        assert holds(p), d.job_id
        batch = store.get_receipt_batch(p.batch_id)
        assert batch is not None and batch.merkle_root == p.merkle_root
        assert batch.leaf_count == p.leaf_count <= 4
        assert batch.anchor_status is AnchorStatus.NONE
        assert p.anchor_transaction == "" and p.anchor_network == ""
        by_batch.setdefault(p.batch_id, []).append(p.leaf_index)
    for batch_id, indexes in by_batch.items():
        count = proofs[[p.batch_id for p in proofs].index(batch_id)].leaf_count
        assert sorted(indexes) == list(range(count)), batch_id  # distinct, none missing
    assert sum(len(ix) for ix in by_batch.values()) == 10
    assert max(len(ix) for ix in by_batch.values()) == 4  # closed by size, not age
    # one leaf's proof does not pass for another leaf
    a = proofs[0]
    b = next(p for p in proofs if p.batch_id == a.batch_id and p != a)
    assert not verify_merkle_proof(
        b.receipt_sha256, a.leaf_index, a.leaf_count, list(a.proof), a.merkle_root
    )


async def test_only_the_owner_gets_a_proof(cluster: Cluster) -> None:
    await cluster.worker()
    owner, other = cluster.client(), cluster.client()
    [done] = await complete(owner, 1)
    await proof_of(owner, done.job_id)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await other.receipt_proof(done.job_id)
    assert rpc_code(e.value) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await owner.receipt_proof("job_unknown")
    assert rpc_code(e.value) == grpc.StatusCode.NOT_FOUND


async def test_an_unfinished_job_has_no_proof(cluster: Cluster) -> None:
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))  # no worker: it stays queued
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.receipt_proof(job.job_id)
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "QUEUED" in (e.value.details() or "")


async def test_a_receipt_waiting_for_its_batch_is_failed_precondition(tmp_path: Path) -> None:
    async with cluster_with(tmp_path, batch_size=64, batch_max_age_seconds=3600) as cluster:
        await cluster.worker()
        c = cluster.client()
        [done] = await complete(c, 1)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.receipt_proof(done.job_id)
        assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "not batched yet; retry in a few seconds" in (e.value.details() or "")


async def test_a_single_receipt_is_batched_when_it_is_old_enough(tmp_path: Path) -> None:
    async with cluster_with(tmp_path, batch_size=64, batch_max_age_seconds=0.3) as cluster:
        await cluster.worker()
        c = cluster.client()
        [done] = await complete(c, 1)
        p = await proof_of(c, done.job_id, within=5)
        assert (p.leaf_index, p.leaf_count, list(p.proof)) == (0, 1, [])
        assert p.merkle_root == merkle_root([done.receipt.receipt_sha256])
        assert holds(p)


async def test_batches_and_proofs_survive_a_restart(tmp_path: Path) -> None:
    key = keys.KeyPair.generate()
    data = tmp_path / "coord"
    async with cluster_with(data, batch_size=2, batch_max_age_seconds=0.3) as cluster:
        await cluster.worker()
        done = await complete(cluster.client(key), 3)
        before = [await proof_of(cluster.clients[0], d.job_id) for d in done]
        batches = cluster.db.receipt_batches()
    assert len(batches) == 2
    async with cluster_with(data, batch_size=2, batch_max_age_seconds=0.3) as again:
        c = again.client(key)
        after = [await c.receipt_proof(d.job_id) for d in done]
        assert after == before
        assert all(holds(p) for p in after)
        await asyncio.sleep(0.5)  # a batcher pass or two: nothing is batched twice
        assert again.db.receipt_batches() == batches


async def test_cli_receipt_proof_and_verify_with_proof(cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    key_file = home / "client.key"
    c = cluster.client(keys.load_or_create(key_file))
    await cluster.worker()
    [done] = await complete(c, 1)
    await proof_of(c, done.job_id)
    env = {k: v for k, v in os.environ.items() if k != "DISPATCH_COORDINATOR"}
    env.update(DISPATCH_HOME=str(home), PYTHONUNBUFFERED="1")
    coord = ["--coordinator", cluster.address]

    code, out, err = await dispatch(env, "receipt", "proof", done.job_id, *coord)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["leaf_index"] == 0 and shown["anchor_transaction"] == ""  # zeros are shown
    proof = json_format.ParseDict(shown, receipt_pb2.GetReceiptProofResponse())
    assert proof == await c.receipt_proof(done.job_id)
    # the default key under DISPATCH_HOME is the client's; --key-file works too
    code, out2, err = await dispatch(
        env, "receipt", "proof", done.job_id, *coord, "--key-file", str(key_file)
    )
    assert code == 0 and json.loads(out2) == shown, err
    # another client: PERMISSION_DENIED, exit 1
    stranger = tmp_path / "stranger.key"
    keys.load_or_create(stranger)  # a client that exists (a missing key file: exit 2)
    code, _, err = await dispatch(
        env, "receipt", "proof", done.job_id, *coord, "--key-file", str(stranger)
    )
    assert code == 1 and "PERMISSION_DENIED" in err and "Traceback" not in err

    receipt_file, proof_file = tmp_path / "job.json", tmp_path / "proof.json"
    receipt_file.write_text(json.dumps({"job": json_format.MessageToDict(done)}))
    proof_file.write_text(out)
    code, out, err = await dispatch(
        env, "receipt", "verify", str(receipt_file), "--proof", str(proof_file)
    )
    assert code == 0, out + err
    result = json.loads(out)
    assert result["valid"] and result["proof"]["valid"]
    assert result["proof"]["merkle_root"] == proof.merkle_root.hex()

    forged = dict(shown, leaf_count=shown["leaf_count"] + 1)
    proof_file.write_text(json.dumps(forged))
    code, out, _ = await dispatch(
        env, "receipt", "verify", str(receipt_file), "--proof", str(proof_file)
    )
    assert code == 1
    assert "the proof does not recompute merkle_root" in json.loads(out)["problems"]


async def dispatch(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Runs `dispatch ARGS...` without blocking the event loop (the coordinator is in it)."""
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatchnet.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(p.communicate(), PROCESS_TIMEOUT)
    except TimeoutError:
        p.kill()
        await p.communicate()
        raise AssertionError(f"dispatch {args} timed out") from None
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


# --- the batcher and the store, directly -------------------------------------------------

SPEC = JobSpec(JobType.TASK, Policy.CHEAP, Privacy.PUBLIC, "echo", "", b"s", sha256(b"s"))


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    """A store of each engine (the batcher's tests run on SQLite and PostgreSQL)."""
    return await store_factory.open()


async def nonempty(rows: Awaitable[list[Any]]) -> bool:
    return bool(await rows)


async def add_completed(store: Store, job_id: str, completed_at: float) -> bytes:
    """A completed job with a receipt; returns the receipt's hash."""
    job = Job(job_id, "client-a", JobState.QUEUED, SPEC, 1000, "USD", "q", job_id, 0, 3, 1, 1, 1)
    await store.create_job(job, Event(job_id, EventKind.STATE, JobState.QUEUED, 1.0))
    body = f"receipt of {job_id}".encode()
    moved = await store.transition(
        job_id,
        (JobState.QUEUED,),
        None,
        {
            "state": JobState.COMPLETED,
            "updated_at": completed_at,
            "receipt": Receipt(body, b"w", b"c", sha256(body)),
        },
        None,
    )
    assert moved is not None
    return sha256(body)


async def test_batches_close_when_full_or_when_the_oldest_is_old_enough(
    store: Store,
) -> None:
    clock = Clock()
    batcher = ReceiptBatcher(
        store, ReceiptsConfig(batch_size=4, batch_max_age_seconds=10), NoAnchor(), clock
    )
    hashes = [await add_completed(store, f"job_{i}", 1000.0 + i) for i in range(5)]
    [full] = await batcher.close_due()
    assert full.leaf_count == 4 and full.merkle_root == merkle_root(hashes[:4])
    assert full.anchor_status is AnchorStatus.NONE
    assert [leaf.job_id for leaf in await store.batch_leaves(full.batch_id)] == [
        f"job_{i}" for i in range(4)
    ]
    assert await batcher.close_due() == []  # job_4 waited 0 s of 10
    clock.now = 1014.0  # job_4 completed at 1004: it has waited 10 s
    [aged] = await batcher.close_due()
    assert aged.leaf_count == 1 and aged.merkle_root == merkle_root([hashes[4]])
    assert await store.unbatched_receipts(10) == []
    assert await store.receipt_leaf("job_4") is not None
    assert await batcher.close_due() == []


async def test_a_receipt_is_never_in_two_batches(store: Store) -> None:
    h0, h1 = await add_completed(store, "job_0", 1.0), await add_completed(store, "job_1", 2.0)
    waiting = await store.unbatched_receipts(10)
    assert waiting == [UnbatchedReceipt("job_0", h0, 1.0), UnbatchedReceipt("job_1", h1, 2.0)]

    def batch(batch_id: str, n: int) -> ReceiptBatch:
        root = merkle_root([w.receipt_sha256 for w in waiting[:n]])
        return ReceiptBatch(batch_id, root, n, 5.0, AnchorStatus.NONE)

    assert await store.create_receipt_batch(batch("b1", 1), waiting[:1])
    # a second batcher that read both before b1 committed loses, and writes nothing
    assert not await store.create_receipt_batch(batch("b2", 2), waiting)
    assert await store.get_receipt_batch("b2") is None
    assert await store.receipt_leaf("job_1") is None
    assert [w.job_id for w in await store.unbatched_receipts(10)] == ["job_1"]
    # a stale hash is refused too
    stale = UnbatchedReceipt("job_1", b"\0" * 32, 2.0)
    assert not await store.create_receipt_batch(batch("b3", 1), [stale])


async def test_receipts_completed_before_the_upgrade_get_batched(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    db = sqlite_utils.Database(raw)
    for step in MIGRATIONS[:2]:
        step(db)
    raw.execute("PRAGMA user_version=2")
    raw.execute(
        "INSERT INTO jobs (job_id, client_id, state, idempotency_key, updated_at, receipt_sha256)"
        " VALUES ('job_old', 'c', ?, 'k', 7.0, ?)",
        (int(JobState.COMPLETED), b"\1" * 32),
    )
    raw.commit()
    raw.close()
    store = SqliteStore(path)
    try:
        assert store.unbatched_receipts(10) == [UnbatchedReceipt("job_old", b"\1" * 32, 7.0)]
    finally:
        store.close()


class FlakyAnchorer:
    """Fails `failures` times with chain trouble, then anchors; records what it saw."""

    enabled = True

    def __init__(self, store: Store, failures: int, error: Exception) -> None:
        self.store, self.failures, self.error = store, failures, error
        self.calls: list[tuple[bytes, int, str]] = []
        self.seen: list[tuple[AnchorStatus, str]] = []

    async def anchor(self, root: bytes, leaf_count: int, batch_id: str) -> AnchorResult:
        self.calls.append((root, leaf_count, batch_id))
        batch = await self.store.get_receipt_batch(batch_id)
        assert batch is not None
        self.seen.append((batch.anchor_status, batch.anchor_error))
        if len(self.calls) <= self.failures:
            raise self.error
        return AnchorResult("eip155:31337", f"0x{len(self.calls):064x}")


def fast_batcher(store: Store, anchorer: FlakyAnchorer) -> ReceiptBatcher:
    cfg = ReceiptsConfig(batch_size=2, batch_max_age_seconds=0.1, anchor="test")
    return ReceiptBatcher(
        store, cfg, anchorer, tick_seconds=0.02, retry_initial_seconds=0.02, retry_max_seconds=0.1
    )


async def test_a_failed_anchor_stays_pending_and_is_retried_until_anchored(
    store: Store,
) -> None:
    h = [await add_completed(store, f"job_{i}", 1.0 + i) for i in range(2)]
    anchorer = FlakyAnchorer(store, failures=2, error=Unavailable("rpc down"))
    batcher = fast_batcher(store, anchorer)
    batcher.start()
    try:
        await wait_until(
            lambda: nonempty(store.receipt_batches((AnchorStatus.ANCHORED,))), 10, "an anchor"
        )
    finally:
        await batcher.stop()
    [batch] = await store.receipt_batches()
    assert anchorer.calls == [(merkle_root(h), 2, batch.batch_id)] * 3
    assert anchorer.seen == [
        (AnchorStatus.PENDING, ""),
        (AnchorStatus.PENDING, "rpc down"),
        (AnchorStatus.PENDING, "rpc down"),
    ]
    assert batch.anchor_status is AnchorStatus.ANCHORED and batch.anchor_error == ""
    assert batch.anchor_network == "eip155:31337"
    assert batch.anchor_transaction == f"0x{3:064x}"
    assert batch.anchored_at is not None

    # the owner's proof now names the anchor
    jobs = JobService(store, JobsConfig(), PricingConfig(), cast(Any, None), cast(Any, None))
    queries = ReceiptQueries(jobs)
    p = await queries.proof("client-a", "job_1")
    assert (p.anchor_network, p.anchor_transaction) == ("eip155:31337", f"0x{3:064x}")
    assert verify_merkle_proof(p.receipt_sha256, p.leaf_index, p.leaf_count, p.proof, p.root)
    await add_completed(store, "job_2", 99.0)  # the batcher is stopped: it stays unbatched
    with pytest.raises(FailedPrecondition, match="not batched yet"):
        await queries.proof("client-a", "job_2")


async def test_an_unexpected_anchor_error_marks_the_batch_failed_and_is_retried(
    store: Store,
) -> None:
    await add_completed(store, "job_0", 1.0)
    anchorer = FlakyAnchorer(store, failures=1, error=RuntimeError("bug in the adapter"))
    batcher = fast_batcher(store, anchorer)
    batcher.start()
    try:
        await wait_until(
            lambda: nonempty(store.receipt_batches((AnchorStatus.ANCHORED,))), 10, "an anchor"
        )
    finally:
        await batcher.stop()
    assert anchorer.seen == [
        (AnchorStatus.PENDING, ""),
        (AnchorStatus.FAILED, "RuntimeError: bug in the adapter"),
    ]


async def test_a_completed_job_wakes_the_batcher(store: Store) -> None:
    cfg = ReceiptsConfig(batch_size=2, batch_max_age_seconds=3600)
    batcher = ReceiptBatcher(store, cfg, NoAnchor(), tick_seconds=60)
    batcher.start()
    try:
        await asyncio.sleep(0.05)  # the first pass found nothing; the next tick is a minute away
        for i in range(2):
            await add_completed(store, f"job_{i}", 1.0 + i)
        job = await store.get_job("job_1")
        assert job is not None
        batcher.job_completed(job)
        await wait_until(lambda: nonempty(store.receipt_batches()), 2, "the woken batcher")
    finally:
        await batcher.stop()


def test_batching_domain_code_imports_no_grpc_or_protobuf() -> None:
    code = (
        "import sys, dispatchnet.receipts.batcher, dispatchnet.coordinator.receipts\n"
        "print([m for m in sys.modules if m.startswith(('grpc', 'google.protobuf', 'dispatch.'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_receipts_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ReceiptBatcher(cast(Any, None), ReceiptsConfig(batch_size=0), NoAnchor())
    with pytest.raises(ValueError, match="batch_max_age_seconds"):
        ReceiptBatcher(cast(Any, None), ReceiptsConfig(batch_max_age_seconds=0), NoAnchor())


async def test_an_unknown_anchor_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"anchor must be \"none\" or the \[chain\] kind"):
        make_profile(receipts={"anchor": "carrier-pigeon"})
