"""A job runs end to end over gRPC: quotes, commit, watch, cancel, receipts."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest
from conftest import Cluster, RawWorker, rpc_code, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, receipt_pb2_grpc, worker_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator.catalogue import MAX_LISTED, TaskCatalogue
from dispatchnet.errors import FailedPrecondition
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import (
    RECEIPT_VERSION,
    serialize_body,
    sha256,
    sign_body,
    verify_receipt_message,
)
from dispatchnet.store.threaded import ThreadedStore
from dispatchnet.worker.executors import BuiltinTasks

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


async def test_task_job_completes_with_a_verifiable_receipt(cluster: Cluster) -> None:
    w = await cluster.worker()
    c = cluster.client()
    spec = task_spec("sha256", b'"hello"')
    quote = await c.quote(spec)
    assert quote.price.amount_micros == 1000 and quote.price.currency == "USD"
    assert quote.eligible_workers == 1
    job = await c.commit(quote.quote_id, "k1")
    # the free worker's offer is written with the job (see README "Job lifecycle"), unless
    # a dispatch pass was looking at the queue just then (it then offers the job itself)
    assert (job.state, job.last_sequence) in (
        (coordinator_pb2.JOB_STATE_OFFERED, 2),
        (coordinator_pb2.JOB_STATE_QUEUED, 1),
    )
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED
    assert done.result.output.decode() == sha256(b'"hello"').hex()
    assert done.worker_id == w.key.public_hex
    assert done.price == quote.price

    v = verify_receipt_message(done.receipt, cluster.coord.public_key)
    assert v.valid, v.problems
    body = v.body
    assert body is not None
    assert body.job_id == job.job_id
    assert body.input_sha256 == quote.spec_sha256
    assert body.output_sha256 == sha256(done.result.output)
    assert body.worker_public_key == w.key.public_key
    assert body.client_id == c.key.public_hex
    assert body.price.amount_micros == 1000
    assert body.payment.status == "none"

    stub = receipt_pb2_grpc.ReceiptServiceStub(c.channel)
    resp = await stub.VerifyReceipt(receipt_pb2.VerifyReceiptRequest(receipt=done.receipt))
    assert resp.valid and resp.decoded.job_id == job.job_id
    got = await c.receipt(job.job_id)
    assert got.receipt == done.receipt and got.decoded.job_id == job.job_id


async def test_tampered_receipt_fails_verification(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    done = await c.wait((await c.submit(task_spec("echo", b"[1]"))).job_id)
    body = receipt_pb2.ReceiptBody.FromString(done.receipt.body)
    body.price.amount_micros = 1  # a cheaper price than was paid
    forged = receipt_pb2.Receipt()
    forged.CopyFrom(done.receipt)
    forged.body = body.SerializeToString()
    v = verify_receipt_message(forged)
    assert not v.valid
    assert any("worker signature" in p for p in v.problems)
    assert any("coordinator signature" in p for p in v.problems)
    stub = receipt_pb2_grpc.ReceiptServiceStub(c.channel)
    resp = await stub.VerifyReceipt(receipt_pb2.VerifyReceiptRequest(receipt=forged))
    assert not resp.valid and resp.problems


async def test_verify_receipt_wants_this_coordinators_countersignature(cluster: Cluster) -> None:
    # a receipt for a job that never ran, signed by two keys of the caller's making
    worker, coordinator = KeyPair.generate(), KeyPair.generate()
    body = serialize_body(
        receipt_pb2.ReceiptBody(
            version=RECEIPT_VERSION,
            job_id="job_forged",
            job_type=common_pb2.JOB_TYPE_TASK,
            input_sha256=b"\1" * 32,
            output_sha256=b"\2" * 32,
            worker_public_key=worker.public_key,
            coordinator_public_key=coordinator.public_key,
            price=common_pb2.Money(currency="USD", amount_micros=999_999_999),
            client_id="ab" * 32,
            attempt=1,
        )
    )
    forged = receipt_pb2.Receipt(
        body=body,
        worker_signature=sign_body(worker, body),
        coordinator_signature=sign_body(coordinator, body),
        receipt_sha256=sha256(body),
    )
    stub = receipt_pb2_grpc.ReceiptServiceStub(cluster.client().channel)
    resp = await stub.VerifyReceipt(receipt_pb2.VerifyReceiptRequest(receipt=forged))
    assert not resp.valid
    assert any("different coordinator" in p for p in resp.problems), resp.problems
    # the caller may ask about another coordinator's key: then it is that key's receipt
    named = await stub.VerifyReceipt(
        receipt_pb2.VerifyReceiptRequest(
            receipt=forged, expected_coordinator_public_key=coordinator.public_key
        )
    )
    assert named.valid and named.decoded.job_id == "job_forged"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.VerifyReceipt(
            receipt_pb2.VerifyReceiptRequest(
                receipt=forged, expected_coordinator_public_key=b"12345"
            )
        )
    assert rpc_code(e.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "32" in (e.value.details() or "")


@pytest.mark.parametrize(
    ("task", "policy", "micros"),
    [
        ("echo", common_pb2.POLICY_FAST, 3000),
        ("echo", common_pb2.POLICY_CHEAP, 1000),
        ("echo", common_pb2.POLICY_AUTO, 1000),
        ("echo", common_pb2.POLICY_UNSPECIFIED, 1000),
    ],
)
async def test_task_prices_come_from_the_profile(
    cluster: Cluster, task: str, policy: int, micros: int
) -> None:
    q = await cluster.client().quote(task_spec(task, b"1", policy))
    assert q.price.amount_micros == micros


async def test_llm_prices_and_auto_policy(cluster: Cluster) -> None:
    c = cluster.client()
    spec = common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="hi"))
    q = await c.quote(spec)
    assert q.price.amount_micros == 10000
    assert q.spec.policy == common_pb2.POLICY_FAST
    assert q.eligible_workers == 0
    spec.policy = common_pb2.POLICY_CHEAP
    assert (await c.quote(spec)).price.amount_micros == 5000


async def test_commit_is_idempotent_per_client(cluster: Cluster) -> None:
    c = cluster.client()
    q = await c.quote(task_spec("echo", b"1"))
    first = await c.jobs.CommitJob(
        coordinator_pb2.CommitJobRequest(quote_id=q.quote_id, idempotency_key="same"),
        metadata=c.metadata(),
    )
    again = await c.jobs.CommitJob(
        coordinator_pb2.CommitJobRequest(quote_id=q.quote_id, idempotency_key="same"),
        metadata=c.metadata(),
    )
    assert first.created and not again.created
    assert first.job.job_id == again.job.job_id
    # another client using the same key gets its own job
    other = cluster.client()
    theirs = await other.commit(q.quote_id, "same")
    assert theirs.job_id != first.job.job_id
    # the same key for a different quote is refused
    q2 = await c.quote(task_spec("echo", b"2"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.commit(q2.quote_id, "same")
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION


async def test_idempotent_retry_works_after_the_quote_expired(cluster: Cluster) -> None:
    c = cluster.client()
    q = await c.quote(task_spec("echo", b"1"))
    job = await c.commit(q.quote_id, "retry")
    cluster.coord.jobs.clock = lambda: time.time() + 3600
    assert (await c.commit(q.quote_id, "retry")).job_id == job.job_id


async def test_expired_quote_is_refused(cluster: Cluster) -> None:
    c = cluster.client()
    q = await c.quote(task_spec("echo", b"1"))
    cluster.coord.jobs.clock = lambda: time.time() + 3600
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.commit(q.quote_id, "late")
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (e.value.details() or "")


async def test_watch_streams_sequenced_events_and_resumes(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b'{"a": 1}'))
    events = [item async for item in c.watch(job.job_id)]
    seqs = [i.event.sequence for i in events]
    assert seqs == list(range(1, len(seqs) + 1))
    states = [i.event.state_change.to_state for i in events]
    assert states == [
        coordinator_pb2.JOB_STATE_QUEUED,
        coordinator_pb2.JOB_STATE_OFFERED,
        coordinator_pb2.JOB_STATE_RUNNING,
        COMPLETED,
    ]
    assert events[-1].job.state == COMPLETED
    assert all(not i.HasField("job") for i in events[:-1])
    resumed = [item async for item in c.watch(job.job_id, after=2)]
    assert [i.event.sequence for i in resumed] == [3, 4]
    assert [item async for item in c.watch(job.job_id, after=4)] == []


async def test_cancel_a_running_job_tells_the_worker(cluster: Cluster) -> None:
    w = await cluster.worker()
    c = cluster.client()
    job = await c.submit(task_spec("sleep", json.dumps({"ms": 60000}).encode()))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, what="job running")
    cancelled = await c.cancel(job.job_id, "changed my mind")
    assert cancelled.state == coordinator_pb2.JOB_STATE_CANCELLED
    assert cancelled.failure.message == "changed my mind"
    await wait_until(lambda: not w._running, what="worker stopped the job")
    again = await c.cancel(job.job_id)
    assert again.state == coordinator_pb2.JOB_STATE_CANCELLED
    assert (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_CANCELLED


async def test_cancel_a_completed_job_is_refused(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    done = await c.wait((await c.submit(task_spec("echo", b"1"))).job_id)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.cancel(done.job_id)
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_a_queued_job(cluster: Cluster) -> None:
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    assert (await c.cancel(job.job_id)).state == coordinator_pb2.JOB_STATE_CANCELLED


async def test_task_error_fails_the_job_without_retry(cluster: Cluster) -> None:
    await cluster.worker()
    c = cluster.client()
    done = await c.wait((await c.submit(task_spec("sleep", b'"not an object"'))).job_id)
    assert done.state == coordinator_pb2.JOB_STATE_FAILED
    assert done.failure.code == "bad_input"
    assert done.attempts == 1
    assert not done.HasField("receipt")


async def test_job_with_no_eligible_worker_fails_after_queue_timeout(cluster: Cluster) -> None:
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))  # no worker is connected
    cluster.coord.jobs.clock = lambda: time.time() + 3600
    cluster.coord.hub.kick()
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_FAILED
    assert done.failure.code == "no_eligible_worker"


async def test_list_workers_is_public(cluster: Cluster) -> None:
    w1 = await cluster.worker("seeker", max_concurrency=2)
    w2 = await cluster.worker("desktop")
    workers = await cluster.client().list_workers()
    by_id = {w.worker_id: w for w in workers}
    assert by_id[w1.key.public_hex].kind == common_pb2.WORKER_KIND_SEEKER
    assert by_id[w1.key.public_hex].max_concurrency == 2
    assert by_id[w2.key.public_hex].kind == common_pb2.WORKER_KIND_DESKTOP
    assert "echo" in by_id[w1.key.public_hex].tasks
    assert by_id[w1.key.public_hex].reputation == pytest.approx(0.3)  # the prior


async def test_many_jobs_spread_over_workers(cluster: Cluster) -> None:
    ws = [await cluster.worker(max_concurrency=2) for _ in range(3)]
    c = cluster.client()
    jobs = [await c.submit(task_spec("sha256", str(i).encode())) for i in range(30)]
    done = [await c.wait(j.job_id) for j in jobs]
    assert all(d.state == COMPLETED for d in done)
    used = {d.worker_id for d in done}
    assert used <= {w.key.public_hex for w in ws}
    assert len(used) >= 2


async def test_jobs_nobody_can_run_do_not_block_the_queue(cluster: Cluster) -> None:
    c = cluster.client()
    for i in range(520):  # more than one dispatch page of jobs no connected worker runs
        await c.submit(task_spec("echo", str(i).encode()))
    runnable = [await c.submit(task_spec("sha256", str(i).encode())) for i in range(5)]
    await cluster.worker(executors=[BuiltinTasks(["sha256"])])
    done = [await c.wait(j.job_id) for j in runnable]
    assert all(d.state == COMPLETED for d in done)


async def test_long_expired_quotes_are_purged(cluster: Cluster) -> None:
    c = cluster.client()
    old = await c.quote(task_spec("echo", b"1"))
    jobs = cluster.coord.jobs
    jobs.clock = lambda: time.time() + 3 * 3600
    jobs._next_purge = 0.0
    await jobs.sweep()
    assert cluster.db.get_quote(old.quote_id) is None
    fresh = await c.quote(task_spec("echo", b"2"))
    assert cluster.db.get_quote(fresh.quote_id) is not None


async def test_a_task_no_worker_ever_offered_is_refused_at_quote_time(cluster: Cluster) -> None:
    c = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.quote(task_spec("ech", b"1"))
    assert rpc_code(e.value) == grpc.StatusCode.FAILED_PRECONDITION
    msg = e.value.details() or ""
    assert msg.startswith('no worker has ever offered task "ech" (did you mean "echo"?); ')
    assert "known tasks: classify, echo, extract_json, sha256, sleep" in msg
    assert "wasm" in msg  # the built-in catalogue counts before any worker connects


async def test_a_task_a_worker_declared_stays_known(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    c = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError):
        await c.quote(task_spec("resize_image", b"1"))
    raw = RawWorker(channel)
    await raw.handshake(tasks=("resize_image",))
    raw.close()
    await wait_until(lambda: not cluster.coord.hub.sessions, what="the worker to leave")
    q = await c.quote(task_spec("resize_image", b"1"))  # known though nobody runs it now
    assert q.eligible_workers == 0
    # kept durably: a coordinator starting on the same store knows it too
    assert await TaskCatalogue(cluster.coord.store, []).check("resize_image") is None


async def test_declared_task_names_are_bounded(cluster: Cluster) -> None:
    store = cluster.coord.store
    for i in range(10):
        await store.record_task_names([f"t{i}"], 100.0 + i, keep=4)
    await store.record_task_names(["t7"], 200.0, keep=4)  # declared again: the most recent
    await store.record_task_names(["t10"], 201.0, keep=4)
    assert await store.task_names(100) == ["t10", "t7", "t9", "t8"]
    # the message lists a bounded number of names
    catalogue = TaskCatalogue(store, [f"b{i:03}" for i in range(100)])
    with pytest.raises(FailedPrecondition) as e:
        await catalogue.check("nope")
    assert e.value.message.count(",") == MAX_LISTED  # MAX_LISTED names and "… (N more)"
    assert e.value.message.endswith("(84 more)")


async def test_a_trivial_job_costs_three_write_transactions(cluster: Cluster) -> None:
    """GetQuote, CommitJob (written already offered to the free worker) and the result
    (written with the worker's accept, kept in memory until then)."""
    await cluster.worker()
    c = cluster.client()
    await c.wait((await c.submit(task_spec("echo", b"0"))).job_id)  # the first one warms up
    store = cluster.coord.store
    assert isinstance(store, ThreadedStore)
    costs: list[int] = []
    for n in range(10):  # the least of three: a background write may land in one
        if len(costs) == 3:
            break
        before = store.stats().writes
        quote = await c.quote(task_spec("echo", str(n).encode()))
        job = await c.commit(quote.quote_id, f"k{n}")
        done = await c.wait(job.job_id)
        if job.state != coordinator_pb2.JOB_STATE_OFFERED:
            continue  # a dispatch pass was reading the queue just then: it offered the job
        costs.append(store.stats().writes - before)
        events = [i.event async for i in c.watch(job.job_id)]
        assert [(e.sequence, e.state_change.to_state, e.state_change.reason) for e in events] == [
            (1, coordinator_pb2.JOB_STATE_QUEUED, "committed"),
            (2, coordinator_pb2.JOB_STATE_OFFERED, "offered"),
            (3, coordinator_pb2.JOB_STATE_RUNNING, "accepted"),
            (4, COMPLETED, "completed"),
        ]
        assert done.last_sequence == 4
    assert len(costs) == 3 and min(costs) == 3, costs


async def test_a_job_that_ends_at_once_sends_its_result_alone(cluster: Cluster) -> None:
    """A built-in task ends in its first step: the worker sends the result without an
    accept, and the result answers the offer (accepted, then completed). A job that runs
    longer is accepted first."""
    w = await cluster.worker()
    sent: list[str] = []
    send = w._send

    def recording(msg: Any) -> None:
        sent.append(str(msg.WhichOneof("msg")))
        send(msg)

    w._send = recording  # type: ignore[method-assign]
    c = cluster.client()
    for spec, kinds in (
        (task_spec("echo", b"1"), ["completed"]),
        (task_spec("sleep", b'{"ms": 50}'), ["offer_response", "completed"]),
    ):
        sent.clear()
        done = await c.run(spec)
        assert done.state == COMPLETED, done.failure
        assert [k for k in sent if k != "heartbeat"] == kinds
        events = [i.event async for i in c.watch(done.job_id)]
        reasons = [e.state_change.reason for e in events]
        assert reasons == ["committed", "offered", "accepted", "completed"]


async def test_a_failure_answers_an_unanswered_offer_too(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(
        failed=worker_pb2.JobFailed(
            job_id=offer.job_id,
            attempt=offer.attempt,
            failure=common_pb2.JobFailure(code="bad_input", message="no"),
            retryable=False,
        )
    )
    assert (await raw.recv()).result_ack.accepted
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_FAILED and done.failure.code == "bad_input"
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert reasons[:3] == ["committed", "offered", "accepted"], reasons
    raw.close()


async def test_an_offer_sent_while_its_job_is_written_is_withdrawn_if_no_job_is_made(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    """CommitJob offers a job to a free worker while it writes it. Two commits with one key
    at once: each offers its job, one job is made, and the other offer is cancelled; a
    result for it is refused."""
    workers = [RawWorker(channel), RawWorker(channel)]
    for w in workers:
        await w.handshake()
    hub = cluster.coord.hub
    await wait_until(lambda: len(hub.sessions) == 2, what="both workers")
    c = cluster.client()
    quote = await c.quote(task_spec("echo", b"1"))
    # a new job is offered at commit only while no dispatch pass runs (see reserve)
    await wait_until(lambda: not (hub._passing or hub._fresh or hub._backlog), what="no pass")
    first, second = await asyncio.gather(*(c.commit(quote.quote_id, "k") for _ in range(2)))
    assert first.job_id == second.job_id
    offers = {w: (await w.recv()).offer for w in workers}
    [made] = [w for w, o in offers.items() if o.job_id == first.job_id]
    [void] = [w for w, o in offers.items() if o.job_id != first.job_id]
    cancel = (await void.recv()).cancel
    assert cancel.job_id == offers[void].job_id and "not committed" in cancel.reason
    void.send(
        failed=worker_pb2.JobFailed(
            job_id=offers[void].job_id, attempt=1,
            failure=common_pb2.JobFailure(code="x", message="x"),
        )
    )  # fmt: skip
    assert not (await void.recv()).result_ack.accepted
    assert cluster.db.get_job(offers[void].job_id) is None
    made.send(offer_response=worker_pb2.OfferResponse(job_id=first.job_id, attempt=1, accept=True))
    running = (coordinator_pb2.JOB_STATE_OFFERED, coordinator_pb2.JOB_STATE_RUNNING)
    assert (await c.get(first.job_id)).state in running
    for w in workers:
        w.close()


async def test_a_long_jobs_accept_is_written_before_its_offer_lease_lapses(
    cluster: Cluster,
) -> None:
    """The accept is kept in memory only for a moment (well within the offer lease, 2 s
    here): a job running longer is RUNNING in the store meanwhile, no sweep requeues it."""
    await cluster.worker()
    c = cluster.client()
    job = await c.submit(task_spec("sleep", json.dumps({"ms": 3000}).encode()))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, within=1.5, what="the accept written")
    done = await c.wait(job.job_id)
    assert done.state == COMPLETED and done.attempts == 1
    events = [i.event async for i in c.watch(job.job_id)]
    assert [e.state_change.reason for e in events] == [
        "committed",
        "offered",
        "accepted",
        "completed",
    ]
