"""Client authentication tokens: proof that the caller holds an ed25519 key.

A token is  v1.<public key, base64url>.<expiry, unix seconds>.<signature, base64url>
where the signature is ed25519 over  "dispatch.v1.ClientAuth\\n" || public key || expiry
(the expiry as ASCII digits). It travels as gRPC metadata
``authorization: Dispatch <token>``. The caller's identity (client_id) is the hex of the
public key; nothing the caller merely declares is trusted.

Tokens are bearer credentials until they expire: keep their lifetime short (the SDK signs
a fresh one per minute; `dispatch auth header` defaults to one hour) and use TLS beyond
loopback.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

from dispatchnet.errors import Unauthenticated
from dispatchnet.keys import KeyPair, verify

CONTEXT = b"dispatch.v1.ClientAuth\n"
SCHEME = "Dispatch"
METADATA_KEY = "authorization"
MAX_CLOCK_SKEW = 60


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(key: KeyPair, ttl_seconds: int = 300, now: float | None = None) -> str:
    """A token for key, valid for ttl_seconds."""
    expires = int(now if now is not None else time.time()) + int(ttl_seconds)
    sig = key.sign(CONTEXT, key.public_key + str(expires).encode())
    return f"v1.{_b64(key.public_key)}.{expires}.{_b64(sig)}"


def metadata_value(key: KeyPair, ttl_seconds: int = 300) -> str:
    """The value of the `authorization` metadata entry."""
    return f"{SCHEME} {make_token(key, ttl_seconds)}"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    public_key: bytes

    @property
    def id(self) -> str:
        return self.public_key.hex()


def verify_header(value: str, max_ttl_seconds: int, now: float | None = None) -> Caller:
    """Checks an `authorization` value; raises Unauthenticated saying what is wrong."""
    now = time.time() if now is None else now
    scheme, _, token = value.strip().partition(" ")
    if scheme != SCHEME or not token:
        raise Unauthenticated(
            f"authorization must be '{SCHEME} <token>' (see `dispatch auth header`)"
        )
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != "v1":
        raise Unauthenticated("malformed token: expected v1.<key>.<expiry>.<signature>")
    try:
        public_key = _unb64(parts[1])
        expires = int(parts[2])
        signature = _unb64(parts[3])
    except (ValueError, binascii.Error) as e:
        raise Unauthenticated("malformed token: bad base64 or expiry") from e
    if len(public_key) != 32:
        raise Unauthenticated("malformed token: the public key must be 32 bytes")
    if expires < now:
        raise Unauthenticated("token expired; sign a new one")
    if expires > now + max_ttl_seconds + MAX_CLOCK_SKEW:
        raise Unauthenticated(
            f"token lifetime exceeds the coordinator's limit of {max_ttl_seconds}s"
        )
    if not verify(public_key, CONTEXT, public_key + str(expires).encode(), signature):
        raise Unauthenticated("token signature does not verify")
    return Caller(public_key)
