"""PostgreSQL implementation of the Store port, through asyncpg: natively async (no
threads), over a connection pool that several coordinators' stores may share a database
through.

Every write is one transaction (READ COMMITTED) on a pooled connection, and its coroutine
returns once it is committed. A write runs to its end even when its caller is cancelled
(as with the SQLite store: it was submitted), and close() waits for the writes in flight.
Methods keep SQLite's semantics (store/sqlite.py), made safe for concurrent transactions
rather than relying on one writer:
- compare-and-set moves are single `UPDATE ... WHERE <condition> RETURNING` statements,
  which PostgreSQL re-checks against the newest row version after waiting for a concurrent
  writer (transition, append_progress, update_payment/payout/anchor/feedback, claiming a
  pairing code, debiting a payout from a balance);
- inserts that may meet a concurrent twin use ON CONFLICT on a unique index (create_job on
  (client_id, idempotency_key), one active pairing per pair, one credit per job, one
  feedback entry per job);
- where a row is claimed for work, `FOR UPDATE SKIP LOCKED` (the receipts of a batch; the
  quotes a sweep releases), so two claimers never share a row and never wait on each other;
- counters are updated in place (quote usage, a worker's totals, earnings balances), owner
  rows before the total row, so concurrent writers cannot deadlock;
- module garbage collection and task-name pruning take transaction-level advisory locks
  (see _MODULES_LOCK, _TASK_NAMES_LOCK).
A transaction PostgreSQL aborts as a deadlock or serialization failure is retried; losing
the database (refused connection, server shutdown, broken connection) raises Unavailable.

Schema: versioned migrations (MIGRATIONS, one function per version) recorded in the
schema_version table, applied at open under an advisory lock, so coordinators starting
together migrate once. Text columns use the "C" collation: ids sort bytewise, as in
SQLite, whatever the database's default collation.

Job changes reach the other coordinators: every write that adds a job's event sends a
NOTIFY on JOB_CHANNEL (delivered at its commit) with this store's token, the job id and
its state; listen_jobs LISTENs on a connection of its own (made again when lost) and
passes on the changes of other stores.

Background loops run once across the coordinators on one database: pass_lock takes a
session-level advisory lock (keyed by the loop's name) on one connection the store keeps
for that, for the length of a pass; a coordinator that dies (or loses that connection)
frees its locks, and another takes them at its next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from dispatchnet.coordinator.models import (
    ACTIVE_STATES,
    AGREED,
    NOT_HELD,
    OPEN_STATES,
    AnchorStatus,
    Balance,
    Earning,
    Event,
    EventKind,
    FeedbackEntry,
    FeedbackStatus,
    Job,
    JobState,
    JobType,
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
    day_of,
)
from dispatchnet.errors import (
    PaymentReused,
    TooManyOpenJobs,
    TooManyPairingCodes,
    TooManyPairings,
    Unavailable,
)
from dispatchnet.store.base import QuoteLimits, QuoteUsage, Runnable, Store
from dispatchnet.store.rows import (
    OPEN_PAYOUT_OF_E,
    OPEN_PAYOUT_STATE,
    PAYMENT_OWED,
    PAYMENTS_OWED_INDEX,
    TOTAL_OWNER,
    batch_of,
    changes_row,
    earning_of,
    events_of,
    feedback_of,
    job_of,
    job_row,
    not_given_up,
    pairing_of,
    payees_order,
    payment_of,
    payout_of,
    recipients_text,
    run_of,
    run_row,
    spec_of,
)

T = TypeVar("T")
Conn = Any  # an asyncpg connection (asyncpg ships no type information)

# Transaction-level advisory lock keys (per database). Migrations run under _MIGRATE_LOCK.
# Module garbage collection takes _MODULES_LOCK exclusively; put_quote (storing a module)
# and create_job (referencing its quote's module) take it shared, so the collector's
# "referenced by no quote and no open job" is read after every such transaction in flight
# has committed. record_task_names takes _TASK_NAMES_LOCK: its pruning DELETE would
# otherwise deadlock with another worker's upsert.
_MIGRATE_LOCK = 0x6469_7370_0001
_MODULES_LOCK = 0x6469_7370_0002
_TASK_NAMES_LOCK = 0x6469_7370_0003
JOB_CHANNEL = "dispatch_jobs"  # NOTIFY channel of job changes (listen_jobs)


def pass_lock_key(name: str) -> int:
    """The session-level advisory lock key of a background loop's passes (a signed 64-bit
    hash of its name, apart from the fixed keys above in all but chance)."""
    return int.from_bytes(
        hashlib.sha256(f"dispatch pass {name}".encode()).digest()[:8], "big", signed=True
    )


# Attempts of a transaction PostgreSQL aborted as a deadlock or a serialization failure.
_TX_ATTEMPTS = 3

# What losing the database looks like: the connection or the server went away.
_LOST = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)
_log = logging.getLogger("dispatch.store")

# What a statement on a connection the server has just closed raises besides (a pooled
# connection reused after a restart: "the underlying connection is closed", "cannot
# switch to state ..."): the database went away too, not a bug of the statement.
_GONE = (*_LOST, asyncpg.InterfaceError, asyncpg.InternalClientError)
# A statement, or a wait for a pooled connection, longer than this fails as the database
# being unavailable instead of hanging while PostgreSQL does not answer (stopped, or the
# network drops packets); PostgreSQL's keepalives find a dead client in about as long.
STATEMENT_TIMEOUT_SECONDS = 60.0
KEEPALIVES = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
              "tcp_keepalives_count": "3"}  # fmt: skip


def _unavailable(e: BaseException) -> Unavailable:
    return Unavailable(f"the store's database is unavailable: {str(e) or type(e).__name__}")


_FINAL = [int(s) for s in JobState if s.final]
_ACTIVE = ",".join(str(int(s)) for s in ACTIVE_STATES)  # literals: partial indexes match
_QUEUED = int(JobState.QUEUED)
_COMPLETED = int(JobState.COMPLETED)
_OPEN = [int(s) for s in OPEN_STATES]
_OPEN_SQL = ",".join(map(str, _OPEN))  # literals: the partial index jobs_open_client matches

# --- schema -------------------------------------------------------------------------------

TEXT = 'text COLLATE "C"'
MONEY = "numeric(78, 0)"  # atomic units of a token: up to uint256


def _v1_statements() -> list[str]:
    """The schema of SQLite's version 11, in one step."""
    t, m = TEXT, MONEY
    return [
        f"""CREATE TABLE quotes (
            quote_id {t} PRIMARY KEY, job_type integer NOT NULL, policy integer NOT NULL,
            privacy integer NOT NULL, task_name {t} NOT NULL, llm_model {t} NOT NULL,
            spec_bytes bytea NOT NULL, spec_sha256 bytea NOT NULL, price_micros bigint NOT NULL,
            currency {t} NOT NULL, created_at double precision NOT NULL,
            expires_at double precision NOT NULL, use_llm boolean NOT NULL DEFAULT false,
            client_id {t} NOT NULL DEFAULT '', size bigint NOT NULL DEFAULT 0,
            module_sha256 bytea)""",
        "CREATE INDEX quotes_expires ON quotes (expires_at)",
        "CREATE INDEX quotes_module ON quotes (module_sha256) WHERE module_sha256 IS NOT NULL",
        f"""CREATE TABLE quote_usage (
            owner {t} PRIMARY KEY, quotes bigint NOT NULL, bytes bigint NOT NULL)""",
        """CREATE TABLE wasm_modules (
            sha256 bytea PRIMARY KEY, module bytea NOT NULL,
            created_at double precision NOT NULL)""",
        f"""CREATE TABLE jobs (
            job_id {t} PRIMARY KEY, client_id {t} NOT NULL, state integer NOT NULL,
            job_type integer NOT NULL, policy integer NOT NULL, privacy integer NOT NULL,
            task_name {t}, llm_model {t}, spec_bytes bytea, spec_sha256 bytea,
            price_micros bigint, currency {t}, quote_id {t}, idempotency_key {t} NOT NULL,
            attempts integer NOT NULL, max_attempts integer NOT NULL,
            created_at double precision, updated_at double precision,
            queued_at double precision, last_sequence bigint NOT NULL DEFAULT 0,
            worker_id {t}, lease_expires_at double precision,
            result_output bytea, result_content_type {t}, prompt_tokens integer,
            completion_tokens integer, failure_code {t}, failure_message {t},
            receipt_body bytea, receipt_worker_sig bytea, receipt_coord_sig bytea,
            receipt_sha256 bytea, payment {t}, use_llm boolean NOT NULL DEFAULT false,
            receipt_batch_id {t}, receipt_leaf_index integer, module_sha256 bytea)""",
        "CREATE UNIQUE INDEX jobs_key ON jobs (client_id, idempotency_key)",
        f"CREATE INDEX jobs_queued ON jobs (queued_at, job_id) WHERE state = {_QUEUED}",
        f"CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state IN ({_ACTIVE})",
        f"CREATE INDEX jobs_active ON jobs (worker_id) WHERE state IN ({_ACTIVE})",
        "CREATE UNIQUE INDEX jobs_receipt_leaf ON jobs (receipt_batch_id, receipt_leaf_index) "
        "WHERE receipt_batch_id IS NOT NULL",
        # only the receipts waiting for a batch: the batcher reads this index alone
        "CREATE INDEX jobs_unbatched_receipts ON jobs (updated_at, job_id) "
        f"WHERE state = {_COMPLETED} AND receipt_batch_id IS NULL",
        "CREATE INDEX jobs_module ON jobs (module_sha256) WHERE module_sha256 IS NOT NULL",
        f"""CREATE TABLE events (
            job_id {t} NOT NULL, sequence bigint NOT NULL, kind {t} NOT NULL,
            state integer NOT NULL, time double precision NOT NULL, from_state integer,
            reason {t}, worker_id {t}, attempt integer, text {t}, fraction double precision,
            first_sequence bigint, chunks {t}, PRIMARY KEY (job_id, sequence))""",
        f"""CREATE TABLE pairing_codes (
            code_hash bytea PRIMARY KEY, client_id {t} NOT NULL,
            expires_at double precision NOT NULL, used_at double precision)""",
        "CREATE INDEX pairing_codes_expires ON pairing_codes (expires_at)",
        f"""CREATE TABLE pairings (
            pairing_id {t} PRIMARY KEY, client_id {t} NOT NULL, worker_id {t} NOT NULL,
            created_at double precision NOT NULL, revoked_at double precision)""",
        "CREATE INDEX pairings_client ON pairings (client_id)",
        "CREATE INDEX pairings_worker ON pairings (worker_id)",
        # a pair has one active pairing, also when two claims race
        "CREATE UNIQUE INDEX pairings_active ON pairings (client_id, worker_id) "
        "WHERE revoked_at IS NULL",
        f"""CREATE TABLE workers (
            worker_id {t} PRIMARY KEY, kind integer NOT NULL,
            first_seen double precision NOT NULL, last_seen double precision NOT NULL,
            completed bigint NOT NULL DEFAULT 0, failed bigint NOT NULL DEFAULT 0,
            agent_id {t} NOT NULL DEFAULT '')""",
        f"""CREATE TABLE task_names (
            name {t} PRIMARY KEY, last_seen double precision NOT NULL)""",
        "CREATE INDEX task_names_seen ON task_names (last_seen DESC, name)",
        f"""CREATE TABLE receipt_batches (
            batch_id {t} PRIMARY KEY, merkle_root bytea NOT NULL, leaf_count integer NOT NULL,
            created_at double precision NOT NULL, anchor_status {t} NOT NULL,
            anchor_network {t}, anchor_transaction {t}, anchor_error {t},
            anchored_at double precision)""",
        "CREATE INDEX receipt_batches_status ON receipt_batches "
        "(anchor_status, created_at, batch_id)",
        f"""CREATE TABLE feedback_outbox (
            job_id {t} PRIMARY KEY, agent_id {t} NOT NULL, value bigint NOT NULL,
            value_decimals integer NOT NULL, tag1 {t} NOT NULL, tag2 {t} NOT NULL,
            feedback_uri {t} NOT NULL, feedback_hash bytea NOT NULL,
            created_at double precision NOT NULL, status {t} NOT NULL, tx {t}, error {t},
            attempts integer NOT NULL DEFAULT 0)""",
        "CREATE INDEX feedback_outbox_status ON feedback_outbox (status, created_at, job_id)",
        f"""CREATE TABLE payments (
            job_id {t} PRIMARY KEY, network {t} NOT NULL, asset {t} NOT NULL, pay_to {t},
            payer {t} NOT NULL, amount {m} NOT NULL, authorization_id {t} NOT NULL,
            valid_before double precision, settle_by double precision, payload_json {t},
            requirement_json {t}, status {t} NOT NULL, created_at double precision,
            updated_at double precision, tx {t}, refund_tx {t}, refund_raw {t}, error {t},
            attempts integer NOT NULL DEFAULT 0)""",
        # the replay key: each payment is accepted once, across restarts and coordinators
        "CREATE UNIQUE INDEX payments_replay ON payments "
        "(network, lower(asset), lower(payer), lower(authorization_id))",
        "CREATE INDEX payments_status ON payments (status, created_at, job_id)",
        f"""CREATE TABLE earnings (
            job_id {t} PRIMARY KEY, worker_id {t} NOT NULL, network {t} NOT NULL,
            asset {t} NOT NULL, amount {m} NOT NULL, fee_bps integer NOT NULL, fee {m} NOT NULL,
            share {m} NOT NULL, credited_at double precision NOT NULL,
            reversed_at double precision)""",
        "CREATE INDEX earnings_worker ON earnings (worker_id, credited_at, job_id)",
        f"""CREATE TABLE worker_earnings (
            worker_id {t} NOT NULL, network {t} NOT NULL, asset {t} NOT NULL,
            earned {m} NOT NULL, paid {m} NOT NULL DEFAULT 0, unpaid_since double precision,
            PRIMARY KEY (worker_id, network, asset))""",
        f"""CREATE TABLE payouts (
            payout_id {t} PRIMARY KEY, worker_id {t} NOT NULL, network {t} NOT NULL,
            asset {t} NOT NULL, to_address {t} NOT NULL, amount {m} NOT NULL,
            state {t} NOT NULL, raw {t}, tx {t}, error {t}, created_at double precision,
            updated_at double precision)""",
        "CREATE INDEX payouts_state ON payouts (state, network, created_at, payout_id)",
        "CREATE INDEX payouts_worker ON payouts (worker_id, created_at, payout_id)",
    ]


