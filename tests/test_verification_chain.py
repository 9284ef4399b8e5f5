"""Verification on a real anvil (README "Verification"): registered workers (ERC-8004 agents
proven at Connect), one of them lying (`--lie-rate 1`), paid verify jobs with x402 and the
test USDC. A majority: the client gets the right answer and pays three runs, the agreeing
workers split the worker share, the liar gets nothing, each run's spotCheck feedback lands on
chain exactly once, and after a refresh the erc8004 score matching uses puts the liar below a
new agent. No majority: the client is never charged (released, or refunded on chain when the
payment was settled early). The in-process rules are in test_verification.py.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
from chain_fixtures import chain, chain_profile, cluster_for, home  # noqa: F401
from conftest import Cluster, wait_until
from eth_account import Account
from test_payments import EARLY, balances, new_payer, payee, payment_status

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2
from dispatchnet.chains.evm.identity import fund_dev_account, register_worker
from dispatchnet.chains.evm.node import EvmChain, resolve_evm_chain, web3_for
from dispatchnet.chains.evm.reputation import reputation_contract
from dispatchnet.client import task_spec
from dispatchnet.coordinator import verification as verify
from dispatchnet.coordinator.models import VERIFY_REDUNDANT, FeedbackStatus, Split
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.reputation.erc8004 import Erc8004Reputation
from dispatchnet.worker.executors import Executor, default_executors
from dispatchnet.worker.lying import lying
from dispatchnet.worker.runtime import Worker

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED
TEXT = b'"the quick brown fox"'
RIGHT = b'{"words":4,"characters":19}'


def profile_for(home: Path, payments: dict[str, Any]) -> Profile:  # noqa: F811
    return chain_profile(
        str(home / "chains" / "local-monad.json"), payments=payments
    ).with_overrides(
        jobs={"queue_timeout_seconds": 2},
        reputation={"source": "erc8004", "cache_ttl_seconds": 0},
    )


def word_count(runs: int) -> common_pb2.JobSpec:
    spec = task_spec("word_count", TEXT)
    spec.verify = runs
    return spec


async def agent_worker(
    cluster: Cluster,
    evm: EvmChain,
    executors: list[Executor] | None = None,
    chain_key: str = "",
) -> tuple[Worker, int]:
    """A worker registered as a new ERC-8004 agent (owned by its own funded chain account,
    or by chain_key's), connected with the agent id it proves at Connect."""
    key = KeyPair.generate()
    if not chain_key:
        chain_key = "0x" + secrets.token_hex(32)
        await asyncio.to_thread(fund_dev_account, evm, Account.from_key(chain_key).address, 10**18)
    registered = await asyncio.to_thread(
        register_worker, evm, chain_key, key.public_key, name="test-worker",
        description="verification test", endpoint=cluster.address, timeout=10,
    )  # fmt: skip
    agent = str(registered["agent_id"])
    w = Worker(
        cluster.address, key, executors=executors, agent_id=agent, chain_key=chain_key,
        backoff_initial=0.05, backoff_max=0.5,
    )  # fmt: skip
    cluster.workers.append((w, asyncio.create_task(w.run())))
    await asyncio.wait_for(w.connected.wait(), 10)
    assert w.verified_agent_id == agent  # proven on chain at Connect
    return w, int(agent)


def prepared(cluster: Cluster, profile: Profile) -> tuple[EvmChain, Erc8004Reputation]:
    assert cluster.coord.payments is not None and cluster.coord.feedback is not None
    cluster.coord.payments.retry_initial, cluster.coord.payments.retry_max = 0.1, 0.3
    cluster.coord.feedback.tick = 0.1
    rep = cluster.coord.jobs.reputation
    assert isinstance(rep, Erc8004Reputation)
    return resolve_evm_chain(profile.chain), rep


def shares(cluster: Cluster, w: Worker) -> dict[str, int]:
    return {e.job_id: e.share for e in cluster.db.earnings(w.key.public_hex, 100) if not e.reversed}


async def test_a_lying_agent_is_outvoted_unpaid_and_rated_down_on_chain(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    coordinator = chain["accounts"]["coordinator"]["address"]
    profile = profile_for(home, {})
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        evm, rep = prepared(cluster, profile)
        (a, agent_a), (b, agent_b), (liar, agent_liar) = await asyncio.gather(
            agent_worker(cluster, evm),
            agent_worker(cluster, evm),
            agent_worker(cluster, evm, lying(default_executors(), 1.0)),
        )
        wallet = new_payer(chain)
        start_payer, start_payee = balances(chain, wallet.address, payee(chain))
        c = cluster.client(wallet=wallet)
        single = (await c.quote(word_count(0))).price.amount_micros
        job = await c.submit(word_count(3))
        assert job.payment.amount == str(3 * single)  # three runs
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED and done.result.output == RIGHT  # the majority's
        assert done.worker_id in (a.key.public_hex, b.key.public_hex)
        got = await c.receipt(job.job_id)
        checked = verify_receipt_message(got.receipt, cluster.coord.public_key)
        assert checked.valid, checked.problems
        assert checked.body is not None and checked.body.worker_agent_id == str(
            agent_a if done.worker_id == a.key.public_hex else agent_b
        )
        v = checked.body.verification
        assert v.mode == receipt_pb2.VERIFICATION_MODE_REDUNDANT and v.runs == 3
        assert set(v.agreeing_worker_keys) == {a.key.public_key, b.key.public_key}
        assert list(v.dissenting_worker_keys) == [liar.key.public_key]

        # paid once, for three runs; the agreeing workers split the share, the liar gets 0
        await payment_status(cluster, job.job_id, "settled")
        price = 3 * single
        assert balances(chain, wallet.address, payee(chain)) == [
            start_payer - price,
            start_payee + price,
        ]
        split = Split.of(price, profile.payouts.fee_bps)
        parts = split.among(VERIFY_REDUNDANT, 2)
        chosen, other = (a, b) if done.worker_id == a.key.public_hex else (b, a)
        assert shares(cluster, chosen) == {job.job_id: parts[0][1]}
        assert shares(cluster, other) == {job.job_id: parts[1][1]}
        assert parts[0][1] + parts[1][1] == split.share
        assert shares(cluster, liar) == {} and cluster.db.earnings(liar.key.public_hex, 100) == []

        # one spotCheck entry per run, on chain exactly once (no successRate for the job)
        def sent() -> list[Any]:
            return cluster.db.feedback_entries((FeedbackStatus.SENT,))

        await wait_until(lambda: len(sent()) == 3, 20, "3 spotCheck entries sent")
        assert {e.job_id.split("#")[0] for e in sent()} == {job.job_id}
        assert not cluster.db.feedback_entries((FeedbackStatus.PENDING, FeedbackStatus.FAILED))
        registry = reputation_contract(
            web3_for(chain["rpc_url"], 5), chain["contracts"]["reputation_registry"]
        )
        for agent, value in ((agent_a, 100), (agent_b, 100), (agent_liar, 0)):
            assert registry.functions.getLastIndex(agent, coordinator).call() == 1
            entry = registry.functions.readFeedback(agent, coordinator, 1).call()
            assert tuple(entry) == (value, 0, verify.SPOT_CHECK_TAG, "task", False)
            count, total, _ = registry.functions.getSummary(
                agent, [coordinator], verify.SPOT_CHECK_TAG, ""
            ).call()
            assert (count, total) == (1, value)
            assert (
                registry.functions.getSummary(agent, [coordinator], "successRate", "").call()[0]
                == 0
            )

        # the score matching uses, read back from the chain: the liar below a new agent
        fresh, agent_new = await agent_worker(cluster, evm)
        for agent in (agent_a, agent_b, agent_liar, agent_new):
            await rep.refresh(agent)
        prior = rep.params.prior
        assert rep.score(fresh.key.public_hex) == prior  # a new agent: the prior
        assert rep.score(liar.key.public_hex) == pytest.approx(prior / 21, rel=1e-3)
        assert rep.components(a.key.public_hex).agreement == 1.0
        listed = {w.worker_id: w.reputation for w in await c.list_workers()}
        assert listed[liar.key.public_hex] < listed[fresh.key.public_hex] / 10
        assert listed[a.key.public_hex] == listed[fresh.key.public_hex] == pytest.approx(prior)


@pytest.mark.parametrize(
    ("payments", "outcome"), [({}, "released"), (EARLY, "refunded")], ids=["released", "held"]
)
async def test_no_majority_is_never_charged(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    payments: dict[str, Any],
    outcome: str,
) -> None:
    """Two runs that disagree and no independent worker for the tiebreak: the job fails
    (verification_failed) and its payment is released, or, settled early while the job
    waited (a short authorization: the Solana-style held payment), refunded on chain."""
    profile = profile_for(home, payments)
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        evm, _ = prepared(cluster, profile)
        wallet = new_payer(chain)
        start = balances(chain, wallet.address, payee(chain))
        c = cluster.client(wallet=wallet)
        job = await c.submit(word_count(2))
        if outcome == "refunded":  # no worker yet: the payment is settled while it waits
            await payment_status(cluster, job.job_id, "held")
            assert balances(chain, wallet.address, payee(chain)) != start
        workers = await asyncio.gather(
            agent_worker(cluster, evm), agent_worker(cluster, evm, lying(default_executors(), 1))
        )
        done = await c.wait(job.job_id)
        assert done.state == FAILED and done.failure.code == verify.VERIFICATION_FAILED
        assert "not charged" in done.failure.message
        await payment_status(cluster, job.job_id, outcome)
        final = await c.get(job.job_id)
        if outcome == "refunded":
            assert final.payment.refund_transaction.startswith("0x")
        else:
            assert final.payment.transaction == ""
        assert balances(chain, wallet.address, payee(chain)) == start
        for w, _ in workers:
            assert cluster.db.earnings(w.key.public_hex, 100) == []
        # no majority, no verdict: nobody is rated for it
        assert cluster.db.feedback_entries() == []


async def test_agents_of_one_owner_do_not_verify_each_other(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two agents (two worker keys) owned by one chain account count as one worker for
    independence: a verify=2 job finds no second, independent worker and fails, not
    charged; a worker of another owner then makes the pair."""
    profile = profile_for(home, {})
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        evm, _ = prepared(cluster, profile)
        owner = "0x" + secrets.token_hex(32)
        await asyncio.to_thread(fund_dev_account, evm, Account.from_key(owner).address, 10**18)
        a, _ = await agent_worker(cluster, evm, chain_key=owner)
        b, _ = await agent_worker(cluster, evm, chain_key=owner)
        c = cluster.client(wallet=new_payer(chain))
        job = await c.submit(word_count(2))
        done = await c.wait(job.job_id)
        assert done.state == FAILED and done.failure.code == verify.NOT_ENOUGH_WORKERS
        (run,) = cluster.db.job_runs(job.job_id)
        assert run.worker_id in (a.key.public_hex, b.key.public_hex)
        other, _ = await agent_worker(cluster, evm)
        job = await c.submit(word_count(2))
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED and done.result.output == RIGHT
        runs = {r.worker_id for r in cluster.db.job_runs(job.job_id)}
        assert other.key.public_hex in runs and len(runs) == 2
