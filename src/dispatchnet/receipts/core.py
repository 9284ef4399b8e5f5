"""Receipts: built and signed over exact serialized bytes, verified without re-serializing.

Both the worker and the coordinator sign ``SIGNING_CONTEXT || body`` where body is the
serialized dispatch.v1.ReceiptBody carried in the receipt. Verification parses body to read
it, and checks the signatures over the bytes as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf import timestamp_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from dispatch.v1 import common_pb2, receipt_pb2
from dispatchnet.keys import KeyPair, verify

# Merkle batching lives in receipts/merkle.py (no protobuf there); re-exported here.
from dispatchnet.receipts.merkle import merkle_proof as merkle_proof
from dispatchnet.receipts.merkle import merkle_root as merkle_root
from dispatchnet.receipts.merkle import verify_merkle_proof as verify_merkle_proof

SIGNING_CONTEXT = b"dispatch.v1.ReceiptBody\n"
RECEIPT_VERSION = 1
# ReceiptBody.verification: written by the coordinator only, as the body's last field
VERIFICATION_FIELD = 15


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sign_body(key: KeyPair, body: bytes) -> bytes:
    """The ed25519 signature of key over a serialized ReceiptBody."""
    return key.sign(SIGNING_CONTEXT, body)


def serialize_body(body: receipt_pb2.ReceiptBody) -> bytes:
    """Serializes a body once; these bytes are what gets signed and shipped."""
    return body.SerializeToString(deterministic=True)


@dataclass
class Verification:
    """The outcome of checking a receipt."""

    problems: list[str] = field(default_factory=list)
    body: receipt_pb2.ReceiptBody | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at data[at:] and the offset after it; ValueError when malformed."""
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def worker_signed_part(body: bytes) -> bytes:
    """The bytes of a body the worker signed: everything before the verification record
    (ReceiptBody.verification, field 15, which the coordinator appends last), found by
    walking the top-level fields of the wire format, never by re-serializing. The whole
    body when it has no record (or does not parse: the signature check then fails)."""
    at = 0
    try:
        while at < len(body):
            start = at
            key, at = _varint(body, at)
            number, wire = key >> 3, key & 7
            if number == VERIFICATION_FIELD:
                return body[:start]
            if wire == 0:
                _, at = _varint(body, at)
            elif wire == 1:
                at += 8
            elif wire == 2:
                size, at = _varint(body, at)
                at += size
            elif wire == 5:
                at += 4
            else:
                return body
    except ValueError:
        return body
    return body


def append_verification(body: bytes, record: receipt_pb2.Verification) -> bytes:
    """body with the verification record appended as its last field (the worker's
    signature over body stays valid for worker_signed_part of the result)."""
    extra = receipt_pb2.ReceiptBody(verification=record)
    return body + extra.SerializeToString(deterministic=True)


def decode_body(body: bytes) -> receipt_pb2.ReceiptBody | None:
    msg = receipt_pb2.ReceiptBody()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        return None
    return msg


def unknown_field_paths(msg: Message, prefix: str = "") -> list[str]:
    """Paths of the fields in msg (and its sub-messages) this build does not know."""
    # The stub lacks __iter__; the set iterates through __getitem__.
    fields = cast(Iterable[Any], unknown_fields.UnknownFieldSet(msg))
    found = [f"{prefix}#{f.field_number}" for f in fields]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        values = value if fd.is_repeated else [value]
        for i, v in enumerate(values):
            if isinstance(v, Message):
                name = f"{prefix}{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
                found += unknown_field_paths(v, name + ".")
    return found


def _has_unknown(msg: Message) -> bool:
    """Whether msg or a sub-message holds fields this build does not know: each such field
    counts in its serialized size, so dropping them shrinks it. Done in C (~1 us), so the
    per-result check walks the fields in Python (unknown_field_paths) only to name them.
    msg loses those fields."""
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    return msg.ByteSize() != size