async def _v1(c: Conn) -> None:
    for statement in _v1_statements():
        await c.execute(statement)


async def _v2(c: Conn) -> None:
    """Jobs record the coordinator whose worker holds them (SQLite's version 12)."""
    await c.execute(f"ALTER TABLE jobs ADD COLUMN coordinator_id {TEXT} NOT NULL DEFAULT ''")


async def _v3(c: Conn) -> None:
    """Each worker's record per UTC day: job outcomes and spot checks (SQLite's version 13)."""
    await c.execute(
        f"""CREATE TABLE worker_days (
            worker_id {TEXT} NOT NULL, day integer NOT NULL,
            completed bigint NOT NULL DEFAULT 0, failed bigint NOT NULL DEFAULT 0,
            agreed bigint NOT NULL DEFAULT 0, disagreed bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (worker_id, day))"""
    )


async def _v4(c: Conn) -> None:
    """Verification: the runs quotes and jobs ask for, the job's verification state and
    recorded runs, a credit per (job, worker) (SQLite's version 14)."""
    t = TEXT
    await c.execute("ALTER TABLE quotes ADD COLUMN verify integer NOT NULL DEFAULT 0")
    await c.execute(
        "ALTER TABLE jobs ADD COLUMN verify integer NOT NULL DEFAULT 0, "
        f"ADD COLUMN verify_mode {t} NOT NULL DEFAULT '', "
        "ADD COLUMN verify_runs integer NOT NULL DEFAULT 0, "
        f"ADD COLUMN verify_seen {t} NOT NULL DEFAULT '[]'"
    )
    await c.execute(
        f"""CREATE TABLE job_runs (
            job_id {t} NOT NULL, attempt integer NOT NULL, worker_id {t} NOT NULL,
            agent_id {t}, result_output bytea, result_content_type {t},
            receipt_body bytea NOT NULL, receipt_worker_sig bytea, receipt_coord_sig bytea,
            receipt_sha256 bytea, created_at double precision NOT NULL, verdict {t},
            PRIMARY KEY (job_id, attempt))"""
    )
    await c.execute(
        "ALTER TABLE earnings DROP CONSTRAINT earnings_pkey, ADD PRIMARY KEY (job_id, worker_id)"
    )


async def _v5(c: Conn) -> None:
    """Sealed PRIVATE jobs: the workers their input is encrypted to (SQLite's version 15)."""
    for table in ("quotes", "jobs"):
        await c.execute(f"ALTER TABLE {table} ADD COLUMN recipients {TEXT} NOT NULL DEFAULT ''")


async def _v6(c: Conn) -> None:
    """Each client's open jobs, for [jobs] client_max_open_jobs (SQLite's version 16)."""
    await c.execute(
        f"CREATE INDEX jobs_open_client ON jobs (client_id) WHERE state IN ({_OPEN_SQL})"
    )


async def _v8(c: Conn) -> None:
    """Open payouts by worker and by when they were last touched (SQLite's version 19)."""
    await c.execute(
        f"CREATE INDEX payouts_open_worker ON payouts (worker_id) WHERE {OPEN_PAYOUT_STATE}"
    )
    await c.execute(
        "CREATE INDEX payouts_open_touched ON payouts (network, updated_at) "
        f"WHERE {OPEN_PAYOUT_STATE}"
    )


async def _v9(c: Conn) -> None:
    """A payer's payments not moved on chain yet (SQLite's version 20)."""
    await c.execute(f"CREATE INDEX payments_owed ON payments {PAYMENTS_OWED_INDEX}")


async def _v7(c: Conn) -> None:
    """Each client's live pairing codes, for [pairing] max_live_codes (SQLite's version 18)."""
    await c.execute("CREATE INDEX pairing_codes_client ON pairing_codes (client_id)")


# Each owner's quote_usage, and the total, is kept in this many rows (see total_shard).
USAGE_SHARDS = 8

