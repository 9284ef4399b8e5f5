"""The Solana track on a local chain: `dispatch chain up|status|down --profile local-solana`,
anchoring receipt batch roots as SPL Memos (SolanaAnchorer), `dispatch receipt verify
--onchain`, exactly-once anchoring across retries. What both chain tracks promise alike
(payments, outages) is in test_tracks.py, run for each kind.

One local Solana node (LiteSVM behind JSON-RPC) for the module, started by `dispatch chain
up --port 0` (a subprocess, as a user would) with DISPATCH_HOME in a temporary directory,
and stopped at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chain_fixtures
import pytest
from chain_fixtures import adispatch, cluster_for, dispatch
from conftest import FAST, wait_until
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.memo.instructions import create_memo
from spl.memo.models import MemoParams
from test_chain import anchored_proof, complete

from dispatch.v1 import coordinator_pb2, receipt_pb2
from dispatchnet.chains import registry
from dispatchnet.chains.solana.anchoring import (
    MEMO_TAG,
    SolanaAnchorer,
    _InFlight,
    memo_text,
)
from dispatchnet.chains.solana.memos import (
    MEMO_PROGRAM,
    fetch_transaction,
    memos_of,
    signer_of,
)
from dispatchnet.chains.solana.node import client_for, load_or_create_solana_key
from dispatchnet.cli import job_json, proof_json
from dispatchnet.client import task_spec
from dispatchnet.devchain.solana_local import _rpc, pid_alive, stop_pid
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import Profile, ProfileError, load_profile
from dispatchnet.server import start_coordinator

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
DEVNET_USDC = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"

home = chain_fixtures.home


@pytest.fixture(scope="module")
def chain(home: Path) -> Iterator[dict[str, Any]]:
    r = dispatch(home, "chain", "up", "--profile", "local-solana", "--port", "0")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    try:
        yield data
    finally:
        if (home / "chains" / "local-solana.json").exists():  # the last test did not run
            dispatch(home, "chain", "down", "--profile", "local-solana")
        stop_pid(int(data["node_pid"]))  # whatever happened above
        stop_pid(int(data["identity_chain"]["anvil_pid"]))  # [identity_chain]'s anvil
        assert not pid_alive(int(data["node_pid"]))


def solana_profile(paid: bool = False, identity: str = "", **chain: Any) -> Profile:
    """local-solana with fast job timings and batches of two (payments off unless paid);
    its [identity_chain] is the deployment file `identity`, by default the anvil's next to
    the Solana deployment file."""
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    sections["receipts"] = {"batch_size": 2, "batch_max_age_seconds": 30}
    sections["payments"] = {"enabled": paid}
    sections["chain"] = chain
    if chain.get("deployment") and not identity:
        identity = str(Path(chain["deployment"]).parent / "local-monad.json")
    if identity:
        sections["identity_chain"] = {"deployment": identity}
    return load_profile("local-solana").with_overrides(**sections)


def anchor_memos(rpc_url: str, address: str, root: bytes) -> list[str]:
    """The signatures of `address`'s transactions whose memo anchors `root`."""
    entries = _rpc(rpc_url, "getSignaturesForAddress", [address, {"limit": 1000}], 5)
    prefix = f"{MEMO_TAG} {root.hex()} "
    return [e["signature"] for e in entries if e["memo"] and prefix in e["memo"]]


def funded_keypair(chain: dict[str, Any], key_file: Path) -> Keypair:
    """A new Solana key file with 10 SOL on the local node."""
    keypair = Keypair.from_base58_string(load_or_create_solana_key(key_file))
    _rpc(chain["rpc_url"], "requestAirdrop", [str(keypair.pubkey()), 10 * 10**9], 5)
    return keypair


# --- profiles (no chain needed) --------------------------------------------------------------


