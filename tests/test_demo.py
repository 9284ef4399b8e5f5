"""`dispatch demo` end to end on both chain tracks: a local anvil chain and a local Solana
(LiteSVM) node, one coordinator per chain and real worker subprocesses on loopback; on the
EVM track registered agents, on-chain feedback and a lying worker outvoted; on each chain
real x402 payments with balances read on chain, and an on-chain receipt check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dispatchnet import demo
from dispatchnet.demo import run_demo
from dispatchnet.devchain.local_chain import is_anvil, pid_alive
from dispatchnet.devchain.solana_local import is_solana_node

SCENARIOS = ("public fast LLM", "public cheap task", "private task")
# (track, profile, network, a settlement transaction, a payer/payee address)
TRACKS = (
    ("EVM", "local-monad", "eip155:31337", r"0x[0-9a-f]{64}", r"0x[0-9a-fA-F]{40}"),
    (
        "Solana",
        "local-solana",
        "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
        r"[1-9A-HJ-NP-Za-km-z]{64,88}",
        r"[1-9A-HJ-NP-Za-km-z]{32,44}",
    ),
)


def check_track(text: str, profile: str, network: str, tx: str, address: str) -> int:
    """The steps every track shows; the pid of its local chain's node."""
    for n, scenario in enumerate(SCENARIOS, start=1):
        assert f"Scenario {n}, {scenario}:" in text
    assert "ran on the paired worker seeker-1: ok" in text
    llm = text.split("Scenario 1", 1)[1].split("Scenario 2", 1)[0]
    assert "tokens   " in llm and "desktop-1" in llm  # streamed, and run by the desktop
    assert text.count("-> exit 0") == 4  # 3 offline verifies + 1 on-chain verify
    for scenario in SCENARIOS:  # each job paid on this chain, then settled on it
        part = text.split(f", {scenario}:", 1)[1].split("\n\n", 1)[0]
        assert re.search(rf"paid +x402: [\d.]+ USDC signed by \S+ on {re.escape(network)} ", part)
        assert re.search(
            rf"settled +[\d.]+ USDC in {tx} +\((authorized -> )?(held -> )?settled\)", part
        )

    # every job paid with x402 and settled once, the workers' shares paid out (EVM: registered
    # agents) or shown as not yet paid (Solana: no agent id, no payout address); balances read
    # on chain before and after, and they add up exactly
    payments = text.split("Payments and payouts: test USDC on chain", 1)[1].split("\n\n", 1)[0]
    row = r" +([\d,.]+) USDC +([\d,.]+) USDC +"
    payer = re.search(rf"payer{row}{address}\n", payments)
    coordinator = re.search(rf"coordinator{row}{address} \(coordinator", payments)
    assert payer is not None and coordinator is not None
    amount = [float(g.replace(",", "")) for g in (*payer.groups(), *coordinator.groups())]
    assert round(amount[0] - amount[1], 6) == 0.012
    assert len(re.findall(rf"settled +.* USDC in {tx}\n", payments)) == 3
    add_up = re.search(
        r"payer paid (\d+) = fees kept (\d+) \+ shares paid (\d+) \+ shares not yet paid (\d+)",
        payments,
    )
    assert add_up is not None
    payer_paid, fees, shares, unpaid = map(int, add_up.groups())
    assert payer_paid == 12_000 and fees == 1_200  # 3 jobs of 4000 units, fee_bps 1000
    assert payer_paid == fees + shares + unpaid
    assert round(amount[3] - amount[2], 6) == (fees + unpaid) / 10**6  # on chain
    assert "they add up: the payer paid exactly the 0.012000 USDC" in payments
    workers = re.findall(rf"(seeker-\d|desktop-1){row}{address}\n", payments)
    payouts = re.findall(rf"payout +(\S+) +([\d.]+) USDC in {tx}\n", payments)
    # every worker is a registered agent, so every share reached its payout address
    assert shares == 10_800 and unpaid == 0 and "NOT YET PAID" not in payments
    assert sorted(label for label, *_ in workers) == ["desktop-1", "seeker-1", "seeker-2"]
    gained = sum(
        float(after.replace(",", "")) - float(b.replace(",", "")) for _, b, after in workers
    )
    assert round(gained, 6) == 0.0108  # read on chain
    assert round(sum(float(amount) for _, amount in payouts), 6) == 0.0108

    # one receipt checked on chain
    onchain = text.split("A receipt checked on chain", 1)[1]
    assert re.search(rf"--onchain --profile {profile}` -> exit 0", onchain)
    assert re.search(r"root +0x[0-9a-f]{64}", onchain)
    assert re.search(rf"anchor tx +{tx} on {re.escape(network)}", onchain)

    # the chain: started on a free port, and brought down at the end of the track
    node = re.search(rf"`dispatch chain up --profile {profile} --port 0`: .* pid (\d+)\)", text)
    assert node is not None
    assert re.search(
        rf"`dispatch chain down --profile {profile}`: .*\(pid {node[1]}\) stopped", text
    )
    return int(node.group(1))


