"""Pure unit tests: receipts and Merkle proofs, auth tokens, key files, matching, profiles,
ERC-8004 registration files."""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import json
import random
import stat
from pathlib import Path
from urllib.parse import quote

import pytest

from dispatch.v1 import common_pb2, receipt_pb2
from dispatchnet import keys
from dispatchnet.agent_identity import (
    REGISTRATION_TYPE,
    RegistrationFileError,
    check_registration_uri,
)
from dispatchnet.auth import tokens
from dispatchnet.auth.tokens import (
    MAX_CLOCK_SKEW,
    Caller,
    TokenCache,
    make_token,
    verify_header,
)
from dispatchnet.coordinator import matching
from dispatchnet.coordinator.models import (
    Event,
    EventKind,
    Job,
    JobSpec,
    JobState,
    JobType,
    Policy,
    Privacy,
    Result,
    WorkerKind,
    evolve,
)
from dispatchnet.coordinator.worker_index import WorkerIndex
from dispatchnet.errors import Unauthenticated
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import ProfileError, load_profile
from dispatchnet.receipts.core import (
    ExpectedReceipt,
    check_worker_receipt,
    merkle_proof,
    merkle_root,
    serialize_body,
    sha256,
    sign_body,
    verify_merkle_proof,
    verify_receipt,
)

# --- Merkle batching ---------------------------------------------------------------------


def _hashes(n: int) -> list[bytes]:
    return [sha256(b"receipt %d" % i) for i in range(n)]


def test_merkle_layout_is_the_documented_one() -> None:
    a, b, c = _hashes(3)
    leaf = [hashlib.sha256(b"\x00" + h).digest() for h in (a, b, c)]
    ab = hashlib.sha256(b"\x01" + leaf[0] + leaf[1]).digest()
    assert merkle_root([a]) == leaf[0]
    assert merkle_root([a, b, c]) == hashlib.sha256(b"\x01" + ab + leaf[2]).digest()
    assert merkle_proof([a, b, c], 2) == [ab]  # c is carried up a level, adding no sibling


@pytest.mark.parametrize("n", range(1, 18))
def test_merkle_proofs_verify_and_forgeries_do_not(n: int) -> None:
    hashes = _hashes(n)
    root = merkle_root(hashes)
    wrong_root = bytes([root[0] ^ 1]) + root[1:]
    stranger = sha256(b"not in the batch")
    for i, h in enumerate(hashes):
        proof = merkle_proof(hashes, i)
        assert verify_merkle_proof(h, i, n, proof, root), i
        assert not verify_merkle_proof(h, i, n, proof, wrong_root)
        assert not verify_merkle_proof(h, (i + 1) % n if n > 1 else 1, n, proof, root)
        assert not verify_merkle_proof(stranger, i, n, proof, root)
        if n > 1:
            assert not verify_merkle_proof(hashes[(i + 1) % n], i, n, proof, root)
            assert not verify_merkle_proof(h, i, n, proof[:-1], root)
        assert not verify_merkle_proof(h, i, n, [*proof, stranger], root)
    assert not verify_merkle_proof(hashes[0], -1, n, merkle_proof(hashes, 0), root)


def test_merkle_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        merkle_root([])
    with pytest.raises(ValueError, match="out of range"):
        merkle_proof(_hashes(3), 3)
    assert merkle_root(_hashes(4)) != merkle_root(_hashes(5))


# --- receipts ----------------------------------------------------------------------------

WORKER, COORD, OTHER = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()


def _body(**overrides: object) -> receipt_pb2.ReceiptBody:
    fields: dict[str, object] = {
        "version": 1,
        "job_id": "job_1",
        "job_type": common_pb2.JOB_TYPE_TASK,
        "input_sha256": sha256(b"input"),
        "output_sha256": sha256(b"output"),
        "worker_public_key": WORKER.public_key,
        "coordinator_public_key": COORD.public_key,
        "price": common_pb2.Money(currency="USD", amount_micros=1000),
        "payment": common_pb2.PaymentReference(status="none"),
        "attempt": 1,
        "client_id": "c" * 64,
        **overrides,
    }
    body = receipt_pb2.ReceiptBody(**fields)  # type: ignore[arg-type]
    body.started_at.FromSeconds(1000)
    body.completed_at.FromSeconds(1001)
    return body


EXPECTED = ExpectedReceipt(
    job_id="job_1",
    attempt=1,
    job_type=common_pb2.JOB_TYPE_TASK,
    input_sha256=sha256(b"input"),
    output_sha256=sha256(b"output"),
    worker_public_key=WORKER.public_key,
    coordinator_public_key=COORD.public_key,
    client_id="c" * 64,
    price_micros=1000,
    currency="USD",
    payment=common_pb2.PaymentReference(status="none"),
    offered_at=1000.0,
    now=1010.0,
    max_clock_skew_seconds=30,
)


def test_a_well_formed_receipt_verifies() -> None:
    body = serialize_body(_body())
    v = verify_receipt(
        body, sign_body(WORKER, body), sign_body(COORD, body), sha256(body), COORD.public_key
    )
    assert v.valid, v.problems
    assert v.body is not None and v.body.job_id == "job_1"


def test_every_flipped_body_byte_is_detected() -> None:
    body = serialize_body(_body())
    wsig, csig = sign_body(WORKER, body), sign_body(COORD, body)
    for i in range(len(body)):
        flipped = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        assert not verify_receipt(flipped, wsig, csig).valid, i


