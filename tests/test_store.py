"""The store contract: every Store implementation passes these same tests (parametrized by
the `store_factory` fixture: SQLite through its threads, and a throwaway PostgreSQL).

Durability across a reopen, idempotency, compare-and-set, event numbering and coalesced
progress, pairing codes, payments paging, and what concurrent writers may and may not do
to each other. Engine-specific behaviour (SQLite's WAL and migrations, group commit;
PostgreSQL's migrations and lost connections) is in test_store_sqlite.py,
test_store_threaded.py and test_store_postgres.py."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib

import pytest
from conftest import StoreFactory

from dispatchnet.coordinator.models import (
    ACTIVE_STATES,
    AGREED,
    DISAGREED,
    VERIFY_REDUNDANT,
    AnchorStatus,
    Event,
    EventKind,
    FeedbackEntry,
    FeedbackStatus,
    Job,
    JobSpec,
    JobState,
    JobType,
    Pairing,
    Payment,
    PaymentRef,
    PaymentStatus,
    PayoutRecord,
    PayoutRowState,
    Policy,
    PriorMove,
    Privacy,
    Quote,
    Receipt,
    ReceiptBatch,
    Result,
    Run,
    Split,
    UnbatchedReceipt,
    WorkerDay,
)
from dispatchnet.errors import (
    PaymentReused,
    TooManyOpenJobs,
    TooManyPairingCodes,
    TooManyPairings,
    Unavailable,
)
from dispatchnet.store.base import QuoteLimits, QuoteUsage, Runnable, Store

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


def new_job(n: int) -> tuple[Job, Event]:
    return make_job(f"job_{n}", key=f"k{n}"), queued(f"job_{n}")


def queued(job_id: str) -> Event:
    return Event(job_id, EventKind.STATE, JobState.QUEUED, 100.0, reason="committed")


def offered(job_id: str, worker: str = "w1", attempt: int = 1) -> Event:
    return Event(
        job_id,
        EventKind.STATE,
        JobState.OFFERED,
        102.0,
        from_state=JobState.QUEUED,
        worker_id=worker,
        attempt=attempt,
    )


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


async def offer(store: Store, job: Job, attempt: int = 0, worker: str = "w1") -> Job | None:
    """QUEUED -> OFFERED to `worker`, as the dispatcher does it."""
    return await store.transition(
        job.job_id,
        (JobState.QUEUED,),
        attempt,
        {"state": JobState.OFFERED, "worker_id": worker, "attempts": attempt + 1},
        offered(job.job_id, worker, attempt + 1),
    )


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


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory.open()


# --- durability and jobs ------------------------------------------------------------------


async def test_jobs_events_and_quotes_survive_a_reopen(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    quote = Quote("q_1", SPEC, 1000, "USD", 99.0, 399.0)
    await store.put_quote(quote)
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    moved = await offer(store, job)
    done = await store.transition(
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
    assert moved is not None and done is not None
    assert done.result == Result(b"out", "text/plain", 3, 4)
    assert done.receipt is not None and done.payment.status == "settled"
    events = await store.events_after(job.job_id, 0)
    await store.close()

    again = await store_factory.open()
    assert await again.get_quote("q_1") == quote
    assert await again.get_job("job_1") == done
    assert await again.get_job_by_key("client-a", "k1") == done
    assert await again.events_after("job_1", 0) == events
    assert [e.state for e in events] == [JobState.QUEUED, JobState.OFFERED, JobState.COMPLETED]
    assert events[1] == dataclasses.replace(offered("job_1"), sequence=2)


async def test_a_sealed_specs_recipients_survive_a_reopen(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    sealed = dataclasses.replace(
        SPEC, privacy=Privacy.PRIVATE, recipients=frozenset({"ab" * 32, "cd" * 32})
    )
    quote = Quote("q_1", sealed, 1000, "USD", 99.0, 399.0)
    await store.put_quote(quote)
    job = dataclasses.replace(make_job("job_1"), spec=sealed)
    await store.create_job(job, queued("job_1"))
    await store.create_job(make_job("job_2", key="k2"), queued("job_2"))
    await store.close()

    again = await store_factory.open()
    assert await again.get_quote("q_1") == quote
    got = await again.get_job("job_1")
    assert got is not None and got.spec.recipients == sealed.recipients and got.spec.sealed
    plain = await again.get_job("job_2")
    assert plain is not None and plain.spec.recipients == frozenset() and not plain.spec.sealed


async def test_create_job_is_idempotent_per_client_and_key(store: Store) -> None:
    first, created = await store.create_job(make_job("job_1"), queued("job_1"))
    assert created and first.job_id == "job_1" and first.last_sequence == 1
    again, created = await store.create_job(make_job("job_2"), queued("job_2"))
    assert not created
    assert again == first
    assert await store.get_job("job_2") is None
    assert await store.events_after("job_2", 0) == []
    assert len(await store.events_after("job_1", 0)) == 1
    # another client may use the same key
    theirs, created = await store.create_job(
        make_job("job_3", client_id="client-b"), queued("job_3")
    )
    assert created and theirs.job_id == "job_3"


async def test_create_job_refuses_a_client_at_its_open_jobs_limit(store: Store) -> None:
    for n in (1, 2):
        _, created = await store.create_job(*new_job(n), max_open=2)
        assert created
    with pytest.raises(TooManyOpenJobs, match="you have 2 open jobs"):
        await store.create_job(*new_job(3), _payment("job_3", 3), max_open=2)
    # nothing of it is stored: no job, no event, no payment
    assert await store.get_job("job_3") is None and await store.events_after("job_3", 0) == []
    assert await store.get_payment("job_3") is None
    # an existing key still returns its job; another client has its own count
    again, created = await store.create_job(make_job("job_9", key="k1"), queued("job_9"), None,
                                            max_open=2)  # fmt: skip
    assert not created and again.job_id == "job_1"
    _, created = await store.create_job(
        make_job("job_4", client_id="client-b", key="k4"), queued("job_4"), max_open=2
    )
    assert created
    # an offered job counts too (a write of the job offered at once), a final one does not
    assert await store.transition("job_1", [JobState.QUEUED], None, {"state": JobState.FAILED},
                                  None) is not None  # fmt: skip
    job, ev = new_job(5)
    offering = dataclasses.replace(job, state=JobState.OFFERED, worker_id="w1", attempts=1)
    _, created = await store.create_job(offering, ev, None, offered("job_5"), max_open=2)
    assert created
    with pytest.raises(TooManyOpenJobs):
        await store.create_job(*new_job(6), max_open=2)
    # no limit
    _, created = await store.create_job(*new_job(6))
    assert created


async def test_a_payment_is_stored_with_its_job_and_accepted_once(store: Store) -> None:
    job, created = await store.create_job(*new_job(1), _payment("job_1", 1))
    assert created and job.payment.authorization_id == "0x" + f"{1:064x}"
    assert await store.get_payment("job_1") == _payment("job_1", 1)
    # the same authorization in other letter case is the same payment
    assert await store.payment_standing(
        "eip155:31337", "0x" + "11" * 20, "0X" + "33" * 20, "0x" + f"{1:064X}"
    ) == (True, 1000)
    with pytest.raises(PaymentReused):
        await store.create_job(*new_job(2), _payment("job_2", 1))
    assert await store.get_job("job_2") is None and await store.get_payment("job_2") is None
    # the job's key again: its job, and the second payment is not stored
    again, created = await store.create_job(
        make_job("job_3", key="k1"), queued("job_3"), _payment("job_3", 3)
    )
    assert not created and again == job
    assert await store.payment_standing(
        "eip155:31337", "0x" + "11" * 20, "0x" + "33" * 20, "0x" + f"{3:064x}"
    ) == (False, 1000)


async def test_payment_standing_sums_what_the_payer_still_owes(store: Store) -> None:
    """What a payer's balance must still cover: its AUTHORIZED payments of that network
    and asset (letter case aside), not those moved on chain or given up, nor others'."""
    standing = functools.partial(
        store.payment_standing, "eip155:31337", "0x" + "11" * 20, "0x" + "33" * 20, "0x01"
    )
    assert await standing() == (False, 0)
    for n in (1, 2, 3):
        await store.create_job(*new_job(n), _payment(f"job_{n}", n))
    theirs = dataclasses.replace(_payment("job_4", 4), payer="0x" + "44" * 20)
    await store.create_job(*new_job(4), theirs)
    other_asset = dataclasses.replace(_payment("job_5", 5), asset="0x" + "55" * 20)
    await store.create_job(*new_job(5), other_asset)
    assert await standing() == (False, 3000)
    assert await store.payment_standing(
        "eip155:31337", "0X" + "11" * 20, "0x" + "33" * 20, "0x02"
    ) == (False, 3000)
    for job_id, status in (("job_1", PaymentStatus.HELD), ("job_2", PaymentStatus.FAILED)):
        await store.update_payment(job_id, [PaymentStatus.AUTHORIZED], {"status": status})
    assert await standing() == (False, 1000)


