"""The Store: every store port of the domain (coordinator/ports.py, one per aggregate) in
one object, which is what a coordinator opens and what each engine implements.

The event loop never waits on storage: an implementation does its I/O, lock waits and
sweeps elsewhere and the awaiting coroutine resumes when the answer is there. A write is
acknowledged (its coroutine returns) only once it is committed. Implementations, chosen by
the `[store] url` scheme in store/registry.py:
- store/threaded.py over store/sqlite.py: the embedded default, SQLite served by its own
  connection threads (one writer, parallel readers under WAL); the synchronous
  SqliteStore has the same methods and is what tools and tests of the SQL itself use;
- store/postgres.py: PostgreSQL through asyncpg's connection pool (natively async), which
  several coordinators may share.
"""

from __future__ import annotations

from typing import Protocol

from dispatchnet.coordinator.ports import (
    EarningsLedger,
    FeedbackOutbox,
    JobChanges,
    JobRepository,
    PairingRepository,
    PassLocks,
    PaymentLedger,
    PayoutLedger,
    QuoteLimits,
    QuoteStore,
    QuoteUsage,
    ReceiptBatches,
    Runnable,
    VerificationRuns,
    WorkerRegistry,
)

__all__ = ["QuoteLimits", "QuoteUsage", "Runnable", "Store"]


class Store(
    QuoteStore,
    JobRepository,
    VerificationRuns,
    PaymentLedger,
    EarningsLedger,
    PayoutLedger,
    PairingRepository,
    ReceiptBatches,
    FeedbackOutbox,
    WorkerRegistry,
    PassLocks,
    JobChanges,
    Protocol,
):
    """Every store port, and the store's end."""

    async def close(self) -> None:
        """Finishes the writes already submitted, then releases the store's connections
        (and threads); idempotent. Calls after it raise Unavailable."""
        ...