MIGRATIONS: list[Callable[[Conn], Awaitable[None]]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9]
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(c: Conn) -> None:
    """Brings the database to SCHEMA_VERSION, one transaction per version, each under
    _MIGRATE_LOCK (concurrent callers wait, then find it done). RuntimeError when the
    database is newer than this build."""
    for _ in range(SCHEMA_VERSION + 1):
        async with c.transaction():
            await c.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            version = int(await c.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema v{version} is newer than this build (v{SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                return
            await MIGRATIONS[version](c)
            await c.execute("INSERT INTO schema_version (version) VALUES ($1)", version + 1)


def _count(status: str) -> int:
    """Rows a command touched, from its status ("DELETE 3", "UPDATE 1", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[1])


def _placeholders(start: int, n: int) -> str:
    return ",".join(f"${i}" for i in range(start, start + n))


class PostgresStore:
    """Store over an asyncpg pool; open it with open_postgres_store (which migrates)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._writes: set[asyncio.Task[Any]] = set()  # in flight, awaited by close()
        # the connection holding this process's pass locks (taken from the pool when first
        # needed, given back when lost), and the guard of its one-statement-at-a-time use
        self._locks_conn: Conn | None = None
        self._token = secrets.token_hex(6)  # tells this store's notifications from others'
        self._on_job: Callable[[str, JobState], None] | None = None
        self._listen_conn: Conn | None = None
        self._listening: asyncio.Task[None] | None = None
        self._locks_guard = asyncio.Lock()

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Waits for the writes in flight, then closes the pool (its connections finish
        what they run). Idempotent; concurrent calls all return when it is done."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        async with self._locks_guard:
            await self._drop_locks_conn()
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        await self._stop_listening()
        await self._pool.close()

    # --- job changes across stores ------------------------------------------------------

    async def _notify(self, c: Conn, job_id: str, state: JobState) -> None:
        await c.execute(
            "SELECT pg_notify($1, $2)", JOB_CHANNEL, f"{self._token} {job_id} {int(state)}"
        )

    async def listen_jobs(self, on_change: Callable[[str, JobState], None]) -> None:
        self._check_open()
        self._on_job = on_change
        try:
            await self._listen()
        except _LOST as e:
            raise Unavailable(f"the store's database is unavailable: {e}") from e

    async def _listen(self) -> None:
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(JOB_CHANNEL, self._notified)
        except BaseException:
            await self._pool.release(conn)
            raise
        conn.add_termination_listener(self._listen_lost)
        self._listen_conn = conn

    def _notified(self, _conn: Conn, _pid: int, _channel: str, payload: str) -> None:
        token, job_id, state = payload.split(" ")
        if token != self._token and self._on_job is not None:
            self._on_job(job_id, JobState(int(state)))

    def _listen_lost(self, _conn: Conn) -> None:
        """The listening connection ended: listen again until it works or we close."""
        self._listen_conn = None
        if not self._closed and self._listening is None:
            self._listening = asyncio.ensure_future(self._relisten())

    async def _relisten(self) -> None:
        try:
            while not self._closed:
                try:
                    await self._listen()
                    return
                except _GONE:
                    await asyncio.sleep(1.0)  # the database is away: try again in a while
                except Exception:  # whatever it was, this coordinator must listen again
                    _log.exception("listening for other coordinators' changes failed")
                    await asyncio.sleep(1.0)
        finally:
            self._listening = None

    async def _stop_listening(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            with contextlib.suppress(*_LOST, asyncpg.InterfaceError):
                conn.remove_termination_listener(self._listen_lost)
                await conn.remove_listener(JOB_CHANNEL, self._notified)
                await self._pool.release(conn)

    # --- pass locks ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def pass_lock(self, name: str) -> AsyncIterator[bool]:
        # The statements run to their end even when the pass is cancelled: a lock taken
        # for a cancelled caller is given back, and a pass's lock always is.
        key = pass_lock_key(name)
        taking = asyncio.ensure_future(
            self._locks_statement("SELECT pg_try_advisory_lock($1)", key)
        )
        try:
            held = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(lambda t: self._give_back(t, key))
            raise
        try:
            yield bool(held)
        finally:
            if held:
                await asyncio.shield(self._unlock(key))

    async def pass_still_held(self, name: str) -> bool:
        # the lock lives in the session of the locks connection: asked on that connection,
        # a lost (or replaced) one answers None or False
        key = pass_lock_key(name)
        held = await self._locks_statement(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = $1)",
            key,
        )
        return bool(held)

    def _unlock(self, key: int) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(self._locks_statement("SELECT pg_advisory_unlock($1)", key))
        self._writes.add(task)  # close() waits for it
        task.add_done_callback(self._write_done)
        return task

    def _give_back(self, taking: asyncio.Future[Any], key: int) -> None:
        if not taking.cancelled() and taking.exception() is None and taking.result():
            self._unlock(key)

    async def _locks_statement(self, sql: str, key: int) -> Any:
        """sql on the locks connection; None when it cannot run now (the store closed, the
        database away: the connection is dropped, and with it the locks it held)."""
        async with self._locks_guard:
            if self._closed:
                return None
            try:
                if self._locks_conn is None:
                    self._locks_conn = await self._pool.acquire()
                return await self._locks_conn.fetchval(sql, key)
            except (*_LOST, asyncpg.InterfaceError, asyncpg.InternalClientError):
                await self._drop_locks_conn()
                return None

    async def _drop_locks_conn(self) -> None:
        conn, self._locks_conn = self._locks_conn, None
        if conn is not None:
            # its session ends, and with it whatever it held; a connection the server
            # ended is back in the pool already
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
                await self._pool.release(conn)

    async def schema_version(self) -> int:
        return int(
            await self._read(lambda c: c.fetchval("SELECT max(version) FROM schema_version"))
        )

    # --- running operations -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed")

    async def _read(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        self._check_open()
        try:
            async with self._pool.acquire(timeout=STATEMENT_TIMEOUT_SECONDS) as c:
                return await op(c)
        except _GONE as e:
            raise _unavailable(e) from e

    async def _write(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        """op in one transaction, retried when PostgreSQL aborts it as a deadlock or a
        serialization failure. It runs to its end even if the caller is cancelled."""
        self._check_open()
        task = asyncio.ensure_future(self._transaction(op))
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        return await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a cancelled caller's error is nobody's to report

    async def _transaction(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        for attempt in range(1, _TX_ATTEMPTS + 1):
            try:
                async with (
                    self._pool.acquire(timeout=STATEMENT_TIMEOUT_SECONDS) as c,
                    c.transaction(),
                ):
                    return await op(c)
            except asyncpg.TransactionRollbackError as e:
                if attempt == _TX_ATTEMPTS:  # nothing was written: the caller may retry
                    raise Unavailable(
                        f"the store's database aborted the write {attempt} times ({e})"
                    ) from e
            except _GONE as e:
                raise _unavailable(e) from e
        raise AssertionError("unreachable")

    # --- quotes -------------------------------------------------------------------------

    async def put_quote(
        self,
        quote: Quote,
        owner: str = "",
        size: int = 0,
        module: bytes | None = None,
        limits: QuoteLimits | None = None,
    ) -> tuple[QuoteUsage, QuoteUsage] | None:
        """The usage rows are counted first (locking the owner's and the total's shard),
        then `limits` are checked against the sums, which see every quote committed and
        every one waiting behind these two rows: what they may not see is one quote in
        flight on each of the other USAGE_SHARDS - 1 shards, so a limit is exact up to
        that many quotes committing at the very same moment."""
        module_sha = hashlib.sha256(module).digest() if module is not None else None
        s = quote.spec

        async def op(c: Conn) -> None:
            if module is not None:
                await c.execute("SELECT pg_advisory_xact_lock_shared($1)", _MODULES_LOCK)
            # one of the owner's rows, then one of the total's (every writer locks owners'
            # rows before the total's, each kind in order)
            for who in (owner_shard(owner, quote.quote_id), total_shard(quote.quote_id)):
                await c.execute(
                    "INSERT INTO quote_usage VALUES ($1,1,$2) ON CONFLICT (owner) DO UPDATE "
                    "SET quotes = quote_usage.quotes + 1, bytes = quote_usage.bytes + $2",
                    who,
                    size,
                )
            if limits is not None:
                mine, everyone = (
                    QuoteUsage(u.quotes - 1, u.bytes - size) for u in await _quote_usage(c, owner)
                )
                if limits.refuses(owner, size, mine, everyone):
                    raise _QuoteRefused(mine, everyone)  # rolls the counts back
            await c.execute(
                "INSERT INTO quotes (quote_id, job_type, policy, privacy, task_name, llm_model, "
                "spec_bytes, spec_sha256, price_micros, currency, created_at, expires_at, "
                "use_llm, client_id, size, module_sha256, verify, recipients) "
                f"VALUES ({_placeholders(1, 18)})",
                quote.quote_id,
                int(s.job_type),
                int(s.policy),
                int(s.privacy),
                s.task_name,
                s.llm_model,
                s.spec_bytes,
                s.spec_sha256,
                quote.price_micros,
                quote.currency,
                quote.created_at,
                quote.expires_at,
                bool(s.use_llm),
                owner,
                size,
                module_sha,
                s.verify,
                recipients_text(s),
            )
            if module is not None:
                await c.execute(
                    "INSERT INTO wasm_modules VALUES ($1,$2,$3) ON CONFLICT (sha256) DO NOTHING",
                    module_sha,
                    module,
                    quote.created_at,
                )

        try:
            await self._write(op)
        except _QuoteRefused as refused:
            return refused.mine, refused.everyone
        return None

    async def get_quote(self, quote_id: str) -> Quote | None:
        r = await self._read(
            lambda c: c.fetchrow("SELECT * FROM quotes WHERE quote_id=$1", quote_id)
        )
        if r is None:
            return None
        return Quote(
            r["quote_id"],
            spec_of(r),
            r["price_micros"],
            r["currency"],
            r["created_at"],
            r["expires_at"],
        )

    async def quote_usage(self, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
        return await self._read(lambda c: _quote_usage(c, owner))

    async def release_expired_quotes(self, now: float) -> int:
        async def release(c: Conn) -> int:
            # claimed with SKIP LOCKED: a concurrent sweep releases the others, and each
            # quote's usage is given back once
            freed = await c.fetch(
                "WITH freed AS (SELECT quote_id, client_id, size FROM quotes "
                "WHERE expires_at < $1 AND size > 0 ORDER BY quote_id FOR UPDATE SKIP LOCKED), "
                "released AS (UPDATE quotes q SET spec_bytes = '\\x'::bytea, size = 0, "
                "module_sha256 = NULL FROM freed WHERE q.quote_id = freed.quote_id) "
                "SELECT quote_id, client_id, size FROM freed",
                now,
            )
            if not freed:
                return 0
            owners: dict[str, list[int]] = {}
            shards: dict[str, list[int]] = {}
            for r in freed:
                for who, into in (
                    (owner_shard(r["client_id"], r["quote_id"]), owners),
                    (total_shard(r["quote_id"]), shards),
                ):
                    n_b = into.setdefault(who, [0, 0])
                    n_b[0] += 1
                    n_b[1] += int(r["size"])
            # owners' rows in order, then the total's shards in order (put_quote's order:
            # owners before totals): no deadlock
            await c.executemany(
                "UPDATE quote_usage SET quotes = quotes - $1, bytes = bytes - $2 WHERE owner = $3",
                [(n, b, who) for who, (n, b) in sorted(owners.items())]
                + [(n, b, who) for who, (n, b) in sorted(shards.items())],
            )
            # (a row below zero stays: it gives back what an older schema counted in the
            # owner's single row, and the sum needs both)
            await c.execute(
                "DELETE FROM quote_usage WHERE owner = ANY($1::text[]) AND quotes = 0 "
                "AND bytes = 0",
                sorted(owners),
            )
            return len(freed)

        async def collect_modules(c: Conn) -> None:
            # after every put_quote and create_job in flight has committed (they hold the
            # lock shared), so their references are seen
            await c.execute("SELECT pg_advisory_xact_lock($1)", _MODULES_LOCK)
            await c.execute(
                "DELETE FROM wasm_modules m WHERE NOT EXISTS "
                "(SELECT 1 FROM quotes WHERE module_sha256 = m.sha256) "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE module_sha256 = m.sha256 "
                "AND state = ANY($1::int[]))",
                _OPEN,
            )

        n = await self._write(release)
        await self._write(collect_modules)
        return n

    async def purge_expired(self, before: float) -> int:
        async def op(c: Conn) -> int:
            # released quotes only (size 0): a quote's usage is given back exactly once
            quotes = await c.execute(
                "DELETE FROM quotes WHERE expires_at < $1 AND size = 0", before
            )
            codes = await c.execute("DELETE FROM pairing_codes WHERE expires_at < $1", before)
            return _count(quotes) + _count(codes)

        return await self._write(op)

    async def get_module(self, sha256: bytes) -> bytes | None:
        module = await self._read(
            lambda c: c.fetchval("SELECT module FROM wasm_modules WHERE sha256=$1", sha256)
        )
        return None if module is None else bytes(module)

    # --- jobs ---------------------------------------------------------------------------

    async def create_job(
        self,
        job: Job,
        event: Event,
        payment: Payment | None = None,
        offered: Event | None = None,
        max_open: int = 0,
    ) -> tuple[Job, bool]:
        if payment is not None:
            job = dataclasses.replace(job, payment=payment.ref())
        row = job_row(job)
        row["last_sequence"] = 1 if offered is None else 2
        row["use_llm"] = bool(row["use_llm"])
        cols = ",".join(row)
        n = len(row)
        # the client's other open jobs, counted up to max_open in the same statement (its
        # snapshot does not hold the new row), from the partial index jobs_open_client
        insert = (
            f"WITH made AS (INSERT INTO jobs ({cols}, module_sha256) VALUES "
            f"({_placeholders(1, n)}, (SELECT module_sha256 FROM quotes WHERE quote_id = "
            f"${n + 1})) ON CONFLICT (client_id, idempotency_key) DO NOTHING RETURNING *) "
            "SELECT made.*, (SELECT count(*) FROM (SELECT 1 FROM jobs o WHERE o.client_id = "
            f"made.client_id AND o.state IN ({_OPEN_SQL}) LIMIT ${n + 2}) AS mine) AS open_before "
            "FROM made"
        )

        async def op(c: Conn) -> tuple[Job, bool]:
            # the module its quote holds is not collected meanwhile (see _MODULES_LOCK)
            await c.execute("SELECT pg_advisory_xact_lock_shared($1)", _MODULES_LOCK)
            r = await c.fetchrow(insert, *row.values(), job.quote_id, max_open)
            if r is not None and max_open > 0 and r["open_before"] >= max_open:
                raise TooManyOpenJobs(max_open)  # rolls the job back
            if r is None:  # the key's job exists (committed: ON CONFLICT waited for it)
                existing = await c.fetchrow(
                    "SELECT * FROM jobs WHERE client_id=$1 AND idempotency_key=$2",
                    job.client_id,
                    job.idempotency_key,
                )
                return job_of(existing), False
            await _insert_event(c, event, 1)
            if offered is not None:
                await _insert_event(c, offered, 2)
            await self._notify(c, job.job_id, job.state)
            if payment is not None:
                try:
                    await _insert_payment(c, payment)
                except asyncpg.UniqueViolationError as e:
                    if e.constraint_name != "payments_replay":
                        raise
                    raise PaymentReused(
                        "this payment was already used for another job; sign a new one"
                    ) from None
            return job_of(r), True

        return await self._write(op)

    async def get_job(self, job_id: str) -> Job | None:
        r = await self._read(lambda c: c.fetchrow("SELECT * FROM jobs WHERE job_id=$1", job_id))
        return job_of(r) if r is not None else None

    async def get_job_by_key(self, client_id: str, idempotency_key: str) -> Job | None:
        r = await self._read(
            lambda c: c.fetchrow(
                "SELECT * FROM jobs WHERE client_id=$1 AND idempotency_key=$2",
                client_id,
                idempotency_key,
            )
        )
        return job_of(r) if r is not None else None

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
        op = self._transition(
            job_id, from_states, attempt, changes, event, feedback, outcome,
            expect=None if prior is not None else expect,
        )  # fmt: skip
        if prior is None:
            return await self._write(op)
        first = self._transition(
            job_id, prior.from_states, prior.attempt, prior.changes, prior.event, expect=expect
        )

        async def both(c: Conn) -> Job | None:
            if await first(c) is None:
                return None
            moved = await op(c)
            if moved is None:
                raise _Undo  # the prior move alone is not kept: roll back
            return moved

        try:
            return await self._write(both)
        except _Undo:
            return None

    def _transition(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event | None,
        feedback: FeedbackEntry | None = None,
        outcome: tuple[str, bool] | None = None,
        expect: dict[str, Any] | None = None,
    ) -> Callable[[Conn], Awaitable[Job | None]]:
        """transition's work, to run in a transaction (alone or with more writes)."""
        values = changes_row(changes)
        sets = [f"{k}=${i}" for i, k in enumerate(values, 1)]
        if event is not None:
            sets.append("last_sequence=last_sequence+1")
        if not sets:  # nothing changes: the compare-and-set alone
            sets.append("job_id=job_id")
        n = len(values)
        where = f"job_id=${n + 1} AND state = ANY(${n + 2}::int[])"
        params: list[Any] = [*values.values(), job_id, [int(s) for s in from_states]]
        if attempt is not None:
            where += f" AND attempts=${n + 3}"
            params.append(attempt)
        for k, v in changes_row(expect or {}).items():
            params.append(v)
            where += f" AND {k} IS NOT DISTINCT FROM ${len(params)}"
        update = f"UPDATE jobs SET {','.join(sets)} WHERE {where} RETURNING *"

        async def op(c: Conn) -> Job | None:
            # the compare-and-set and the new row in one statement: nothing is read back
            r = await c.fetchrow(update, *params)
            if r is None:
                return None
            if event is not None:
                await _insert_event(c, event, r["last_sequence"])
                await self._notify(c, job_id, JobState(r["state"]))
            if feedback is not None:
                await _insert_feedback(c, feedback)
            if outcome is not None:
                worker_id, success = outcome
                at = event.time if event is not None else float(r["updated_at"] or 0.0)
                await _count_result(c, worker_id, at, success)
            return job_of(r)

        return op

    # --- verification runs ----------------------------------------------------------------

    async def record_run(
        self, run: Run, from_states: Sequence[JobState], changes: dict[str, Any], event: Event
    ) -> Job | None:
        move = self._transition(run.job_id, from_states, run.attempt, changes, event)
        row = run_row(run)
        insert = _insert_run_sql(row)

        async def op(c: Conn) -> Job | None:
            job = await move(c)
            if job is None:
                return None
            if await c.fetchval(insert, *row.values()) is None:
                raise _RunExists  # the attempt's run is there already: roll back
            return job

        try:
            return await self._write(op)
        except _RunExists:
            return None

    async def job_runs(self, job_id: str) -> list[Run]:
        async def op(c: Conn) -> list[Run]:
            rows = await c.fetch("SELECT * FROM job_runs WHERE job_id=$1 ORDER BY attempt", job_id)
            return [run_of(r) for r in rows]

        return await self._read(op)

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
        move = self._transition(job_id, from_states, attempt, changes, event)
        row = run_row(run) if run is not None else None

        async def op(c: Conn) -> Job | None:
            job = await move(c)
            if job is None:
                return None
            if row is not None and await c.fetchval(_insert_run_sql(row), *row.values()) is None:
                raise _RunExists
            await c.executemany(
                "UPDATE job_runs SET verdict=$1 WHERE job_id=$2 AND attempt=$3",
                [(v, job_id, a) for a, v in verdicts.items()],
            )
            for f in feedback:
                await _insert_feedback(c, f)
            for worker_id, success in outcomes:
                await _count_result(c, worker_id, event.time, success)
            return job

        try:
            return await self._write(op)
        except _RunExists:
            return None

    async def append_progress(self, events: Sequence[Event]) -> bool:
        if not events:
            return True
        first, last = events[0], events[-1]
        if last.sequence - first.sequence != len(events) - 1:
            raise ValueError("append_progress takes consecutive sequence numbers")
        chunks = json.dumps([[len(e.text), e.fraction, e.time] for e in events])
        row = dataclasses.replace(last, text="".join(e.text for e in events))

        async def op(c: Conn) -> bool:
            moved = await c.fetchval(
                "UPDATE jobs SET last_sequence=$1 WHERE job_id=$2 AND last_sequence=$3 "
                "AND NOT (state = ANY($4::int[])) RETURNING 1",
                last.sequence,
                first.job_id,
                first.sequence - 1,
                _FINAL,
            )
            if moved is None:
                return False
            await _insert_event(c, row, last.sequence, first.sequence, chunks)
            await self._notify(c, first.job_id, first.state)
            return True

        return await self._write(op)

    async def offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        time = await self._read(
            lambda c: c.fetchval(
                "SELECT time FROM events WHERE job_id=$1 AND kind=$2 AND state=$3 "
                f"AND worker_id=$4 AND attempt=$5 AND {not_given_up()} ORDER BY sequence LIMIT 1",
                job_id,
                EventKind.STATE.value,
                int(JobState.OFFERED),
                worker_id,
                attempt,
            )
        )
        return None if time is None else float(time)

    async def held_attempts(self, worker_id: str, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT DISTINCT job_id, attempt FROM events WHERE job_id = ANY($1::text[]) "
                f"AND kind=$2 AND state=$3 AND worker_id=$4 "
                f"AND {not_given_up(reasons=NOT_HELD)}",
                list(job_ids),
                EventKind.STATE.value,
                int(JobState.OFFERED),
                worker_id,
            )
        )
        return {(str(r["job_id"]), int(r["attempt"])) for r in rows}

    async def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[Event]:
        # a coalesced row is keyed by its last sequence, so the row holding sequence+1
        # is the first one found; its events up to `sequence` are skipped
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT * FROM events WHERE job_id=$1 AND sequence>$2 ORDER BY sequence LIMIT $3",
                job_id,
                sequence,
                limit,
            )
        )
        out: list[Event] = []
        for r in rows:
            out.extend(e for e in events_of(r) if e.sequence > sequence)
            if len(out) >= limit:
                break
        return out[:limit]

    async def _jobs(self, where: str, *params: Any) -> list[Job]:
        rows = await self._read(lambda c: c.fetch(f"SELECT * FROM jobs WHERE {where}", *params))
        return [job_of(r) for r in rows]

    async def queued_jobs(
        self, limit: int, after: tuple[float, str] | None = None, runnable: Runnable | None = None
    ) -> list[Job]:
        where = f"state = {_QUEUED}"  # a literal, so the partial index jobs_queued is used
        params: list[Any] = []
        if after is not None:
            where += " AND (queued_at, job_id) > ($1, $2)"
            params += list(after)
        if runnable is not None:
            # the names go in as one array parameter, however many there are
            i = len(params)
            task = f"job_type = ${i + 1} AND NOT use_llm AND task_name = ANY(${i + 2}::text[])"
            llm = f"job_type = ${i + 3} OR use_llm" if runnable.llm else "false"
            where += f" AND (({task}) OR ({llm}))"
            params += [int(JobType.TASK), sorted(runnable.task_names)]
            if runnable.llm:
                params.append(int(JobType.LLM))
        params.append(limit)
        return await self._jobs(f"{where} ORDER BY queued_at, job_id LIMIT ${len(params)}", *params)

    async def lapsed_leases(self, now: float) -> list[Job]:
        return await self._jobs(f"state IN ({_ACTIVE}) AND lease_expires_at < $1", now)

    async def stale_queued(self, queued_before: float) -> list[Job]:
        return await self._jobs(f"state = {_QUEUED} AND queued_at < $1", queued_before)

    async def active_jobs(self, worker_id: str | None = None) -> list[Job]:
        if worker_id is None:
            return await self._jobs(f"state IN ({_ACTIVE})")
        return await self._jobs(f"state IN ({_ACTIVE}) AND worker_id = $1", worker_id)

    # --- pairing ------------------------------------------------------------------------

    async def put_pairing_code(
        self, code_hash: bytes, client_id: str, expires_at: float, now: float = 0.0, most: int = 0
    ) -> None:
        async def op(c: Conn) -> None:
            if most > 0:
                live = await c.fetchval(
                    "SELECT count(*) FROM pairing_codes "
                    "WHERE client_id=$1 AND used_at IS NULL AND expires_at >= $2",
                    client_id,
                    now,
                )
                if live >= most:
                    raise TooManyPairingCodes(most)
            await c.execute(
                "INSERT INTO pairing_codes VALUES ($1,$2,$3,NULL)", code_hash, client_id, expires_at
            )

        await self._write(op)

    async def pairing_code_owner(self, code_hash: bytes, now: float) -> str | None:
        owner = await self._read(
            lambda c: c.fetchval(
                "SELECT client_id FROM pairing_codes "
                "WHERE code_hash=$1 AND used_at IS NULL AND expires_at >= $2",
                code_hash,
                now,
            )
        )
        return None if owner is None else str(owner)

    async def claim_pairing_code(self, code_hash: bytes, now: float) -> str | None:
        async def op(c: Conn) -> str | None:
            owner = await c.fetchval(
                "UPDATE pairing_codes SET used_at=$2 "
                "WHERE code_hash=$1 AND used_at IS NULL AND expires_at >= $2 RETURNING client_id",
                code_hash,
                now,
            )
            return None if owner is None else str(owner)

        return await self._write(op)

    async def put_pairing(self, pairing: Pairing, most: int = 0) -> Pairing:
        async def op(c: Conn) -> Pairing:
            if most > 0:
                active = await c.fetchrow(
                    "SELECT * FROM pairings WHERE client_id=$1 AND worker_id=$2 "
                    "AND revoked_at IS NULL",
                    pairing.client_id,
                    pairing.worker_id,
                )
                if active is not None:
                    return pairing_of(active)
                for column, party, who in (
                    ("client_id", pairing.client_id, "client"),
                    ("worker_id", pairing.worker_id, "worker"),
                ):
                    kept = await c.fetchval(
                        f"SELECT count(*) FROM pairings WHERE {column}=$1", party
                    )
                    if kept >= most and await _forget_revoked(c, column, party, kept - most + 1):
                        raise TooManyPairings(most, who)
            r = await c.fetchrow(
                "INSERT INTO pairings VALUES ($1,$2,$3,$4,NULL) ON CONFLICT (client_id, worker_id) "
                "WHERE revoked_at IS NULL DO NOTHING RETURNING *",
                pairing.pairing_id,
                pairing.client_id,
                pairing.worker_id,
                pairing.created_at,
            )
            if r is None:  # the pair's active pairing (committed: ON CONFLICT waited for it)
                r = await c.fetchrow(
                    "SELECT * FROM pairings WHERE client_id=$1 AND worker_id=$2 "
                    "AND revoked_at IS NULL",
                    pairing.client_id,
                    pairing.worker_id,
                )
            return pairing_of(r)

        return await self._write(op)

    async def get_pairing(self, pairing_id: str) -> Pairing | None:
        r = await self._read(
            lambda c: c.fetchrow("SELECT * FROM pairings WHERE pairing_id=$1", pairing_id)
        )
        return pairing_of(r) if r is not None else None

    async def list_pairings(self, party_id: str, include_revoked: bool) -> list[Pairing]:
        sql = "SELECT * FROM pairings WHERE (client_id=$1 OR worker_id=$1)"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        rows = await self._read(lambda c: c.fetch(sql + " ORDER BY created_at", party_id))
        return [pairing_of(r) for r in rows]

    async def revoke_pairing(self, pairing_id: str, now: float) -> Pairing | None:
        async def op(c: Conn) -> Pairing | None:
            r = await c.fetchrow(
                "UPDATE pairings SET revoked_at=$1 WHERE pairing_id=$2 AND revoked_at IS NULL "
                "RETURNING *",
                now,
                pairing_id,
            )
            if r is None:  # unknown, or revoked already (it keeps its first revocation)
                r = await c.fetchrow("SELECT * FROM pairings WHERE pairing_id=$1", pairing_id)
            return pairing_of(r) if r is not None else None

        return await self._write(op)

    async def paired_workers(self, client_id: str) -> set[str]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT worker_id FROM pairings WHERE client_id=$1 AND revoked_at IS NULL",
                client_id,
            )
        )
        return {str(r["worker_id"]) for r in rows}

    # --- receipt batches ----------------------------------------------------------------

    async def unbatched_receipts(self, limit: int) -> list[UnbatchedReceipt]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT job_id, receipt_sha256, updated_at FROM jobs "
                f"WHERE state = {_COMPLETED} AND receipt_batch_id IS NULL "
                "AND receipt_sha256 IS NOT NULL ORDER BY updated_at, job_id LIMIT $1",
                limit,
            )
        )
        return [
            UnbatchedReceipt(r["job_id"], bytes(r["receipt_sha256"]), r["updated_at"]) for r in rows
        ]

    async def create_receipt_batch(
        self, batch: ReceiptBatch, leaves: Sequence[UnbatchedReceipt]
    ) -> bool:
        if len(leaves) != batch.leaf_count or not leaves:
            raise ValueError("a batch needs leaf_count leaves, at least one")
        ids = [leaf.job_id for leaf in leaves]

        async def op(c: Conn) -> bool:
            # claim the leaves: rows another batcher holds are skipped, never waited for,
            # so of two batchers sharing a receipt the second refuses
            claimed = await c.fetch(
                "SELECT j.job_id FROM jobs j JOIN unnest($1::text[], $2::bytea[]) AS v(id, h) "
                f"ON j.job_id = v.id WHERE j.state = {_COMPLETED} AND j.receipt_sha256 = v.h "
                "AND j.receipt_batch_id IS NULL ORDER BY j.job_id FOR UPDATE OF j SKIP LOCKED",
                ids,
                [leaf.receipt_sha256 for leaf in leaves],
            )
            if len(claimed) != len(leaves):  # one is batched, another's, or not a receipt
                return False
            await c.execute(
                "UPDATE jobs j SET receipt_batch_id = $1, receipt_leaf_index = v.i "
                "FROM unnest($2::text[], $3::int[]) AS v(id, i) WHERE j.job_id = v.id",
                batch.batch_id,
                ids,
                list(range(len(ids))),
            )
            await c.execute(
                f"INSERT INTO receipt_batches VALUES ({_placeholders(1, 9)})",
                batch.batch_id,
                batch.merkle_root,
                batch.leaf_count,
                batch.created_at,
                batch.anchor_status.value,
                batch.anchor_network,
                batch.anchor_transaction,
                batch.anchor_error,
                batch.anchored_at,
            )
            return True

        return await self._write(op)

    async def get_receipt_batch(self, batch_id: str) -> ReceiptBatch | None:
        r = await self._read(
            lambda c: c.fetchrow("SELECT * FROM receipt_batches WHERE batch_id=$1", batch_id)
        )
        return batch_of(r) if r is not None else None

    async def receipt_leaf(self, job_id: str) -> ReceiptLeaf | None:
        r = await self._read(
            lambda c: c.fetchrow(
                "SELECT receipt_batch_id, receipt_leaf_index, job_id, receipt_sha256 FROM jobs "
                "WHERE job_id=$1 AND receipt_batch_id IS NOT NULL",
                job_id,
            )
        )
        return None if r is None else _leaf(r)

    async def batch_leaves(self, batch_id: str) -> list[ReceiptLeaf]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT receipt_batch_id, receipt_leaf_index, job_id, receipt_sha256 FROM jobs "
                "WHERE receipt_batch_id=$1 ORDER BY receipt_leaf_index",
                batch_id,
            )
        )
        return [_leaf(r) for r in rows]

    async def receipt_batches(
        self, statuses: Sequence[AnchorStatus] | None = None, limit: int = 100
    ) -> list[ReceiptBatch]:
        sql, params = "SELECT * FROM receipt_batches", list[Any]([limit])
        if statuses is not None:
            sql += " WHERE anchor_status = ANY($2::text[])"
            params.append([s.value for s in statuses])
        rows = await self._read(
            lambda c: c.fetch(sql + " ORDER BY created_at, batch_id LIMIT $1", *params)
        )
        return [batch_of(r) for r in rows]

    async def update_anchor(
        self,
        batch_id: str,
        status: AnchorStatus,
        network: str = "",
        transaction: str = "",
        error: str = "",
        anchored_at: float | None = None,
    ) -> ReceiptBatch | None:
        async def op(c: Conn) -> ReceiptBatch | None:
            r = await c.fetchrow(
                "UPDATE receipt_batches SET anchor_status=$1, anchor_network=$2, "
                "anchor_transaction=$3, anchor_error=$4, anchored_at=$5 "
                "WHERE batch_id=$6 AND anchor_status = ANY($7::text[]) RETURNING *",
                status.value,
                network,
                transaction,
                error,
                anchored_at,
                batch_id,
                [AnchorStatus.PENDING.value, AnchorStatus.FAILED.value],
            )
            return batch_of(r) if r is not None else None

        return await self._write(op)

    # --- feedback outbox ----------------------------------------------------------------

    async def feedback_entries(
        self, statuses: Sequence[FeedbackStatus] | None = None, limit: int = 1000
    ) -> list[FeedbackEntry]:
        if statuses:
            sql = "SELECT * FROM feedback_outbox WHERE status = ANY($2::text[])"
            params: list[Any] = [limit, [s.value for s in statuses]]
        else:
            sql, params = "SELECT * FROM feedback_outbox", [limit]
        rows = await self._read(
            lambda c: c.fetch(sql + " ORDER BY created_at, job_id LIMIT $1", *params)
        )
        return [feedback_of(r) for r in rows]

    async def update_feedback(
        self, job_id: str, status: FeedbackStatus, transaction: str = "", error: str = ""
    ) -> bool:
        async def op(c: Conn) -> bool:
            done = await c.execute(
                "UPDATE feedback_outbox SET status=$1, tx=$2, error=$3, attempts=attempts+1 "
                "WHERE job_id=$4 AND status=$5",
                status.value,
                transaction,
                error,
                job_id,
                FeedbackStatus.PENDING.value,
            )
            return _count(done) == 1

        return await self._write(op)

    # --- payments -----------------------------------------------------------------------

    async def get_payment(self, job_id: str) -> Payment | None:
        r = await self._read(lambda c: c.fetchrow("SELECT * FROM payments WHERE job_id=$1", job_id))
        return payment_of(r) if r is not None else None

    async def payment_standing(
        self, network: str, asset: str, payer: str, authorization_id: str
    ) -> tuple[bool, int]:
        r = await self._read(
            lambda c: c.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM payments WHERE network=$1 AND lower(asset)=$2 "
                "AND lower(payer)=$3 AND lower(authorization_id)=$4) AS used, "
                "(SELECT COALESCE(SUM(amount), 0) FROM payments WHERE network=$1 "
                f"AND lower(asset)=$2 AND lower(payer)=$3 AND {PAYMENT_OWED}) AS owed",
                network,
                asset.lower(),
                payer.lower(),
                authorization_id.lower(),
            )
        )
        return bool(r["used"]), int(r["owed"])

    async def open_payments(self, limit: int = 100) -> list[tuple[Payment, JobState]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT payments.*, jobs.state AS job_state FROM payments "
                "JOIN jobs ON jobs.job_id = payments.job_id "
                "WHERE NOT (payments.status = ANY($1::text[])) "
                "ORDER BY payments.created_at, payments.job_id LIMIT $2",
                [s.value for s in PaymentStatus if s.final],
                limit,
            )
        )
        return [(payment_of(r), JobState(r["job_state"])) for r in rows]

    async def due_payments(self, now: float, limit: int = 100) -> list[tuple[Payment, JobState]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT payments.*, jobs.state AS job_state FROM payments "
                "JOIN jobs ON jobs.job_id = payments.job_id "
                "WHERE (payments.status = $1 AND (jobs.state = ANY($4::int[]) "
                "OR payments.settle_by <= $5)) "
                "OR (payments.status = $2 AND jobs.state = ANY($4::int[])) "
                "OR payments.status = $3 "
                "ORDER BY payments.created_at, payments.job_id LIMIT $6",
                PaymentStatus.AUTHORIZED.value,
                PaymentStatus.HELD.value,
                PaymentStatus.REFUND_DUE.value,
                _FINAL,
                now,
                limit,
            )
        )
        return [(payment_of(r), JobState(r["job_state"])) for r in rows]

    async def update_payment(
        self,
        job_id: str,
        from_statuses: Sequence[PaymentStatus],
        changes: dict[str, Any],
        credit: Split | None = None,
    ) -> Payment | None:
        columns = {
            "status": "status",
            "transaction": "tx",
            "refund_transaction": "refund_tx",
            "refund_raw": "refund_raw",
            "error": "error",
            "attempts": "attempts",
            "settle_by": "settle_by",
            "updated_at": "updated_at",
        }
        values = {
            columns[k]: (v.value if isinstance(v, PaymentStatus) else v) for k, v in changes.items()
        }
        n = len(values)
        sets = ",".join(f"{col}=${i}" for i, col in enumerate(values, 1))
        update = (
            f"UPDATE payments SET {sets} WHERE job_id=${n + 1} "
            f"AND status = ANY(${n + 2}::text[]) RETURNING *"
        )

        async def op(c: Conn) -> Payment | None:
            r = await c.fetchrow(update, *values.values(), job_id, [s.value for s in from_statuses])
            if r is None:
                return None
            payment = payment_of(r)
            await c.execute(
                "UPDATE jobs SET payment=$1 WHERE job_id=$2",
                json.dumps(payment.ref().__dict__),
                job_id,
            )
            now = payment.updated_at
            if credit is not None:
                # one credit per job and worker: a retried settlement never credits twice
                credited = 0
                for worker_id, fee, share in await _payees(c, job_id, credit):
                    credited += _count(
                        await c.execute(
                            "INSERT INTO earnings VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                            "NULL) ON CONFLICT (job_id, worker_id) DO NOTHING",
                            job_id,
                            worker_id,
                            payment.network,
                            payment.asset,
                            payment.amount,
                            credit.fee_bps,
                            fee,
                            share,
                            now,
                        )
                    )
                if credited:
                    await _add_earned(c, job_id, 1, now)
            if payment.status in (PaymentStatus.REFUND_DUE, PaymentStatus.REFUNDED):
                reversed_ = await c.execute(
                    "UPDATE earnings SET reversed_at=$1 WHERE job_id=$2 AND reversed_at IS NULL",
                    now,
                    job_id,
                )
                if _count(reversed_):
                    await _add_earned(c, job_id, -1, None)
            return payment

        return await self._write(op)

    async def audit_flows(
        self, network: str
    ) -> tuple[list[tuple[str, str, str, int]], dict[str, int]]:
        settled = [
            s.value
            for s in (
                PaymentStatus.SETTLED,
                PaymentStatus.HELD,
                PaymentStatus.REFUND_DUE,
                PaymentStatus.REFUNDED,
            )
        ]

        async def op(c: Conn) -> tuple[list[tuple[str, str, str, int]], dict[str, int]]:
            flows: list[tuple[str, str, str, int]] = []
            for r in await c.fetch(
                "SELECT asset, tx, refund_tx, amount, status FROM payments WHERE network=$1 "
                "AND tx <> '' AND status = ANY($2::text[]) ORDER BY created_at, job_id",
                network,
                settled,
            ):
                flows.append(("settlement", r["asset"], r["tx"], int(r["amount"])))
                if r["status"] == PaymentStatus.REFUNDED.value:
                    flows.append(("refund", r["asset"], r["refund_tx"], -int(r["amount"])))
            for r in await c.fetch(
                "SELECT asset, tx, amount FROM payouts WHERE network=$1 AND state=$2 "
                "ORDER BY created_at, payout_id",
                network,
                PayoutRowState.LANDED.value,
            ):
                flows.append(("payout", r["asset"], r["tx"], -int(r["amount"])))
            fees = {
                r["asset"]: int(r["fees"])
                for r in await c.fetch(
                    "SELECT asset, sum(fee) AS fees FROM earnings WHERE network=$1 "
                    "AND reversed_at IS NULL GROUP BY asset",
                    network,
                )
            }
            return flows, fees

        # one snapshot for all three reads
        return await self._read(lambda c: _in_snapshot(c, op))

    # --- earnings and payouts -----------------------------------------------------------

    async def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        after = "AND (credited_at, job_id) < ($3, $4) " if before is not None else ""
        rows = await self._read(
            lambda c: c.fetch(
                f"SELECT * FROM earnings WHERE worker_id=$1 {after}"
                "ORDER BY credited_at DESC, job_id DESC LIMIT $2",
                worker_id,
                limit,
                *(before or ()),
            )
        )
        return [earning_of(r) for r in rows]

    async def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        if not worker_ids:
            return {}
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT worker_id, network, asset, earned, paid FROM worker_earnings "
                "WHERE worker_id = ANY($1::text[]) AND (earned <> 0 OR paid <> 0) "
                "ORDER BY worker_id, network, asset",
                list(worker_ids),
            )
        )
        out: dict[str, list[Balance]] = {}
        for r in rows:
            earned = int(r["earned"])
            # paid counts the payouts not landed yet too: balance = earned - paid - pending
            out.setdefault(r["worker_id"], []).append(
                Balance(r["network"], r["asset"], earned, earned - int(r["paid"]))
            )
        return out

    async def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]:
        since = "coalesce(e.unpaid_since, 0)"
        page = f"AND ({since}, e.worker_id, e.asset) > ($5, $6, $7) " if after is not None else ""
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT e.worker_id, w.agent_id, e.network, e.asset, "
                f"e.earned - e.paid AS unpaid, {since} AS since "
                "FROM worker_earnings e JOIN workers w ON w.worker_id = e.worker_id "
                "WHERE e.network = $1 AND w.agent_id <> '' AND e.earned - e.paid > 0 "
                f"AND (e.earned - e.paid >= $2 OR e.unpaid_since <= $3) {page}"
                f"AND NOT EXISTS ({OPEN_PAYOUT_OF_E}) "
                f"ORDER BY {since}, e.worker_id, e.asset LIMIT $4",
                network,
                min_amount,
                unpaid_before,
                limit,
                *(after or ()),
            )
        )
        return [
            PayoutDue(
                r["worker_id"],
                r["agent_id"],
                r["network"],
                r["asset"],
                int(r["unpaid"]),
                float(r["since"]),
            )
            for r in rows
        ]

    async def create_payout(self, payout: PayoutRecord) -> bool:
        async def op(c: Conn) -> bool:
            debited = await c.fetchval(
                "UPDATE worker_earnings SET paid = paid + $1, unpaid_since = "
                "CASE WHEN earned - paid - $1 > 0 THEN $2::float8 ELSE NULL END "
                "WHERE worker_id=$3 AND network=$4 AND asset=$5 AND earned - paid >= $1 "
                "RETURNING 1",
                payout.amount,
                payout.created_at,
                payout.worker_id,
                payout.network,
                payout.asset,
            )
            if debited is None:
                return False
            await c.execute(
                f"INSERT INTO payouts VALUES ({_placeholders(1, 12)})",
                payout.payout_id,
                payout.worker_id,
                payout.network,
                payout.asset,
                payout.to,
                payout.amount,
                payout.state.value,
                payout.raw,
                payout.transaction,
                payout.error,
                payout.created_at,
                payout.updated_at,
            )
            return True

        return await self._write(op)

    async def update_payout(
        self, payout_id: str, from_states: Sequence[PayoutRowState], changes: dict[str, Any]
    ) -> PayoutRecord | None:
        columns = {
            "state": "state",
            "raw": "raw",
            "transaction": "tx",
            "error": "error",
            "updated_at": "updated_at",
        }
        values = {
            columns[k]: (v.value if isinstance(v, PayoutRowState) else v)
            for k, v in changes.items()
        }
        n = len(values)
        sets = ",".join(f"{col}=${i}" for i, col in enumerate(values, 1))
        update = (
            f"UPDATE payouts SET {sets} WHERE payout_id=${n + 1} "
            f"AND state = ANY(${n + 2}::text[]) RETURNING *"
        )

        async def op(c: Conn) -> PayoutRecord | None:
            r = await c.fetchrow(
                update, *values.values(), payout_id, [s.value for s in from_states]
            )
            if r is None:
                return None
            payout = payout_of(r)
            if payout.state is PayoutRowState.FAILED:
                # it can never land: its amount is the worker's to be paid again
                await c.execute(
                    "UPDATE worker_earnings SET paid = paid - $1, "
                    "unpaid_since = coalesce(unpaid_since, $2) "
                    "WHERE worker_id=$3 AND network=$4 AND asset=$5",
                    payout.amount,
                    payout.updated_at,
                    payout.worker_id,
                    payout.network,
                    payout.asset,
                )
            return payout

        return await self._write(op)

    async def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT * FROM payouts WHERE state = ANY($1::text[]) AND network=$2 "
                "ORDER BY updated_at, payout_id LIMIT $3",
                [PayoutRowState.PENDING.value, PayoutRowState.SIGNED.value],
                network,
                limit,
            )
        )
        return [payout_of(r) for r in rows]

    async def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT * FROM payouts WHERE worker_id=$1 "
                "ORDER BY created_at DESC, payout_id DESC LIMIT $2",
                worker_id,
                limit,
            )
        )
        return [payout_of(r) for r in rows]

    # --- workers ------------------------------------------------------------------------

    async def record_worker_seen(
        self, worker_id: str, kind: int, now: float, agent_id: str = ""
    ) -> None:
        async def op(c: Conn) -> None:
            # a session without an agent id keeps the last verified one (its payout address)
            await c.execute(
                "INSERT INTO workers (worker_id, kind, first_seen, last_seen, completed, failed, "
                "agent_id) VALUES ($1,$2,$3,$3,0,0,$4) ON CONFLICT (worker_id) DO UPDATE "
                "SET kind = excluded.kind, last_seen = excluded.last_seen, agent_id = CASE "
                "WHEN excluded.agent_id <> '' THEN excluded.agent_id ELSE workers.agent_id END",
                worker_id,
                kind,
                now,
                agent_id,
            )

        await self._write(op)

    async def record_task_names(self, names: Sequence[str], now: float, keep: int) -> None:
        async def op(c: Conn) -> None:
            await c.execute("SELECT pg_advisory_xact_lock($1)", _TASK_NAMES_LOCK)
            await c.execute(
                "INSERT INTO task_names SELECT unnest($1::text[]), $2 "
                "ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                sorted(set(names)),
                now,
            )
            await c.execute(
                "DELETE FROM task_names WHERE name NOT IN "
                "(SELECT name FROM task_names ORDER BY last_seen DESC, name LIMIT $1)",
                keep,
            )

        await self._write(op)

    async def task_name_known(self, name: str) -> bool:
        found = await self._read(
            lambda c: c.fetchval("SELECT 1 FROM task_names WHERE name=$1", name)
        )
        return found is not None

    async def task_names(self, limit: int) -> list[str]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT name FROM task_names ORDER BY last_seen DESC, name LIMIT $1", limit
            )
        )
        return [str(r["name"]) for r in rows]

    async def worker_stats(self, worker_id: str) -> tuple[int, int]:
        r = await self._read(
            lambda c: c.fetchrow(
                "SELECT completed, failed FROM workers WHERE worker_id=$1", worker_id
            )
        )
        return (0, 0) if r is None else (int(r["completed"]), int(r["failed"]))

    async def record_spot_check(self, worker_id: str, agreed: bool, now: float) -> None:
        column = "agreed" if agreed else "disagreed"
        await self._write(lambda c: _count_day(c, worker_id, now, column))

    async def worker_days(self, worker_id: str, since_day: int) -> list[WorkerDay]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT day, completed, failed, agreed, disagreed FROM worker_days "
                "WHERE worker_id=$1 AND day>=$2 ORDER BY day",
                worker_id,
                since_day,
            )
        )
        return [
            WorkerDay(r["day"], r["completed"], r["failed"], r["agreed"], r["disagreed"])
            for r in rows
        ]