async def test_create_job_can_write_the_job_already_offered(store: Store) -> None:
    job = dataclasses.replace(
        make_job("job_1"),
        state=JobState.OFFERED,
        worker_id="w1",
        attempts=1,
        lease_expires_at=112.0,
        coordinator_id="c1",
    )
    created, new = await store.create_job(
        job, queued("job_1"), _payment("job_1", 1), offered("job_1")
    )
    assert new and created.state is JobState.OFFERED and created.last_sequence == 2
    assert (created.worker_id, created.attempts, created.coordinator_id) == ("w1", 1, "c1")
    assert created.payment.authorization_id == "0x" + f"{1:064x}"
    assert await store.get_job("job_1") == created  # what is returned is what was stored
    events = await store.events_after("job_1", 0)
    assert [(e.sequence, e.state, e.reason) for e in events] == [
        (1, JobState.QUEUED, "committed"),
        (2, JobState.OFFERED, ""),
    ]
    assert await store.offered_at("job_1", "w1", 1) == 102.0
    assert await store.held_attempts("w1", ["job_1"]) == {("job_1", 1)}
    assert [j.job_id for j in await store.active_jobs("w1")] == ["job_1"]
    assert await store.lapsed_leases(113.0) == [created]
    # the key again: the job as it is, nothing else written
    again, new = await store.create_job(
        dataclasses.replace(job, job_id="job_2"), queued("job_2"), None, offered("job_2")
    )
    assert not new and again == created and await store.events_after("job_2", 0) == []
    # it moves on from OFFERED as any offered job
    running = await store.transition(
        "job_1",
        (JobState.OFFERED,),
        1,
        {"state": JobState.RUNNING},
        Event("job_1", EventKind.STATE, JobState.RUNNING, 103.0, from_state=JobState.OFFERED),
    )
    assert running is not None and running.last_sequence == 3


async def test_transition_writes_a_prior_move_first_in_the_same_transaction(
    store: Store,
) -> None:
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    await offer(store, job)
    accept = PriorMove(
        (JobState.OFFERED,),
        1,
        {"state": JobState.RUNNING, "lease_expires_at": 400.0},
        Event("job_1", EventKind.STATE, JobState.RUNNING, 103.0, from_state=JobState.OFFERED,
              reason="accepted", worker_id="w1", attempt=1),
    )  # fmt: skip
    done = Event("job_1", EventKind.STATE, JobState.COMPLETED, 104.0,
                 from_state=JobState.RUNNING, reason="completed", worker_id="w1",
                 attempt=1)  # fmt: skip
    # the move's own condition fails: the prior one is not kept either
    assert (
        await store.transition(
            "job_1", (JobState.RUNNING,), 2, {"state": JobState.COMPLETED}, done, prior=accept
        )
        is None
    )
    # the prior one's condition fails: nothing written
    wrong = dataclasses.replace(accept, attempt=2)
    assert (
        await store.transition(
            "job_1", (JobState.RUNNING,), 1, {"state": JobState.COMPLETED}, done, prior=wrong
        )
        is None
    )
    # both in one statement (the prior move leaves a state the move starts from), and the
    # prior one's condition fails: nothing written
    off = dataclasses.replace(accept, from_states=(JobState.RUNNING,))
    assert (
        await store.transition(
            "job_1", (JobState.RUNNING,), 1, {"state": JobState.COMPLETED}, done, prior=off
        )
        is None
    )
    still = await store.get_job("job_1")
    assert still is not None and still.state is JobState.OFFERED and still.last_sequence == 2
    moved = await store.transition(
        "job_1",
        (JobState.RUNNING,),
        1,
        {"state": JobState.COMPLETED, "lease_expires_at": 0.0},
        done,
        outcome=("w1", True),
        prior=accept,
    )
    assert moved is not None and moved.state is JobState.COMPLETED and moved.last_sequence == 4
    assert moved.lease_expires_at == 0.0  # the move's changes over the prior one's
    events = await store.events_after("job_1", 0)
    assert [(e.sequence, e.state, e.reason) for e in events] == [
        (1, JobState.QUEUED, "committed"),
        (2, JobState.OFFERED, ""),
        (3, JobState.RUNNING, "accepted"),
        (4, JobState.COMPLETED, "completed"),
    ]
    # the job is no longer open: the client may open one more under a limit of one
    assert (await store.create_job(make_job("job_2", key="k2"), queued("job_2"), max_open=1))[1]
    assert (await store.active_jobs("w1")) == []


async def test_transition_is_compare_and_set(store: Store) -> None:
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    wrong_state = await store.transition(
        job.job_id,
        (JobState.RUNNING,),
        None,
        {"state": JobState.COMPLETED},
        Event(job.job_id, EventKind.STATE, JobState.COMPLETED, 102.0),
    )
    assert wrong_state is None
    assert await offer(store, job, attempt=5) is None
    assert await store.get_job(job.job_id) == job
    assert len(await store.events_after(job.job_id, 0)) == 1

    moved = await offer(store, job)
    assert moved is not None
    assert (moved.state, moved.attempts, moved.worker_id) == (JobState.OFFERED, 1, "w1")
    assert moved.last_sequence == 2
    # the same move again lost its race: the job is no longer QUEUED at attempt 0
    assert await offer(store, job) is None
    assert await store.get_job(job.job_id) == moved
    assert await store.offered_at(job.job_id, "w1", 1) == 102.0
    assert await store.offered_at(job.job_id, "w2", 1) is None
    assert await store.active_jobs("w1") == [moved] and await store.active_jobs() == [moved]