@pytest.mark.parametrize(
    ("signers", "receipt_hash", "expected_coord", "problem"),
    [
        ((OTHER, COORD), None, b"", "worker signature does not verify"),
        ((WORKER, OTHER), None, b"", "coordinator signature does not verify"),
        ((WORKER, COORD), b"\x00" * 32, b"", "receipt_sha256 does not match"),
        ((WORKER, COORD), None, OTHER.public_key, "different coordinator"),
    ],
)
def test_receipt_problems_are_named(
    signers: tuple[KeyPair, KeyPair],
    receipt_hash: bytes | None,
    expected_coord: bytes,
    problem: str,
) -> None:
    body = serialize_body(_body())
    v = verify_receipt(
        body,
        sign_body(signers[0], body),
        sign_body(signers[1], body),
        sha256(body) if receipt_hash is None else receipt_hash,
        expected_coord,
    )
    assert len(v.problems) == 1 and problem in v.problems[0], v.problems


def test_garbage_is_not_a_receipt() -> None:
    v = verify_receipt(b"\xff\xff\xff", b"", b"")
    assert not v.valid and "not a dispatch.v1.ReceiptBody" in v.problems[0]
    assert not verify_receipt(b"", b"", b"").valid


def test_check_worker_receipt_accepts_a_matching_body() -> None:
    body = serialize_body(_body())
    assert check_worker_receipt(body, sign_body(WORKER, body), EXPECTED) == []


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"job_id": "job_2"}, "job_id"),
        ({"attempt": 2}, "attempt"),
        ({"job_type": common_pb2.JOB_TYPE_LLM}, "job_type"),
        ({"input_sha256": sha256(b"other")}, "input_sha256"),
        ({"output_sha256": sha256(b"other")}, "output_sha256"),
        ({"coordinator_public_key": OTHER.public_key}, "coordinator_public_key"),
        ({"client_id": "d" * 64}, "client_id"),
        ({"price_micros": 1}, "price.amount_micros"),
        ({"currency": "EUR"}, "price.currency"),
        ({"payment": common_pb2.PaymentReference(status="settled")}, "payment"),
        # a session whose agent id was verified: a receipt without it (or another) is refused
        ({"worker_agent_id": "7"}, "worker_agent_id"),
    ],
)
def test_check_worker_receipt_names_each_mismatch(change: dict[str, object], name: str) -> None:
    body = serialize_body(_body())
    expected = dataclasses.replace(EXPECTED, **change)  # type: ignore[arg-type]
    problems = check_worker_receipt(body, sign_body(WORKER, body), expected)
    assert problems == [f"receipt {name} does not match the job"]


def test_check_worker_receipt_refuses_fields_it_does_not_know() -> None:
    # field 99 at the top and field 98 inside price: signed claims nobody here can read
    body = serialize_body(_body()) + b"\x98\x06\x01"
    price = _body().price.SerializeToString() + b"\x90\x06\x01"
    body += b"\x4a" + bytes([len(price)]) + price
    problems = check_worker_receipt(body, sign_body(WORKER, body), EXPECTED)
    known = "receipt body has fields this coordinator does not know"
    assert problems == [f"{known}: ['#99', 'price.#98']"]


@pytest.mark.parametrize(
    ("started", "completed", "problem"),
    [
        (1001, 1000, "receipt started_at is after its completed_at"),
        (969, 1001, "receipt started_at is 31s before this attempt was offered"),
        (1000, 1010 + 86400, "receipt completed_at is 86400s ahead of the coordinator's clock"),
    ],
)
def test_check_worker_receipt_refuses_times_outside_the_attempt(
    started: int, completed: int, problem: str
) -> None:
    msg = _body()
    msg.started_at.FromSeconds(started)
    msg.completed_at.FromSeconds(completed)
    body = serialize_body(msg)
    problems = check_worker_receipt(body, sign_body(WORKER, body), EXPECTED)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_check_worker_receipt_allows_the_clock_skew() -> None:
    msg = _body()
    msg.started_at.FromSeconds(970)  # 30s before the offer
    msg.completed_at.FromSeconds(1040)  # 30s after now
    body = serialize_body(msg)
    assert check_worker_receipt(body, sign_body(WORKER, body), EXPECTED) == []


def test_check_worker_receipt_lists_every_problem() -> None:
    body_msg = _body(job_id="job_2", output_sha256=sha256(b"lie"))
    body_msg.price.amount_micros = 1
    body_msg.ClearField("completed_at")
    body = serialize_body(body_msg)
    problems = check_worker_receipt(body, sign_body(OTHER, body), EXPECTED)
    assert problems == [
        "receipt job_id does not match the job",
        "receipt output_sha256 does not match the job",
        "receipt price.amount_micros does not match the job",
        "receipt needs started_at and completed_at",
        "worker receipt signature does not verify",
    ]


# --- auth tokens -------------------------------------------------------------------------

NOW = 1_700_000_000.0


def _header(token: str) -> str:
    return f"Dispatch {token}"


def test_token_round_trip_identifies_the_key() -> None:
    key = KeyPair.generate()
    caller = verify_header(_header(make_token(key, 300, now=NOW)), 3600, now=NOW)
    assert caller == Caller(key.public_key)
    assert caller.id == key.public_hex


def _tampered(token: str, part: int) -> str:
    parts = token.split(".")
    if part == 2:  # an earlier expiry: still valid by the clock, so only the signature tells
        parts[2] = str(int(parts[2]) - 1)
    else:
        parts[part] = ("B" if parts[part][0] == "A" else "A") + parts[part][1:]
    return ".".join(parts)


@pytest.mark.parametrize(
    ("part", "needle"), [(0, "malformed"), (1, "signature"), (2, "signature"), (3, "signature")]
)
def test_tampering_with_any_part_fails(part: int, needle: str) -> None:
    token = make_token(KeyPair.generate(), 300, now=NOW)
    bad = _tampered(token, part)
    assert bad != token
    with pytest.raises(Unauthenticated, match=needle):
        verify_header(_header(bad), 3600, now=NOW)