def verify_receipt(
    body: bytes,
    worker_signature: bytes,
    coordinator_signature: bytes,
    receipt_sha256: bytes = b"",
    expected_coordinator_key: bytes | Iterable[bytes] = b"",
) -> Verification:
    """Checks a receipt offline: structure, hash, and both signatures over the exact bytes.

    expected_coordinator_key: a key, or the keys of a cluster's coordinators (any one of
    them may countersign, see CoordinatorClient.coordinator_keys); empty: any coordinator."""
    out = Verification()
    decoded = decode_body(body)
    if decoded is None or not body:
        out.problems.append("receipt body is not a dispatch.v1.ReceiptBody")
        return out
    out.body = decoded
    if decoded.version != RECEIPT_VERSION:
        out.problems.append(f"unsupported receipt version {decoded.version}")
    if not decoded.job_id:
        out.problems.append("receipt has no job id")
    if len(decoded.input_sha256) != 32 or len(decoded.output_sha256) != 32:
        out.problems.append("input and output hashes must be 32 bytes")
    if receipt_sha256 and receipt_sha256 != sha256(body):
        out.problems.append("receipt_sha256 does not match the body")
    signed = worker_signed_part(body)
    if decoded.HasField("verification"):
        if len(signed) == len(body):
            out.problems.append("the verification record is not the body's last field")
        check_verification(decoded, out.problems)
    if not verify(decoded.worker_public_key, SIGNING_CONTEXT, signed, worker_signature):
        out.problems.append("worker signature does not verify against worker_public_key")
    # A verified job's record names the coordinator that concluded it and signed the whole
    # body; it may differ from the one the worker delivered through (several coordinators
    # on one database). Otherwise the body's coordinator countersigned.
    concluded_by = decoded.verification.concluded_by if decoded.HasField("verification") else b""
    signer = concluded_by or decoded.coordinator_public_key
    if not verify(signer, SIGNING_CONTEXT, body, coordinator_signature):
        which = "verification.concluded_by" if concluded_by else "coordinator_public_key"
        out.problems.append(f"coordinator signature does not verify against {which}")
    expected = coordinator_key_set(expected_coordinator_key)
    if expected and not {signer, decoded.coordinator_public_key} <= expected:
        out.problems.append("receipt was countersigned by a different coordinator")
    return out


def check_verification(body: receipt_pb2.ReceiptBody, problems: list[str]) -> None:
    """Consistency of a body's verification record: the majority's hash is the body's
    output hash, the body's worker is the first agreeing one, and the agreeing workers
    are a majority of the runs."""
    v = body.verification
    keys = list(v.agreeing_worker_keys)
    if v.output_sha256 != body.output_sha256:
        problems.append("verification.output_sha256 differs from the receipt's output_sha256")
    if not keys or keys[0] != body.worker_public_key:
        problems.append("verification.agreeing_worker_keys must start with the receipt's worker")
    if len(set(keys)) != len(keys) or 2 * len(keys) <= v.runs:
        problems.append("verification.agreeing_worker_keys are not a majority of its runs")


def coordinator_key_set(keys: bytes | Iterable[bytes]) -> frozenset[bytes]:
    """The pinned coordinator keys of an expected_coordinator_key argument (empty: none)."""
    if isinstance(keys, bytes | bytearray):
        return frozenset({bytes(keys)}) if keys else frozenset()
    return frozenset(bytes(k) for k in keys if k)


def verify_receipt_message(
    receipt: receipt_pb2.Receipt, expected_coordinator_key: bytes | Iterable[bytes] = b""
) -> Verification:
    return verify_receipt(
        receipt.body,
        receipt.worker_signature,
        receipt.coordinator_signature,
        receipt.receipt_sha256,
        expected_coordinator_key,
    )


@dataclass(frozen=True)
class ExpectedReceipt:
    """What the coordinator knows a worker's receipt for a job attempt must say."""

    job_id: str
    attempt: int
    job_type: int
    input_sha256: bytes
    output_sha256: bytes
    worker_public_key: bytes
    coordinator_public_key: bytes
    client_id: str
    price_micros: int
    currency: str
    payment: common_pb2.PaymentReference
    # when this attempt was offered to the worker, and the coordinator's time now (Unix
    # seconds): started_at and completed_at must lie between them, give or take the skew
    offered_at: float
    now: float
    max_clock_skew_seconds: float
    # the session's verified on-chain agent id ("" when none was verified)
    worker_agent_id: str = ""
    # the job's input is sealed: the receipt must carry the 32-byte keyed plaintext hashes
    # (which only the client and the worker can check); otherwise it must not
    sealed: bool = False