async def test_transition_checks_the_expected_fields_as_stored(store: Store) -> None:
    """expect: fields the job must still have as stored (a requeue of a job read a while
    ago, which another coordinator may have taken over since), with a prior move too."""
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    moved = await offer(store, job)
    assert moved is not None and moved.coordinator_id == "" and moved.lease_expires_at == 0.0
    resumed = await store.transition(
        "job_1", (JobState.OFFERED,), 1,
        {"state": JobState.RUNNING, "coordinator_id": "c2", "lease_expires_at": 500.0},
        Event("job_1", EventKind.STATE, JobState.RUNNING, 103.0, reason="resumed"),
    )  # fmt: skip
    assert resumed is not None

    def requeue(at: float) -> Event:
        return Event("job_1", EventKind.STATE, JobState.QUEUED, at, reason="requeued")

    as_read = {"coordinator_id": "", "lease_expires_at": 0.0}  # before the resume
    back = {"state": JobState.QUEUED, "lease_expires_at": 0.0}
    assert (
        await store.transition("job_1", ACTIVE_STATES, 1, back, requeue(104.0), expect=as_read)
        is None
    )
    assert (
        await store.transition(
            "job_1", ACTIVE_STATES, 1, back, requeue(104.0), expect={"coordinator_id": "c1"}
        )
        is None
    )
    # with a prior move, whether merged into one statement or not, the expectation is on
    # the job as stored before both
    done = Event("job_1", EventKind.STATE, JobState.COMPLETED, 105.0, reason="completed")
    for prior_from in ((JobState.RUNNING,), (JobState.OFFERED, JobState.RUNNING)):
        prior = PriorMove(
            prior_from, 1, {"state": JobState.RUNNING, "lease_expires_at": 600.0},
            Event("job_1", EventKind.STATE, JobState.RUNNING, 104.5, reason="again"),
        )  # fmt: skip
        for attempt in (1, None):
            assert await store.transition(
                "job_1", (JobState.RUNNING,), attempt, {"state": JobState.COMPLETED}, done,
                prior=prior, expect=as_read,
            ) is None  # fmt: skip
    assert await store.get_job("job_1") == resumed
    now = {"coordinator_id": "c2", "lease_expires_at": 500.0}
    moved = await store.transition("job_1", ACTIVE_STATES, 1, back, requeue(106.0), expect=now)
    assert moved is not None and moved.state is JobState.QUEUED
    assert moved.last_sequence == resumed.last_sequence + 1


async def test_transition_without_event_keeps_the_sequence(store: Store) -> None:
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    updated = await store.transition(
        job.job_id, (JobState.QUEUED,), None, {"queued_at": 200.0}, None
    )
    assert updated is not None and updated.queued_at == 200.0 and updated.last_sequence == 1
    with pytest.raises(KeyError, match="nonsense"):
        await store.transition(job.job_id, (JobState.QUEUED,), None, {"nonsense": 1}, None)
    assert await store.get_job(job.job_id) == updated
    same = await store.transition(job.job_id, (JobState.QUEUED,), None, {}, None)
    assert same == updated


async def test_a_final_move_adds_feedback_once_and_counts_the_outcome(store: Store) -> None:
    await store.record_worker_seen("w1", 1, 50.0, "7")
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    await offer(store, job)
    entry = FeedbackEntry("job_1", 7, 100, 0, "successRate", "", "uri", b"f" * 32, 103.0)
    done = await store.transition(
        "job_1",
        (JobState.OFFERED,),
        1,
        {"state": JobState.COMPLETED},
        None,
        feedback=entry,
        outcome=("w1", True),
    )
    assert done is not None and await store.worker_stats("w1") == (1, 0)
    assert await store.feedback_entries() == [entry]
    # a second entry for the job is ignored; a failed outcome counts separately
    again = await store.transition(
        "job_1", (JobState.COMPLETED,), None, {}, None, feedback=entry, outcome=("w1", False)
    )
    assert again is not None and await store.worker_stats("w1") == (1, 1)
    assert len(await store.feedback_entries()) == 1
    assert await store.update_feedback("job_1", FeedbackStatus.SENT, transaction="0xtx")
    assert not await store.update_feedback("job_1", FeedbackStatus.FAILED, error="late")
    [sent] = await store.feedback_entries((FeedbackStatus.SENT,))
    assert (sent.status, sent.transaction, sent.attempts) == (FeedbackStatus.SENT, "0xtx", 1)
    assert await store.feedback_entries((FeedbackStatus.PENDING,)) == []
    assert await store.worker_stats("nobody") == (0, 0)


async def test_outcomes_and_spot_checks_are_tallied_per_worker_and_day(store: Store) -> None:
    day = 86400.0
    await store.record_worker_seen("w1", 1, 50.0)
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    await offer(store, job)
    done = Event("job_1", EventKind.STATE, JobState.COMPLETED, 3 * day + 5, worker_id="w1")
    assert await store.transition(
        "job_1", (JobState.OFFERED,), 1, {"state": JobState.COMPLETED}, done,
        outcome=("w1", True),
    )  # fmt: skip
    # a later failure of the same worker, without an event: the job's updated_at decides
    assert await store.transition(
        "job_1", (JobState.COMPLETED,), None, {"updated_at": 5 * day}, None,
        outcome=("w1", False),
    )  # fmt: skip
    await store.record_spot_check("w1", True, 3 * day + 100)
    await store.record_spot_check("w1", False, 5 * day + 1)
    await store.record_spot_check("w1", False, 5 * day + 2)
    await store.record_spot_check("w2", True, 5 * day)
    assert await store.worker_days("w1", 0) == [
        WorkerDay(3, completed=1, agreed=1),
        WorkerDay(5, failed=1, disagreed=2),
    ]
    assert await store.worker_days("w1", 4) == [WorkerDay(5, failed=1, disagreed=2)]
    assert await store.worker_days("w2", 0) == [WorkerDay(5, agreed=1)]
    assert await store.worker_days("nobody", 0) == []
    assert await store.worker_stats("w1") == (1, 1)  # the totals still count


# --- events and progress --------------------------------------------------------------------


async def test_events_are_numbered_consecutively(store: Store) -> None:
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    await offer(store, job)
    for i in range(5):
        assert await store.append_progress([progress(job.job_id, f"step {i}", 3 + i)])
    assert [e.sequence for e in await store.events_after(job.job_id, 0)] == list(range(1, 8))
    later = await store.events_after(job.job_id, 4)
    assert [e.sequence for e in later] == [5, 6, 7]
    assert [e.text for e in later] == ["step 2", "step 3", "step 4"]
    assert [e.sequence for e in await store.events_after(job.job_id, 2, limit=2)] == [3, 4]
    assert await store.events_after(job.job_id, 7) == []
    # a second job's numbering is its own
    other, _ = await store.create_job(make_job("job_2", key="k2"), queued("job_2"))
    assert [e.sequence for e in await store.events_after(other.job_id, 0)] == [1]
    now = await store.get_job(job.job_id)
    assert now is not None and now.last_sequence == 7


async def test_coalesced_progress_is_one_row_read_back_event_by_event(
    store: Store, store_factory: StoreFactory
) -> None:
    """Many progress chunks make one row; a read from inside the row gives exactly the
    chunks after it, each as it was appended (text, fraction, time, sequence)."""
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    await offer(store, job)
    chunks = [progress(job.job_id, f"tok{i} ", 3 + i, fraction=i / 100) for i in range(100)]
    chunks[7] = progress(job.job_id, "", 10, fraction=0.07)  # an empty chunk keeps its place
    assert await store.append_progress(chunks[:60])
    assert await store.append_progress(chunks[60:])
    [(rows,)] = await store_factory.execute(
        "SELECT count(*) FROM events WHERE job_id = ?", job.job_id
    )
    assert rows == 4  # queued, offered, two progress rows
    assert await store.events_after(job.job_id, 2) == chunks
    assert await store.events_after(job.job_id, 40) == chunks[38:]
    assert await store.events_after(job.job_id, 40, limit=5) == chunks[38:43]
    assert await store.events_after(job.job_id, 62, limit=1) == [chunks[60]]
    assert await store.events_after(job.job_id, 102) == []
    now = await store.get_job(job.job_id)
    assert now is not None and now.last_sequence == 102
    # only the next sequence number is taken, and never twice
    assert not await store.append_progress([progress(job.job_id, "gap", 104)])
    assert not await store.append_progress([progress(job.job_id, "again", 102)])
    assert await store.append_progress([progress(job.job_id, "next", 103)])
    with pytest.raises(ValueError):
        await store.append_progress(
            [progress(job.job_id, "a", 104), progress(job.job_id, "b", 106)]
        )
    assert await store.append_progress([])