# --- statements shared by several methods ---------------------------------------------------


async def _count_day(c: Conn, worker_id: str, at: float, column: str) -> None:
    """One more `column` (completed, failed, agreed, disagreed) in the worker's day."""
    await c.execute(
        f"INSERT INTO worker_days (worker_id, day, {column}) VALUES ($1, $2, 1) "
        f"ON CONFLICT (worker_id, day) DO UPDATE SET {column} = worker_days.{column} + 1",
        worker_id,
        day_of(at),
    )


async def _count_result(c: Conn, worker_id: str, at: float, success: bool) -> None:
    """One more completed (or failed) job in the worker's totals and in its day, in one
    statement. Every result of a worker takes its turn on the worker's row, from every
    coordinator, and holds its lock until the transaction commits: one round trip less
    while it is held (results write it last)."""
    column = "completed" if success else "failed"
    await c.execute(
        f"WITH counted AS (UPDATE workers SET {column} = {column} + 1 WHERE worker_id=$1) "
        f"INSERT INTO worker_days (worker_id, day, {column}) VALUES ($1, $2, 1) "
        f"ON CONFLICT (worker_id, day) DO UPDATE SET {column} = worker_days.{column} + 1",
        worker_id,
        day_of(at),
    )


def _shard(quote_id: str) -> int:
    return hashlib.sha256(quote_id.encode()).digest()[0] % USAGE_SHARDS