def check_worker_receipt(body: bytes, signature: bytes, expected: ExpectedReceipt) -> list[str]:
    """Problems with the receipt body a worker sent for a result; empty when acceptable."""
    decoded = decode_body(body)
    if decoded is None or not body:
        return ["receipt body is not a dispatch.v1.ReceiptBody"]
    problems = []
    # The coordinator countersigns only what it can read: a signed body with fields this
    # build does not know would carry claims nobody here checked.
    # (named from a fresh copy: _has_unknown drops them from the one it looks at)
    unknown = (
        unknown_field_paths(receipt_pb2.ReceiptBody.FromString(body))
        if _has_unknown(decoded)
        else []
    )
    if unknown:
        problems.append(f"receipt body has fields this coordinator does not know: {unknown[:5]}")
    if decoded.HasField("verification"):
        problems.append("receipt verification is the coordinator's to write; leave it unset")
    checks: list[tuple[str, object, object]] = [
        ("version", decoded.version, RECEIPT_VERSION),
        ("job_id", decoded.job_id, expected.job_id),
        ("attempt", decoded.attempt, expected.attempt),
        ("job_type", decoded.job_type, expected.job_type),
        ("input_sha256", decoded.input_sha256, expected.input_sha256),
        ("output_sha256", decoded.output_sha256, expected.output_sha256),
        ("worker_public_key", decoded.worker_public_key, expected.worker_public_key),
        ("coordinator_public_key", decoded.coordinator_public_key, expected.coordinator_public_key),
        ("client_id", decoded.client_id, expected.client_id),
        ("price.amount_micros", decoded.price.amount_micros, expected.price_micros),
        ("price.currency", decoded.price.currency, expected.currency),
        ("payment", decoded.payment, expected.payment),
        ("worker_agent_id", decoded.worker_agent_id, expected.worker_agent_id),
    ]
    for name, got, want in checks:
        if got != want:
            problems.append(f"receipt {name} does not match the job")
    for name in ("private_input_sha256", "private_output_sha256"):
        size = len(getattr(decoded, name))
        if expected.sealed and size != 32:
            problems.append(f"receipt {name} must be 32 bytes for a job with sealed input")
        elif not expected.sealed and size:
            problems.append(f"receipt {name} is only for a job with sealed input")
    if not decoded.HasField("started_at") or not decoded.HasField("completed_at"):
        problems.append("receipt needs started_at and completed_at")
    else:
        problems += _time_problems(decoded, expected)
    if not verify(expected.worker_public_key, SIGNING_CONTEXT, body, signature):
        problems.append("worker receipt signature does not verify")
    return problems


def _seconds(t: timestamp_pb2.Timestamp) -> float:
    return t.seconds + t.nanos / 1e9


def _time_problems(body: receipt_pb2.ReceiptBody, expected: ExpectedReceipt) -> list[str]:
    """started_at <= completed_at, and both within [offered_at, now] widened by the skew."""
    started, completed = _seconds(body.started_at), _seconds(body.completed_at)
    skew = expected.max_clock_skew_seconds
    problems = []
    if started > completed:
        problems.append("receipt started_at is after its completed_at")
    if started < expected.offered_at - skew:
        problems.append(
            f"receipt started_at is {expected.offered_at - started:.0f}s before this attempt "
            f"was offered ({skew:g}s of clock skew allowed)"
        )
    if completed > expected.now + skew:
        problems.append(
            f"receipt completed_at is {completed - expected.now:.0f}s ahead of the "
            f"coordinator's clock ({skew:g}s of clock skew allowed)"
        )
    return problems


def check_receipt_proof(
    proof: receipt_pb2.GetReceiptProofResponse, receipt: receipt_pb2.Receipt | None = None
) -> list[str]:
    """Problems with a Merkle inclusion proof (offline); empty when it recomputes its root.

    With `receipt`, the proof must also be for that receipt: its leaf is the SHA-256 of
    the receipt's signed body. (verify_receipt checks the receipt itself.)"""
    problems = []
    if len(proof.receipt_sha256) != 32:
        problems.append("proof.receipt_sha256 must be 32 bytes")
    if len(proof.merkle_root) != 32:
        problems.append("proof.merkle_root must be 32 bytes")
    if receipt is not None:
        if proof.receipt_sha256 != sha256(receipt.body):
            problems.append("the proof is for another receipt (receipt_sha256 differs)")
    ok = verify_merkle_proof(
        proof.receipt_sha256,
        proof.leaf_index,
        proof.leaf_count,
        list(proof.proof),
        proof.merkle_root,
    )
    if not ok:
        problems.append("the proof does not recompute merkle_root")
    return problems
