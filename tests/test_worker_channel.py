"""WorkerService.Connect at the protocol level, with a hand-driven worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from conftest import HELLO, Cluster, RawWorker, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2, worker_pb2
from dispatchnet.client import task_spec
from dispatchnet.coordinator.hub import OUTBOX_HIGH, OUTBOX_LOW, AcksDue, ResultAck, WorkerSession
from dispatchnet.coordinator.models import WorkerKind
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile
from dispatchnet.protocol import ACK_DELAY_SECONDS, HTTP2_WINDOW_BYTES, MAX_ACKS_PER_MESSAGE
from dispatchnet.receipts.core import sha256
from dispatchnet.worker.runtime import Worker


async def test_handshake_gives_an_identity_from_the_proven_key(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    w = RawWorker(channel)
    welcome = await w.handshake()
    assert welcome.worker_id == w.key.public_hex
    assert welcome.heartbeat_interval_seconds == 1
    w.close()


async def test_first_message_must_be_hello(channel: grpc.aio.Channel) -> None:
    w = RawWorker(channel)
    w.send(heartbeat=worker_pb2.Heartbeat())
    assert await w.status() == grpc.StatusCode.INVALID_ARGUMENT


async def test_claiming_someone_elses_key_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    victim = KeyPair.generate()
    w = RawWorker(channel)  # holds its own key, presents the victim's public key
    w.hello(public_key=victim.public_key)
    ch = (await w.recv()).challenge
    w.send(
        challenge_response=worker_pb2.ChallengeResponse(
            signature=w.key.sign(HELLO, ch.nonce + ch.coordinator_public_key)
        )
    )
    assert await w.status() == grpc.StatusCode.UNAUTHENTICATED
    assert "challenge signature" in (await w.call.details() or "")


async def test_signature_over_another_nonce_is_refused(channel: grpc.aio.Channel) -> None:
    w = RawWorker(channel)
    w.hello()
    ch = (await w.recv()).challenge
    w.send(
        challenge_response=worker_pb2.ChallengeResponse(
            signature=w.key.sign(HELLO, b"\x00" * 32 + ch.coordinator_public_key)
        )
    )
    assert await w.status() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"kind": common_pb2.WORKER_KIND_SEEKER, "models": ("m",)}, "seekers run TASK"),
        ({"kind": 0}, "hello.kind"),
        ({"public_key": b"short"}, "32-byte"),
        ({"tasks": ("Bad Task",)}, "not a task name"),
    ],
)
async def test_bad_hello_is_invalid_argument(
    channel: grpc.aio.Channel, kw: dict[str, object], needle: str
) -> None:
    w = RawWorker(channel)
    w.hello(**kw)  # type: ignore[arg-type]
    if kw.get("kind", 1) and "public_key" not in kw and "tasks" not in kw:
        ch = (await w.recv()).challenge
        w.send(
            challenge_response=worker_pb2.ChallengeResponse(
                signature=w.key.sign(HELLO, ch.nonce + ch.coordinator_public_key)
            )
        )
    assert await w.status() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (await w.call.details() or "")


async def test_rejected_offer_goes_to_another_worker(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    assert offer.job_id == job.job_id and offer.attempt == 1
    assert offer.spec_sha256 == sha256(offer.spec.SerializeToString(deterministic=True))
    good = await cluster.worker()
    raw.send(
        offer_response=worker_pb2.OfferResponse(
            job_id=offer.job_id, attempt=1, accept=False, reason="battery_low"
        )
    )
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
    assert done.worker_id == good.key.public_hex and done.attempts == 2
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert "rejected: battery_low" in reasons
    raw.close()


async def test_unanswered_offer_lapses_and_is_cancelled(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    assert (await raw.recv()).offer.job_id == job.job_id
    # heartbeat so we are not evicted, but never answer the offer
    raw.send(heartbeat=worker_pb2.Heartbeat())
    cancel = (await raw.recv()).cancel
    assert cancel.job_id == job.job_id and cancel.reason == "offer_lease_expired"
    after = await c.get(job.job_id)
    assert after.state in (coordinator_pb2.JOB_STATE_QUEUED, coordinator_pb2.JOB_STATE_OFFERED)
    raw.close()


async def test_result_with_a_bad_receipt_is_refused(
    cluster: Cluster, channel: grpc.aio.Channel
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
    raw.send(
        completed=worker_pb2.JobCompleted(
            job_id=job.job_id,
            attempt=offer.attempt,
            result=common_pb2.JobResult(output=b"1", content_type="application/json"),
            receipt_body=b"\x08\x01",
            receipt_signature=b"\x00" * 64,
        )
    )
    ack = (await raw.recv()).result_ack
    assert not ack.accepted and "does not match" in ack.reason
    reasons = [i.event.state_change.reason async for i in c.watch(job.job_id)]
    assert any(r.startswith("bad receipt") for r in reasons)
    raw.close()


async def test_stale_result_is_refused(cluster: Cluster, channel: grpc.aio.Channel) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(completed=worker_pb2.JobCompleted(job_id="job_x", attempt=3))
    ack = (await raw.recv()).result_ack
    assert not ack.accepted and "stale" in ack.reason
    raw.close()


async def test_drain_stops_new_offers(cluster: Cluster, channel: grpc.aio.Channel) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(drain=worker_pb2.Drain(reason="shutting down"))

    async def draining() -> bool:
        ws = await cluster.client().list_workers()
        return any(w.draining for w in ws)

    await wait_until(draining, what="draining")
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    good = await cluster.worker()
    done = await c.wait(job.job_id)
    assert done.worker_id == good.key.public_hex and done.attempts == 1
    raw.close()


async def test_reconnect_replaces_the_old_session(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    key = KeyPair.generate()
    first = RawWorker(channel, key)
    await first.handshake()
    second = RawWorker(channel, key)
    await second.handshake()
    assert "replaced" in (await first.recv()).go_away.reason
    workers = await cluster.client().list_workers()
    assert [w.worker_id for w in workers] == [key.public_hex]
    first.close()
    second.close()


async def test_progress_reaches_watchers(cluster: Cluster, channel: grpc.aio.Channel) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))
    raw.send(
        progress=worker_pb2.JobProgress(job_id=job.job_id, attempt=1, text="tok", fraction=0.5)
    )
    raw.send(progress=worker_pb2.JobProgress(job_id=job.job_id, attempt=9, text="stale"))
    events = c.watch(job.job_id)
    seen = []
    async for item in events:
        seen.append(item.event)
        if item.event.HasField("progress"):
            break
    assert seen[-1].progress.text == "tok" and seen[-1].progress.fraction == 0.5
    assert seen[-1].state == coordinator_pb2.JOB_STATE_RUNNING
    assert offer.attempt == 1
    raw.close()


# --- batched acks (Hello.batched_acks, ConnectResponse.acks) ----------------------------


def _reads(w: Worker) -> list[worker_pb2.ConnectResponse]:
    """Every message the worker reads from now on (its _read, which takes the acks)."""
    seen: list[worker_pb2.ConnectResponse] = []
    read = w._read

    async def spy(call: Any) -> worker_pb2.ConnectResponse:
        msg = await read(call)
        seen.append(msg)
        return msg

    w._read = spy  # type: ignore[method-assign]
    return seen


async def test_a_busy_workers_results_are_acked_on_its_next_offers(cluster: Cluster) -> None:
    w = await cluster.worker(max_concurrency=4)
    seen = _reads(w)
    c = cluster.client()

    async def submitter(i: int) -> None:  # 8 of them on 4 slots: jobs wait for slots
        for k in range(3):
            job = await c.run(task_spec("echo", f"{i}.{k}".encode()))
            assert job.state == coordinator_pb2.JOB_STATE_COMPLETED

    await asyncio.gather(*(submitter(i) for i in range(8)))
    await wait_until(lambda: not w._pending, what="every result acknowledged")
    acks = [a for m in seen for a in m.acks]
    assert len(acks) == 24 and all(a.accepted for a in acks)
    assert not any(m.HasField("result_ack") for m in seen)  # no message of its own
    offers = [m for m in seen if m.HasField("offer")]
    # (the first offer was read before the spy was in place)
    assert len(offers) == 23 and sum(len(m.acks) for m in offers) >= 8  # they rode along


async def test_an_idle_workers_ack_comes_alone_at_once(cluster: Cluster) -> None:
    w = await cluster.worker()
    seen = _reads(w)
    job = await cluster.client().run(task_spec("echo", b"1"))
    await wait_until(lambda: not w._pending, within=2, what="the ack")
    alone = [m for m in seen if m.WhichOneof("msg") is None]
    assert [(a.job_id, a.accepted) for m in alone for a in m.acks] == [(job.job_id, True)]


async def test_a_busy_workers_ack_with_nothing_to_ride_on_comes_alone_soon(
    cluster: Cluster,
) -> None:
    w = await cluster.worker(max_concurrency=2)
    c = cluster.client()
    await c.submit(task_spec("sleep", b'{"ms": 60000}'))  # keeps the worker busy
    await wait_until(lambda: len(w._running) == 1, what="the long job running")
    seen = _reads(w)
    began = time.monotonic()
    job = await c.run(task_spec("echo", b"1"))
    # no offer follows: the ack waits its ACK_DELAY_SECONDS, then goes alone
    await wait_until(lambda: not w._pending, within=2, what="the ack")
    assert time.monotonic() - began >= ACK_DELAY_SECONDS  # it waited (never sooner)
    alone = [m for m in seen if m.WhichOneof("msg") is None]
    assert [(a.job_id, a.accepted) for m in alone for a in m.acks] == [(job.job_id, True)]


async def test_a_refused_result_is_acked_in_a_batch_too(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake(batched_acks=True)
    raw.send(completed=worker_pb2.JobCompleted(job_id="job_x", attempt=3))
    msg = await raw.recv()
    assert msg.WhichOneof("msg") is None and len(msg.acks) == 1
    assert not msg.acks[0].accepted and "stale" in msg.acks[0].reason
    raw.close()


def _batched_session() -> WorkerSession:
    return WorkerSession(
        "w", b"k", WorkerKind.SEEKER, frozenset(), frozenset(), 1, "", "s", 0.0, 0.0,
        batched_acks=True,
    )  # fmt: skip


async def test_more_acks_than_a_message_holds_go_in_several() -> None:
    s = _batched_session()
    s.active["job_busy"] = 1  # a busy worker: acks wait for a message to ride on
    for n in range(MAX_ACKS_PER_MESSAGE + 6):
        s.ack(ResultAck(f"job_{n}", 1, True))
    assert isinstance(await s.next_outbound(), AcksDue)  # full: due at once
    assert len(s.take_acks()) == MAX_ACKS_PER_MESSAGE
    assert isinstance(await s.next_outbound(), AcksDue)  # the rest in the next, at once
    rest = range(MAX_ACKS_PER_MESSAGE, MAX_ACKS_PER_MESSAGE + 6)
    assert [a.job_id for a in s.take_acks()] == [f"job_{n}" for n in rest]
    assert s.outbox.empty() and s._acks_due is None


async def test_an_ack_is_due_at_once_only_when_the_worker_runs_nothing_else() -> None:
    idle = _batched_session()
    idle.ack(ResultAck("job_1", 1, True))
    assert isinstance(idle.outbox.get_nowait(), AcksDue) and idle._acks_due is None
    busy = _batched_session()
    busy.active["job_busy"] = 1
    busy.ack(ResultAck("job_1", 1, True))
    assert busy.outbox.empty() and busy._acks_due is not None  # waits ACK_DELAY_SECONDS
    busy.take_acks()  # a message took it: the timer goes with it
    assert busy._acks_due is None


async def test_a_result_resent_after_its_ack_was_lost_is_acknowledged(cluster: Cluster) -> None:
    w = await cluster.worker()
    c = cluster.client()
    first, second = [await c.run(task_spec("echo", f"{n}".encode())) for n in (1, 2)]
    jobs = cluster.coord.jobs
    stored = await cluster.coord.store.get_job(first.job_id)
    assert stored is not None and stored.receipt is not None and stored.result is not None

    async def resend(body: bytes) -> tuple[bool, str]:
        assert stored is not None and stored.receipt is not None and stored.result is not None
        return await jobs.complete(
            first.job_id, first.attempts, w.key.public_hex, w.key.public_key,
            stored.result, body, stored.receipt.worker_signature,
        )  # fmt: skip

    # what a worker resends on reconnecting when the ack did not reach it: recorded
    assert await resend(stored.receipt.body) == (True, "")
    # anything else for the finished job is stale
    ok, reason = await resend(second.receipt.body)
    assert not ok and reason.startswith("stale")
    again = await c.get(first.job_id)
    assert again.receipt.body == stored.receipt.body and again.state == first.state


async def test_jobs_larger_than_the_fixed_http2_window_cross_it_both_ways(
    cluster: Cluster, profile: Profile
) -> None:
    """Worker connections use a fixed 1 MiB flow-control window (no BDP probing): offers
    and results bigger than it, several at once on one connection, still arrive whole."""
    await cluster.worker(max_concurrency=3)
    c = cluster.client()
    inputs = [bytes([65 + i]) * profile.limits.max_task_input_bytes for i in range(3)]
    assert len(inputs[0]) >= HTTP2_WINDOW_BYTES
    quotes = [await c.quote(task_spec("echo", data)) for data in inputs]
    jobs = [(await c.commit(q.quote_id)).job_id for q in quotes]
    done = await asyncio.gather(*(c.wait(job_id) for job_id in jobs))
    for data, final in zip(inputs, done, strict=True):
        assert final.state == coordinator_pb2.JOB_STATE_COMPLETED, final.failure
        assert final.result.output == data


async def test_a_backlog_toward_the_worker_holds_its_next_message_back() -> None:
    s = _batched_session()
    s.active["job_busy"] = 1
    for n in range(OUTBOX_HIGH - 1):
        s.send(ResultAck(f"job_{n}", 1, False, "stale"))
    await s.room()  # below the mark: at once
    s.ack(ResultAck("job_a", 1, True))  # an ack waiting to ride counts too
    assert s.backlog == OUTBOX_HIGH
    waiting = asyncio.ensure_future(s.room())
    await asyncio.sleep(0)  # it starts waiting
    for _ in range(OUTBOX_HIGH - OUTBOX_LOW - 1):  # the worker reads, down to just above
        await s.next_outbound()
        await asyncio.sleep(0)  # a turn of the loop for the waiting read
        assert not waiting.done()
    await s.next_outbound()  # down to OUTBOX_LOW: the next message is read
    await asyncio.wait_for(waiting, 5)
    for n in range(OUTBOX_HIGH):
        s.send(ResultAck(f"job_{n}", 1, False, "stale"))
    closed = asyncio.ensure_future(s.room())
    s.end()  # a session closed meanwhile (evicted) waits no more
    await asyncio.wait_for(closed, 5)
