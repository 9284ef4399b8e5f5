"""x402 payments over gRPC against a real anvil with the test USDC: every balance is read on
chain. One anvil per module (chain_fixtures); each test uses fresh payer accounts so the
balances of one test never depend on another."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from chain_fixtures import (  # noqa: F401
    FacilitatorServer,
    TcpProxy,
    adispatch,
    chain,
    chain_profile,
    cluster_for,
    dispatch,
    funded_chain_key,
    home,
)
from conftest import Cluster, wait_until
from test_grpcurl import COORDINATOR, ECHO_SPEC, GRPCURL, call, grpcurl
from x402 import x402FacilitatorSync
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmSchemeConfig
from x402.mechanisms.evm.exact import facilitator as exact_facilitator
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements

import dispatchnet.chains.evm  # noqa: F401  (before web3)
from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.chains.evm.node import load_or_create_chain_key, web3_for
from dispatchnet.chains.evm.payments import TOKEN_ABI, token_balance
from dispatchnet.client import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    CoordinatorClient,
    task_spec,
    trailer,
)
from dispatchnet.devchain.anvil import _rpc
from dispatchnet.keys import KeyPair
from dispatchnet.payments.wallet import Asset, PaymentDeclined, Wallet
from dispatchnet.profiles import AcceptConfig
from dispatchnet.store.sqlite import SqliteStore
from dispatchnet.worker.tasks import TaskError, TaskOutput

NETWORK = "eip155:31337"
ECHO = task_spec("echo", b'{"text": "hi"}')
PRICE = 1000  # CHEAP task, micro-USD = test USDC atomic units


def usdc(deployed: dict[str, Any]) -> str:
    return str(deployed["contracts"]["usdc"])


def balance(deployed: dict[str, Any], address: str) -> int:
    return token_balance(web3_for(deployed["rpc_url"], 5), usdc(deployed), address)


def new_payer(deployed: dict[str, Any], amount: int = 1_000_000) -> Wallet:
    """A fresh account holding `amount` test USDC (sent from the deployment's client)."""
    w3 = web3_for(deployed["rpc_url"], 5)
    account = w3.eth.account.create()
    if amount:
        funder = w3.eth.account.from_key(deployed["accounts"]["client"]["private_key"])
        token = w3.eth.contract(address=usdc(deployed), abi=TOKEN_ABI)
        tx = token.functions.transfer(account.address, amount).build_transaction(
            {"from": funder.address, "nonce": w3.eth.get_transaction_count(funder.address)}
        )
        w3.eth.wait_for_transaction_receipt(
            w3.eth.send_raw_transaction(funder.sign_transaction(tx).raw_transaction)
        )
    return Wallet("0x" + bytes(account.key).hex(), 100_000, [Asset(NETWORK, usdc(deployed))])


@pytest.fixture
async def paid(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    settings = getattr(request, "param", {})
    profile = chain_profile(str(home / "chains" / "local-monad.json"), payments=settings)
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        assert cluster.coord.payments is not None
        cluster.coord.payments.retry_initial, cluster.coord.payments.retry_max = 0.1, 0.3
        yield cluster


def payee(deployed: dict[str, Any]) -> str:
    return str(deployed["accounts"]["coordinator"]["address"])


async def payment_status(cluster: Cluster, job_id: str, status: str) -> None:
    async def reached() -> bool:
        p = cluster.db.get_payment(job_id)
        return p is not None and p.status.value == status

    await wait_until(reached, 30, f"payment {status}")


def credits(cluster: Cluster) -> dict[str, int]:
    """The shares credited to the cluster's workers (not reversed), by job id."""
    return {
        e.job_id: e.share
        for w, _ in cluster.workers
        for e in cluster.db.earnings(w.worker_id, 100)
        if not e.reversed
    }


# [payments] verify_processes: verification in a child process answers the same
IN_A_PROCESS = pytest.mark.parametrize(
    "paid", [{}, {"verify_processes": 1}], indirect=True, ids=["thread", "verifier-process"]
)


@IN_A_PROCESS
async def test_a_paid_job_is_settled_once_after_it_completes(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    assert paid.coord.payments is not None
    in_process = "verify_processes" in request.node.callspec.params["paid"]
    assert ("verified in 1 process" in paid.coord.payments.gateway.describe()) == in_process
    await paid.worker("seeker")
    wallet = new_payer(chain)
    before_payer, before_payee = balance(chain, wallet.address), balance(chain, payee(chain))
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)
    response = json.loads(base64.b64decode(c.last_payment_response))
    assert response["success"] is True and response["extra"]["status"] == "authorized"
    assert job.payment.status == "authorized" and job.payment.payer == wallet.address
    done = await c.wait(job.job_id)
    assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
    await payment_status(paid, job.job_id, "settled")
    final = await c.get(job.job_id)
    assert final.payment.transaction.startswith("0x")
    assert balance(chain, wallet.address) == before_payer - PRICE
    assert balance(chain, payee(chain)) == before_payee + PRICE
    receipt = await c.receipt(job.job_id)
    assert receipt.decoded.payment.status == "authorized"
    assert receipt.payment.status == "settled"
    assert receipt.payment.transaction == final.payment.transaction
    # the worker earns the price minus the coordinator's 10% ([payouts] fee_bps)
    assert credits(paid) == {job.job_id: PRICE - PRICE // 10}
    [info] = await c.list_workers()
    assert [b.earned for b in info.lifetime_earnings] == [str(PRICE - PRICE // 10)]


async def test_no_payment_is_resource_exhausted_with_the_requirements(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    c = paid.client()
    quote = await c.quote(ECHO)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.commit(quote.quote_id)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    required = json.loads(base64.b64decode(trailer(e.value.trailing_metadata(), PAYMENT_REQUIRED)))
    [accept] = required["accepts"]
    assert required["x402Version"] == 2
    assert accept["network"] == NETWORK and accept["amount"] == str(PRICE)
    assert accept["asset"].lower() == usdc(chain).lower()
    assert accept["payTo"].lower() == payee(chain).lower()
    assert accept["extra"] == {"name": "USDC", "version": "2"}
    assert trailer(e.value.trailing_metadata(), PAYMENT_RESPONSE) == ""


async def test_the_quote_says_how_to_pay_so_a_paid_commit_is_one_call(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    await paid.worker("seeker")
    c = paid.client(wallet=new_payer(chain))
    call = c.jobs.GetQuote(coordinator_pb2.GetQuoteRequest(spec=ECHO), metadata=c.metadata())
    quote = (await call).quote
    required = json.loads(
        base64.b64decode(trailer(await call.trailing_metadata(), PAYMENT_REQUIRED))
    )
    [accept] = required["accepts"]
    assert accept["amount"] == str(PRICE) and accept["payTo"].lower() == payee(chain).lower()
    assert quote.quote_id in required["resource"]["url"]
    # the client pays with what GetQuote said: one CommitJob, no refusal first
    commits: list[str] = []
    real = c._commit

    async def counted(request: Any, extra: Any) -> Any:
        commits.append(dict(extra).get(PAYMENT_SIGNATURE, ""))
        return await real(request, extra)

    c._commit = counted  # type: ignore[method-assign]
    job = await c.submit(ECHO)
    assert len(commits) == 1 and commits[0]
    assert job.payment.status == "authorized"
    assert json.loads(base64.b64decode(c.last_payment_response))["extra"]["jobId"] == job.job_id
    assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED


async def test_run_job_is_paid_for_a_quote_and_charged_once(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """RunJob with a spec is refused (a payment is for a quote); with the quote and its
    payment it commits, waits and answers the final job with the payment-response; the same
    quote and key again returns that job and charges nothing more."""
    await paid.worker("seeker")
    payer = new_payer(chain)
    c = paid.client(wallet=payer)
    bare = coordinator_pb2.RunJobRequest(spec=ECHO, idempotency_key="spec-only")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.jobs.RunJob(bare, metadata=c.metadata())
    assert e.value.code() == RE and "GetQuote" in str(e.value.details())

    start = balance(chain, payer.address)
    job = await c.run(ECHO, "paid-run")
    assert job.state == coordinator_pb2.JOB_STATE_COMPLETED, job.failure
    assert job.payment.payer.lower() == payer.address.lower()
    assert json.loads(base64.b64decode(c.last_payment_response))["extra"]["jobId"] == job.job_id
    await payment_status(paid, job.job_id, "settled")
    assert balance(chain, payer.address) == start - PRICE

    again = coordinator_pb2.RunJobRequest(quote_id=job.quote_id, idempotency_key="paid-run")
    resp = await c.jobs.RunJob(again, metadata=c.metadata())  # no payment sent: none needed
    assert not resp.created and resp.job.job_id == job.job_id
    assert balance(chain, payer.address) == start - PRICE
    assert paid.db._conn.execute("SELECT COUNT(*) FROM payments").fetchone()[0] == 1


# --- crafting payments ------------------------------------------------------------------------


async def required_header(c: CoordinatorClient, quote_id: str) -> str:
    """The payment-required trailer CommitJob answers a commit without payment with."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c._commit(
            coordinator_pb2.CommitJobRequest(quote_id=quote_id, idempotency_key="x"), ()
        )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return trailer(e.value.trailing_metadata(), PAYMENT_REQUIRED)


def signed(
    wallet: Wallet, header: str, change: Callable[[PaymentRequirements], None] | None = None
) -> PaymentPayload:
    """A payload the wallet signs for the first accepted requirement, after `change` to
    what it signs; `accepted` still names the requirement as offered."""
    required = decode_payment_required_header(header)
    assert isinstance(required, PaymentRequired)
    offered = required.accepts[0]
    signing = offered.model_copy(deep=True)
    if change is not None:
        change(signing)
    wallet.client.set_spend_controls(False)
    payload = wallet.client.create_payment_payload(
        required.model_copy(update={"accepts": [signing]})
    )
    assert isinstance(payload, PaymentPayload)
    return payload.model_copy(update={"accepted": offered})


async def commit_with(
    c: CoordinatorClient, quote_id: str, signature: str, key: str = ""
) -> coordinator_pb2.Job:
    request = coordinator_pb2.CommitJobRequest(
        quote_id=quote_id, idempotency_key=key or uuid.uuid4().hex
    )
    return await c._commit(request, ((PAYMENT_SIGNATURE, signature),))


async def refused(
    c: CoordinatorClient, quote_id: str, signature: str
) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, x402 error) of a commit that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await commit_with(c, quote_id, signature)
    header = trailer(e.value.trailing_metadata(), PAYMENT_REQUIRED)
    error = json.loads(base64.b64decode(header)).get("error", "") if header else ""
    return e.value.code(), e.value.details() or "", error


def balances(deployed: dict[str, Any], *addresses: str) -> list[int]:
    return [balance(deployed, a) for a in addresses]


RE = grpc.StatusCode.RESOURCE_EXHAUSTED


@IN_A_PROCESS
async def test_refused_payments_move_nothing(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """Underpayment, wrong asset, wrong chain, wrong recipient, expired authorization, a
    signature by another key, and a payer without the funds: RESOURCE_EXHAUSTED with the
    reason, no job, and not one token moved."""
    wallet, other, poor = new_payer(chain), new_payer(chain), new_payer(chain, PRICE - 1)
    c = paid.client()
    quote = await c.quote(ECHO)
    header = await required_header(c, quote.quote_id)
    start = balances(chain, wallet.address, other.address, poor.address, payee(chain))

    def amount(r: PaymentRequirements) -> None:
        r.amount = str(PRICE - 1)

    def expired(r: PaymentRequirements) -> None:
        r.max_timeout_seconds = 1  # validBefore = now + 1: inside the facilitator's margin

    underpaid = signed(wallet, header, amount)
    code, _, error = await refused(c, quote.quote_id, encode_payment_signature_header(underpaid))
    assert (code, error) == (RE, "invalid_exact_evm_payload_authorization_value_mismatch")
    # the same underpayment naming what it signed: matches no accepted requirement
    honest = underpaid.model_copy(
        update={"accepted": underpaid.accepted.model_copy(update={"amount": str(PRICE - 1)})}
    )
    code, details, error = await refused(c, quote.quote_id, encode_payment_signature_header(honest))
    assert (code, error) == (RE, "no_matching_requirements") and "accepts" in details

    for field, value in (
        ("asset", chain["contracts"]["receipt_anchor"]),  # another token
        ("network", "eip155:10143"),  # another chain
        ("pay_to", other.address),  # another recipient
    ):
        payload = signed(wallet, header)
        payload = payload.model_copy(
            update={"accepted": payload.accepted.model_copy(update={field: value})}
        )
        code, _, error = await refused(c, quote.quote_id, encode_payment_signature_header(payload))
        assert (code, error) == (RE, "no_matching_requirements"), field

    code, _, error = await refused(
        c, quote.quote_id, encode_payment_signature_header(signed(wallet, header, expired))
    )
    assert (code, error) == (RE, "invalid_exact_evm_payload_authorization_valid_before")

    forged = signed(other, header)  # other's signature over an authorization from wallet
    forged.payload["authorization"]["from"] = wallet.address
    code, _, error = await refused(c, quote.quote_id, encode_payment_signature_header(forged))
    assert (code, error) == (RE, "invalid_exact_evm_payload_signature")

    code, _, error = await refused(
        c, quote.quote_id, encode_payment_signature_header(signed(poor, header))
    )
    assert (code, error) == (RE, "invalid_exact_evm_insufficient_balance")

    assert balances(chain, wallet.address, other.address, poor.address, payee(chain)) == start
    assert paid.db.open_payments() == []


async def test_malformed_payments_are_invalid_argument(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    c = paid.client()
    quote = await c.quote(ECHO)
    header = await required_header(c, quote.quote_id)
    good = encode_payment_signature_header(signed(new_payer(chain), header))
    data = json.loads(base64.b64decode(good))
    data["payload"]["authorization"]["value"] = "lots"

    def respelled(field: str, spell: Callable[[str], str]) -> str:
        """good with one authorization field spelled another way the SDK would read"""
        other = json.loads(base64.b64decode(good))
        auth = other["payload"]["authorization"]
        auth[field] = spell(auth[field])
        return base64.b64encode(json.dumps(other).encode()).decode()

    # the nonce is the replay key: another spelling of a used one must not pass for new
    nonces = [
        respelled("nonce", lambda n: n.removeprefix("0x")),
        respelled("nonce", lambda n: n[:10] + " " + n[10:]),
        respelled("nonce", lambda n: "0X" + n[2:]),
        respelled("from", lambda a: a.removeprefix("0x")),
    ]
    # valid for longer than the quote's maxTimeoutSeconds (+ the clock slack): refused
    # before anything is verified (it would stay due, and be retried, that long)
    years = respelled("validBefore", lambda t: str(int(t) + 10 * 365 * 86400))
    code, details, error = await refused(c, quote.quote_id, years)
    assert (code, error) == (RE, "authorization_too_long"), details
    for bad in (
        "not base64 at all!",
        base64.b64encode(b"[1, 2").decode(),
        base64.b64encode(b'{"x402Version": 2}').decode(),
        base64.b64encode(json.dumps(data).encode()).decode(),
        *nonces,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await commit_with(c, quote.quote_id, bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "payment-signature" in (e.value.details() or "")


async def test_a_payment_is_accepted_once(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The same payment on two concurrent commits, again while its job waits, again after
    it settled, and again after a restart: one job, charged once. Retrying the commit
    with its idempotency key returns the job without charging again."""
    wallet = new_payer(chain)
    start_payer, start_payee = balances(chain, wallet.address, payee(chain))
    c = paid.client()
    quotes = [await c.quote(ECHO) for _ in range(4)]
    header = await required_header(c, quotes[0].quote_id)
    signature = encode_payment_signature_header(signed(wallet, header))

    results = await asyncio.gather(
        commit_with(c, quotes[0].quote_id, signature, "first"),
        commit_with(c, quotes[1].quote_id, signature, "second"),
        return_exceptions=True,
    )
    jobs = [r for r in results if isinstance(r, coordinator_pb2.Job)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(jobs) == 1 and len(errors) == 1, results
    assert errors[0].code() == RE
    assert "already used" in (errors[0].details() or "")
    (job,) = jobs

    code, _, error = await refused(c, quotes[2].quote_id, signature)  # the job still waits
    assert (code, error) == (RE, "payment_already_used")
    key = "first" if job.quote_id == quotes[0].quote_id else "second"
    again = await commit_with(c, job.quote_id, signature, key)  # a retry of the commit
    assert again.job_id == job.job_id
    # the retry needs no payment: without one, or with one that is malformed, or with
    # another that verifies (not used: the job is paid already), the job again
    fresh = encode_payment_signature_header(signed(wallet, header))
    retry = coordinator_pb2.CommitJobRequest(quote_id=job.quote_id, idempotency_key=key)
    for metadata in ((), ((PAYMENT_SIGNATURE, "not a payment"),), ((PAYMENT_SIGNATURE, fresh),)):
        assert (await c._commit(retry, metadata)).job_id == job.job_id
    assert len(paid.db.open_payments()) == 1

    await paid.worker("seeker")
    assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    await payment_status(paid, job.job_id, "settled")
    code, _, error = await refused(c, quotes[3].quote_id, signature)
    assert (code, error) == (RE, "payment_already_used")

    assert balances(chain, wallet.address, payee(chain)) == [
        start_payer - PRICE,
        start_payee + PRICE,
    ]


@IN_A_PROCESS
async def test_a_payer_cannot_commit_more_than_its_balance_covers(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """Each payment verifies against the payer's whole balance, and a job's payment moves
    only once it completes: a payer holding two prices may not have a third job run on
    them (which would never settle), whether the commits come at once or one after
    another. The two jobs run and settle; the balance is spent exactly."""
    wallet = new_payer(chain, 2 * PRICE)
    c = paid.client()
    quotes = [await c.quote(ECHO) for _ in range(4)]
    header = await required_header(c, quotes[0].quote_id)
    signatures = [encode_payment_signature_header(signed(wallet, header)) for _ in quotes]
    results = await asyncio.gather(
        *(commit_with(c, q.quote_id, s) for q, s in zip(quotes[:3], signatures, strict=False)),
        return_exceptions=True,
    )
    jobs = [r for r in results if isinstance(r, coordinator_pb2.Job)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(jobs) == 2 and len(errors) == 1, results
    assert errors[0].code() == RE and "does not cover" in (errors[0].details() or "")
    code, details, error = await refused(c, quotes[3].quote_id, signatures[3])
    assert (code, error) == (RE, "insufficient_funds"), details
    assert "not settled yet (2000)" in details

    await paid.worker("seeker")
    for job in jobs:
        assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
        await payment_status(paid, job.job_id, "settled")
    assert balance(chain, wallet.address) == 0
    assert len(paid.db.open_payments()) == 0


async def test_replay_protection_survives_a_restart(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    profile = chain_profile(str(home / "chains" / "local-monad.json"), payments={})
    wallet, key = new_payer(chain), KeyPair.generate()
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        c = cluster.client(key)
        quote = await c.quote(ECHO)
        signature = encode_payment_signature_header(
            signed(wallet, await required_header(c, quote.quote_id))
        )
        job = await commit_with(c, quote.quote_id, signature, "k")  # waits: no worker
    async with cluster_for(profile, tmp_path / "coord") as cluster:
        c = cluster.client(key)
        code, _, error = await refused(c, (await c.quote(ECHO)).quote_id, signature)
        assert (code, error) == (RE, "payment_already_used")
        await cluster.worker("seeker")
        assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
        await payment_status(cluster, job.job_id, "settled")


class Broken:
    """An executor for echo that always fails (retryable): the job fails on every worker."""

    tasks = ["echo"]
    llm_models: list[str] = []

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        return spec.WhichOneof("work") == "task" and spec.task.name == "echo"

    async def run(self, spec: common_pb2.JobSpec, progress: Any) -> TaskOutput:
        raise TaskError("broken", "this worker breaks every job", retryable=True)


async def test_a_job_that_fails_everywhere_is_never_charged(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    await paid.worker("seeker", executors=[Broken()])
    wallet = new_payer(chain)
    start = balances(chain, wallet.address, payee(chain))
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)
    assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_FAILED
    await payment_status(paid, job.job_id, "released")
    final = await c.get(job.job_id)
    assert final.payment.status == "released" and final.payment.transaction == ""
    assert balances(chain, wallet.address, payee(chain)) == start

    cancelled = await c.submit(ECHO, "to-cancel")
    await c.cancel(cancelled.job_id)
    await payment_status(paid, cancelled.job_id, "released")
    assert balances(chain, wallet.address, payee(chain)) == start
    assert credits(paid) == {}  # released: no worker earns anything


EARLY = {"max_authorization_seconds": 16, "settle_margin_seconds": 15}


@pytest.mark.parametrize("paid", [EARLY], indirect=True)
async def test_a_short_authorization_is_settled_early_and_refunded_if_the_job_fails(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """The authorization would expire before the job could finish: the coordinator settles
    while the job waits, and pays the payer back on chain when the job then fails."""
    wallet = new_payer(chain)
    start_payer, start_payee = balances(chain, wallet.address, payee(chain))
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)  # no worker yet: the job waits
    await payment_status(paid, job.job_id, "held")
    held = await c.get(job.job_id)
    assert held.state == coordinator_pb2.JOB_STATE_QUEUED and held.payment.transaction
    assert balances(chain, wallet.address, payee(chain)) == [
        start_payer - PRICE,
        start_payee + PRICE,
    ]
    await paid.worker("seeker", executors=[Broken()])
    assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_FAILED
    await payment_status(paid, job.job_id, "refunded")
    final = await c.get(job.job_id)
    assert final.payment.refund_transaction.startswith("0x")
    receipt = web3_for(chain["rpc_url"], 5).eth.get_transaction_receipt(
        final.payment.refund_transaction
    )
    assert receipt["status"] == 1
    assert balances(chain, wallet.address, payee(chain)) == [start_payer, start_payee]
    assert credits(paid) == {}  # the money arrived, but no worker completed the job

    # a held payment whose job completes is simply settled
    ok = await c.submit(task_spec("sha256", b"data"), "completes")  # Broken cannot run it
    await payment_status(paid, ok.job_id, "held")
    await paid.worker("seeker")
    assert (await c.wait(ok.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    await payment_status(paid, ok.job_id, "settled")
    assert balance(chain, wallet.address) == start_payer - PRICE

    # settled early while the job runs: the receipt still matches (it signs the
    # authorization, not the settlement), and the job completes settled
    slow = await c.submit(task_spec("sleep", b'{"ms": 2500}'), "slow")
    assert (await c.wait(slow.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    assert (await c.get(slow.job_id)).attempts == 1
    await payment_status(paid, slow.job_id, "settled")
    receipt = await c.receipt(slow.job_id)
    assert receipt.decoded.payment.status == "authorized"
    assert receipt.decoded.payment.transaction == ""
    assert receipt.payment.status == "settled"
    assert balance(chain, wallet.address) == start_payer - 2 * PRICE
    assert credits(paid) == {ok.job_id: PRICE - PRICE // 10, slow.job_id: PRICE - PRICE // 10}


@pytest.mark.parametrize("paid", [EARLY], indirect=True)
async def test_a_job_whose_early_settlement_is_refused_is_cancelled(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """Settled early (its authorization is short) while the job waits, the payment is
    refused: the payer spent its balance elsewhere after committing. The job is cancelled,
    not run for nothing; the payer is not charged and no worker is credited."""
    wallet = new_payer(chain, PRICE)
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)  # no worker: the job waits
    spend(chain, wallet, PRICE)
    await payment_status(paid, job.job_id, "failed")
    ended = await c.wait(job.job_id)
    assert ended.state == coordinator_pb2.JOB_STATE_CANCELLED
    assert "payment was refused on chain" in ended.failure.message
    await paid.worker("seeker")
    assert (await c.get(job.job_id)).state == coordinator_pb2.JOB_STATE_CANCELLED
    assert credits(paid) == {}


async def test_a_settlement_sent_before_a_crash_is_not_sent_again(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settlement went on chain but the coordinator never recorded it: the next
    attempt finds the used authorization on chain and records that transaction, even
    once the authorization has expired. An expired one that was never used is written
    off: the payer is not charged."""
    service = paid.coord.payments
    assert service is not None
    await service.stop()  # settle by hand below
    await paid.worker("seeker")
    wallet = new_payer(chain)
    start = balance(chain, wallet.address)
    c = paid.client(wallet=wallet)
    jobs = [await c.submit(ECHO, key) for key in ("crash", "expired-after-crash", "expired")]
    for job in jobs:
        assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    payments = [paid.db.get_payment(job.job_id) for job in jobs]
    assert all(p is not None and p.status.value == "authorized" for p in payments)
    sent = [await asyncio.to_thread(service.gateway.settle, p) for p in payments[:2]]  # "crash"

    crashed = payments[0]
    assert crashed is not None
    assert await asyncio.to_thread(service.gateway.settle, crashed) == sent[0]  # not again
    # the coordinator comes back after the authorizations expired: the chain's clock and
    # the facilitator's jump two hours (the chain's state is put back afterwards)
    rpc = chain["rpc_url"]
    snapshot = _rpc(rpc, "evm_snapshot", [], timeout=5)
    try:
        _rpc(rpc, "evm_increaseTime", [7200], timeout=5)
        _rpc(rpc, "evm_mine", [], timeout=5)
        later = time.time() + 7200
        monkeypatch.setattr(exact_facilitator, "time", SimpleNamespace(time=lambda: later))
        monkeypatch.setattr(
            service, "cfg", dataclasses.replace(service.cfg, settle_max_wait_seconds=0)
        )
        assert await service.settle_due() == 3
        final = [paid.db.get_payment(job.job_id) for job in jobs]
        assert [(p.status.value, p.transaction) for p in final if p is not None] == [
            ("settled", sent[0]),
            ("settled", sent[1]),
            ("failed", ""),
        ]
        assert final[2] is not None and "valid_before" in final[2].error
        assert balance(chain, wallet.address) == start - 2 * PRICE
    finally:
        _rpc(rpc, "evm_revert", [snapshot], timeout=5)


async def test_a_settlement_that_may_be_in_flight_when_the_job_is_cancelled_is_not_released(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payment came due before its job ran (settle_by: a short authorization) and a
    settlement was sent but never recorded (the coordinator died); the restarted one sees
    the job cancelled. Released, the settlement could still land and charge the payer for
    nothing (it did: released at once, charged, never paid back). It is settled instead,
    which finds the one sent, and paid back."""
    service = paid.coord.payments
    assert service is not None
    await service.stop()  # passes by hand below, on a clock of our own
    wallet = new_payer(chain)
    start_payer, start_payee = balances(chain, wallet.address, payee(chain))
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)  # no worker: the job waits
    p = paid.db.get_payment(job.job_id)
    assert p is not None and p.status.value == "authorized" and p.attempts == 0
    sent = await asyncio.to_thread(service.gateway.settle, p)  # sent, never recorded
    assert (await c.cancel(job.job_id)).state == coordinator_pb2.JOB_STATE_CANCELLED

    # as after a restart once the payment had come due
    monkeypatch.setattr(service, "started_at", p.settle_by + 1)
    monkeypatch.setattr(service, "clock", lambda: p.settle_by + 2)
    for _ in range(10):
        await service.settle_due()
        final = paid.db.get_payment(job.job_id)
        assert final is not None and final.status.value != "released"
        if final.status.value == "refunded":
            break
    assert (final.status.value, final.transaction) == ("refunded", sent)
    assert balances(chain, wallet.address, payee(chain)) == [start_payer, start_payee]
    assert credits(paid) == {}

    # one never due (nothing can have been sent) is released at once
    other = await c.submit(ECHO, "never due")
    await c.cancel(other.job_id)
    monkeypatch.setattr(service, "clock", time.time)
    monkeypatch.setattr(service, "started_at", time.time())
    await service.settle_due()
    assert paid.db.get_payment(other.job_id).status.value == "released"  # type: ignore[union-attr]


class _Died(BaseException):
    """The coordinator process ending at that point (nothing after it runs)."""


async def test_a_payment_settled_before_its_job_ends_is_marked_before_the_settlement_goes(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payment due before its job ran is marked in the store (an attempt) before its
    settlement goes out. The coordinator died with it out; the one that takes over (here
    the same service with what it kept in memory gone, as another coordinator on a shared
    store has it: it started before the payment came due) sees the job cancelled and
    settles and pays back, where it used to release a payment the chain then charged."""
    service = paid.coord.payments
    assert service is not None
    await service.stop()  # passes by hand below, on a clock of our own
    wallet = new_payer(chain)
    start_payer, start_payee = balances(chain, wallet.address, payee(chain))
    c = paid.client(wallet=wallet)
    job = await c.submit(ECHO)  # no worker: the job waits
    p = paid.db.get_payment(job.job_id)
    assert p is not None and p.attempts == 0 and service.started_at < p.settle_by
    path = paid.coord.store.path
    marked_when_sent: list[int] = []
    settle_batch = service.gateway.settle_batch

    def dies_once_sent(chunk: list[Any]) -> Any:
        reader = SqliteStore(path, read_only=True)  # this thread's own connection
        try:
            marked_when_sent.extend(reader.get_payment(q.job_id).attempts for q in chunk)  # type: ignore[union-attr]
        finally:
            reader.close()
        settle_batch(chunk)
        raise _Died

    monkeypatch.setattr(service.gateway, "settle_batch", dies_once_sent)
    monkeypatch.setattr(service, "clock", lambda: p.settle_by + 2)
    with pytest.raises(_Died):
        await service.settle_due()
    assert marked_when_sent == [1]
    assert balance(chain, wallet.address) == start_payer - PRICE  # it landed
    monkeypatch.setattr(service.gateway, "settle_batch", settle_batch)

    service._sent.clear()  # what the next coordinator knows: the store
    assert (await c.cancel(job.job_id)).state == coordinator_pb2.JOB_STATE_CANCELLED
    for _ in range(10):
        await service.settle_due()
        final = paid.db.get_payment(job.job_id)
        assert final is not None and final.status.value != "released"
        if final.status.value == "refunded":
            break
    assert final.status.value == "refunded"
    assert balances(chain, wallet.address, payee(chain)) == [start_payer, start_payee]
    assert credits(paid) == {}


async def test_the_chain_down_at_commit_is_unavailable_and_during_settlement_waits(
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Node unreachable: CommitJob answers UNAVAILABLE (not a refused payment); a completed
    job's settlement waits for the node and then happens exactly once."""
    key_file = tmp_path / "coordinator-chain.key"
    address = funded_chain_key(chain, key_file)
    proxy = TcpProxy(int(chain["rpc_url"].rsplit(":", 1)[1]))
    await proxy.start()
    profile = chain_profile(
        "",
        payments={},
        devchain="",
        rpc_url=proxy.url,
        usdc=usdc(chain),
        key_file=str(key_file),
        rpc_timeout_seconds=2,
        tx_timeout_seconds=5,
    ).with_overrides(receipts={"anchor": "none"}, feedback={"enabled": False})
    wallet = new_payer(chain)
    start_payer, start_payee = balances(chain, wallet.address, address)
    try:
        async with cluster_for(profile, tmp_path / "coord") as cluster:
            assert cluster.coord.payments is not None
            cluster.coord.payments.retry_initial = cluster.coord.payments.retry_max = 0.2
            c = cluster.client(wallet=wallet)
            quote = await c.quote(ECHO)
            header = await required_header(c, quote.quote_id)
            signature = encode_payment_signature_header(signed(wallet, header))
            await proxy.stop()
            code, details, _ = await refused(c, quote.quote_id, signature)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "unreachable" in details

            await proxy.start()
            job = await commit_with(c, quote.quote_id, signature)  # the same payment, now
            await proxy.stop()
            await cluster.worker("seeker")
            assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED

            def waiting_with_error() -> bool:
                p = cluster.db.get_payment(job.job_id)
                return p is not None and p.status.value == "authorized" and p.attempts > 0

            await wait_until(waiting_with_error, 20, "a settlement waiting for the node")
            assert balances(chain, wallet.address, address) == [start_payer, start_payee]
            await proxy.start()
            await payment_status(cluster, job.job_id, "settled")
    finally:
        if proxy.server is not None:
            await proxy.stop()
    assert balances(chain, wallet.address, address) == [start_payer - PRICE, start_payee + PRICE]


async def test_the_wallet_keeps_to_its_limit(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    wallet = new_payer(chain)
    stingy = Wallet(wallet.account.key.hex(), PRICE - 1, wallet.extra_assets)
    c = paid.client(wallet=stingy)
    with pytest.raises(PaymentDeclined, match="more than the"):
        await c.submit(ECHO)
    unknown = Wallet(wallet.account.key.hex(), 100_000, [])  # does not know the test USDC
    with pytest.raises(PaymentDeclined, match="unknown asset"):
        await paid.client(wallet=unknown).submit(ECHO)
    assert balance(chain, wallet.address) == 1_000_000


# --- the manual story: the CLI and grpcurl ------------------------------------------------------


async def test_cli_and_grpcurl_pay_with_the_deployment_wallet(
    paid: Cluster,
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """`dispatch job submit` pays by itself with the profile's wallet (the deployment's
    client account); with grpcurl, the payment-required trailer decodes to the quote's
    requirements and `dispatch wallet pay` answers it."""
    await paid.worker("seeker")
    client = str(chain["accounts"]["client"]["address"])
    start = balance(chain, client)
    code, out, err = await adispatch(
        home, "job", "submit", "--coordinator", paid.address, "--profile", "local-monad",
        "--task", "echo", "--input", '{"a": 1}', "--wait",
    )  # fmt: skip
    assert code == 0, err
    job = json.loads(out)
    assert job["state"] == "JOB_STATE_COMPLETED" and job["payment"]["payer"] == client
    await payment_status(paid, job["job_id"], "settled")
    assert balance(chain, client) == start - PRICE

    code, out, err = await adispatch(
        home, "job", "submit", "--coordinator", paid.address, "--no-pay", "--task", "echo",
    )  # fmt: skip
    assert code == 1 and "RESOURCE_EXHAUSTED" in err
    assert f"{PRICE} atomic units of {usdc(chain)} on {NETWORK}" in err

    # grpcurl: quote, commit without payment (-v shows the trailers), pay, commit again
    if not GRPCURL.exists():
        pytest.skip("no grpcurl")
    quote = await call(paid.address, f"{COORDINATOR}/GetQuote", ECHO_SPEC)
    code, out, err = await adispatch(home, "auth", "header", "--raw")
    assert code == 0, err
    auth = ("-H", f"authorization: {out.strip()}")
    body = {"quote_id": quote["quote"]["quote_id"], "idempotency_key": "by-hand"}
    code, out = await grpcurl(
        "-v", *auth, "-d", json.dumps(body), paid.address, f"{COORDINATOR}/CommitJob"
    )
    assert code != 0 and "Code: ResourceExhausted" in out, out
    required = re.search(r"^payment-required: (\S+)$", out, re.M)
    assert required is not None, out
    decoded = json.loads(base64.b64decode(required.group(1)))
    assert decoded["accepts"][0]["amount"] == str(PRICE)
    code, signature, err = await adispatch(
        home, "wallet", "pay", required.group(1), "--profile", "local-monad"
    )
    assert code == 0, err
    code, out = await grpcurl(
        "-v", *auth, "-H", f"payment-signature: {signature.strip()}",
        "-d", json.dumps(body), paid.address, f"{COORDINATOR}/CommitJob",
    )  # fmt: skip
    assert code == 0, out
    response = re.search(r"^payment-response: (\S+)$", out, re.M)
    assert response is not None, out
    assert json.loads(base64.b64decode(response.group(1)))["payer"] == client


# --- an HTTP facilitator (how monad-testnet settles) ------------------------------------------


class HttpFacilitator(FacilitatorServer):
    """An x402 facilitator served over HTTP on 127.0.0.1:<free port>: the SDK's facilitator
    with its own web3 signer (its own funded account pays the gas), behind the /supported,
    /verify and /settle endpoints the SDK's HTTPFacilitatorClient calls."""

    def __init__(self, chain: dict[str, Any], key: str) -> None:  # noqa: F811
        signer = FacilitatorWeb3Signer(key, chain["rpc_url"])
        self.address = signer.address
        self.facilitator = x402FacilitatorSync()
        self.facilitator.register(
            [NETWORK], ExactEvmFacilitatorScheme(signer, ExactEvmSchemeConfig(True))
        )
        super().__init__(self.facilitator)


async def test_payments_through_an_http_facilitator(
    home: Path,  # noqa: F811
    chain: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """monad-testnet's way (a facilitator URL), on the local chain: verified and settled by
    the remote facilitator, whose account pays the gas; UNAVAILABLE while it is down."""
    fee_payer = tmp_path / "facilitator.key"
    funded_chain_key(chain, fee_payer)
    remote = HttpFacilitator(chain, load_or_create_chain_key(fee_payer))
    try:
        profile = chain_profile(
            str(home / "chains" / "local-monad.json"),
            payments={"accept": [AcceptConfig(network=NETWORK, facilitator=remote.url)]},
        )
        wallet = new_payer(chain)
        start_payer, start_payee = balances(chain, wallet.address, payee(chain))
        async with cluster_for(profile, tmp_path / "coord") as cluster:
            await cluster.worker("seeker")
            c = cluster.client(wallet=wallet)
            job = await c.submit(ECHO)
            assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
            await payment_status(cluster, job.job_id, "settled")
            tx = (await c.get(job.job_id)).payment.transaction
            sent = web3_for(chain["rpc_url"], 5).eth.get_transaction(tx)
            assert sent["from"] == remote.address  # the facilitator paid the gas
            assert balances(chain, wallet.address, payee(chain)) == [
                start_payer - PRICE,
                start_payee + PRICE,
            ]
            remote.stop()
            quote = await c.quote(ECHO)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.commit(quote.quote_id)  # asks, pays, and the facilitator is gone
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            assert "facilitator" in (e.value.details() or "")
    finally:
        if remote.thread.is_alive():
            remote.stop()


def test_wallet_commands(home: Path, chain: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    made = dispatch(home, "wallet", "new", "--key-file", str(tmp_path / "w.key"))
    assert made.returncode == 0, made.stderr
    address = json.loads(made.stdout)["address"]
    assert (tmp_path / "w.key").stat().st_mode & 0o777 == 0o600
    again = dispatch(home, "wallet", "new", "--key-file", str(tmp_path / "w.key"))
    assert again.returncode != 0 and "exists already" in again.stderr
    shown = dispatch(home, "wallet", "address", "--wallet-key", str(tmp_path / "w.key"))
    assert json.loads(shown.stdout) == {"address": address}

    out = dispatch(home, "wallet", "balance", "--profile", "local-monad")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["address"] == chain["accounts"]["client"]["address"]
    assert report["network"] == NETWORK
    assert report["balances"] == [
        {"asset": usdc(chain), "balance": balance(chain, report["address"])}
    ]
    missing = dispatch(home, "wallet", "address", "--wallet-key", str(tmp_path / "none.key"))
    assert missing.returncode != 0 and "no wallet key file" in missing.stderr


async def test_a_commit_that_cannot_go_ahead_is_refused_before_any_payment(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """An unpaired PRIVATE job, an unknown quote or a bad idempotency key: the commit's
    own error, not a payment request, and nothing signed or moved."""
    wallet = new_payer(chain)
    c = paid.client(wallet=wallet)
    quote = await c.quote(task_spec("echo", b"{}", private=True))
    for quote_id, key, code in (
        (quote.quote_id, "k", grpc.StatusCode.FAILED_PRECONDITION),
        ("q_unknown", "k", grpc.StatusCode.NOT_FOUND),
        (quote.quote_id, "", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c._commit(
                coordinator_pb2.CommitJobRequest(quote_id=quote_id, idempotency_key=key), ()
            )
        assert e.value.code() == code, e.value.details()
        assert trailer(e.value.trailing_metadata(), PAYMENT_REQUIRED) == ""
    assert balance(chain, wallet.address) == 1_000_000
    assert paid.db.open_payments() == []


async def test_payments_due_together_settle_in_one_transaction(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settlement is batched: the payments due go out in one BatchSettler transaction, and
    one the token refuses inside the batch (its payer spent half its balance elsewhere
    after committing two jobs, so an earlier payment of the same batch takes the rest)
    fails alone, not charged, while the others settle."""
    service = paid.coord.payments
    assert service is not None
    await service.stop()  # let them all come due, then settle by hand
    await paid.worker("seeker", max_concurrency=8)
    payers = [new_payer(chain) for _ in range(2)]
    broke = new_payer(chain, amount=2 * PRICE)  # enough for two jobs when committed
    jobs = []
    for i in range(6):
        jobs.append(await paid.client(wallet=payers[i % 2]).submit(ECHO, f"batch{i}"))
    c = paid.client(wallet=broke)
    jobs += [await c.submit(ECHO, "broke1"), await c.submit(ECHO, "broke2")]
    spend(chain, broke, PRICE)  # then enough for one
    starts = {w.address: balance(chain, w.address) for w in [*payers, broke]}
    before_payee = balance(chain, payee(chain))
    await wait_until(
        lambda: all(
            (j := paid.db.get_job(job.job_id)) is not None and j.state.name == "COMPLETED"
            for job in jobs
        ),
        30,
        "8 jobs completed",
    )
    monkeypatch.setattr(service, "cfg", dataclasses.replace(service.cfg, settle_max_wait_seconds=0))
    assert await service.settle_due() == 8
    final = [paid.db.get_payment(job.job_id) for job in jobs]
    assert all(p is not None for p in final)
    statuses = [p.status.value for p in final if p is not None]
    assert statuses == ["settled"] * 7 + ["failed"]
    failed = final[-1]
    assert failed is not None and "insufficient" in failed.error
    assert len({p.transaction for p in final[:7] if p is not None}) == 1  # one transaction
    for w in payers:
        assert balance(chain, w.address) == starts[w.address] - 3 * PRICE
    assert balance(chain, broke.address) == starts[broke.address] - PRICE == 0
    assert balance(chain, payee(chain)) == before_payee + 7 * PRICE


def spend(deployed: dict[str, Any], wallet: Wallet, amount: int) -> None:
    """wallet sends `amount` test USDC away (gas given to it by anvil)."""
    w3 = web3_for(deployed["rpc_url"], 5)
    _rpc(deployed["rpc_url"], "anvil_setBalance", [wallet.address, hex(10**18)], timeout=5)
    token = w3.eth.contract(address=usdc(deployed), abi=TOKEN_ABI)
    tx = token.functions.transfer(payee(deployed), amount).build_transaction(
        {"from": wallet.address, "nonce": w3.eth.get_transaction_count(wallet.address)}
    )
    raw = wallet.account.sign_transaction(tx).raw_transaction
    assert w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))["status"] == 1


def deploy_gas_burner(deployed: dict[str, Any], usdc_amount: int) -> str:
    """A GasBurningWallet (contracts/src) holding usdc_amount test USDC; its address."""
    from dispatchnet.chains.evm.deploy import load_artifact

    artifact = load_artifact("GasBurningWallet")
    w3 = web3_for(deployed["rpc_url"], 5)
    funder = w3.eth.account.from_key(deployed["accounts"]["client"]["private_key"])

    def send(call: Any) -> Any:
        tx = call.build_transaction(
            {"from": funder.address, "nonce": w3.eth.get_transaction_count(funder.address)}
        )
        raw = funder.sign_transaction(tx).raw_transaction
        receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw))
        assert receipt["status"] == 1
        return receipt

    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    address = str(send(factory.constructor(10_000_000))["contractAddress"])
    token = w3.eth.contract(address=usdc(deployed), abi=TOKEN_ABI)
    send(token.functions.transfer(address, usdc_amount))
    return address


async def test_a_contract_payer_that_burns_gas_holds_up_no_other_settlement(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """A payer that is a contract (ERC-1271) approves its signature while gas is plentiful
    (verification, simulations) and burns whatever it is given in a real batch: capped per
    item by the BatchSettler, it fails alone and costs no batch (it made every batch
    revert: nothing settled, gas spent each pass, the others expired)."""
    await paid.worker("seeker")
    burner = deploy_gas_burner(chain, 1_000_000)
    helper = new_payer(chain, 0)  # signs an authorization whose `from` is then the contract
    c = paid.client(wallet=helper)
    quote = await c.quote(ECHO)
    payload = signed(helper, await required_header(c, quote.quote_id))
    inner = json.loads(json.dumps(payload.payload))
    inner["authorization"]["from"] = burner
    forged = payload.model_copy(update={"payload": inner})
    bad = await commit_with(c, quote.quote_id, encode_payment_signature_header(forged))
    honest = []
    for key in ("one", "two"):
        wallet = new_payer(chain)
        job = await paid.client(wallet=wallet).submit(ECHO, key)
        honest.append((job.job_id, wallet.address))
    assert (await c.wait(bad.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    for job_id, _ in honest:
        await payment_status(paid, job_id, "settled")
    assert [balance(chain, a) for _, a in honest] == [1_000_000 - PRICE] * 2
    assert paid.db.get_payment(bad.job_id).status.value == "authorized"  # type: ignore[union-attr]
    assert balance(chain, burner) == 1_000_000


async def test_a_paid_commit_does_not_ask_the_node_its_chain_id(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """web3 checks every call's chain id; the node's answer is cached, so verifying a
    payment costs only the round trips the exact scheme needs (the payer's code and the
    transfer's simulation), not one more per call."""
    import http.client

    import requests

    await paid.worker("seeker")
    c = paid.client(wallet=new_payer(chain))
    await c.submit(ECHO, "warm-up")
    methods: list[str] = []
    post, send = requests.Session.post, http.client.HTTPConnection.request

    def facilitator() -> bool:
        # only the facilitator's calls (the settlement and anchoring loops run meanwhile)
        return any("/x402/" in frame.filename for frame in traceback.extract_stack())

    def counting(self: requests.Session, url: str, *args: Any, **kwargs: Any) -> Any:
        # web3's provider (requests) ...
        if facilitator():
            body = kwargs.get("data") or b"{}"
            methods.append(str(json.loads(body).get("method", "?")))
        return post(self, url, *args, **kwargs)

    def sending(self: http.client.HTTPConnection, method: str, url: str, body: Any = None,
                *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        # ... or the bare JSON-RPC of the calls made per payment (BareRpc)
        if facilitator() and "requests" not in "".join(
            f.filename for f in traceback.extract_stack()
        ):
            methods.append(str(json.loads(body or b"{}").get("method", "?")))
        return send(self, method, url, body, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "post", counting)
    monkeypatch.setattr(http.client.HTTPConnection, "request", sending)
    for i in range(3):
        await c.commit((await c.quote(ECHO)).quote_id, f"counted{i}")
    assert methods.count("eth_call") == 3  # the verifications did reach the node
    # web3 may ask once more for its cache's sake; without the cache it was 2 per commit
    assert methods.count("eth_chainId") <= 1, methods


@pytest.mark.parametrize("paid", [{"verify_processes": 1}], indirect=True)
async def test_a_verifier_process_that_dies_is_replaced(
    paid: Cluster,
    chain: dict[str, Any],  # noqa: F811
) -> None:
    """`[payments] verify_processes`: the CommitJob whose verifier died while verifying
    answers UNAVAILABLE (nothing stored, the payment unused), and the same payment then
    commits; a verifier found dead before a CommitJob is replaced before it is asked."""
    import os
    import signal

    from dispatchnet.payments.verifier import ProcessVerifyingGateway

    assert paid.coord.payments is not None
    verifying = paid.coord.payments.gateway.inner
    assert isinstance(verifying, ProcessVerifyingGateway)
    await paid.worker("seeker")
    c = paid.client()
    quote = await c.quote(ECHO)
    header = await required_header(c, quote.quote_id)
    signature = encode_payment_signature_header(signed(new_payer(chain), header))
    assert await verifying.ask(None) == ("ok", "", "")  # its process is up
    [child] = verifying.children
    pid = child.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it takes the request and never answers ...
    commit = asyncio.ensure_future(commit_with(c, quote.quote_id, signature, key="k1"))
    await wait_until(lambda: bool(child.pending))
    os.kill(pid, signal.SIGKILL)  # ... and dies with it
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await commit
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "verifier" in (e.value.details() or "")
    assert paid.db.open_payments() == []
    job = await commit_with(c, quote.quote_id, signature, key="k1")
    assert job.payment.status == "authorized"
    assert (await c.wait(job.job_id)).state == coordinator_pb2.JOB_STATE_COMPLETED
    assert verifying.children[0] is not child and not child.process.is_alive()

    # killed while idle: the next CommitJob finds it dead and asks a new one
    [child] = verifying.children
    child.process.kill()
    await asyncio.to_thread(child.process.join, 10)
    quote = await c.quote(ECHO)
    header = await required_header(c, quote.quote_id)
    signature = encode_payment_signature_header(signed(new_payer(chain), header))
    job = await commit_with(c, quote.quote_id, signature, key="k2")
    assert job.payment.status == "authorized"
    assert verifying.children[0] is not child