async def test_append_progress_on_a_final_job_is_refused(store: Store) -> None:
    job, _ = await store.create_job(make_job("job_1"), queued("job_1"))
    cancelled = await store.transition(
        job.job_id,
        (JobState.QUEUED,),
        None,
        {"state": JobState.CANCELLED},
        Event(job.job_id, EventKind.STATE, JobState.CANCELLED, 102.0),
    )
    assert cancelled is not None and cancelled.last_sequence == 2
    assert not await store.append_progress([progress(job.job_id, "too late", 3)])
    assert await store.get_job(job.job_id) == cancelled
    assert len(await store.events_after(job.job_id, 0)) == 2
    assert not await store.append_progress([progress("job_nope", "x", 1)])


async def test_held_attempts_are_read_at_once_for_many_jobs(store: Store) -> None:
    for n in range(3):
        job, _ = await store.create_job(*new_job(n))
        await offer(store, job, worker="w1" if n < 2 else "w2")
    ids = [f"job_{n}" for n in range(3)] + [f"ghost_{i}" for i in range(5000)]
    assert await store.held_attempts("w1", ids) == {("job_0", 1), ("job_1", 1)}
    assert await store.held_attempts("w2", ids) == {("job_2", 1)}
    assert await store.held_attempts("w3", ids) == set()


async def requeue(store: Store, job: Job, reason: str) -> Job | None:
    """The attempt the job's worker holds back to QUEUED, as JobService.requeue does it."""
    return await store.transition(
        job.job_id,
        (JobState.OFFERED, JobState.RUNNING),
        job.attempts,
        {"state": JobState.QUEUED},
        Event(
            job.job_id, EventKind.STATE, JobState.QUEUED, 103.0, from_state=job.state,
            reason=reason, worker_id=job.worker_id, attempt=job.attempts,
        ),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "open_", "held"),
    [
        ("rejected: busy", False, False),
        ("failed: oops", False, False),
        ("bad receipt: receipt names another job", False, False),
        # taken back, not given up: a late result counts, and its worker may resume it
        ("worker_disconnected", True, True),
        # its lease ran out, or its verified run is in: a late result counts (or is the
        # verified job's to refuse), but listing it at Connect does not get it back
        ("time_limit_exceeded", True, False),
        ("offer_lease_expired", True, False),
        ("run 1 of 2 done", True, False),
    ],
)
async def test_an_attempt_its_worker_gave_up_is_no_longer_held(
    store: Store, reason: str, open_: bool, held: bool
) -> None:
    job, _ = await store.create_job(*new_job(0))
    offered_job = await offer(store, job)
    assert offered_job is not None
    assert await requeue(store, offered_job, reason) is not None
    again = await offer(store, (await store.get_job(job.job_id)) or job, attempt=1, worker="w2")
    assert again is not None and again.attempts == 2
    assert (await store.offered_at(job.job_id, "w1", 1) == 102.0) is open_
    assert (await store.held_attempts("w1", [job.job_id]) == {(job.job_id, 1)}) is held
    # the attempt after it is untouched
    assert await store.offered_at(job.job_id, "w2", 2) == 102.0
    assert await store.held_attempts("w2", [job.job_id]) == {(job.job_id, 2)}


# --- queue and leases ------------------------------------------------------------------------


async def test_queued_jobs_binds_no_parameter_per_task_name(store: Store) -> None:
    """The union of every free worker's task names can be far beyond a database's limit
    on bound parameters (SQLite: 32766): one read takes them however many there are."""
    await store.create_job(make_job("job_1"), queued("job_1"))
    names = frozenset({"echo", *(f"t{i}" for i in range(300_000))})
    assert [j.job_id for j in await store.queued_jobs(10, None, Runnable(names, False))] == [
        "job_1"
    ]
    assert await store.queued_jobs(10, None, Runnable(frozenset({"other"}), False)) == []
    assert await store.queued_jobs(10, None, Runnable(frozenset(), False)) == []
    assert len(await store.queued_jobs(10, None, Runnable(frozenset(), True))) == 0
    assert len(await store.queued_jobs(10)) == 1


async def test_queued_jobs_page_oldest_first_and_leases_lapse(store: Store) -> None:
    for n in range(5):
        job = dataclasses.replace(make_job(f"job_{n}", key=f"k{n}"), queued_at=100.0 + n % 3)
        await store.create_job(job, queued(job.job_id))
    first = await store.queued_jobs(2)
    assert [(j.queued_at, j.job_id) for j in first] == [(100.0, "job_0"), (100.0, "job_3")]
    rest = await store.queued_jobs(10, (first[-1].queued_at, first[-1].job_id))
    assert [j.job_id for j in rest] == ["job_1", "job_4", "job_2"]
    assert {j.job_id for j in await store.stale_queued(101.5)} == {
        "job_0",
        "job_3",
        "job_1",
        "job_4",
    }
    leased = await store.transition(
        "job_0",
        (JobState.QUEUED,),
        0,
        {"state": JobState.OFFERED, "worker_id": "w1", "attempts": 1, "lease_expires_at": 150.0},
        offered("job_0"),
    )
    assert leased is not None
    assert await store.lapsed_leases(150.0) == []
    assert await store.lapsed_leases(150.5) == [leased]
    assert [j.job_id for j in await store.queued_jobs(10)] == ["job_3", "job_1", "job_4", "job_2"]


# --- quotes and modules ----------------------------------------------------------------------


async def test_quote_usage_is_counted_until_released_and_modules_follow_references(
    store: Store,
) -> None:
    module = b"\0asm\1\0\0\0"
    sha = hashlib.sha256(module).digest()
    await store.put_quote(Quote("q_a", SPEC, 1, "USD", 1.0, 10.0), "alice", 100, module)
    await store.put_quote(Quote("q_b", SPEC, 1, "USD", 1.0, 20.0), "alice", 50)
    await store.put_quote(Quote("q_c", SPEC, 1, "USD", 1.0, 10.0), "", 7)
    assert await store.quote_usage("alice") == (QuoteUsage(2, 150), QuoteUsage(3, 157))
    assert await store.quote_usage("") == (QuoteUsage(1, 7), QuoteUsage(3, 157))
    assert await store.get_module(sha) == module
    # a job made from q_a keeps the module while it is open
    job = dataclasses.replace(make_job("job_1"), quote_id="q_a")
    await store.create_job(job, queued("job_1"))

    assert await store.release_expired_quotes(now=15.0) == 2  # q_a, q_c
    assert await store.quote_usage("alice") == (QuoteUsage(1, 50), QuoteUsage(1, 50))
    assert await store.quote_usage("") == (QuoteUsage(0, 0), QuoteUsage(1, 50))
    assert await store.get_module(sha) == module  # the open job references it
    released = await store.get_quote("q_a")
    assert released is not None and released.spec.spec_bytes == b""  # kept: "expired"
    assert await store.release_expired_quotes(now=15.0) == 0  # once

    await store.transition("job_1", (JobState.QUEUED,), None, {"state": JobState.CANCELLED}, None)
    assert await store.release_expired_quotes(now=15.0) == 0
    assert await store.get_module(sha) is None  # nothing references it any more

    await store.put_pairing_code(b"p" * 32, "alice", expires_at=12.0)
    assert await store.purge_expired(before=16.0) == 3  # q_a, q_c and the code
    assert await store.get_quote("q_a") is None and await store.get_quote("q_b") is not None
    assert await store.purge_expired(before=30.0) == 0  # q_b was never released


