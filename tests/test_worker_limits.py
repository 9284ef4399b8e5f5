"""What a worker sends is bounded, and only jobs it was offered count as its load."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from conftest import HELLO, Cluster, RawWorker, wait_until

from dispatch.v1 import common_pb2, coordinator_pb2, worker_pb2
from dispatchnet import protocol
from dispatchnet.client import task_spec

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def hello(raw: RawWorker, **kw: Any) -> worker_pb2.Hello:
    caps = worker_pb2.Capabilities(
        tasks=kw.pop("tasks", ["echo"]),
        llm_models=kw.pop("llm_models", []),
        max_concurrency=kw.pop("max_concurrency", 1),
    )
    return worker_pb2.Hello(
        public_key=raw.key.public_key,
        kind=kw.pop("kind", common_pb2.WORKER_KIND_DESKTOP),
        capabilities=caps,
        **kw,
    )


async def handshake(raw: RawWorker, msg: worker_pb2.Hello) -> worker_pb2.Welcome:
    raw.send(hello=msg)
    ch = (await raw.recv()).challenge
    raw.send(
        challenge_response=worker_pb2.ChallengeResponse(
            signature=raw.key.sign(HELLO, ch.nonce + ch.coordinator_public_key)
        )
    )
    return (await raw.recv()).welcome


def running(n: int, width: int = 0) -> list[worker_pb2.RunningJob]:
    return [worker_pb2.RunningJob(job_id=f"j{i}".ljust(width, "x"), attempt=1) for i in range(n)]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        # one dispatch query used to bind every free worker's task names: ~260,000 names
        # made every pass fail with "too many SQL variables"
        (
            {"tasks": [f"t{i}" for i in range(260_000)]},
            "hello.capabilities.tasks has 260000 entries; the limit is 256",
        ),
        ({"llm_models": [f"m{i}" for i in range(65)]}, "hello.capabilities.llm_models has 65"),
        # one store lookup per entry on the event loop
        ({"running": running(100_000)}, "hello.running has 100000 entries; the limit is 128"),
        ({"running": running(1, width=65)}, "hello.running entry is 65 characters"),
        ({"version": "v" * 129}, "hello.version is 129 characters; the limit is 128"),
        ({"agent_id": "1" * 79}, "hello.agent_id is 79 characters"),
    ],
    ids=["tasks", "models", "running", "running-id", "version", "agent-id"],
)
async def test_hello_beyond_a_limit_is_invalid_argument(
    channel: grpc.aio.Channel, kw: dict[str, Any], needle: str
) -> None:
    raw = RawWorker(channel)
    raw.send(hello=hello(raw, **kw))
    assert await raw.status() == INVALID
    assert needle in (await raw.call.details() or "")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (
            {"heartbeat": worker_pb2.Heartbeat(running_job_ids=[f"j{i}" for i in range(129)])},
            "heartbeat.running_job_ids has 129 entries; the limit is 128",
        ),
        (
            {"offer_response": worker_pb2.OfferResponse(job_id="job_x", reason="r" * 257)},
            "offer_response.reason is 257 characters; the limit is 256",
        ),
        (
            {"offer_response": worker_pb2.OfferResponse(job_id="j" * 65)},
            "offer_response.job_id is 65 characters",
        ),
        (
            {"progress": worker_pb2.JobProgress(job_id="job_x", text="x" * 16385)},
            "progress.text is 16385 characters; the limit is 16384",
        ),
        (
            {"progress": worker_pb2.JobProgress(job_id="job_x", fraction=float("nan"))},
            "progress.fraction is nan; it must be in [0, 1]",
        ),
        (
            {"progress": worker_pb2.JobProgress(job_id="job_x", fraction=7.0)},
            "progress.fraction is 7.0; it must be in [0, 1]",
        ),
        (
            {
                "failed": worker_pb2.JobFailed(
                    job_id="job_x", failure=common_pb2.JobFailure(code="c", message="m" * 2049)
                )
            },
            "failed.failure.message is 2049 characters",
        ),
        (
            {"failed": worker_pb2.JobFailed(failure=common_pb2.JobFailure(code="c" * 65))},
            "failed.failure.code is 65 characters",
        ),
        (
            {"completed": worker_pb2.JobCompleted(job_id="job_x", receipt_body=b"x" * 16385)},
            "completed.receipt_body is 16385 bytes",
        ),
        ({"drain": worker_pb2.Drain(reason="d" * 257)}, "drain.reason is 257 characters"),
    ],
    ids=[
        "heartbeat",
        "reject-reason",
        "job-id",
        "progress",
        "progress-fraction-nan",
        "progress-fraction-above-1",
        "failure-message",
        "failure-code",
        "receipt",
        "drain",
    ],
)
async def test_a_message_beyond_a_limit_ends_the_stream_with_invalid_argument(
    cluster: Cluster, channel: grpc.aio.Channel, kw: dict[str, Any], needle: str
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    raw.send(**kw)
    assert await raw.status() == INVALID
    assert needle in (await raw.call.details() or "")
    await wait_until(lambda: not cluster.coord.hub.sessions, what="session gone")


async def _barrier(raw: RawWorker) -> None:
    """Returns once the coordinator has handled everything raw sent before (a stale
    result is acknowledged in order)."""
    raw.send(completed=worker_pb2.JobCompleted(job_id="job_barrier", attempt=1))
    assert not (await raw.recv()).result_ack.accepted


async def _load(cluster: Cluster, worker_id: str) -> int:
    workers = await cluster.client().list_workers()
    return next(w.active_jobs for w in workers if w.worker_id == worker_id)


@pytest.mark.parametrize("where", ["heartbeat", "hello"])
async def test_job_ids_a_worker_was_never_offered_do_not_count_as_load(
    cluster: Cluster, channel: grpc.aio.Channel, where: str
) -> None:
    # a worker that can run nothing anyone asks for, listing jobs it was never offered
    raw = RawWorker(channel)
    fake = running(protocol.MAX_RUNNING_JOBS)
    await handshake(raw, hello(raw, tasks=["nothing"], running=fake if where == "hello" else []))
    if where == "heartbeat":
        raw.send(heartbeat=worker_pb2.Heartbeat(running_job_ids=[r.job_id for r in fake]))
    await _barrier(raw)
    assert await _load(cluster, raw.key.public_hex) == 0
    # its load used to drive the total of free slots negative: nothing was dispatched
    good = await cluster.worker(max_concurrency=1)
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))

    async def done() -> bool:
        return (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED

    await wait_until(done, within=10, what="job completed on the other worker")
    assert (await c.get(job.job_id)).worker_id == good.key.public_hex
    raw.close()


async def test_made_up_ids_in_heartbeats_are_warned_about_once_a_session(
    cluster: Cluster, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    with caplog.at_level(logging.DEBUG, logger="dispatch.hub"):
        for n in range(20):  # new ids each time: each heartbeat lists some never offered
            raw.send(heartbeat=worker_pb2.Heartbeat(running_job_ids=[f"job_fake_{n}"]))
        await _barrier(raw)
    lines = [r for r in caplog.records if "never offered" in r.getMessage()]
    assert len(lines) == 20
    assert [r.levelno for r in lines].count(logging.WARNING) == 1
    raw.close()


async def test_a_job_the_worker_was_offered_and_lost_still_counts_as_its_load(
    cluster: Cluster, channel: grpc.aio.Channel
) -> None:
    raw = RawWorker(channel)
    await raw.handshake()
    c = cluster.client()
    job = await c.submit(task_spec("echo", b"1"))
    offer = (await raw.recv()).offer
    raw.send(offer_response=worker_pb2.OfferResponse(job_id=job.job_id, attempt=1, accept=True))
    cluster.coord.hub.sessions[raw.key.public_hex].close("test: connection lost")
    raw.close()
    # the job went back to the queue; the worker comes back still running it
    back = RawWorker(channel, raw.key)
    await handshake(back, hello(back, tasks=["sleep"], running=[]))
    back.send(heartbeat=worker_pb2.Heartbeat(running_job_ids=[offer.job_id, "job_never"]))
    await _barrier(back)
    assert await _load(cluster, back.key.public_hex) == 1
    back.close()


async def test_hello_running_costs_a_bounded_number_of_store_reads(
    cluster: Cluster, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cluster.coord.store
    calls: list[str] = []

    def counting(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **kw: Any) -> Any:
            calls.append(name)
            return f(*a, **kw)

        return wrapped

    for name in ("get_job", "held_attempt", "held_attempts", "active_jobs"):
        if hasattr(store, name):
            monkeypatch.setattr(store, name, counting(name, getattr(store, name)))
    raw = RawWorker(channel)
    await handshake(raw, hello(raw, running=running(protocol.MAX_RUNNING_JOBS)))
    assert len(calls) <= 2, calls
    raw.close()