def test_a_signature_from_another_key_fails() -> None:
    mine, theirs = (make_token(KeyPair.generate(), 300, now=NOW).split(".") for _ in range(2))
    forged = ".".join([*mine[:3], theirs[3]])
    with pytest.raises(Unauthenticated, match="signature"):
        verify_header(_header(forged), 3600, now=NOW)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("Bearer abc", "authorization must be"),
        ("Dispatch", "authorization must be"),
        ("Dispatch v1.a.b", "malformed"),
        ("Dispatch v1.!!!.123.abc", "malformed"),
        ("Dispatch v1.AAAA.123.AAAA", "32 bytes"),
    ],
)
def test_malformed_headers(header: str, needle: str) -> None:
    with pytest.raises(Unauthenticated, match=needle):
        verify_header(header, 3600, now=NOW)


def _respelled(token: str, how: str) -> str:
    v, key, expiry, sig = token.split(".")
    if how == "padded key":
        key += "="
    elif how == "standard alphabet":  # a key that has '-' or '_' in base64url
        key = key.replace("-", "+").replace("_", "/")
    elif how == "underscore":
        expiry = expiry[:4] + "_" + expiry[4:]
    else:
        expiry = {"plus": "+", "zero": "0", "space": " "}[how] + expiry
    return ".".join((v, key, expiry, sig))


@pytest.mark.parametrize(
    "how", ["padded key", "standard alphabet", "plus", "zero", "space", "underscore"]
)
def test_a_token_is_spelled_one_way_only(how: str) -> None:
    # README "Wire formats": base64url without padding, the expiry's digits with no sign
    # and no leading zero; another spelling of the same numbers is not the signed token
    key = next(
        k for k in iter(KeyPair.generate, None) if set("-_") & set(make_token(k).split(".")[1])
    )
    token = make_token(key, 300, now=NOW)
    assert verify_header(_header(token), 3600, now=NOW).id == key.public_hex
    with pytest.raises(Unauthenticated, match="malformed"):
        verify_header(_header(_respelled(token, how)), 3600, now=NOW)


