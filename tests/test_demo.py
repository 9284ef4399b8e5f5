"""`dispatch demo` end to end: a local anvil chain, real coordinator and worker subprocesses
on loopback, registered agents, on-chain feedback and an on-chain receipt check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dispatchnet.demo import run_demo
from dispatchnet.devchain.local_chain import pid_alive


async def test_demo_runs_all_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_demo() == 0

    out = capsys.readouterr().out
    for header in (
        "Scenario 1, public fast LLM:",
        "Scenario 2, public cheap task:",
        "Scenario 3, private task:",
    ):
        assert header in out
    assert "ran on the paired worker seeker-1: ok" in out
    llm = out.split("Scenario 1", 1)[1].split("Scenario 2", 1)[0]
    assert "tokens   " in llm and "desktop-1" in llm  # streamed, and run by the desktop
    summary = out.split("Summary", 1)[1]
    for scenario in ("public fast LLM", "public cheap task", "private task"):
        row = next(line for line in summary.splitlines() if line.strip().startswith(scenario + " "))
        assert "COMPLETED" in row and " settled " in row
        assert row.rstrip().endswith("valid")
    assert out.count("-> exit 0") == 4  # 3 offline verifies + 1 on-chain verify
    assert "All scenarios completed and were paid for on chain" in out

    # every job paid with x402 and settled once: balances read on chain before and after
    payments = out.split("Payments: test USDC on chain", 1)[1].split("Reputation after", 1)[0]
    payer = re.search(r"payer +([\d,.]+) USDC +([\d,.]+) USDC", payments)
    payee = re.search(r"payee +([\d,.]+) USDC +([\d,.]+) USDC", payments)
    assert payer is not None and payee is not None
    amount = [float(g.replace(",", "")) for g in (*payer.groups(), *payee.groups())]
    assert round(amount[0] - amount[1], 6) == round(amount[3] - amount[2], 6) == 0.012
    assert len(re.findall(r"USDC in 0x[0-9a-f]{64}", payments)) == 3
    assert "paid exactly the 0.012000 USDC its settled jobs cost, once each" in payments

    # the chain: started with a free port, and every worker registered and verified
    anvil = re.search(r"`dispatch chain up --profile local-monad --port 0`: .* pid (\d+)\)", out)
    assert anvil is not None
    for label in ("seeker-1", "seeker-2", "desktop-1"):
        registered = re.search(rf"{label} +agent #(\d+) +owner 0x[0-9a-fA-F]{{40}}", out)
        assert registered is not None
        assert re.search(rf"{label} +\w+ +id \w+ +agent #{registered.group(1)} \(verified\)", out)

    # reputation before (the prior) and after the feedback reached the chain
    before = re.search(r"reputation before (.*)\(ListWorkers, source erc8004\)", out)
    after = re.search(r"reputation after +(.*)\(ListWorkers, source erc8004\)", out)
    assert before is not None and after is not None
    assert before.group(1).split() == ["seeker-1", "0.50", "seeker-2", "0.50", "desktop-1", "0.50"]
    scores_after = dict(zip(*[iter(after.group(1).split())] * 2, strict=True))
    feedback = re.findall(
        r"(\S+) +agent #\d+: getSummary -> (\d+) feedbacks?, average (\S+) -> score (\S+)", out
    )
    assert sorted(label for label, *_ in feedback) == sorted(scores_after)
    assert sum(int(count) for _, count, _, _ in feedback) == 3  # one per job, all on chain
    for label, count, average, score in feedback:
        assert average == ("100" if int(count) else "-")  # completed: successRate 100
        assert scores_after[label] == score  # ListWorkers agrees with the chain
        assert (float(score) > 0.5) == (int(count) > 0)

    # one receipt checked on chain
    onchain = out.split("A receipt checked on chain", 1)[1].split("Summary", 1)[0]
    assert re.search(r"--onchain --profile local-monad` -> exit 0", onchain)
    assert re.search(r"root +0x[0-9a-f]{64}", onchain)
    assert re.search(r"anchor tx +0x[0-9a-f]{64} on eip155:31337", onchain)

    # cleaned up: the chain is down, anvil is gone and the scratch space removed
    assert "`dispatch chain down`: anvil (pid" in out
    assert not pid_alive(int(anvil.group(1)))
    scratch = re.search(r"scratch space: (\S+),", out)
    assert scratch is not None
    assert not Path(scratch.group(1)).exists()