def total_shard(quote_id: str) -> str:
    """The quote_usage row of all owners together that counts this quote: one of
    USAGE_SHARDS rows ("*0" ...), summed when read, so that GetQuotes at several
    coordinators do not all wait for one row's lock (a quote counted in the "*" row of an
    older schema is given back to its shard: the sum stays right)."""
    return f"{TOTAL_OWNER}{_shard(quote_id)}"


def owner_shard(owner: str, quote_id: str) -> str:
    """The owner's quote_usage row that counts this quote: "<owner>#0" ... (client ids
    are hex, the anonymous owner ""), summed when read, for the same reason."""
    return f"{owner}#{_shard(quote_id)}"


async def _in_snapshot(c: Conn, op: Callable[[Conn], Awaitable[T]]) -> T:
    async with c.transaction(isolation="repeatable_read", readonly=True):
        return await op(c)


async def _insert_event(
    c: Conn, e: Event, seq: int, first_sequence: int | None = None, chunks: str | None = None
) -> None:
    await c.execute(
        "INSERT INTO events (job_id, sequence, kind, state, time, from_state, reason, worker_id, "
        f"attempt, text, fraction, first_sequence, chunks) VALUES ({_placeholders(1, 13)})",
        e.job_id,
        seq,
        e.kind.value,
        int(e.state),
        e.time,
        int(e.from_state) if e.from_state is not None else None,
        e.reason,
        e.worker_id,
        e.attempt,
        e.text,
        e.fraction,
        first_sequence,
        chunks,
    )


