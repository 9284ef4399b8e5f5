"""x402 payments on Solana: SvmRail (the coordinator's side) and SvmWallet (the client's)
against a real local Solana node, through the gateway and PaymentService the coordinator
uses, over a real store."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chain_fixtures import FacilitatorServer
from solana.rpc.api import Client
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from x402.http.utils import decode_payment_signature_header, encode_payment_signature_header
from x402.mechanisms.svm import derive_ata

from dispatchnet.chains.deployments import ChainConfigError
from dispatchnet.chains.solana.rail import SvmRail, message_id
from dispatchnet.chains.solana.wallet import SvmWallet, load_or_create_solana_key
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import (
    JobSpec,
    JobType,
    Payment,
    PaymentStatus,
    Policy,
    Privacy,
)
from dispatchnet.devchain.solana_local import SolanaLocal, bootstrap
from dispatchnet.devchain.solana_node import NodeServer, SolanaNode
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.keys import KeyPair
from dispatchnet.payments.service import PaymentService
from dispatchnet.payments.wallet import PaymentDeclined
from dispatchnet.payments.x402 import X402Gateway
from dispatchnet.profiles import JobsConfig, PaymentsConfig, PricingConfig
from dispatchnet.receipts.notary import Notary
from dispatchnet.reputation.local import LocalReputation
from dispatchnet.store.threaded import ThreadedStore

pytestmark = [
    pytest.mark.filterwarnings("ignore:Client is deprecated"),
    pytest.mark.filterwarnings("ignore:.*Params is deprecated"),
]

SPEC_BYTES = b"\x12\x06\n\x04echo"
SPEC = JobSpec(
    JobType.TASK,
    Policy.CHEAP,
    Privacy.PUBLIC,
    "echo",
    "",
    SPEC_BYTES,
    hashlib.sha256(SPEC_BYTES).digest(),
)
LIMIT = 10**6  # micro-USD the wallet pays at most per job


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Any]]:
    with SolanaLocal(slot_ms=50) as node:
        yield bootstrap(node.rpc_url)


def keypair(data: dict[str, Any], name: str) -> Keypair:
    return Keypair.from_base58_string(data["accounts"][name]["secret_key"])


def rail_of(data: dict[str, Any], **kw: Any) -> SvmRail:
    return SvmRail(
        data["network"],
        data["rpc_url"],
        data["usdc"]["mint"],
        keypair(data, "coordinator"),
        tx_timeout=10,
        poll_seconds=0.02,
        **kw,
    )


def balance(data: dict[str, Any], name: str) -> int:
    client = Client(data["rpc_url"])
    ata = Pubkey.from_string(data["accounts"][name]["token_account"])
    return int(client.get_token_account_balance(ata).value.amount)


def pay(gateway: X402Gateway, wallet: SvmWallet, micros: int, now: float) -> Payment:
    offers = gateway.offers(micros, 60)
    header = wallet.pay(gateway.required_header(offers, "payment required", "grpc:///x", "t"))
    return gateway.parse(header, offers, now)


def test_a_payment_is_verified_and_settled_once(chain: dict[str, Any]) -> None:
    gateway = X402Gateway([rail_of(chain)], 60)
    wallet = SvmWallet.of_deployment(chain, LIMIT)
    before = balance(chain, "client"), balance(chain, "coordinator")
    now = time.time()
    payment = pay(gateway, wallet, 2_500, now)
    assert payment.payer == wallet.address == chain["accounts"]["client"]["address"]
    assert payment.amount == 2_500 and payment.asset == chain["usdc"]["mint"]
    assert payment.pay_to == chain["accounts"]["coordinator"]["address"]
    # the one-time id: the message hash, settle_by already come (the payload cannot wait)
    tx = VersionedTransaction.from_bytes(base64.b64decode(svm_payload(payment)["transaction"]))
    assert payment.authorization_id == message_id(tx)
    assert now + 50 < payment.valid_before < now + 70 and payment.settle_by <= time.time()

    gateway.verify(payment)
    assert (balance(chain, "client"), balance(chain, "coordinator")) == before  # nothing moved
    signature = gateway.settle(payment)
    assert (balance(chain, "client"), balance(chain, "coordinator")) == (
        before[0] - 2_500,
        before[1] + 2_500,
    )
    assert gateway.rails[payment.network].settlement_of(payment) == (True, signature)
    # the same payment again moves nothing: verify refuses it, settle finds the first one
    with pytest.raises(PaymentRequired):
        gateway.verify(payment)
    assert gateway.settle(payment) == signature
    assert balance(chain, "client") == before[0] - 2_500


def svm_payload(payment: Payment) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(payment.payload_json)["payload"]
    return payload


def test_an_underpayment_and_a_bad_payload_are_refused(chain: dict[str, Any]) -> None:
    gateway = X402Gateway([rail_of(chain)], 60)
    wallet = SvmWallet.of_deployment(chain, LIMIT)
    cheap = gateway.offers(1_000, 60)
    header = wallet.pay(gateway.required_header(cheap, "payment required", "grpc:///x", "t"))
    with pytest.raises(PaymentRequired) as err:
        gateway.parse(header, gateway.offers(2_000, 60), time.time())
    assert err.value.reason == "no_matching_requirements"
    # a payload whose transaction is not one
    payload = decode_payment_signature_header(header)
    forged = payload.model_copy(update={"payload": {"transaction": "AAAA"}})
    with pytest.raises(InvalidArgument, match="not an exact SVM payment"):
        gateway.parse(encode_payment_signature_header(forged), cheap, time.time())
    # a payer's signature that does not verify
    tx = VersionedTransaction.from_bytes(base64.b64decode(payload.payload["transaction"]))
    sigs = list(tx.signatures)
    sigs[1] = Signature.new_unique()
    bad = VersionedTransaction.populate(tx.message, sigs)
    forged = payload.model_copy(
        update={"payload": {"transaction": base64.b64encode(bytes(bad)).decode()}}
    )
    with pytest.raises(InvalidArgument, match="does not verify"):
        gateway.parse(encode_payment_signature_header(forged), cheap, time.time())
    assert gateway.parse(header, cheap, time.time()).amount == 1_000


def test_the_wallet_keeps_to_its_limit_and_its_assets(chain: dict[str, Any]) -> None:
    gateway = X402Gateway([rail_of(chain)], 60)
    wallet = SvmWallet.of_deployment(chain, 1_000)
    offers = gateway.offers(1_001, 60)
    with pytest.raises(PaymentDeclined, match="more than the"):
        wallet.pay(gateway.required_header(offers, "payment required", "grpc:///x", "t"))
    stranger = SvmWallet(keypair(chain, "client"), LIMIT, [], chain["rpc_url"])
    with pytest.raises(PaymentDeclined, match="unknown asset"):
        stranger.pay(gateway.required_header(offers, "payment required", "grpc:///x", "t"))
    with pytest.raises(ChainConfigError):
        SvmWallet.of_deployment({"accounts": {}}, LIMIT)


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "solana.key"
    made = load_or_create_solana_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_solana_key(path) == made
    keygen = tmp_path / "id.json"
    keygen.write_text(str(list(bytes(made))))
    assert load_or_create_solana_key(keygen) == made
    keygen.write_text("not a key")
    with pytest.raises(ChainConfigError):
        load_or_create_solana_key(keygen)


def refund_of(data: dict[str, Any], amount: int, job_id: str) -> Payment:
    """A settled payment from the client, to refund (the coordinator holds the funds)."""
    now = time.time()
    return Payment(
        job_id=job_id,
        network=data["network"],
        asset=data["usdc"]["mint"],
        pay_to=data["accounts"]["coordinator"]["address"],
        payer=data["accounts"]["client"]["address"],
        amount=amount,
        authorization_id="0x" + job_id.encode().hex(),
        valid_before=now,
        settle_by=now,
        payload_json="{}",
        requirement_json="{}",
        status=PaymentStatus.REFUND_DUE,
        created_at=now,
        updated_at=now,
    )


def test_a_refund_is_paid_once_however_often_it_is_sent(chain: dict[str, Any]) -> None:
    rail = rail_of(chain)
    before = balance(chain, "client")
    p = refund_of(chain, 700, "job_refund_once")
    raw, sig = rail.sign_refund(p)
    p = dataclasses.replace(p, refund_raw=raw, refund_transaction=sig)
    assert rail.refund_status(p) is None  # signed, not sent
    assert rail.broadcast_refund(p) is True
    assert rail.broadcast_refund(p) is True  # sent again: the same transaction
    assert rail.refund_status(p) is True
    assert balance(chain, "client") == before + 700
    # another job's refund of the same amount is another transaction (its memo)
    q = refund_of(chain, 700, "job_refund_twice")
    raw2, sig2 = rail.sign_refund(q)
    assert sig2 != sig
    assert rail.broadcast_refund(dataclasses.replace(q, refund_raw=raw2, refund_transaction=sig2))
    assert balance(chain, "client") == before + 1_400


def test_a_refund_to_a_payer_without_a_token_account_creates_it(chain: dict[str, Any]) -> None:
    rail = rail_of(chain)
    newcomer = Keypair()
    p = dataclasses.replace(refund_of(chain, 300, "job_new_ata"), payer=str(newcomer.pubkey()))
    raw, sig = rail.sign_refund(p)
    assert rail.broadcast_refund(dataclasses.replace(p, refund_raw=raw, refund_transaction=sig))
    ata = derive_ata(str(newcomer.pubkey()), chain["usdc"]["mint"])
    got = Client(chain["rpc_url"]).get_token_account_balance(Pubkey.from_string(ata))
    assert got.value.amount == "300"


def _blockhash_valid(url: str, blockhash: str) -> bool:
    reply = httpx.post(
        url,
        json={"jsonrpc": "2.0", "id": 1, "method": "isBlockhashValid", "params": [blockhash]},
        timeout=10,
    ).json()
    return bool(reply["result"]["value"])


def test_an_expired_refund_is_signed_anew() -> None:
    with NodeServer(SolanaNode(slot_seconds=0.01, validity_slots=20)) as server:
        data = bootstrap(server.rpc_url)
        rail = rail_of(data)
        before = balance(data, "client")
        p = refund_of(data, 500, "job_stale")
        raw, sig = rail.sign_refund(p)
        stale = dataclasses.replace(p, refund_raw=raw, refund_transaction=sig)
        blockhash = str(
            VersionedTransaction.from_bytes(base64.b64decode(raw)).message.recent_blockhash
        )
        deadline = time.monotonic() + 10
        while _blockhash_valid(server.rpc_url, blockhash):
            assert time.monotonic() < deadline, "the blockhash never expired"
            time.sleep(0.01)
        assert rail.broadcast_refund(stale) is None  # never landed, never can
        assert balance(data, "client") == before
        raw, sig = rail.sign_refund(p)
        assert rail.broadcast_refund(dataclasses.replace(p, refund_raw=raw, refund_transaction=sig))
        assert balance(data, "client") == before + 500


def test_the_node_down_is_unavailable() -> None:
    with SolanaLocal(slot_ms=50) as node:  # a process: its connections die with it
        data = bootstrap(node.rpc_url)
        gateway = X402Gateway([rail_of(data, rpc_timeout=2)], 60)
        payment = pay(gateway, SvmWallet.of_deployment(data, LIMIT), 1_000, time.time())
    with pytest.raises(Unavailable):
        gateway.verify(payment)
    with pytest.raises(Unavailable):
        gateway.settle(payment)
    rail = gateway.rails[payment.network]
    with pytest.raises(Unavailable):
        rail.settlement_of(payment)
    with pytest.raises(Unavailable):
        rail.sign_refund(refund_of(data, 1, "job_down"))


# --- the coordinator's payment service over a real store --------------------------------


def service_of(
    data: dict[str, Any], tmp_path: Path
) -> tuple[ThreadedStore, JobService, PaymentService]:
    store = ThreadedStore(tmp_path / "coordinator.db")
    jobs = JobService(
        store, JobsConfig(), PricingConfig(), Notary(KeyPair.generate()), LocalReputation(store)
    )
    gateway = X402Gateway([rail_of(data)], PaymentsConfig().settle_margin_seconds)
    payments = PaymentService(store, jobs, gateway, PaymentsConfig(), JobsConfig())
    return store, jobs, payments


async def commit(jobs: JobService, payments: PaymentService, wallet: SvmWallet, key: str) -> str:
    quote = await jobs.quote(SPEC)
    with pytest.raises(PaymentRequired) as err:
        await payments.authorize("client", quote.quote_id, key, None)
    header = wallet.pay(err.value.required_header)
    payment = await payments.authorize("client", quote.quote_id, key, header)
    assert payment is not None
    job, created = await jobs.commit("client", quote.quote_id, key, payment)
    assert created
    # the store's uniqueness: accepted once
    with pytest.raises(PaymentRequired, match="already used"):
        await payments.authorize(
            "client", (await jobs.quote(SPEC)).quote_id, key + "-again", header
        )
    return job.job_id


async def test_a_payment_is_settled_at_once_and_refunded_when_the_job_is_cancelled(
    chain: dict[str, Any], tmp_path: Path
) -> None:
    store, jobs, payments = service_of(chain, tmp_path)
    try:
        wallet = SvmWallet.of_deployment(chain, LIMIT)
        before = balance(chain, "client")
        job_id = await commit(jobs, payments, wallet, "k1")
        paid = await store.get_payment(job_id)
        assert paid is not None and paid.status is PaymentStatus.AUTHORIZED
        price = paid.amount

        # the payload cannot wait for the job: the first pass settles it, HELD while it runs
        assert await payments.settle_due() == 1
        held = await store.get_payment(job_id)
        assert held is not None and held.status is PaymentStatus.HELD and held.transaction
        assert balance(chain, "client") == before - price
        assert await payments.settle_due() == 0  # nothing more to do

        await jobs.cancel("client", job_id, "changed my mind")
        assert await payments.settle_due() == 1
        refunded = await store.get_payment(job_id)
        assert refunded is not None and refunded.status is PaymentStatus.REFUNDED
        assert refunded.refund_transaction and refunded.refund_raw == ""
        assert balance(chain, "client") == before
        assert await payments.settle_due() == 0
        assert balance(chain, "client") == before

    finally:
        await store.close()


class HttpFacilitator(FacilitatorServer):
    """An x402 facilitator over HTTP on 127.0.0.1:<free port> (how devnet settles): the
    SDK's SVM facilitator with its own fee payer, behind /supported, /verify and /settle."""

    def __init__(self, data: dict[str, Any], fee_payer: Keypair) -> None:
        facilitator = rail_of_keypair(data, fee_payer).facilitator
        self.address = str(fee_payer.pubkey())

        super().__init__(facilitator)


