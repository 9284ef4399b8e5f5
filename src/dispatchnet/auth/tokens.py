"""Client authentication tokens: proof that the caller holds an ed25519 key.

A token is  v1.<public key, base64url>.<expiry, unix seconds>.<signature, base64url>
where the signature is ed25519 over  "dispatch.v1.ClientAuth\\n" || public key || expiry
(the expiry as ASCII digits). It travels as gRPC metadata
``authorization: Dispatch <token>``. The caller's identity (client_id) is the hex of the
public key; nothing the caller merely declares is trusted.

Tokens are bearer credentials until they expire: keep their lifetime short (the SDK signs
a fresh one per minute; `dispatch auth header` defaults to one hour) and use TLS beyond
loopback.

The coordinator verifies a token's signature once: a TokenCache remembers the tokens whose
signature verified (at most TOKEN_CACHE_SIZE, least recently used first out) until they
expire; every other check (format, expiry, lifetime limit) still runs on every call.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from dispatchnet.errors import Unauthenticated
from dispatchnet.keys import KeyPair, verify

CONTEXT = b"dispatch.v1.ClientAuth\n"
SCHEME = "Dispatch"
METADATA_KEY = "authorization"
MAX_CLOCK_SKEW = 60
# Tokens whose signature verified, remembered per coordinator (~300 bytes each).
TOKEN_CACHE_SIZE = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# a token's parts as README "Wire formats" has them: base64url without padding, and the
# expiry's decimal digits with no sign, no leading zero (the signed bytes are these digits)
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_EXPIRY = re.compile(r"[1-9][0-9]{0,18}")


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url without padding")
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


class TokenCache:
    """Tokens whose ed25519 signature verified: at most `size`, least recently used out.

    Keyed by the decoded (public key, expiry, signature), which is exactly what the
    signature check reads, so two spellings of one token share an entry and a cached
    entry is worth what a fresh check would be. Only verified tokens go in; a token is
    never accepted past its expiry (verify_header checks it before looking here)."""

    def __init__(self, size: int = TOKEN_CACHE_SIZE) -> None:
        self.size = size
        self._verified: OrderedDict[tuple[bytes, int, bytes], None] = OrderedDict()
        # the exact `authorization` values that verified -> (caller, expiry, key): the same
        # value again is known without decoding it while its key is cached (the expiry and
        # the lifetime limit are still checked on every call)
        self.values: dict[str, tuple[Caller, int, tuple[bytes, int, bytes]]] = {}

    def seen(self, value: str, caller: Caller, expires: int, key: tuple[bytes, int, bytes]) -> None:
        """Remembers a value whose key verified (the oldest goes past `size`)."""
        self.values[value] = (caller, expires, key)
        while len(self.values) > self.size:
            del self.values[next(iter(self.values))]

    def __len__(self) -> int:
        return len(self._verified)

    def hit(self, key: tuple[bytes, int, bytes]) -> bool:
        if key not in self._verified:
            return False
        self._verified.move_to_end(key)
        return True

    def add(self, key: tuple[bytes, int, bytes]) -> None:
        self._verified[key] = None
        self._verified.move_to_end(key)
        while len(self._verified) > self.size:
            self._verified.popitem(last=False)

    def forget(self, key: tuple[bytes, int, bytes]) -> None:
        self._verified.pop(key, None)


def verify_header(
    value: str, max_ttl_seconds: int, now: float | None = None, cache: TokenCache | None = None
) -> Caller:
    """Checks an `authorization` value; raises Unauthenticated saying what is wrong.

    With a cache, the signature of a token seen (and verified) before is not checked
    again until the token expires."""
    now = time.time() if now is None else now
    if cache is not None:
        known = cache.values.get(value)
        if (
            known is not None
            and now <= known[1] <= now + max_ttl_seconds + MAX_CLOCK_SKEW
            and cache.hit(known[2])
        ):
            return known[0]
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
        if not _EXPIRY.fullmatch(parts[2]):
            raise ValueError("the expiry is not decimal digits without a leading zero")
        expires = int(parts[2])
        signature = _unb64(parts[3])
    except (ValueError, binascii.Error) as e:
        raise Unauthenticated("malformed token: bad base64 or expiry") from e
    if len(public_key) != 32:
        raise Unauthenticated("malformed token: the public key must be 32 bytes")
    key = (public_key, expires, signature)
    if expires < now:
        if cache is not None:
            cache.forget(key)
        raise Unauthenticated("token expired; sign a new one")
    if expires > now + max_ttl_seconds + MAX_CLOCK_SKEW:
        raise Unauthenticated(
            f"token lifetime exceeds the coordinator's limit of {max_ttl_seconds}s"
        )
    who = Caller(public_key)
    if cache is not None and cache.hit(key):
        cache.seen(value, who, expires, key)
        return who
    if not verify(public_key, CONTEXT, public_key + str(expires).encode(), signature):
        raise Unauthenticated("token signature does not verify")
    if cache is not None:
        cache.add(key)
        cache.seen(value, who, expires, key)
    return who
