"""Workers are paid (issue 11): the payout loop over a real store and an in-memory chain.

One payout per worker and asset per run, of the whole unpaid balance, when it reaches
[payouts] min_payout_micros or its oldest credit waited interval_seconds; only workers with
a payout address (registered) are paid; a payout is recorded and signed before it is sent,
looked up on chain after a crash instead of being sent twice; a payout that fails for good
returns its amount to the balance. The real chains are in test_tracks.py."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from conftest import StoreFactory
from test_earnings import WORKER, Ledger

from dispatchnet.coordinator.models import JobState, PayoutRowState
from dispatchnet.coordinator.payouts import PAGE, PayoutService
from dispatchnet.errors import Unavailable
from dispatchnet.payments.payouts import (
    Payout,
    PayoutState,
    PayoutStatus,
    SignedPayout,
)
from dispatchnet.profiles import PayoutsConfig

NETWORK = "eip155:31337"
ADDRESS = "0x" + "77" * 20


class FakeChain:
    """A PayoutSender paying in memory: a payout id lands at most once (like the EIP-3009
    nonce); `down` makes every call Unavailable; `lose_reply` lands a send but raises (the
    reply lost, as in a crash right after sending)."""

    def __init__(self) -> None:
        self.paid: dict[str, tuple[str, int]] = {}  # payout id -> (to, amount)
        self.transfers: list[str] = []  # every payout id that moved money, in order
        self.signed: list[str] = []
        self.sends = 0
        self.down = False
        self.lose_reply = False
        self.refuse: set[str] = set()  # payout ids the chain refuses for good
        # recipients whose payouts the node will not take (a Solana token account its
        # owner handed to another: every send fails before it lands, for as long)
        self.unpayable: set[str] = set()

    def _up(self) -> None:
        if self.down:
            raise Unavailable("node down")

    def sign(self, payouts: list[Payout]) -> list[SignedPayout]:
        self._up()
        self.signed += [p.payout_id for p in payouts]
        return [SignedPayout(p, f"raw:{p.payout_id}", "") for p in payouts]

    def send(self, signed: list[SignedPayout]) -> dict[str, PayoutStatus]:
        self._up()
        self.sends += 1
        out = {}
        for s in signed:
            pid = s.payout.payout_id
            if pid in self.refuse:
                out[pid] = PayoutStatus(PayoutState.FAILED, reason="refused")
                continue
            if s.payout.to in self.unpayable:
                out[pid] = PayoutStatus(PayoutState.NOT_FOUND, reason="simulation failed")
                continue
            if pid not in self.paid:
                self.paid[pid] = (s.payout.to, s.payout.amount)
                self.transfers.append(pid)
            out[pid] = PayoutStatus(PayoutState.LANDED, f"tx:{pid}")
        if self.lose_reply:
            raise Unavailable("the reply was lost")
        return out

    def status(self, signed: SignedPayout) -> PayoutStatus:
        self._up()
        pid = signed.payout.payout_id
        if pid in self.paid:
            return PayoutStatus(PayoutState.LANDED, f"tx:{pid}")
        if pid in self.refuse:
            return PayoutStatus(PayoutState.FAILED, reason="refused")
        return PayoutStatus(PayoutState.NOT_FOUND)

    def received(self, to: str) -> int:
        return sum(amount for who, amount in self.paid.values() if who == to)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def service(
    ledger: Ledger,
    chain: FakeChain,
    addresses: dict[str, str],
    clock: Clock | None = None,
    **cfg: float,
) -> PayoutService:
    return PayoutService(
        ledger.store,
        chain,
        addresses.get,
        NETWORK,
        PayoutsConfig(**{"min_payout_micros": 1, "interval_seconds": 10, **cfg}),  # type: ignore[arg-type]
        clock=clock or time.time,
    )


async def earn(ledger: Ledger, amounts: list[int], agent_id: str = "7") -> int:
    """Jobs paid `amounts` completed by WORKER (connected with agent_id) and settled; the
    sum of its shares."""
    await ledger.store.record_worker_seen(WORKER, 1, time.time(), agent_id)
    jobs = [await ledger.commit(a) for a in amounts]
    for job_id in jobs:
        await ledger.finish(job_id, JobState.COMPLETED)
    await ledger.payments.settle_due()
    credited = await ledger.credited()
    return sum(credited[j] for j in jobs)


async def balance(ledger: Ledger) -> tuple[int, int]:
    [b] = (await ledger.store.balances([WORKER]))[WORKER]
    return b.earned, b.balance


async def test_n_paid_jobs_make_one_transfer_of_the_whole_balance(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    shares = await earn(ledger, [1000, 2000, 3000])
    assert shares == 5400
    assert await service(ledger, chain, {"7": ADDRESS}).run_pass() == 1
    assert len(chain.transfers) == 1 and chain.received(ADDRESS) == shares
    assert await balance(ledger) == (shares, 0)
    [p] = await ledger.store.payouts(WORKER, 10)
    assert (p.state, p.amount, p.to, p.transaction) == (
        PayoutRowState.LANDED,
        shares,
        ADDRESS,
        f"tx:{p.payout_id}",
    )
    # nothing more to pay: the next run sends nothing
    assert await service(ledger, chain, {"7": ADDRESS}).run_pass() == 0
    assert len(chain.transfers) == 1


async def test_a_worker_with_no_payout_address_accrues_until_it_registers(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    shares = await earn(ledger, [1000], agent_id="")  # never connected registered
    loop = service(ledger, chain, {"7": ADDRESS})
    assert await loop.run_pass() == 0
    assert chain.transfers == [] and await balance(ledger) == (shares, shares)
    # registered but the chain gives it no payout address (e.g. no Solana address linked):
    # looked up once, not on every run
    await ledger.store.record_worker_seen(WORKER, 1, time.time(), "8")
    asked: list[str] = []
    loop.address_of = lambda agent: asked.append(agent) or {"7": ADDRESS}.get(agent)
    assert await loop.run_pass() == 0 and chain.transfers == []
    assert await loop.run_pass() == 0 and asked == ["8"]
    # a session with no agent id keeps the verified one on record
    await ledger.store.record_worker_seen(WORKER, 1, time.time(), "7")
    await ledger.store.record_worker_seen(WORKER, 1, time.time(), "")
    assert await loop.run_pass() == 1
    assert chain.received(ADDRESS) == shares and await balance(ledger) == (shares, 0)


async def test_a_balance_under_the_minimum_waits_for_the_interval(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    clock = Clock()
    shares = await earn(ledger, [1000])
    loop = service(ledger, chain, {"7": ADDRESS}, clock, min_payout_micros=10**9)
    assert await loop.run_pass() == 0 and chain.transfers == []
    clock.now += 11  # the oldest unpaid credit waited interval_seconds
    assert await loop.run_pass() == 1
    assert chain.received(ADDRESS) == shares


async def test_a_send_whose_reply_was_lost_is_found_landed_after_a_restart(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    shares = await earn(ledger, [1000, 1000])
    chain.lose_reply = True  # money moved, then the coordinator heard nothing (crash)
    assert await service(ledger, chain, {"7": ADDRESS}).run_pass() == 0
    [p] = await ledger.store.payouts(WORKER, 10)
    assert p.state is PayoutRowState.SIGNED and p.raw  # signed and stored before sending
    assert await balance(ledger) == (shares, 0)  # pending counts as paid: never paid twice
    chain.lose_reply = False
    restarted = service(ledger, chain, {"7": ADDRESS})
    await restarted.run_pass()
    assert chain.sends == 1  # found on chain with status(), not sent again
    assert len(chain.transfers) == 1 and chain.received(ADDRESS) == shares
    [p] = await ledger.store.payouts(WORKER, 10)
    assert p.state is PayoutRowState.LANDED


async def test_a_node_outage_delays_the_payout_then_it_lands_once(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    shares = await earn(ledger, [2000])
    chain.down = True
    loop = service(ledger, chain, {"7": ADDRESS})
    assert await loop.run_pass() == 0
    [p] = await ledger.store.payouts(WORKER, 10)
    assert p.state is PayoutRowState.PENDING and loop.last_error == "node down"
    chain.down = False
    loop.recovered()  # (skip the backoff)
    await loop.run_pass()
    assert [q.state for q in await ledger.store.payouts(WORKER, 10)] == [PayoutRowState.LANDED]
    assert chain.signed == [p.payout_id] and chain.received(ADDRESS) == shares


async def test_a_payout_that_fails_for_good_returns_to_the_balance(
    ledgers: Callable[..., Awaitable[Ledger]],
) -> None:
    ledger = await ledgers()
    chain = FakeChain()
    shares = await earn(ledger, [1000])
    loop = service(ledger, chain, {"7": ADDRESS})
    original = chain.sign

    def refuse_first(payouts: list[Payout]) -> list[SignedPayout]:
        chain.refuse |= {p.payout_id for p in payouts}
        chain.sign = original  # type: ignore[method-assign]
        return original(payouts)

    chain.sign = refuse_first  # type: ignore[method-assign]
    assert await loop.run_pass() == 0  # (the failure backs off)
    [failed] = await ledger.store.payouts(WORKER, 10)
    assert failed.state is PayoutRowState.FAILED and failed.error == "refused"
    assert await balance(ledger) == (shares, shares) and chain.transfers == []
    # the loop backs off instead of a new failing payout every tick; then pays it anew,
    # under a new payout id
    assert loop.backing_off() and "refused" in loop.last_error
    assert await loop.run_pass() == 0
    loop.recovered()
    assert await loop.run_pass() == 1
    assert chain.received(ADDRESS) == shares and await balance(ledger) == (shares, 0)


async def test_workers_with_no_payout_address_never_hide_the_ones_behind(
    ledgers: Callable[..., Awaitable[Ledger]],
    store_factory: StoreFactory,
) -> None:
    """More registered workers than a page that the chain gives no address, all waiting
    longer: the payable worker behind them is still paid in the same run, and the next
    run asks the chain about none of them again."""
    ledger = await ledgers()
    chain = FakeChain()
    old = time.time() - 3600
    workers = [f"{i:064x}" for i in range(250)]
    for i, worker in enumerate(workers):
        await ledger.store.record_worker_seen(worker, 1, old, f"{1000 + i}")
    # balances with no credits behind them: a fixture written directly
    await store_factory.execute(
        "INSERT INTO worker_earnings (worker_id, network, asset, earned, paid, unpaid_since) "
        "VALUES " + ",".join(["(?,?,?,?,0,?)"] * len(workers)),
        *(v for worker in workers for v in (worker, NETWORK, "0xusdc", 900, old)),
    )
    shares = await earn(ledger, [1000])
    asked: list[str] = []

    def address_of(agent: str) -> str | None:
        asked.append(agent)
        return ADDRESS if agent == "7" else None

    loop = service(ledger, chain, {})
    loop.address_of = address_of
    assert await loop.run_pass() == 1
    assert chain.received(ADDRESS) == shares and len(asked) == 251
    assert await loop.run_pass() == 0 and len(asked) == 251


async def test_payouts_a_recipient_makes_unpayable_neither_pile_up_nor_hide_the_others(
    ledgers: Callable[..., Awaitable[Ledger]],
    store_factory: StoreFactory,
) -> None:
    """Workers whose payouts the node will not take (more than a page of them): each has
    one open payout at a time, not one more per credit; they are tried again only after a
    wait, so the passes over them are not full ones run back to back; and an honest
    payout, even one left signed and unsent by a crash, still lands."""
    ledger = await ledgers()
    chain = FakeChain()
    clock = Clock()
    old = clock.now - 3600
    bad = [f"{i:064x}" for i in range(150)]
    for i, worker in enumerate(bad):
        await ledger.store.record_worker_seen(worker, 1, old, f"{1000 + i}")
    await store_factory.execute(
        "INSERT INTO worker_earnings (worker_id, network, asset, earned, paid, unpaid_since) "
        "VALUES " + ",".join(["(?,?,?,?,0,?)"] * len(bad)),
        *(v for worker in bad for v in (worker, NETWORK, "0xusdc", 900, old)),
    )
    unpayable = "0x" + "66" * 20
    chain.unpayable.add(unpayable)
    addresses = {f"{1000 + i}": unpayable for i in range(len(bad))}
    loop = service(ledger, chain, {**addresses, "7": ADDRESS}, clock)
    # the honest worker's payout: recorded and signed, then the coordinator died
    shares = await earn(ledger, [1000])
    honest = await loop._record(
        (await ledger.store.payouts_due(NETWORK, 1, clock.now, 500))[-1], clock.now
    )
    assert honest is not None and honest.worker_id == WORKER
    assert len(await loop._sign([honest])) == 1
    clock.now += 1
    handled = [await loop.run_pass() for _ in range(3)]
    assert chain.received(ADDRESS) == shares  # landed
    assert handled[-1] < PAGE  # the stuck ones wait: no full pass again at once
    # more credits for the stuck workers make no second open payout
    await store_factory.execute("UPDATE worker_earnings SET earned = earned + 500")
    for _ in range(3):
        clock.now += loop.retry_max + 1
        await loop.run_pass()
    open_ = await ledger.store.open_payouts(NETWORK, 1000)
    assert len(open_) == len(bad) and len({p.worker_id for p in open_}) == len(bad)
    assert all(p.error == "simulation failed" for p in open_)


def test_each_network_payments_are_accepted_on_is_paid_out_on_its_own_chain() -> None:
    """registry.payment_profiles: the chains payout loops and the audit run on, one per
    accepted network in [[payments.accept]] order: local-solana's [chain], and its
    [identity_chain] once it accepts that network too."""
    import dataclasses

    from dispatchnet.chains import registry
    from dispatchnet.profiles import load_profile

    profile = load_profile("local-solana")
    [svm] = registry.payment_profiles(profile)
    assert svm.chain == profile.chain
    [accept] = profile.payments.accept
    on_identity = dataclasses.replace(accept, network=profile.identity_chain.network)
    both = profile.with_overrides(payments={"accept": [accept, on_identity]})
    assert [p.chain for p in registry.payment_profiles(both)] == [
        profile.chain,
        profile.identity_chain,
    ]
    assert registry.payment_profile(both, "eip155:1") is None
