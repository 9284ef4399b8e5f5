"""SQLite implementation of the Store protocol (the embedded default), synchronous.

WAL mode, one connection used by one thread at a time, explicit BEGIN IMMEDIATE
transactions. store/threaded.py serves it to the event loop: one writer store that may run
several writes in one transaction (a group, see begin_group), and read-only stores opened
with read_only=True. The schema is versioned with PRAGMA user_version; MIGRATIONS lists
the steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

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
)
from dispatchnet.store.base import QuoteLimits, QuoteUsage, Runnable
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
    stored_job,
)


def _v1(db: sqlite_utils.Database) -> None:
    db.table("quotes").create(
        {
            "quote_id": str,
            "job_type": int,
            "policy": int,
            "privacy": int,
            "task_name": str,
            "llm_model": str,
            "spec_bytes": bytes,
            "spec_sha256": bytes,
            "price_micros": int,
            "currency": str,
            "created_at": float,
            "expires_at": float,
        },
        pk="quote_id",
    )
    db.table("jobs").create(
        {
            "job_id": str,
            "client_id": str,
            "state": int,
            "job_type": int,
            "policy": int,
            "privacy": int,
            "task_name": str,
            "llm_model": str,
            "spec_bytes": bytes,
            "spec_sha256": bytes,
            "price_micros": int,
            "currency": str,
            "quote_id": str,
            "idempotency_key": str,
            "attempts": int,
            "max_attempts": int,
            "created_at": float,
            "updated_at": float,
            "queued_at": float,
            "last_sequence": int,
            "worker_id": str,
            "lease_expires_at": float,
            "result_output": bytes,
            "result_content_type": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "failure_code": str,
            "failure_message": str,
            "receipt_body": bytes,
            "receipt_worker_sig": bytes,
            "receipt_coord_sig": bytes,
            "receipt_sha256": bytes,
            "payment": str,
        },
        pk="job_id",
        not_null={"client_id", "state", "idempotency_key"},
    )
    db.table("jobs").create_index(["client_id", "idempotency_key"], unique=True)
    db.table("jobs").create_index(["state", "queued_at"])
    db.table("jobs").create_index(["state", "lease_expires_at"])
    db.table("jobs").create_index(["worker_id", "state"])
    db.table("events").create(
        {
            "job_id": str,
            "sequence": int,
            "kind": str,
            "state": int,
            "time": float,
            "from_state": int,
            "reason": str,
            "worker_id": str,
            "attempt": int,
            "text": str,
            "fraction": float,
        },
        pk=("job_id", "sequence"),
    )
    db.table("pairing_codes").create(
        {"code_hash": bytes, "client_id": str, "expires_at": float, "used_at": float},
        pk="code_hash",
    )
    db.table("pairings").create(
        {
            "pairing_id": str,
            "client_id": str,
            "worker_id": str,
            "created_at": float,
            "revoked_at": float,
        },
        pk="pairing_id",
    )
    db.table("pairings").create_index(["client_id"])
    db.table("pairings").create_index(["worker_id"])
    db.table("workers").create(
        {
            "worker_id": str,
            "kind": int,
            "first_seen": float,
            "last_seen": float,
            "completed": int,
            "failed": int,
        },
        pk="worker_id",
    )


def _v2(db: sqlite_utils.Database) -> None:
    """Text tasks run by an LLM; stored WebAssembly modules."""
    db.execute("ALTER TABLE quotes ADD COLUMN use_llm INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN use_llm INTEGER NOT NULL DEFAULT 0")
    db.table("wasm_modules").create(
        {"sha256": bytes, "module": bytes, "created_at": float}, pk="sha256"
    )


def _v3(db: sqlite_utils.Database) -> None:
    """Receipt batches: Merkle roots over receipt hashes, their anchors, and each
    completed job's leaf. Jobs completed before this version become unbatched receipts."""
    db.table("receipt_batches").create(
        {
            "batch_id": str,
            "merkle_root": bytes,
            "leaf_count": int,
            "created_at": float,
            "anchor_status": str,
            "anchor_network": str,
            "anchor_transaction": str,
            "anchor_error": str,
            "anchored_at": float,
        },
        pk="batch_id",
        not_null={"merkle_root", "leaf_count", "created_at", "anchor_status"},
    )
    db.table("receipt_batches").create_index(["anchor_status", "created_at"])
    db.execute("ALTER TABLE jobs ADD COLUMN receipt_batch_id TEXT")
    db.execute("ALTER TABLE jobs ADD COLUMN receipt_leaf_index INTEGER")
    db.execute(
        "CREATE UNIQUE INDEX idx_jobs_receipt_leaf ON jobs (receipt_batch_id, receipt_leaf_index) "
        "WHERE receipt_batch_id IS NOT NULL"
    )
    # Only the receipts waiting for a batch: the batcher's query reads this index alone.
    db.execute(
        "CREATE INDEX idx_jobs_unbatched_receipts ON jobs (updated_at, job_id) "
        f"WHERE state={int(JobState.COMPLETED)} AND receipt_batch_id IS NULL"
    )


def _v4(db: sqlite_utils.Database) -> None:
    """Indexes for purging expired quotes and pairing codes."""
    db.table("quotes").create_index(["expires_at"])
    db.table("pairing_codes").create_index(["expires_at"])


def _v5(db: sqlite_utils.Database) -> None:
    """The feedback outbox: one ReputationRegistry.giveFeedback owed per finished job whose
    worker has an agent id, written with the job's final transition."""
    db.table("feedback_outbox").create(
        {
            "job_id": str,
            "agent_id": str,  # uint256 as decimal text
            "value": int,
            "value_decimals": int,
            "tag1": str,
            "tag2": str,
            "feedback_uri": str,
            "feedback_hash": bytes,
            "created_at": float,
            "status": str,
            "tx": str,
            "error": str,
            "attempts": int,
        },
        pk="job_id",
        not_null={"agent_id", "value", "feedback_hash", "created_at", "status"},
    )
    db.table("feedback_outbox").create_index(["status", "created_at"])


def _v6(db: sqlite_utils.Database) -> None:
    """x402 payments: one row per paid job, written with the job; the unique replay key
    makes each payment acceptable once, across restarts."""
    db.table("payments").create(
        {
            "job_id": str,
            "network": str,
            "asset": str,
            "pay_to": str,
            "payer": str,
            "amount": str,  # atomic units, decimal text (may exceed 64 bits)
            "authorization_id": str,
            "valid_before": float,
            "settle_by": float,
            "payload_json": str,
            "requirement_json": str,
            "status": str,
            "created_at": float,
            "updated_at": float,
            "tx": str,
            "refund_tx": str,
            "refund_raw": str,
            "error": str,
            "attempts": int,
        },
        pk="job_id",
        not_null={"network", "asset", "payer", "authorization_id", "status"},
    )
    db.execute(
        "CREATE UNIQUE INDEX payments_replay ON payments "
        "(network, lower(asset), lower(payer), lower(authorization_id))"
    )
    db.table("payments").create_index(["status", "created_at"])


def _v7(db: sqlite_utils.Database) -> None:
    """Task names workers have declared (GetQuote refuses names no worker ever offered)."""
    db.table("task_names").create({"name": str, "last_seen": float}, pk="name")
    db.table("task_names").create_index(["last_seen"])


def _v8(db: sqlite_utils.Database) -> None:
    """Quote storage accounting: each quote's owner ("" anonymous), counted size and
    module; usage per owner (and TOTAL_OWNER); module references for purging modules."""
    db.execute("ALTER TABLE quotes ADD COLUMN client_id TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE quotes ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE quotes ADD COLUMN module_sha256 BLOB")
    db.execute("ALTER TABLE jobs ADD COLUMN module_sha256 BLOB")
    db.execute("UPDATE quotes SET size=length(spec_bytes)")
    db.execute(
        "CREATE INDEX idx_quotes_module ON quotes (module_sha256) WHERE module_sha256 IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX idx_jobs_module ON jobs (module_sha256) WHERE module_sha256 IS NOT NULL"
    )
    db.table("quote_usage").create({"owner": str, "quotes": int, "bytes": int}, pk="owner")
    db.execute(
        "INSERT INTO quote_usage SELECT client_id, count(*), sum(size) FROM quotes "
        "GROUP BY client_id"
    )
    db.execute(
        "INSERT INTO quote_usage SELECT ?, count(*), coalesce(sum(size), 0) FROM quotes",
        (TOTAL_OWNER,),
    )


