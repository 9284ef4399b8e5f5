"""WorkerService.Connect hardening: handshake deadline, errors while handling a message,
receipt timestamps. Hand-driven workers against real coordinators on port 0."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import Cluster, RawWorker, make_profile, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, worker_pb2
from dispatchnet.client import task_spec
from dispatchnet.errors import InvalidArgument, Unavailable
from dispatchnet.keys import KeyPair
from dispatchnet.protocol import MAX_PROGRESS_CHARS_PER_ATTEMPT, MAX_PROGRESS_TEXT_CHARS
from dispatchnet.receipts.core import RECEIPT_VERSION, serialize_body, sha256, sign_body
from dispatchnet.server import start_coordinator


@pytest.fixture
async def impatient(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A coordinator that gives a Connect stream half a second to say hello."""
    profile = make_profile(workers={"hello_timeout_seconds": 0.5})
    c = Cluster(await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0"), tmp_path)
    try:
        yield c
    finally:
        await c.close()


async def test_silent_connect_stream_is_closed_after_the_hello_timeout(
    impatient: Cluster,
) -> None:
    async with grpc.aio.insecure_channel(impatient.address) as channel:
        w = RawWorker(channel)  # opens the stream and sends nothing
        assert await w.status() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = await w.call.details() or ""
        assert "no hello within 0.5s" in details and "hello_timeout_seconds" in details
        w.close()


async def test_unanswered_challenge_is_closed_after_the_hello_timeout(
    impatient: Cluster,
) -> None:
    async with grpc.aio.insecure_channel(impatient.address) as channel:
        w = RawWorker(channel)
        w.hello()
        assert (await w.recv()).HasField("challenge")
        assert await w.status() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no challenge_response within 0.5s" in (await w.call.details() or "")
        assert not impatient.coord.hub.sessions
        w.close()


# --- an error while handling one worker message ------------------------------------------


def _boom(*args: object) -> None:
    raise RuntimeError("boom")


def _refuse(*args: object) -> None:
    raise InvalidArgument("result.output is too large")


async def test_internal_error_handling_a_message_is_logged_and_named_in_go_away(
    cluster: Cluster,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(cluster.coord.hub, "progress", _boom)
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(progress=worker_pb2.JobProgress(job_id="job_x", attempt=2, text="t"))
    go_away = (await raw.recv()).go_away
    assert go_away.reason.startswith("internal error handling progress for job job_x")
    assert go_away.retry_after_seconds > 0
    records = [r for r in caplog.records if r.name == "dispatch.hub" and r.exc_info]
    assert len(records) == 1, records
    text = records[0].getMessage()
    assert "progress for job job_x" in text and raw.key.public_hex in text
    assert "attempt 2" in text and "boom" in str(records[0].exc_info[1])  # type: ignore[index]
    raw.close()


async def test_refused_progress_ends_the_session_with_its_reason(
    cluster: Cluster, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.coord.hub, "progress", _refuse)
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(progress=worker_pb2.JobProgress(job_id="job_x", attempt=1, text="t"))
    go_away = (await raw.recv()).go_away
    assert go_away.reason == "progress for job job_x refused: result.output is too large"
    raw.close()


async def test_a_long_job_id_is_refused_without_being_echoed(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    # ids are bounded at the edge (worker.proto), so what a refusal or a GoAway quotes of
    # a worker's job id is short: never the megabytes it sent
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(progress=worker_pb2.JobProgress(job_id="j" * 100_000, attempt=1))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        while True:
            await raw.recv()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(e.value.details() or "") < 200
    raw.close()


async def test_refused_result_is_answered_and_the_session_goes_on(
    cluster: Cluster, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.coord.hub, "completed", _refuse)
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, what="running")
    raw.send(completed=worker_pb2.JobCompleted(job_id=job.job_id, attempt=offer.attempt))
    ack = (await raw.recv()).result_ack
    assert (ack.job_id, ack.attempt, ack.accepted) == (job.job_id, 1, False)
    assert ack.reason == "result.output is too large"
    # the attempt was given up and the same session is offered the next one
    again = (await raw.recv()).offer
    assert (again.job_id, again.attempt) == (job.job_id, 2)
    reasons = [e.reason for e in cluster.db.events_after(job.job_id, 0)]
    assert "failed: result_refused" in reasons
    raw.close()


def _store_away(*args: object) -> None:
    raise Unavailable("the store's database is unavailable: connection reset")


async def test_a_result_the_store_cannot_record_now_is_not_refused(
    cluster: Cluster, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is away (restarting) when a result comes: it is not refused (that gave
    the attempt up, marked the worker failed and ran the job again); the session ends
    soon-to-retry and the worker, which keeps an unacknowledged result, sends it again."""
    monkeypatch.setattr(cluster.coord.hub, "completed", _store_away)
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))
    raw.send(completed=worker_pb2.JobCompleted(job_id=job.job_id, attempt=offer.attempt))
    go_away = (await raw.recv()).go_away
    assert "not recorded now" in go_away.reason and go_away.retry_after_seconds == 1
    reasons = [e.reason for e in cluster.db.events_after(job.job_id, 0)]
    assert "failed: result_refused" not in reasons, reasons
    raw.close()


# --- receipt times -----------------------------------------------------------------------

DAY = 86400


def _receipt(
    raw: RawWorker,
    offer: worker_pb2.JobOffer,
    coordinator_key: bytes,
    output: bytes,
    started: float,
    completed: float,
) -> worker_pb2.JobCompleted:
    """A JobCompleted whose receipt is right in every field but its times."""
    body = receipt_pb2.ReceiptBody(
        version=RECEIPT_VERSION,
        job_id=offer.job_id,
        job_type=common_pb2.JOB_TYPE_TASK,
        input_sha256=offer.spec_sha256,
        output_sha256=sha256(output),
        worker_public_key=raw.key.public_key,
        coordinator_public_key=coordinator_key,
        price=offer.price,
        payment=offer.payment,
        attempt=offer.attempt,
        client_id=offer.client_id,
    )
    body.started_at.FromNanoseconds(int(started * 1e9))
    body.completed_at.FromNanoseconds(int(completed * 1e9))
    data = serialize_body(body)
    return worker_pb2.JobCompleted(
        job_id=offer.job_id,
        attempt=offer.attempt,
        result=common_pb2.JobResult(output=output, content_type="application/json"),
        receipt_body=data,
        receipt_signature=sign_body(raw.key, data),
    )


@pytest.mark.parametrize(
    ("started", "completed", "refusal"),
    [
        (0, 0, ""),  # times within the attempt: countersigned
        (0, DAY, r"receipt completed_at is 86[34]\d\ds ahead of the coordinator's clock \(30s"),
        (2, 1, "receipt started_at is after its completed_at"),
        (-3600, 0, r"receipt started_at is 3[56]\d\ds before this attempt was offered \(30s"),
    ],
)
async def test_receipt_times_must_fit_the_attempt(
    cluster: Cluster, channel: grpc.aio.Channel, started: int, completed: int, refusal: str
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, what="running")
    now = time.time()
    key = cluster.coord.hub.public_key
    raw.send(completed=_receipt(raw, offer, key, b"1", now + started, now + completed))
    ack = (await raw.recv()).result_ack
    assert ack.accepted == (not refusal), ack.reason
    assert re.match(refusal, ack.reason), ack.reason
    if refusal:
        reasons = [e.reason for e in cluster.db.events_after(job.job_id, 0)]
        assert f"bad receipt: {ack.reason}" in reasons
    raw.close()


# --- an attempt its worker gave up -------------------------------------------------------


async def test_a_worker_that_rejected_an_offer_cannot_deliver_it_later(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    first = RawWorker(channel)
    await first.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await first.recv()).offer
    second = RawWorker(channel)
    await second.handshake()
    first.send(
        offer_response=worker_pb2.OfferResponse(
            job_id=job.job_id, attempt=1, accept=False, reason="busy"
        )
    )
    retry = (await second.recv()).offer
    assert (retry.job_id, retry.attempt) == (job.job_id, 2)
    second.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=2, accept=True))

    async def running() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_RUNNING

    await wait_until(running, what="the retry running")
    # the refused attempt's result, with a receipt right in every field: given up, it
    # does not take the job from the worker that accepted the retry
    now = time.time()
    key = cluster.coord.hub.public_key
    first.send(completed=_receipt(first, offer, key, b"1", now, now))
    ack = (await first.recv()).result_ack
    assert (ack.job_id, ack.attempt, ack.accepted) == (job.job_id, 1, False)
    assert ack.reason.startswith("stale"), ack.reason
    still = await c.get(job.job_id)
    assert still.state == coordinator_pb2.JOB_STATE_RUNNING
    assert (still.worker_id, still.attempts) == (second.key.public_hex, 2)
    second.send(completed=_receipt(second, retry, key, b"1", now, time.time()))
    assert (await second.recv()).result_ack.accepted
    done = await c.get(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
    assert done.worker_id == second.key.public_hex
    first.close()
    second.close()


async def test_a_revoked_worker_cannot_take_a_requeued_private_job_back(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    """A PRIVATE job went back to the queue when its worker's stream dropped; the client
    then revoked the pairing. The worker reconnects listing the job as still running:
    it is not resumed there (back in the queue it is a new assignment, and the pairing is
    checked as matching checks it), and its result is refused; it used to take the job
    back and complete it."""
    client, key = cluster.client(), KeyPair.generate()
    pairing = await cluster.client(key).claim_pairing((await client.create_pairing_code()).code)
    first = RawWorker(channel, key)
    await first.handshake()
    job = await client.submit(task_spec("echo", b"secret", private=True))
    offer = (await first.recv()).offer
    assert offer.job_id == job.job_id
    first.send(
        offer_response=worker_pb2.OfferResponse(
            job_id=job.job_id, attempt=offer.attempt, accept=True
        )
    )

    async def state_is(state: int) -> bool:
        return (await client.get(job.job_id)).state == state

    await wait_until(lambda: state_is(coordinator_pb2.JOB_STATE_RUNNING), what="running")
    first.close()
    await wait_until(lambda: state_is(coordinator_pb2.JOB_STATE_QUEUED), what="requeued")
    await client.revoke_pairing(pairing.pairing_id)

    again = RawWorker(channel, key)
    await again.handshake(running=((job.job_id, offer.attempt),))
    now = time.time()
    again.send(completed=_receipt(again, offer, cluster.coord.hub.public_key, b"secret", now, now))
    ack = (await again.recv()).result_ack
    assert not ack.accepted and "no longer paired" in ack.reason, ack
    after = await client.get(job.job_id)
    assert after.state == coordinator_pb2.JOB_STATE_QUEUED and after.attempts == 1
    again.close()


async def test_made_up_job_ids_leave_nothing_behind(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    failure = common_pb2.JobFailure(code="oops", message="no")
    for n in range(50):
        job_id = f"job_{n:032x}"
        raw.send(offer_response=worker_pb2.OfferResponse(job_id=job_id, attempt=1, accept=False))
        raw.send(
            failed=worker_pb2.JobFailed(job_id=job_id, attempt=1, failure=failure, retryable=True)
        )
        raw.send(completed=worker_pb2.JobCompleted(job_id=job_id, attempt=1))
    acks = [(await raw.recv()).result_ack for _ in range(100)]
    assert all(not a.accepted for a in acks)
    # the jobs a worker refused are remembered only for attempts it held: made-up ids,
    # which never end, would stay forever
    assert cluster.coord.hub._avoid == {}
    raw.close()


async def test_an_attempts_progress_text_is_bounded(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))
    chunk = "x" * MAX_PROGRESS_TEXT_CHARS
    sent = 0
    while sent <= MAX_PROGRESS_CHARS_PER_ATTEMPT:
        raw.send(progress=worker_pb2.JobProgress(job_id=job.job_id, attempt=1, text=chunk))
        sent += len(chunk)
    go_away = (await raw.recv()).go_away
    assert f"passed {MAX_PROGRESS_CHARS_PER_ATTEMPT} characters in one attempt" in go_away.reason
    # the job goes on elsewhere; what was stored of its progress stays within the bound
    again = await c.get(job.job_id)
    assert again.state != coordinator_pb2.JOB_STATE_COMPLETED
    stored = sum(len(e.text) for e in cluster.db.events_after(job.job_id, 0, limit=10_000))
    assert stored <= MAX_PROGRESS_CHARS_PER_ATTEMPT
    assert offer.attempt == 1
    raw.close()
