"""SqliteStore on a real file: schema, durability, idempotency, compare-and-set, events."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from dispatchnet.coordinator.models import (
    Event,
    EventKind,
    Job,
    JobSpec,
    JobState,
    JobType,
    Payment,
    PaymentRef,
    PaymentStatus,
    Policy,
    Privacy,
    Quote,
    Receipt,
    Result,
)
from dispatchnet.store.base import QuoteUsage, Runnable
from dispatchnet.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore

SPEC = JobSpec(
    job_type=JobType.TASK,
    policy=Policy.CHEAP,
    privacy=Privacy.PUBLIC,
    task_name="echo",
    llm_model="",
    spec_bytes=b"\x12\x06\n\x04echo",
    spec_sha256=hashlib.sha256(b"\x12\x06\n\x04echo").digest(),
)


def make_job(job_id: str, client_id: str = "client-a", key: str = "k1") -> Job:
    return Job(
        job_id=job_id,
        client_id=client_id,
        state=JobState.QUEUED,
        spec=SPEC,
        price_micros=1000,
        currency="USD",
        quote_id="q_1",
        idempotency_key=key,
        attempts=0,
        max_attempts=3,
        created_at=100.0,
        updated_at=100.0,
        queued_at=100.0,
    )


def queued(job_id: str) -> Event:
    return Event(job_id, EventKind.STATE, JobState.QUEUED, 100.0, reason="committed")


def progress(job_id: str, text: str, sequence: int = 0, fraction: float = 0.5) -> Event:
    return Event(
        job_id,
        EventKind.PROGRESS,
        JobState.RUNNING,
        101.0 + sequence,
        sequence=sequence,
        text=text,
        fraction=fraction,
    )


def offer(store: SqliteStore, job: Job, attempt: int = 0) -> Job | None:
    """QUEUED -> OFFERED to worker w1, as the dispatcher does it."""
    return store.transition(
        job.job_id,
        (JobState.QUEUED,),
        attempt,
        {"state": JobState.OFFERED, "worker_id": "w1", "attempts": attempt + 1},
        Event(job.job_id, EventKind.STATE, JobState.OFFERED, 102.0, from_state=JobState.QUEUED),
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


def test_jobs_events_and_quotes_survive_a_reopen(db_path: Path) -> None:
    store = SqliteStore(db_path)
    quote = Quote("q_1", SPEC, 1000, "USD", 99.0, 399.0)
    store.put_quote(quote)
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    offered = offer(store, job)
    done = store.transition(
        job.job_id,
        (JobState.OFFERED,),
        1,
        {
            "state": JobState.COMPLETED,
            "result": Result(b"out", "text/plain", prompt_tokens=3, completion_tokens=4),
            "receipt": Receipt(b"body", b"w" * 64, b"c" * 64, b"h" * 32),
            "payment": PaymentRef(network="test", status="settled"),
        },
        Event(job.job_id, EventKind.STATE, JobState.COMPLETED, 103.0, from_state=JobState.OFFERED),
    )
    assert offered is not None and done is not None
    assert done.result == Result(b"out", "text/plain", 3, 4)
    assert done.receipt is not None and done.payment.status == "settled"
    events = store.events_after(job.job_id, 0)
    store.close()

    again = SqliteStore(db_path)
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert again.get_quote("q_1") == quote
        assert again.get_job("job_1") == done
        assert again.get_job_by_key("client-a", "k1") == done
        assert again.events_after("job_1", 0) == events
        assert [e.state for e in events] == [JobState.QUEUED, JobState.OFFERED, JobState.COMPLETED]
    finally:
        again.close()


def test_create_job_is_idempotent_per_client_and_key(store: SqliteStore) -> None:
    first, created = store.create_job(make_job("job_1"), queued("job_1"))
    assert created and first.job_id == "job_1" and first.last_sequence == 1
    again, created = store.create_job(make_job("job_2"), queued("job_2"))
    assert not created
    assert again == first
    assert store.get_job("job_2") is None
    assert store.events_after("job_2", 0) == []
    assert len(store.events_after("job_1", 0)) == 1
    # another client may use the same key
    theirs, created = store.create_job(make_job("job_3", client_id="client-b"), queued("job_3"))
    assert created and theirs.job_id == "job_3"


def test_transition_is_compare_and_set(store: SqliteStore) -> None:
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    wrong_state = store.transition(
        job.job_id,
        (JobState.RUNNING,),
        None,
        {"state": JobState.COMPLETED},
        Event(job.job_id, EventKind.STATE, JobState.COMPLETED, 102.0),
    )
    assert wrong_state is None
    assert offer(store, job, attempt=5) is None
    assert store.get_job(job.job_id) == job
    assert len(store.events_after(job.job_id, 0)) == 1

    moved = offer(store, job)
    assert moved is not None
    assert (moved.state, moved.attempts, moved.worker_id) == (JobState.OFFERED, 1, "w1")
    assert moved.last_sequence == 2
    # the same move again lost its race: the job is no longer QUEUED at attempt 0
    assert offer(store, job) is None
    assert store.get_job(job.job_id) == moved


def test_transition_without_event_keeps_the_sequence(store: SqliteStore) -> None:
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    updated = store.transition(job.job_id, (JobState.QUEUED,), None, {"queued_at": 200.0}, None)
    assert updated is not None and updated.queued_at == 200.0 and updated.last_sequence == 1
    with pytest.raises(KeyError, match="nonsense"):
        store.transition(job.job_id, (JobState.QUEUED,), None, {"nonsense": 1}, None)
    assert store.get_job(job.job_id) == updated


def test_events_are_numbered_consecutively(store: SqliteStore) -> None:
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    offer(store, job)
    for i in range(5):
        assert store.append_progress([progress(job.job_id, f"step {i}", 3 + i)])
    assert [e.sequence for e in store.events_after(job.job_id, 0)] == list(range(1, 8))
    later = store.events_after(job.job_id, 4)
    assert [e.sequence for e in later] == [5, 6, 7]
    assert [e.text for e in later] == ["step 2", "step 3", "step 4"]
    assert [e.sequence for e in store.events_after(job.job_id, 2, limit=2)] == [3, 4]
    assert store.events_after(job.job_id, 7) == []
    # a second job's numbering is its own
    other, _ = store.create_job(make_job("job_2", key="k2"), queued("job_2"))
    assert [e.sequence for e in store.events_after(other.job_id, 0)] == [1]
    now = store.get_job(job.job_id)
    assert now is not None and now.last_sequence == 7


def test_queued_jobs_binds_no_parameter_per_task_name(store: SqliteStore) -> None:
    """The union of every free worker's task names can be far beyond SQLite's variable
    limit (32766): the query must not bind one parameter per name."""
    store.create_job(make_job("job_1"), queued("job_1"))
    names = frozenset({"echo", *(f"t{i}" for i in range(300_000))})
    assert [j.job_id for j in store.queued_jobs(10, None, Runnable(names, False))] == ["job_1"]
    assert store.queued_jobs(10, None, Runnable(frozenset({"other"}), False)) == []
    assert store.queued_jobs(10, None, Runnable(frozenset(), False)) == []


def test_coalesced_progress_is_one_row_read_back_event_by_event(store: SqliteStore) -> None:
    """Many progress chunks make one row; a read from inside the row gives exactly the
    chunks after it, each as it was appended (text, fraction, time, sequence)."""
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    offer(store, job)
    chunks = [progress(job.job_id, f"tok{i} ", 3 + i, fraction=i / 100) for i in range(100)]
    chunks[7] = progress(job.job_id, "", 10, fraction=0.07)  # an empty chunk keeps its place
    assert store.append_progress(chunks[:60]) and store.append_progress(chunks[60:])
    rows = store.db.execute("SELECT count(*) FROM events WHERE job_id=?", (job.job_id,))
    assert rows.fetchone()[0] == 4  # queued, offered, two progress rows
    assert store.events_after(job.job_id, 2) == chunks
    assert store.events_after(job.job_id, 40) == chunks[38:]
    assert store.events_after(job.job_id, 40, limit=5) == chunks[38:43]
    assert store.events_after(job.job_id, 62, limit=1) == [chunks[60]]
    assert store.events_after(job.job_id, 102) == []
    now = store.get_job(job.job_id)
    assert now is not None and now.last_sequence == 102
    # only the next sequence number is taken, and never twice
    assert not store.append_progress([progress(job.job_id, "gap", 104)])
    assert not store.append_progress([progress(job.job_id, "again", 102)])
    assert store.append_progress([progress(job.job_id, "next", 103)])
    with pytest.raises(ValueError):
        store.append_progress([progress(job.job_id, "a", 104), progress(job.job_id, "b", 106)])


def test_append_progress_on_a_final_job_is_refused(store: SqliteStore) -> None:
    job, _ = store.create_job(make_job("job_1"), queued("job_1"))
    cancelled = store.transition(
        job.job_id,
        (JobState.QUEUED,),
        None,
        {"state": JobState.CANCELLED},
        Event(job.job_id, EventKind.STATE, JobState.CANCELLED, 102.0),
    )
    assert cancelled is not None and cancelled.last_sequence == 2
    assert not store.append_progress([progress(job.job_id, "too late", 3)])
    assert store.get_job(job.job_id) == cancelled
    assert len(store.events_after(job.job_id, 0)) == 2
    assert not store.append_progress([progress("job_nope", "x", 1)])


def test_pairing_codes_are_single_use_and_expire(store: SqliteStore) -> None:
    store.put_pairing_code(b"a" * 32, "client-a", expires_at=100.0)
    store.put_pairing_code(b"b" * 32, "client-b", expires_at=100.0)
    assert store.claim_pairing_code(b"a" * 32, now=50.0) == "client-a"
    assert store.claim_pairing_code(b"a" * 32, now=50.0) is None
    assert store.claim_pairing_code(b"b" * 32, now=100.5) is None
    # a failed claim of an expired code did not consume it (as seen from an earlier clock)
    assert store.claim_pairing_code(b"b" * 32, now=99.0) == "client-b"
    assert store.claim_pairing_code(b"c" * 32, now=0.0) is None


def test_a_newer_schema_refuses_to_open(db_path: Path) -> None:
    SqliteStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(
        RuntimeError, match=rf"schema v{SCHEMA_VERSION + 1} is newer.*v{SCHEMA_VERSION}"
    ):
        SqliteStore(db_path)


def _payment(job_id: str, n: int, settle_by: float = 10_000.0) -> Payment:
    return Payment(
        job_id=job_id,
        network="eip155:31337",
        asset="0x" + "11" * 20,
        pay_to="0x" + "22" * 20,
        payer="0x" + "33" * 20,
        amount=1000,
        authorization_id="0x" + f"{n:064x}",
        valid_before=settle_by + 60,
        settle_by=settle_by,
        payload_json="{}",
        requirement_json="{}",
        status=PaymentStatus.AUTHORIZED,
        created_at=100.0 + n,
        updated_at=100.0 + n,
    )


def test_due_payments_are_not_hidden_behind_payments_of_running_jobs(
    store: SqliteStore,
) -> None:
    # 150 paid jobs still queued, committed first, then one completed and one whose
    # authorization must be settled early: a page of 100 must hold the two that are due.
    for n in range(150):
        store.create_job(
            make_job(f"job_open{n}", key=f"k{n}"),
            queued(f"job_open{n}"),
            _payment(f"job_open{n}", n),
        )
    done = make_job("job_done", key="kd")
    store.create_job(done, queued("job_done"), _payment("job_done", 1000))
    store.transition("job_done", (JobState.QUEUED,), 0, {"state": JobState.COMPLETED}, None)
    urgent = make_job("job_urgent", key="ku")
    store.create_job(urgent, queued("job_urgent"), _payment("job_urgent", 1001, settle_by=500.0))
    due = store.due_payments(now=600.0, limit=100)
    assert [(p.job_id, state) for p, state in due] == [
        ("job_done", JobState.COMPLETED),
        ("job_urgent", JobState.QUEUED),
    ]
    assert store.due_payments(now=400.0, limit=100)[0][0].job_id == "job_done"
    assert len(store.open_payments(limit=100)) == 100  # the old page: none of them due


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
