"""Worker payouts on chain (payments/payouts.py's PayoutSender), for both chain kinds on
their local chains: a run's payouts move exactly their amounts, a payout sent twice pays
once, a crash between storing and sending (or sending and recording) is resolved by
status() without paying twice, a node outage is Unavailable and then goes through, and an
EVM authorization that expired unused is failed for good. On Solana, a payout whose
blockhash expired is signed anew only when the node proves it never landed: one the node's
history no longer reaches is held, and one that landed under another signature is found by
its memo (the coordinator's payout loop over a real store, on a node keeping 20
transactions).

A "crash" here is a new sender built from the profile that sees only what the caller
stored (the SignedPayout), as a restarted coordinator would."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chain_fixtures
import pytest
from chain_fixtures import _rpc, unreachable_proxy
from conftest import StoreFactory
from eth_account import Account
from solana.rpc.api import Client
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from test_earnings import WORKER, Ledger
from test_payouts import Clock
from test_tracks import Track, _evm, _solana, evm_chain, solana_chain  # noqa: F401
from web3.exceptions import ContractLogicError
from x402.mechanisms.svm import derive_ata

from dispatchnet.chains import registry
from dispatchnet.chains.evm.node import CHAIN_KEY_HEADER, load_abi, web3_for
from dispatchnet.chains.solana.node import SOLANA_KEY_HEADER, blockhash_valid
from dispatchnet.chains.solana.payouts import SolanaPayoutSender, unpack_raw
from dispatchnet.coordinator.models import PayoutRecord, PayoutRowState
from dispatchnet.coordinator.payouts import HELD_FIRST_SECONDS, PayoutService, _signed
from dispatchnet.devchain.solana_local import bootstrap
from dispatchnet.devchain.solana_node import NodeServer, SolanaNode
from dispatchnet.errors import Unavailable
from dispatchnet.payments.payouts import (
    MEMO_PREFIX,
    Payout,
    PayoutSender,
    PayoutState,
    SignedPayout,
)
from dispatchnet.profiles import PayoutsConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

home = chain_fixtures.home


@dataclass
class Rig:
    """A chain kind's payout sender, its asset, fresh worker addresses and balances."""

    track: Track
    asset: str
    new_address: Callable[[], str]

    def sender(self, tmp: Path, **chain: Any) -> PayoutSender:
        profile = self.track.profile(True, **chain)
        return registry.adapter_of(profile).payouts(profile, tmp)

    def balance(self, owner: str) -> int:
        profile = self.track.profile(True)
        return int(registry.adapter_of(profile).token_balance(profile, self.asset, owner))

    def payouts(self, amounts: list[int]) -> list[Payout]:
        return [Payout(_new_id(), self.new_address(), a, self.asset) for a in amounts]

    def through(self, proxy_url: str, key_file: Path) -> dict[str, Any]:
        """[chain] overrides for the coordinator's own account reaching the node at
        proxy_url."""
        accounts = self.track.chain["accounts"]["coordinator"]
        if self.track.kind == "evm":
            key_file.write_text(f"{CHAIN_KEY_HEADER}\n{accounts['private_key']}\n")
        else:
            key_file.write_text(f"{SOLANA_KEY_HEADER}\n{accounts['secret_key']}\n")
        _, chain = self.track.outage(key_file.parent / "unused.key", proxy_url)
        return {**chain, "key_file": str(key_file)}


def _new_id() -> str:
    return "0x" + os.urandom(32).hex()


@pytest.fixture(params=["evm", "solana"])
def rig(request: pytest.FixtureRequest, home: Path) -> Rig:
    kind = str(request.param)
    chain: dict[str, Any] = request.getfixturevalue(f"{kind}_chain")
    if kind == "evm":
        return _evm_rig(home, chain)
    return Rig(_solana(home, chain), chain["usdc"]["mint"], lambda: str(Keypair().pubkey()))


def _evm_rig(home: Path, chain: dict[str, Any]) -> Rig:
    return Rig(_evm(home, chain), chain["contracts"]["usdc"], lambda: str(Account.create().address))