def rail_of_keypair(data: dict[str, Any], kp: Keypair, **kw: Any) -> SvmRail:
    return SvmRail(data["network"], data["rpc_url"], data["usdc"]["mint"], kp, **kw)


def test_payments_through_an_http_facilitator(chain: dict[str, Any]) -> None:
    """devnet's way: the facilitator URL's account pays the fee; the coordinator still
    finds the landed transaction (by its message) without knowing the fee payer's key."""
    remote = HttpFacilitator(chain, keypair(chain, "deployer"))
    try:
        rail = rail_of_keypair(chain, keypair(chain, "coordinator"), facilitator_url=remote.url)
        gateway = X402Gateway([rail], 60)
        wallet = SvmWallet.of_deployment(chain, LIMIT)
        before = balance(chain, "client"), balance(chain, "coordinator")
        payment = pay(gateway, wallet, 1_200, time.time())
        gateway.verify(payment)
        signature = gateway.settle(payment)
        assert (balance(chain, "client"), balance(chain, "coordinator")) == (
            before[0] - 1_200,
            before[1] + 1_200,
        )
        landed = Client(chain["rpc_url"]).get_transaction(
            Signature.from_string(signature), max_supported_transaction_version=0
        )
        assert landed.value is not None
        keys = landed.value.transaction.transaction.message.account_keys  # type: ignore[union-attr]
        assert str(keys[0]) == remote.address  # the facilitator paid the fee
        assert rail.settlement_of(payment) == (True, signature)
        assert gateway.settle(payment) == signature  # again: found, not sent twice
        assert balance(chain, "client") == before[0] - 1_200
        unsettled = pay(gateway, wallet, 1_300, time.time())
        assert rail.settlement_of(unsettled) == (False, "")
        remote.stop()
        with pytest.raises(Unavailable, match="facilitator"):
            gateway.verify(unsettled)
    finally:
        if remote.thread.is_alive():
            remote.stop()
