"""The SDK's paid route on real local chains (test_tracks.py's fixtures: anvil with
Dispatch's contracts, and the LiteSVM Solana node): the chain preference picks the
coordinator and the wallet, x402 payments move test USDC (read on chain), spending limits
refuse before anything is signed, payment failures are typed, and a job no worker took is
cancelled, so never charged, before the hosted fallback runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import chain_fixtures
import pytest
from chain_fixtures import cluster_for
from conftest import Cluster, wait_until
from test_payments import new_payer
from test_sdk import job_ids
from test_sdk_hosted import ARTICLE, PRICES, AnthropicServer
from test_tracks import Track, _evm, _solana, evm_chain, solana_chain  # noqa: F401
from x402.http.utils import encode_payment_required_header

from dispatch.v1 import coordinator_pb2
from dispatchnet.client import task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.payments.wallet import Wallet
from dispatchnet.sdk import (
    ComputeRouter,
    InvalidRequest,
    Network,
    PaymentDeclined,
    PaymentRejected,
    PaymentRequired,
    RelayedPayment,
    SpendingLimitExceeded,
    SpendingLimits,
    types,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

home = chain_fixtures.home
PRICE = 1000  # a CHEAP task, micro-USD = test USDC atomic units on both chains
ECHO = '{"text": "hi"}'


@pytest.fixture
def evm(home: Path, evm_chain: dict[str, Any]) -> Track:  # noqa: F811
    return _evm(home, evm_chain)


def network(track: Track, cluster: Cluster, **kw: Any) -> Network:
    """The track's network as a user builds it: from its profile, at the test coordinator."""
    return Network.from_profile(track.profile(True), [cluster.address], **kw)


def router(*nets: Network, **kw: Any) -> ComputeRouter:
    kw.setdefault("hosted", [])
    kw.setdefault("key", KeyPair.generate())
    return ComputeRouter(list(nets), **kw)


async def settled(r: ComputeRouter, job_id: str) -> None:
    async def done() -> bool:
        return (await r.get_job(job_id)).payment.status == "settled"

    await wait_until(done, 30, "the payment settled")


