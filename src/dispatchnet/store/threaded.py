"""The Store port over SqliteStore, served by threads so the event loop never waits on SQLite.

One writer thread owns the writing SqliteStore (which migrates the schema when it opens);
every write is queued to it. Group commit: the writer takes every write waiting in its
queue (at most max_group) and runs two or more in one BEGIN IMMEDIATE ... COMMIT, each in
its own savepoint, so an operation that raises undoes only its own changes and its caller
alone gets the error. A write's coroutine returns only after the COMMIT holding it
returned; when BEGIN or COMMIT fails, every operation of the group gets that error.

The writes run on that writer thread (writer="thread"), or in a process of their own
(writer="process", store/writer_process.py), driven from the event loop that opened the
store with no writer thread: the statements then run without waiting for the event loop's
interpreter lock. Only a file database with reader threads, opened on a running loop,
can; the others keep the thread.

Reads go to `readers` threads, each with its own read-only connection, in parallel under
WAL; a read issued after a write was acknowledged sees it (it is committed). A ":memory:"
database has one connection: its reads run on the writer thread, in queue order, between
groups (never inside one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from dispatchnet.coordinator.models import (
    AnchorStatus,
    Balance,
    Earning,
    Event,
    FeedbackEntry,
    FeedbackStatus,
    Job,
    JobState,
    Pairing,
    Payment,
    PaymentStatus,
    PayoutDue,
    PayoutRecord,
    PayoutRowState,
    PriorMove,
    Quote,
    ReceiptBatch,
    ReceiptLeaf,
    Run,
    Split,
    UnbatchedReceipt,
    WorkerDay,
)
from dispatchnet.coordinator.ports import ONE_PROCESS
from dispatchnet.errors import Unavailable
from dispatchnet.store.base import QuoteLimits, QuoteUsage, Runnable, Store
from dispatchnet.store.rows import stored_job
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.store.writer_process import Call, LoopWriter, Outcome, run_group, run_one

T = TypeVar("T")
P = ParamSpec("P")

WRITERS = ("process", "thread")  # where the writes run: see the module's docstring

_MEMORY = ("", ":memory:")  # databases private to their one connection


@dataclass(frozen=True)
class StoreStats:
    """What the store's threads did since it opened."""

    writes: int  # write operations run (alone or in a group)
    commits: int  # write transactions: one per group, one per write run alone
    largest_group: int  # most writes committed by one transaction
    reads: int  # read operations run