async def test_put_quote_checks_the_limits_in_its_own_write(store: Store) -> None:
    """The limits are checked by the write that stores the quote: a refused quote stores
    and counts nothing, and the caller gets the usage that refused it."""
    limits = QuoteLimits(anonymous_quotes=2, client_bytes=100, total_bytes=200)

    def quote(n: int) -> Quote:
        return Quote(f"q_{n}", SPEC, 1, "USD", 1.0, 10.0)

    assert await store.put_quote(quote(1), "alice", 60, None, limits) is None
    mine_full = await store.put_quote(quote(2), "alice", 41, None, limits)
    assert mine_full == (QuoteUsage(1, 60), QuoteUsage(1, 60))
    assert await store.get_quote("q_2") is None
    assert await store.put_quote(quote(3), "alice", 40, None, limits) is None  # exactly 100
    assert await store.put_quote(quote(4), "", 10, None, limits) is None
    assert await store.put_quote(quote(5), "", 10, None, limits) is None
    assert await store.put_quote(quote(6), "", 10, None, limits) == (
        QuoteUsage(2, 20),
        QuoteUsage(4, 120),
    )
    assert await store.put_quote(quote(7), "bob", 81, None, limits) == (
        QuoteUsage(0, 0),
        QuoteUsage(4, 120),
    )
    assert await store.quote_usage("bob") == (QuoteUsage(0, 0), QuoteUsage(4, 120))
    module = b"\0asm\1\0\0\0"
    assert await store.put_quote(quote(8), "bob", 81, module, limits) is not None
    assert await store.get_module(hashlib.sha256(module).digest()) is None  # not stored
    assert await store.put_quote(quote(9), "bob", 80, None, limits) is None  # exactly 200


async def test_concurrent_quotes_pass_no_limit_of_one_counter(store: Store) -> None:
    """Quotes racing for the last bytes of a limit: the count never passes it (on
    PostgreSQL up to one quote per other usage row committing at the same moment)."""
    limits = QuoteLimits(anonymous_quotes=5, client_bytes=10**9, total_bytes=10**9)
    refused = await asyncio.gather(
        *(
            store.put_quote(Quote(f"q_{n}", SPEC, 1, "USD", 1.0, 10.0), "", 1, None, limits)
            for n in range(40)
        )
    )
    stored = sum(r is None for r in refused)
    assert 5 <= stored <= 5 + 7
    assert (await store.quote_usage(""))[0].quotes == stored


async def test_concurrent_sweeps_give_each_quote_back_once(store_factory: StoreFactory) -> None:
    a, b = await store_factory.open(), await store_factory.open()  # two coordinators
    for n in range(200):
        await a.put_quote(Quote(f"q_{n}", SPEC, 1, "USD", 1.0, 10.0), f"c{n % 7}", 10)
    freed = await asyncio.gather(*(s.release_expired_quotes(now=11.0) for s in (a, b, a, b)))
    assert sum(freed) == 200
    assert (await a.quote_usage("c1"))[1] == QuoteUsage(0, 0)
    assert await store_factory.execute("SELECT owner FROM quote_usage WHERE quotes <> 0") == []


# --- pairing ----------------------------------------------------------------------------------


async def test_pairing_codes_are_single_use_and_expire(store: Store) -> None:
    await store.put_pairing_code(b"a" * 32, "client-a", expires_at=100.0)
    await store.put_pairing_code(b"b" * 32, "client-b", expires_at=100.0)
    assert await store.pairing_code_owner(b"a" * 32, now=50.0) == "client-a"
    assert await store.claim_pairing_code(b"a" * 32, now=50.0) == "client-a"
    assert await store.claim_pairing_code(b"a" * 32, now=50.0) is None
    assert await store.pairing_code_owner(b"a" * 32, now=50.0) is None
    assert await store.claim_pairing_code(b"b" * 32, now=100.5) is None
    # a failed claim of an expired code did not consume it (as seen from an earlier clock)
    assert await store.claim_pairing_code(b"b" * 32, now=99.0) == "client-b"
    assert await store.claim_pairing_code(b"c" * 32, now=0.0) is None


async def test_a_pair_has_one_active_pairing_until_it_is_revoked(store: Store) -> None:
    p1 = Pairing("pair_1", "client-a", "w1", 10.0)
    assert await store.put_pairing(p1) == p1
    assert await store.put_pairing(Pairing("pair_2", "client-a", "w1", 11.0)) == p1
    assert await store.get_pairing("pair_2") is None
    assert await store.paired_workers("client-a") == {"w1"}
    revoked = await store.revoke_pairing("pair_1", 20.0)
    assert revoked == Pairing("pair_1", "client-a", "w1", 10.0, 20.0)
    assert await store.revoke_pairing("pair_1", 30.0) == revoked  # keeps its first time
    assert await store.revoke_pairing("nope", 30.0) is None
    assert await store.paired_workers("client-a") == set()
    p3 = Pairing("pair_3", "client-a", "w1", 40.0)
    assert await store.put_pairing(p3) == p3
    assert await store.list_pairings("w1", include_revoked=False) == [p3]
    assert await store.list_pairings("client-a", include_revoked=True) == [revoked, p3]


async def test_a_client_holds_a_bounded_number_of_live_pairing_codes(store: Store) -> None:
    for n in range(3):
        await store.put_pairing_code(bytes([n]) * 32, "client-a", 100.0, now=50.0, most=3)
    with pytest.raises(TooManyPairingCodes, match="max_live_codes"):
        await store.put_pairing_code(b"x" * 32, "client-a", 100.0, now=50.0, most=3)
    assert await store.pairing_code_owner(b"x" * 32, now=50.0) is None  # not stored
    await store.put_pairing_code(b"y" * 32, "client-b", 100.0, now=50.0, most=3)  # another's
    # a used code, or an expired one, no longer counts
    assert await store.claim_pairing_code(bytes([0]) * 32, now=50.0) == "client-a"
    await store.put_pairing_code(b"x" * 32, "client-a", 100.0, now=50.0, most=3)
    await store.put_pairing_code(b"z" * 32, "client-a", 200.0, now=150.0, most=3)


async def test_a_party_keeps_a_bounded_number_of_pairings(store: Store) -> None:
    """Past `most` pairings (revoked ones included), a party forgets its oldest revoked
    ones; with all of them active, a new pairing is refused, whichever side is full."""
    made = [
        await store.put_pairing(Pairing(f"pair_{i}", "c", f"w{i}", i), most=3) for i in range(3)
    ]
    with pytest.raises(TooManyPairings, match="the client has 3 active pairings"):
        await store.put_pairing(Pairing("pair_x", "c", "wx", 5.0), most=3)
    assert await store.put_pairing(Pairing("pair_y", "c", "w0", 5.0), most=3) == made[0]  # kept
    await store.revoke_pairing("pair_1", 6.0)
    await store.revoke_pairing("pair_0", 7.0)
    new = await store.put_pairing(Pairing("pair_3", "c", "w3", 8.0), most=3)
    assert new.pairing_id == "pair_3" and await store.get_pairing("pair_1") is None
    listed = await store.list_pairings("c", include_revoked=True)
    assert [p.pairing_id for p in listed] == ["pair_0", "pair_2", "pair_3"]
    # the worker's side
    for i in range(3):
        await store.put_pairing(Pairing(f"pw_{i}", f"client{i}", "busy", 10.0 + i), most=3)
    with pytest.raises(TooManyPairings, match="the worker has 3"):
        await store.put_pairing(Pairing("pw_x", "client-x", "busy", 20.0), most=3)
    assert await store.get_pairing("pw_x") is None


