"""Client-worker pairing for PRIVATE jobs.

Codes are 8 characters from a 32-letter alphabet (40 bits), shown as XXXX-XXXX, single use,
short-lived, and stored only as SHA-256 hashes. A worker claims one with its own key.
Failed claims are limited per worker key and for everyone together (see FailureLimiter):
past a limit, claims are refused for a while, even with the right code.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from dispatchnet import protocol
from dispatchnet.coordinator.jobs import new_id
from dispatchnet.coordinator.models import Pairing
from dispatchnet.coordinator.ports import PairingRepository
from dispatchnet.coordinator.ratelimit import FailureLimiter, whole_seconds
from dispatchnet.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    quoted,
)
from dispatchnet.profiles import PairingConfig

ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ0123456789"  # no I, L, O, U
CODE_LEN = 8
MAX_TTL = protocol.MAX_PAIRING_TTL_SECONDS


def normalize(code: str) -> str:
    return "".join(c for c in code.upper() if c not in "- ")


def code_hash(code: str) -> bytes:
    return hashlib.sha256(b"dispatch.v1.PairingCode\n" + normalize(code).encode()).digest()


class PairingService:
    def __init__(
        self, store: PairingRepository, cfg: PairingConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = clock
        self.failures = FailureLimiter(
            cfg.max_failed_claims,
            cfg.failed_claims_window_seconds,
            cfg.max_failed_claims_global,
            cfg.failed_claims_global_window_seconds,
            cfg.max_tracked_keys,
        )

    async def create_code(self, client_id: str, ttl_seconds: int) -> tuple[str, float]:
        ttl = ttl_seconds or self.cfg.code_ttl_seconds
        if not 1 <= ttl <= MAX_TTL:
            raise InvalidArgument(f"ttl_seconds must be between 1 and {MAX_TTL}")
        raw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LEN))
        now = self.clock()
        expires = now + ttl
        await self.store.put_pairing_code(
            code_hash(raw), client_id, expires, now, self.cfg.max_live_codes
        )
        return f"{raw[:4]}-{raw[4:]}", expires

    async def claim(self, worker_id: str, code: str) -> Pairing:
        """Pairs worker_id with the code's client. ResourceExhausted while worker_id (or
        everyone) has too many failed claims in the window, whatever the code."""
        wait = self.failures.retry_after(worker_id, self.clock())
        if wait > 0:
            raise ResourceExhausted(
                f"too many failed pairing claims; try again in {whole_seconds(wait)} s"
            )
        norm = normalize(code)
        if len(norm) != CODE_LEN or any(c not in ALPHABET for c in norm):
            raise InvalidArgument("a pairing code looks like XXXX-XXXX")
        digest = code_hash(norm)
        if await self.store.pairing_code_owner(digest, self.clock()) == worker_id:
            raise InvalidArgument("a key cannot pair with itself (claim with the worker's key)")
        client_id = await self.store.claim_pairing_code(digest, self.clock())
        if client_id is None:
            self.failures.failed(worker_id, self.clock())
            raise NotFound("pairing code is unknown, already used or expired")
        self.failures.succeeded(worker_id)
        return await self.store.put_pairing(
            Pairing(new_id("pair"), client_id, worker_id, self.clock()), self.cfg.max_pairings
        )

    async def list(self, party_id: str, include_revoked: bool) -> list[Pairing]:
        return await self.store.list_pairings(party_id, include_revoked)

    async def revoke(self, party_id: str, pairing_id: str) -> Pairing:
        if not pairing_id:
            raise InvalidArgument("pairing_id is required")
        p = await self.store.get_pairing(pairing_id)
        if p is None:
            raise NotFound(f"pairing {quoted(pairing_id)} does not exist")
        if party_id not in (p.client_id, p.worker_id):
            raise PermissionDenied("only the paired client or worker may revoke a pairing")
        revoked = await self.store.revoke_pairing(pairing_id, self.clock())
        assert revoked is not None
        return revoked
