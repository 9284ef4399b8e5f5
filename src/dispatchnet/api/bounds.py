"""Length limits of the ids callers send, checked on every request message before anything
looks an id up (documented on each field in proto/dispatch/v1/*.proto).

The edge (api/edge.py, DecodeInterceptor) runs `oversized_id` on every request, unary or
streamed, so no servicer, domain call or store lookup ever sees a multi-MiB id.
"""

from __future__ import annotations

from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from dispatchnet.coordinator.jobs import MAX_IDEMPOTENCY_KEY

# Ids the coordinator makes are "<prefix>_" + 24 hex digits; 64 leaves room to change that.
MAX_ID_CHARS = 64
# A pairing code is XXXX-XXXX; spaces and dashes are ignored, so allow some.
MAX_PAIRING_CODE_CHARS = 32
# A uint256 in decimal.
MAX_AGENT_ID_CHARS = 78
MAX_CANCEL_REASON_CHARS = 512

# By field name, in any message; or by full name, for one field.
LIMITS: dict[str, int] = {
    "job_id": MAX_ID_CHARS,
    "quote_id": MAX_ID_CHARS,
    "pairing_id": MAX_ID_CHARS,
    "running_job_ids": MAX_ID_CHARS,
    "idempotency_key": MAX_IDEMPOTENCY_KEY,
    "dispatch.v1.ClaimPairingRequest.code": MAX_PAIRING_CODE_CHARS,
    "dispatch.v1.Hello.agent_id": MAX_AGENT_ID_CHARS,
    "dispatch.v1.CancelJobRequest.reason": MAX_CANCEL_REASON_CHARS,
}

Plan = tuple[tuple[tuple[FieldDescriptor, int], ...], tuple[FieldDescriptor, ...]]


def _limit(fd: FieldDescriptor) -> int | None:
    if fd.type != FieldDescriptor.TYPE_STRING:
        return None
    return LIMITS.get(fd.full_name, LIMITS.get(fd.name))


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
