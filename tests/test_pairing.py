"""Client-worker pairing over gRPC, and PRIVATE jobs that only paired workers may run."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Cluster, make_profile, rpc_code

from dispatch.v1 import coordinator_pb2, trust_pb2, trust_pb2_grpc
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.pairing import PairingService
from dispatchnet.coordinator.ratelimit import FailureLimiter
from dispatchnet.errors import NotFound, ResourceExhausted
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import PairingConfig

CODE_FORMAT = re.compile(r"[ABCDEFGHJKMNPQRSTVWXYZ0-9]{4}-[ABCDEFGHJKMNPQRSTVWXYZ0-9]{4}")
COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED


async def _code(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return rpc_code(e.value), e.value.details() or ""


async def _pair(cluster: Cluster, client: CoordinatorClient, worker_key: KeyPair) -> str:
    """Pairs worker_key with client the way their owners would; the pairing id."""
    code = (await client.create_pairing_code()).code
    return (await cluster.client(worker_key).claim_pairing(code)).pairing_id


# --- codes -------------------------------------------------------------------------------


async def test_code_format_and_default_lifetime(cluster: Cluster) -> None:
    resp = await cluster.client().create_pairing_code()
    assert CODE_FORMAT.fullmatch(resp.code), resp.code
    assert resp.expires_at.seconds == pytest.approx(time.time() + 3600, abs=5)


async def test_custom_and_out_of_range_lifetimes(cluster: Cluster) -> None:
    c = cluster.client()
    resp = await c.create_pairing_code(ttl_seconds=120)
    assert resp.expires_at.seconds == pytest.approx(time.time() + 120, abs=5)
    assert (await c.create_pairing_code(ttl_seconds=86400)).code
    code, msg = await _code(c.create_pairing_code(ttl_seconds=86401))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "86400" in msg


async def test_a_worker_claims_a_code_once(cluster: Cluster) -> None:
    client, worker_key = cluster.client(), KeyPair.generate()
    worker = cluster.client(worker_key)
    code = (await client.create_pairing_code()).code
    pairing = await worker.claim_pairing(code)
    assert pairing.pairing_id
    assert pairing.client_id == client.key.public_hex
    assert pairing.worker_id == worker_key.public_hex
    assert pairing.created_at.seconds == pytest.approx(time.time(), abs=5)
    assert not pairing.HasField("revoked_at")
    assert (await _code(worker.claim_pairing(code)))[0] == grpc.StatusCode.NOT_FOUND
    other = cluster.client()
    assert (await _code(other.claim_pairing(code)))[0] == grpc.StatusCode.NOT_FOUND


async def test_codes_ignore_case_dashes_and_spaces(cluster: Cluster) -> None:
    client, worker = cluster.client(), cluster.client()
    code = (await client.create_pairing_code()).code
    typed = " " + code.lower().replace("-", " ") + " "
    assert (await worker.claim_pairing(typed)).worker_id == worker.key.public_hex


@pytest.mark.parametrize("bad", ["", "ABC-DEF", "ABCD-EFGH-J", "ILOU-ILOU", "ABCD_EFGH"])
async def test_malformed_codes_are_invalid_argument(cluster: Cluster, bad: str) -> None:
    code, msg = await _code(cluster.client().claim_pairing(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "XXXX-XXXX" in msg


async def test_unknown_code_is_not_found(cluster: Cluster) -> None:
    assert (await _code(cluster.client().claim_pairing("AAAA-AAAA")))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


async def test_an_expired_code_is_not_found(cluster: Cluster) -> None:
    client, worker = cluster.client(), cluster.client()
    # The coordinator's PairingService is not reachable from the Coordinator object; a
    # second service on the same store, its clock two hours behind, writes a code that has
    # already expired by the time the real service sees it.
    behind = PairingService(cluster.coord.store, PairingConfig(), clock=lambda: time.time() - 7200)
    code, expires = await behind.create_code(client.key.public_hex, 3600)
    assert expires < time.time()
    assert (await _code(worker.claim_pairing(code)))[0] == grpc.StatusCode.NOT_FOUND
    # the same path with a live code works, so NOT_FOUND above was the expiry
    live, _ = await PairingService(cluster.coord.store, PairingConfig()).create_code(
        client.key.public_hex, 3600
    )
    assert (await worker.claim_pairing(live)).client_id == client.key.public_hex


async def test_a_key_cannot_pair_with_itself(cluster: Cluster) -> None:
    c = cluster.client()
    code = (await c.create_pairing_code()).code
    status, msg = await _code(c.claim_pairing(code))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "itself" in msg
    assert await c.list_pairings(include_revoked=True) == []
    # the mistake does not use up the code: the intended worker can still claim it
    worker = cluster.client()
    assert (await worker.claim_pairing(code)).client_id == c.key.public_hex


async def test_codes_are_stored_only_as_hashes(cluster: Cluster) -> None:
    code = (await cluster.client().create_pairing_code()).code
    rows = [tuple(r) for r in cluster.db.db.execute("SELECT * FROM pairing_codes")]
    assert len(rows) == 1
    plain = {code, code.replace("-", "")}
    for value in rows[0]:
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        assert not any(p in text for p in plain), rows[0]
    # nor anywhere in the database files (main file and write-ahead log)
    for f in Path(cluster.db.path), Path(cluster.db.path + "-wal"):
        data = f.read_bytes()
        assert not any(p.encode() in data for p in plain), f


async def test_failed_claims_lock_the_key_out_even_with_the_right_code(cluster: Cluster) -> None:
    client, guesser, other = cluster.client(), cluster.client(), cluster.client()
    code = (await client.create_pairing_code()).code
    wrong = "AAAA-AAAA" if code != "AAAA-AAAA" else "BBBB-BBBB"
    for _ in range(5):  # [pairing] max_failed_claims
        assert (await _code(guesser.claim_pairing(wrong)))[0] == grpc.StatusCode.NOT_FOUND
    status, msg = await _code(guesser.claim_pairing(code))
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"too many failed pairing claims; try again in \d+ s", msg), msg
    s = int(msg.split()[-2])
    assert 590 <= s <= 600
    # the lockout is the guessing key's: another key claims the code it did not use
    assert (await other.claim_pairing(code)).client_id == client.key.public_hex


def _service(cluster: Cluster, now: list[float], **cfg: Any) -> PairingService:
    return PairingService(cluster.coord.store, PairingConfig(**cfg), clock=lambda: now[0])


async def test_failed_claims_are_limited_for_all_keys_together(cluster: Cluster) -> None:
    now = [time.time()]
    svc = _service(cluster, now, max_failed_claims_global=3)
    code, _ = await svc.create_code("c" * 64, 3600)
    for i in range(3):  # three keys, one wrong guess each
        with pytest.raises(NotFound):
            await svc.claim(f"w{i}", "AAAA-AAAA" if code != "AAAA-AAAA" else "BBBB-BBBB")
    with pytest.raises(ResourceExhausted, match="try again in 60 s"):
        await svc.claim("fresh-key", code)  # a new key with the right code: locked out too
    now[0] += 60  # failed_claims_global_window_seconds
    assert (await svc.claim("fresh-key", code)).client_id == "c" * 64


async def test_a_key_lockout_ends_with_its_window(cluster: Cluster) -> None:
    now = [time.time()]
    svc = _service(cluster, now, max_failed_claims=2, failed_claims_window_seconds=100)
    code, _ = await svc.create_code("c" * 64, 3600)
    for _ in range(2):
        with pytest.raises(NotFound):
            await svc.claim("w", "AAAA-AAAA" if code != "AAAA-AAAA" else "BBBB-BBBB")
    now[0] += 40
    with pytest.raises(ResourceExhausted, match="try again in 60 s"):
        await svc.claim("w", code)
    now[0] += 60
    assert (await svc.claim("w", code)).worker_id == "w"


def test_the_failure_table_is_bounded() -> None:
    limiter = FailureLimiter(2, 600, 10**9, 60, max_keys=100)
    for i in range(1000):
        limiter.failed(f"key{i}", 1000.0 + i)
        limiter.failed(f"key{i}", 1000.0 + i)
    assert len(limiter) == 100
    # the most recent keys are the ones remembered
    assert limiter.retry_after("key999", 2000.0) > 0
    assert limiter.retry_after("key0", 2000.0) == 0


# --- listing and revoking ----------------------------------------------------------------


async def test_both_sides_list_the_pairing_and_strangers_see_none(cluster: Cluster) -> None:
    client, worker_key = cluster.client(), KeyPair.generate()
    pairing_id = await _pair(cluster, client, worker_key)
    worker, stranger = cluster.client(worker_key), cluster.client()
    assert [p.pairing_id for p in await client.list_pairings()] == [pairing_id]
    assert [p.pairing_id for p in await worker.list_pairings()] == [pairing_id]
    assert await stranger.list_pairings() == []
    assert await stranger.list_pairings(include_revoked=True) == []


async def test_a_second_code_for_the_same_pair_keeps_one_pairing(cluster: Cluster) -> None:
    client, worker_key = cluster.client(), KeyPair.generate()
    first = await _pair(cluster, client, worker_key)
    second = await _pair(cluster, client, worker_key)
    assert second == first
    assert len(await client.list_pairings(include_revoked=True)) == 1


async def test_revoke_rules(cluster: Cluster) -> None:
    client, worker_key = cluster.client(), KeyPair.generate()
    pairing_id = await _pair(cluster, client, worker_key)
    worker, stranger = cluster.client(worker_key), cluster.client()

    status, _ = await _code(stranger.revoke_pairing(pairing_id))
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert len(await client.list_pairings()) == 1

    revoked = await worker.revoke_pairing(pairing_id)
    assert revoked.pairing_id == pairing_id
    assert revoked.HasField("revoked_at")
    assert revoked.revoked_at.seconds == pytest.approx(time.time(), abs=5)
    assert await client.list_pairings() == []
    assert await worker.list_pairings() == []
    listed = await client.list_pairings(include_revoked=True)
    assert [p.pairing_id for p in listed] == [pairing_id]
    assert listed[0].revoked_at == revoked.revoked_at

    assert (await _code(client.revoke_pairing("pair_nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert (await _code(client.revoke_pairing("")))[0] == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "profile", [make_profile(pairing={"max_live_codes": 2, "max_pairings": 2})]
)
async def test_codes_and_pairings_per_key_are_bounded(cluster: Cluster) -> None:
    """One key cannot grow the database without bound: its live codes and the pairings
    it keeps are limited ([pairing] max_live_codes, max_pairings); a revoked pairing makes
    room, the oldest revoked being forgotten."""
    client = cluster.client()
    codes = [(await client.create_pairing_code()).code for _ in range(2)]
    code, msg = await _code(client.create_pairing_code())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_live_codes" in msg, msg
    workers = [cluster.client(KeyPair.generate()) for _ in range(3)]
    first = await workers[0].claim_pairing(codes[0])  # a claimed code no longer counts
    await workers[1].claim_pairing(codes[1])
    code, msg = await _code(workers[2].claim_pairing((await client.create_pairing_code()).code))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "client has 2 active" in msg, msg
    await client.revoke_pairing(first.pairing_id)
    await workers[2].claim_pairing((await client.create_pairing_code()).code)
    listed = await client.list_pairings(include_revoked=True)
    assert len(listed) == 2 and first.pairing_id not in {p.pairing_id for p in listed}


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CreatePairingCode", trust_pb2.CreatePairingCodeRequest()),
        ("ClaimPairing", trust_pb2.ClaimPairingRequest(code="AAAA-AAAA")),
        ("ListPairings", trust_pb2.ListPairingsRequest()),
        ("RevokePairing", trust_pb2.RevokePairingRequest(pairing_id="pair_x")),
    ],
)
async def test_pairing_needs_authentication(cluster: Cluster, method: str, request_: Any) -> None:
    stub = trust_pb2_grpc.TrustServiceStub(cluster.client().channel)
    code, msg = await _code(getattr(stub, method)(request_))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in msg


# --- PRIVATE jobs ------------------------------------------------------------------------


async def test_private_job_without_pairing_is_refused(cluster: Cluster) -> None:
    await cluster.worker()
    code, msg = await _code(cluster.client().submit(task_spec("echo", b"1", private=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "pair" in msg


async def test_private_jobs_run_only_on_the_paired_worker(cluster: Cluster) -> None:
    client = cluster.client()
    paired_key = KeyPair.generate()
    pairing_id = await _pair(cluster, client, paired_key)
    paired = await cluster.worker(max_concurrency=2, key=paired_key)
    other = await cluster.worker(max_concurrency=2)
    both = {paired.key.public_hex, other.key.public_hex}

    # more jobs than the paired worker has slots, so some wait while `other` is free
    private = [await client.submit(task_spec("sha256", b"%d" % i, private=True)) for i in range(10)]
    done = [await client.wait(j.job_id) for j in private]
    assert [d.state for d in done] == [COMPLETED] * 10
    assert {d.worker_id for d in done} == {paired.key.public_hex}

    public = [await client.submit(task_spec("sha256", b"%d" % i)) for i in range(20)]
    done = [await client.wait(j.job_id) for j in public]
    assert [d.state for d in done] == [COMPLETED] * 20
    # both workers were eligible, so the one above was chosen because of the pairing
    assert {d.worker_id for d in done} == both

    await client.revoke_pairing(pairing_id)
    code, _ = await _code(client.submit(task_spec("echo", b"1", private=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_private_job_waits_for_its_offline_paired_worker(cluster: Cluster) -> None:
    client = cluster.client()
    paired_key = KeyPair.generate()
    await _pair(cluster, client, paired_key)
    await cluster.worker()  # online, idle, but not paired
    job = await client.submit(task_spec("echo", b'"private"', private=True))
    assert await cluster.coord.hub.dispatch_once() == 0
    assert (await client.get(job.job_id)).state == coordinator_pb2.JOB_STATE_QUEUED

    await cluster.worker(key=paired_key)
    done = await client.wait(job.job_id)
    assert done.state == COMPLETED
    assert done.worker_id == paired_key.public_hex
    assert done.result.output == b'"private"'
