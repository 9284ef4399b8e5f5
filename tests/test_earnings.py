"""Workers earn (issue 11): each settled payment credits its worker with the amount minus
the coordinator's fee, in the same store transaction as the settlement, exactly once; and
the worker (only) reads its ledger through GetEarnings."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Cluster
from test_cli import cli_env, failed, ok_json, run

from dispatch.v1 import coordinator_pb2
from dispatchnet import keys
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import (
    Balance,
    JobSpec,
    JobState,
    JobType,
    Payment,
    PaymentStatus,
    Policy,
    Privacy,
    Split,
)
from dispatchnet.keys import KeyPair
from dispatchnet.payments.service import PaymentService, SettlementRefused
from dispatchnet.profiles import JobsConfig, PaymentsConfig, PayoutsConfig, PricingConfig
from dispatchnet.receipts.notary import Notary
from dispatchnet.reputation.local import LocalReputation
from dispatchnet.server import Coordinator
from dispatchnet.store.base import Store
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.store.threaded import ThreadedStore

SPEC_BYTES = b"\x12\x06\n\x04echo"
SPEC = JobSpec(
    JobType.TASK,
    Policy.CHEAP,
    Privacy.PUBLIC,
    "echo",
    "",
    SPEC_BYTES,
    hashlib.sha256(SPEC_BYTES).digest(),
)
WORKER = "ab" * 32


class FakeGateway:
    """Settles and refunds in memory: what the chain says is scripted per job."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.settled: list[str] = []
        self.reverting: set[str] = set()  # jobs whose refunds revert
        self.refunds: list[str] = []  # jobs a refund was signed for

    def describe(self) -> str:
        return "fake"

    def settle_batch(self, payments: list[Payment]) -> dict[str, str | SettlementRefused]:
        out: dict[str, str | SettlementRefused] = {}
        for p in payments:
            self.settled.append(p.job_id)
            out[p.job_id] = (
                SettlementRefused("insufficient_funds") if p.job_id in self.refuse else "0xtx"
            )
        return out

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        self.refunds.append(payment.job_id)
        return "raw", "0xrefund"

    def refund_status(self, payment: Payment) -> bool | None:
        return payment.job_id not in self.reverting

    def broadcast_refund(self, payment: Payment) -> bool | None:
        return True

    def close(self) -> None:
        pass


def payment(amount: int, settle_by: float, network: str = "eip155:31337") -> Payment:
    now = time.time()
    return Payment(
        job_id="",
        network=network,
        asset="0xusdc" if network.startswith("eip155") else "mint",
        pay_to="0xcoordinator",
        payer="0xclient",
        amount=amount,
        authorization_id="0x"
        + hashlib.sha256(str(now).encode() + KeyPair.generate().public_key).hexdigest(),
        valid_before=settle_by + 60,
        settle_by=settle_by,
        payload_json="{}",
        requirement_json="{}",
        status=PaymentStatus.AUTHORIZED,
        created_at=now,
        updated_at=now,
    )


class Ledger:
    """A store (closed by the `ledgers` fixture), job and payment services over a fake chain."""

    def __init__(self, store: Store, fee_bps: int = 1000) -> None:
        self.store = store
        self.jobs = JobService(
            self.store,
            JobsConfig(),
            PricingConfig(),
            Notary(KeyPair.generate()),
            LocalReputation(self.store),
        )
        self.gateway = FakeGateway()
        self.payments = PaymentService(
            self.store,
            self.jobs,
            self.gateway,  # type: ignore[arg-type]
            PaymentsConfig(settle_max_wait_seconds=0),
            JobsConfig(),
            payouts=PayoutsConfig(fee_bps=fee_bps),
        )
        self.n = 0

    async def commit(
        self, amount: int, settle_by: float | None = None, network: str = "eip155:31337"
    ) -> str:
        self.n += 1
        quote = await self.jobs.quote(SPEC)
        job, _ = await self.jobs.commit(
            "client",
            quote.quote_id,
            f"k{self.n}",
            payment(amount, settle_by if settle_by is not None else time.time() + 3600, network),
        )
        return job.job_id

    async def finish(self, job_id: str, state: JobState) -> None:
        changes: dict[str, Any] = {"state": state, "worker_id": WORKER}
        assert await self.store.transition(job_id, [JobState.QUEUED], None, changes, None)

    async def status(self, job_id: str) -> PaymentStatus:
        p = await self.store.get_payment(job_id)
        assert p is not None
        return p.status

    async def credited(self) -> dict[str, int]:
        return {e.job_id: e.share for e in await self.store.earnings(WORKER, 100) if not e.reversed}