def test_the_two_solana_profiles_differ_only_in_configuration() -> None:
    """The same build on two Solana clusters: only where the chains are and how payments
    are settled and paid for differ ([chain], [identity_chain], the facilitator, the wallet
    key), and where matching's scores come from (the local anvil's registry, or local)."""
    local, devnet = load_profile("local-solana"), load_profile("solana-devnet")
    assert local.receipts.anchor == devnet.receipts.anchor == "solana"
    assert (
        dataclasses.replace(
            local,
            name=devnet.name,
            description=devnet.description,
            chain=devnet.chain,
            # local profiles turn the operator tools on (free ports), public ones link
            # transactions to their explorer
            observability=devnet.observability,
            identity_chain=devnet.identity_chain,
            reputation=devnet.reputation,
            payments=dataclasses.replace(local.payments, accept=devnet.payments.accept),
            wallet=dataclasses.replace(local.wallet, key_file=devnet.wallet.key_file),
            # no random spot checks on local chains: tests and the demo stay deterministic
            verification=devnet.verification,
            # local chains pay workers out every 10 s, so the demo and tests see it
            payouts=dataclasses.replace(
                local.payouts, interval_seconds=devnet.payouts.interval_seconds
            ),
        )
        == devnet
    )
    [local_accept], [devnet_accept] = local.payments.accept, devnet.payments.accept
    assert local_accept.network == devnet_accept.network == DEVNET
    assert local_accept.facilitator == "" and devnet_accept.facilitator.startswith("https://")
    assert (local.chain.kind, devnet.chain.kind) == ("solana", "solana")
    assert local.chain.network == devnet.chain.network == DEVNET
    assert local.chain.deployment == "local-solana" and local.chain.devchain == "litesvm"
    assert devnet.chain.rpc_url == "https://api.devnet.solana.com"
    assert devnet.chain.mint == DEVNET_USDC and devnet.chain.key_file
    assert local.payments.enabled and devnet.payments.enabled
    assert local.feedback.enabled and devnet.feedback.enabled
    assert (local.reputation.source, devnet.reputation.source) == ("erc8004", "local")
    # identities and reputation on an EVM [identity_chain]: local anvil, Monad testnet
    assert local.identity_chain.deployment == "local-monad"
    assert devnet.identity_chain.network == "eip155:10143"
    assert {"anchor", "payments"} <= registry.capabilities("solana")