def _v9(db: sqlite_utils.Database) -> None:
    """Coalesced progress: one events row holds consecutive progress events, from
    first_sequence to sequence, its text their texts joined and `chunks` a JSON list of
    [text length, fraction, time] per event, so reads give back each event as it was."""
    db.execute("ALTER TABLE events ADD COLUMN first_sequence INTEGER")
    db.execute("ALTER TABLE events ADD COLUMN chunks TEXT")


def _v10(db: sqlite_utils.Database) -> None:
    """Worker earnings: one credit per settled job (the payment's amount split into the
    coordinator's fee and the worker's share, atomic units), written with the settlement;
    reversed_at is set when the payment is refunded afterwards."""
    db.table("earnings").create(
        {
            "job_id": str,
            "worker_id": str,
            "network": str,
            "asset": str,
            "amount": int,
            "fee_bps": int,
            "fee": int,
            "share": int,
            "credited_at": float,
            "reversed_at": float,
        },
        pk="job_id",
        not_null={"worker_id", "network", "asset", "amount", "fee", "share", "credited_at"},
    )
    db.table("earnings").create_index(["worker_id", "credited_at", "job_id"])
    # running totals per worker and asset, kept with the credits (ListWorkers reads these,
    # never the whole ledger)
    db.table("worker_earnings").create(
        {"worker_id": str, "network": str, "asset": str, "earned": int},
        pk=("worker_id", "network", "asset"),
        not_null={"earned"},
    )


