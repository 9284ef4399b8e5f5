"""End-to-end encrypted PRIVATE jobs: real coordinator and workers on port 0.

The client seals the input to its paired workers, the worker seals the output to the
client, and the coordinator's database, WAL and logs hold no plaintext of either."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Cluster, rpc_code

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, worker_pb2
from dispatchnet.client import CoordinatorClient, llm_spec, task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.receipts.core import sha256
from dispatchnet.sealing import (
    SEALED_CONTENT_TYPE,
    SealError,
    open_input,
    private_hash,
    seal_spec,
)
from dispatchnet.worker.executors import default_executors
from dispatchnet.worker.llm import DEFAULT_MODEL_NAME, EmbeddedLlama, LlmExecutor
from dispatchnet.worker.runtime import Worker

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED


async def _pair(cluster: Cluster, client: CoordinatorClient, worker_key: KeyPair) -> None:
    code = (await client.create_pairing_code()).code
    await cluster.client(worker_key).claim_pairing(code)


async def _status(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return rpc_code(e.value), e.value.details() or ""


def _database_bytes(cluster: Cluster) -> tuple[bytes, list[str]]:
    """Every byte of the coordinator's SQLite files (database, WAL, shared memory), and
    their names."""
    path = Path(cluster.coord.store.path)
    files = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))
    return b"".join(p.read_bytes() for p in files), [p.name for p in files]


def _records(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records
    )  # messages and their extra fields


async def test_sealed_task_leaves_no_plaintext_and_its_receipt_checks_both_hashes(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    await cluster.worker(key=key)
    marker = f"secret{secrets.token_hex(8)}"
    text = f"The code word is {marker}. Nobody else may read it."
    spec = await client.seal(
        task_spec("summarize", json.dumps({"text": text}).encode(), private=True)
    )
    assert not spec.task.input and len(spec.sealed.envelopes) == 1
    quote = await client.quote(spec)
    assert quote.price.amount_micros > 0  # priced like any task
    job = await client.wait((await client.commit(quote.quote_id)).job_id)
    assert job.state == COMPLETED, job.failure
    assert job.result.content_type == SEALED_CONTENT_TYPE
    opened = client.open_result(job)
    assert marker in opened.output.decode()
    assert opened.worker_public_key == key.public_key

    # the receipt: ciphertext hashes (what the coordinator saw), keyed plaintext hashes
    body = receipt_pb2.ReceiptBody.FromString(job.receipt.body)
    assert body.input_sha256 == quote.spec_sha256
    assert body.output_sha256 == sha256(job.result.output)
    mine = open_input(job.spec, client.key, key.public_key, recipient=key.public_key)
    assert body.private_input_sha256 == mine.input_hash
    assert body.private_output_sha256 == private_hash(mine.secret, opened.output)
    verified = await client.receipts.VerifyReceipt(
        receipt_pb2.VerifyReceiptRequest(receipt=job.receipt)
    )
    assert verified.valid, verified.problems

    running, names = _database_bytes(cluster)  # the WAL holds the latest writes now
    assert any(n.endswith("-wal") for n in names), names
    await cluster.coord.stop(grace=0.2)  # checkpointed into the database file
    stopped, _ = _database_bytes(cluster)
    for stored in (running, stopped, _records(caplog).encode()):
        for plain in (marker.encode(), text.encode(), opened.output):
            assert plain not in stored
    # the ciphertext is there: this is not an empty database
    assert job.result.output[:32] in stopped and job.spec.sealed.envelopes[0].box in stopped


async def test_two_paired_workers_each_get_an_envelope_and_strangers_get_nothing(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    keys = [KeyPair.generate(), KeyPair.generate()]
    for k in keys:
        await _pair(cluster, client, k)
    offered: dict[str, list[str]] = {}

    def record(worker_id: str) -> Any:
        def offer_filter(offer: worker_pb2.JobOffer) -> str:
            offered.setdefault(worker_id, []).append(offer.job_id)
            return ""

        return offer_filter

    paired_only = KeyPair.generate()  # paired, but the jobs are not sealed to it
    await _pair(cluster, client, paired_only)
    workers: list[Worker] = []
    for k in [*keys, paired_only, KeyPair.generate()]:
        w = await cluster.worker(key=k, max_concurrency=1)
        w.offer_filter = record(k.public_hex)
        workers.append(w)
    # sealed to the first two only: one envelope each, both open theirs
    jobs = []
    for i in range(6):
        spec = await client.seal(
            task_spec("sha256", b"private %d" % i, private=True), [k.public_key for k in keys]
        )
        assert {e.worker_public_key for e in spec.sealed.envelopes} == {k.public_key for k in keys}
        for k in keys:
            assert open_input(spec, k, client.key.public_key).spec.task.input == b"private %d" % i
        jobs.append(await client.submit(spec))
    done = [await client.wait(j.job_id) for j in jobs]
    assert all(d.state == COMPLETED for d in done), [d.failure for d in done]
    assert {d.worker_id for d in done} <= {k.public_hex for k in keys}
    assert set(offered) <= {k.public_hex for k in keys}, offered  # nobody else was offered
    for d, i in zip(done, range(6), strict=True):
        out = client.open_result(d)
        assert out.output.decode() == sha256(b"private %d" % i).hex()


async def test_a_tampered_input_fails_the_job_cleanly(cluster: Cluster) -> None:
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    worker = await cluster.worker(key=key)
    spec = await client.seal(task_spec("echo", b'"x"', private=True))
    box = bytearray(spec.sealed.envelopes[0].box)
    box[-1] ^= 1
    spec.sealed.envelopes[0].box = bytes(box)
    job = await client.wait((await client.submit(spec)).job_id)
    assert job.state == FAILED
    assert job.failure.code == "bad_input"
    assert "does not decrypt" in job.failure.message
    assert worker.rejected == 0  # taken, opened, refused: not retried elsewhere


async def test_a_tampered_output_or_receipt_is_refused_by_the_client(cluster: Cluster) -> None:
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    await cluster.worker(key=key)
    spec = await client.seal(task_spec("echo", b'"x"', private=True))
    job = await client.wait((await client.submit(spec)).job_id)
    assert client.open_result(job).output == b'"x"'
    bad = coordinator_pb2.Job()
    bad.CopyFrom(job)
    out = bytearray(bad.result.output)
    out[-1] ^= 1
    bad.result.output = bytes(out)
    with pytest.raises(SealError, match="output_sha256"):
        client.open_result(bad)
    # another client (not the job's) cannot open it
    with pytest.raises(SealError, match="does not decrypt"):
        cluster.client().open_result(job)
    bad.CopyFrom(job)
    bad.receipt.coordinator_signature = bytes(64)
    with pytest.raises(SealError, match="coordinator signature"):
        client.open_result(bad)


async def test_sealed_specs_are_checked_at_the_edge(cluster: Cluster) -> None:
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    sealed = seal_spec(task_spec("echo", b'"x"', private=True), client.key, [key.public_key])
    public = common_pb2.JobSpec()
    public.CopyFrom(sealed)
    public.privacy = common_pb2.PRIVACY_PUBLIC
    code, msg = await _status(client.quote(public))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "PRIVACY_PRIVATE" in msg
    leaky = common_pb2.JobSpec()
    leaky.CopyFrom(sealed)
    leaky.task.input = b'"x"'
    code, msg = await _status(client.quote(leaky))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "envelopes only" in msg
    short = common_pb2.JobSpec()
    short.CopyFrom(sealed)
    short.sealed.envelopes[0].worker_public_key = b"123"
    code, msg = await _status(client.quote(short))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "32 bytes" in msg
    # verify > 1 stays in clear, so a PRIVATE job asking for it is refused, not run once
    twice = task_spec("echo", b'"x"', private=True)
    twice.verify = 2
    code, msg = await _status(client.quote(seal_spec(twice, client.key, [key.public_key])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "for PUBLIC jobs" in msg
    # sealed to a worker the client is not paired with: refused at commit
    stranger = seal_spec(
        task_spec("echo", b'"x"', private=True), client.key, [KeyPair.generate().public_key]
    )
    code, msg = await _status(client.submit(stranger))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sealed to" in msg
    # a client with no pairing cannot seal at all
    with pytest.raises(SealError, match="pair one first"):
        await cluster.client().seal(task_spec("echo", b'"x"', private=True))


async def test_a_worker_refuses_an_input_not_sealed_by_the_jobs_client(cluster: Cluster) -> None:
    """A coordinator that swaps in an envelope made by another key (its own, say) gets a
    clean failure, not a run: the box opens only with the job's client key."""
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    await cluster.worker(key=key)
    spec = task_spec("echo", b'"x"', private=True)
    forged = seal_spec(spec, KeyPair.generate(), [key.public_key])
    job = await client.wait((await client.submit(forged)).job_id)
    assert job.state == FAILED and job.failure.code == "bad_input"