def test_token_expiry_and_lifetime_limit() -> None:
    key = KeyPair.generate()
    token = _header(make_token(key, 300, now=NOW))
    assert verify_header(token, 3600, now=NOW + 300).id == key.public_hex
    with pytest.raises(Unauthenticated, match="expired"):
        verify_header(token, 3600, now=NOW + 301)

    longest = _header(make_token(key, 3600 + MAX_CLOCK_SKEW, now=NOW))
    assert verify_header(longest, 3600, now=NOW).id == key.public_hex
    too_long = _header(make_token(key, 3600 + MAX_CLOCK_SKEW + 1, now=NOW))
    with pytest.raises(Unauthenticated, match=r"lifetime exceeds .* 3600s"):
        verify_header(too_long, 3600, now=NOW)


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The public keys of every ed25519 token check, in order."""
    checked: list[bytes] = []
    real = tokens.verify

    def counting(public_key: bytes, context: bytes, message: bytes, signature: bytes) -> bool:
        checked.append(public_key)
        return real(public_key, context, message, signature)

    monkeypatch.setattr(tokens, "verify", counting)
    return checked


def test_a_cached_token_is_verified_once_until_it_expires(signature_checks: list[bytes]) -> None:
    key, cache = KeyPair.generate(), TokenCache()
    token = _header(make_token(key, 300, now=NOW))
    for t in range(10):
        assert verify_header(token, 3600, now=NOW + t, cache=cache).id == key.public_hex
    assert len(signature_checks) == 1
    assert verify_header(token, 3600, now=NOW + 300, cache=cache).id == key.public_hex
    with pytest.raises(Unauthenticated, match="expired"):
        verify_header(token, 3600, now=NOW + 301, cache=cache)
    assert len(signature_checks) == 1 and len(cache) == 0


def test_a_cached_header_value_still_checks_expiry_and_lifetime(
    signature_checks: list[bytes],
) -> None:
    key, cache = KeyPair.generate(), TokenCache()
    token = _header(make_token(key, 300, now=NOW))
    assert verify_header(token, 3600, now=NOW, cache=cache).id == key.public_hex
    assert token in cache.values  # the same value next time is not decoded again
    with pytest.raises(Unauthenticated, match="lifetime"):
        verify_header(token, 100, now=NOW, cache=cache)  # a stricter limit still applies
    with pytest.raises(Unauthenticated, match="expired"):
        verify_header(token, 3600, now=NOW + 301, cache=cache)
    with pytest.raises(Unauthenticated, match="expired"):
        verify_header(token, 3600, now=NOW + 302, cache=cache)
    assert len(signature_checks) == 1


def test_a_forged_token_is_never_cached(signature_checks: list[bytes]) -> None:
    key, other, cache = KeyPair.generate(), KeyPair.generate(), TokenCache()
    good = make_token(key, 300, now=NOW).split(".")
    forged = _header(".".join([*good[:3], make_token(other, 300, now=NOW).split(".")[3]]))
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="signature"):
            verify_header(forged, 3600, now=NOW, cache=cache)
    assert len(signature_checks) == 3 and len(cache) == 0
    # the genuine token with the same key and expiry is checked on its own merits
    assert verify_header(_header(".".join(good)), 3600, now=NOW, cache=cache).id == key.public_hex
    with pytest.raises(Unauthenticated, match="signature"):
        verify_header(forged, 3600, now=NOW, cache=cache)


def test_the_token_cache_stays_bounded_least_recently_used_out(
    signature_checks: list[bytes],
) -> None:
    cache = TokenCache(size=3)
    keys_ = [KeyPair.generate() for _ in range(4)]
    headers = [_header(make_token(k, 300, now=NOW)) for k in keys_]
    for h in headers[:3]:
        verify_header(h, 3600, now=NOW, cache=cache)
    verify_header(headers[0], 3600, now=NOW, cache=cache)  # now the most recent
    verify_header(headers[3], 3600, now=NOW, cache=cache)  # evicts headers[1]
    assert len(cache) == 3 and len(signature_checks) == 4
    verify_header(headers[0], 3600, now=NOW, cache=cache)
    assert len(signature_checks) == 4
    verify_header(headers[1], 3600, now=NOW, cache=cache)
    assert signature_checks[-1] == keys_[1].public_key and len(cache) == 3


# --- key files ---------------------------------------------------------------------------


def test_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "worker.key"
    key = keys.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load_or_create(path).public_key == key.public_key
    assert keys.load(path).public_key == key.public_key
    msg = key.sign(b"ctx\n", b"hello")
    assert keys.verify(key.public_key, b"ctx\n", b"hello", msg)
    assert not keys.verify(key.public_key, b"other\n", b"hello", msg)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("garbage", "is not a Dispatch key file"),
        ("dispatch-ed25519-seed-v1\n" + "zz" * 32 + "\n", "is not hex"),
        ("dispatch-ed25519-seed-v1\n" + "ab" * 16 + "\n", "must be 32 bytes"),
        ("dispatch-ed25519-seed-v1\n", "is not a Dispatch key file"),
    ],
)
def test_corrupt_key_file_is_refused_not_replaced(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "worker.key"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        keys.load_or_create(path)
    assert path.read_text() == text


# --- matching ----------------------------------------------------------------------------


@dataclasses.dataclass
class FakeWorker:
    worker_id: str
    kind: WorkerKind = WorkerKind.SEEKER
    tasks: frozenset[str] = frozenset({"echo"})
    llm_models: frozenset[str] = frozenset()
    max_concurrency: int = 2
    draining: bool = False
    load: int = 0


def _spec(
    job_type: JobType = JobType.TASK,
    policy: Policy = Policy.CHEAP,
    privacy: Privacy = Privacy.PUBLIC,
    task: str = "echo",
    model: str = "",
) -> JobSpec:
    return JobSpec(job_type, policy, privacy, task, model, b"", b"")


DESKTOP = FakeWorker("d", WorkerKind.DESKTOP, llm_models=frozenset({"llama"}))
SEEKER = FakeWorker("s", WorkerKind.SEEKER)


def test_llm_jobs_go_only_to_desktops_serving_the_model() -> None:
    llm = _spec(JobType.LLM, Policy.FAST, task="")
    assert matching.eligible(llm, DESKTOP, None)
    assert matching.eligible(dataclasses.replace(llm, llm_model="llama"), DESKTOP, None)
    assert not matching.eligible(dataclasses.replace(llm, llm_model="mistral"), DESKTOP, None)
    assert not matching.eligible(llm, dataclasses.replace(DESKTOP, llm_models=frozenset()), None)
    seeker_with_model = dataclasses.replace(SEEKER, llm_models=frozenset({"llama"}))
    assert not matching.eligible(llm, seeker_with_model, None)


def test_task_jobs_need_the_task() -> None:
    assert matching.eligible(_spec(task="echo"), SEEKER, None)
    assert not matching.eligible(_spec(task="sha256"), SEEKER, None)


def test_private_jobs_need_a_pairing() -> None:
    private = _spec(privacy=Privacy.PRIVATE)
    assert not matching.eligible(private, SEEKER, None)
    assert not matching.eligible(private, SEEKER, {"someone-else"})
    assert matching.eligible(private, SEEKER, {"s"})
    assert matching.eligible(_spec(), SEEKER, set())


def test_full_or_draining_workers_get_nothing() -> None:
    assert matching.eligible(_spec(), dataclasses.replace(SEEKER, load=1), None)
    assert not matching.eligible(_spec(), dataclasses.replace(SEEKER, load=2), None)
    assert not matching.eligible(_spec(), dataclasses.replace(SEEKER, draining=True), None)
    assert not matching.eligible(
        _spec(privacy=Privacy.PRIVATE), dataclasses.replace(SEEKER, draining=True), {"s"}
    )


def test_weight_prefers_by_policy_and_reputation() -> None:
    fast, cheap = _spec(policy=Policy.FAST), _spec(policy=Policy.CHEAP)
    assert matching.weight(fast, DESKTOP, 0.5) > matching.weight(fast, SEEKER, 0.5)
    assert matching.weight(cheap, SEEKER, 0.5) > matching.weight(cheap, DESKTOP, 0.5)
    scores = [matching.weight(cheap, SEEKER, r) for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert scores == sorted(scores) and len(set(scores)) == 5
    assert scores[0] > 0  # a worker with no successes is never excluded outright
    busy = dataclasses.replace(SEEKER, load=1)
    assert matching.weight(cheap, busy, 0.5) < matching.weight(cheap, SEEKER, 0.5)


def test_choose_favours_reputation_without_starving_newcomers() -> None:
    good, newcomer = FakeWorker("good"), FakeWorker("new")
    rng = random.Random(20240601)
    picks = [
        matching.choose(_spec(), [good, newcomer], {"good": 1.0}, rng).worker_id
        for _ in range(2000)
    ]
    n_good, n_new = picks.count("good"), picks.count("new")
    # weights 1.1 : 0.6, an expected share of 1295 : 705
    assert n_good / n_new > 1.5
    assert n_new > 500


def _old_choice(
    spec: JobSpec,
    workers: list[FakeWorker],
    avoid: set[str],
    scores: dict[str, float],
    rng: random.Random,
) -> FakeWorker | None:
    """The hub's choice before the worker index: a scan of every session."""
    cands = [w for w in workers if matching.eligible(spec, w, None)]
    cands = [w for w in cands if w.worker_id not in avoid] or cands
    return matching.choose(spec, cands, scores, rng) if cands else None


