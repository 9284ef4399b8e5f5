"""Receipts: built and signed over exact serialized bytes, verified without re-serializing.

Both the worker and the coordinator sign ``SIGNING_CONTEXT || body`` where body is the
serialized dispatch.v1.ReceiptBody carried in the receipt. Verification parses body to read
it, and checks the signatures over the bytes as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from dispatch.v1 import common_pb2, receipt_pb2
from dispatchnet.keys import KeyPair, verify

SIGNING_CONTEXT = b"dispatch.v1.ReceiptBody\n"
RECEIPT_VERSION = 1


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


def decode_body(body: bytes) -> receipt_pb2.ReceiptBody | None:
    msg = receipt_pb2.ReceiptBody()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        return None
    return msg


def verify_receipt(
    body: bytes,
    worker_signature: bytes,
    coordinator_signature: bytes,
    receipt_sha256: bytes = b"",
    expected_coordinator_key: bytes = b"",
) -> Verification:
    """Checks a receipt offline: structure, hash, and both signatures over the exact bytes."""
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
    if not verify(decoded.worker_public_key, SIGNING_CONTEXT, body, worker_signature):
        out.problems.append("worker signature does not verify against worker_public_key")
    if not verify(decoded.coordinator_public_key, SIGNING_CONTEXT, body, coordinator_signature):
        out.problems.append("coordinator signature does not verify against coordinator_public_key")
    if expected_coordinator_key and decoded.coordinator_public_key != expected_coordinator_key:
        out.problems.append("receipt was countersigned by a different coordinator")
    return out


def verify_receipt_message(
    receipt: receipt_pb2.Receipt, expected_coordinator_key: bytes = b""
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


def check_worker_receipt(body: bytes, signature: bytes, expected: ExpectedReceipt) -> list[str]:
    """Problems with the receipt body a worker sent for a result; empty when acceptable."""
    decoded = decode_body(body)
    if decoded is None or not body:
        return ["receipt body is not a dispatch.v1.ReceiptBody"]
    problems = []
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
    ]
    for name, got, want in checks:
        if got != want:
            problems.append(f"receipt {name} does not match the job")
    if not decoded.HasField("started_at") or not decoded.HasField("completed_at"):
        problems.append("receipt needs started_at and completed_at")
    if not verify(expected.worker_public_key, SIGNING_CONTEXT, body, signature):
        problems.append("worker receipt signature does not verify")
    return problems


# --- Merkle batching -------------------------------------------------------------------
# Leaves are receipt hashes. leaf = H(0x00 || receipt_sha256); node = H(0x01 || left || right);
# an odd node at the end of a level is carried up unchanged. The prefixes keep a leaf from
# being passed off as an inner node.


def _leaf(h: bytes) -> bytes:
    return sha256(b"\x00" + h)


def _node(a: bytes, b: bytes) -> bytes:
    return sha256(b"\x01" + a + b)


def merkle_root(receipt_hashes: list[bytes]) -> bytes:
    if not receipt_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = [_leaf(h) for h in receipt_hashes]
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_proof(receipt_hashes: list[bytes], index: int) -> list[bytes]:
    """Sibling hashes from the leaf at index up to the root (carried-up levels add none)."""
    if not 0 <= index < len(receipt_hashes):
        raise ValueError("leaf index out of range")
    level = [_leaf(h) for h in receipt_hashes]
    proof: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return proof


def verify_merkle_proof(
    receipt_sha256: bytes, index: int, count: int, proof: list[bytes], root: bytes
) -> bool:
    if not 0 <= index < count:
        return False
    h, width, steps = _leaf(receipt_sha256), count, iter(proof)
    while width > 1:
        if index % 2 == 1:
            sib = next(steps, None)
            if sib is None:
                return False
            h = _node(sib, h)
        elif index + 1 < width:
            sib = next(steps, None)
            if sib is None:
                return False
            h = _node(h, sib)
        index, width = index // 2, (width + 1) // 2
    return next(steps, None) is None and h == root
