"""What both chain tracks promise, written once and run for each chain kind (EVM on anvil,
Solana on the local LiteSVM node): a paid job is charged once and its payment cannot be
used again; a job that never completes costs its payer nothing; receipt batches wait out a
node outage and are anchored exactly once when the node is back.

Each kind is a Track: how to build its profile, its client wallet, balances read on chain,
and what an anchor looks like on that chain. Both local chains live for the module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    funded_chain_key,
    unreachable_proxy,
)
from conftest import Proc, wait_until
from test_chain import anchored_proof, complete
from test_grpcurl import COORDINATOR, ECHO_SPEC, GRPCURL, call, grpcurl
from test_payments import RE, commit_with, refused, required_header, signed
from test_solana_chain import anchor_memos, funded_keypair, solana_profile
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header

import dispatchnet.chains.evm  # noqa: F401  (before web3: restores the recursion limit)
from dispatch.v1 import coordinator_pb2
from dispatchnet import keys
from dispatchnet.chains import registry
from dispatchnet.chains.evm.anchoring import anchor_contract
from dispatchnet.chains.evm.node import web3_for
from dispatchnet.client import CoordinatorClient, task_spec
from dispatchnet.coordinator.models import AnchorStatus
from dispatchnet.devchain.local_chain import stop_pid
from dispatchnet.devchain.processes import pid_alive
from dispatchnet.devchain.solana_local import stop_pid as stop_solana_node
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import PROFILE_DIR, Profile
from dispatchnet.worker.runtime import Worker

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
ECHO = task_spec("echo", b'{"text": "hi"}')
PRICE = 1000  # a CHEAP task in micro-USD = test USDC atomic units on both chains

home = chain_fixtures.home


@pytest.fixture(scope="module")
def evm_chain(home: Path) -> Iterator[dict[str, Any]]:
    r = dispatch(home, "chain", "up", "--profile", "local-monad", "--port", "0")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    yield data
    dispatch(home, "chain", "down", "--profile", "local-monad")
    stop_pid(int(data["anvil_pid"]))
    assert not pid_alive(int(data["anvil_pid"]))


@pytest.fixture(scope="module")
def solana_chain(home: Path, evm_chain: dict[str, Any]) -> Iterator[dict[str, Any]]:
    # local-solana's identity chain is local-monad's anvil, already up (evm_chain)
    r = dispatch(home, "chain", "up", "--profile", "local-solana", "--port", "0")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    yield data
    stop_solana_node(int(data["node_pid"]))
    assert not pid_alive(int(data["node_pid"]))


@dataclass
class Track:
    kind: str
    chain: dict[str, Any]
    # (paid, chain overrides) -> the kind's local profile on this module's chain
    profile: Callable[..., Profile]
    # key file -> (a funded coordinator account's address, [chain] overrides for a
    # coordinator reaching the chain at proxy_url with that key)
    outage: Callable[[Path, str], tuple[str, dict[str, Any]]]
    # (root, anchorer) -> the transactions that anchored root from anchorer, read on chain
    anchors: Callable[[bytes, str], list[str]]

    def wallet(self) -> Any:
        return registry.adapter_of(self.profile(True)).client_wallet(self.profile(True), "")

    def balance(self, owner: str) -> int:
        profile = self.profile(True)
        asset = self.wallet().extra_assets[0].address
        return int(registry.adapter_of(profile).token_balance(profile, asset, owner))

    @property
    def payee(self) -> str:
        return str(self.chain["accounts"]["coordinator"]["address"])


def _evm(home: Path, chain: dict[str, Any]) -> Track:
    deployment = str(home / "chains" / "local-monad.json")

    def profile(paid: bool = False, **overrides: Any) -> Profile:
        where = overrides.pop("deployment", deployment)
        return chain_profile(where, payments={} if paid else None, **overrides)

    def outage(key_file: Path, proxy_url: str) -> tuple[str, dict[str, Any]]:
        address = funded_chain_key(chain, key_file)
        return address, {
            "deployment": "",
            "devchain": "",
            "rpc_url": proxy_url,
            "receipt_anchor": chain["contracts"]["receipt_anchor"],
            "usdc": chain["contracts"]["usdc"],
            "batch_settler": chain["contracts"]["batch_settler"],
            "key_file": str(key_file),
            "rpc_timeout_seconds": 2,
            "tx_timeout_seconds": 5,
        }

    def anchors(root: bytes, anchorer: str) -> list[str]:
        contract = anchor_contract(
            web3_for(chain["rpc_url"], 5), chain["contracts"]["receipt_anchor"]
        )
        block, by = contract.functions.anchoredAt(root).call()
        if not block or by != anchorer:
            return []
        logs = contract.events.Anchored().get_logs(
            from_block=block, to_block=block, argument_filters={"merkleRoot": root}
        )
        return ["0x" + bytes(ev["transactionHash"]).hex() for ev in logs]

    return Track("evm", chain, profile, outage, anchors)


def _solana(home: Path, chain: dict[str, Any]) -> Track:
    deployment = str(home / "chains" / "local-solana.json")
    identity = str(home / "chains" / "local-monad.json")

    def profile(paid: bool = False, **overrides: Any) -> Profile:
        return solana_profile(
            paid=paid, identity=identity, **{"deployment": deployment, **overrides}
        )

    def outage(key_file: Path, proxy_url: str) -> tuple[str, dict[str, Any]]:
        address = str(funded_keypair(chain, key_file).pubkey())
        return address, {
            "deployment": "",
            "devchain": "",
            "rpc_url": proxy_url,
            "mint": chain["usdc"]["mint"],
            "key_file": str(key_file),
            "rpc_timeout_seconds": 2,
            "tx_timeout_seconds": 5,
        }

    def anchors(root: bytes, anchorer: str) -> list[str]:
        return anchor_memos(chain["rpc_url"], anchorer, root)

    return Track("solana", chain, profile, outage, anchors)


@pytest.fixture(params=["evm", "solana"])
def track(request: pytest.FixtureRequest, home: Path) -> Track:
    kind = str(request.param)
    chain: dict[str, Any] = request.getfixturevalue(f"{kind}_chain")
    return _evm(home, chain) if kind == "evm" else _solana(home, chain)


async def test_a_paid_job_is_charged_once_and_its_payment_cannot_be_used_again(
    track: Track, tmp_path: Path
) -> None:
    wallet = track.wallet()
    payer = wallet.address
    start_payer, start_payee = track.balance(payer), track.balance(track.payee)
    async with cluster_for(track.profile(True), tmp_path / "coord") as cluster:
        worker_key = KeyPair.generate()
        await cluster.worker(key=worker_key)
        c = cluster.client()
        first, second = await c.quote(ECHO), await c.quote(ECHO)
        signature = wallet.pay(await required_header(c, first.quote_id))
        job = await commit_with(c, first.quote_id, signature, "first")
        assert (await c.wait(job.job_id)).state == COMPLETED

        async def settled() -> bool:
            return (await c.get(job.job_id)).payment.status == "settled"

        await wait_until(settled, 30, "the payment settled")
        # the same signed payment for another quote: refused, whatever the chain
        code, _, error = await refused(c, second.quote_id, signature)
        assert (code, error) == (RE, "payment_already_used")
        # retrying the commit with its idempotency key charges nothing more
        again = await commit_with(c, first.quote_id, signature, "first")
        assert again.job_id == job.job_id
        # settled (on Solana: at commit, then the job completed): the worker is credited
        # the price minus the coordinator's 10%, once
        earnings = await cluster.client(worker_key).earnings()
        assert [(j.job_id, j.share) for j in earnings.jobs] == [
            (job.job_id, str(PRICE - PRICE // 10))
        ]
    assert track.balance(payer) == start_payer - PRICE
    assert track.balance(track.payee) == start_payee + PRICE


async def test_a_job_that_never_completes_costs_its_payer_nothing(
    track: Track, tmp_path: Path
) -> None:
    """Cancelled while queued (no worker): EVM never settles it ("released"); Solana
    settled it at commit and pays it back on chain ("refunded")."""
    wallet = track.wallet()
    start = track.balance(wallet.address)
    async with cluster_for(track.profile(True), tmp_path / "coord") as cluster:
        c = cluster.client(wallet=wallet)
        job = await c.submit(ECHO, "never-runs")
        await c.cancel(job.job_id)

        async def done() -> bool:
            return (await c.get(job.job_id)).payment.status in ("released", "refunded")

        await wait_until(done, 30, "the payment released or refunded")
    assert track.balance(wallet.address) == start


async def test_anchoring_waits_out_a_node_outage_and_anchors_once(
    track: Track, tmp_path: Path
) -> None:
    proxy = await unreachable_proxy(track.chain)
    address, chain = track.outage(tmp_path / "coordinator.key", proxy.url)
    async with cluster_for(track.profile(False, **chain), tmp_path / "coord") as cluster:
        store = cluster.db
        await cluster.worker()
        c = cluster.client()
        jobs = await complete(c, 2, "outage")

        def pending_with_error() -> bool:
            batches = store.receipt_batches((AnchorStatus.PENDING,))
            return bool(batches) and "connection refused" in batches[0].anchor_error

        await wait_until(pending_with_error, 10, "a pending batch with the chain error")
        started = time.monotonic()
        (later,) = await complete(c, 1, "during-outage")  # jobs do not wait for the chain
        assert time.monotonic() - started < 5
        assert store.receipt_batches((AnchorStatus.ANCHORED,)) == []

        await proxy.start()  # the node is back, at the same address, with its state
        try:
            proof = await anchored_proof(c, jobs[0].job_id)
        finally:
            await proxy.stop()
        (batch,) = store.receipt_batches((AnchorStatus.ANCHORED,))
        assert batch.anchor_error == "" and batch.anchor_transaction == proof.anchor_transaction
        assert later.state == COMPLETED
    assert track.anchors(proof.merkle_root, address) == [proof.anchor_transaction]


async def test_a_coordinator_may_accept_both_chains_and_the_client_picks(
    home: Path, evm_chain: dict[str, Any], solana_chain: dict[str, Any], tmp_path: Path
) -> None:
    """local-solana accepting its Solana USDC and, on its [identity_chain], the anvil's
    test USDC: the payment-required trailer lists both, and each client pays with the
    one its wallet can sign."""
    evm, svm = _evm(home, evm_chain), _solana(home, solana_chain)
    profile = svm.profile(True)
    accepts = [
        *profile.payments.accept,
        dataclasses.replace(profile.payments.accept[0], network=evm_chain["network"]),
    ]
    profile = profile.with_overrides(payments={"accept": accepts})
    evm_wallet, svm_wallet = evm.wallet(), svm.wallet()
    starts = [evm.balance(evm_wallet.address), svm.balance(svm_wallet.address)]
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        await cluster.worker()
        header = await required_header(
            cluster.client(), (await cluster.client().quote(ECHO)).quote_id
        )
        offered = {a.network for a in decode_payment_required_header(header).accepts}
        assert offered == {evm_chain["network"], solana_chain["network"]}
        for wallet in (evm_wallet, svm_wallet):
            c = cluster.client(wallet=wallet)
            job = await c.submit(ECHO)
            assert (await c.wait(job.job_id)).state == COMPLETED

            async def settled(c: Any = c, job_id: str = job.job_id) -> bool:
                return (await c.get(job_id)).payment.status == "settled"

            await wait_until(settled, 30, "the payment settled")
    assert evm.balance(evm_wallet.address) == starts[0] - PRICE
    assert svm.balance(svm_wallet.address) == starts[1] - PRICE


async def test_an_underpayment_is_refused_and_moves_nothing(track: Track, tmp_path: Path) -> None:
    wallet = track.wallet()
    start = track.balance(wallet.address)

    def less(requirement: Any) -> None:
        requirement.amount = str(int(requirement.amount) - 1)

    async with cluster_for(track.profile(True), tmp_path / "coord") as cluster:
        c = cluster.client()
        quote = await c.quote(ECHO)
        header = await required_header(c, quote.quote_id)
        signature = encode_payment_signature_header(signed(wallet, header, less))
        code, _, error = await refused(c, quote.quote_id, signature)
        assert code == RE and error
    assert track.balance(wallet.address) == start


async def test_the_node_down_at_commit_is_unavailable_then_the_same_payment_goes_through(
    track: Track, tmp_path: Path
) -> None:
    proxy = await unreachable_proxy(track.chain)
    _, chain = track.outage(tmp_path / "coordinator.key", proxy.url)
    profile = track.profile(True, **chain).with_overrides(
        receipts={"anchor": "none"}, feedback={"enabled": False}
    )
    wallet = track.wallet()
    start = track.balance(wallet.address)
    await proxy.start()
    try:
        async with cluster_for(profile, tmp_path / "coord") as cluster:
            assert cluster.coord.payments is not None
            cluster.coord.payments.retry_initial = cluster.coord.payments.retry_max = 0.2
            await cluster.worker()
            c = cluster.client(wallet=wallet)
            quote = await c.quote(ECHO)
            signature = wallet.pay(await required_header(c, quote.quote_id))
            await proxy.stop()
            code, details, _ = await refused(c, quote.quote_id, signature)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert track.balance(wallet.address) == start  # nothing moved

            await proxy.start()
            job = await commit_with(c, quote.quote_id, signature)  # the same payment, now
            assert (await c.wait(job.job_id)).state == COMPLETED

            async def settled() -> bool:
                return (await c.get(job.job_id)).payment.status == "settled"

            await wait_until(settled, 30, "the payment settled")
    finally:
        await proxy.stop()
    assert track.balance(wallet.address) == start - PRICE


async def test_grpcurl_and_the_wallet_cli_pay_by_hand(
    track: Track, home: Path, tmp_path: Path
) -> None:
    """The manual-testing story on each chain: grpcurl commits without a payment, the
    `payment-required` trailer names this chain's network, `dispatch wallet pay --profile`
    signs it with the chain's key, and grpcurl commits again with the signature."""
    if not GRPCURL.exists():
        pytest.skip("no grpcurl")
    profile_name = "local-monad" if track.kind == "evm" else "local-solana"
    async with cluster_for(track.profile(True), tmp_path / "coord") as cluster:
        quote = await call(cluster.address, f"{COORDINATOR}/GetQuote", ECHO_SPEC)
        code, out, err = await adispatch(home, "auth", "header", "--raw")
        assert code == 0, err
        auth = ("-H", f"authorization: {out.strip()}")
        body = {"quote_id": quote["quote"]["quote_id"], "idempotency_key": "by-hand"}
        code, out = await grpcurl(
            "-v", *auth, "-d", json.dumps(body), cluster.address, f"{COORDINATOR}/CommitJob"
        )
        assert code != 0 and "Code: ResourceExhausted" in out, out
        required = re.search(r"^payment-required: (\S+)$", out, re.M)
        assert required is not None, out
        [offer] = json.loads(base64.b64decode(required.group(1)))["accepts"]
        assert offer["network"] == track.chain["network"] and offer["amount"] == str(PRICE)
        code, signature, err = await adispatch(
            home, "wallet", "pay", required.group(1), "--profile", profile_name
        )
        assert code == 0, err
        code, out = await grpcurl(
            "-v", *auth, "-H", f"payment-signature: {signature.strip()}",
            "-d", json.dumps(body), cluster.address, f"{COORDINATOR}/CommitJob",
        )  # fmt: skip
        assert code == 0, out
        response = re.search(r"^payment-response: (\S+)$", out, re.M)
        assert response is not None, out
        assert json.loads(base64.b64decode(response.group(1)))["payer"] == track.wallet().address