@dataclass(frozen=True)
class _Op:
    fn: Callable[[SqliteStore], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    write: bool
    call: Call | None = None  # fn as a method call, for the writer process


_STOP = None  # queued last by close(): the thread that takes it finishes and exits


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # its awaiting coroutine was cancelled; the operation ran anyway
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _translated(e: Any) -> Any:
    """SQLite's transient failures as the Unavailable they are to a caller (the edge then
    answers UNAVAILABLE: retry), keeping SQLite's own error as the cause."""
    if isinstance(e, sqlite3.OperationalError):
        text = str(e).lower()
        if "locked" in text or "busy" in text:
            busy = Unavailable(
                f"the coordinator's database is busy ({e}): another process holds its write "
                "lock; retry"
            )
            busy.__cause__ = e
            return busy
        if "disk is full" in text or "disk i/o" in text:
            full = Unavailable(f"the coordinator's database cannot write ({e}); retry later")
            full.__cause__ = e
            return full
    return e


def _deliver(op: _Op, ok: bool, value: Any) -> None:
    if not ok:
        value = _translated(value)
    try:
        op.loop.call_soon_threadsafe(_settle, op.future, ok, value)
    except RuntimeError:  # its loop is closed: nobody is waiting any more
        pass


def _deliver_all(ops: Sequence[_Op], outcomes: Sequence[Outcome]) -> None:
    """Each op's outcome, with one wake-up of each event loop for all of them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for op, (ok, value) in zip(ops, outcomes, strict=True):
        by_loop.setdefault(op.loop, []).append((op.future, ok, value if ok else _translated(value)))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:  # its loop is closed: nobody is waiting any more
            pass


def _settle_on(ops: list[_Op], outcomes: list[Outcome]) -> None:
    """The writer process's outcomes, read on its loop: settled at once for the operations
    of that loop, handed to their own loop for the others."""
    here = asyncio.get_running_loop()
    elsewhere: list[_Op] = []
    away: list[Outcome] = []
    for op, (ok, value) in zip(ops, outcomes, strict=True):
        if op.loop is here:
            _settle(op.future, ok, value if ok else _translated(value))
        else:
            elsewhere.append(op)
            away.append((ok, value))
    if elsewhere:
        _deliver_all(elsewhere, away)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        _settle(future, ok, value)


class ThreadedStore:
    """Store whose writes run on a writer thread (or in a writer process) and whose reads
    run on `readers` reader threads.

    Construction only starts the threads, and with writer="process" the child (they open
    their connections; an error opening comes back from the first operations and from
    wait_open, which open_store awaits).
    close() runs the writes already queued, stops the threads and closes the connections.
    Calls after close() raise Unavailable.
    """

    def __init__(
        self,
        path: str | Path,
        synchronous: str = "NORMAL",
        readers: int = 2,
        max_group: int = 256,
        writer: str = "thread",
        writer_nice: int = 0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("sqlite_synchronous must be NORMAL or FULL")
        if writer not in WRITERS:
            raise ValueError(f"sqlite_writer must be one of {', '.join(WRITERS)}")
        if readers < 0 or max_group < 1:
            raise ValueError("readers must be >= 0 and max_group >= 1")
        if not 0 <= writer_nice <= 19:
            raise ValueError("sqlite_writer_nice must be 0-19")
        self.path = str(path)
        self._synchronous = synchronous
        self._max_group = max_group
        self._readers = 0 if self.path in _MEMORY else readers
        # the writer process needs reads elsewhere (it runs method calls, not functions)
        # and a loop to drive it
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self.writer = writer if self._readers and loop is not None else "thread"
        self._wq: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._rq: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        # each counter is written by one thread only; stats() sums them
        self._writes = self._commits = self._largest_group = self._writer_reads = 0
        self._reads = [0] * self._readers
        # outcome of each thread's open, and each thread's end (thread-safe futures)
        self._writer_open: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._opened = [self._writer_open] + [
            concurrent.futures.Future() for _ in range(self._readers)
        ]
        self._ended: list[concurrent.futures.Future[None]] = [
            concurrent.futures.Future() for _ in range(1 + self._readers)
        ]
        self._pipe: LoopWriter | None = None
        self._pipe_closed: asyncio.Future[None] | None = None
        self._threads: list[threading.Thread] = []
        if self.writer == "process":
            assert loop is not None
            try:
                self._pipe = LoopWriter(
                    self.path, synchronous, max_group, loop, self._writer_open, _settle_on,
                    writer_nice,
                )  # fmt: skip
            except OSError:  # no child process could start: the thread does the writing
                self.writer = "thread"
        if self._pipe is None:
            self._threads.append(
                threading.Thread(target=self._writer, name="store-writer", daemon=True)
            )
        self._threads += [
            threading.Thread(target=self._reader, args=(i,), name=f"store-reader-{i}", daemon=True)
            for i in range(self._readers)
        ]
        for t in self._threads:
            t.start()

    # --- lifecycle ----------------------------------------------------------------------

    async def wait_open(self) -> None:
        """Returns once every connection is open; raises what opening one raised (e.g. a
        schema newer than this build, or a write lock held past busy_timeout)."""
        for opened in self._opened:
            await asyncio.wrap_future(opened)

    def pass_lock(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Always held: a SQLite store is one coordinator's."""
        return ONE_PROCESS.pass_lock(name)

    async def pass_still_held(self, name: str) -> bool:
        """Always: a SQLite store is one coordinator's."""
        return True

    async def listen_jobs(self, on_change: Callable[[str, JobState], None]) -> None:
        """Nothing to pass on: a SQLite store is one coordinator's."""

    async def close(self) -> None:
        """Runs the writes queued before it, stops the threads and closes their
        connections. Idempotent; concurrent calls all return when it is done."""
        if self._closing is None:
            self._closed = True
            if self._pipe is not None:
                self._pipe_closed = asyncio.ensure_future(self._close_pipe(self._pipe))
            else:
                self._wq.put(_STOP)
            for _ in range(self._readers):
                self._rq.put(_STOP)
            self._closing = asyncio.ensure_future(self._ended_all())
        await asyncio.shield(self._closing)

    async def _close_pipe(self, pipe: LoopWriter) -> None:
        try:
            if asyncio.get_running_loop() is pipe.loop:
                await pipe.close()
            else:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(pipe.close(), pipe.loop))
        finally:
            if not self._ended[0].done():
                self._ended[0].set_result(None)

    async def _ended_all(self) -> None:
        for ended in self._ended:
            await asyncio.wrap_future(ended)
        for t in self._threads:
            t.join()  # returns at once: the thread has finished its work

    async def __aenter__(self) -> ThreadedStore:
        await self.wait_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def stats(self) -> StoreStats:
        pipe = self._pipe
        return StoreStats(
            writes=self._writes + (pipe.writes if pipe else 0),
            commits=self._commits + (pipe.commits if pipe else 0),
            largest_group=max(self._largest_group, pipe.largest_group if pipe else 0),
            reads=self._writer_reads + sum(self._reads),
        )

    # --- escape hatches for tools -------------------------------------------------------

    async def run_read(self, fn: Callable[[SqliteStore], T]) -> T:
        """fn run with a reading SqliteStore (read-only, except for ":memory:"), on a
        reader thread; for what the Store port lacks (schema_version)."""
        return await self._read(fn)

    async def run_write(self, fn: Callable[[SqliteStore], T]) -> T:
        """fn run with the writing SqliteStore on the writer thread, possibly in a group
        (its _tx() blocks are then savepoints; whatever it raises rolls back its own
        changes only). Acknowledged once committed, like every write."""
        return await self._write(fn)

    # --- queueing -----------------------------------------------------------------------

    async def _submit(
        self, fn: Callable[[SqliteStore], T], write: bool, call: Call | None = None
    ) -> T:
        if self._closed:
            raise Unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        op = _Op(fn, loop, future, write, call)
        if write and self._pipe is not None:
            if call is None:
                raise RuntimeError(
                    "run_write runs a function, which only the writer thread can; this "
                    "store's writes run in a process"
                )
            if loop is self._pipe.loop:
                self._pipe.submit(op)
            else:
                self._pipe.loop.call_soon_threadsafe(self._pipe.submit, op)
            return await future
        (self._rq if self._readers and not write else self._wq).put(op)
        # a cancelled caller leaves the operation queued: it runs (and commits) anyway
        return await future

    async def _read(self, fn: Callable[[SqliteStore], T]) -> T:
        return await self._submit(fn, write=False)

    async def _write(self, fn: Callable[[SqliteStore], T]) -> T:
        return await self._submit(fn, write=True)

    async def _write_call(
        self,
        method: Callable[Concatenate[SqliteStore, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A write that is one SqliteStore method's call: it can run in the writer process."""
        return await self._submit(
            lambda s: method(s, *args, **kwargs), True, (method.__name__, args, kwargs)
        )

    # --- threads ------------------------------------------------------------------------

    def _writer(self) -> None:
        store: SqliteStore | None = None
        try:
            store = SqliteStore(self.path, self._synchronous, background_checkpoints=True)
        except Exception as e:
            failed: Exception | None = e
            self._writer_open.set_exception(e)
        else:
            failed = None
            self._writer_open.set_result(None)
        try:
            stopping = False
            while not stopping:
                batch = [self._wq.get()]
                while len(batch) < self._max_group:
                    try:
                        batch.append(self._wq.get_nowait())
                    except queue.Empty:
                        break
                group: list[_Op] = []
                for op in batch:
                    if op is not None and op.write and not stopping:
                        group.append(op)
                        continue
                    self._commit(store, group, failed)  # reads and the end wait for it
                    group = []
                    if op is None:
                        stopping = True
                    elif stopping:
                        _deliver(op, False, Unavailable("the store is closed"))
                    elif store is None:
                        _deliver(op, False, failed)
                    else:
                        self._writer_reads += 1
                        _deliver(op, *run_one(op.fn, store))
                self._commit(store, group, failed)
        finally:
            if store is not None:
                store.close()
            while True:  # queued by another loop's thread after close(): refused
                try:
                    late = self._wq.get_nowait()
                except queue.Empty:
                    break
                if late is not None:
                    _deliver(late, False, Unavailable("the store is closed"))
            self._ended[0].set_result(None)

    def _commit(
        self, store: SqliteStore | None, group: list[_Op], failed: Exception | None
    ) -> None:
        """Runs writes in one transaction (run_group), then answers each caller."""
        if not group:
            return
        if store is None:
            for op in group:
                _deliver(op, False, failed)
            return
        self._writes += len(group)
        self._commits += 1
        self._largest_group = max(self._largest_group, len(group))
        _deliver_all(group, run_group(store, [op.fn for op in group]))

    def _reader(self, index: int) -> None:
        store: SqliteStore | None = None
        failed: Exception | None = None
        try:
            self._writer_open.result()  # the schema is there before anyone reads it
            store = SqliteStore(self.path, self._synchronous, read_only=True)
        except Exception as e:
            failed = e
            self._opened[1 + index].set_exception(e)
        else:
            self._opened[1 + index].set_result(None)
        try:
            while (op := self._rq.get()) is not None:
                if store is None:
                    _deliver(op, False, failed)
                    continue
                self._reads[index] += 1
                _deliver(op, *run_one(op.fn, store))
        finally:
            if store is not None:
                store.close()
            self._ended[1 + index].set_result(None)

    # --- quotes -------------------------------------------------------------------------

    async def put_quote(
        self,
        quote: Quote,
        owner: str = "",
        size: int = 0,
        module: bytes | None = None,
        limits: QuoteLimits | None = None,
    ) -> tuple[QuoteUsage, QuoteUsage] | None:
        return await self._write_call(SqliteStore.put_quote, quote, owner, size, module, limits)

    async def get_quote(self, quote_id: str) -> Quote | None:
        return await self._read(lambda s: s.get_quote(quote_id))

    async def quote_usage(self, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
        return await self._read(lambda s: s.quote_usage(owner))

    async def release_expired_quotes(self, now: float) -> int:
        return await self._write_call(SqliteStore.release_expired_quotes, now)

    async def purge_expired(self, before: float) -> int:
        return await self._write_call(SqliteStore.purge_expired, before)

    # --- jobs ---------------------------------------------------------------------------

    async def create_job(
        self,
        job: Job,
        event: Event,
        payment: Payment | None = None,
        offered: Event | None = None,
        max_open: int = 0,
    ) -> tuple[Job, bool]:
        existing = await self._write_call(
            SqliteStore.insert_job, job, event, payment, offered, max_open
        )
        if existing is not None:
            return existing, False
        return stored_job(job, payment, offered), True  # as stored: nothing sent back

    async def get_job(self, job_id: str) -> Job | None:
        return await self._read(lambda s: s.get_job(job_id))

    async def get_job_by_key(self, client_id: str, idempotency_key: str) -> Job | None:
        return await self._read(lambda s: s.get_job_by_key(client_id, idempotency_key))

    async def transition(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event | None,
        feedback: FeedbackEntry | None = None,
        outcome: tuple[str, bool] | None = None,
        prior: PriorMove | None = None,
        expect: dict[str, Any] | None = None,
    ) -> Job | None:
        return await self._write_call(
            SqliteStore.transition,
            job_id, from_states, attempt, changes, event, feedback, outcome, prior=prior,
            expect=expect,
        )  # fmt: skip

    async def append_progress(self, events: Sequence[Event]) -> bool:
        return await self._write_call(SqliteStore.append_progress, events)

    # --- verification runs ----------------------------------------------------------------

    async def record_run(
        self, run: Run, from_states: Sequence[JobState], changes: dict[str, Any], event: Event
    ) -> Job | None:
        return await self._write_call(SqliteStore.record_run, run, from_states, changes, event)

    async def job_runs(self, job_id: str) -> list[Run]:
        return await self._read(lambda s: s.job_runs(job_id))

    async def conclude_runs(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event,
        verdicts: dict[int, str],
        feedback: Sequence[FeedbackEntry] = (),
        outcomes: Sequence[tuple[str, bool]] = (),
        run: Run | None = None,
    ) -> Job | None:
        return await self._write_call(
            SqliteStore.conclude_runs,
            job_id, from_states, attempt, changes, event, verdicts, feedback, outcomes, run,
        )  # fmt: skip

    async def offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        return await self._read(lambda s: s.offered_at(job_id, worker_id, attempt))

    async def held_attempts(self, worker_id: str, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        return await self._read(lambda s: s.held_attempts(worker_id, job_ids))

    async def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[Event]:
        return await self._read(lambda s: s.events_after(job_id, sequence, limit))

    async def queued_jobs(
        self, limit: int, after: tuple[float, str] | None = None, runnable: Runnable | None = None
    ) -> list[Job]:
        return await self._read(lambda s: s.queued_jobs(limit, after, runnable))

    async def lapsed_leases(self, now: float) -> list[Job]:
        return await self._read(lambda s: s.lapsed_leases(now))

    async def stale_queued(self, queued_before: float) -> list[Job]:
        return await self._read(lambda s: s.stale_queued(queued_before))

    async def active_jobs(self, worker_id: str | None = None) -> list[Job]:
        return await self._read(lambda s: s.active_jobs(worker_id))

    # --- payments -----------------------------------------------------------------------

    async def get_payment(self, job_id: str) -> Payment | None:
        return await self._read(lambda s: s.get_payment(job_id))

    async def payment_standing(
        self, network: str, asset: str, payer: str, authorization_id: str
    ) -> tuple[bool, int]:
        return await self._read(
            lambda s: s.payment_standing(network, asset, payer, authorization_id)
        )

    async def open_payments(self, limit: int = 100) -> list[tuple[Payment, JobState]]:
        return await self._read(lambda s: s.open_payments(limit))

    async def due_payments(self, now: float, limit: int = 100) -> list[tuple[Payment, JobState]]:
        return await self._read(lambda s: s.due_payments(now, limit))

    async def update_payment(
        self,
        job_id: str,
        from_statuses: Sequence[PaymentStatus],
        changes: dict[str, Any],
        credit: Split | None = None,
    ) -> Payment | None:
        return await self._write_call(
            SqliteStore.update_payment, job_id, from_statuses, changes, credit
        )

    async def audit_flows(
        self, network: str
    ) -> tuple[list[tuple[str, str, str, int]], dict[str, int]]:
        return await self._read(lambda s: s.audit_flows(network))

    # --- earnings and payouts -----------------------------------------------------------

    async def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        return await self._read(lambda s: s.earnings(worker_id, limit, before))

    async def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        return await self._read(lambda s: s.balances(worker_ids))

    async def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]:
        return await self._read(
            lambda s: s.payouts_due(network, min_amount, unpaid_before, limit, after)
        )

    async def create_payout(self, payout: PayoutRecord) -> bool:
        return await self._write_call(SqliteStore.create_payout, payout)

    async def update_payout(
        self, payout_id: str, from_states: Sequence[PayoutRowState], changes: dict[str, Any]
    ) -> PayoutRecord | None:
        return await self._write_call(SqliteStore.update_payout, payout_id, from_states, changes)

    async def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]:
        return await self._read(lambda s: s.open_payouts(network, limit))

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        return await self._read(lambda s: s.payouts(worker_id, limit))

    # --- pairing ------------------------------------------------------------------------

    async def put_pairing_code(
        self, code_hash: bytes, client_id: str, expires_at: float, now: float = 0.0, most: int = 0
    ) -> None:
        await self._write_call(
            SqliteStore.put_pairing_code, code_hash, client_id, expires_at, now, most
        )

    async def pairing_code_owner(self, code_hash: bytes, now: float) -> str | None:
        return await self._read(lambda s: s.pairing_code_owner(code_hash, now))

    async def claim_pairing_code(self, code_hash: bytes, now: float) -> str | None:
        return await self._write_call(SqliteStore.claim_pairing_code, code_hash, now)

    async def put_pairing(self, pairing: Pairing, most: int = 0) -> Pairing:
        return await self._write_call(SqliteStore.put_pairing, pairing, most)

    async def get_pairing(self, pairing_id: str) -> Pairing | None:
        return await self._read(lambda s: s.get_pairing(pairing_id))

    async def list_pairings(self, party_id: str, include_revoked: bool) -> list[Pairing]:
        return await self._read(lambda s: s.list_pairings(party_id, include_revoked))

    async def revoke_pairing(self, pairing_id: str, now: float) -> Pairing | None:
        return await self._write_call(SqliteStore.revoke_pairing, pairing_id, now)

    async def paired_workers(self, client_id: str) -> set[str]:
        return await self._read(lambda s: s.paired_workers(client_id))

    # --- WebAssembly modules ------------------------------------------------------------

    async def get_module(self, sha256: bytes) -> bytes | None:
        return await self._read(lambda s: s.get_module(sha256))

    # --- workers ------------------------------------------------------------------------

    async def record_worker_seen(
        self, worker_id: str, kind: int, now: float, agent_id: str = ""
    ) -> None:
        await self._write_call(SqliteStore.record_worker_seen, worker_id, kind, now, agent_id)

    async def record_task_names(self, names: Sequence[str], now: float, keep: int) -> None:
        await self._write_call(SqliteStore.record_task_names, names, now, keep)

    async def task_name_known(self, name: str) -> bool:
        return await self._read(lambda s: s.task_name_known(name))

    async def task_names(self, limit: int) -> list[str]:
        return await self._read(lambda s: s.task_names(limit))

    async def worker_stats(self, worker_id: str) -> tuple[int, int]:
        return await self._read(lambda s: s.worker_stats(worker_id))

    async def record_spot_check(self, worker_id: str, agreed: bool, now: float) -> None:
        await self._write_call(SqliteStore.record_spot_check, worker_id, agreed, now)

    async def worker_days(self, worker_id: str, since_day: int) -> list[WorkerDay]:
        return await self._read(lambda s: s.worker_days(worker_id, since_day))

    # --- receipt batches ----------------------------------------------------------------

    async def unbatched_receipts(self, limit: int) -> list[UnbatchedReceipt]:
        return await self._read(lambda s: s.unbatched_receipts(limit))

    async def create_receipt_batch(
        self, batch: ReceiptBatch, leaves: Sequence[UnbatchedReceipt]
    ) -> bool:
        return await self._write_call(SqliteStore.create_receipt_batch, batch, leaves)

    async def get_receipt_batch(self, batch_id: str) -> ReceiptBatch | None:
        return await self._read(lambda s: s.get_receipt_batch(batch_id))

    async def receipt_leaf(self, job_id: str) -> ReceiptLeaf | None:
        return await self._read(lambda s: s.receipt_leaf(job_id))

    async def batch_leaves(self, batch_id: str) -> list[ReceiptLeaf]:
        return await self._read(lambda s: s.batch_leaves(batch_id))

    async def receipt_batches(
        self, statuses: Sequence[AnchorStatus] | None = None, limit: int = 100
    ) -> list[ReceiptBatch]:
        return await self._read(lambda s: s.receipt_batches(statuses, limit))

    async def update_anchor(
        self,
        batch_id: str,
        status: AnchorStatus,
        network: str = "",
        transaction: str = "",
        error: str = "",
        anchored_at: float | None = None,
    ) -> ReceiptBatch | None:
        return await self._write_call(
            SqliteStore.update_anchor, batch_id, status, network, transaction, error, anchored_at
        )

    # --- feedback outbox ----------------------------------------------------------------

    async def feedback_entries(
        self, statuses: Sequence[FeedbackStatus] | None = None, limit: int = 1000
    ) -> list[FeedbackEntry]:
        return await self._read(lambda s: s.feedback_entries(statuses, limit))

    async def update_feedback(
        self, job_id: str, status: FeedbackStatus, transaction: str = "", error: str = ""
    ) -> bool:
        return await self._write_call(
            SqliteStore.update_feedback, job_id, status, transaction, error
        )


async def open_store(
    path: str | Path,
    synchronous: str = "NORMAL",
    readers: int = 2,
    max_group: int = 256,
    writer: str = "thread",
    writer_nice: int = 0,
) -> ThreadedStore:
    """A ThreadedStore whose connections are open (the schema migrated); raises, with its
    threads stopped, what opening raised."""
    store = ThreadedStore(path, synchronous, readers, max_group, writer, writer_nice)
    try:
        await store.wait_open()
    except BaseException:
        await store.close()
        raise
    return store


_: type[Store] = ThreadedStore  # mypy checks that ThreadedStore implements the Store port