def _random_workers(rng: random.Random, n: int) -> list[FakeWorker]:
    return [
        FakeWorker(
            f"w{i}",
            rng.choice([WorkerKind.SEEKER, WorkerKind.DESKTOP]),
            frozenset(rng.sample(["echo", "sha256", "wasm"], rng.randint(0, 2))),
            max_concurrency=2,
            draining=rng.random() < 0.1,
            load=rng.randint(0, 2),
        )
        for i in range(n)
    ]


def test_choose_among_a_small_pool_is_the_old_scan_exactly() -> None:
    setup = random.Random(7)

    def no_draw() -> FakeWorker:
        raise AssertionError("a small pool is weighed in full")

    for trial in range(300):
        workers = _random_workers(setup, setup.randint(0, matching.SCAN_MAX))
        spec = _spec(task=setup.choice(["echo", "sha256"]), policy=setup.choice(list(Policy)))
        avoid = {w.worker_id for w in workers if setup.random() < 0.3}
        scores = {w.worker_id: setup.random() for w in workers}
        old = _old_choice(spec, workers, avoid, scores, random.Random(trial))
        new = matching.choose_among(
            spec,
            workers,
            len(workers),
            no_draw,
            {w.kind for w in workers},
            lambda w, a=avoid, sp=spec: matching.eligible(sp, w, None) and w.worker_id not in a,
            lambda w, sp=spec: matching.eligible(sp, w, None),
            scores.__getitem__,
            random.Random(trial),
        )
        assert new is old, trial


def test_choose_among_a_large_pool_checks_a_bounded_number_and_keeps_the_weights() -> None:
    good = [FakeWorker(f"good{i}") for i in range(500)]
    new = [FakeWorker(f"new{i}") for i in range(500)]
    pool, rng = good + new, random.Random(20240601)
    scores = {w.worker_id: 1.0 for w in good} | {w.worker_id: 0.0 for w in new}
    for policy in (Policy.CHEAP, Policy.FAST):  # FAST: no desktop here, a lower cap
        spec, checks, picks = _spec(policy=policy), [0], []

        def usable(w: FakeWorker, sp: JobSpec = spec, n: list[int] = checks) -> bool:
            n[0] += 1
            return matching.eligible(sp, w, None)

        for _ in range(3000):
            before = checks[0]
            w = matching.choose_among(
                spec, pool, len(pool), lambda: rng.choice(pool), {WorkerKind.SEEKER},
                usable, usable, scores.__getitem__, rng,
            )  # fmt: skip
            assert w is not None and checks[0] - before <= matching.DRAWS
            picks.append(w.worker_id.startswith("good"))
        # weights 1.1 : 0.1, an expected 2750 : 250, as choose would give
        assert 200 < picks.count(False) < 300, policy
        assert checks[0] < 3000 * 4  # about 1.8 draws per choice (2 with FAST)


def test_choose_among_samples_a_pool_just_over_the_scan_size() -> None:
    """50 free seekers are not all weighed for each job: a few draws, the same weights."""
    pool, rng = [FakeWorker(f"w{i}") for i in range(50)], random.Random(3)
    assert len(pool) > matching.SCAN_MAX
    scores = {w.worker_id: 1.0 if w.worker_id == "w0" else 0.0 for w in pool}
    spec, checks, picks = _spec(), [0], []

    def usable(w: FakeWorker) -> bool:
        checks[0] += 1
        return True

    for _ in range(4000):
        w = matching.choose_among(
            spec, pool, len(pool), lambda: rng.choice(pool), {WorkerKind.SEEKER},
            usable, usable, scores.__getitem__, rng,
        )  # fmt: skip
        assert w is not None
        picks.append(w.worker_id)
    # w0 weighs 1.1 against 0.1 for each of the 49 others: w0 expected 4000 * 1.1 / 6.0 = 733 times
    assert 640 < picks.count("w0") < 830
    assert checks[0] < 4000 * 20  # ~9 draws per choice (reputations of 0 here), not 50


def test_choose_among_falls_back_to_avoided_workers_then_none() -> None:
    pool, rng = [FakeWorker(f"w{i}") for i in range(200)], random.Random(1)
    spec = _spec()
    picked = matching.choose_among(
        spec, pool, len(pool), lambda: rng.choice(pool), {WorkerKind.SEEKER},
        lambda w: False, lambda w: w.worker_id == "w7", lambda _: 0.5, rng,
    )  # fmt: skip
    assert picked is pool[7]
    nobody = matching.choose_among(
        spec, pool, len(pool), lambda: rng.choice(pool), {WorkerKind.SEEKER},
        lambda w: False, lambda w: False, lambda _: 0.5, rng,
    )  # fmt: skip
    assert nobody is None


