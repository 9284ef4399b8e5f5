"""End-to-end encryption of PRIVATE jobs: the client seals the input to each paired worker,
the worker seals the output to the client, and the coordinator only ever holds ciphertext.

The wire format (exact byte layouts, key conversion, prefixes) is documented on SealedInput,
PrivateInput and PrivateOutput in proto/dispatch/v1/common.proto, and the keyed plaintext
hashes on ReceiptBody. In short: NaCl crypto_box (X25519, XSalsa20-Poly1305) between the
X25519 forms of the ed25519 keys both sides already prove (the worker at Connect, the client
with its tokens), a random 24-byte nonce in front of each box. One box key serves both
directions of a client-worker pair, so a client can reopen its own envelopes later.
Shared by the worker runtime and the clients (CLI, SDK); the coordinator never opens a box.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import VerifyKey

from dispatch.v1 import common_pb2, receipt_pb2
from dispatchnet.keys import KeyPair
from dispatchnet.protocol import MAX_SEALED_ENVELOPES

INPUT_PREFIX = b"dispatch.v1.PrivateInput\n"
OUTPUT_PREFIX = b"dispatch.v1.PrivateOutput\n"
HASH_PREFIX = b"dispatch.v1.PrivateHash\n"
SEALED_CONTENT_TYPE = "application/vnd.dispatch.sealed"
SECRET_BYTES = 32
NONCE_BYTES = Box.NONCE_SIZE  # 24
MAC_BYTES = 16


class SealError(ValueError):
    """A box that does not open with the keys it should, or whose content is not what the
    job says (another job, another spec, a malformed message)."""


def x25519_public(ed25519_public_key: bytes) -> PublicKey:
    """The X25519 form of an ed25519 public key (crypto_sign_ed25519_pk_to_curve25519)."""
    if len(ed25519_public_key) != 32:
        raise SealError("an ed25519 public key is 32 bytes")
    try:
        return VerifyKey(ed25519_public_key).to_curve25519_public_key()
    except (CryptoError, ValueError) as e:
        raise SealError(f"not a valid ed25519 public key: {e}") from None


def x25519_secret(key: KeyPair) -> PrivateKey:
    """The X25519 form of an ed25519 key (crypto_sign_ed25519_sk_to_curve25519)."""
    return key.signing_key.to_curve25519_private_key()


def _box(key: KeyPair, peer: bytes) -> Box:
    return Box(x25519_secret(key), x25519_public(peer))


def _seal(key: KeyPair, peer: bytes, plaintext: bytes) -> bytes:
    """nonce (24 random bytes) || MAC (16) || ciphertext, from key to peer."""
    return bytes(_box(key, peer).encrypt(plaintext))


def _open(key: KeyPair, peer: bytes, box: bytes, what: str) -> bytes:
    if len(box) < NONCE_BYTES + MAC_BYTES:
        raise SealError(f"{what} is {len(box)} bytes, shorter than a box")
    try:
        return bytes(_box(key, peer).decrypt(box))
    except CryptoError:
        raise SealError(
            f"{what} does not decrypt: it was altered, or not sealed between these keys"
        ) from None


def private_hash(secret: bytes, data: bytes) -> bytes:
    """SHA-256("dispatch.v1.PrivateHash\\n" || secret || data): a receipt's plaintext hash,
    checkable only by who knows the job's secret (the client and the worker)."""
    return hashlib.sha256(HASH_PREFIX + secret + data).digest()


def clear_work(spec: common_pb2.JobSpec) -> common_pb2.JobSpec:
    """The part of spec's work that stays in clear on a sealed job (no payload, no policy
    or privacy): what the worker checks the inner spec against."""
    out = common_pb2.JobSpec()
    if spec.WhichOneof("work") == "llm":
        out.llm.model = spec.llm.model
        out.llm.max_tokens = spec.llm.max_tokens
        out.llm.temperature = spec.llm.temperature
    elif spec.WhichOneof("work") == "task":
        out.task.name = spec.task.name
        out.task.use_llm = spec.task.use_llm
    return out


def seal_spec(
    spec: common_pb2.JobSpec, client: KeyPair, worker_keys: Iterable[bytes], secret: bytes = b""
) -> common_pb2.JobSpec:
    """spec as a PRIVATE job whose payload is sealed to each worker key (ed25519, 32 bytes):
    the clear metadata outside, the whole spec inside one envelope per worker."""
    keys = sorted(set(worker_keys))
    if not keys:
        raise SealError("a sealed job needs at least one recipient worker")
    if len(keys) > MAX_SEALED_ENVELOPES:
        raise SealError(f"a sealed job has at most {MAX_SEALED_ENVELOPES} recipient workers")
    if spec.HasField("sealed"):
        raise SealError("the spec is sealed already")
    inner = common_pb2.JobSpec()
    inner.CopyFrom(spec)
    inner.privacy = common_pb2.PRIVACY_PRIVATE
    private = common_pb2.PrivateInput(
        spec=inner.SerializeToString(deterministic=True),
        secret=secret or secrets.token_bytes(SECRET_BYTES),
    )
    plaintext = INPUT_PREFIX + private.SerializeToString(deterministic=True)
    outer = clear_work(spec)
    outer.policy = spec.policy
    outer.privacy = common_pb2.PRIVACY_PRIVATE
    outer.verify = spec.verify  # in clear: the coordinator refuses verify > 1 on PRIVATE
    for k in keys:
        outer.sealed.envelopes.add(worker_public_key=k, box=_seal(client, k, plaintext))
    return outer