async def test_concurrent_claims_and_pairings_have_one_winner(
    store_factory: StoreFactory,
) -> None:
    a, b = await store_factory.open(), await store_factory.open()
    await a.put_pairing_code(b"x" * 32, "client-a", expires_at=100.0)
    claims = await asyncio.gather(*(s.claim_pairing_code(b"x" * 32, now=1.0) for s in (a, b) * 5))
    assert claims.count("client-a") == 1 and claims.count(None) == 9
    made = await asyncio.gather(
        *(
            s.put_pairing(Pairing(f"pair_{i}", "client-a", "w1", 1.0 + i))
            for i, s in enumerate((a, b) * 5)
        )
    )
    assert len({p.pairing_id for p in made}) == 1
    assert len(await a.list_pairings("client-a", include_revoked=True)) == 1


# --- concurrent writers -------------------------------------------------------------------------


async def test_a_write_is_visible_to_the_next_read(store: Store) -> None:
    for n in range(30):
        job, event = new_job(n)
        created, new = await store.create_job(job, event)
        assert new and await store.get_job(job.job_id) == created
        moved = await offer(store, job)
        assert moved is not None and moved.state is JobState.OFFERED
        assert await store.get_job(job.job_id) == moved
        assert len(await store.events_after(job.job_id, 0)) == 2


