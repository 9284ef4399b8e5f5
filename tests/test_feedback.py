"""ERC-8004 feedback and on-chain reputation on a local anvil chain (EVM track items 4, 5).

Agents are registered directly with web3 from fresh funded accounts (not the coordinator's,
which may not rate its own agents). The worker runtime's agent id registration (another
change) is not used: the test puts the agent id on the hub's session for the worker (and
on the in-process Worker's verified_agent_id, which its receipts carry, when it has one).
The chain fixtures (one anvil for this module) come from chain_fixtures.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import chain_fixtures
import pytest
from chain_fixtures import chain_profile, cluster_for, funded_chain_key, unreachable_proxy
from conftest import Cluster, wait_until
from test_chain import complete

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatch.v1 import coordinator_pb2
from dispatchnet.chains.evm.deploy import load_artifact
from dispatchnet.chains.evm.node import web3_for
from dispatchnet.chains.evm.reputation import reputation_contract
from dispatchnet.client import task_spec
from dispatchnet.coordinator.models import FeedbackStatus
from dispatchnet.devchain.anvil import _rpc
from dispatchnet.profiles import Profile
from dispatchnet.reputation.erc8004 import Erc8004Reputation
from dispatchnet.worker.runtime import Worker

FAILED = coordinator_pb2.JOB_STATE_FAILED

# one anvil for this module (module-scoped fixtures, see chain_fixtures.py)
home = chain_fixtures.home
chain = chain_fixtures.chain


def register_agent(chain: dict[str, Any], owner_key: str = "") -> int:
    """A new ERC-8004 agent owned by owner_key (default: a fresh funded account)."""
    w3 = web3_for(chain["rpc_url"], 5)
    if not owner_key:
        owner_key = "0x" + bytes(w3.eth.account.create().key).hex()
    owner = w3.eth.account.from_key(owner_key)
    _rpc(chain["rpc_url"], "anvil_setBalance", [owner.address, hex(10**18)], timeout=5)
    identity = w3.eth.contract(
        address=chain["contracts"]["identity_registry"], abi=load_artifact("IdentityRegistry").abi
    )
    fn = identity.functions.register("https://example.com/agent.json")
    agent_id = int(fn.call({"from": owner.address}))
    tx = fn.build_transaction(
        {
            "from": owner.address,
            "nonce": w3.eth.get_transaction_count(owner.address, "pending"),
            "chainId": w3.eth.chain_id,
        }
    )
    tx_hash = w3.eth.send_raw_transaction(owner.sign_transaction(tx).raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)["status"] == 1
    return agent_id


def set_agent(cluster: Cluster, worker: Worker, agent_id: int) -> str:
    """Gives the worker's session (and its receipts) the agent id; the worker id."""
    worker_id = worker.key.public_key.hex()
    cluster.coord.hub.sessions[worker_id].agent_id = str(agent_id)
    if hasattr(worker, "verified_agent_id"):
        worker.verified_agent_id = str(agent_id)
    return worker_id


def entries(cluster: Cluster, status: FeedbackStatus) -> list[Any]:
    return cluster.db.feedback_entries((status,))


def feedback_profile(deployment: str, **chain_settings: Any) -> Profile:
    return chain_profile(deployment, **chain_settings).with_overrides(
        jobs={"time_limit_seconds": 1, "max_attempts": 1},
        reputation={"source": "erc8004", "cache_ttl_seconds": 0, "prior": 0.5},
    )