@dataclass(frozen=True)
class OpenedInput:
    """The plaintext of a sealed job's input."""

    spec: common_pb2.JobSpec  # the full spec to run
    spec_bytes: bytes  # its serialization as the client sealed it (what the hash covers)
    secret: bytes

    @property
    def input_hash(self) -> bytes:
        return private_hash(self.secret, self.spec_bytes)


def open_input(
    spec: common_pb2.JobSpec, key: KeyPair, peer: bytes, recipient: bytes = b""
) -> OpenedInput:
    """Opens the envelope of `recipient` (default: key's own) in a sealed spec. The worker
    passes its key and the job's client key as peer; the client its key and the worker's.
    SealError when there is no such envelope, it does not open, or what it holds is not a
    spec matching the clear metadata."""
    recipient = recipient or key.public_key
    envelope = next((e for e in spec.sealed.envelopes if e.worker_public_key == recipient), None)
    if envelope is None:
        raise SealError("the job has no envelope for this worker")
    plaintext = _open(key, peer, envelope.box, "the sealed input")
    if not plaintext.startswith(INPUT_PREFIX):
        raise SealError("the sealed input is not a dispatch.v1.PrivateInput")
    private = common_pb2.PrivateInput()
    inner = common_pb2.JobSpec()
    try:
        private.ParseFromString(plaintext[len(INPUT_PREFIX) :])
        inner.ParseFromString(private.spec)
    except Exception:
        raise SealError("the sealed input does not parse") from None
    if len(private.secret) != SECRET_BYTES:
        raise SealError(f"the sealed input's secret must be {SECRET_BYTES} bytes")
    if inner.HasField("sealed") or inner.WhichOneof("work") is None:
        raise SealError("the sealed input's spec must have work and no sealed input")
    if clear_work(inner) != clear_work(spec) or inner.WhichOneof("work") != spec.WhichOneof("work"):
        raise SealError("the sealed input does not match the job's clear metadata")
    return OpenedInput(inner, private.spec, private.secret)


def seal_output(
    worker: KeyPair,
    client_public_key: bytes,
    job_id: str,
    input_sha256: bytes,
    output: bytes,
    content_type: str,
) -> bytes:
    """The JobResult.output of a sealed job: PrivateOutput boxed from worker to client."""
    message = common_pb2.PrivateOutput(
        job_id=job_id, input_sha256=input_sha256, output=output, content_type=content_type
    )
    return _seal(worker, client_public_key, OUTPUT_PREFIX + message.SerializeToString())


def open_output(
    client: KeyPair, worker_public_key: bytes, box: bytes, job_id: str, input_sha256: bytes
) -> common_pb2.PrivateOutput:
    """Opens a sealed job's result; SealError when it does not open or is for another job."""
    plaintext = _open(client, worker_public_key, box, "the sealed output")
    if not plaintext.startswith(OUTPUT_PREFIX):
        raise SealError("the sealed output is not a dispatch.v1.PrivateOutput")
    message = common_pb2.PrivateOutput()
    try:
        message.ParseFromString(plaintext[len(OUTPUT_PREFIX) :])
    except Exception:
        raise SealError("the sealed output does not parse") from None
    if message.job_id != job_id:
        raise SealError(f"the sealed output is for job {message.job_id!r}, not {job_id!r}")
    if message.input_sha256 != input_sha256:
        raise SealError("the sealed output was made from another input")
    return message


@dataclass(frozen=True)
class PrivateResult:
    """A sealed job's result, opened and checked against its receipt."""

    output: bytes
    content_type: str
    worker_public_key: bytes


def open_result(
    client: KeyPair,
    job_id: str,
    spec: common_pb2.JobSpec,
    result: common_pb2.JobResult,
    receipt_body: bytes,
) -> PrivateResult:
    """Opens a completed sealed job's output and checks the receipt's four hashes: the
    ciphertexts the coordinator saw (input_sha256 against the spec, output_sha256 against
    JobResult.output) and the plaintexts (private_input_sha256 against the reopened
    envelope, private_output_sha256 against the opened output). Signatures are checked
    elsewhere (receipts.core.verify_receipt). SealError naming the first mismatch."""
    body = receipt_pb2.ReceiptBody()
    try:
        body.ParseFromString(receipt_body)
    except Exception:
        raise SealError("the receipt body does not parse") from None
    worker = body.worker_public_key
    if body.job_id != job_id:
        raise SealError("the receipt is for another job")
    if hashlib.sha256(result.output).digest() != body.output_sha256:
        raise SealError("the receipt's output_sha256 is not the hash of the sealed output")
    spec_hash = hashlib.sha256(spec.SerializeToString(deterministic=True)).digest()
    if spec_hash != body.input_sha256:
        raise SealError("the receipt's input_sha256 is not the hash of the sealed spec")
    opened = open_input(spec, client, worker, recipient=worker)
    if body.private_input_sha256 != opened.input_hash:
        raise SealError("the receipt's private_input_sha256 does not match the sealed input")
    message = open_output(client, worker, result.output, job_id, body.input_sha256)
    if body.private_output_sha256 != private_hash(opened.secret, message.output):
        raise SealError("the receipt's private_output_sha256 does not match the output")
    return PrivateResult(message.output, message.content_type, worker)