async def _insert_feedback(c: Conn, f: FeedbackEntry) -> None:
    await c.execute(
        f"INSERT INTO feedback_outbox VALUES ({_placeholders(1, 13)}) "
        "ON CONFLICT (job_id) DO NOTHING",
        f.job_id,
        str(f.agent_id),
        f.value,
        f.value_decimals,
        f.tag1,
        f.tag2,
        f.feedback_uri,
        f.feedback_hash,
        f.created_at,
        f.status.value,
        f.transaction,
        f.error,
        f.attempts,
    )


async def _insert_payment(c: Conn, p: Payment) -> None:
    await c.execute(
        f"INSERT INTO payments VALUES ({_placeholders(1, 19)})",
        p.job_id,
        p.network,
        p.asset,
        p.pay_to,
        p.payer,
        p.amount,
        p.authorization_id,
        p.valid_before,
        p.settle_by,
        p.payload_json,
        p.requirement_json,
        p.status.value,
        p.created_at,
        p.updated_at,
        p.transaction,
        p.refund_transaction,
        p.refund_raw,
        p.error,
        p.attempts,
    )


async def _payees(c: Conn, job_id: str, credit: Split) -> list[tuple[str, int, int]]:
    """(worker_id, fee, share) per worker a settled job credits: its worker, or the
    workers of its agreeing runs (Split.among)."""
    job = await c.fetchrow("SELECT worker_id, verify_mode FROM jobs WHERE job_id=$1", job_id)
    if job is None or not job["worker_id"]:
        return []
    rows = await c.fetch(
        "SELECT worker_id FROM job_runs WHERE job_id=$1 AND verdict=$2 ORDER BY attempt",
        job_id,
        AGREED,
    )
    workers = payees_order(job["worker_id"], [str(r["worker_id"]) for r in rows])
    parts = credit.among(job["verify_mode"], len(workers))
    return [(w, fee, share) for w, (fee, share) in zip(workers, parts, strict=True)]