def _v11(db: sqlite_utils.Database) -> None:
    """Worker payouts: each worker's last verified agent id (its payout address is read
    from it on chain); per worker and asset what was paid out (including payouts not yet
    landed) and since when some of the balance has waited; one row per payout, written
    (the balance debited) before it is signed, its signed artifact stored before it is
    sent."""
    db.execute("ALTER TABLE workers ADD COLUMN agent_id TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE worker_earnings ADD COLUMN paid INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE worker_earnings ADD COLUMN unpaid_since REAL")
    db.execute(
        "UPDATE worker_earnings SET unpaid_since = (SELECT min(credited_at) FROM earnings e "
        "WHERE e.worker_id = worker_earnings.worker_id AND e.network = worker_earnings.network "
        "AND e.asset = worker_earnings.asset AND e.reversed_at IS NULL) WHERE earned > 0"
    )
    db.table("payouts").create(
        {
            "payout_id": str,
            "worker_id": str,
            "network": str,
            "asset": str,
            "to_address": str,
            "amount": int,
            "state": str,
            "raw": str,
            "tx": str,
            "error": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="payout_id",
        not_null={"worker_id", "network", "asset", "to_address", "amount", "state"},
    )
    db.table("payouts").create_index(["state", "created_at"])
    db.table("payouts").create_index(["worker_id", "created_at"])


def _v12(db: sqlite_utils.Database) -> None:
    """Jobs record the coordinator whose worker holds them (several may share a store)."""
    db.execute("ALTER TABLE jobs ADD COLUMN coordinator_id TEXT NOT NULL DEFAULT ''")


def _v13(db: sqlite_utils.Database) -> None:
    """Reputation: each worker's record per UTC day (job outcomes and spot-check verdicts),
    so the local score can weigh recent days more."""
    db.table("worker_days").create(
        {
            "worker_id": str,
            "day": int,
            "completed": int,
            "failed": int,
            "agreed": int,
            "disagreed": int,
        },
        pk=("worker_id", "day"),
        not_null={"completed", "failed", "agreed", "disagreed"},
        defaults={"completed": 0, "failed": 0, "agreed": 0, "disagreed": 0},
    )


def _v14(db: sqlite_utils.Database) -> None:
    """Verification (README "Verification"): the runs a quote and a job ask for, the
    job's verification state, its recorded runs; an earnings credit per (job, worker),
    since the agreeing workers of a verified job share its payment."""
    db.execute("ALTER TABLE quotes ADD COLUMN verify INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN verify INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN verify_mode TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE jobs ADD COLUMN verify_runs INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN verify_seen TEXT NOT NULL DEFAULT '[]'")
    db.table("job_runs").create(
        {
            "job_id": str,
            "attempt": int,
            "worker_id": str,
            "agent_id": str,
            "result_output": bytes,
            "result_content_type": str,
            "receipt_body": bytes,
            "receipt_worker_sig": bytes,
            "receipt_coord_sig": bytes,
            "receipt_sha256": bytes,
            "created_at": float,
            "verdict": str,
        },
        pk=("job_id", "attempt"),
        not_null={"worker_id", "receipt_body", "created_at"},
    )
    db.execute("ALTER TABLE earnings RENAME TO earnings_v12")
    db.table("earnings").create(
        {
            "job_id": str,
            "worker_id": str,
            "network": str,
            "asset": str,
            "amount": int,
            "fee_bps": int,
            "fee": int,
            "share": int,
            "credited_at": float,
            "reversed_at": float,
        },
        pk=("job_id", "worker_id"),
        not_null={"worker_id", "network", "asset", "amount", "fee", "share", "credited_at"},
    )
    db.execute("INSERT INTO earnings SELECT * FROM earnings_v12")
    db.execute("DROP TABLE earnings_v12")
    db.table("earnings").create_index(["worker_id", "credited_at", "job_id"])


def _v15(db: sqlite_utils.Database) -> None:
    """Sealed PRIVATE jobs: the workers their input is encrypted to (space-separated)."""
    db.execute("ALTER TABLE quotes ADD COLUMN recipients TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE jobs ADD COLUMN recipients TEXT NOT NULL DEFAULT ''")


_OPEN_SQL = ",".join(str(int(st)) for st in OPEN_STATES)  # as SQL literals


def _v16(db: sqlite_utils.Database) -> None:
    """How many open jobs each client has, for [jobs] client_max_open_jobs: kept by
    triggers on every insert and state change of a job (whatever writes it), so that
    create_job reads one row instead of counting."""
    db.execute(
        "CREATE TABLE open_jobs (client_id TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO open_jobs SELECT client_id, count(*) FROM jobs "
        f"WHERE state IN ({_OPEN_SQL}) GROUP BY client_id"
    )
    db.execute(
        f"CREATE TRIGGER jobs_opened AFTER INSERT ON jobs WHEN new.state IN ({_OPEN_SQL}) "
        "BEGIN INSERT INTO open_jobs VALUES (new.client_id, 1) "
        "ON CONFLICT (client_id) DO UPDATE SET n = n + 1; END"
    )
    db.execute(
        "CREATE TRIGGER jobs_closed AFTER UPDATE OF state ON jobs "
        f"WHEN old.state IN ({_OPEN_SQL}) AND new.state NOT IN ({_OPEN_SQL}) "
        "BEGIN UPDATE open_jobs SET n = n - 1 WHERE client_id = old.client_id; END"
    )


def _any_state(column: str, states: Sequence[JobState]) -> str:
    """`column` is one of states, as an OR of equalities with literals. Not `IN (...)`:
    SQLite builds a temporary b-tree for a list of constants each time a trigger evaluates
    one (measured: ~75 us per final transition of a job with the v16 triggers, 3 us with
    these); the partial indexes' conditions are written the same way. The queries write
    the very same text, so that SQLite sees they imply a partial index's condition and
    uses the index."""
    return "(" + " OR ".join(f"{column}={int(st)}" for st in states) + ")"


_QUEUED_ROW = _any_state("state", (JobState.QUEUED,))  # what idx_jobs_queued holds
_ACTIVE_ROW = _any_state("state", ACTIVE_STATES)  # what idx_jobs_active_* hold


def _v17(db: sqlite_utils.Database) -> None:
    """Cheaper writes of job states. The open-jobs triggers test states without IN lists
    (see _any_state), and the indexes over states hold only the jobs in those states
    (partial indexes): a job's final transition dirties fewer index pages, and each index
    stays the size of the open work, not of the whole history."""
    db.execute("DROP TRIGGER jobs_opened")
    db.execute("DROP TRIGGER jobs_closed")
    db.execute(
        "CREATE TRIGGER jobs_opened AFTER INSERT ON jobs "
        f"WHEN {_any_state('new.state', OPEN_STATES)} "
        "BEGIN INSERT INTO open_jobs VALUES (new.client_id, 1) "
        "ON CONFLICT (client_id) DO UPDATE SET n = n + 1; END"
    )
    db.execute(
        "CREATE TRIGGER jobs_closed AFTER UPDATE OF state ON jobs "
        f"WHEN {_any_state('old.state', OPEN_STATES)} "
        f"AND NOT {_any_state('new.state', OPEN_STATES)} "
        "BEGIN UPDATE open_jobs SET n = n - 1 WHERE client_id = old.client_id; END"
    )
    for name in ("state_queued_at", "state_lease_expires_at", "worker_id_state"):
        db.execute(f"DROP INDEX idx_jobs_{name}")
    db.execute(f"CREATE INDEX idx_jobs_queued ON jobs (queued_at, job_id) WHERE {_QUEUED_ROW}")
    db.execute(f"CREATE INDEX idx_jobs_active_lease ON jobs (lease_expires_at) WHERE {_ACTIVE_ROW}")
    db.execute(f"CREATE INDEX idx_jobs_active_worker ON jobs (worker_id) WHERE {_ACTIVE_ROW}")


def _v18(db: sqlite_utils.Database) -> None:
    """Each client's live pairing codes, for [pairing] max_live_codes."""
    db.execute("CREATE INDEX idx_pairing_codes_client ON pairing_codes (client_id)")


def _v19(db: sqlite_utils.Database) -> None:
    """Open payouts by worker (one at a time per worker and asset) and by when they were
    last touched (the stuck ones go to the back of each pass)."""
    db.execute(
        f"CREATE INDEX idx_payouts_open_worker ON payouts (worker_id) WHERE {OPEN_PAYOUT_STATE}"
    )
    db.execute(
        "CREATE INDEX idx_payouts_open_touched ON payouts (network, updated_at) "
        f"WHERE {OPEN_PAYOUT_STATE}"
    )


def _v20(db: sqlite_utils.Database) -> None:
    """A payer's payments not moved on chain yet (what its balance must still cover)."""
    db.execute(f"CREATE INDEX idx_payments_owed ON payments {PAYMENTS_OWED_INDEX}")


MIGRATIONS = [
    *(_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11, _v12, _v13, _v14, _v15),
    *(_v16, _v17, _v18, _v19, _v20),
]
SCHEMA_VERSION = len(MIGRATIONS)


class _Conflict(Exception):
    """A conditional write found the row changed; the transaction rolls back."""


_log = logging.getLogger("dispatch.store")

# rows a writer changes between two nudges of its checkpointer (~80 single-job commits)
CHECKPOINT_CHANGES = 500
# the least time between two background checkpoints: a checkpoint copies each page once,
# however many commits changed it, so fewer and larger ones copy less under load
CHECKPOINT_INTERVAL_SECONDS = 0.1
# the writer's own checkpoint (SQLite's automatic one, in the COMMIT that takes the log
# past this many pages), left as a backstop for a checkpointer that cannot keep up
BACKSTOP_CHECKPOINT_PAGES = 10_000


class WalCheckpointer:
    """Copies a WAL database's log into the database file from a thread and connection
    of its own, so that the writer's commits do not. SQLite's automatic checkpoint runs
    inside the COMMIT that takes the log past 1,000 pages: ~3-6 ms every ~50 jobs here
    (a job's two commits log ~20 pages), a stall for that commit's writes and all queued
    behind them (RunJob's p99 from 1 submitter ~8 ms against a p50 of ~3.2). The writer
    calls committed() after each commit; every CHECKPOINT_CHANGES changed rows it wakes
    this thread for a PASSIVE checkpoint, which waits for no reader or writer (frames
    still in use stay for the next one), at most one per CHECKPOINT_INTERVAL_SECONDS.
    The writer's automatic checkpoint moves to BACKSTOP_CHECKPOINT_PAGES. A failed
    checkpoint is counted (the first one logged) and retried at the next nudge: the log
    stays valid meanwhile, it only grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs = 0  # checkpoints tried
        self.checkpoints = 0  # ... and done
        self.failures = 0
        self._nudged_at = 0  # the writer's total_changes at the last nudge
        self._due = threading.Event()
        self._stopped = threading.Event()
        self._ran = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, total_changes: int) -> None:
        """After a commit on the writer's connection (its total_changes)."""
        if total_changes - self._nudged_at >= CHECKPOINT_CHANGES:
            self._nudged_at = total_changes
            self._due.set()

    def wait_runs(self, count: int, timeout: float) -> bool:
        """Whether `count` checkpoints have been tried (waiting up to timeout seconds)."""
        with self._ran:
            return self._ran.wait_for(lambda: self.runs >= count, timeout)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            _log.warning("no background WAL checkpoints (SQLite's own at %d pages): %s",
                         BACKSTOP_CHECKPOINT_PAGES, e)  # fmt: skip
            return
        try:
            while not self._stopped.is_set():
                self._due.wait()
                self._due.clear()
                if self._stopped.is_set():
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:
                    self.failures += 1
                    if self.failures == 1:  # then counted only: it is retried each time
                        _log.warning("background WAL checkpoint failed (retried): %s", e)
                else:
                    self.checkpoints += 1
                with self._ran:
                    self.runs += 1
                    self._ran.notify_all()
                self._stopped.wait(CHECKPOINT_INTERVAL_SECONDS)
        finally:
            conn.close()

    def close(self) -> None:
        self._stopped.set()
        self._due.set()
        self._thread.join()


class SqliteStore:
    """Store backed by one SQLite file (or ":memory:").

    read_only=True opens a reader of a database some writer store has opened (and
    migrated) already: no migration, no journal mode change, and the connection refuses
    every write (PRAGMA query_only). background_checkpoints=True (the coordinator's
    writer) copies the log into the database file from a thread (see WalCheckpointer)."""

    def __init__(
        self,
        path: str | Path,
        synchronous: str = "NORMAL",
        *,
        read_only: bool = False,
        background_checkpoints: bool = False,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("sqlite_synchronous must be NORMAL or FULL")
        self.path = str(path)
        self._group = False  # an outer transaction of several writes is open (begin_group)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self.checkpointer: WalCheckpointer | None = None
        journal = ""
        try:
            if read_only:
                self._conn.execute("PRAGMA query_only=1")
            else:
                journal = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA busy_timeout=5000")
            # Statement journals (a savepoint's undo copy of each page it changes: every
            # write of a group has one) in memory, not in a temporary file: with a file,
            # each group created, wrote (hundreds of system calls) and deleted one. They
            # only serve to roll a savepoint back, never for recovery after a crash.
            self._conn.execute("PRAGMA temp_store=MEMORY")
            self.db = sqlite_utils.Database(self._conn)
            if not read_only:
                self._migrate()
            if background_checkpoints and journal == "wal":  # a writer, not in memory
                self._conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
                self.checkpointer = WalCheckpointer(self.path)
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema v{version} is newer than this build (v{SCHEMA_VERSION})"
            )
        for step in range(version, SCHEMA_VERSION):
            with self._tx():
                MIGRATIONS[step](self.db)
                self._conn.execute(f"PRAGMA user_version={step + 1}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction: committed when the block ends (also by return), rolled
        back when it raises. Inside a group (begin_group) it is a savepoint of the group's
        transaction instead: released when the block ends, rolled back when it raises."""
        if self._group:
            with self._savepoint():
                yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._commit()

    def _commit(self) -> None:
        """COMMIT; when it fails (I/O error, deferred constraint) the transaction is rolled
        back rather than left open on the connection, and the error raised."""
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        if self.checkpointer is not None:
            self.checkpointer.committed(self._conn.total_changes)

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[None]:
        self._conn.execute("SAVEPOINT op")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:  # else SQLite rolled the whole transaction back
                self._conn.execute("ROLLBACK TO op")
                self._conn.execute("RELEASE op")
            raise
        self._conn.execute("RELEASE op")

    # --- group commit (store/threaded.py's writer) --------------------------------------

    def begin_group(self) -> None:
        """Opens one write transaction (BEGIN IMMEDIATE) for several operations, until
        end_group: meanwhile each _tx() is a savepoint and statements outside _tx() run
        in it. Raises what BEGIN raises (e.g. "database is locked" after busy_timeout)."""
        if self._group:
            raise RuntimeError("a group is open already")
        self._conn.execute("BEGIN IMMEDIATE")
        self._group = True

    @contextlib.contextmanager
    def group_op(self) -> Iterator[None]:
        """One operation of the open group, as a savepoint: when the block raises, only
        its changes are rolled back (unless SQLite rolled back the whole transaction,
        which group_open then says)."""
        if not self._group:
            raise RuntimeError("no group is open")
        with self._savepoint():
            yield

    @property
    def group_open(self) -> bool:
        """Whether the group's transaction is still open (an I/O or full-disk error makes
        SQLite roll it back whole)."""
        return self._group and self._conn.in_transaction

    def end_group(self, commit: bool) -> None:
        """Commits (or rolls back) the group's transaction and leaves group mode. When
        COMMIT fails, or the transaction was lost already, nothing of the group is kept
        and the error is raised."""
        self._group = False
        if not self._conn.in_transaction:
            if commit:
                raise sqlite3.OperationalError("the group's transaction was rolled back")
            return
        if commit:
            self._commit()
        else:
            self._conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self._conn.close()

    # --- quotes -------------------------------------------------------------------------

    def put_quote(
        self,
        quote: Quote,
        owner: str = "",
        size: int = 0,
        module: bytes | None = None,
        limits: QuoteLimits | None = None,
    ) -> tuple[QuoteUsage, QuoteUsage] | None:
        module_sha = hashlib.sha256(module).digest() if module is not None else None
        with self._tx():  # the one writer: the check holds until the quote is counted
            if limits is not None:
                usage = self.quote_usage(owner)
                if limits.refuses(owner, size, *usage):
                    return usage
            self._insert_quote(quote, owner, size, module_sha)
            if module is not None:
                self._conn.execute(
                    "INSERT OR IGNORE INTO wasm_modules VALUES (?,?,?)",
                    (module_sha, module, quote.created_at),
                )
            self._conn.executemany(
                "INSERT INTO quote_usage VALUES (?,1,?) ON CONFLICT(owner) "
                "DO UPDATE SET quotes=quotes+1, bytes=bytes+excluded.bytes",
                [(owner, size), (TOTAL_OWNER, size)],
            )
        return None

    def _insert_quote(self, quote: Quote, owner: str, size: int, module_sha: bytes | None) -> None:
        s = quote.spec
        self._conn.execute(
            "INSERT INTO quotes (quote_id, job_type, policy, privacy, task_name, llm_model, "
            "spec_bytes, spec_sha256, price_micros, currency, created_at, expires_at, use_llm, "
            "client_id, size, module_sha256, verify, recipients) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
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
                int(s.use_llm),
                owner,
                size,
                module_sha,
                s.verify,
                recipients_text(s),
            ),
        )

    def quote_usage(self, owner: str) -> tuple[QuoteUsage, QuoteUsage]:
        rows = {
            r["owner"]: QuoteUsage(int(r["quotes"]), int(r["bytes"]))
            for r in self._conn.execute(
                "SELECT * FROM quote_usage WHERE owner IN (?,?)", (owner, TOTAL_OWNER)
            )
        }
        none = QuoteUsage(0, 0)
        return rows.get(owner, none), rows.get(TOTAL_OWNER, none)

    def release_expired_quotes(self, now: float) -> int:
        with self._tx():
            freed = self._conn.execute(
                "SELECT client_id, count(*) AS n, sum(size) AS b FROM quotes "
                "WHERE expires_at<? AND size>0 GROUP BY client_id",
                (now,),
            ).fetchall()
            self._conn.execute(
                "UPDATE quotes SET spec_bytes=x'', size=0, module_sha256=NULL "
                "WHERE expires_at<? AND size>0",
                (now,),
            )
            n, b = sum(int(r["n"]) for r in freed), sum(int(r["b"]) for r in freed)
            self._conn.executemany(
                "UPDATE quote_usage SET quotes=quotes-?, bytes=bytes-? WHERE owner=?",
                [(int(r["n"]), int(r["b"]), r["client_id"]) for r in freed] + [(n, b, TOTAL_OWNER)],
            )
            self._conn.execute(
                "DELETE FROM quote_usage WHERE quotes<=0 AND owner<>?", (TOTAL_OWNER,)
            )
            self._conn.execute(
                "DELETE FROM wasm_modules WHERE NOT EXISTS "
                "(SELECT 1 FROM quotes WHERE module_sha256=wasm_modules.sha256) "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE module_sha256=wasm_modules.sha256 "
                f"AND state IN ({_OPEN_SQL}))"
            )
        return n

    def purge_expired(self, before: float) -> int:
        with self._tx():
            # released quotes only (size 0): a quote's usage is given back exactly once
            quotes = self._conn.execute(
                "DELETE FROM quotes WHERE expires_at<? AND size=0", (before,)
            )
            codes = self._conn.execute("DELETE FROM pairing_codes WHERE expires_at<?", (before,))
        return int(quotes.rowcount) + int(codes.rowcount)

    def get_quote(self, quote_id: str) -> Quote | None:
        r = self._conn.execute("SELECT * FROM quotes WHERE quote_id=?", (quote_id,)).fetchone()
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

    # --- jobs ---------------------------------------------------------------------------

    def create_job(
        self,
        job: Job,
        event: Event,
        payment: Payment | None = None,
        offered: Event | None = None,
        max_open: int = 0,
    ) -> tuple[Job, bool]:
        existing = self.insert_job(job, event, payment, offered, max_open)
        if existing is not None:
            return existing, False
        return stored_job(job, payment, offered), True

    def insert_job(
        self,
        job: Job,
        event: Event,
        payment: Payment | None = None,
        offered: Event | None = None,
        max_open: int = 0,
    ) -> Job | None:
        """create_job's write: the job under the same key if there is one (nothing is
        stored then), else None, the job stored as stored_job(job, payment, offered) gives
        it (what the caller has already: nothing is read back, nor sent back from the
        writer process)."""
        row = job_row(stored_job(job, payment, offered))
        with self._tx():
            existing = self._conn.execute(
                "SELECT * FROM jobs WHERE client_id=? AND idempotency_key=?",
                (job.client_id, job.idempotency_key),
            ).fetchone()
            if existing is not None:
                return job_of(existing)
            if max_open > 0:
                mine = self._conn.execute(
                    "SELECT n FROM open_jobs WHERE client_id=?", (job.client_id,)
                ).fetchone()
                if mine is not None and mine[0] >= max_open:
                    raise TooManyOpenJobs(max_open)
            cols = ",".join(row)
            # the job with its quote's module, as stored, in one statement
            self._conn.execute(
                f"INSERT INTO jobs ({cols}, module_sha256) VALUES ({','.join('?' * len(row))}, "
                "(SELECT module_sha256 FROM quotes WHERE quote_id=?))",
                (*row.values(), job.quote_id),
            )
            self._insert_event(event, 1)
            if offered is not None:
                self._insert_event(offered, 2)
            if payment is not None:
                try:
                    self._insert_payment(payment)
                except sqlite3.IntegrityError:
                    raise PaymentReused(
                        "this payment was already used for another job; sign a new one"
                    ) from None
        return None

    def get_job(self, job_id: str) -> Job | None:
        r = self._conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return job_of(r) if r is not None else None

    def get_job_by_key(self, client_id: str, idempotency_key: str) -> Job | None:
        r = self._conn.execute(
            "SELECT * FROM jobs WHERE client_id=? AND idempotency_key=?",
            (client_id, idempotency_key),
        ).fetchone()
        return job_of(r) if r is not None else None

    def transition(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event | None,
        feedback: FeedbackEntry | None = None,
        outcome: tuple[str, bool] | None = None,
        then: Callable[[], None] | None = None,
        prior: PriorMove | None = None,
        expect: dict[str, Any] | None = None,
    ) -> Job | None:
        """(then: more writes of the same transaction, run after the compare-and-set
        held; what they raise rolls it all back.)"""
        try:
            with self._tx():
                if prior is not None and _mergeable(prior, from_states, attempt):
                    # both moves in one statement: their condition is the prior's (the
                    # transition's holds after it), their changes the two in order
                    r = self._cas(
                        job_id, prior.from_states, prior.attempt, {**prior.changes, **changes},
                        event, prior.event, expect,
                    )  # fmt: skip
                    if r is None:
                        return None
                else:
                    if prior is not None and (
                        self._cas(
                            job_id,
                            prior.from_states,
                            prior.attempt,
                            prior.changes,
                            prior.event,
                            expect=expect,
                        )
                        is None
                    ):
                        return None
                    r = self._cas(
                        job_id, from_states, attempt, changes, event,
                        expect=None if prior is not None else expect,
                    )  # fmt: skip
                    if r is None:
                        if prior is not None:
                            raise _Undo  # the prior move alone is not kept
                        return None
                if feedback is not None:
                    self._insert_feedback(feedback)
                if outcome is not None:
                    at = event.time if event is not None else float(r["updated_at"] or 0.0)
                    self._record_outcome(*outcome, at)
                if then is not None:
                    then()
        except _Undo:
            return None
        return job_of(r)

    def _cas(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        attempt: int | None,
        changes: dict[str, Any],
        event: Event | None,
        earlier: Event | None = None,
        expect: dict[str, Any] | None = None,
    ) -> sqlite3.Row | None:
        """A transition's compare-and-set and its event, inside a transaction: the job's
        new row, or None when the condition did not hold. earlier: an event to record
        before it (a prior move's, merged into this one; see _mergeable). expect: more
        fields the condition checks (equal, NULL to NULL)."""
        values = changes_row(changes)
        sets = [f"{k}=?" for k in values]
        added = (event is not None) + (earlier is not None)
        if added:
            sets.append(f"last_sequence=last_sequence+{added}")
        if not sets:  # nothing changes: the compare-and-set alone
            sets.append("job_id=job_id")
        states = ",".join("?" * len(from_states))
        where = f"job_id=? AND state IN ({states})" + (
            " AND attempts=?" if attempt is not None else ""
        )
        params = (*values.values(), job_id, *(int(st) for st in from_states))
        if attempt is not None:
            params += (attempt,)
        if expect:
            expected = changes_row(expect)
            where += "".join(f" AND {k} IS ?" for k in expected)
            params += tuple(expected.values())
        # the compare-and-set and the new row in one statement: nothing is read back
        rows = self._conn.execute(
            f"UPDATE jobs SET {','.join(sets)} WHERE {where} RETURNING *", params
        ).fetchall()
        if not rows:
            return None
        r: sqlite3.Row = rows[0]
        if earlier is not None:
            self._insert_event(earlier, r["last_sequence"] - (event is not None))
        if event is not None:
            self._insert_event(event, r["last_sequence"])
        return r

    def append_progress(self, events: Sequence[Event]) -> bool:
        if not events:
            return True
        first, last = events[0], events[-1]
        job_id = first.job_id
        if last.sequence - first.sequence != len(events) - 1:
            raise ValueError("append_progress takes consecutive sequence numbers")
        with self._tx():
            r = self._conn.execute(
                "SELECT state, last_sequence FROM jobs WHERE job_id=?", (job_id,)
            ).fetchone()
            if r is None or JobState(r["state"]).final or r["last_sequence"] != first.sequence - 1:
                return False
            self._conn.execute(
                "UPDATE jobs SET last_sequence=? WHERE job_id=?", (last.sequence, job_id)
            )
            chunks = json.dumps([[len(e.text), e.fraction, e.time] for e in events])
            row = dataclasses.replace(last, text="".join(e.text for e in events))
            self._insert_event(row, last.sequence, first.sequence, chunks)
        return True

    def _insert_event(
        self, e: Event, seq: int, first_sequence: int | None = None, chunks: str | None = None
    ) -> None:
        self._conn.execute(
            "INSERT INTO events (job_id, sequence, kind, state, time, from_state, reason, "
            "worker_id, attempt, text, fraction, first_sequence, chunks) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
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
            ),
        )

    # --- verification runs ----------------------------------------------------------------

    def record_run(
        self, run: Run, from_states: Sequence[JobState], changes: dict[str, Any], event: Event
    ) -> Job | None:
        row = run_row(run)

        def insert() -> None:
            self._conn.execute(
                f"INSERT INTO job_runs ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                tuple(row.values()),
            )

        try:
            return self.transition(
                run.job_id, from_states, run.attempt, changes, event, then=insert
            )
        except sqlite3.IntegrityError:  # the attempt's run is there already
            return None

    def job_runs(self, job_id: str) -> list[Run]:
        rows = self._conn.execute(
            "SELECT * FROM job_runs WHERE job_id=? ORDER BY attempt", (job_id,)
        ).fetchall()
        return [run_of(r) for r in rows]

    def conclude_runs(
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

        def record() -> None:
            if run is not None:
                row = run_row(run)
                self._conn.execute(
                    f"INSERT INTO job_runs ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                    tuple(row.values()),
                )
            self._conn.executemany(
                "UPDATE job_runs SET verdict=? WHERE job_id=? AND attempt=?",
                [(v, job_id, a) for a, v in verdicts.items()],
            )
            for f in feedback:
                self._insert_feedback(f)
            for worker_id, success in outcomes:
                self._record_outcome(worker_id, success, event.time)

        try:
            return self.transition(job_id, from_states, attempt, changes, event, then=record)
        except sqlite3.IntegrityError:  # the run is there already
            return None

    def offered_at(self, job_id: str, worker_id: str, attempt: int) -> float | None:
        r = self._conn.execute(
            "SELECT time FROM events WHERE job_id=? AND kind=? AND state=? AND worker_id=? "
            f"AND attempt=? AND {not_given_up()} ORDER BY sequence LIMIT 1",
            (job_id, EventKind.STATE.value, int(JobState.OFFERED), worker_id, attempt),
        ).fetchone()
        return None if r is None else float(r["time"])

    def held_attempts(self, worker_id: str, job_ids: Sequence[str]) -> set[tuple[str, int]]:
        rows = self._conn.execute(
            "SELECT DISTINCT job_id, attempt FROM events "
            "WHERE job_id IN (SELECT value FROM json_each(?)) AND kind=? AND state=? "
            f"AND worker_id=? AND {not_given_up(reasons=NOT_HELD)}",
            (json.dumps(list(job_ids)), EventKind.STATE.value, int(JobState.OFFERED), worker_id),
        )
        return {(str(r["job_id"]), int(r["attempt"])) for r in rows}

    def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[Event]:
        # a coalesced row is keyed by its last sequence, so the row holding sequence+1
        # is the first one found; its events up to `sequence` are skipped
        rows = self._conn.execute(
            "SELECT * FROM events WHERE job_id=? AND sequence>? ORDER BY sequence LIMIT ?",
            (job_id, sequence, limit),
        ).fetchall()
        out: list[Event] = []
        for r in rows:
            out.extend(e for e in events_of(r) if e.sequence > sequence)
            if len(out) >= limit:
                break
        return out[:limit]

    def _jobs(self, where: str, params: tuple[Any, ...]) -> list[Job]:
        return [job_of(r) for r in self._conn.execute(f"SELECT * FROM jobs WHERE {where}", params)]

    def queued_jobs(
        self, limit: int, after: tuple[float, str] | None = None, runnable: Runnable | None = None
    ) -> list[Job]:
        where = _QUEUED_ROW  # the text of idx_jobs_queued's condition: it is used
        params: list[Any] = []
        if after is not None:
            where += " AND (queued_at, job_id) > (?, ?)"
            params += list(after)
        if runnable is not None:
            # The names go in as one JSON array: their number is up to the connected
            # workers, and SQLite refuses more than 32766 bound parameters.
            names = json.dumps(sorted(runnable.task_names))
            task = "job_type=? AND use_llm=0 AND task_name IN (SELECT value FROM json_each(?))"
            llm = "job_type=? OR use_llm=1" if runnable.llm else "0"
            where += f" AND (({task}) OR ({llm}))"
            params += [int(JobType.TASK), names]
            if runnable.llm:
                params.append(int(JobType.LLM))
        params.append(limit)
        return self._jobs(f"{where} ORDER BY queued_at, job_id LIMIT ?", tuple(params))

    # (each condition is the text of a partial index's, so that SQLite uses the index)
    def lapsed_leases(self, now: float) -> list[Job]:
        return self._jobs(f"{_ACTIVE_ROW} AND lease_expires_at<?", (now,))

    def stale_queued(self, queued_before: float) -> list[Job]:
        return self._jobs(f"{_QUEUED_ROW} AND queued_at<?", (queued_before,))

    def active_jobs(self, worker_id: str | None = None) -> list[Job]:
        if worker_id is None:
            return self._jobs(_ACTIVE_ROW, ())
        return self._jobs(f"worker_id=? AND {_ACTIVE_ROW}", (worker_id,))

    # --- pairing ------------------------------------------------------------------------

    def put_pairing_code(
        self, code_hash: bytes, client_id: str, expires_at: float, now: float = 0.0, most: int = 0
    ) -> None:
        with self._tx():
            if most > 0:
                (live,) = self._conn.execute(
                    "SELECT count(*) FROM pairing_codes "
                    "WHERE client_id=? AND used_at IS NULL AND expires_at>=?",
                    (client_id, now),
                ).fetchone()
                if live >= most:
                    raise TooManyPairingCodes(most)
            self._conn.execute(
                "INSERT INTO pairing_codes VALUES (?,?,?,NULL)", (code_hash, client_id, expires_at)
            )

    def pairing_code_owner(self, code_hash: bytes, now: float) -> str | None:
        r = self._conn.execute(
            "SELECT client_id FROM pairing_codes "
            "WHERE code_hash=? AND used_at IS NULL AND expires_at>=?",
            (code_hash, now),
        ).fetchone()
        return None if r is None else str(r["client_id"])

    def claim_pairing_code(self, code_hash: bytes, now: float) -> str | None:
        with self._tx():
            r = self._conn.execute(
                "SELECT client_id FROM pairing_codes "
                "WHERE code_hash=? AND used_at IS NULL AND expires_at>=?",
                (code_hash, now),
            ).fetchone()
            if r is None:
                return None
            self._conn.execute(
                "UPDATE pairing_codes SET used_at=? WHERE code_hash=?", (now, code_hash)
            )
        return str(r["client_id"])

    def put_pairing(self, pairing: Pairing, most: int = 0) -> Pairing:
        with self._tx():
            r = self._conn.execute(
                "SELECT * FROM pairings WHERE client_id=? AND worker_id=? AND revoked_at IS NULL",
                (pairing.client_id, pairing.worker_id),
            ).fetchone()
            if r is not None:
                return pairing_of(r)
            if most > 0:
                for column, party, who in (
                    ("client_id", pairing.client_id, "client"),
                    ("worker_id", pairing.worker_id, "worker"),
                ):
                    (kept,) = self._conn.execute(
                        f"SELECT count(*) FROM pairings WHERE {column}=?", (party,)
                    ).fetchone()
                    if kept >= most and self._forget_revoked(column, party, kept - most + 1):
                        raise TooManyPairings(most, who)
            self._conn.execute(
                "INSERT INTO pairings VALUES (?,?,?,?,NULL)",
                (pairing.pairing_id, pairing.client_id, pairing.worker_id, pairing.created_at),
            )
        return pairing

    def _forget_revoked(self, column: str, party: str, n: int) -> bool:
        """Deletes the party's n oldest revoked pairings; whether it had fewer (the caller
        then raises, rolling the deletes back with its transaction)."""
        cur = self._conn.execute(
            "DELETE FROM pairings WHERE pairing_id IN (SELECT pairing_id FROM pairings "
            f"WHERE {column}=? AND revoked_at IS NOT NULL "
            "ORDER BY revoked_at, pairing_id LIMIT ?)",
            (party, n),
        )
        return int(cur.rowcount) < n

    def get_pairing(self, pairing_id: str) -> Pairing | None:
        r = self._conn.execute(
            "SELECT * FROM pairings WHERE pairing_id=?", (pairing_id,)
        ).fetchone()
        return pairing_of(r) if r is not None else None

    def list_pairings(self, party_id: str, include_revoked: bool) -> list[Pairing]:
        sql = "SELECT * FROM pairings WHERE (client_id=? OR worker_id=?)"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        rows = self._conn.execute(sql + " ORDER BY created_at", (party_id, party_id))
        return [pairing_of(r) for r in rows]

    def revoke_pairing(self, pairing_id: str, now: float) -> Pairing | None:
        self._conn.execute(
            "UPDATE pairings SET revoked_at=? WHERE pairing_id=? AND revoked_at IS NULL",
            (now, pairing_id),
        )
        return self.get_pairing(pairing_id)

    def paired_workers(self, client_id: str) -> set[str]:
        rows = self._conn.execute(
            "SELECT worker_id FROM pairings WHERE client_id=? AND revoked_at IS NULL",
            (client_id,),
        )
        return {r["worker_id"] for r in rows}

    # --- WebAssembly modules ------------------------------------------------------------

    def get_module(self, sha256: bytes) -> bytes | None:
        r = self._conn.execute(
            "SELECT module FROM wasm_modules WHERE sha256=?", (sha256,)
        ).fetchone()
        return None if r is None else bytes(r["module"])

    # --- receipt batches ----------------------------------------------------------------

    def unbatched_receipts(self, limit: int) -> list[UnbatchedReceipt]:
        # Read through the partial index (only unbatched receipts), whatever the planner
        # guesses; its WHERE needs the state as a literal, not a parameter.
        rows = self._conn.execute(
            "SELECT job_id, receipt_sha256, updated_at FROM jobs "
            "INDEXED BY idx_jobs_unbatched_receipts "
            f"WHERE state={int(JobState.COMPLETED)} AND receipt_batch_id IS NULL "
            "AND receipt_sha256 IS NOT NULL ORDER BY updated_at, job_id LIMIT ?",
            (limit,),
        )
        return [UnbatchedReceipt(r["job_id"], r["receipt_sha256"], r["updated_at"]) for r in rows]

    def create_receipt_batch(self, batch: ReceiptBatch, leaves: Sequence[UnbatchedReceipt]) -> bool:
        if len(leaves) != batch.leaf_count or not leaves:
            raise ValueError("a batch needs leaf_count leaves, at least one")
        try:
            with self._tx():
                for index, leaf in enumerate(leaves):
                    cur = self._conn.execute(
                        "UPDATE jobs SET receipt_batch_id=?, receipt_leaf_index=? WHERE job_id=? "
                        "AND state=? AND receipt_sha256=? AND receipt_batch_id IS NULL",
                        (
                            batch.batch_id,
                            index,
                            leaf.job_id,
                            int(JobState.COMPLETED),
                            leaf.receipt_sha256,
                        ),
                    )
                    if cur.rowcount != 1:
                        raise _Conflict  # rolls the whole batch back
                self._conn.execute(
                    "INSERT INTO receipt_batches VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        batch.batch_id,
                        batch.merkle_root,
                        batch.leaf_count,
                        batch.created_at,
                        batch.anchor_status.value,
                        batch.anchor_network,
                        batch.anchor_transaction,
                        batch.anchor_error,
                        batch.anchored_at,
                    ),
                )
        except _Conflict:
            return False
        return True

    def get_receipt_batch(self, batch_id: str) -> ReceiptBatch | None:
        r = self._conn.execute(
            "SELECT * FROM receipt_batches WHERE batch_id=?", (batch_id,)
        ).fetchone()
        return batch_of(r) if r is not None else None

    def receipt_leaf(self, job_id: str) -> ReceiptLeaf | None:
        r = self._conn.execute(
            "SELECT receipt_batch_id, receipt_leaf_index, job_id, receipt_sha256 FROM jobs "
            "WHERE job_id=? AND receipt_batch_id IS NOT NULL",
            (job_id,),
        ).fetchone()
        return None if r is None else ReceiptLeaf(*r)

    def batch_leaves(self, batch_id: str) -> list[ReceiptLeaf]:
        rows = self._conn.execute(
            "SELECT receipt_batch_id, receipt_leaf_index, job_id, receipt_sha256 FROM jobs "
            "WHERE receipt_batch_id=? ORDER BY receipt_leaf_index",
            (batch_id,),
        )
        return [ReceiptLeaf(*r) for r in rows]

    def receipt_batches(
        self, statuses: Sequence[AnchorStatus] | None = None, limit: int = 100
    ) -> list[ReceiptBatch]:
        where, values = "", [st.value for st in statuses or ()]
        if statuses is not None:
            where = f"WHERE anchor_status IN ({','.join('?' * len(values))})"
        rows = self._conn.execute(
            f"SELECT * FROM receipt_batches {where} ORDER BY created_at, batch_id LIMIT ?",
            (*values, limit),
        )
        return [batch_of(r) for r in rows]

    def update_anchor(
        self,
        batch_id: str,
        status: AnchorStatus,
        network: str = "",
        transaction: str = "",
        error: str = "",
        anchored_at: float | None = None,
    ) -> ReceiptBatch | None:
        cur = self._conn.execute(
            "UPDATE receipt_batches SET anchor_status=?, anchor_network=?, "
            "anchor_transaction=?, anchor_error=?, anchored_at=? "
            "WHERE batch_id=? AND anchor_status IN (?,?)",
            (
                status.value,
                network,
                transaction,
                error,
                anchored_at,
                batch_id,
                AnchorStatus.PENDING.value,
                AnchorStatus.FAILED.value,
            ),
        )
        return self.get_receipt_batch(batch_id) if cur.rowcount == 1 else None

    # --- feedback outbox ----------------------------------------------------------------

    def _insert_feedback(self, f: FeedbackEntry) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO feedback_outbox VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
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
            ),
        )

    def feedback_entries(
        self, statuses: Sequence[FeedbackStatus] | None = None, limit: int = 1000
    ) -> list[FeedbackEntry]:
        where, params = "", tuple[str, ...]()  # no filter
        if statuses:
            where = f"WHERE status IN ({','.join('?' * len(statuses))})"
            params = tuple(s.value for s in statuses)
        rows = self._conn.execute(
            f"SELECT * FROM feedback_outbox {where} ORDER BY created_at, job_id LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [feedback_of(r) for r in rows]

    def update_feedback(
        self, job_id: str, status: FeedbackStatus, transaction: str = "", error: str = ""
    ) -> bool:
        cur = self._conn.execute(
            "UPDATE feedback_outbox SET status=?, tx=?, error=?, attempts=attempts+1 "
            "WHERE job_id=? AND status=?",
            (status.value, transaction, error, job_id, FeedbackStatus.PENDING.value),
        )
        return cur.rowcount == 1

    # --- payments -----------------------------------------------------------------------

    def _insert_payment(self, p: Payment) -> None:
        self._conn.execute(
            "INSERT INTO payments VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                p.job_id,
                p.network,
                p.asset,
                p.pay_to,
                p.payer,
                str(p.amount),
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
            ),
        )

    def get_payment(self, job_id: str) -> Payment | None:
        r = self._conn.execute("SELECT * FROM payments WHERE job_id=?", (job_id,)).fetchone()
        return payment_of(r) if r is not None else None

    def payment_standing(
        self, network: str, asset: str, payer: str, authorization_id: str
    ) -> tuple[bool, int]:
        key = (network, asset.lower(), payer.lower())
        r = self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM payments WHERE network=? AND lower(asset)=? "
            "AND lower(payer)=? AND lower(authorization_id)=?), "
            "(SELECT group_concat(amount) FROM payments WHERE network=? AND lower(asset)=? "
            f"AND lower(payer)=? AND {PAYMENT_OWED})",
            (*key, authorization_id.lower(), *key),
        ).fetchone()
        return bool(r[0]), sum(int(a) for a in (r[1] or "").split(",") if a)

    def open_payments(self, limit: int = 100) -> list[tuple[Payment, JobState]]:
        final = [s.value for s in PaymentStatus if s.final]
        rows = self._conn.execute(
            "SELECT payments.*, jobs.state AS job_state FROM payments "
            "JOIN jobs ON jobs.job_id = payments.job_id "
            f"WHERE payments.status NOT IN ({','.join('?' * len(final))}) "
            "ORDER BY payments.created_at, payments.job_id LIMIT ?",
            (*final, limit),
        ).fetchall()
        return [(payment_of(r), JobState(r["job_state"])) for r in rows]

    def due_payments(self, now: float, limit: int = 100) -> list[tuple[Payment, JobState]]:
        final_jobs = [s.value for s in JobState if s.final]
        marks = ",".join("?" * len(final_jobs))
        rows = self._conn.execute(
            "SELECT payments.*, jobs.state AS job_state FROM payments "
            "JOIN jobs ON jobs.job_id = payments.job_id "
            f"WHERE (payments.status = ? AND (jobs.state IN ({marks}) OR payments.settle_by <= ?)) "
            f"OR (payments.status = ? AND jobs.state IN ({marks})) "
            "OR payments.status = ? "
            "ORDER BY payments.created_at, payments.job_id LIMIT ?",
            (
                PaymentStatus.AUTHORIZED.value,
                *final_jobs,
                now,
                PaymentStatus.HELD.value,
                *final_jobs,
                PaymentStatus.REFUND_DUE.value,
                limit,
            ),
        ).fetchall()
        return [(payment_of(r), JobState(r["job_state"])) for r in rows]

    def update_payment(
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
        with self._tx():
            cur = self._conn.execute(
                f"UPDATE payments SET {','.join(f'{c}=?' for c in values)} WHERE job_id=? "
                f"AND status IN ({','.join('?' * len(from_statuses))})",
                (*values.values(), job_id, *(s.value for s in from_statuses)),
            )
            if cur.rowcount != 1:
                return None
            r = self._conn.execute("SELECT * FROM payments WHERE job_id=?", (job_id,)).fetchone()
            payment = payment_of(r)
            self._conn.execute(
                "UPDATE jobs SET payment=? WHERE job_id=?",
                (json.dumps(payment.ref().__dict__), job_id),
            )
            now = payment.updated_at
            if credit is not None:
                # one credit per job and worker: a retried settlement never credits twice
                credited = 0
                for worker_id, fee, share in self._payees(job_id, credit):
                    credited += self._conn.execute(
                        "INSERT OR IGNORE INTO earnings VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                        (
                            job_id,
                            worker_id,
                            payment.network,
                            payment.asset,
                            payment.amount,
                            credit.fee_bps,
                            fee,
                            share,
                            now,
                        ),
                    ).rowcount
                if credited:
                    self._add_earned(job_id, 1, now)
            if payment.status in (PaymentStatus.REFUND_DUE, PaymentStatus.REFUNDED):
                cur = self._conn.execute(
                    "UPDATE earnings SET reversed_at=? WHERE job_id=? AND reversed_at IS NULL",
                    (now, job_id),
                )
                if cur.rowcount:
                    self._add_earned(job_id, -1, None)
        return payment

    def _payees(self, job_id: str, credit: Split) -> list[tuple[str, int, int]]:
        """(worker_id, fee, share) per worker a settled job credits: its worker, or the
        workers of its agreeing runs (Split.among)."""
        job = self._conn.execute(
            "SELECT worker_id, verify_mode FROM jobs WHERE job_id=?", (job_id,)
        ).fetchone()
        if job is None or not job["worker_id"]:
            return []
        agreed = [
            str(r["worker_id"])
            for r in self._conn.execute(
                "SELECT worker_id FROM job_runs WHERE job_id=? AND verdict=? ORDER BY attempt",
                (job_id, AGREED),
            )
        ]
        workers = payees_order(job["worker_id"], agreed)
        parts = credit.among(job["verify_mode"], len(workers))
        return [(w, fee, share) for w, (fee, share) in zip(workers, parts, strict=True)]

    def _add_earned(self, job_id: str, sign: int, now: float | None) -> None:
        """Adds (sign 1, at `now`) or takes back (sign -1) a job's credit in its worker's
        total; a credit to a fully paid balance starts its payout interval."""
        self._conn.execute(
            "INSERT INTO worker_earnings (worker_id, network, asset, earned, paid, unpaid_since) "
            "SELECT worker_id, network, asset, ? * share, 0, ? "
            "FROM earnings WHERE job_id=? ON CONFLICT(worker_id, network, asset) "
            "DO UPDATE SET earned = earned + excluded.earned, "
            "unpaid_since = coalesce(unpaid_since, excluded.unpaid_since)",
            (sign, now, job_id),
        )

    def earnings(
        self, worker_id: str, limit: int, before: tuple[float, str] | None = None
    ) -> list[Earning]:
        after = "AND (credited_at, job_id) < (?, ?) " if before is not None else ""
        rows = self._conn.execute(
            f"SELECT * FROM earnings WHERE worker_id=? {after}"
            "ORDER BY credited_at DESC, job_id DESC LIMIT ?",
            (worker_id, *(before or ()), limit),
        ).fetchall()
        return [earning_of(r) for r in rows]

    def balances(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        if not worker_ids:
            return {}
        rows = self._conn.execute(
            "SELECT worker_id, network, asset, earned, paid FROM worker_earnings "
            f"WHERE worker_id IN ({','.join('?' * len(worker_ids))}) "
            "AND (earned != 0 OR paid != 0) ORDER BY worker_id, network, asset",
            tuple(worker_ids),
        ).fetchall()
        out: dict[str, list[Balance]] = {}
        for r in rows:
            earned = int(r["earned"])
            # paid counts the payouts not landed yet too: balance = earned - paid - pending
            out.setdefault(r["worker_id"], []).append(
                Balance(r["network"], r["asset"], earned, earned - int(r["paid"]))
            )
        return out

    # --- payouts ------------------------------------------------------------------------

    def payouts_due(
        self,
        network: str,
        min_amount: int,
        unpaid_before: float,
        limit: int,
        after: tuple[float, str, str] | None = None,
    ) -> list[PayoutDue]:
        since = "coalesce(e.unpaid_since, 0)"
        page = f"AND ({since}, e.worker_id, e.asset) > (?, ?, ?) " if after is not None else ""
        rows = self._conn.execute(
            "SELECT e.worker_id, w.agent_id, e.network, e.asset, e.earned - e.paid AS unpaid, "
            f"{since} AS since "
            "FROM worker_earnings e JOIN workers w ON w.worker_id = e.worker_id "
            "WHERE e.network = ? AND w.agent_id != '' AND e.earned - e.paid > 0 "
            f"AND (e.earned - e.paid >= ? OR e.unpaid_since <= ?) {page}"
            f"AND NOT EXISTS ({OPEN_PAYOUT_OF_E}) "
            f"ORDER BY {since}, e.worker_id, e.asset LIMIT ?",
            (network, min_amount, unpaid_before, *(after or ()), limit),
        ).fetchall()
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

    def create_payout(self, payout: PayoutRecord) -> bool:
        with self._tx():
            cur = self._conn.execute(
                "UPDATE worker_earnings SET paid = paid + ?, unpaid_since = "
                "CASE WHEN earned - paid - ? > 0 THEN ? ELSE NULL END "
                "WHERE worker_id=? AND network=? AND asset=? AND earned - paid >= ?",
                (
                    payout.amount,
                    payout.amount,
                    payout.created_at,
                    payout.worker_id,
                    payout.network,
                    payout.asset,
                    payout.amount,
                ),
            )
            if cur.rowcount != 1:
                return False
            self._conn.execute(
                "INSERT INTO payouts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
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
                ),
            )
        return True

    def update_payout(
        self,
        payout_id: str,
        from_states: Sequence[PayoutRowState],
        changes: dict[str, Any],
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
        with self._tx():
            cur = self._conn.execute(
                f"UPDATE payouts SET {','.join(f'{c}=?' for c in values)} WHERE payout_id=? "
                f"AND state IN ({','.join('?' * len(from_states))})",
                (*values.values(), payout_id, *(s.value for s in from_states)),
            )
            if cur.rowcount != 1:
                return None
            r = self._conn.execute("SELECT * FROM payouts WHERE payout_id=?", (payout_id,))
            payout = payout_of(r.fetchone())
            if payout.state is PayoutRowState.FAILED:
                # it can never land: its amount is the worker's to be paid again
                self._conn.execute(
                    "UPDATE worker_earnings SET paid = paid - ?, "
                    "unpaid_since = coalesce(unpaid_since, ?) "
                    "WHERE worker_id=? AND network=? AND asset=?",
                    (
                        payout.amount,
                        payout.updated_at,
                        payout.worker_id,
                        payout.network,
                        payout.asset,
                    ),
                )
        return payout

    def open_payouts(self, network: str, limit: int) -> list[PayoutRecord]:
        rows = self._conn.execute(
            "SELECT * FROM payouts WHERE state IN (?,?) AND network=? "
            "ORDER BY updated_at, payout_id LIMIT ?",
            (PayoutRowState.PENDING.value, PayoutRowState.SIGNED.value, network, limit),
        ).fetchall()
        return [payout_of(r) for r in rows]

    def audit_flows(self, network: str) -> tuple[list[tuple[str, str, str, int]], dict[str, int]]:
        """What the store says moved through the coordinator's account on `network`:
        (what, asset, transaction, amount into the account) per settlement, refund and
        landed payout; and the fees kept per asset (credits not reversed)."""
        settled = [
            s.value
            for s in (
                PaymentStatus.SETTLED,
                PaymentStatus.HELD,
                PaymentStatus.REFUND_DUE,
                PaymentStatus.REFUNDED,
            )
        ]
        flows: list[tuple[str, str, str, int]] = []
        for r in self._conn.execute(
            "SELECT asset, tx, refund_tx, amount, status FROM payments WHERE network=? "
            f"AND tx != '' AND status IN ({','.join('?' * len(settled))})",
            (network, *settled),
        ):
            flows.append(("settlement", r["asset"], r["tx"], int(r["amount"])))
            if r["status"] == PaymentStatus.REFUNDED.value:
                flows.append(("refund", r["asset"], r["refund_tx"], -int(r["amount"])))
        for r in self._conn.execute(
            "SELECT asset, tx, amount FROM payouts WHERE network=? AND state=?",
            (network, PayoutRowState.LANDED.value),
        ):
            flows.append(("payout", r["asset"], r["tx"], -int(r["amount"])))
        fees = {
            r["asset"]: int(r["fees"])
            for r in self._conn.execute(
                "SELECT asset, sum(fee) AS fees FROM earnings WHERE network=? "
                "AND reversed_at IS NULL GROUP BY asset",
                (network,),
            )
        }
        return flows, fees

    def payouts(self, worker_id: str, limit: int) -> list[PayoutRecord]:
        rows = self._conn.execute(
            "SELECT * FROM payouts WHERE worker_id=? ORDER BY created_at DESC, payout_id DESC "
            "LIMIT ?",
            (worker_id, limit),
        ).fetchall()
        return [payout_of(r) for r in rows]

    # --- workers ------------------------------------------------------------------------

    def record_worker_seen(self, worker_id: str, kind: int, now: float, agent_id: str = "") -> None:
        # a session without an agent id keeps the last verified one (its payout address)
        self._conn.execute(
            "INSERT INTO workers (worker_id, kind, first_seen, last_seen, completed, failed, "
            "agent_id) VALUES (?,?,?,?,0,0,?) ON CONFLICT(worker_id) "
            "DO UPDATE SET kind=excluded.kind, last_seen=excluded.last_seen, agent_id="
            "CASE WHEN excluded.agent_id != '' THEN excluded.agent_id ELSE agent_id END",
            (worker_id, kind, now, now, agent_id),
        )

    def record_task_names(self, names: Sequence[str], now: float, keep: int) -> None:
        with self._tx():
            self._conn.executemany(
                "INSERT INTO task_names VALUES (?,?) "
                "ON CONFLICT(name) DO UPDATE SET last_seen=excluded.last_seen",
                [(name, now) for name in names],
            )
            self._conn.execute(
                "DELETE FROM task_names WHERE name NOT IN "
                "(SELECT name FROM task_names ORDER BY last_seen DESC, name LIMIT ?)",
                (keep,),
            )

    def task_name_known(self, name: str) -> bool:
        r = self._conn.execute("SELECT 1 FROM task_names WHERE name=?", (name,)).fetchone()
        return r is not None

    def task_names(self, limit: int) -> list[str]:
        rows = self._conn.execute(
            "SELECT name FROM task_names ORDER BY last_seen DESC, name LIMIT ?", (limit,)
        )
        return [str(r["name"]) for r in rows]

    def _record_outcome(self, worker_id: str, success: bool, at: float) -> None:
        col = "completed" if success else "failed"
        self._conn.execute(f"UPDATE workers SET {col}={col}+1 WHERE worker_id=?", (worker_id,))
        self._count_day(worker_id, at, col)

    def _count_day(self, worker_id: str, at: float, col: str) -> None:
        self._conn.execute(
            f"INSERT INTO worker_days (worker_id, day, {col}) VALUES (?,?,1) "
            f"ON CONFLICT(worker_id, day) DO UPDATE SET {col}={col}+1",
            (worker_id, day_of(at)),
        )

    def record_spot_check(self, worker_id: str, agreed: bool, now: float) -> None:
        with self._tx():
            self._count_day(worker_id, now, "agreed" if agreed else "disagreed")

    def worker_days(self, worker_id: str, since_day: int) -> list[WorkerDay]:
        rows = self._conn.execute(
            "SELECT day, completed, failed, agreed, disagreed FROM worker_days "
            "WHERE worker_id=? AND day>=? ORDER BY day",
            (worker_id, since_day),
        )
        return [
            WorkerDay(r["day"], r["completed"], r["failed"], r["agreed"], r["disagreed"])
            for r in rows
        ]

    def worker_stats(self, worker_id: str) -> tuple[int, int]:
        r = self._conn.execute(
            "SELECT completed, failed FROM workers WHERE worker_id=?", (worker_id,)
        ).fetchone()
        return (0, 0) if r is None else (int(r["completed"]), int(r["failed"]))


class _Undo(Exception):
    """A transition's prior move held but the transition did not: roll both back."""


def _mergeable(prior: PriorMove, from_states: Sequence[JobState], attempt: int | None) -> bool:
    """Whether a transition and the prior move written first in its transaction can be one
    UPDATE: the state the prior move leaves is one the transition starts from, and the
    attempt it checks is the transition's (the prior move does not change it). A job
    accepted in memory and then completed (the usual trivial job) is one compare-and-set
    instead of two: one statement less, and the rows of the active-jobs indexes are not
    rewritten on the way (OFFERED -> COMPLETED directly)."""
    return (
        prior.changes.get("state") in from_states
        and "attempts" not in prior.changes
        and (attempt is None or attempt == prior.attempt)
    )