def test_the_worker_index_agrees_with_a_scan_of_every_session() -> None:
    rng, index = random.Random(3), WorkerIndex[FakeWorker]()
    live: list[FakeWorker] = []
    specs = [
        _spec(task="echo"),
        _spec(task="sha256"),
        _spec(task="nothing"),
        _spec(JobType.LLM, task=""),
        _spec(JobType.LLM, task="", model="llama"),
        _spec(JobType.LLM, task="", model="mistral"),
        dataclasses.replace(_spec(task="echo"), use_llm=True),
    ]
    for step in range(2000):
        op = rng.random()
        if op < 0.3 or not live:
            w = _random_workers(rng, 1)[0]
            w.worker_id = f"w{step}"
            if w.kind is WorkerKind.DESKTOP and rng.random() < 0.6:
                w.llm_models = frozenset(rng.sample(["llama", "mistral"], rng.randint(1, 2)))
            live.append(w)
            index.add(w)
        elif op < 0.45:
            index.remove(live.pop(rng.randrange(len(live))))
        else:
            w = rng.choice(live)
            if rng.random() < 0.2:
                w.draining = True
            else:
                w.load = rng.randint(0, 3)
            index.refresh(w)
        free = [w for w in live if not w.draining and w.load < w.max_concurrency]
        assert index.free_slots == sum(
            max(0, w.max_concurrency - w.load) for w in live if not w.draining
        )
        assert index.free_task_names() == frozenset(t for w in free for t in w.tasks)
        assert index.any_free_llm() == any(
            w.kind is WorkerKind.DESKTOP and w.llm_models for w in free
        )
        for spec in specs:
            assert index.able(spec) == sum(1 for w in live if matching.can_ever_run(spec, w))
            pool = index.free.for_spec(spec)
            found = {w.worker_id for w in pool or () if matching.eligible(spec, w, None)}
            assert found == {w.worker_id for w in live if matching.eligible(spec, w, None)}
            assert sorted(live, key=index.order) == live


# --- profiles ----------------------------------------------------------------------------


@pytest.fixture
def profile_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DISPATCH_PROFILE_DIR", raising=False)
    return tmp_path / "custom.toml"


def test_local_profile_has_the_seed_prices() -> None:
    p = load_profile("local").pricing
    assert (p.currency, p.fast_llm, p.fast_task, p.cheap_llm, p.cheap_task) == (
        "USD",
        10000,
        3000,
        5000,
        1000,
    )


def test_a_profile_file_overrides_defaults(profile_file: Path) -> None:
    profile_file.write_text('name = "custom"\n[jobs]\nmax_attempts = 5\n')
    p = load_profile(str(profile_file))
    assert p.name == "custom" and p.jobs.max_attempts == 5
    assert p.jobs.quote_ttl_seconds == 300


def test_a_profile_file_without_a_name_is_named_after_the_file(profile_file: Path) -> None:
    # not "local": the name picks the default data directory (coordinator-<name>)
    profile_file.write_text("[jobs]\nmax_attempts = 5\n")
    assert load_profile(str(profile_file)).name == "custom"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[jobs]\nmax_atempts = 5\n", "max_atempts"),
        ("[gossip]\nenabled = true\n", "gossip"),
        ("colour = 'blue'\n", "colour"),
        ("[jobs]\nmax_attempts = 'three'\n", "max_attempts must be int, not str"),
        ("[payments]\nenabled = 1\n", "enabled must be bool, not int"),
        ("[server]\nlisten = 50051\n", "listen must be str, not int"),
        ("[auth]\nmax_token_ttl_seconds = true\n", "max_token_ttl_seconds must be int, not bool"),
        ("[jobs\n", "custom.toml"),
        ("[payments]\nenabled = true\n", "at least one \\[\\[payments.accept\\]\\]"),
        ("[payments]\naccept = 'eip155:1'\n", "accept must be a list of tables"),
        ("[[payments.accept]]\nnetwork = 'eip155:1'\nfee = 2\n", "unknown setting\\(s\\) fee"),
        ("[[payments.accept]]\nnetwork = 'eip155:1'\n", "'eip155:1' needs a \\[chain\\]"),
        ("[[payments.accept]]\nnetwork = 'solana'\n", "'solana' needs a \\[chain\\]"),
        (
            "[[payments.accept]]\nnetwork = 'eip155:1'\nfacilitator = 'ftp://x'\n",
            "is not a URL",
        ),
        ("[payments]\nsettle_margin_seconds = 5\n", "settle_margin_seconds >= 10"),
        ("[wallet]\nmax_per_job_micros = -1\n", "must not be negative"),
        ("[workers]\nhello_timeout_seconds = 0\n", "hello_timeout_seconds must be positive"),
        ("[receipts]\nmax_clock_skew_seconds = -1\n", "max_clock_skew_seconds must not be"),
    ],
)
def test_bad_profiles_name_the_problem(profile_file: Path, text: str, needle: str) -> None:
    profile_file.write_text(text)
    with pytest.raises(ProfileError, match=needle):
        load_profile(str(profile_file))


def test_a_section_given_as_a_scalar_is_refused(profile_file: Path) -> None:
    profile_file.write_text("pricing = 3\n")
    with pytest.raises(ProfileError, match="pricing"):
        load_profile(str(profile_file))


def test_a_float_for_an_integer_setting_is_refused(profile_file: Path) -> None:
    profile_file.write_text("[jobs]\nmax_attempts = 2.5\n")
    with pytest.raises(ProfileError, match="max_attempts"):
        load_profile(str(profile_file))


def test_an_unknown_profile_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCH_PROFILE_DIR", raising=False)
    with pytest.raises(ProfileError, match="no profile named 'no-such-profile'"):
        load_profile("no-such-profile")


# --- ERC-8004 registration files ----------------------------------------------------------

REGISTRY = "eip155:31337:0x8004A818BFB912233c491871b3d84c89A494BD9e"


