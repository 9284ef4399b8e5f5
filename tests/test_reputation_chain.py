"""Reputation read from ERC-8004 feedback on a real local chain (anvil): only the trusted
reviewers count, time comes from the feedback's block, a spot-check disagreement drops a
score below a new agent's, revocations are honoured, and `dispatch chain reputation`
shows the parts. Feedback is given directly with web3 from fresh funded accounts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chain_fixtures
import pytest
from chain_fixtures import adispatch, chain_profile
from test_feedback import register_agent

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatchnet.chains import registry
from dispatchnet.chains.evm.node import web3_for
from dispatchnet.chains.evm.reputation import reputation_contract
from dispatchnet.devchain.anvil import _rpc
from dispatchnet.profiles import Profile
from dispatchnet.reputation.erc8004 import Erc8004Reputation
from dispatchnet.reputation.score import DAY, ScoreParams

home = chain_fixtures.home
chain = chain_fixtures.chain

P = ScoreParams()


class Reviewer:
    """A funded account that gives (and revokes) feedback."""

    def __init__(self, chain: dict[str, Any]) -> None:
        self.w3 = web3_for(chain["rpc_url"], 5)
        self.account = self.w3.eth.account.create()
        self.address = str(self.account.address)
        _rpc(chain["rpc_url"], "anvil_setBalance", [self.address, hex(10**18)], timeout=5)
        self.registry = reputation_contract(self.w3, chain["contracts"]["reputation_registry"])

    def _send(self, fn: Any) -> None:
        tx = fn.build_transaction(
            {
                "from": self.address,
                "nonce": self.w3.eth.get_transaction_count(self.address, "pending"),
                "chainId": self.w3.eth.chain_id,
            }
        )
        signed = self.account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        assert self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)["status"] == 1

    def give(self, agent: int, value: int, tag1: str = "successRate", n: int = 1) -> None:
        for _ in range(n):
            fn = self.registry.functions.giveFeedback(
                agent, value, 0, tag1, "task", "", "", bytes(32)
            )
            self._send(fn)

    def revoke(self, agent: int, index: int) -> None:
        self._send(self.registry.functions.revokeFeedback(agent, index))


def profile_for(home: Path, trusted: list[str]) -> Profile:
    return chain_profile(str(home / "chains" / "local-monad.json")).with_overrides(
        reputation={"source": "erc8004", "cache_ttl_seconds": 0, "trusted_reviewers": trusted}
    )


def source(profile: Profile, tmp_path: Path, agents: dict[str, int]) -> Erc8004Reputation:
    r = profile.reputation
    reader = registry.adapter_of(profile).summary_reader(
        profile, tmp_path, r.trusted_reviewers, "successRate"
    )
    return Erc8004Reputation(
        reader, lambda w: str(agents.get(w, "")), params=r.score_params(), ttl_seconds=0
    )


def later(chain: dict[str, Any], days: float) -> None:
    """Moves the chain's clock forward (the next block is that much later)."""
    _rpc(chain["rpc_url"], "evm_increaseTime", [int(days * DAY)], timeout=5)
    _rpc(chain["rpc_url"], "evm_mine", [], timeout=5)


async def test_only_trusted_reviewers_move_the_score(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    trusted, sybil = Reviewer(chain), Reviewer(chain)
    honest, target, fresh = register_agent(chain), register_agent(chain), register_agent(chain)
    rep = source(profile_for(home, [trusted.address]), tmp_path, {"h": honest, "t": target,
                                                                  "f": fresh})  # fmt: skip
    # the coordinator's own account is trusted too, the Sybil's never
    assert trusted.address in rep.reader.reviewers
    assert chain["accounts"]["coordinator"]["address"] in rep.reader.reviewers
    assert sybil.address not in rep.reader.reviewers

    trusted.give(honest, 100, n=3)
    sybil.give(honest, 0, n=5)  # a Sybil reviewer smearing an honest worker ...
    sybil.give(target, 100, n=8)  # ... and praising its own worker
    sybil.give(target, 100, "spotCheck", n=3)
    for agent in (honest, target, fresh):
        await rep.refresh(agent)
    assert rep.score("h") == pytest.approx((3 + 0.9) / 6, rel=1e-4)
    assert rep.score("t") == rep.score("f") == rep.score("nobody") == P.prior
    assert rep.components("t").evidence.success_weight == 0  # not even read

    # getSummary over the same reviewers agrees on what counts
    assert rep.reader.summary(honest) == (3, 100.0)


async def test_a_spot_check_disagreement_drops_a_score_below_a_new_agents(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    reviewer = Reviewer(chain)
    liar, newcomer = register_agent(chain), register_agent(chain)
    rep = source(profile_for(home, [reviewer.address]), tmp_path, {"l": liar, "n": newcomer})
    reviewer.give(liar, 100, n=6)  # it completes every job ...
    await rep.refresh(liar)
    before = rep.score("l")
    assert before > 0.6 > rep.score("n") == P.prior
    reviewer.give(liar, 0, "spotCheck")  # ... but a redundant run caught it lying
    await rep.refresh(liar)
    s = rep.components("l")
    assert s.agreement == pytest.approx(1 / 21, rel=1e-4)
    assert s.score < P.prior / 2 < before

    # a revoked spotCheck entry no longer counts (index 7: after six successRate entries)
    reviewer.revoke(liar, 7)
    await rep.refresh(liar)
    assert rep.score("l") == pytest.approx(before, rel=1e-4)


async def test_older_feedback_weighs_less_by_its_blocks_time(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    reviewer = Reviewer(chain)
    agent = register_agent(chain)
    rep = source(profile_for(home, [reviewer.address]), tmp_path, {"w": agent})
    reviewer.give(agent, 0, n=2)  # two failures ...
    await rep.refresh(agent)
    assert rep.components("w").evidence.success_weight == pytest.approx(2, rel=1e-4)
    later(chain, 2 * P.half_life_days)  # ... two half-lives ago
    reviewer.give(agent, 100, n=2)
    await rep.refresh(agent)  # reads only the new blocks; re-weighs everything
    e = rep.components("w").evidence
    assert e.success_weight == pytest.approx(2 * 0.25 + 2, rel=1e-3)
    assert e.success_sum == pytest.approx(2, rel=1e-3)
    assert rep.score("w") == pytest.approx((2 + 0.9) / (2.5 + 3), rel=1e-3)

    # the CLI shows the parts and each entry's weight, over the same reviewers
    rc, out, err = await adispatch(
        home, "chain", "reputation", str(agent), "--reviewer", reviewer.address
    )
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["score"] == pytest.approx(rep.score("w"), abs=1e-3)
    assert shown["success"]["rate"] == pytest.approx(rep.components("w").success, abs=1e-3)
    assert shown["spot_checks"]["agreement"] == 1.0
    assert shown["params"] == {
        "prior": 0.3, "prior_weight": 3, "half_life_days": 30, "spot_check_penalty": 20,
    }  # fmt: skip
    assert [round(e["weight"], 2) for e in shown["feedback"]] == [0.25, 0.25, 1.0, 1.0]
    assert {e["client"] for e in shown["feedback"]} == {reviewer.address}
    assert shown["summary"] == {"count": 4, "average": 50.0}
    rc, out, err = await adispatch(home, "chain", "reputation", "--", "-1")
    assert rc == 2 and "argument agent_id: must be between 0 and" in err, err  # usage
    assert "Traceback" not in err