async def test_feedback_lands_on_chain_and_moves_the_cached_score(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    coordinator = chain["accounts"]["coordinator"]["address"]
    agent = register_agent(chain)
    own_agent = register_agent(chain, chain["accounts"]["coordinator"]["private_key"])
    profile = feedback_profile(str(home / "chains" / "local-monad.json"))
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        assert cluster.coord.feedback is not None
        cluster.coord.feedback.tick = 0.1
        rep = cluster.coord.jobs.reputation
        assert isinstance(rep, Erc8004Reputation)
        worker = await cluster.worker()
        worker_id = set_agent(cluster, worker, agent)
        other_id = "00" * 32  # no agent id: the prior
        assert rep.score(worker_id) == rep.score(other_id) == 0.5
        c = cluster.client()
        await complete(c, 2, "rated")
        await wait_until(lambda: len(entries(cluster, FeedbackStatus.SENT)) == 2, 20, "2 sent")
        await rep.refresh(agent)
        # Bayesian: (2 * 100/100 + 3 * 0.5) / (2 + 3), seconds old (no decay to speak of)
        assert rep.score(worker_id) == pytest.approx(0.7, rel=1e-4)
        assert rep.score(worker_id) > rep.score(other_id) == 0.5

        # a job that runs past its time limit on the worker fails: negative feedback
        job = await c.submit(task_spec("sleep", b'{"ms": 3000}'))
        done = await c.wait(job.job_id)
        assert done.state == FAILED and done.failure.code in (
            "max_attempts_exceeded",
            "time_limit_exceeded",
        )
        await wait_until(lambda: len(entries(cluster, FeedbackStatus.SENT)) == 3, 20, "3 sent")
        assert rep.score(worker_id) < 0.7  # nudged locally by record() already
        await rep.refresh(agent)
        assert rep.score(worker_id) == pytest.approx((2 * 1 + 0 + 1.5) / 6, rel=1e-4)

        # the coordinator owns this agent: giveFeedback reverts, the entry is "failed"
        set_agent(cluster, worker, own_agent)
        await complete(c, 1, "self")
        await wait_until(lambda: entries(cluster, FeedbackStatus.FAILED), 20, "a failed entry")
        (failed,) = entries(cluster, FeedbackStatus.FAILED)
        assert failed.agent_id == own_agent and "revert" in failed.error

    registry = reputation_contract(
        web3_for(chain["rpc_url"], 5), chain["contracts"]["reputation_registry"]
    )
    assert registry.functions.getClients(agent).call() == [coordinator]
    values = [registry.functions.readFeedback(agent, coordinator, i).call() for i in (1, 2, 3)]
    assert values == [
        [100, 0, "successRate", "task", False],
        [100, 0, "successRate", "task", False],
        [0, 0, "successRate", "task", False],
    ] or [tuple(v) for v in values] == [
        (100, 0, "successRate", "task", False),
        (100, 0, "successRate", "task", False),
        (0, 0, "successRate", "task", False),
    ]
    count, value, decimals = registry.functions.getSummary(
        agent, [coordinator], "successRate", ""
    ).call()
    assert count == 3 and value / 10**decimals == pytest.approx(200 / 3, abs=1)
    assert registry.functions.getClients(own_agent).call() == []


async def test_feedback_waits_for_the_chain_and_lands_exactly_once(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    key_file = tmp_path / "coordinator-chain.key"
    address = funded_chain_key(chain, key_file)
    agent = register_agent(chain)
    proxy = await unreachable_proxy(chain)
    profile = chain_profile(
        "",
        devchain="",
        rpc_url=proxy.url,
        reputation_registry=chain["contracts"]["reputation_registry"],
        key_file=str(key_file),
        rpc_timeout_seconds=2,
    )
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        sender = cluster.coord.feedback
        assert sender is not None
        sender.tick, sender.retry_initial, sender.retry_max = 0.1, 0.1, 0.3
        worker = await cluster.worker()
        set_agent(cluster, worker, agent)
        c = cluster.client()
        started = time.monotonic()
        await complete(c, 2, "outage")  # jobs do not wait for the chain
        assert time.monotonic() - started < 5
        await wait_until(lambda: "connection refused" in sender.last_error, 10, "chain error")
        assert len(entries(cluster, FeedbackStatus.PENDING)) == 2

        await proxy.start()
        try:
            await wait_until(lambda: len(entries(cluster, FeedbackStatus.SENT)) == 2, 20, "2 sent")
            # sending an entry again (a retry after a lost receipt) finds it on chain
            sent = entries(cluster, FeedbackStatus.SENT)
            poster = sender.poster
            assert await poster.give(sent[0]) == sent[0].transaction
        finally:
            await proxy.stop()
    registry = reputation_contract(
        web3_for(chain["rpc_url"], 5), chain["contracts"]["reputation_registry"]
    )
    assert registry.functions.getLastIndex(agent, address).call() == 2
    await asyncio.sleep(0)


def _poster(chain: dict[str, Any], tmp_path: Path, gas_limit: int) -> Any:
    from dispatchnet.chains.evm.node import resolve_evm_chain
    from dispatchnet.chains.evm.reputation import EvmFeedbackPoster

    key_file = tmp_path / "feedback-chain.key"
    if not key_file.exists():
        funded_chain_key(chain, key_file)
    cfg = chain_profile(
        "",
        devchain="",
        rpc_url=chain["rpc_url"],
        reputation_registry=chain["contracts"]["reputation_registry"],
        key_file=str(key_file),
    ).chain
    return EvmFeedbackPoster(resolve_evm_chain(cfg), gas_limit=gas_limit)


def _entry(agent: int, job_id: str) -> Any:
    from dispatchnet.coordinator.models import FeedbackEntry

    return FeedbackEntry(
        job_id=job_id,
        agent_id=agent,
        value=100,
        value_decimals=0,
        tag1="successRate",
        tag2="task",
        feedback_uri=f"dispatch://test/jobs/{job_id}",
        feedback_hash=bytes(32),
        created_at=time.time(),
    )


async def test_feedback_that_runs_out_of_gas_is_retried_not_failed(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    # The reference registries cost more gas for an agent's first feedback than later ones;
    # a transaction that runs out of gas changed nothing and must be retried, not written off.
    from dispatchnet.errors import Unavailable

    agent = register_agent(chain)
    poster = _poster(chain, tmp_path, gas_limit=1_000_000)
    real = poster.estimate
    poster.estimate = lambda fn: 40_000  # too little: the transaction runs out of gas
    with pytest.raises(Unavailable, match="ran out of gas"):
        await poster.give(_entry(agent, "job_oog"))
    poster.estimate = real
    tx = await poster.give(_entry(agent, "job_oog"))
    assert tx.startswith("0x")
    registry = reputation_contract(
        web3_for(chain["rpc_url"], 5), chain["contracts"]["reputation_registry"]
    )
    assert registry.functions.getLastIndex(agent, poster.address).call() == 1


async def test_feedback_above_the_gas_cap_stays_pending_until_the_cap_is_raised(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    from dispatchnet.errors import Unavailable

    agent = register_agent(chain)
    low = _poster(chain, tmp_path, gas_limit=60_000)
    with pytest.raises(Unavailable, match=r"needs \d+ gas; \[feedback\] gas_limit is 60000"):
        await low.give(_entry(agent, "job_cap"))
    high = _poster(chain, tmp_path, gas_limit=1_000_000)
    fn = high.contract.functions.giveFeedback(
        agent, 100, 0, "successRate", "task", "", "u", bytes(32)
    )
    gas = high.estimate(fn)
    assert gas < 1_000_000  # the estimate plus the margin is sent, not the cap
    assert (await high.give(_entry(agent, "job_cap"))).startswith("0x")


async def test_a_trusted_reviewer_listed_twice_counts_once(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    from dispatchnet.chains.evm.node import resolve_evm_chain
    from dispatchnet.chains.evm.reputation import EvmReputationReader

    agent = register_agent(chain)
    poster = _poster(chain, tmp_path, gas_limit=1_000_000)
    await poster.give(_entry(agent, "job_dup"))
    reviewer = str(poster.address)
    cfg = chain_profile(
        "",
        devchain="",
        rpc_url=chain["rpc_url"],
        reputation_registry=chain["contracts"]["reputation_registry"],
    ).chain
    reader = EvmReputationReader(
        resolve_evm_chain(cfg), [reviewer, reviewer.lower(), reviewer], "successRate"
    )
    assert reader.reviewers == [reviewer]
    assert reader.summary(agent) == (1, 100.0)