def _insert_run_sql(row: dict[str, Any]) -> str:
    return (
        f"INSERT INTO job_runs ({','.join(row)}) VALUES ({_placeholders(1, len(row))}) "
        "ON CONFLICT (job_id, attempt) DO NOTHING RETURNING 1"
    )


async def _quote_usage(c: Conn, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
    """What owner's unreleased quotes hold (its own row of an older schema and its
    shards), and what everyone's do (the total's shards)."""
    rows = await c.fetch(
        "SELECT owner LIKE '*%' AS total, sum(quotes) AS quotes, sum(bytes) AS bytes "
        "FROM quote_usage WHERE owner = $1 OR owner LIKE $2 OR owner LIKE '*%' "
        "GROUP BY 1",
        owner,
        owner + "#%",
    )
    usage = {bool(r["total"]): QuoteUsage(int(r["quotes"]), int(r["bytes"])) for r in rows}
    none = QuoteUsage(0, 0)
    return usage.get(False, none), usage.get(True, none)


class _QuoteRefused(Exception):
    """put_quote's limits refuse the quote: its transaction rolls back."""

    def __init__(self, mine: QuoteUsage, everyone: QuoteUsage) -> None:
        super().__init__("quote refused")
        self.mine = mine
        self.everyone = everyone


class _RunExists(Exception):
    """record_run found the attempt's run stored already: its transaction rolls back."""


async def _add_earned(c: Conn, job_id: str, sign: int, now: float | None) -> None:
    """Adds (sign 1, at `now`) or takes back (sign -1) a job's credit in its worker's
    total; a credit to a fully paid balance starts its payout interval."""
    await c.execute(
        "INSERT INTO worker_earnings (worker_id, network, asset, earned, paid, unpaid_since) "
        "SELECT worker_id, network, asset, $1::int * share, 0, $2::float8 FROM earnings "
        "WHERE job_id=$3 ON CONFLICT (worker_id, network, asset) DO UPDATE SET "
        "earned = worker_earnings.earned + excluded.earned, "
        "unpaid_since = coalesce(worker_earnings.unpaid_since, excluded.unpaid_since)",
        sign,
        now,
        job_id,
    )


def _leaf(r: Any) -> ReceiptLeaf:
    return ReceiptLeaf(
        r["receipt_batch_id"], r["receipt_leaf_index"], r["job_id"], bytes(r["receipt_sha256"])
    )


async def open_postgres_store(url: str, pool_size: int = 10) -> PostgresStore:
    """A PostgresStore on the database at `url` (postgresql://user[:password]@host[:port]/db;
    libpq's PGPASSWORD and ~/.pgpass are read too), its schema migrated. Unavailable when the
    database cannot be reached, ValueError when it refuses the connection (password, no
    such database), RuntimeError when its schema is newer than this build."""
    # min_size=0: the pool connects on demand, so a failed first connection leaves nothing
    # running; the first one is made here, to migrate
    settings = {"application_name": "dispatch-coordinator", **KEEPALIVES}
    # the migration on a connection of its own, with no statement timeout (an index built
    # over a big table may take long); the pool's connections have one
    try:
        conn = await asyncpg.connect(url, timeout=10, server_settings=settings)
    except _LOST as e:
        raise Unavailable(f"cannot reach the store's database: {str(e) or type(e).__name__}") from e
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:  # password, no database
        raise ValueError(f"the store's database refused the connection: {e}") from e
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return PostgresStore(
        await asyncpg.create_pool(
            url,
            min_size=0,  # connects on demand
            max_size=pool_size,
            timeout=10,  # seconds to connect
            command_timeout=STATEMENT_TIMEOUT_SECONDS,
            server_settings=settings,
        )
    )


_: type[Store] = PostgresStore  # mypy checks that PostgresStore implements the Store port


class _Undo(Exception):
    """A transition's prior move held but the transition did not: roll both back."""


async def _forget_revoked(c: Conn, column: str, party: str, n: int) -> bool:
    """Deletes the party's n oldest revoked pairings; whether it had fewer (the caller then
    raises, rolling the deletes back with its transaction)."""
    deleted = await c.fetch(
        "DELETE FROM pairings WHERE pairing_id IN (SELECT pairing_id FROM pairings "
        f"WHERE {column}=$1 AND revoked_at IS NOT NULL "
        "ORDER BY revoked_at, pairing_id LIMIT $2) RETURNING pairing_id",
        party,
        n,
    )
    return len(deleted) < n