async def test_demo_runs_all_scenarios_on_both_chains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "LINGER_SECONDS", 0.1)
    assert await run_demo() == 0

    out = capsys.readouterr().out
    evm = out.split("=== EVM track: profile local-monad", 1)[1].split("=== Solana track", 1)[0]
    solana = out.split("=== Solana track: profile local-solana", 1)[1].split("\nSummary\n", 1)[0]
    sections = {"EVM": evm, "Solana": solana}
    pids = [check_track(sections[name], *rest) for name, *rest in TRACKS]
    # by command line: a bare pid may already belong to another process (or thread) by now
    evm_node, solana_node = pids
    assert not (pid_alive(evm_node) and is_anvil(evm_node))
    assert not is_solana_node(solana_node)
    for section in sections.values():  # each coordinator's operator tools, while it runs
        assert re.search(
            r"operator dashboard \(live, read-only\): http://127\.0\.0\.1:\d+/#token=[\w-]{43}",
            section,
        )
        assert re.search(r"Prometheus metrics: http://127\.0\.0\.1:\d+/metrics", section)
        assert "the dashboard stays up 0.1s more" in section

    # a row per scenario per chain, each completed, settled, with a valid receipt
    summary = out.split("\nSummary\n", 1)[1]
    for chain, *_ in TRACKS:
        for scenario in SCENARIOS:
            row = re.search(
                rf"^  {chain} +{scenario} +job_\w+ +COMPLETED .* settled .*$", summary, re.M
            )
            assert row is not None, (chain, scenario)
            assert row.group(0).rstrip().endswith("valid")
    assert "All scenarios completed on every chain and were paid for on chain" in out
    # the client side is the SDK; a PRIVATE job before any pairing takes its hosted
    # fallback (llama.cpp's OpenAI-compatible server standing in for the provider)
    assert "dispatchnet.sdk.ComputeRouter" in out
    for chain, *_ in TRACKS:
        row = re.search(
            rf"^  {chain} +private task: hosted fallback +- +- +hosted \(openai, local stand-in\)"
            r" +- +\(hosted\)",
            summary,
            re.M,
        )
        assert row is not None, chain
    for section in sections.values():
        assert "no_paired_worker" in section
        assert "route    openai: a local llama.cpp server" in section

    # the EVM track: every worker registered and verified
    for label in ("seeker-1", "seeker-2", "desktop-1"):
        registered = re.search(rf"{label} +agent #(\d+) +owner 0x[0-9a-fA-F]{{40}}", evm)
        assert registered is not None
        assert re.search(rf"{label} +\w+ +id \w+ +agent #{registered.group(1)} \(verified\)", evm)
    # the Solana track: every worker registered on the identity chain with its Solana key,
    # verified, and paid at that Solana address; no reputation steps, and the track says so
    payouts = solana.split("Payments and payouts", 1)[1]
    for label in ("seeker-1", "seeker-2", "desktop-1"):
        registered = re.search(
            rf"{label} +agent #(\d+) +owner 0x[0-9a-fA-F]{{40}} +solana ([1-9A-HJ-NP-Za-km-z]+)",
            solana,
        )
        assert registered is not None
        assert re.search(rf"{label} +\w+ +id \w+ +agent #{registered[1]} \(verified\)", solana)
        assert re.search(rf"{label} +[\d,.]+ USDC +[\d,.]+ USDC +{registered[2]}\n", payouts)
    assert "reputation: rated on the identity chain, shown on the EVM track" in solana
    assert "reputation before" not in solana and "getSummary" not in solana

    # the EVM track's lying worker: registered with the others, started with --lie-rate 1,
    # outvoted by a verify=3 job (repeated until it is among the three picked), paid nothing,
    # rated spotCheck 0 on chain and scored below a new agent; the Solana track skips it
    liar = re.search(r"liar +agent #(\d+) +owner 0x[0-9a-fA-F]{40}.*started with --lie-rate 1", evm)
    assert liar is not None
    step = evm.split("A lying worker: outvoted by a verify=3 job", 1)[1].split("\n\n", 1)[0]
    assert re.search(
        rf"liar +seeker +id \w+ +agent #{liar[1]} \(verified\).*\(--lie-rate 1\)", step
    )
    caught = step.rsplit("route    dispatch:", 1)[1]  # the job that caught it
    assert "word_count with verify=3 at $0.003 (3 runs)" in caught
    assert re.search(
        r"runs +(seeker-\d|desktop-1) \(\w+\), (seeker-\d|desktop-1) \(\w+\) agree", caught
    )
    assert re.search(r"liar \(\w+\) dissented: outvoted 2 to 1", caught)
    assert "(the right answer: word_count run here gives the same)" in caught
    assert (
        "receipt  valid: both signatures, and the coordinator's record: REDUNDANT, 3 runs" in caught
    )
    assert re.search(
        r"settled +0\.003000 USDC in 0x[0-9a-f]{64} +\(authorized -> settled\)", caught
    )
    assert re.search(r"credited \S+ 0\.001350 USDC, \S+ 0\.001350 USDC, liar nothing", caught)
    assert re.search(
        rf"liar +agent #{liar[1]}: entry #1 by 0x\w+…\w+ in block \d+: spotCheck 0", step
    )
    # the two who agreed (an honest worker also rated by an earlier verify=3 job, one the
    # liar was not picked for, has more than one entry)
    agreed = re.findall(r"getSummary\(spotCheck\) -> \d+ entr(?:y|ies), average 100\n", step)
    assert len(agreed) == 2, step
    assert re.search(rf"liar +agent #{liar[1]}: score 0\.30 -> 0\.01 on chain", step)
    assert "ListWorkers 0.01, below a new agent's 0.3" in step
    assert "A lying worker outvoted (shown on the EVM track)" in solana
    assert re.search(
        r"^  EVM +verified task +job_\w+ +COMPLETED .* settled .* valid$", summary, re.M
    )
    assert not re.search(r"^  Solana +verified task", summary, re.M)

    # EVM reputation before (the prior) and after the feedback reached the chain
    before = re.search(r"reputation before (.*)\(ListWorkers, source erc8004\)", evm)
    after = re.search(r"reputation after +(.*)\(ListWorkers, source erc8004\)", evm)
    assert before is not None and after is not None
    # the prior: new agents start low
    assert before.group(1).split() == ["seeker-1", "0.30", "seeker-2", "0.30", "desktop-1", "0.30"]
    scores_after = dict(zip(*[iter(after.group(1).split())] * 2, strict=True))
    feedback = re.findall(
        r"(\S+) +agent #\d+: getSummary -> (\d+) feedbacks?, average (\S+) -> score (\S+)", evm
    )
    assert sorted(label for label, *_ in feedback) == sorted(scores_after)
    assert sum(int(count) for _, count, _, _ in feedback) == 3  # one per job, all on chain
    for label, count, average, score in feedback:
        assert average == ("100" if int(count) else "-")  # completed: successRate 100
        assert scores_after[label] == score  # ListWorkers agrees with the chain
        assert (float(score) > 0.3) == (int(count) > 0)

    # cleaned up: the scratch space (both chains' deployments included) is removed
    scratch = re.search(r"scratch space: (\S+),", out)
    assert scratch is not None
    assert not Path(scratch.group(1)).exists()