def _registration(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "type": REGISTRATION_TYPE,
        "name": "w",
        "description": "",
        "services": [{"name": "gRPC", "endpoint": "127.0.0.1:50051", "version": "dispatch.v1"}],
        "registrations": [{"agentId": 7, "agentRegistry": REGISTRY}],
        "supportedTrust": ["reputation"],
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def _b64_uri(doc: object) -> str:
    return "data:application/json;base64," + base64.b64encode(json.dumps(doc).encode()).decode()


def test_a_valid_registration_file_parses() -> None:
    doc = _registration()
    assert check_registration_uri(_b64_uri(doc), 7, REGISTRY) == doc
    # the registry is compared case-insensitively; the agent id may be a decimal string
    other_case = _registration(registrations=[{"agentId": "7", "agentRegistry": REGISTRY.lower()}])
    assert check_registration_uri(_b64_uri(other_case), 7, REGISTRY) == other_case
    # registrations are optional, and may list the agent on other chains too
    assert check_registration_uri(_b64_uri(_registration(registrations=None)), 7, REGISTRY)
    multi = _registration(
        registrations=[
            {"agentId": 3, "agentRegistry": "eip155:1:0xabc"},
            {"agentId": 7, "agentRegistry": REGISTRY},
        ]
    )
    assert check_registration_uri(_b64_uri(multi), 7, REGISTRY) == multi


def test_a_percent_encoded_data_uri_parses() -> None:
    doc = _registration()
    uri = "data:application/json;charset=utf-8," + quote(json.dumps(doc))
    assert check_registration_uri(uri, 7, REGISTRY) == doc


def test_http_and_ipfs_registration_files_are_not_fetched() -> None:
    for uri in ("https://example.com/agent.json", "http://x/a.json", "ipfs://bafy/agent.json"):
        assert check_registration_uri(uri, 7, REGISTRY) is None


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("data:application/json;base64,bm90IGpzb24=", "not valid JSON"),
        ("data:application/json,%7Bnot%20json", "not valid JSON"),
        ("data:application/json;base64,!!!", "base64 does not decode"),
        ("data:text/plain,{}", "not application/json"),
        ("data:application/json;base64,WzFd", "not a JSON object"),
        (_b64_uri(_registration(type="https://example.com/other")), "type is"),
        (_b64_uri(_registration(type=None)), 'no "type"'),
        (_b64_uri(_registration(services=None)), 'no "services" list'),
        (_b64_uri(_registration(services={"name": "gRPC"})), 'no "services" list'),
        (_b64_uri(_registration(services=["gRPC"])), "services[0]"),
        (
            _b64_uri(_registration(registrations=[{"agentId": 8, "agentRegistry": REGISTRY}])),
            f"name agent 8 in {REGISTRY}, not agent 7",
        ),
        (
            _b64_uri(
                _registration(registrations=[{"agentId": 7, "agentRegistry": "eip155:1:0xdead"}])
            ),
            "name agent 7 in eip155:1:0xdead, not agent 7 in eip155:31337",
        ),
        (_b64_uri(_registration(registrations={"agentId": 7})), "not a list"),
        ("data:application/json," + "[" * 100_000, "nested too deeply"),
        ("", "empty"),
        ("ftp://example.com/a.json", "neither a data: URI"),
        ("data:application/json;base64", "no ','"),
    ],
)
def test_bad_registration_files_name_the_problem(uri: str, needle: str) -> None:
    with pytest.raises(RegistrationFileError) as e:
        check_registration_uri(uri, 7, REGISTRY)
    assert needle in str(e.value)


# --- layers ----------------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "dispatchnet"
DOMAIN = [
    *sorted((SRC / "coordinator").glob("*.py")),
    *(SRC / "receipts" / name for name in ("merkle.py", "batcher.py", "anchoring.py")),
    *(SRC / "reputation" / name for name in ("local.py", "erc8004.py", "feedback.py", "score.py")),
    SRC / "payments" / "service.py",
    SRC / "payments" / "payouts.py",
    SRC / "loops.py",
]
FOREIGN = (
    "grpc",
    "grpc_interceptor",
    "dispatch",
    "sqlite3",
    "sqlite_utils",
    "asyncpg",
    "web3",
    "x402",
)
# operators' tools: the domain tells them through coordinator/observer.py, never directly
OBSERVING = ("prometheus_client", "opentelemetry", "aiohttp", "dispatchnet.observability")


@pytest.mark.parametrize("path", DOMAIN, ids=lambda p: str(p.relative_to(SRC)))
def test_domain_code_imports_no_transport_storage_or_chain_library(path: Path) -> None:
    """ARCHITECTURE's layers: domain code talks to grpc, SQL and chains through protocols."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & set(FOREIGN), imported & set(FOREIGN)
    modules = {
        name
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert not {m for m in modules if m.startswith(OBSERVING)}


def _imports(path: Path) -> set[str]:
    """The modules a file imports (absolute imports, as written)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    return imported


@pytest.mark.parametrize(
    "path", sorted((SRC / "gateways").glob("*.py")), ids=lambda p: str(p.relative_to(SRC))
)
def test_gateways_reach_the_network_only_through_the_sdk(path: Path) -> None:
    """ARCHITECTURE: the gateways are thin layers over the SDK: no gRPC, generated code,
    coordinator internals, store or chain library (dispatchnet.client only for the wallet
    protocol's PaymentDeclined; chains.registry only to name a profile's chain track). x402
    is theirs: they speak its HTTP transport."""
    allowed = {"dispatchnet.client", "dispatchnet.chains"}
    foreign = set(FOREIGN) - {"x402"}
    offences = sorted(
        m
        for m in _imports(path)
        if m.split(".")[0] in foreign
        or (
            m.startswith("dispatchnet.")
            and m.split(".")[1] not in ("sdk", "gateways", "keys", "profiles")
            and m not in allowed
        )
    )
    assert not offences, offences


