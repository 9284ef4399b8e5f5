"""What GetQuote stores is bounded: anonymous callers get small specs and a shared, capped
pool; authenticated clients a byte budget each; everyone together a total. Expired quotes
give their storage back, and WebAssembly modules nobody references are deleted."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import grpc
import pytest
from conftest import Cluster, make_profile, rpc_code

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.auth.tokens import METADATA_KEY
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.jobs import QUOTE_ROW_BYTES
from dispatchnet.profiles import Profile
from dispatchnet.store.base import QuoteUsage


@pytest.fixture
def profile() -> Profile:
    return make_profile(
        jobs={"queue_timeout_seconds": 86400},  # jobs wait while quotes expire
        quotes={
            "anonymous_max_spec_bytes": 1024,
            "anonymous_max_quotes": 5,
            "client_max_bytes": 8 * 1024,
            "max_bytes": 20 * 1024,
        },
    )


async def _anonymous(c: CoordinatorClient, spec: common_pb2.JobSpec, **kw: Any) -> str:
    resp = await c.jobs.GetQuote(coordinator_pb2.GetQuoteRequest(spec=spec), **kw)
    return str(resp.quote.quote_id)


async def _refused(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return rpc_code(e.value), e.value.details() or ""


async def _release_all(cluster: Cluster) -> None:
    """Runs the purge pass as if every quote made so far had expired."""
    jobs = cluster.coord.jobs
    later = time.time() + 3600
    jobs.clock = lambda: later
    jobs._next_purge = 0.0
    await jobs.sweep()
    jobs.clock = time.time


async def test_a_burst_of_anonymous_quotes_stops_at_the_cap(cluster: Cluster) -> None:
    c = cluster.client()
    first = await _anonymous(c, task_spec("echo", b"first"))
    for i in range(4):
        await _anonymous(c, task_spec("echo", str(i).encode()))
    for _ in range(20):
        code, msg = await _refused(_anonymous(c, task_spec("echo", b"more")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "anonymous callers hold 5 unexpired quotes" in msg
        assert "authorization" in msg
    store = cluster.db
    anonymous, total = store.quote_usage("")
    assert anonymous.quotes == 5 and total.quotes == 5
    # an authenticated caller is not in the anonymous pool
    assert (await c.quote(task_spec("echo", b"mine"))).quote_id
    # expired quotes give their place back; their rows stay, without the spec
    await _release_all(cluster)
    assert store.quote_usage("") == (QuoteUsage(0, 0), QuoteUsage(0, 0))
    assert store.get_quote(first) is not None
    assert store.get_quote(first).spec.spec_bytes == b""  # type: ignore[union-attr]
    assert await _anonymous(c, task_spec("echo", b"again"))


async def test_a_large_anonymous_quote_needs_authorization(cluster: Cluster) -> None:
    c = cluster.client()
    big = task_spec("echo", b"x" * 2000)
    code, msg = await _refused(_anonymous(c, big))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "GetQuote without authorization takes 1024 at most" in msg
    assert "authorization: Dispatch <token>" in msg and "dispatch auth header" in msg
    assert cluster.db.quote_usage("")[1].quotes == 0  # nothing was stored
    # with the metadata the same spec is quoted, and stored under the client
    q = await c.quote(big)
    mine, _ = cluster.db.quote_usage(c.key.public_hex)
    assert mine.quotes == 1 and mine.bytes >= 2000 + QUOTE_ROW_BYTES
    assert (await c.commit(q.quote_id)).state == coordinator_pb2.JOB_STATE_QUEUED
    # metadata that is sent is verified, even on this public method
    bad = ((METADATA_KEY, "Dispatch v1.nope"),)
    code, _ = await _refused(_anonymous(c, task_spec("echo", b"1"), metadata=bad))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_each_client_and_everyone_together_have_a_byte_budget(cluster: Cluster) -> None:
    spec = task_spec("echo", b"x" * 3000)  # a little over 3 KiB stored
    a, b = cluster.client(), cluster.client()
    await a.quote(spec)
    await a.quote(spec)
    code, msg = await _refused(a.quote(spec))  # a third would pass 8 KiB
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit per client is 8192" in msg
    for c in (b, cluster.client()):
        await c.quote(spec)
        await c.quote(spec)
    # 6 quotes of ~3.3 KiB held: the 20 KiB total is reached for every caller
    code, msg = await _refused(cluster.client().quote(spec))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quote storage is full (20480 bytes)" in msg
    await _release_all(cluster)
    assert cluster.db.quote_usage(a.key.public_hex)[1].bytes == 0
    await a.quote(spec)


async def test_modules_nobody_references_are_deleted(cluster: Cluster) -> None:
    c = cluster.client()
    store = cluster.db
    kept, dropped = b"\0asm" + b"k" * 100, b"\0asm" + b"d" * 100
    specs = []
    for module in (kept, dropped):
        spec = task_spec("wasm", b"in")
        spec.task.wasm.module = module
        specs.append(spec)
    job = await c.commit((await c.quote(specs[0])).quote_id)  # stays queued: no worker
    await c.quote(specs[1])
    assert store.get_module(hashlib.sha256(dropped).digest()) == dropped
    await _release_all(cluster)
    assert store.get_module(hashlib.sha256(dropped).digest()) is None
    # an open job keeps its module (clients may still quote it by hash)
    assert store.get_module(hashlib.sha256(kept).digest()) == kept
    await c.cancel(job.job_id)
    await _release_all(cluster)
    assert store.get_module(hashlib.sha256(kept).digest()) is None
    rows = store.db.execute("SELECT count(*) FROM wasm_modules").fetchone()[0]
    assert rows == 0