def test_the_split_rounds_the_fee_down_and_gives_the_odd_unit_to_the_worker() -> None:
    assert Split.of(1_000_000, 1000) == Split(1000, 100_000, 900_000)
    assert Split.of(999, 1000) == Split(1000, 99, 900)
    assert Split.of(7, 0) == Split(0, 0, 7)
    assert Split.of(7, 10000) == Split(10000, 7, 0)


async def test_only_settled_payments_credit_their_worker_once(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers(fee_bps=1000)
    completed = await ledger.commit(1_000_001)
    failed_job = await ledger.commit(500)
    refused = await ledger.commit(700)
    ledger.gateway.refuse.add(refused)
    for job_id, state in (
        (completed, JobState.COMPLETED),
        (failed_job, JobState.FAILED),
        (refused, JobState.COMPLETED),
    ):
        await ledger.finish(job_id, state)
    await ledger.payments.settle_due()

    assert await ledger.status(completed) is PaymentStatus.SETTLED
    assert await ledger.status(failed_job) is PaymentStatus.RELEASED
    assert await ledger.status(refused) is PaymentStatus.FAILED
    # price minus 10%, rounded down for the coordinator: the worker gets the odd unit
    assert await ledger.credited() == {completed: 1_000_001 - 100_000}
    [earning] = await ledger.store.earnings(WORKER, 100)
    assert (earning.amount, earning.fee, earning.fee_bps) == (1_000_001, 100_000, 1000)
    assert await ledger.store.balances([WORKER, "cd" * 32]) == {
        WORKER: [(await ledger.store.balances([WORKER]))[WORKER][0]]
    }
    [bal] = (await ledger.store.balances([WORKER]))[WORKER]
    assert (bal.network, bal.asset, bal.earned) == ("eip155:31337", "0xusdc", 900_001)

    # a retried settlement record (e.g. after a crash) never credits twice
    p = await ledger.store.get_payment(completed)
    assert p is not None
    again = await ledger.store.update_payment(
        completed, (PaymentStatus.SETTLED,), {"error": ""}, credit=Split.of(p.amount, 1000)
    )
    assert again is not None
    assert len(await ledger.store.earnings(WORKER, 100)) == 1
    assert await ledger.credited() == {completed: 900_001}


async def test_an_early_settlement_credits_at_completion_and_a_refund_credits_nothing(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    # the Solana path (and EVM's closing window): settled early (HELD) while the job runs
    ledger = await ledgers()
    done = await ledger.commit(2000, settle_by=time.time() - 1)
    dropped = await ledger.commit(3000, settle_by=time.time() - 1)
    await ledger.payments.settle_due()
    assert await ledger.status(done) is PaymentStatus.HELD
    assert await ledger.status(dropped) is PaymentStatus.HELD
    assert await ledger.credited() == {}  # money arrived, but no job completed yet

    await ledger.finish(done, JobState.COMPLETED)
    await ledger.finish(dropped, JobState.CANCELLED)
    await ledger.payments.settle_due()
    assert await ledger.status(done) is PaymentStatus.SETTLED
    assert await ledger.status(dropped) is PaymentStatus.REFUNDED
    assert await ledger.credited() == {done: 1800}
    assert len(await ledger.store.earnings(WORKER, 100)) == 1


async def test_a_refund_that_keeps_reverting_holds_up_no_settlement(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    # e.g. the coordinator's account is short of the token: that refund waits its own
    # back-off, while a completed job's payment (newer, so after it in the pass) settles
    ledger = await ledgers()
    stuck = await ledger.commit(3000, settle_by=time.time() - 1)
    await ledger.payments.settle_due()
    assert await ledger.status(stuck) is PaymentStatus.HELD
    await ledger.finish(stuck, JobState.CANCELLED)
    ledger.gateway.reverting.add(stuck)
    done = await ledger.commit(2000)
    await ledger.finish(done, JobState.COMPLETED)

    await ledger.payments.settle_due()
    assert await ledger.status(done) is PaymentStatus.SETTLED
    assert await ledger.status(stuck) is PaymentStatus.REFUND_DUE
    assert ledger.gateway.refunds == [stuck]
    await ledger.payments.settle_due()  # within its back-off: no new refund sent (gas)
    assert ledger.gateway.refunds == [stuck]

    ledger.gateway.reverting.clear()  # the account is funded again
    ledger.payments.retry_initial = 0.0
    await ledger.payments.settle_due()
    assert await ledger.status(stuck) is PaymentStatus.REFUNDED


async def test_a_refund_after_a_credit_reverses_it(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    # the store's rule, whatever moves the payment: a refund reverses the job's credit
    ledger = await ledgers()
    job_id = await ledger.commit(1000)
    await ledger.finish(job_id, JobState.COMPLETED)
    settled = await ledger.store.update_payment(
        job_id,
        (PaymentStatus.AUTHORIZED,),
        {"status": PaymentStatus.SETTLED, "updated_at": time.time()},
        credit=Split.of(1000, 1000),
    )
    assert settled is not None and await ledger.credited() == {job_id: 900}
    refunded = await ledger.store.update_payment(
        job_id,
        (PaymentStatus.SETTLED,),
        {"status": PaymentStatus.REFUNDED, "updated_at": time.time()},
    )
    assert refunded is not None
    assert await ledger.credited() == {}
    [earning] = await ledger.store.earnings(WORKER, 100)
    assert earning.reversed
    assert await ledger.store.balances([WORKER]) == {}


async def test_lifetime_totals_follow_credits_and_reversals_without_reading_the_ledger(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers(fee_bps=500)
    jobs = [
        await ledger.commit(1000),
        await ledger.commit(3000),
        await ledger.commit(2000, network="solana:x"),
    ]
    for job_id in jobs:
        await ledger.finish(job_id, JobState.COMPLETED)
    await ledger.payments.settle_due()
    refunded = await ledger.store.update_payment(
        jobs[1], (PaymentStatus.SETTLED,), {"status": PaymentStatus.REFUNDED}
    )
    assert refunded is not None

    # ListWorkers is public: it reads one running total per worker and asset, never the
    # (ever-growing) ledger of credits
    read: set[str] = set()

    def note(action: int, table: str | None, *_: Any) -> int:
        if action == 20 and table:  # SQLITE_READ
            read.add(table)
        return 0  # SQLITE_OK

    def balances(db: SqliteStore) -> list[Balance]:
        db._conn.set_authorizer(note)
        try:
            return db.balances([WORKER])[WORKER]
        finally:
            db._conn.set_authorizer(None)

    if isinstance(ledger.store, ThreadedStore):  # SQLite says which tables a query reads
        await ledger.store.run_read(balances)
        assert read == {"worker_earnings"}
    totals = (await ledger.store.balances([WORKER]))[WORKER]
    assert [(b.network, b.earned) for b in totals] == [("eip155:31337", 950), ("solana:x", 1900)]
    by_asset: dict[str, int] = {}
    for e in await ledger.store.earnings(WORKER, 100):
        if not e.reversed:
            by_asset[e.network] = by_asset.get(e.network, 0) + e.share
    assert by_asset == {b.network: b.earned for b in totals}


@pytest.mark.parametrize("fee_bps", [-1, 10001])
def test_a_fee_outside_0_to_10000_bps_is_refused(fee_bps: int) -> None:
    from dispatchnet.profiles import Profile, ProfileError

    with pytest.raises(ProfileError, match="fee_bps"):
        Profile().with_overrides(payouts={"fee_bps": fee_bps})


# --- GetEarnings, ListWorkers and the CLI over a real coordinator ----------------------------


async def credit(coord: Coordinator, worker_id: str, amounts: list[int]) -> list[str]:
    """Jobs paid `amounts`, completed by worker_id and settled (by a PaymentService on the
    coordinator's store and job service, against an in-memory chain); their ids."""
    payments = PaymentService(
        coord.store,
        coord.jobs,
        FakeGateway(),  # type: ignore[arg-type]
        PaymentsConfig(settle_max_wait_seconds=0),
        JobsConfig(),
        payouts=PayoutsConfig(fee_bps=1000),
    )
    job_ids = []
    for n, amount in enumerate(amounts):
        quote = await coord.jobs.quote(SPEC)
        job, _ = await coord.jobs.commit(
            "client", quote.quote_id, f"k{n}", payment(amount, time.time() + 3600)
        )
        done = {"state": JobState.COMPLETED, "worker_id": worker_id}
        assert await coord.store.transition(job.job_id, [JobState.QUEUED], None, done, None)
        job_ids.append(job.job_id)
    assert await payments.settle_due() == len(amounts)
    return job_ids


async def test_only_the_worker_reads_its_earnings_and_list_workers_shows_them(
    cluster: Cluster, tmp_path: Path
) -> None:
    key_file = tmp_path / "worker.key"
    key = keys.load_or_create(key_file)
    worker_id = key.public_key.hex()
    # credited before the worker connects, so no job of ours is offered to it
    first, second = await credit(cluster.coord, worker_id, [1_000_000, 500_001])
    await cluster.worker(key=key)

    [info] = await cluster.client().list_workers()
    assert info.worker_id == worker_id
    [lifetime] = info.lifetime_earnings
    assert (lifetime.network, lifetime.asset) == ("eip155:31337", "0xusdc")
    assert lifetime.earned == lifetime.balance == str(900_000 + 450_001)

    mine = cluster.client(key)
    resp = await mine.earnings()
    assert resp.worker_id == worker_id and resp.fee_bps == 1000
    assert [b.earned for b in resp.balances] == ["1350001"]
    assert {j.job_id: (j.price, j.fee, j.share) for j in resp.jobs} == {
        first: ("1000000", "100000", "900000"),
        second: ("500001", "50000", "450001"),
    }
    assert not resp.next_page_token and not resp.payouts

    # paged, newest first
    page1 = await mine.earnings(page_size=1)
    page2 = await mine.earnings(page_size=1, page_token=page1.next_page_token)
    assert [j.job_id for j in (*page1.jobs, *page2.jobs)] == [j.job_id for j in resp.jobs]
    assert page1.next_page_token and not page2.next_page_token

    stub = mine.jobs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetEarnings(coordinator_pb2.GetEarningsRequest(page_token="not-a-token"))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED  # anonymous
    for bad in ("not-a-token", "x" * 129):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetEarnings(
                coordinator_pb2.GetEarningsRequest(page_token=bad), metadata=mine.metadata()
            )
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    other = cluster.client()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await other.jobs.GetEarnings(
            coordinator_pb2.GetEarningsRequest(worker_id=worker_id), metadata=other.metadata()
        )
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    theirs = await other.earnings()  # any key reads its own (empty) ledger
    assert not theirs.jobs and not theirs.balances

    # the CLI, signed with the worker's key file
    out = ok_json(
        await run(
            "worker",
            "earnings",
            "--coordinator",
            cluster.address,
            "--key-file",
            str(key_file),
            "--page-size",
            "1",
            "--all",
            env=cli_env(tmp_path / "home"),
        )
    )
    assert out["worker_id"] == worker_id
    assert out["balances"] == [
        {"network": "eip155:31337", "asset": "0xusdc", "earned": "1350001", "balance": "1350001"}
    ]
    assert [(j["job_id"], j["share"]) for j in out["jobs"]] == [
        (j.job_id, j.share) for j in resp.jobs
    ]
    assert out["fee_bps"] == 1000
    # a key file that is not there is not created (it would have earned nothing)
    missing = tmp_path / "nope.key"
    err = failed(
        await run(
            "worker",
            "earnings",
            "--coordinator",
            cluster.address,
            "--key-file",
            str(missing),
            env=cli_env(tmp_path / "home"),
        ),
        code=2,
    )
    assert "no worker key file" in err and not missing.exists()


def test_a_payout_on_the_wire_names_its_address_id_and_time() -> None:
    """What a worker needs to find a payout on chain: the address paid, the payout id (EVM:
    the EIP-3009 nonce; Solana: the memo), when it was recorded, and its transaction."""
    from dispatchnet.api.convert import earnings_to_proto
    from dispatchnet.coordinator.earnings import EarningsPage
    from dispatchnet.coordinator.models import PayoutRecord, PayoutRowState

    record = PayoutRecord(
        payout_id="0x" + "5a" * 32,
        worker_id=WORKER,
        network="eip155:31337",
        asset="0xusdc",
        to="0x" + "77" * 20,
        amount=900,
        state=PayoutRowState.LANDED,
        raw="signed",
        transaction="0x" + "aa" * 32,
        created_at=1_700_000_000.25,
        updated_at=1_700_000_001.0,
    )
    page = EarningsPage(WORKER, [], [], "", 1000, [record])
    [p] = earnings_to_proto(page).payouts
    assert (p.amount, p.network, p.asset, p.transaction, p.state) == (
        "900",
        "eip155:31337",
        "0xusdc",
        "0x" + "aa" * 32,
        "landed",
    )
    assert (p.to, p.payout_id) == ("0x" + "77" * 20, "0x" + "5a" * 32)
    assert abs(p.created_at.ToNanoseconds() / 1e9 - 1_700_000_000.25) < 1e-6


def test_payout_addresses_on_chain_add_up_per_network_asset_and_address() -> None:
    """`dispatch worker earnings --profile`'s rows: landed payouts counted and summed, those
    in flight apart, failed ones not at all, payouts with no address left out; each
    address's balance read once, None for a network the profile has no chain on."""
    from dispatchnet.payments.earnings_check import PaidTo, addresses_on_chain

    a, b = "0x" + "77" * 20, "0x" + "88" * 20
    payouts = [
        PaidTo("eip155:1", "0xusdc", a, 500, "signed"),
        PaidTo("eip155:1", "0xusdc", a, 900, "landed"),
        PaidTo("eip155:1", "0xusdc", b, 300, "failed"),
        PaidTo("eip155:1", "0xusdc", a, 100, "landed"),
        PaidTo("eip155:1", "0xusdc", "", 700, "landed"),
        PaidTo("solana:x", "mint", "W1", 40, "pending"),
    ]
    reads: list[tuple[str, str, str]] = []

    def read(network: str, asset: str, address: str) -> int | None:
        reads.append((network, asset, address))
        return None if network == "solana:x" else 1234

    rows = addresses_on_chain(payouts, read)
    assert [(r["address"], r["landed_payouts"], r["landed_total"], r["in_flight_total"],
             r["balance"]) for r in rows] == [
        (a, 2, "1000", "500", "1234"),
        (b, 0, "0", "0", "1234"),
        ("W1", 0, "0", "40", None),
    ]  # fmt: skip
    assert reads == [
        ("eip155:1", "0xusdc", a),
        ("eip155:1", "0xusdc", b),
        ("solana:x", "mint", "W1"),
    ]