# The MCP server is a thin layer over the SDK (the one client implementation): it reaches
# the network only through dispatchnet.sdk, never gRPC, generated code or the coordinator
# (keys, protocol limits and profile defaults are plain data).
MCP_SERVER = [SRC / "gateways" / "mcp.py", SRC / "gateways" / "mcp_http.py"]
THROUGH_THE_SDK = (
    "dispatchnet.sdk",
    "dispatchnet.gateways",
    "dispatchnet.keys",
    "dispatchnet.protocol",
    "dispatchnet.profiles",
)


@pytest.mark.parametrize("path", MCP_SERVER, ids=lambda p: str(p.relative_to(SRC)))
def test_the_mcp_server_reaches_the_network_only_through_the_sdk(path: Path) -> None:
    offences = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in ("grpc", "dispatch") or (
                top == "dispatchnet"
                and name != "dispatchnet"
                and not name.startswith(THROUGH_THE_SDK)
            ):
                offences.append(name)
    assert not offences, offences


# Chain kinds and network-id prefixes: only chains/ (the registry and the adapters) may
# compare anything with these; everything else asks the registry for the adapter.
CHAIN_WORDS = ("evm", "solana", "eip155", "svm")
OUTSIDE_CHAINS = sorted(p for p in SRC.rglob("*.py") if "chains" not in p.relative_to(SRC).parts)


def _chain_literals(node: ast.AST) -> list[str]:
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            text = sub.value.lower()
            if any(text == w or text.startswith(f"{w}:") for w in CHAIN_WORDS):
                found.append(sub.value)
    return found


def test_nothing_outside_chains_compares_a_chain_kind_or_network() -> None:
    """The chain seam: code outside chains/ never branches on a chain kind or a network's
    name (`kind == "evm"`, `network.startswith("eip155:")`, `kind in ("evm", ...)`)."""
    offences = []
    for path in OUTSIDE_CHAINS:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                words = _chain_literals(node)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
            ):
                words = _chain_literals(node)
            elif isinstance(node, ast.Match):
                words = [w for case in node.cases for w in _chain_literals(case.pattern)]
            else:
                continue
            if words:
                offences.append(f"{path.relative_to(SRC)}:{node.lineno} compares {words}")
    assert not offences, offences


# Store engines and url schemes: only store/ (the registry and the implementations) may
# compare anything with these; everything else opens the profile's store through the registry.
ENGINE_WORDS = ("sqlite", "postgresql", "postgres")
OUTSIDE_STORE = sorted(p for p in SRC.rglob("*.py") if "store" not in p.relative_to(SRC).parts)


def test_nothing_outside_store_compares_a_store_engine() -> None:
    """The store seam: code outside store/ never branches on an engine or a url scheme
    (`url.startswith("postgresql:")`, `engine == "sqlite"`)."""
    offences = []
    for path in OUTSIDE_STORE:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare | ast.Call | ast.Match):
                continue
            if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
            ):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    text = sub.value.lower()
                    if any(text == w or text.startswith(f"{w}:") for w in ENGINE_WORDS):
                        offences.append(f"{path.relative_to(SRC)}:{node.lineno} {sub.value!r}")
    assert not offences, offences


def test_secp256k1_runs_on_the_native_backend() -> None:
    # eth-keys silently falls back to pure Python (~50x slower per recovery) without
    # coincurve; payment and identity checks recover a key on every paid job.
    from eth_keys.backends import get_backend

    assert type(get_backend()).__name__ == "CoinCurveECCBackend"


def test_evolve_is_replace_without_init() -> None:
    spec = JobSpec(JobType.TASK, Policy.CHEAP, Privacy.PUBLIC, "echo", "", b"s", b"h" * 32)
    job = Job("job_1", "c", JobState.QUEUED, spec, 1000, "USD", "", "k", 0, 3, 1.0, 1.0, 1.0)
    changes = {"state": JobState.OFFERED, "attempts": 1, "result": Result(b"x", "text/plain")}
    moved = evolve(job, **changes)
    assert moved == dataclasses.replace(job, **changes)  # type: ignore[arg-type]
    assert type(moved) is Job and hash(moved) == hash(dataclasses.replace(job, **changes))  # type: ignore[arg-type]
    assert job.state is JobState.QUEUED and job.result is None  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.state = JobState.RUNNING  # type: ignore[misc]
    event = Event("job_1", EventKind.STATE, JobState.QUEUED, 1.0)
    assert evolve(event, sequence=3) == dataclasses.replace(event, sequence=3)
    assert evolve(event) == event and evolve(event) is not event
    with pytest.raises(TypeError, match="no field 'sequense'"):
        evolve(event, sequense=3)


def test_ids_begin_with_their_time_so_later_ones_sort_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dispatchnet.coordinator import jobs

    made = []
    for ms in (1_796_000_000_000, 1_796_000_000_001, 1_796_000_001_000):
        monkeypatch.setattr(jobs.time, "time_ns", lambda ms=ms: ms * 1_000_000 + 999_999)
        made += [jobs.new_id("job") for _ in range(50)]
    assert all(len(i) == 36 and i.startswith("job_") and int(i[4:], 16) >= 0 for i in made)
    assert [int(i[4:16], 16) for i in made[::50]] == [1_796_000_000_000, 1_796_000_000_001,
                                                      1_796_000_001_000]  # fmt: skip
    # each millisecond's ids sort after the ones before it
    assert max(made[:50]) < min(made[50:100]) and max(made[50:100]) < min(made[100:])
    assert len(set(made)) == len(made)  # the 80 random bits tell one millisecond's apart