async def test_settlements_and_refunds_are_exactly_once_across_a_coordinator_sigkill(
    track: Track, home: Path, tmp_path: Path
) -> None:
    """A coordinator (a real `dispatch coordinator` process on the chain's local profile)
    is SIGKILLed right after its paid jobs completed and others were cancelled, while
    settlements and refunds may be in flight; the restarted one finishes them: every
    completed job charged exactly once, every cancelled one not at all."""
    profile_name = "local-monad" if track.kind == "evm" else "local-solana"
    data = tmp_path / "coord-data"
    started: list[Proc] = []

    def coordinator(listen: str) -> Proc:
        args = ["coordinator", "--profile", profile_name, "--listen", listen]
        p = Proc([*args, "--data-dir", str(data)], home, tmp_path / f"coord{len(started)}.log")
        started.append(p)
        return p

    wallet = track.wallet()
    start = track.balance(wallet.address)
    key, worker_key = KeyPair.generate(), KeyPair.generate()
    try:
        address = str(coordinator("127.0.0.1:0").info["listening"])
        worker = Worker(address, worker_key, kind="seeker")
        running = asyncio.create_task(worker.run())
        async with CoordinatorClient(address, key, wallet) as c:
            await asyncio.wait_for(worker.connected.wait(), 20)
            done = [await c.submit(ECHO, f"done{i}") for i in range(3)]
            for job in done:
                assert (await c.wait(job.job_id)).state == COMPLETED
            worker.stop()
            await asyncio.gather(running, return_exceptions=True)
            dropped = [await c.submit(ECHO, f"dropped{i}") for i in range(2)]
            for job in dropped:
                await c.cancel(job.job_id)
        started[0].kill(signal.SIGKILL)  # settlements and refunds may be half done
        coordinator(address)
        async with CoordinatorClient(address, key) as c:

            async def finished() -> bool:
                statuses = [(await c.get(j.job_id)).payment.status for j in done + dropped]
                return statuses[:3] == ["settled"] * 3 and all(
                    s in ("released", "refunded") for s in statuses[3:]
                )

            await wait_until(finished, 60, "every payment settled, released or refunded")
        async with CoordinatorClient(address, worker_key) as w:
            # each completed job credited its worker exactly once, the dropped ones not
            earnings = await w.earnings()
            assert sorted(j.job_id for j in earnings.jobs) == sorted(j.job_id for j in done)
            assert [b.earned for b in earnings.balances] == [str(3 * (PRICE - PRICE // 10))]
    finally:
        for p in started:
            p.kill()
    assert track.balance(wallet.address) == start - 3 * PRICE
    # the store and the chain agree on every settlement and refund
    audit = ("payouts", "audit", "--profile", profile_name, "--coordinator-data", str(data))
    code, out, err = await adispatch(home, *audit)
    assert code == 0, out + err
    [report] = json.loads(out)["networks"]  # the one network the profile accepts
    [totals] = report["assets"].values()
    assert totals["settled_in"] - totals["refunded"] == 3 * PRICE
    assert totals["chain_change"] == totals["expected_change"] == 3 * PRICE


def _register(home: Path, track: Track, key_file: Path) -> dict[str, Any]:
    """A worker registered through the CLI for the track's local profile: its agent id,
    keys, and the address it is paid at (EVM: its agent's owner; Solana: its linked key)."""
    profile_name = "local-monad" if track.kind == "evm" else "local-solana"
    r = dispatch(
        home, "worker", "register", "--profile", profile_name, "--key-file", str(key_file),
        "--name", "paid-worker", "--coordinator", "127.0.0.1:50051",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    out["payout_address"] = out["solana"] if track.kind == "solana" else out["chain_address"]
    return out


def _registered_worker(address: str, key: KeyPair, reg: dict[str, Any]) -> Worker:
    from dispatchnet.chains.evm.node import load_or_create_chain_key
    from dispatchnet.chains.solana.wallet import load_or_create_solana_key

    solana = None
    if reg.get("solana_key_file"):
        seed = bytes(load_or_create_solana_key(Path(reg["solana_key_file"])))[:32]
        solana = KeyPair.from_seed(seed)
    return Worker(
        address, key, kind="seeker", agent_id=reg["agent_id"],
        chain_key=load_or_create_chain_key(Path(reg["chain_key_file"])), solana_key=solana,
        backoff_initial=0.05, backoff_max=0.5,
    )  # fmt: skip


async def test_a_registered_workers_paid_jobs_make_one_payout_to_its_address(
    track: Track, home: Path, tmp_path: Path
) -> None:
    """N paid jobs by one registered worker: one payout transfer of exactly the sum of its
    shares to its payout address, read on chain; GetEarnings lists it, the balance is 0;
    `dispatch worker earnings --profile` reads that address on chain next to the payout."""
    n, share = 3, PRICE - PRICE // 10
    key_file = tmp_path / "w" / "worker.key"
    reg = _register(home, track, key_file)
    start = track.balance(reg["payout_address"])
    # the balance is due once all n shares are in (one payout, not one per job)
    profile = track.profile(True).with_overrides(
        payouts={"min_payout_micros": n * share, "interval_seconds": 3600}
    )
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        key = keys.load_or_create(key_file)
        w = _registered_worker(cluster.address, key, reg)
        cluster.workers.append((w, asyncio.create_task(w.run())))
        await asyncio.wait_for(w.connected.wait(), 20)
        c = cluster.client(wallet=track.wallet())
        for i in range(n):
            job = await c.submit(ECHO, f"paid{i}")
            assert (await c.wait(job.job_id)).state == COMPLETED
        me = cluster.client(key)

        async def paid() -> bool:
            e = await me.earnings()
            return [p.state for p in e.payouts] == ["landed"]

        await wait_until(paid, 60, "the payout landed")
        e = await me.earnings()
        [payout] = e.payouts
        assert payout.amount == str(n * share) and payout.transaction
        # where it went and what names it on chain (EVM: the nonce; Solana: the memo)
        assert payout.to.lower() == reg["payout_address"].lower()
        assert re.fullmatch(r"0x[0-9a-f]{64}", payout.payout_id)
        assert payout.created_at.seconds > 0
        assert [(b.earned, b.balance) for b in e.balances] == [(str(n * share), "0")]

        profile_name = "local-monad" if track.kind == "evm" else "local-solana"
        earnings = ("worker", "earnings", "--coordinator", cluster.address)
        earnings += ("--key-file", str(key_file))
        code, out, err = await adispatch(home, *earnings, "--profile", profile_name)
        assert code == 0, err
        on_chain = json.loads(out)["on_chain"]
        assert on_chain == {
            "profile": profile_name,
            "addresses": [
                {
                    "network": track.chain["network"],
                    "asset": payout.asset,
                    "address": payout.to,
                    "landed_payouts": 1,
                    "landed_total": str(n * share),
                    "in_flight_total": "0",
                    "balance": str(start + n * share),
                }
            ],
            "notes": [],
        }
        # a profile with no chain on the payout's network reads nothing, and says so
        code, out, err = await adispatch(home, *earnings, "--profile", "local")
        assert code == 0, err
        [row] = json.loads(out)["on_chain"]["addresses"]
        assert row["balance"] is None and row["landed_total"] == str(n * share)
        assert json.loads(out)["on_chain"]["notes"] == [
            f"no chain of profile local is on {track.chain['network']}: its balances are not read"
        ]
    assert track.balance(reg["payout_address"]) == start + n * share


async def test_a_payout_is_exactly_once_across_a_coordinator_sigkill(
    track: Track, home: Path, tmp_path: Path
) -> None:
    """A real `dispatch coordinator` on the track's local profile (payouts every 10 s) is
    SIGKILLed right after a registered worker's paid jobs, while the payout may be
    recorded, signed or sent; the restarted one finishes it: the worker's payout address
    receives the sum of its shares exactly once."""
    profile_name = "local-monad" if track.kind == "evm" else "local-solana"
    data = tmp_path / "coord-data"
    started: list[Proc] = []

    def coordinator(listen: str) -> Proc:
        args = ["coordinator", "--profile", profile_name, "--listen", listen]
        p = Proc([*args, "--data-dir", str(data)], home, tmp_path / f"coord{len(started)}.log")
        started.append(p)
        return p

    n, share = 3, PRICE - PRICE // 10
    key_file = tmp_path / "w" / "worker.key"
    reg = _register(home, track, key_file)
    start = track.balance(reg["payout_address"])
    key, worker_key = KeyPair.generate(), keys.load_or_create(key_file)
    try:
        address = str(coordinator("127.0.0.1:0").info["listening"])
        worker = _registered_worker(address, worker_key, reg)
        running = asyncio.create_task(worker.run())
        async with CoordinatorClient(address, key, track.wallet()) as c:
            await asyncio.wait_for(worker.connected.wait(), 20)
            done = [await c.submit(ECHO, f"paid{i}") for i in range(n)]
            for job in done:
                assert (await c.wait(job.job_id)).state == COMPLETED
            worker.stop()
            await asyncio.gather(running, return_exceptions=True)
        started[0].kill(signal.SIGKILL)  # the payout may be half done
        coordinator(address)
        async with CoordinatorClient(address, worker_key) as w:

            async def paid() -> bool:
                e = await w.earnings()
                return (
                    bool(e.payouts)
                    and all(p.state == "landed" for p in e.payouts)
                    and [b.balance for b in e.balances] == ["0"]
                )

            await wait_until(paid, 90, "the worker's balance paid out")
            e = await w.earnings()
            assert sum(int(p.amount) for p in e.payouts) == n * share
    finally:
        for p in started:
            p.kill()
    assert track.balance(reg["payout_address"]) == start + n * share
    # the store and the chain agree: settlements in, the payout out, the fees kept
    audit = ("payouts", "audit", "--profile", profile_name, "--coordinator-data", str(data))
    code, out, err = await adispatch(home, *audit)
    assert code == 0, out + err
    [report] = json.loads(out)["networks"]
    [totals] = report["assets"].values()
    assert (totals["settled_in"], totals["paid_out"], totals["fees_kept"]) == (
        n * PRICE,
        n * share,
        n * (PRICE - share),
    )
    assert totals["chain_change"] == totals["expected_change"] == n * (PRICE - share)
    # a store that says a payout moved more than the chain did: exit 1, the difference named
    with sqlite3.connect(data / "coordinator.db") as db:
        db.execute("UPDATE payouts SET amount = amount + 1")
    code, out, _ = await adispatch(home, *audit)
    assert code == 1
    [report] = json.loads(out)["networks"]
    differences = report["differences"]
    assert len(differences) == len(e.payouts)  # one payout per transaction here
    assert all(d["kinds"] == ["payout"] and d["chain"] == d["store"] + 1 for d in differences)


async def test_payments_on_the_identity_chain_are_paid_out_and_audited_too(
    home: Path, evm_chain: dict[str, Any], solana_chain: dict[str, Any], tmp_path: Path
) -> None:
    """A real `dispatch coordinator` on local-solana that also accepts its [identity_chain]'s
    test USDC (anvil): a registered worker paid in each is paid out on each network, to
    its address there (Solana: the key its registration links; EVM: its agent's), from
    that chain's account; `payouts audit` checks both networks and exits 1 on a
    difference in either."""
    evm, svm = _evm(home, evm_chain), _solana(home, solana_chain)
    networks = [solana_chain["network"], evm_chain["network"]]
    both = tmp_path / "both.toml"
    accept_evm = f'[[payments.accept]]\nnetwork = "{networks[1]}"\nasset = ""\nfacilitator = ""\n'
    text = (PROFILE_DIR / "local-solana.toml").read_text()
    assert text.count("\n[payouts]\n") == 1
    both.write_text(text.replace("\n[payouts]\n", f"\n{accept_evm}\n[payouts]\n"))
    share = PRICE - PRICE // 10
    key_file = tmp_path / "w" / "worker.key"
    reg = _register(home, svm, key_file)
    addresses = {networks[0]: reg["solana"], networks[1]: reg["chain_address"]}
    starts = [svm.balance(addresses[networks[0]]), evm.balance(addresses[networks[1]])]
    data = tmp_path / "coord-data"
    args = ["coordinator", "--profile", str(both), "--listen", "127.0.0.1:0"]
    coordinator = Proc([*args, "--data-dir", str(data)], home, tmp_path / "coord.log")
    worker_key = keys.load_or_create(key_file)
    try:
        address = str(coordinator.info["listening"])
        worker = _registered_worker(address, worker_key, reg)
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 20)
        for wallet in (svm.wallet(), evm.wallet()):  # one job paid on each network
            async with CoordinatorClient(address, KeyPair.generate(), wallet) as c:
                job = await c.submit(ECHO)
                assert (await c.wait(job.job_id)).state == COMPLETED
        async with CoordinatorClient(address, worker_key) as w:

            async def paid() -> bool:
                landed = [p.network for p in (await w.earnings()).payouts if p.state == "landed"]
                return sorted(landed) == sorted(networks)

            await wait_until(paid, 60, "a payout landed on each network")
            e = await w.earnings()
        worker.stop()
        await asyncio.gather(running, return_exceptions=True)
    finally:
        coordinator.kill()
    for p in e.payouts:
        assert (p.to.lower(), p.amount) == (addresses[p.network].lower(), str(share))
    assert sorted((b.network, b.balance) for b in e.balances) == sorted((n, "0") for n in networks)
    assert svm.balance(addresses[networks[0]]) == starts[0] + share
    assert evm.balance(addresses[networks[1]]) == starts[1] + share

    audit = ("payouts", "audit", "--profile", str(both), "--coordinator-data", str(data))
    code, out, err = await adispatch(home, *audit)
    assert code == 0, out + err
    report = json.loads(out)
    assert report["clean"] and [r["network"] for r in report["networks"]] == networks
    for r in report["networks"]:
        [totals] = r["assets"].values()
        assert (totals["settled_in"], totals["paid_out"], totals["fees_kept"]) == (
            PRICE,
            share,
            PRICE - share,
        )
        assert totals["chain_change"] == totals["expected_change"] == PRICE - share
    # the store says the EVM payout moved one unit more than it did: that network differs
    with sqlite3.connect(data / "coordinator.db") as db:
        db.execute("UPDATE payouts SET amount = amount + 1 WHERE network = ?", (networks[1],))
    code, out, _ = await adispatch(home, *audit)
    assert code == 1
    report = json.loads(out)
    assert not report["clean"]
    assert [(r["clean"], len(r["differences"])) for r in report["networks"]] == [
        (True, 0),
        (False, 1),
    ]
    [difference] = report["networks"][1]["differences"]
    assert difference["kinds"] == ["payout"] and difference["chain"] == difference["store"] + 1


async def test_a_node_outage_delays_a_payout_then_it_lands_once(
    track: Track, home: Path, tmp_path: Path
) -> None:
    """The payment chain's node goes away once the worker's share is credited: the payout
    waits (the error noted, jobs unaffected) and lands once when the node is back."""
    proxy = await unreachable_proxy(track.chain)
    _, chain = track.outage(tmp_path / "coordinator.key", proxy.url)
    if track.kind == "evm":  # identities live on the payment chain: through the proxy too
        chain["identity_registry"] = track.chain["contracts"]["identity_registry"]
    profile = track.profile(True, **chain).with_overrides(
        receipts={"anchor": "none"},
        feedback={"enabled": False},
        payouts={"min_payout_micros": 10**9, "interval_seconds": 2},
    )
    share = PRICE - PRICE // 10
    key_file = tmp_path / "w" / "worker.key"
    reg = _register(home, track, key_file)
    start = track.balance(reg["payout_address"])
    await proxy.start()
    try:
        async with cluster_for(profile, tmp_path / "coord") as cluster:
            [payouts] = cluster.coord.payouts
            payouts.retry_initial = payouts.retry_max = 0.2
            key = keys.load_or_create(key_file)
            w = _registered_worker(cluster.address, key, reg)
            cluster.workers.append((w, asyncio.create_task(w.run())))
            await asyncio.wait_for(w.connected.wait(), 20)
            c = cluster.client(wallet=track.wallet())
            job = await c.submit(ECHO, "paid")
            assert (await c.wait(job.job_id)).state == COMPLETED
            me = cluster.client(key)

            async def credited() -> bool:
                return len((await me.earnings()).jobs) == 1

            await wait_until(credited, 30, "the share credited")
            await proxy.stop()
            await wait_until(lambda: bool(payouts.last_error), 30, "the payout waits")
            assert track.balance(reg["payout_address"]) == start
            await proxy.start()

            async def paid() -> bool:
                return [p.state for p in (await me.earnings()).payouts] == ["landed"]

            await wait_until(paid, 60, "the payout landed")
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.stop()
    assert track.balance(reg["payout_address"]) == start + share