async def test_the_chain_preference_picks_the_coordinator_and_the_wallet(
    home: Path,
    evm_chain: dict[str, Any],  # noqa: F811
    solana_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    evm, svm = _evm(home, evm_chain), _solana(home, solana_chain)
    payers = {"monad": evm.wallet().address, "solana": svm.wallet().address}
    start = {"monad": evm.balance(payers["monad"]), "solana": svm.balance(payers["solana"])}
    async with (
        cluster_for(evm.profile(True), tmp_path / "evm") as on_evm,
        cluster_for(svm.profile(True), tmp_path / "svm") as on_svm,
    ):
        await on_evm.worker()
        await on_svm.worker()
        nets = [network(evm, on_evm), network(svm, on_svm)]
        assert [n.name for n in nets] == ["monad", "solana"]
        async with router(*nets) as r:
            on_solana = await r.run_task("echo", ECHO, chain="solana")
            on_monad = await r.run_task("echo", ECHO, chain="monad")
            for result, chain, cluster in (
                (on_solana, solana_chain, on_svm),
                (on_monad, evm_chain, on_evm),
            ):
                assert result.route == "dispatch" and result.coordinator == cluster.address
                assert result.payment is not None
                assert result.payment.network == chain["network"]
                assert result.payment.payer == payers[result.network]
                assert result.payment.amount == str(PRICE)
                assert result.receipt_body is not None
                assert result.receipt_body.payment.network == chain["network"]
                await settled(r, result.job_id)
            assert (on_solana.network, on_monad.network) == ("solana", "monad")
            assert r.spent_micros == 2 * PRICE
    assert evm.balance(payers["monad"]) == start["monad"] - PRICE
    assert svm.balance(payers["solana"]) == start["solana"] - PRICE


async def test_spending_limits_refuse_before_paying(evm: Track, tmp_path: Path) -> None:
    payer = evm.wallet().address
    start = evm.balance(payer)
    async with cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
        await cluster.worker()
        net = network(evm, cluster)
        async with router(net, limits=SpendingLimits(per_job_micros=PRICE - 1)) as r:
            with pytest.raises(SpendingLimitExceeded) as e:
                await r.run_task("echo", ECHO)
            assert (e.value.scope, e.value.price_micros, e.value.http_status) == ("job", PRICE, 402)
        async with router(net) as r:
            with pytest.raises(SpendingLimitExceeded):
                await r.run_task("echo", ECHO, max_price_micros=PRICE - 1)
        assert job_ids(cluster) == []  # nothing was committed, nothing signed
        assert evm.balance(payer) == start

        limits = SpendingLimits(per_job_micros=PRICE, per_session_micros=PRICE + PRICE // 2)
        async with router(net, limits=limits) as r:
            first = await r.run_task("echo", ECHO)
            with pytest.raises(SpendingLimitExceeded) as e:
                await r.run_task("echo", ECHO)
            assert e.value.scope == "session" and r.spent_micros == PRICE
            await settled(r, first.job_id)
        assert len(job_ids(cluster)) == 1
    assert evm.balance(payer) == start - PRICE


async def test_payment_failures_are_typed(
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    async with cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
        await cluster.worker()
        async with router(Network("monad", [cluster.address])) as r:
            with pytest.raises(PaymentRequired) as required:
                await r.run_task("echo", ECHO)
        capped = Wallet.of_deployment(evm_chain, max_per_job_micros=PRICE - 1)
        async with router(Network("monad", [cluster.address], capped)) as r:
            with pytest.raises(PaymentDeclined, match="more than the"):
                await r.run_task("echo", ECHO)
        broke = new_payer(evm_chain, amount=0)
        async with router(Network("monad", [cluster.address], broke)) as r:
            with pytest.raises(PaymentRejected) as rejected:
                await r.run_task("echo", ECHO)
    assert required.value.http_status == 402
    assert "insufficient" in rejected.value.reason
    assert evm.balance(broke.address) == 0


async def test_a_paid_job_no_worker_takes_is_released_before_the_hosted_fallback(
    evm: Track, tmp_path: Path
) -> None:
    claude = AnthropicServer(reply="The town flooded and volunteers helped.")
    payer = evm.wallet().address
    try:
        async with cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
            await cluster.worker(max_concurrency=1)  # busy with a long job below
            blocker = cluster.client(wallet=evm.wallet())
            busy = await blocker.submit(task_spec("sleep", b'{"ms": 30000}'))

            async def running() -> bool:
                job = await blocker.get(busy.job_id)
                return job.state == coordinator_pb2.JOB_STATE_RUNNING

            await wait_until(running, 10, "the blocker running")
            start = evm.balance(payer)
            async with router(
                network(evm, cluster), hosted=[claude.provider()], prices=PRICES
            ) as r:
                result = await r.run_task("summarize", ARTICLE, pickup_timeout=0.5)
                (skip,) = result.skipped
                job = await r.get_job(skip.job_id)
                assert skip.reason == "not_picked_up"
                assert job.state == types.JobState.CANCELLED
                assert job.payment.status == "released"  # authorized, never settled
                assert r.spent_micros == result.price.amount_micros  # the hosted estimate
            await blocker.cancel(busy.job_id)
        assert result.route == "anthropic"
        assert result.json() == {"summary": claude.reply}
        assert evm.balance(payer) == start
    finally:
        claude.close()


async def test_a_call_cancelled_while_its_commit_is_in_flight_cancels_its_job(
    evm: Track, tmp_path: Path
) -> None:
    """The caller goes away while CommitJob is in flight, after the coordinator made the
    (paid) job but before its answer came back: the call knows no job id, and the job
    would run and be charged. The SDK finds it by its idempotency key, paying nothing
    more, and cancels it: its payment is released, never settled."""
    payer = evm.wallet().address
    async with cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
        await cluster.worker(max_concurrency=1)  # busy with a long job: ours waits
        blocker = cluster.client(wallet=evm.wallet())
        busy = await blocker.submit(task_spec("sleep", b'{"ms": 30000}'))
        jobs = cluster.coord.jobs
        real = jobs.commit
        made: list[Any] = []
        answered, release = asyncio.Event(), asyncio.Event()

        async def commit(*args: Any, **kwargs: Any) -> Any:
            job, created = await real(*args, **kwargs)
            made.append(job)
            if len(made) == 1:  # the first answer is held back: the caller goes first
                answered.set()
                await release.wait()
            return job, created

        jobs.commit = commit  # type: ignore[method-assign]
        start = evm.balance(payer)
        async with router(network(evm, cluster)) as r:
            call = asyncio.create_task(r.run_task("echo", ECHO))
            await answered.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        job_id = made[0].job_id
        assert [j.job_id for j in made] == [job_id, job_id]  # found again by its key
        assert cluster.db.get_job(job_id).state.name == "CANCELLED"

        async def released() -> bool:
            payment = cluster.db.get_payment(job_id)
            return payment is not None and payment.status.value == "released"

        await wait_until(released, 30, "the payment released")
        await blocker.cancel(busy.job_id)
    assert evm.balance(payer) == start


async def test_a_relayed_payment_is_the_callers_own(
    evm: Track,
    evm_chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """payer=RelayedPayment: a gateway passes on its caller's payment unchanged, learns the
    price without one, and never pays itself (its network has no wallet)."""
    caller = new_payer(evm_chain)
    start = evm.balance(caller.address)
    async with cluster_for(evm.profile(True), tmp_path / "coord") as cluster:
        await cluster.worker()
        async with router(Network("monad", [cluster.address])) as r:
            probe = RelayedPayment()
            with pytest.raises(PaymentDeclined, match="the payer will not pay"):
                await r.run_task("echo", ECHO, payer=probe)
            assert probe.required is not None and not probe.sent
            assert job_ids(cluster) == []  # nothing was committed
            (offer,) = probe.required.accepts
            assert (offer.amount, offer.pay_to) == (str(PRICE), evm.payee)

            signature = caller.pay(encode_payment_required_header(probe.required))
            relay = RelayedPayment(signature)
            result = await r.run_task("echo", ECHO, payer=relay)
            assert relay.sent and result.payment is not None
            assert result.payment.payer == caller.address
            assert result.receipt_body is not None
            assert result.receipt_body.payment.payer == caller.address
            await settled(r, result.job_id)

            again = RelayedPayment(signature)  # a replay: refused, asked for again
            with pytest.raises(PaymentDeclined, match="refused the caller's payment"):
                await r.run_task("echo", ECHO, payer=again)
            assert again.sent and again.required is not None
            assert again.required.error == "payment_already_used"
        with pytest.raises(InvalidRequest):
            RelayedPayment.from_payload({"x402Version": 2})
    assert evm.balance(caller.address) == start - PRICE
