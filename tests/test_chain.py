"""The EVM track on a local chain: `dispatch chain up|status|down`, anchoring receipt batch
roots with EvmAnchorer, `dispatch receipt verify --onchain`. What both chain tracks
promise alike (payments, outages) is in test_tracks.py, run for each kind.

One real anvil for the module, started by `dispatch chain up --port 0` (a subprocess, as a
user would) with DISPATCH_HOME in a temporary directory, and stopped at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import chain_fixtures
import grpc
import pytest
from chain_fixtures import (
    adispatch,
    chain_profile,
    cluster_for,
    dispatch,
)
from conftest import wait_until

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatch.v1 import coordinator_pb2, receipt_pb2
from dispatchnet import cli
from dispatchnet.chains.evm.anchoring import EvmAnchorer, anchor_contract
from dispatchnet.chains.evm.config import chain_id_of
from dispatchnet.chains.evm.deploy import load_artifact
from dispatchnet.chains.evm.node import (
    Call,
    EvmSender,
    _hex,
    load_or_create_chain_key,
    web3_for,
)
from dispatchnet.chains.evm.reputation import reputation_contract
from dispatchnet.cli import job_json, proof_json
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.devchain.local_chain import pid_alive
from dispatchnet.profiles import ProfileError, load_profile
from dispatchnet.server import start_coordinator

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
PUBLIC_IDENTITY = "0x8004A818BFB912233c491871b3d84c89A494BD9e"
PUBLIC_REPUTATION = "0x8004B663056A597Dffe9eCcC1965A193B7388713"

# one anvil for this module (module-scoped fixtures, see chain_fixtures.py)
home = chain_fixtures.home
chain = chain_fixtures.chain


async def complete(c: CoordinatorClient, n: int, tag: str) -> list[coordinator_pb2.Job]:
    jobs = [await c.submit(task_spec("echo", f'"{tag}-{i}"'.encode())) for i in range(n)]
    done = [await c.wait(j.job_id) for j in jobs]
    assert all(d.state == COMPLETED for d in done)
    return done


async def anchored_proof(c: CoordinatorClient, job_id: str) -> receipt_pb2.GetReceiptProofResponse:
    proof: list[receipt_pb2.GetReceiptProofResponse] = []

    async def ready() -> bool:
        try:
            p = await c.receipt_proof(job_id)
        except grpc.aio.AioRpcError as e:
            assert e.code() is grpc.StatusCode.FAILED_PRECONDITION, e
            return False
        proof[:] = [p]
        return bool(p.anchor_transaction)

    await wait_until(ready, 20, "an anchored proof")
    return proof[0]


# --- profiles (no chain needed) --------------------------------------------------------------


def test_the_two_evm_profiles_differ_only_in_configuration() -> None:
    """The same build on two chains: only where the chain is and how its payments are
    settled and paid for differ ([chain], the accepted networks, the wallet key)."""
    local, testnet = load_profile("local-monad"), load_profile("monad-testnet")
    assert local.receipts.anchor == testnet.receipts.anchor == "evm"
    assert (
        dataclasses.replace(
            local,
            name=testnet.name,
            description=testnet.description,
            chain=testnet.chain,
            # local profiles turn the operator tools on (free ports), public ones link
            # transactions to their explorer
            observability=testnet.observability,
            payments=dataclasses.replace(local.payments, accept=testnet.payments.accept),
            wallet=dataclasses.replace(local.wallet, key_file=testnet.wallet.key_file),
            # no random spot checks on local chains: tests and the demo stay deterministic
            # (the demo shows a verified job instead)
            verification=testnet.verification,
            # local chains pay workers out every 10 s, so the demo and tests see it
            payouts=dataclasses.replace(
                local.payouts, interval_seconds=testnet.payouts.interval_seconds
            ),
        )
        == testnet
    )
    assert local.payouts.interval_seconds <= 10
    assert local.payments.enabled and testnet.payments.enabled
    [local_accept], [testnet_accept] = local.payments.accept, testnet.payments.accept
    assert (local_accept.network, testnet_accept.network) == ("eip155:31337", "eip155:10143")
    assert local_accept.facilitator == "" and testnet_accept.facilitator.startswith("https://")
    assert local_accept.asset == testnet_accept.asset == ""  # deployment / SDK default USDC
    assert (local.chain.kind, testnet.chain.kind) == ("evm", "evm")
    assert chain_id_of(testnet.chain.network) == 10143
    assert testnet.chain.rpc_url == "https://testnet-rpc.monad.xyz"
    assert testnet.chain.identity_registry == PUBLIC_IDENTITY
    assert testnet.chain.reputation_registry == PUBLIC_REPUTATION
    assert testnet.chain.receipt_anchor == ""
    assert testnet.chain.anchor_gas_limit <= 60000  # Monad charges for the limit
    assert local.chain.deployment == "local-monad" and local.chain.devchain == "anvil"


async def test_monad_testnet_starts_with_anchoring_off_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profile = load_profile("monad-testnet")
    coord = await start_coordinator(profile, tmp_path / "coord", "127.0.0.1:0")
    try:
        assert coord.batcher is not None and not coord.batcher.anchorer.enabled
        assert "receipt_anchor is empty" in coord.anchoring
        assert any("anchoring is off" in r.getMessage() for r in caplog.records)
    finally:
        await coord.stop(grace=0.1)


@pytest.mark.parametrize(
    ("chain_toml", "error"),
    [
        ('kind = "evm"\nnetwork = "eip155:1"\nrpc_url = "http://x"\ncolour = 1', "colour"),
        ('kind = "evm"\nnetwork = "monad"\nrpc_url = "http://x"', "eip155:<chain id>"),
        ('kind = "evm"\nnetwork = "eip155:1"', "exactly one of deployment and rpc_url"),
        (
            'kind = "evm"\nnetwork = "eip155:1"\ndeployment = "d"\nreceipt_anchor = "0x'
            + "11" * 20
            + '"',
            "comes from the deployment",
        ),
        ('kind = "evm"\nnetwork = "eip155:1"\nrpc_url = "http://x"\nusdc = "0x12"', "usdc"),
        ('kind = "cardano"', "kind must be one of none, evm"),
        ('kind = "evm"\nnetwork = "eip155:1"\nrpc_url = "h"\nanchor_gas_limit = 5', "21000"),
    ],
)
def test_bad_chain_settings_are_refused(tmp_path: Path, chain_toml: str, error: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n[chain]\n{chain_toml}\n')
    with pytest.raises(ProfileError, match=error):
        load_profile(str(path))


def test_evm_anchoring_needs_an_evm_chain(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\n[receipts]\nanchor = "evm"\n')
    with pytest.raises(ProfileError, match=r'anchor must be "none" or the \[chain\] kind'):
        load_profile(str(path))


def test_chain_key_files_are_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "chain.key"
    key = load_or_create_chain_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_chain_key(path) == key and len(bytes.fromhex(key[2:])) == 32
    path.write_text("junk\n")
    with pytest.raises(ValueError, match="not a Dispatch chain key file"):
        load_or_create_chain_key(path)


def test_chain_commands_refuse_profiles_without_a_local_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    assert cli.main(["chain", "up", "--profile", "monad-testnet"]) == 1
    assert "has no local chain" in capsys.readouterr().err
    assert cli.main(["chain", "status", "--profile", "local-monad"]) == 1
    assert "run `dispatch chain up`" in capsys.readouterr().out
    assert not (tmp_path / "chains").exists()


# --- a local chain ---------------------------------------------------------------------------


def test_chain_up_is_idempotent_and_status_reports_it(home: Path, chain: dict[str, Any]) -> None:
    path = home / "chains" / "local-monad.json"
    assert json.loads(path.read_text()) == chain
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert chain["network"] == "eip155:31337" and chain["chain_id"] == 31337
    assert "LOCAL DEVELOPMENT CHAIN ONLY" in chain["warning"]
    assert set(chain["accounts"]) == {"coordinator", "client"}
    assert set(chain["contracts"]) == {
        "identity_registry", "reputation_registry", "validation_registry", "receipt_anchor",
        "usdc", "batch_settler",
    }  # fmt: skip
    assert pid_alive(chain["anvil_pid"])

    again = dispatch(home, "chain", "up", "--profile", "local-monad", "--port", "0")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == chain  # the same anvil, the same contracts

    status = dispatch(home, "chain", "status", "--profile", "local-monad")
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["ok"] and shown["running"] and shown["anvil_pid"] == chain["anvil_pid"]
    assert shown["rpc_url"] == chain["rpc_url"] and shown["chain_id"] == 31337

    w3 = web3_for(chain["rpc_url"], 5)
    usdc = w3.eth.contract(address=chain["contracts"]["usdc"], abi=load_artifact("TestUSDC").abi)
    for account in chain["accounts"].values():
        assert usdc.functions.balanceOf(account["address"]).call() == account["usdc"] > 0
        assert w3.eth.get_balance(account["address"]) > 0


async def test_anchorer_serializes_sends_and_reanchoring_returns_the_first_tx(
    chain: dict[str, Any],
) -> None:
    anchorer = EvmAnchorer(
        chain["rpc_url"],
        chain["network"],
        chain["contracts"]["receipt_anchor"],
        chain["accounts"]["client"]["private_key"],  # not the coordinator: no shared nonces
        gas_limit=60000,
    )
    roots = [os.urandom(32) for _ in range(3)]
    results = await asyncio.gather(
        *(anchorer.anchor(r, 2, f"batch_{i:024x}") for i, r in enumerate(roots))
    )
    assert len({r.transaction for r in results}) == 3
    assert {r.network for r in results} == {"eip155:31337"}
    again = await anchorer.anchor(roots[0], 2, "batch_again")
    assert again == results[0]
    receipt = anchorer.w3.eth.get_transaction_receipt(results[0].transaction)  # type: ignore[arg-type]
    assert receipt["gasUsed"] < 60000 == receipt_gas_limit(anchorer, results[0].transaction)

    tight = EvmAnchorer(
        chain["rpc_url"],
        chain["network"],
        chain["contracts"]["receipt_anchor"],
        chain["accounts"]["client"]["private_key"],
        gas_limit=30000,
    )
    with pytest.raises(RuntimeError, match="anchor_gas_limit is 30000"):
        await tight.anchor(os.urandom(32), 1, "batch_tight")


def test_the_sender_fills_every_field_and_refetches_a_nonce_taken_meanwhile(
    chain: dict[str, Any],
) -> None:
    """EvmSender asks the node through bare requests: the nonce, the EIP-1559 fees as web3
    fills them, the send, the receipt. A nonce another sender took (here: the first one
    read is one behind) is refused by the node ("nonce too low"), read again and sent."""
    key = chain["accounts"]["client"]["private_key"]  # not the coordinator: no shared nonces
    w3 = web3_for(chain["rpc_url"], 5)
    sender = EvmSender(w3, chain["network"], key)
    anchor = chain["contracts"]["receipt_anchor"]
    calldata = anchor_contract(w3, anchor).encode_abi("anchor", [os.urandom(32), 1, "batch_s"])
    first = sender.send(Call(anchor, calldata), 60000)
    assert sender.receipt(_hex(first), 10, 0.01)["status"] == "0x1"

    reads = []
    real = sender.result

    def stale_once(method: str, params: list[Any]) -> Any:
        got = real(method, params)
        if method == "eth_getTransactionCount":
            reads.append(int(got, 16))
            if len(reads) == 1:
                return hex(int(got, 16) - 1)  # the last one's nonce: taken
        return got

    sender.result = stale_once  # type: ignore[method-assign]
    calldata = anchor_contract(w3, anchor).encode_abi("anchor", [os.urandom(32), 1, "batch_t"])
    second = sender.send(Call(anchor, calldata), 60000)
    receipt = sender.receipt(_hex(second), 10, 0.01)
    assert receipt["status"] == "0x1" and len(reads) == 2
    tx = w3.eth.get_transaction(_hex(second))  # type: ignore[arg-type]
    assert tx["nonce"] == reads[1] and tx["gas"] == 60000 and tx["type"] == 2
    base = w3.eth.get_block(tx["blockNumber"])["baseFeePerGas"]
    assert tx["maxFeePerGas"] >= base + tx["maxPriorityFeePerGas"]


def receipt_gas_limit(anchorer: EvmAnchorer, tx: str) -> int:
    return int(anchorer.w3.eth.get_transaction(tx)["gas"])  # type: ignore[arg-type]


async def test_batches_are_anchored_and_verify_onchain(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    profile = chain_profile(str(home / "chains" / "local-monad.json"))
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        assert cluster.coord.anchoring.startswith("evm: ReceiptAnchor")
        await cluster.worker()
        c = cluster.client()
        jobs = await complete(c, 4, "anchored")  # two batches of two
        proofs = [await anchored_proof(c, j.job_id) for j in jobs]
    assert {p.anchor_network for p in proofs} == {"eip155:31337"}
    assert len({p.batch_id for p in proofs}) == 2

    w3 = web3_for(chain["rpc_url"], 5)
    anchor = anchor_contract(w3, chain["contracts"]["receipt_anchor"])
    block, anchorer = anchor.functions.anchoredAt(proofs[0].merkle_root).call()
    assert block > 0 and anchorer == chain["accounts"]["coordinator"]["address"]

    (tmp_path / "job.json").write_text(json.dumps(job_json(jobs[0])))

    async def run(proof: receipt_pb2.GetReceiptProofResponse, *extra: str) -> tuple[int, Any]:
        (tmp_path / "proof.json").write_text(json.dumps(proof_json(proof)))
        code, out, err = await adispatch(
            home, "receipt", "verify", str(tmp_path / "job.json"),
            "--proof", str(tmp_path / "proof.json"), "--onchain", "--profile", "local-monad",
            *extra,
        )  # fmt: skip
        assert out, err
        return code, json.loads(out)

    code, shown = await run(proofs[0], "--anchorer", chain["accounts"]["coordinator"]["address"])
    assert code == 0, shown
    onchain = shown["proof"]["onchain"]
    assert onchain["valid"] and onchain["anchored_in_block"] == block
    assert onchain["anchorer"] == chain["accounts"]["coordinator"]["address"]

    tampered = receipt_pb2.GetReceiptProofResponse()
    tampered.CopyFrom(proofs[0])
    tampered.merkle_root = os.urandom(32)
    code, shown = await run(tampered)
    assert code == 1 and any("no anchor" in p for p in shown["problems"]), shown

    other_tx = receipt_pb2.GetReceiptProofResponse()
    other_tx.CopyFrom(proofs[0])
    other_tx.anchor_transaction = next(
        p.anchor_transaction for p in proofs if p.batch_id != proofs[0].batch_id
    )
    code, shown = await run(other_tx)
    assert code == 1 and any("root mismatch" in p for p in shown["problems"]), shown

    missing = receipt_pb2.GetReceiptProofResponse()
    missing.CopyFrom(proofs[0])
    missing.anchor_transaction = "0x" + os.urandom(32).hex()
    code, shown = await run(missing)
    assert code == 1 and any("tx not found" in p for p in shown["problems"]), shown


def test_chain_reputation_shows_summary_and_feedback(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    reg = dispatch(
        home, "worker", "register", "--profile", "local-monad",
        "--key-file", str(tmp_path / "rep-worker.key"),
    )  # fmt: skip
    assert reg.returncode == 0, reg.stderr
    agent_id = int(json.loads(reg.stdout)["agent_id"])
    # the coordinator account (a trusted reviewer) rates the agent once
    w3 = web3_for(chain["rpc_url"], 5)
    coordinator = w3.eth.account.from_key(chain["accounts"]["coordinator"]["private_key"])
    registry = reputation_contract(w3, chain["contracts"]["reputation_registry"])
    tx = registry.functions.giveFeedback(
        agent_id, 100, 0, "successRate", "task", "", "dispatch://test", b"\x01" * 32
    ).build_transaction({
        "from": coordinator.address, "nonce": w3.eth.get_transaction_count(coordinator.address),
        "chainId": chain["chain_id"], "gas": 400_000,
    })  # fmt: skip
    sent = w3.eth.send_raw_transaction(coordinator.sign_transaction(tx).raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(sent, timeout=10)["status"] == 1

    out = dispatch(home, "chain", "reputation", str(agent_id), "--profile", "local-monad")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["agent_id"] == agent_id and shown["summary"] == {"count": 1, "average": 100}
    assert coordinator.address in shown["reviewers"]
    # one fresh success: (1 + 3 * 0.3) / (1 + 3) with the default prior
    assert shown["score"] == pytest.approx(0.475, abs=1e-3)
    [entry] = shown["feedback"]
    assert {k: entry[k] for k in ("client", "index", "value", "tag1", "tag2")} == {
        "client": coordinator.address, "index": 1, "value": 100, "tag1": "successRate",
        "tag2": "task",
    }  # fmt: skip
    assert entry["weight"] == pytest.approx(1, abs=1e-3)


def test_chain_down_stops_anvil_and_removes_the_deployment(
    home: Path, chain: dict[str, Any]
) -> None:
    """Runs last in this module (pytest keeps file order)."""
    r = dispatch(home, "chain", "down", "--profile", "local-monad")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["stopped"] and shown["anvil_pid"] == chain["anvil_pid"]
    assert not pid_alive(chain["anvil_pid"])
    assert not (home / "chains" / "local-monad.json").exists()
    status = dispatch(home, "chain", "status", "--profile", "local-monad")
    assert status.returncode == 1 and not json.loads(status.stdout)["ok"]
    again = dispatch(home, "chain", "down", "--profile", "local-monad")
    assert again.returncode == 0 and not json.loads(again.stdout)["stopped"]