def test_a_run_to_three_workers_moves_exactly_their_amounts(rig: Rig, tmp_path: Path) -> None:
    """On Solana the workers have no token account yet: each is created, at the
    coordinator's cost. On EVM the three go in one transaction."""
    payer = rig.track.payee
    sender = rig.sender(tmp_path)
    payouts = rig.payouts([1000, 2500, 7])
    start = rig.balance(payer)
    assert [rig.balance(p.to) for p in payouts] == [0, 0, 0]

    signed = sender.sign(payouts)
    assert [s.payout for s in signed] == payouts
    sent = sender.send(signed)

    assert {sent[p.payout_id].state for p in payouts} == {PayoutState.LANDED}
    transactions = {sent[p.payout_id].transaction for p in payouts}
    assert len(transactions) == (1 if rig.track.kind == "evm" else 3)
    assert [rig.balance(p.to) for p in payouts] == [1000, 2500, 7]
    assert rig.balance(payer) == start - 3507


def test_an_evm_run_larger_than_a_transaction_takes_is_split(
    home: Path,
    evm_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    rig = _evm_rig(home, evm_chain)
    sender = rig.sender(tmp_path)
    sender.max_per_transaction = 2  # type: ignore[attr-defined]
    payouts = rig.payouts([10, 20, 30, 40, 50])
    sent = sender.send(sender.sign(payouts))
    assert {s.state for s in sent.values()} == {PayoutState.LANDED}
    assert len({s.transaction for s in sent.values()}) == 3
    assert [rig.balance(p.to) for p in payouts] == [10, 20, 30, 40, 50]


def test_the_same_signed_payouts_sent_twice_pay_once(rig: Rig, tmp_path: Path) -> None:
    sender = rig.sender(tmp_path)
    payouts = rig.payouts([1200, 800])
    signed = sender.sign(payouts)
    first = sender.send(signed)
    again = sender.send(signed)
    assert again == first
    assert [rig.balance(p.to) for p in payouts] == [1200, 800]
    if rig.track.kind == "evm":
        # not only our batch's simulation: the token itself refuses a used nonce
        _refused_by_the_token(rig, signed[0])


def _refused_by_the_token(rig: Rig, signed: SignedPayout) -> None:
    raw = json.loads(signed.raw)
    w3 = web3_for(rig.track.chain["rpc_url"], 5)
    token = w3.eth.contract(address=raw["asset"], abi=load_abi("TestUSDC"))
    call = token.functions.transferWithAuthorization(
        raw["from"],
        raw["to"],
        raw["value"],
        raw["valid_after"],
        raw["valid_before"],
        bytes.fromhex(raw["nonce"][2:]),
        bytes.fromhex(raw["signature"][2:]),
    )
    with pytest.raises(ContractLogicError):
        call.call({"from": raw["from"]})


def test_signed_then_a_crash_before_send_is_found_missing_and_sent(
    rig: Rig, tmp_path: Path
) -> None:
    (payout,) = rig.payouts([3000])
    (stored,) = rig.sender(tmp_path).sign([payout])
    # restarted: only the stored signed payout is known
    sender = rig.sender(tmp_path)
    assert sender.status(stored).state is PayoutState.NOT_FOUND
    sent = sender.send([stored])[payout.payout_id]
    assert sent.state is PayoutState.LANDED
    assert sender.status(stored).state is PayoutState.LANDED
    assert rig.balance(payout.to) == 3000


def test_sent_then_a_crash_before_record_is_found_landed(rig: Rig, tmp_path: Path) -> None:
    (payout,) = rig.payouts([4000])
    first = rig.sender(tmp_path)
    (stored,) = first.sign([payout])
    sent = first.send([stored])[payout.payout_id]
    # restarted before recording the outcome: status finds it, nothing is sent again
    found = rig.sender(tmp_path).status(stored)
    assert (found.state, found.transaction) == (PayoutState.LANDED, sent.transaction)
    assert rig.balance(payout.to) == 4000
    if rig.track.kind == "solana":
        assert stored.transaction == sent.transaction  # known at signing: it is stored
        assert _memos(rig, payout.to) == {sent.transaction: f"{MEMO_PREFIX}{payout.payout_id}"}


def _memos(rig: Rig, address: str) -> dict[str, str]:
    """Signature -> memo of the transactions that name `address` and carry a payout memo."""
    entries = _rpc(rig.track.chain["rpc_url"], "getSignaturesForAddress", [address], 5)
    assert isinstance(entries, list)
    return {
        e["signature"]: e["memo"][e["memo"].index(MEMO_PREFIX) :]
        for e in entries
        if e["memo"] and MEMO_PREFIX in e["memo"]
    }


async def test_a_node_outage_is_unavailable_then_the_payouts_go_through(
    rig: Rig, tmp_path: Path
) -> None:
    proxy = await unreachable_proxy(rig.track.chain)
    chain = rig.through(proxy.url, tmp_path / "coordinator.key")
    payouts = rig.payouts([500, 600])
    sender = rig.sender(tmp_path, **chain)
    with pytest.raises(Unavailable):  # signing reads the chain too
        await asyncio.to_thread(sender.sign, payouts)
    await proxy.start()
    try:
        signed = await asyncio.to_thread(sender.sign, payouts)
        await proxy.stop()
        with pytest.raises(Unavailable):
            await asyncio.to_thread(sender.send, signed)
        with pytest.raises(Unavailable):
            await asyncio.to_thread(sender.status, signed[0])
        await proxy.start()
        sent = await asyncio.to_thread(sender.send, signed)
    finally:
        if proxy.server is not None:
            await proxy.stop()
    assert {s.state for s in sent.values()} == {PayoutState.LANDED}
    assert [rig.balance(p.to) for p in payouts] == [500, 600]


def test_an_evm_authorization_expired_unused_is_failed_for_good(
    home: Path,
    evm_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    rig = _evm_rig(home, evm_chain)
    (payout,) = rig.payouts([900])
    sender = rig.sender(tmp_path)
    sender.validity_seconds = 60  # type: ignore[attr-defined]
    (stored,) = sender.sign([payout])
    assert sender.status(stored).state is PayoutState.NOT_FOUND
    # the chain's clock moves past valid_before (later payouts sign against chain time)
    _rpc(evm_chain["rpc_url"], "evm_increaseTime", [61], timeout=5)
    _rpc(evm_chain["rpc_url"], "evm_mine", [], timeout=5)
    assert sender.status(stored).state is PayoutState.FAILED
    assert sender.send([stored])[payout.payout_id].state is PayoutState.FAILED
    assert rig.balance(payout.to) == 0


def test_a_solana_payout_whose_blockhash_expired_unsent_is_stale_and_signed_anew() -> None:
    """A fast node of its own (blockhashes valid for 20 slots of 10 ms)."""
    with NodeServer(SolanaNode(slot_seconds=0.01, validity_slots=20)) as server:
        data = bootstrap(server.rpc_url)
        coordinator = Keypair.from_base58_string(data["accounts"]["coordinator"]["secret_key"])
        sender = SolanaPayoutSender(server.rpc_url, coordinator, rpc_timeout=5, tx_timeout=10)
        worker = str(Keypair().pubkey())
        payout = Payout(_new_id(), worker, 650, data["usdc"]["mint"])
        (stale,) = sender.sign([payout])
        blockhash = str(unpack_raw(stale.raw)[0].message.recent_blockhash)
        deadline = time.monotonic() + 10
        while sender.status(stale).state is PayoutState.NOT_FOUND:
            assert time.monotonic() < deadline, f"the blockhash {blockhash} never expired"
            time.sleep(0.01)
        assert sender.status(stale).state is PayoutState.STALE  # never landed, never can
        assert sender.send([stale])[payout.payout_id].state is PayoutState.STALE
        (fresh,) = sender.sign([payout])  # same payout id and memo, a new transaction
        assert fresh.transaction != stale.transaction
        landed = sender.send([fresh])[payout.payout_id]
        assert (landed.state, landed.transaction) == (PayoutState.LANDED, fresh.transaction)
        # the payout has landed (its memo says where): the stale signing of it says so too
        assert sender.status(stale) == landed
        balance = Client(server.rpc_url).get_token_account_balance(
            Pubkey.from_string(derive_ata(worker, payout.asset))
        )
        assert balance.value.amount == "650"


# -- Solana: a node that keeps 20 transactions -------------------------------------------

HISTORY = 20  # transactions the node keeps (its --history)
SOLANA_NETWORK = "solana:local"  # the store's name of the payouts' network
AMOUNT = 4200


@dataclass
class ShortHistory:
    """A fast local Solana node keeping only HISTORY transactions (10 ms slots, blockhashes
    valid for 100: a second), the coordinator's payout sender on it, and a store in which a
    registered worker (agent "7") is owed AMOUNT of the node's USDC."""

    url: str
    sender: SolanaPayoutSender
    mint: str
    worker: str  # its Solana address
    ledger: Ledger
    clock: Clock

    def loop(self) -> PayoutService:
        """The coordinator's payout loop, as a (re)started coordinator builds it."""
        return PayoutService(
            self.ledger.store,
            self.sender,
            {"7": self.worker}.get,
            SOLANA_NETWORK,
            PayoutsConfig(min_payout_micros=1, interval_seconds=10),
            clock=self.clock,
        )

    async def signed_payout(self, loop: PayoutService) -> PayoutRecord:
        """The worker's payout recorded and signed, its artifact stored: nothing sent."""
        [due] = await self.ledger.store.payouts_due(SOLANA_NETWORK, 1, self.clock.now, 10)
        record = await loop._record(due, self.clock.now)
        assert record is not None
        [signed] = await loop._sign([record])
        return signed

    async def payout(self) -> PayoutRecord:
        [p] = await self.ledger.store.payouts(WORKER, 10)
        return p

    def received(self) -> int:
        """The worker's USDC on chain (0 while it has no token account)."""
        info = _rpc(self.url, "getAccountInfo", [derive_ata(self.worker, self.mint),
                                                 {"encoding": "jsonParsed"}], 5)  # fmt: skip
        value = info["value"]  # type: ignore[index]
        return 0 if value is None else int(value["data"]["parsed"]["info"]["tokenAmount"]["amount"])

    def push_out_of_history(self, transaction: str = "") -> None:
        """More than HISTORY transactions (airdrops) land after `transaction`, so the
        node no longer has it."""
        for _ in range(HISTORY + 5):
            _rpc(self.url, "requestAirdrop", [str(Keypair().pubkey()), 1], 5)
        if transaction:
            gone = _rpc(self.url, "getSignatureStatuses",
                        [[transaction], {"searchTransactionHistory": True}], 5)  # fmt: skip
            assert gone["value"] == [None]  # type: ignore[index]

    def wait_expired(self, p: PayoutRecord) -> None:
        blockhash = str(unpack_raw(p.raw)[0].message.recent_blockhash)
        deadline = time.monotonic() + 10
        while blockhash_valid(self.url, blockhash, 5):
            assert time.monotonic() < deadline, f"the blockhash {blockhash} never expired"
            time.sleep(0.01)

    def ledger_from(self) -> int:
        slot = _rpc(self.url, "minimumLedgerSlot", [], 5)
        assert isinstance(slot, int)
        return slot


@pytest.fixture
async def short_history(
    ledgers: Callable[..., Awaitable[Ledger]], store_factory: StoreFactory
) -> AsyncIterator[ShortHistory]:
    node = SolanaNode(slot_seconds=0.01, validity_slots=100, history_limit=HISTORY)
    with NodeServer(node) as server:
        data = await asyncio.to_thread(bootstrap, server.rpc_url)
        coordinator = Keypair.from_base58_string(data["accounts"]["coordinator"]["secret_key"])
        sender = SolanaPayoutSender(server.rpc_url, coordinator, rpc_timeout=5, tx_timeout=10)
        mint = data["usdc"]["mint"]
        ledger, clock = await ledgers(), Clock()
        old = clock.now - 3600
        await ledger.store.record_worker_seen(WORKER, 1, old, "7")
        await store_factory.execute(
            "INSERT INTO worker_earnings (worker_id, network, asset, earned, paid, unpaid_since)"
            " VALUES (?,?,?,?,0,?)",
            WORKER, SOLANA_NETWORK, mint, AMOUNT, old,
        )  # fmt: skip
        yield ShortHistory(server.rpc_url, sender, mint, str(Keypair().pubkey()), ledger, clock)


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "never-sent"])
async def test_a_solana_payout_the_node_no_longer_remembers_is_held_not_paid_again(
    short_history: ShortHistory, landed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The payout is signed and stored; then either it is sent and lands and the
    coordinator dies before recording it, or the coordinator dies before sending it. More
    transactions than the node keeps follow, and its blockhash expires. Whether it landed
    cannot be told any more: the restarted coordinator must not sign it anew (that paid a
    landed payout twice); it holds it, signed, and looks again only after a back-off."""
    h = short_history
    stored = await h.signed_payout(h.loop())
    if landed:
        sent = await asyncio.to_thread(h.sender.send, [_signed(stored)])
        assert sent[stored.payout_id].state is PayoutState.LANDED  # (never recorded)
    assert h.received() == (AMOUNT if landed else 0)
    await asyncio.to_thread(h.push_out_of_history, stored.transaction)
    await asyncio.to_thread(h.wait_expired, stored)

    restarted = h.loop()
    with caplog.at_level(logging.WARNING, "dispatch.payouts"):
        await restarted.run_pass()
        await restarted.run_pass()  # at once: its back-off has not run out
    assert h.received() == (AMOUNT if landed else 0)  # never paid twice (nor at all)
    # (the node's history starts after the slot the payout was signed at)
    assert h.ledger_from() > unpack_raw(stored.raw)[1]  # type: ignore[operator]
    held = await h.payout()
    assert (held.state, held.raw, held.transaction) == (
        PayoutRowState.SIGNED, stored.raw, stored.transaction,
    )  # fmt: skip
    assert held.error.startswith("unknown: not found, but the node's history starts at slot")
    warnings = [r for r in caplog.records if r.name == "dispatch.payouts"]
    assert len(warnings) == 1 and stored.payout_id in warnings[0].getMessage()
    assert restarted.last_error == ""  # the other payouts go on: no back-off of the loop

    # looked up again after the back-off: still held, still not paid again
    h.clock.now += HELD_FIRST_SECONDS + 1
    await restarted.run_pass()
    assert (await h.payout()).updated_at == h.clock.now
    assert h.received() == (AMOUNT if landed else 0)
    assert (await h.payout()).state is PayoutRowState.SIGNED


async def test_a_solana_payout_that_landed_under_another_signature_is_found_by_its_memo(
    short_history: ShortHistory,
) -> None:
    """The payout landed, then (as the coordinator did before it checked the node's
    history) it was signed anew and that second transaction stored, never sent. The stored
    signature is not found and its blockhash expired, but the worker's token account has a
    transaction of the coordinator with the payout's memo: it landed there, once."""
    h = short_history
    loop = h.loop()
    first = await h.signed_payout(loop)
    await asyncio.to_thread(h.sender.send, [_signed(first)])
    await asyncio.to_thread(time.sleep, 0.05)  # a later slot: a new blockhash
    [second] = await loop._sign([first])  # stored in place of the first
    assert second.transaction != first.transaction
    await asyncio.to_thread(h.wait_expired, second)

    status = await asyncio.to_thread(h.sender.status, _signed(second))
    assert (status.state, status.transaction) == (PayoutState.LANDED, first.transaction)
    await h.loop().run_pass()
    done = await h.payout()
    assert (done.state, done.transaction) == (PayoutRowState.LANDED, first.transaction)
    assert h.received() == AMOUNT


async def test_a_solana_payout_proven_never_landed_is_signed_anew_and_paid_once(
    short_history: ShortHistory,
) -> None:
    """The node has dropped older transactions, but none since the payout was signed:
    its history covers every slot the payout could have landed in, so not finding it
    proves it never did, and it is signed anew (same payout id) and paid, once."""
    h = short_history
    early = _rpc(h.url, "requestAirdrop", [str(Keypair().pubkey()), 1], 5)
    await asyncio.to_thread(h.push_out_of_history, str(early))
    stored = await h.signed_payout(h.loop())  # the coordinator dies before sending it
    await asyncio.to_thread(h.wait_expired, stored)
    status = await asyncio.to_thread(h.sender.status, _signed(stored))
    assert status.state is PayoutState.STALE

    await h.loop().run_pass()
    paid = await h.payout()
    assert paid.payout_id == stored.payout_id and paid.state is PayoutRowState.LANDED
    assert paid.transaction != stored.transaction
    assert h.received() == AMOUNT
    # (the node's history starts after genesis, but no later than the payout's signing)
    assert 0 < h.ledger_from() <= unpack_raw(stored.raw)[1]  # type: ignore[operator]