async def test_cli_private_job_is_sealed_and_opened(cluster: Cluster, tmp_path: Path) -> None:
    from test_cli import cli_env, ok_json, run

    home = tmp_path / "home"
    env = cli_env(home)
    key = KeyPair.generate()
    created = ok_json(await run("pair", "create", "--coordinator", cluster.address, env=env))
    await cluster.client(key).claim_pairing(created["code"])
    await cluster.worker(key=key)
    marker = f"cli-{secrets.token_hex(6)}"
    job = ok_json(
        await run(
            "job", "submit", "--coordinator", cluster.address, "--task", "echo",
            "--input", f'"{marker}"', "--private", "--wait", "--no-pay", env=env,
        )
    )  # fmt: skip
    assert job["state"] == "JOB_STATE_COMPLETED"
    assert job["output_decoded"] == marker
    assert job["spec"]["sealed"]["envelopes"] and "input" not in job["spec"]["task"]
    got = ok_json(await run("job", "get", job["job_id"], "--coordinator", cluster.address, env=env))
    assert got["output_decoded"] == marker and got["private"]["content_type"]


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedLlama]:
    """The shipped model, loaded once for the module."""
    backend = EmbeddedLlama(n_ctx=512)
    yield backend
    backend.close()


async def test_sealed_llm_job_streams_nothing_and_leaves_no_plaintext(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, embedded: EmbeddedLlama
) -> None:
    caplog.set_level(logging.DEBUG)
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    await cluster.worker(
        "desktop",
        key=key,
        executors=[*default_executors(), LlmExecutor(embedded, DEFAULT_MODEL_NAME)],
    )
    marker = f"Zorblax{secrets.token_hex(4)}"
    prompt = f"Repeat the word {marker} three times."
    spec = await client.seal(llm_spec(prompt, max_tokens=24, private=True))
    assert not spec.llm.prompt and spec.llm.max_tokens == 24  # sizes stay in clear
    job_id = (await client.submit(spec)).job_id
    events = []
    async for item in client.watch(job_id):
        events.append(item.event)
        if item.HasField("job"):
            job = item.job
    assert job.state == COMPLETED, job.failure
    assert not any(e.progress.text for e in events if e.HasField("progress"))
    opened = client.open_result(job)
    assert opened.output and opened.content_type.startswith("text/")
    assert job.result.usage.completion_tokens > 0  # accounting stays in clear
    running, _ = _database_bytes(cluster)
    await cluster.coord.stop(grace=0.2)
    stopped, _ = _database_bytes(cluster)
    # (an output too short to be told from chance bytes is not looked for)
    plains = [marker.encode(), prompt.encode()] + [opened.output] * (len(opened.output) >= 12)
    for stored in (running, stopped, _records(caplog).encode()):
        for plain in plains:
            assert plain not in stored