@pytest.mark.parametrize(
    ("chain_toml", "error"),
    [
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\nrpc_url = "http://x"\n'
            'receipt_anchor = "0x' + "11" * 20 + '"',
            r"\[chain\] receipt_anchor is not a setting of kind solana",
        ),
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\nrpc_url = "http://x"\nanchor_gas_limit = 1',
            r"\[chain\] anchor_gas_limit is not a setting of kind solana",
        ),
        (
            f'kind = "evm"\nnetwork = "eip155:1"\nrpc_url = "http://x"\nmint = "{DEVNET_USDC}"',
            r"\[chain\] mint is not a setting of kind evm",
        ),
        ('kind = "none"\nnetwork = "eip155:1"', r"\[chain\] network is not a setting of kind none"),
        (
            'kind = "solana"\nnetwork = "eip155:1"\nrpc_url = "http://x"',
            "solana:<32-character genesis hash prefix>",
        ),
        (f'kind = "solana"\nnetwork = "{DEVNET}"', "exactly one of deployment and rpc_url"),
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\ndeployment = "d"\nmint = "{DEVNET_USDC}"',
            "mint comes from the deployment",
        ),
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\nrpc_url = "http://x"\nmint = "0x12"',
            "mint is not a Solana address",
        ),
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\ndeployment = "d"\ndevchain = "anvil"',
            "devchain must be litesvm or empty",
        ),
        (
            f'kind = "solana"\nnetwork = "{DEVNET}"\nrpc_url = "http://x"\nanchor_lookback = 0',
            "anchor_lookback must be 1 to 10000",
        ),
        ('kind = "cardano"', "kind must be one of none, evm, solana"),
    ],
)
def test_bad_solana_chain_settings_are_refused_naming_the_key(
    tmp_path: Path, chain_toml: str, error: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n[chain]\n{chain_toml}\n')
    with pytest.raises(ProfileError, match=error):
        load_profile(str(path))


def test_checking_chain_profiles_imports_no_chain_library() -> None:
    """Each kind's [chain] check is light: loading the chain profiles (kinds solana and
    evm) imports neither solana-py/solders nor web3."""
    code = (
        "import sys\n"
        "from dispatchnet.profiles import load_profile\n"
        "for name in ('local-solana', 'solana-devnet', 'local-monad', 'monad-testnet'):\n"
        "    load_profile(name)\n"
        "heavy = ('solana', 'solders', 'spl', 'httpx2', 'web3', 'eth_account', 'x402')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_solana_anchoring_needs_a_solana_chain(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\n[receipts]\nanchor = "solana"\n')
    with pytest.raises(ProfileError, match=r'anchor must be "none" or the \[chain\] kind'):
        load_profile(str(path))


def test_solana_key_files_are_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "solana.key"
    key = load_or_create_solana_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_solana_key(path) == key
    assert Keypair.from_base58_string(key).pubkey()
    path.write_text("not a key\n")
    with pytest.raises(ValueError, match="not a Dispatch Solana key file"):
        load_or_create_solana_key(path)


async def test_a_solana_devnet_coordinator_starts_anchoring_from_its_new_keypair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No chain call at start-up: the keypair is created (0600) under DISPATCH_HOME and
    the coordinator says where it anchors and from which address (the one to fund)."""
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path / "home"))
    coord = await start_coordinator(
        load_profile("solana-devnet"), tmp_path / "coord", "127.0.0.1:0"
    )
    try:
        key_file = tmp_path / "home" / "solana-coordinator.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        address = str(Keypair.from_base58_string(load_or_create_solana_key(key_file)).pubkey())
        assert coord.batcher is not None and coord.batcher.anchorer.enabled
        assert coord.anchoring == (
            f"solana: Memo on {DEVNET} via https://api.devnet.solana.com, from {address}"
        )
    finally:
        await coord.stop(grace=0.1)


def test_solana_devnet_has_no_local_chain(tmp_path: Path) -> None:
    r = dispatch(tmp_path, "chain", "up", "--profile", "solana-devnet")
    assert r.returncode != 0 and "has no local chain" in r.stderr


# --- on the local chain ----------------------------------------------------------------------


def test_solana_chain_up_is_idempotent_and_status_reports_it(
    home: Path, chain: dict[str, Any]
) -> None:
    path = home / "chains" / "local-solana.json"
    assert json.loads(path.read_text()) == {k: v for k, v in chain.items() if k != "identity_chain"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert chain["network"] == DEVNET and chain["cluster"] == "localnet"
    assert "LOCAL DEVELOPMENT CHAIN ONLY" in chain["warning"]
    assert pid_alive(chain["node_pid"])

    again = dispatch(home, "chain", "up", "--profile", "local-solana", "--port", "0")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == chain  # the same node, the same mint

    status = dispatch(home, "chain", "status", "--profile", "local-solana")
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["ok"] and shown["running"] and shown["node_pid"] == chain["node_pid"]
    assert shown["rpc_url"] == chain["rpc_url"] and shown["mint"] == chain["usdc"]["mint"]

    profile = solana_profile(deployment=str(path))
    adapter = registry.adapter_of(profile)
    for name in ("coordinator", "client"):
        account = chain["accounts"][name]
        assert adapter.token_balance(profile, "", account["address"]) == account["usdc"] > 0
    assert adapter.token_balance(profile, "", str(Keypair().pubkey())) == 0


async def test_solana_batches_are_anchored_as_memos_and_verify_onchain(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    profile = solana_profile(deployment=str(home / "chains" / "local-solana.json"))
    coordinator = chain["accounts"]["coordinator"]["address"]
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        assert cluster.coord.anchoring.startswith("solana: Memo")
        await cluster.worker()
        c = cluster.client()
        jobs = await complete(c, 4, "anchored")  # two batches of two
        proofs = [await anchored_proof(c, j.job_id) for j in jobs]
    assert {p.anchor_network for p in proofs} == {DEVNET}
    assert len({p.batch_id for p in proofs}) == 2

    fetched = fetch_transaction(client_for(chain["rpc_url"], 5), proofs[0].anchor_transaction)
    assert fetched is not None
    tx, err, slot = fetched
    assert slot > 0
    assert err is None and signer_of(tx) == coordinator
    assert memos_of(tx) == [memo_text(proofs[0].merkle_root, 2, proofs[0].batch_id)]
    assert anchor_memos(chain["rpc_url"], coordinator, proofs[0].merkle_root) == [
        proofs[0].anchor_transaction
    ]

    (tmp_path / "job.json").write_text(json.dumps(job_json(jobs[0])))

    async def run(proof: receipt_pb2.GetReceiptProofResponse, *extra: str) -> tuple[int, Any]:
        (tmp_path / "proof.json").write_text(json.dumps(proof_json(proof)))
        code, out, err = await adispatch(
            home, "receipt", "verify", str(tmp_path / "job.json"),
            "--proof", str(tmp_path / "proof.json"), "--onchain", "--profile", "local-solana",
            *extra,
        )  # fmt: skip
        assert out, err
        return code, json.loads(out)

    code, shown = await run(proofs[0])
    assert code == 0, shown
    onchain = shown["proof"]["onchain"]
    assert onchain["valid"] and onchain["anchorer"] == coordinator
    assert onchain["memo"].startswith(f"{MEMO_TAG} {proofs[0].merkle_root.hex()} ")

    tampered = receipt_pb2.GetReceiptProofResponse()
    tampered.CopyFrom(proofs[0])
    tampered.merkle_root = os.urandom(32)
    code, shown = await run(tampered)
    assert code == 1 and any("root mismatch" in p for p in shown["problems"]), shown

    other_tx = receipt_pb2.GetReceiptProofResponse()
    other_tx.CopyFrom(proofs[0])
    other_tx.anchor_transaction = next(
        p.anchor_transaction for p in proofs if p.batch_id != proofs[0].batch_id
    )
    code, shown = await run(other_tx)
    assert code == 1 and any("root mismatch" in p for p in shown["problems"]), shown

    code, shown = await run(proofs[0], "--anchorer", str(Keypair().pubkey()))
    assert code == 1 and any("not by the expected" in p for p in shown["problems"]), shown

    missing = receipt_pb2.GetReceiptProofResponse()
    missing.CopyFrom(proofs[0])
    missing.anchor_transaction = str(Signature.new_unique())
    code, shown = await run(missing)
    assert code == 1 and any("tx not found" in p for p in shown["problems"]), shown


async def test_solana_anchoring_is_exactly_once_across_retries(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    keypair = funded_keypair(chain, tmp_path / "anchor.key")
    address = str(keypair.pubkey())

    def anchorer() -> SolanaAnchorer:  # a new one: a restarted coordinator
        return SolanaAnchorer(chain["rpc_url"], DEVNET, keypair, genesis_hash=chain["genesis_hash"])

    # the plain retry: the second call finds the first memo
    root = os.urandom(32)
    first = await anchorer().anchor(root, 2, "batch_plain")
    assert first.network == DEVNET
    assert await anchorer().anchor(root, 2, "batch_plain") == first
    assert anchor_memos(chain["rpc_url"], address, root) == [first.transaction]

    # a lost reply: the memo landed, the sender never heard; the retry returns it
    lost_root = os.urandom(32)
    sender = anchorer()
    sent = sender._sign(memo_text(lost_root, 2, "batch_lost"))
    sender.client.send_raw_transaction(sent.raw)  # the reply is dropped
    again = await anchorer().anchor(lost_root, 2, "batch_lost")
    assert again.transaction == str(sent.signature)
    assert anchor_memos(chain["rpc_url"], address, lost_root) == [str(sent.signature)]

    # signed but not known to have been sent (e.g. the send timed out): the retry sends
    # that same transaction, not a second one
    pending_root = os.urandom(32)
    retrier = anchorer()
    unsent = retrier._sign(memo_text(pending_root, 2, "batch_pending"))
    retrier._in_flight[pending_root] = unsent
    result = await retrier.anchor(pending_root, 2, "batch_pending")
    assert result.transaction == str(unsent.signature)
    assert anchor_memos(chain["rpc_url"], address, pending_root) == [str(unsent.signature)]
    assert retrier._in_flight == {}

    # one whose blockhash expired without it landing is replaced by a new one (resending
    # it would be refused: BlockhashNotFound)
    expired_root = os.urandom(32)
    memo = create_memo(
        MemoParams(
            program_id=MEMO_PROGRAM,
            signer=keypair.pubkey(),
            message=memo_text(expired_root, 2, "batch_expired").encode(),
        )
    )
    old_tx = VersionedTransaction(
        MessageV0.try_compile(keypair.pubkey(), [memo], [], Hash.new_unique()), [keypair]
    )
    retrier._in_flight[expired_root] = _InFlight(bytes(old_tx), old_tx.signatures[0], 0)
    fresh = await retrier.anchor(expired_root, 2, "batch_expired")
    assert fresh.transaction != str(old_tx.signatures[0])
    assert anchor_memos(chain["rpc_url"], address, expired_root) == [fresh.transaction]
    assert retrier._in_flight == {}


async def test_an_unfunded_solana_keypair_leaves_the_batch_pending_saying_why(
    chain: dict[str, Any],
) -> None:
    anchorer = SolanaAnchorer(chain["rpc_url"], DEVNET, Keypair(), rpc_timeout=5)
    with pytest.raises(Unavailable, match="no record of a prior credit") as e:
        await anchorer.anchor(os.urandom(32), 1, "batch_unfunded")
    assert "RpcSimulateTransactionResult" not in str(e.value)  # the node's message, short


async def test_a_paid_job_on_solana_is_settled_at_commit_and_a_cancelled_one_refunded(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    """The Solana track's payments, as a client sees them: exact SVM paid at CommitJob,
    settled at once (the payload's blockhash cannot wait: "held"), "settled" when the job
    completes; a job cancelled before it ran is refunded on chain."""
    from dispatchnet.chains import registry
    from dispatchnet.chains.solana.wallet import SvmWallet

    profile = solana_profile(paid=True, deployment=str(home / "chains" / "local-solana.json"))
    adapter = registry.adapter_of(profile)
    mint = chain["usdc"]["mint"]
    payer = chain["accounts"]["client"]["address"]
    payee = chain["accounts"]["coordinator"]["address"]

    def balance(owner: str) -> int:
        return adapter.token_balance(profile, mint, owner)

    before_payer, before_payee = balance(payer), balance(payee)
    wallet = SvmWallet.of_deployment(chain, 100_000)
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        worker = await cluster.worker()
        c = cluster.client(wallet=wallet)
        job = await c.submit(task_spec("echo", b'"paid"'))
        assert job.payment.network == DEVNET and job.payment.status == "authorized"
        done = await c.wait(job.job_id)
        assert done.state == COMPLETED

        async def settled() -> bool:
            return (await c.get(job.job_id)).payment.status == "settled"

        await wait_until(settled, 20, "the payment settled")
        tx = (await c.get(job.job_id)).payment.transaction
        assert tx  # the settlement's signature

        # with no worker connected the next job waits queued; it is cancelled, then refunded
        worker.stop()
        await wait_until(lambda: not cluster.coord.hub.sessions, 10, "the worker gone")
        lonely = await c.submit(task_spec("echo", b'"lonely"'))

        async def held() -> bool:
            return (await c.get(lonely.job_id)).payment.status == "held"

        await wait_until(held, 20, "the payment settled at commit")
        await c.cancel(lonely.job_id)

        async def refunded() -> bool:
            return (await c.get(lonely.job_id)).payment.status == "refunded"

        await wait_until(refunded, 30, "the cancelled job's payment refunded")
        assert (await c.get(lonely.job_id)).payment.refund_transaction
    assert balance(payer) == before_payer - 1000  # one CHEAP task, paid once
    assert balance(payee) == before_payee + 1000


async def test_the_cli_pays_on_solana_and_its_wallet_speaks_solana_keys(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    profile = solana_profile(paid=True, deployment=str(home / "chains" / "local-solana.json"))
    client = chain["accounts"]["client"]["address"]
    mint = chain["usdc"]["mint"]
    code, out, err = await adispatch(home, "wallet", "address", "--profile", "local-solana")
    assert code == 0, err
    assert json.loads(out)["address"] == client
    code, out, err = await adispatch(home, "wallet", "balance", "--profile", "local-solana")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["network"] == DEVNET
    [entry] = [b for b in shown["balances"] if b["asset"] == mint]
    start = entry["balance"]
    assert start > 0
    key = tmp_path / "sol.key"
    code, out, err = await adispatch(
        home, "wallet", "new", "--profile", "local-solana", "--key-file", str(key)
    )
    assert code == 0, err
    made = json.loads(out)
    assert Keypair.from_base58_string(key.read_text().strip()).pubkey() == Pubkey.from_string(
        made["address"]
    )
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        await cluster.worker()
        code, out, err = await adispatch(
            home, "job", "submit", "--coordinator", cluster.address, "--profile",
            "local-solana", "--task", "echo", "--input", '{"a": 1}', "--wait",
        )  # fmt: skip
        assert code == 0, err
        job = json.loads(out)
        assert job["state"] == "JOB_STATE_COMPLETED" and job["payment"]["payer"] == client
    code, out, err = await adispatch(home, "wallet", "balance", "--profile", "local-solana")
    [entry] = [b for b in json.loads(out)["balances"] if b["asset"] == mint]
    assert entry["balance"] == start - 1000


def test_solana_chain_down_stops_the_node_and_removes_the_deployment(
    home: Path, chain: dict[str, Any]
) -> None:
    """Runs last in this module (pytest keeps file order)."""
    r = dispatch(home, "chain", "down", "--profile", "local-solana")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["stopped"] and shown["node_pid"] == chain["node_pid"]
    assert not pid_alive(chain["node_pid"])
    assert not (home / "chains" / "local-solana.json").exists()
    status = dispatch(home, "chain", "status", "--profile", "local-solana")
    assert status.returncode == 1 and not json.loads(status.stdout)["ok"]
    again = dispatch(home, "chain", "down", "--profile", "local-solana")
    assert again.returncode == 0 and not json.loads(again.stdout)["stopped"]