async def test_a_track_that_cannot_start_fails_the_demo_and_cleans_up(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A track whose chain does not come up is reported, fails the demo (exit 1), and leaves
    nothing behind."""
    broken = demo.Track("Broken", "no-such-profile", "no node", "pid", False, False)
    monkeypatch.setattr(demo, "TRACKS", (broken,))
    assert await run_demo() == 1

    out = capsys.readouterr().out
    assert "=== Broken track: profile no-such-profile" in out
    assert re.search(
        r"\[Broken 1/11\] Starting the local chain .*\n +FAILED: `dispatch chain up`", out
    )
    assert "  ! Broken chain: `dispatch chain up` exited" in out
    assert "The demo FAILED" in out
    scratch = re.search(r"scratch space: (\S+),", out)
    assert scratch is not None
    assert not Path(scratch.group(1)).exists()


async def test_the_cluster_demo_survives_a_coordinator_kill(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make demo-cluster`: the EVM track's scenarios across three coordinators on one
    PostgreSQL, the desktop's coordinator SIGKILLed mid-job; every job completes once,
    paid once, with a receipt countersigned by a coordinator of the cluster."""
    from dispatchnet.demo_cluster import run_cluster_demo

    monkeypatch.setattr(demo, "LINGER_SECONDS", 0.1)
    assert await run_cluster_demo() == 0
    out = capsys.readouterr().out
    assert "!!! SIGKILL of coordinator 2" in out
    assert "Every job completed once, paid once, with a valid receipt" in out
    summary = out.split("\nSummary\n", 1)[1]
    for scenario in (*SCENARIOS, "verified task"):
        row = next(line for line in summary.splitlines() if f"  {scenario}  " in line)
        assert "COMPLETED" in row and "settled" in row and row.rstrip().endswith("valid"), row
