"""Length limits of the ids clients send (dispatchnet.protocol; documented on each field in
proto/dispatch/v1/*.proto), checked before anything looks an id up.

The edge (api/edge.py, EdgeInterceptor) runs `oversized_id` on every request message of a
type that has such ids, so no servicer, domain call or store lookup ever sees a multi-MiB id.
"""

from __future__ import annotations

from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from dispatchnet import protocol

# By full field name. Worker messages on Connect are checked by api/convert.py
# (check_worker_message, hello_from_proto) against the other limits of dispatchnet.protocol.
LIMITS: dict[str, int] = {
    "dispatch.v1.CommitJobRequest.quote_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.CommitJobRequest.idempotency_key": protocol.MAX_IDEMPOTENCY_KEY_CHARS,
    "dispatch.v1.RunJobRequest.quote_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.RunJobRequest.idempotency_key": protocol.MAX_IDEMPOTENCY_KEY_CHARS,
    "dispatch.v1.GetJobRequest.job_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.WatchJobRequest.job_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.CancelJobRequest.job_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.CancelJobRequest.reason": protocol.MAX_CANCEL_REASON_CHARS,
    "dispatch.v1.GetReceiptRequest.job_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.GetReceiptProofRequest.job_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.GetEarningsRequest.worker_id": protocol.MAX_ID_CHARS,
    "dispatch.v1.GetEarningsRequest.page_token": protocol.MAX_PAGE_TOKEN_CHARS,
    "dispatch.v1.ClaimPairingRequest.code": protocol.MAX_PAIRING_CODE_CHARS,
    "dispatch.v1.RevokePairingRequest.pairing_id": protocol.MAX_ID_CHARS,
}

Plan = tuple[tuple[tuple[FieldDescriptor, int], ...], tuple[FieldDescriptor, ...]]


def _limit(fd: FieldDescriptor) -> int | None:
    if fd.type != FieldDescriptor.TYPE_STRING:
        return None
    return LIMITS.get(fd.full_name)


@cache
def _plan(descriptor: Descriptor, visiting: frozenset[str] = frozenset()) -> Plan:
    """The bounded string fields of a message type, and the message fields that lead to
    more of them (computed once per type)."""
    checks = tuple((fd, n) for fd in descriptor.fields if (n := _limit(fd)) is not None)
    inner = visiting | {descriptor.full_name}
    children = tuple(
        fd
        for fd in descriptor.fields
        if fd.message_type is not None
        and fd.message_type.full_name not in inner
        and any(_plan(fd.message_type, inner))
    )
    return checks, children


def has_limits(descriptor: Descriptor) -> bool:
    """Whether messages of this type can hold a bounded id (else oversized_id is None)."""
    return any(_plan(descriptor))


def oversized_id(msg: Message, prefix: str = "") -> str | None:
    """Why msg has an id over its limit ("job_id is 4194304 characters; the limit is 64"),
    or None. Only bounded fields are read; bytes and other strings are never copied."""
    checks, children = _plan(msg.DESCRIPTOR)
    for fd, limit in checks:
        values = getattr(msg, fd.name)
        for i, value in enumerate(values if fd.is_repeated else [values]):
            if len(value) > limit:
                where = f"{prefix}{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
                return f"{where} is {len(value)} characters; the limit is {limit}"
    for fd in children:
        if fd.is_repeated:
            subs = list(enumerate(getattr(msg, fd.name)))
        elif msg.HasField(fd.name):
            subs = [(-1, getattr(msg, fd.name))]
        else:
            continue
        for i, sub in subs:
            name = f"{prefix}{fd.name}" + (f"[{i}]" if i >= 0 else "")
            found = oversized_id(sub, name + ".")
            if found:
                return found
    return None