async def test_concurrent_writes_all_commit_and_survive_a_reopen(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory.open()
    created = await asyncio.gather(*(store.create_job(*new_job(n)) for n in range(200)))
    assert all(new for _, new in created)
    moved = await asyncio.gather(*(offer(store, job) for job, _ in created))
    assert all(j is not None and j.state is JobState.OFFERED for j in moved)
    await store.close()

    again = await store_factory.open()
    for n in range(200):
        job = await again.get_job(f"job_{n}")
        assert job is not None and job.state is JobState.OFFERED and job.last_sequence == 2


async def test_racing_writers_of_one_job_one_key_and_one_sequence(
    store_factory: StoreFactory,
) -> None:
    """What two coordinators (or two requests) may do at the same time: of creates with
    one key, one creates and the others get its job; of offers of one attempt, one wins;
    of progress rows with the same next sequence number, one is stored."""
    a, b = await store_factory.open(), await store_factory.open()
    made = await asyncio.gather(
        *(
            s.create_job(make_job(f"job_{i}", key="same"), queued(f"job_{i}"))
            for i, s in enumerate((a, b) * 4)
        )
    )
    assert [new for _, new in made].count(True) == 1
    winner = next(job for job, new in made if new)
    assert all(job == winner for job, _ in made)

    offers = await asyncio.gather(
        *(offer(s, winner, worker=f"w{i}") for i, s in enumerate((a, b) * 4))
    )
    [taken] = [j for j in offers if j is not None]
    assert (await a.get_job(winner.job_id)) == taken
    assert [e.worker_id for e in await b.events_after(winner.job_id, 1)] == [taken.worker_id]

    appended = await asyncio.gather(
        *(
            s.append_progress([progress(winner.job_id, f"from {i}", 3)])
            for i, s in enumerate((a, b) * 4)
        )
    )
    assert appended.count(True) == 1
    assert len(await a.events_after(winner.job_id, 2)) == 1


async def test_a_failing_write_fails_only_its_caller(store: Store) -> None:
    done, event = new_job(0)
    await store.create_job(done, event)
    receipt = Receipt(b"body", b"w" * 64, b"c" * 64, b"h" * 32)
    await store.transition(
        "job_0", (JobState.QUEUED,), 0, {"state": JobState.COMPLETED, "receipt": receipt}, None
    )
    batch = ReceiptBatch("b1", b"r" * 32, 2, 200.0, AnchorStatus.PENDING)
    leaves = [
        UnbatchedReceipt("job_0", b"h" * 32, 100.0),
        UnbatchedReceipt("ghost", b"g" * 32, 1.0),
    ]
    assert (await store.create_job(*new_job(1), _payment("job_1", 1)))[1]
    reused, refused, c = await asyncio.gather(
        store.create_job(*new_job(2), _payment("job_2", 1)),  # job_1's payment
        store.create_receipt_batch(batch, leaves),  # its second leaf is no receipt
        store.create_job(*new_job(3), _payment("job_3", 3)),
        return_exceptions=True,
    )
    assert isinstance(reused, PaymentReused)
    assert refused is False
    assert isinstance(c, tuple) and c[1]
    assert await store.get_job("job_2") is None  # the failed write left nothing
    assert await store.get_payment("job_1") is not None
    assert await store.get_payment("job_3") is not None
    assert await store.receipt_leaf("job_0") is None
    assert [r.job_id for r in await store.unbatched_receipts(10)] == ["job_0"]


async def test_a_cancelled_caller_does_not_lose_its_write(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    cancelled = asyncio.create_task(store.create_job(*new_job(1)))
    await asyncio.sleep(0)  # submitted
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await store.close()  # finishes what was submitted
    again = await store_factory.open()
    assert await again.get_job("job_1") is not None
    assert errors == []  # no result was set on the cancelled future


async def test_close_finishes_the_submitted_writes_and_is_idempotent(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory.open()
    pending = [asyncio.create_task(store.create_job(*new_job(n))) for n in range(50)]
    await asyncio.sleep(0)  # all submitted
    await asyncio.gather(store.close(), store.close())
    assert all(t.done() and t.result()[1] for t in pending)
    await store.close()
    with pytest.raises(Unavailable):
        await store.get_job("job_0")
    with pytest.raises(Unavailable):
        await store.create_job(*new_job(99))
    again = await store_factory.open()
    assert all([await again.get_job(f"job_{n}") is not None for n in range(50)])


# --- payments, earnings and payouts -------------------------------------------------------------


async def test_due_payments_are_not_hidden_behind_payments_of_running_jobs(
    store: Store,
) -> None:
    # 150 paid jobs still queued, committed first, then one completed and one whose
    # authorization must be settled early: a page of 100 must hold the two that are due.
    for n in range(150):
        await store.create_job(
            make_job(f"job_open{n}", key=f"k{n}"),
            queued(f"job_open{n}"),
            _payment(f"job_open{n}", n),
        )
    done = make_job("job_done", key="kd")
    await store.create_job(done, queued("job_done"), _payment("job_done", 1000))
    await store.transition("job_done", (JobState.QUEUED,), 0, {"state": JobState.COMPLETED}, None)
    urgent = make_job("job_urgent", key="ku")
    await store.create_job(
        urgent, queued("job_urgent"), _payment("job_urgent", 1001, settle_by=500.0)
    )
    due = await store.due_payments(now=600.0, limit=100)
    assert [(p.job_id, state) for p, state in due] == [
        ("job_done", JobState.COMPLETED),
        ("job_urgent", JobState.QUEUED),
    ]
    assert (await store.due_payments(now=400.0, limit=100))[0][0].job_id == "job_done"
    assert len(await store.open_payments(limit=100)) == 100  # the old page: none of them due


async def _settled(store: Store, n: int, worker: str) -> str:
    """A job completed by worker, its payment (1000) settled and credited (10% fee)."""
    job, _ = await store.create_job(*new_job(n), _payment(f"job_{n}", n))
    await store.transition(
        job.job_id, (JobState.QUEUED,), 0, {"state": JobState.COMPLETED, "worker_id": worker}, None
    )
    paid = await store.update_payment(
        job.job_id,
        (PaymentStatus.AUTHORIZED,),
        {"status": PaymentStatus.SETTLED, "transaction": f"0xs{n}", "updated_at": 200.0 + n},
        credit=Split.of(1000, 1000),
    )
    assert paid is not None and paid.status is PaymentStatus.SETTLED
    return job.job_id


async def test_a_settlement_credits_once_and_a_refund_reverses_it(store: Store) -> None:
    await store.record_worker_seen("w1", 1, 1.0, "7")
    job_id = await _settled(store, 1, "w1")
    job = await store.get_job(job_id)
    assert job is not None and job.payment.status == "settled" and job.payment.transaction == "0xs1"
    # a retried settlement record never credits twice; a wrong from-status changes nothing
    assert await store.update_payment(
        job_id, (PaymentStatus.SETTLED,), {"error": ""}, credit=Split.of(1000, 1000)
    )
    assert await store.update_payment(job_id, (PaymentStatus.AUTHORIZED,), {"error": "x"}) is None
    [earning] = await store.earnings("w1", 10)
    assert (earning.amount, earning.fee, earning.share, earning.reversed) == (1000, 100, 900, False)
    [balance] = (await store.balances(["w1", "w2"]))["w1"]
    assert (balance.earned, balance.balance) == (900, 900)

    await _settled(store, 2, "w1")
    page = await store.earnings("w1", 1)
    assert [e.job_id for e in page] == ["job_2"]
    assert [e.job_id for e in await store.earnings("w1", 5, (page[0].credited_at, "job_2"))] == [
        "job_1"
    ]
    refunded = await store.update_payment(
        "job_2", (PaymentStatus.SETTLED,), {"status": PaymentStatus.REFUNDED, "updated_at": 300.0}
    )
    assert refunded is not None
    assert [e.reversed for e in await store.earnings("w1", 5)] == [True, False]
    [balance] = (await store.balances(["w1"]))["w1"]
    assert (balance.earned, balance.balance) == (900, 900)
    flows, fees = await store.audit_flows("eip155:31337")
    assert sorted(flows) == [
        ("refund", "0x" + "11" * 20, "", -1000),
        ("settlement", "0x" + "11" * 20, "0xs1", 1000),
        ("settlement", "0x" + "11" * 20, "0xs2", 1000),
    ]
    assert fees == {"0x" + "11" * 20: 100}


def _run(job_id: str, attempt: int, worker: str, output: bytes) -> Run:
    receipt = Receipt(b"body%d" % attempt, b"ws", b"cs", bytes([attempt]) * 32)
    return Run(job_id, attempt, worker, "7", Result(output, "text/plain"), receipt, 100.0 + attempt)


async def test_verified_runs_move_with_their_job_and_share_its_payment(store: Store) -> None:
    job = dataclasses.replace(
        make_job("job_v"), spec=dataclasses.replace(SPEC, verify=3), verify_mode=VERIFY_REDUNDANT,
        verify_runs=3,
    )  # fmt: skip
    await store.create_job(job, queued("job_v"), _payment("job_v", 9))
    stored = await store.get_job("job_v")
    assert stored is not None and stored.spec.verify == 3 and stored.verify_runs == 3
    requeue = Event("job_v", EventKind.STATE, JobState.QUEUED, 103.0, reason="run done")
    for attempt, worker, out in ((1, "w1", b"a"), (2, "w2", b"b")):
        await offer(store, stored, attempt - 1, worker)
        run = _run("job_v", attempt, worker, out)
        seen = (*stored.verify_seen, f"key:{worker}")
        changes = {"state": JobState.QUEUED, "verify_seen": seen, "max_attempts": 3 + attempt}
        moved = await store.record_run(run, (JobState.OFFERED,), changes, requeue)
        assert moved is not None and moved.verify_seen == seen
        # the same attempt's run again: the compare-and-set fails, nothing is stored twice
        assert await store.record_run(run, (JobState.QUEUED,), {}, requeue) is None
        stored = moved
    assert [(r.attempt, r.worker_id, r.result.output) for r in await store.job_runs("job_v")] == [
        (1, "w1", b"a"),
        (2, "w2", b"b"),
    ]
    await offer(store, stored, 2, "w3")
    feedback = [
        FeedbackEntry(f"job_v#{a}", 7, v, 0, "spotCheck", "task", "u", b"f" * 32, 104.0)
        for a, v in ((1, 100), (2, 0), (3, 100))
    ]
    verdicts = {1: AGREED, 2: DISAGREED, 3: AGREED}
    done_event = Event("job_v", EventKind.STATE, JobState.COMPLETED, 105.0, reason="completed")
    done = await store.conclude_runs(
        "job_v",
        (JobState.OFFERED,),
        3,
        {"state": JobState.COMPLETED, "worker_id": "w1"},
        done_event,
        verdicts,
        feedback,
        [("w1", True), ("w2", False), ("w3", True)],
        run=_run("job_v", 3, "w3", b"a"),
    )
    assert done is not None and done.state is JobState.COMPLETED
    assert [r.verdict for r in await store.job_runs("job_v")] == [AGREED, DISAGREED, AGREED]
    assert sorted(f.job_id for f in await store.feedback_entries()) == [
        "job_v#1",
        "job_v#2",
        "job_v#3",
    ]
    assert await store.worker_stats("w2") == (0, 0)  # never seen: no row to count in
    again = await store.conclude_runs(
        "job_v", (JobState.OFFERED,), 3, {}, done_event, verdicts, feedback
    )
    assert again is None  # the job moved on: nothing written twice
    # the settlement credits the agreeing workers, the result's worker first, once
    for _ in range(2):
        await store.update_payment(
            "job_v",
            (PaymentStatus.AUTHORIZED, PaymentStatus.SETTLED),
            {"status": PaymentStatus.SETTLED, "transaction": "0xs", "updated_at": 200.0},
            credit=Split.of(1001, 1000),
        )
    [w1] = await store.earnings("w1", 5)
    [w3] = await store.earnings("w3", 5)
    assert (w1.fee, w1.share, w3.fee, w3.share) == (100, 451, 0, 450)
    assert await store.earnings("w2", 5) == []
    balances = await store.balances(["w1", "w2", "w3"])
    assert [b.earned for b in balances["w1"]] + [b.earned for b in balances["w3"]] == [451, 450]
    _, fees = await store.audit_flows("eip155:31337")
    assert fees == {"0x" + "11" * 20: 100}
    await store.update_payment(
        "job_v", (PaymentStatus.SETTLED,), {"status": PaymentStatus.REFUNDED, "updated_at": 300.0}
    )
    assert [e.reversed for e in await store.earnings("w3", 5)] == [True]
    assert (await store.balances(["w1", "w3"])) == {}


async def test_payouts_debit_the_balance_atomically_and_a_failed_one_returns(
    store_factory: StoreFactory,
) -> None:
    a, b = await store_factory.open(), await store_factory.open()
    await a.record_worker_seen("w1", 1, 1.0, "7")
    await a.record_worker_seen("w2", 1, 1.0, "")  # no agent id: not payable
    for n in range(3):
        await _settled(a, n, "w1")
    await _settled(a, 3, "w2")
    [due] = await a.payouts_due("eip155:31337", min_amount=2700, unpaid_before=0.0, limit=10)
    assert (due.worker_id, due.agent_id, due.unpaid) == ("w1", "7", 2700)
    assert await a.payouts_due("eip155:31337", 2701, 0.0, 10) == []
    assert len(await a.payouts_due("eip155:31337", 2701, 1e9, 10)) == 1  # waited long enough
    assert await a.payouts_due("eip155:31337", 1, 0.0, 10, due.cursor) == []

    def payout(i: int, amount: int) -> PayoutRecord:
        return PayoutRecord(
            payout_id=f"0x{i:064x}",
            worker_id="w1",
            network="eip155:31337",
            asset="0x" + "11" * 20,
            to="0xto",
            amount=amount,
            state=PayoutRowState.PENDING,
            created_at=400.0 + i,
            updated_at=400.0 + i,
        )

    # two coordinators each try to pay most of the balance: never more than it holds
    made = await asyncio.gather(
        *(s.create_payout(payout(i, 2000)) for i, s in enumerate((a, b) * 3))
    )
    assert made.count(True) == 1
    [balance] = (await a.balances(["w1"]))["w1"]
    assert (balance.earned, balance.balance) == (2700, 700)
    [record] = await a.open_payouts("eip155:31337", 10)
    signed = await b.update_payout(
        record.payout_id, (PayoutRowState.PENDING,), {"state": PayoutRowState.SIGNED, "raw": "r"}
    )
    assert signed is not None and signed.raw == "r"
    assert await a.update_payout(record.payout_id, (PayoutRowState.PENDING,), {"raw": "x"}) is None
    failed = await a.update_payout(
        record.payout_id,
        (PayoutRowState.SIGNED,),
        {"state": PayoutRowState.FAILED, "error": "refused", "updated_at": 500.0},
    )
    assert failed is not None and failed.state is PayoutRowState.FAILED
    [balance] = (await a.balances(["w1"]))["w1"]
    assert balance.balance == 2700  # back to be paid again
    assert await a.open_payouts("eip155:31337", 10) == []
    assert [p.state for p in await a.payouts("w1", 10)] == [PayoutRowState.FAILED]


# --- receipt batches -----------------------------------------------------------------------------


async def _completed(store: Store, n: int, at: float) -> UnbatchedReceipt:
    job, _ = await store.create_job(*new_job(n))
    body = f"receipt {n}".encode()
    receipt = Receipt(body, b"w", b"c", hashlib.sha256(body).digest())
    moved = await store.transition(
        job.job_id,
        (JobState.QUEUED,),
        None,
        {"state": JobState.COMPLETED, "updated_at": at, "receipt": receipt},
        None,
    )
    assert moved is not None
    return UnbatchedReceipt(job.job_id, receipt.sha256, at)


async def test_racing_batchers_never_share_a_receipt(store_factory: StoreFactory) -> None:
    a, b = await store_factory.open(), await store_factory.open()
    waiting = [await _completed(a, n, 10.0 + n) for n in range(6)]
    assert await a.unbatched_receipts(10) == waiting

    def batch(batch_id: str, leaves: list[UnbatchedReceipt]) -> ReceiptBatch:
        return ReceiptBatch(batch_id, b"r" * 32, len(leaves), 50.0, AnchorStatus.PENDING)

    # overlapping batches from two batchers: the receipts of those that won are disjoint
    attempts = [waiting[0:4], waiting[2:6], waiting[0:6], waiting[4:6]]
    won = await asyncio.gather(
        *(
            s.create_receipt_batch(batch(f"b{i}", leaves), leaves)
            for i, (s, leaves) in enumerate(zip((a, b, a, b), attempts, strict=True))
        )
    )
    batched = [
        leaf.job_id for ok, leaves in zip(won, attempts, strict=True) if ok for leaf in leaves
    ]
    assert any(won) and len(batched) == len(set(batched))
    for i, ok in enumerate(won):
        leaves = await a.batch_leaves(f"b{i}")
        assert [(x.leaf_index, x.job_id) for x in leaves] == (
            [(k, r.job_id) for k, r in enumerate(attempts[i])] if ok else []
        )
    assert await a.unbatched_receipts(10) == [r for r in waiting if r.job_id not in batched]
    with pytest.raises(ValueError):
        await a.create_receipt_batch(batch("bad", []), [])


async def test_anchor_outcomes_are_recorded_until_final(store: Store) -> None:
    leaf = await _completed(store, 0, 10.0)
    assert await store.create_receipt_batch(
        ReceiptBatch("b1", b"r" * 32, 1, 20.0, AnchorStatus.PENDING), [leaf]
    )
    assert await store.create_receipt_batch(
        ReceiptBatch("b2", b"s" * 32, 1, 21.0, AnchorStatus.NONE),
        [await _completed(store, 1, 11.0)],
    )
    assert await store.receipt_leaf("job_0") is not None
    failed = await store.update_anchor("b1", AnchorStatus.FAILED, error="boom")
    assert failed is not None and failed.anchor_error == "boom"
    assert [x.batch_id for x in await store.receipt_batches((AnchorStatus.FAILED,))] == ["b1"]
    anchored = await store.update_anchor(
        "b1", AnchorStatus.ANCHORED, network="n", transaction="0xt", anchored_at=30.0
    )
    assert anchored is not None and (anchored.anchor_transaction, anchored.anchored_at) == (
        "0xt",
        30.0,
    )
    assert await store.update_anchor("b1", AnchorStatus.PENDING) is None  # final
    assert await store.update_anchor("b2", AnchorStatus.ANCHORED) is None  # NONE is final
    assert await store.update_anchor("nope", AnchorStatus.ANCHORED) is None
    assert [x.batch_id for x in await store.receipt_batches()] == ["b1", "b2"]
    assert await store.receipt_batches(()) == []
    assert await store.get_receipt_batch("b1") == anchored


# --- workers and task names ------------------------------------------------------------------


async def test_workers_keep_their_verified_agent_id_and_task_names_are_pruned(
    store: Store,
) -> None:
    await store.record_worker_seen("w1", 1, 1.0, "7")
    await store.record_worker_seen("w1", 2, 2.0, "")  # a session with no agent id
    await store.record_task_names(["a", "b", "c"], 10.0, keep=3)
    await store.record_task_names(["d", "a"], 11.0, keep=3)
    assert await store.task_names(10) == ["a", "d", "b"]
    assert await store.task_name_known("b") and not await store.task_name_known("c")
    await store.record_task_names(["b"], 12.0, keep=3)
    assert await store.task_names(2) == ["b", "a"]
    # its agent id (the payout address) survived the reconnect
    await _settled(store, 1, "w1")
    [due] = await store.payouts_due("eip155:31337", 1, 0.0, 10)
    assert due.agent_id == "7"


async def test_pass_locks_let_one_store_run_each_pass(store_factory: StoreFactory) -> None:
    """A lone store always holds its pass locks; two stores on one database (several
    coordinators: PostgreSQL) never hold one at once."""
    first, second = await store_factory.open(), await store_factory.open()
    async with first.pass_lock("jobs-sweep") as held:
        assert held and await first.pass_still_held("jobs-sweep")
        async with second.pass_lock("jobs-sweep") as other:
            assert other is (store_factory.engine == "sqlite")  # SQLite: one process
            # the holder is fenced in, the other store is not (PostgreSQL)
            assert await second.pass_still_held("jobs-sweep") is other
        assert await first.pass_still_held("jobs-sweep")
    async with second.pass_lock("jobs-sweep") as held:
        assert held
