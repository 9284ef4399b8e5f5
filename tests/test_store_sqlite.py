"""What only the SQLite store does: WAL, its PRAGMA user_version migrations, and upgrading
databases written by older versions. The behaviour every store shares is the contract in
test_store.py; SQLite's threads and group commit are in test_store_threaded.py."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils
from test_store import SPEC, new_job

from dispatchnet.store import sqlite as sqlite_store
from dispatchnet.store.base import QuoteUsage
from dispatchnet.store.sqlite import (
    BACKSTOP_CHECKPOINT_PAGES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteStore,
    WalCheckpointer,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coord.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_schema_version_and_wal(store: SqliteStore, db_path: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    other = sqlite3.connect(db_path)  # WAL is a property of the file, not the connection
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        other.close()


def test_the_writer_copies_its_log_into_the_file_from_a_thread(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator's writer does not checkpoint in its commits (SQLite's automatic
    checkpoint, a stall every ~1,000 logged pages, is only a backstop): a thread of its
    own copies the log into the database file once enough rows changed."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_CHANGES", 10)
    s = SqliteStore(db_path, background_checkpoints=True)
    try:
        checkpointer = s.checkpointer
        assert checkpointer is not None
        backstop = s._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert backstop == BACKSTOP_CHECKPOINT_PAGES
        assert checkpointer.runs == 0
        for n in range(10):
            s.create_job(*new_job(n))
        assert checkpointer.wait_runs(1, timeout=30)
        assert checkpointer.checkpoints >= 1 and checkpointer.failures == 0
        # the database file alone (no log beside it) holds what that checkpoint copied
        shutil.copy(db_path, tmp_path / "copy.db")
        copy = sqlite3.connect(tmp_path / "copy.db")
        try:
            assert copy.execute("SELECT count(*) FROM jobs").fetchone()[0] >= 1
        finally:
            copy.close()
    finally:
        s.close()
    assert not checkpointer._thread.is_alive()


def test_a_failing_checkpoint_is_logged_once_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a database " * 100)
    checkpointer = WalCheckpointer(str(not_a_database))
    try:
        checkpointer.committed(10**6)
        assert checkpointer.wait_runs(1, timeout=30)
        assert (checkpointer.checkpoints, checkpointer.failures) == (0, 1)
        assert "background WAL checkpoint failed (retried)" in caplog.text
    finally:
        checkpointer.close()
    assert not checkpointer._thread.is_alive()


def test_a_checkpointer_that_cannot_open_the_database_leaves_it_to_sqlite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = WalCheckpointer(str(tmp_path / "missing" / "coord.db"))
    checkpointer.close()  # returns: its thread ended at once
    assert "no background WAL checkpoints (SQLite's own at 10000 pages)" in caplog.text


def test_only_a_writer_of_a_file_checkpoints_from_a_thread(db_path: Path) -> None:
    plain = SqliteStore(db_path)
    reader = SqliteStore(db_path, read_only=True, background_checkpoints=True)
    memory = SqliteStore(":memory:", background_checkpoints=True)
    try:
        assert plain.checkpointer is reader.checkpointer is memory.checkpointer is None
        assert plain._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        for s in (plain, reader, memory):
            s.close()


def test_a_newer_schema_refuses_to_open(db_path: Path) -> None:
    SqliteStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(
        RuntimeError, match=rf"schema v{SCHEMA_VERSION + 1} is newer.*v{SCHEMA_VERSION}"
    ):
        SqliteStore(db_path)


def test_quotes_stored_before_quote_accounting_count_until_released(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    db = sqlite_utils.Database(raw)
    for step in MIGRATIONS[:7]:  # the schema before v8
        step(db)
    raw.execute(
        "INSERT INTO quotes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        ("q_old", 2, 2, 1, "echo", "", SPEC.spec_bytes, SPEC.spec_sha256, 1000, "USD", 1, 2, 0),
    )
    raw.execute("PRAGMA user_version=7")
    raw.commit()
    raw.close()
    store = SqliteStore(db_path)
    try:
        assert store.quote_usage("")[1] == QuoteUsage(1, len(SPEC.spec_bytes))
        assert store.release_expired_quotes(now=3.0) == 1
        assert store.quote_usage("") == (QuoteUsage(0, 0), QuoteUsage(0, 0))
        assert store.purge_expired(before=3.0) == 1
    finally:
        store.close()


def test_open_jobs_stored_before_the_count_are_counted(db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    db = sqlite_utils.Database(raw)
    for step in MIGRATIONS[:15]:  # the schema before v16 kept no count of open jobs
        step(db)
    rows = [("j1", "c1", 1), ("j2", "c1", 3), ("j3", "c1", 4), ("j4", "c2", 2)]
    raw.executemany(
        "INSERT INTO jobs (job_id, client_id, state, job_type, policy, privacy, task_name, "
        "llm_model, spec_bytes, spec_sha256, price_micros, currency, quote_id, "
        "idempotency_key, attempts, max_attempts, created_at, updated_at, queued_at) "
        "VALUES (?,?,?,2,2,1,'echo','',x'',x'',0,'USD','q',?,0,3,1,1,1)",
        [(job, client, state, job) for job, client, state in rows],
    )
    raw.execute("PRAGMA user_version=15")
    raw.commit()
    raw.close()
    store = SqliteStore(db_path)
    try:
        counts = dict(store._conn.execute("SELECT client_id, n FROM open_jobs").fetchall())
        assert counts == {"c1": 2, "c2": 1}  # j3 is COMPLETED
        # then kept by every write: one ends, one is requeued (still open)
        store._conn.execute("UPDATE jobs SET state=5 WHERE job_id='j1'")
        store._conn.execute("UPDATE jobs SET state=1 WHERE job_id='j4'")
        counts = dict(store._conn.execute("SELECT client_id, n FROM open_jobs").fetchall())
        assert counts == {"c1": 1, "c2": 1}
    finally:
        store.close()


def test_the_sweeps_read_only_open_jobs_through_partial_indexes(store: SqliteStore) -> None:
    """The lease sweep, the queue and a worker's active jobs are read through the indexes
    that hold open jobs only (v17): each query's condition is the index's very text, so
    SQLite uses the index, and none of them scans the job history."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    store.lapsed_leases(now=1.0)
    store.stale_queued(queued_before=1.0)
    store.queued_jobs(limit=10)
    store.queued_jobs(limit=10, after=(1.0, "j"))
    store.active_jobs()
    store.active_jobs("w")
    store._conn.set_trace_callback(None)
    plans = {
        sql: " / ".join(str(r[3]) for r in store._conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        for sql in seen
    }
    assert len(plans) == 6
    used = [p.split("USING INDEX ")[1].split()[0] for p in plans.values()]
    assert used == [
        "idx_jobs_active_lease",
        "idx_jobs_queued",
        "idx_jobs_queued",
        "idx_jobs_queued",
        "idx_jobs_active_lease",
        "idx_jobs_active_worker",
    ], plans
    # and the indexes hold what they are for: nothing of a finished job
    for name in ("idx_jobs_queued", "idx_jobs_active_lease", "idx_jobs_active_worker"):
        sql = store._conn.execute("SELECT sql FROM sqlite_master WHERE name=?", (name,)).fetchone()[
            0
        ]
        assert " WHERE (state=" in sql and "state=4" not in sql