async def test_the_sdk_seals_private_jobs_by_default(cluster: Cluster) -> None:
    from dispatchnet.sdk import ComputeRouter, Network

    key = KeyPair.generate()
    router = ComputeRouter([Network("local", [cluster.address])], hosted=[], key=key)
    try:
        client = cluster.client(key)
        worker_key = KeyPair.generate()
        await _pair(cluster, client, worker_key)
        await cluster.worker(key=worker_key)
        await cluster.worker()  # public, idle: never offered the job
        marker = f"sdk{secrets.token_hex(6)}"
        result = await router.run_task("echo", marker, privacy="private")
        assert marker in result.output and result.route == "dispatch"
        assert result.worker is not None and result.worker.worker_id == worker_key.public_hex
        job = await client.get(result.job_id)
        assert job.spec.HasField("sealed") and job.result.content_type == SEALED_CONTENT_TYPE
        assert marker.encode() not in _database_bytes(cluster)[0]
    finally:
        await router.close()


class _ClearWorker(Worker):
    """A worker that opens a sealed job but answers in clear, without the private hashes."""

    def _completion(
        self, offer: Any, coordinator_key: bytes, started: Any, out: Any, opened: Any = None
    ) -> Any:
        return super()._completion(offer, coordinator_key, started, out, None)


async def test_a_sealed_jobs_result_in_clear_is_refused(cluster: Cluster) -> None:
    client, key = cluster.client(), KeyPair.generate()
    await _pair(cluster, client, key)
    w = _ClearWorker(cluster.address, key, kind="seeker", backoff_initial=0.05)
    cluster.workers.append((w, asyncio.create_task(w.run())))
    await asyncio.wait_for(w.connected.wait(), 10)
    spec = await client.seal(task_spec("echo", b'"in clear"', private=True))
    job = await client.wait((await client.submit(spec)).job_id)
    assert job.state == FAILED and job.failure.code == "max_attempts_exceeded"
    assert not job.HasField("result")
    events = [i.event async for i in client.watch(job.job_id)]
    reasons = " ".join(e.state_change.reason for e in events)
    assert "private_input_sha256 must be 32 bytes" in reasons, reasons
