"""RunJob: GetQuote, CommitJob and WatchJob in one call (unpaid here; the paid form is in
test_payments.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from conftest import Cluster, rpc_code

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.protocol import MAX_IDEMPOTENCY_KEY_CHARS
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.store.threaded import ThreadedStore

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


async def run_job(
    cluster: Cluster, request: coordinator_pb2.RunJobRequest, client: object = None
) -> coordinator_pb2.RunJobResponse:
    c = client or cluster.client()
    return await c.jobs.RunJob(request, metadata=c.metadata())  # type: ignore[attr-defined]


async def test_a_spec_runs_in_one_call_and_its_key_finds_it_again(cluster: Cluster) -> None:
    w = await cluster.worker()
    c = cluster.client()
    spec = task_spec("echo", b'{"a": 1}')
    request = coordinator_pb2.RunJobRequest(spec=spec, idempotency_key="k1")
    first = await run_job(cluster, request, c)
    assert first.created and first.job.state == COMPLETED, first.job.failure
    job = first.job
    assert json.loads(job.result.output) == {"a": 1}
    assert job.worker_id == w.key.public_hex and not job.quote_id
    check = verify_receipt_message(job.receipt, cluster.coord.public_key)
    assert check.valid, check.problems
    # priced as GetQuote prices it; no quote row is stored for it
    quote = await c.quote(spec)
    assert check.body is not None and check.body.input_sha256 == quote.spec_sha256
    assert job.price == quote.price
    assert cluster.db._conn.execute("SELECT COUNT(*) FROM quotes").fetchone()[0] == 1

    again = await run_job(cluster, request, c)  # the same key: the same job, final already
    assert not again.created and again.job.job_id == job.job_id
    assert again.job.result.output == job.result.output
    assert (await c.get(job.job_id)).state == COMPLETED  # an ordinary job for the other RPCs

    other = coordinator_pb2.RunJobRequest(spec=task_spec("echo", b"2"), idempotency_key="k1")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run_job(cluster, other, c)
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "already used for another job" in str(e.value.details())
    # a key is one client's: another client's same key is another job
    theirs = await run_job(cluster, request)
    assert theirs.created and theirs.job.job_id != job.job_id

    # the client's helper: one call, and the job
    done = await c.run(task_spec("sha256", b"abc"))
    assert done.state == COMPLETED
    assert done.result.output.decode().strip('"') == hashlib.sha256(b"abc").hexdigest()


async def test_a_quote_runs_as_commit_and_wait(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    quote = await c.quote(task_spec("echo", b"3"))
    request = coordinator_pb2.RunJobRequest(quote_id=quote.quote_id, idempotency_key="q")
    resp = await run_job(cluster, request, c)
    assert resp.created and resp.job.state == COMPLETED and resp.job.quote_id == quote.quote_id
    # the key and the quote: the same job, as CommitJob returns it
    committed = await c.commit(quote.quote_id, "q")
    assert committed.job_id == resp.job.job_id


async def test_a_wasm_module_sent_with_run_job_is_stored_for_its_job(cluster: Cluster) -> None:
    from test_wasm import REVERSE, wasm_spec

    await cluster.worker()
    c = cluster.client()
    done = await c.run(wasm_spec(REVERSE, b"hello"), "w1")
    assert done.state == COMPLETED and done.result.output == b"olleh"
    again = await c.run(wasm_spec(REVERSE, b"hello"), "w1")  # a retry: the same job
    assert again.job_id == done.job_id
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.run(wasm_spec(REVERSE, b"other"), "w1")
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    by_hash = task_spec("wasm", b"abc")  # the module is known by its hash since
    by_hash.task.wasm.sha256 = hashlib.sha256(REVERSE).digest()
    assert (await c.run(by_hash)).result.output == b"cba"


async def test_bad_run_job_calls_get_clear_statuses(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    cases = [
        (coordinator_pb2.RunJobRequest(idempotency_key="x"), grpc.StatusCode.INVALID_ARGUMENT,
         "spec or quote_id is required"),
        (coordinator_pb2.RunJobRequest(spec=task_spec("echo", b"1")),
         grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
        (coordinator_pb2.RunJobRequest(
            spec=task_spec("echo", b"1"), idempotency_key="k" * (MAX_IDEMPOTENCY_KEY_CHARS + 1)),
         grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
        (coordinator_pb2.RunJobRequest(spec=task_spec("no_such_task", b"1"), idempotency_key="u"),
         grpc.StatusCode.FAILED_PRECONDITION, "no_such_task"),
        (coordinator_pb2.RunJobRequest(quote_id="q-none", idempotency_key="n"),
         grpc.StatusCode.NOT_FOUND, "does not exist"),
        (coordinator_pb2.RunJobRequest(
            spec=task_spec("echo", b"1", private=True), idempotency_key="p"),
         grpc.StatusCode.FAILED_PRECONDITION, "paired worker"),
    ]  # fmt: skip
    for request, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await run_job(cluster, request, c)
        assert rpc_code(e.value) == code, (request, e.value)
        assert words in str(e.value.details()), e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:  # no token: whose job would it be?
        await c.jobs.RunJob(coordinator_pb2.RunJobRequest(spec=task_spec("echo", b"1")))
    assert rpc_code(e.value) == grpc.StatusCode.UNAUTHENTICATED
    assert cluster.db._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


async def test_a_caller_that_stops_waiting_leaves_the_job_running(cluster: Cluster) -> None:
    """The job runs on after the call ends (here a deadline); calling again with the key
    waits for the same job and returns it final."""
    await cluster.worker()
    c = cluster.client()
    spec = task_spec("sleep", b'{"ms": 400}')
    request = coordinator_pb2.RunJobRequest(spec=spec, idempotency_key="slow")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.jobs.RunJob(request, metadata=c.metadata(), timeout=0.1)
    assert rpc_code(e.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    resumed = await run_job(cluster, request, c)
    assert not resumed.created and resumed.job.state == COMPLETED
    rows = cluster.db._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert rows == 1


async def test_many_callers_wait_side_by_side(cluster: Cluster) -> None:
    await cluster.worker(max_concurrency=8)
    c = cluster.client()
    done = await asyncio.gather(*(c.run(task_spec("echo", b"%d" % i)) for i in range(40)))
    assert [json.loads(j.result.output) for j in done] == list(range(40))
    assert len({j.job_id for j in done}) == 40


async def test_a_trivial_run_job_costs_two_write_transactions(cluster: Cluster) -> None:
    """The job (written already offered to the free worker) and its result (with the
    accept): no quote row."""
    await cluster.worker()
    c = cluster.client()
    await c.run(task_spec("echo", b"0"))  # the first one warms up
    store = cluster.coord.store
    assert isinstance(store, ThreadedStore)
    costs: list[int] = []
    for n in range(5):  # the least of five: a background write (or a dispatch pass
        before = store.stats().writes  # offering the job instead of its commit) may land
        done = await c.run(task_spec("echo", str(n).encode()))
        assert done.state == COMPLETED
        costs.append(store.stats().writes - before)
    assert min(costs) == 2, costs


async def test_waiting_for_a_job_lets_go_of_its_watch_when_it_returns(cluster: Cluster) -> None:
    """RunJob's wait closes the job's watch as it returns (no subscription left for the
    event loop's finalizer of unfinished generators to close later)."""
    c = cluster.client()
    quote = await c.quote(task_spec("echo", b"w"))
    committed = await c.commit(quote.quote_id, "w")  # queued: no worker yet
    jobs = cluster.coord.jobs
    owner = c.key.public_hex
    job = await jobs.get(owner, committed.job_id)
    assert not job.state.final

    async def wait() -> bool:
        done = await jobs.wait_final(owner, job)
        assert done.state.final
        return jobs.notifier.watched(job.job_id)  # no turn of the loop in between

    waiting = asyncio.create_task(wait())
    await cluster.worker()
    assert await waiting is False
