"""The local Solana node (LiteSVM behind JSON-RPC): real-node answers through solana-py and
the x402 SDK, blockhash expiry, replay refusal, error shapes, bounds, and the launcher."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from solana.rpc.api import Client
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.rpc.errors import SendTransactionPreflightFailureMessage
from solders.signature import Signature
from solders.system_program import TransferParams as SysTransfer
from solders.system_program import transfer as sys_transfer
from solders.transaction import VersionedTransaction
from solders.transaction_status import TransactionErrorFieldless
from spl.token.instructions import TransferCheckedParams, transfer_checked

from dispatchnet.devchain.solana_local import (
    SolanaLocal,
    bootstrap,
    chain_down,
    chain_status,
    chain_up,
    is_solana_node,
    pid_alive,
    wait_for_signature,
)
from dispatchnet.devchain.solana_node import (
    MAX_BODY_BYTES,
    MAX_MULTIPLE_ACCOUNTS,
    MEMO_PROGRAMS,
    TOKEN_PROGRAM,
    NodeServer,
    SolanaNode,
    b58decode,
)
from dispatchnet.solana_rpc import RpcFacilitatorSigner

# solana-py marks its sync Client (the one x402's SVM schemes use) and spl's params deprecated
pytestmark = [
    pytest.mark.filterwarnings("ignore:Client is deprecated"),
    pytest.mark.filterwarnings("ignore:.*Params is deprecated"),
]


@pytest.fixture
def node() -> Iterator[NodeServer]:
    with NodeServer(SolanaNode()) as server:
        yield server


@pytest.fixture
def fast_node() -> Iterator[NodeServer]:
    """10 ms slots, blockhashes valid for 3 slots: expiry in well under a second."""
    with NodeServer(SolanaNode(slot_seconds=0.01, validity_slots=3)) as server:
        yield server


@pytest.fixture
def chain(node: NodeServer) -> dict[str, Any]:
    return bootstrap(node.rpc_url)


def rpc(url: str, method: str, *params: Any) -> dict[str, Any]:
    """The raw JSON-RPC reply (result or error), to check shapes exactly."""
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": list(params)}
    reply: dict[str, Any] = httpx.post(url, json=body, timeout=10).json()
    assert reply["id"] == 7 and reply["jsonrpc"] == "2.0"
    return reply


def kp(data: dict[str, Any], name: str) -> Keypair:
    return Keypair.from_base58_string(data["accounts"][name]["secret_key"])


def signed(
    client: Client, payer: Keypair, ixs: list[Instruction], blockhash: Hash | None = None
) -> VersionedTransaction:
    bh = blockhash or client.get_latest_blockhash().value.blockhash
    return VersionedTransaction(MessageV0.try_compile(payer.pubkey(), ixs, [], bh), [payer])


def usdc_transfer(data: dict[str, Any], sender: str, receiver: str, amount: int) -> Instruction:
    return transfer_checked(
        TransferCheckedParams(
            program_id=TOKEN_PROGRAM,
            source=Pubkey.from_string(data["accounts"][sender]["token_account"]),
            mint=Pubkey.from_string(data["usdc"]["mint"]),
            dest=Pubkey.from_string(data["accounts"][receiver]["token_account"]),
            owner=kp(data, sender).pubkey(),
            amount=amount,
            decimals=6,
            signers=[],
        )
    )


def token_balance(client: Client, address: str) -> int:
    return int(client.get_token_account_balance(Pubkey.from_string(address)).value.amount)


def test_airdrop_and_get_balance(node: NodeServer) -> None:
    client = Client(node.rpc_url)
    who = Keypair().pubkey()
    assert client.get_balance(who).value == 0
    sig = client.request_airdrop(who, 2 * 10**9).value
    wait_for_signature(client, sig)
    assert client.get_balance(who).value == 2 * 10**9
    status = client.get_signature_statuses([sig]).value[0]
    assert status is not None and status.err is None
    # the faucet's transfer is a real transaction, with its balances
    tx = rpc(node.rpc_url, "getTransaction", str(sig), {"maxSupportedTransactionVersion": 0})
    meta = tx["result"]["meta"]
    i = tx["result"]["transaction"]["message"]["accountKeys"].index(str(who))
    assert (meta["preBalances"][i], meta["postBalances"][i]) == (0, 2 * 10**9)
    assert rpc(node.rpc_url, "requestAirdrop", str(who), 10**30)["error"]["code"] == -32602
    assert rpc(node.rpc_url, "requestAirdrop", str(who), 1_001 * 10**9)["error"]["code"] == -32602


def test_bootstrap_creates_mint_and_funded_token_accounts(
    node: NodeServer, chain: dict[str, Any]
) -> None:
    client = Client(node.rpc_url)
    assert chain["rpc_url"] == node.rpc_url and chain["usdc"]["decimals"] == 6
    assert "LOCAL DEVELOPMENT CHAIN ONLY" in chain["warning"]
    mint = rpc(node.rpc_url, "getAccountInfo", chain["usdc"]["mint"], {"encoding": "jsonParsed"})
    info = mint["result"]["value"]["data"]["parsed"]["info"]
    assert info["decimals"] == 6 and info["supply"] == str(2 * 1_000 * 10**6)
    assert info["mintAuthority"] == chain["accounts"]["deployer"]["address"]
    for name in ("coordinator", "client"):
        account = chain["accounts"][name]
        assert kp(chain, name).pubkey() == Pubkey.from_string(account["address"])
        balance = client.get_token_account_balance(Pubkey.from_string(account["token_account"]))
        assert balance.value.amount == str(1_000 * 10**6)
        assert balance.value.ui_amount == 1000.0 and balance.value.decimals == 6
        assert client.get_balance(Pubkey.from_string(account["address"])).value == 100 * 10**9
        parsed = rpc(
            node.rpc_url,
            "getMultipleAccounts",
            [account["token_account"]],
            {"encoding": "jsonParsed"},
        )
        token = parsed["result"]["value"][0]["data"]["parsed"]
        assert token["type"] == "account" and token["info"]["owner"] == account["address"]
    # the mint as the x402 SDK reads it: base64 data, decimals at byte 44
    raw = client.get_account_info(Pubkey.from_string(chain["usdc"]["mint"])).value
    assert raw is not None and raw.owner == TOKEN_PROGRAM and raw.data[44] == 6


def test_transfer_checked_found_by_signature_statuses_and_get_transaction(
    node: NodeServer, chain: dict[str, Any]
) -> None:
    client = Client(node.rpc_url)
    payer = kp(chain, "client")
    tx = signed(client, payer, [usdc_transfer(chain, "client", "coordinator", 250_000)])
    sig = client.send_raw_transaction(bytes(tx)).value
    assert sig == tx.signatures[0]
    wait_for_signature(client, sig)
    status = client.get_signature_statuses([sig], search_transaction_history=True).value[0]
    assert status is not None and status.err is None and status.slot >= 0

    got = client.get_transaction(sig, max_supported_transaction_version=0).value
    assert got is not None and got.transaction.meta is not None
    meta = got.transaction.meta
    assert meta.err is None and meta.fee == 5000
    assert meta.pre_balances[0] - meta.post_balances[0] == 5000
    pre = {
        b.owner and str(b.owner): int(b.ui_token_amount.amount)
        for b in meta.pre_token_balances or []
    }
    post = {
        b.owner and str(b.owner): int(b.ui_token_amount.amount)
        for b in meta.post_token_balances or []
    }
    c, p = chain["accounts"]["coordinator"]["address"], chain["accounts"]["client"]["address"]
    assert pre == {c: 1_000 * 10**6, p: 1_000 * 10**6}
    assert post == {c: 1_000 * 10**6 + 250_000, p: 1_000 * 10**6 - 250_000}
    assert any("TransferChecked" in line for line in meta.log_messages or [])

    # base64 encoding gives back the very bytes that were sent
    b64 = rpc(
        node.rpc_url,
        "getTransaction",
        str(sig),
        {"encoding": "base64", "maxSupportedTransactionVersion": 0},
    )
    assert base64.b64decode(b64["result"]["transaction"][0]) == bytes(tx)
    assert b64["result"]["version"] == 0
    # a v0 transaction without maxSupportedTransactionVersion: the validator's refusal
    assert rpc(node.rpc_url, "getTransaction", str(sig))["error"]["code"] == -32015
    # listed for both addresses, newest first
    listed = rpc(node.rpc_url, "getSignaturesForAddress", p, {"limit": 1})["result"]
    assert [e["signature"] for e in listed] == [str(sig)]


def test_memo_is_readable_from_get_transaction(node: NodeServer, chain: dict[str, Any]) -> None:
    client = Client(node.rpc_url)
    payer = kp(chain, "coordinator")
    text = "dispatch:receipt-root:7f3a9c"
    memo = Instruction(MEMO_PROGRAMS[0], text.encode(), [])
    sig = client.send_raw_transaction(bytes(signed(client, payer, [memo]))).value
    wait_for_signature(client, sig)
    got = rpc(
        node.rpc_url,
        "getTransaction",
        str(sig),
        {"encoding": "json", "maxSupportedTransactionVersion": 0},
    )
    message = got["result"]["transaction"]["message"]
    (ix,) = message["instructions"]
    assert message["accountKeys"][ix["programIdIndex"]] == str(MEMO_PROGRAMS[0])
    assert b58decode(ix["data"]).decode() == text
    assert f'Memo (len {len(text)}): "{text}"' in " ".join(got["result"]["meta"]["logMessages"])
    listed = rpc(node.rpc_url, "getSignaturesForAddress", str(payer.pubkey()))["result"]
    assert listed[0]["memo"] == f"[{len(text)}] {text}"
    # as solana-py asks (limit null)
    assert (
        client.get_signatures_for_address(payer.pubkey()).value[0].memo == f"[{len(text)}] {text}"
    )


def test_expired_blockhash_is_refused(fast_node: NodeServer) -> None:
    client = Client(fast_node.rpc_url)
    payer = Keypair()
    wait_for_signature(client, client.request_airdrop(payer.pubkey(), 10**9).value)
    latest = client.get_latest_blockhash().value
    blockhash = latest.blockhash
    deadline = time.monotonic() + 10
    while rpc(fast_node.rpc_url, "isBlockhashValid", str(blockhash))["result"]["value"]:
        assert time.monotonic() < deadline, "the blockhash never expired"
        time.sleep(0.005)
    assert client.get_block_height().value > latest.last_valid_block_height

    tx = signed(
        client,
        payer,
        [
            sys_transfer(
                SysTransfer(from_pubkey=payer.pubkey(), to_pubkey=Keypair().pubkey(), lamports=1000)
            )
        ],
        blockhash,
    )
    with pytest.raises(RPCException) as err:
        client.send_raw_transaction(bytes(tx))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.message == "Transaction simulation failed: Blockhash not found"
    assert failure.data.err == TransactionErrorFieldless.BlockhashNotFound
    raw = rpc(
        fast_node.rpc_url,
        "sendTransaction",
        base64.b64encode(bytes(tx)).decode(),
        {"encoding": "base64"},
    )
    assert raw["error"]["code"] == -32002 and raw["error"]["data"]["err"] == "BlockhashNotFound"
    sim = client.simulate_transaction(tx).value
    assert sim.err == TransactionErrorFieldless.BlockhashNotFound
    replaced = client.simulate_transaction(tx, replace_recent_blockhash=True).value
    assert replaced.err is None and replaced.replacement_blockhash is not None
    # skipPreflight: the node answers the signature and drops the transaction, as a validator does
    sig = client.send_raw_transaction(bytes(tx), TxOpts(skip_preflight=True)).value
    assert client.get_signature_statuses([sig], search_transaction_history=True).value == [None]
    assert client.get_balance(payer.pubkey()).value == 10**9


def test_replayed_transaction_is_refused(node: NodeServer, chain: dict[str, Any]) -> None:
    client = Client(node.rpc_url)
    payer = kp(chain, "client")
    tx = signed(client, payer, [usdc_transfer(chain, "client", "coordinator", 1_000)])
    wait_for_signature(client, client.send_raw_transaction(bytes(tx)).value)
    source = chain["accounts"]["client"]["token_account"]
    assert token_balance(client, source) == 1_000 * 10**6 - 1_000
    with pytest.raises(RPCException) as err:
        client.send_raw_transaction(bytes(tx))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.data.err == TransactionErrorFieldless.AlreadyProcessed
    assert (
        failure.message
        == "Transaction simulation failed: This transaction has already been processed"
    )
    # base58, skipPreflight: accepted on the wire, never executed twice
    again = rpc(
        node.rpc_url,
        "sendTransaction",
        str(tx.signatures[0]) and _b58(bytes(tx)),
        {"skipPreflight": True},
    )
    assert again["result"] == str(tx.signatures[0])
    assert token_balance(client, source) == 1_000 * 10**6 - 1_000
    listed = rpc(node.rpc_url, "getSignaturesForAddress", str(payer.pubkey()))["result"]
    assert [e["signature"] for e in listed].count(str(tx.signatures[0])) == 1


def _b58(data: bytes) -> str:
    from dispatchnet.devchain.solana_node import b58encode

    return b58encode(data)


def test_failing_transaction_gives_the_real_error_shape(
    node: NodeServer, chain: dict[str, Any]
) -> None:
    client = Client(node.rpc_url)
    payer = kp(chain, "client")
    too_much = 1_000 * 10**6 + 1
    memo = Instruction(MEMO_PROGRAMS[0], b"before", [])
    tx = signed(client, payer, [memo, usdc_transfer(chain, "client", "coordinator", too_much)])
    sim = rpc(
        node.rpc_url,
        "simulateTransaction",
        base64.b64encode(bytes(tx)).decode(),
        {"encoding": "base64", "sigVerify": True},
    )
    value = sim["result"]["value"]
    assert value["err"] == {"InstructionError": [1, {"Custom": 1}]}  # spl-token InsufficientFunds
    assert any("insufficient funds" in line.lower() for line in value["logs"])
    assert value["unitsConsumed"] > 0 and "slot" in sim["result"]["context"]
    assert client.simulate_transaction(tx).value.err is not None  # solders parses the shape

    with pytest.raises(RPCException) as err:
        client.send_raw_transaction(bytes(tx))
    failure = err.value.args[0]
    assert isinstance(failure, SendTransactionPreflightFailureMessage)
    assert failure.message == (
        "Transaction simulation failed: Error processing Instruction 1: custom program error: 0x1"
    )
    assert failure.data.logs and failure.data.err is not None
    raw = rpc(
        node.rpc_url,
        "sendTransaction",
        base64.b64encode(bytes(tx)).decode(),
        {"encoding": "base64"},
    )
    assert raw["error"]["code"] == -32002
    assert raw["error"]["data"]["err"] == {"InstructionError": [1, {"Custom": 1}]}
    assert client.get_signature_statuses([tx.signatures[0]], True).value == [None]

    # a bad signature never reaches the SVM
    forged = VersionedTransaction.populate(tx.message, [Signature.new_unique()])
    bad = rpc(
        node.rpc_url,
        "sendTransaction",
        base64.b64encode(bytes(forged)).decode(),
        {"encoding": "base64"},
    )
    assert bad["error"] == {"code": -32003, "message": "Transaction signature verification failure"}

    # with skipPreflight it lands and fails on chain: fee charged, error recorded
    sig = client.send_raw_transaction(bytes(tx), TxOpts(skip_preflight=True)).value
    status = client.get_signature_statuses([sig]).value[0]
    assert status is not None and status.err is not None
    got = rpc(node.rpc_url, "getTransaction", str(sig), {"maxSupportedTransactionVersion": 0})[
        "result"
    ]
    assert got["meta"]["err"] == {"InstructionError": [1, {"Custom": 1}]}
    assert got["meta"]["status"] == {"Err": {"InstructionError": [1, {"Custom": 1}]}}
    assert got["meta"]["preBalances"][0] - got["meta"]["postBalances"][0] == 5000


def test_x402_exact_svm_payment_verified_and_settled_over_json_rpc(
    node: NodeServer, chain: dict[str, Any]
) -> None:
    from x402.mechanisms.svm.exact import ExactSvmClientScheme, ExactSvmFacilitatorScheme
    from x402.mechanisms.svm.signers import KeypairSigner
    from x402.schemas import PaymentPayload, PaymentRequirements

    coordinator = kp(chain, "coordinator")
    signer = RpcFacilitatorSigner(coordinator, node.rpc_url, poll_seconds=0.02)
    facilitator = ExactSvmFacilitatorScheme(signer)
    requirements = PaymentRequirements(
        scheme="exact",
        network=chain["network"],
        asset=chain["usdc"]["mint"],
        amount="1500",
        pay_to=chain["accounts"]["coordinator"]["address"],
        max_timeout_seconds=60,
        extra=facilitator.get_extra(chain["network"]) or {},
    )
    client_scheme = ExactSvmClientScheme(KeypairSigner(kp(chain, "client")), rpc_url=node.rpc_url)
    payload = PaymentPayload(
        payload=client_scheme.create_payment_payload(requirements), accepted=requirements
    )

    verified = facilitator.verify(payload, requirements)
    assert verified.is_valid, verified.invalid_message
    assert verified.payer == chain["accounts"]["client"]["address"]
    settled = facilitator.settle(payload, requirements)
    assert settled.success, settled.error_message

    client = Client(node.rpc_url)
    sig = Signature.from_string(settled.transaction)
    got = client.get_transaction(sig, max_supported_transaction_version=0).value
    assert got is not None and got.transaction.meta is not None and got.transaction.meta.err is None
    assert (
        token_balance(client, chain["accounts"]["client"]["token_account"]) == 1_000 * 10**6 - 1500
    )
    assert (
        token_balance(client, chain["accounts"]["coordinator"]["token_account"])
        == 1_000 * 10**6 + 1500
    )
    keys = got.transaction.transaction.message.account_keys  # type: ignore[union-attr]
    assert str(keys[0]) == str(coordinator.pubkey())  # the facilitator paid the fee
    meta = got.transaction.meta
    assert meta.pre_balances[0] - meta.post_balances[0] == meta.fee == 10_000  # two signatures
    # the same payment again is not settled twice
    again = facilitator.settle(payload, requirements)
    assert not again.success
    assert (
        token_balance(client, chain["accounts"]["client"]["token_account"]) == 1_000 * 10**6 - 1500
    )
    # a resend of the landed transaction counts as sent (a settle retried after a lost reply)
    raw = rpc(
        node.rpc_url,
        "getTransaction",
        settled.transaction,
        {"encoding": "base64", "maxSupportedTransactionVersion": 0},
    )
    tx_b64 = raw["result"]["transaction"][0]
    assert signer.send_transaction(tx_b64, chain["network"]) == settled.transaction


def test_bad_input_gets_json_rpc_errors_and_the_node_keeps_serving(node: NodeServer) -> None:
    url = node.rpc_url
    assert rpc(url, "getNothing")["error"] == {"code": -32601, "message": "Method not found"}
    assert rpc(url, "getBalance", "not-a-key")["error"]["code"] == -32602
    assert rpc(url, "getBalance")["error"]["code"] == -32602
    too_many = [str(Keypair().pubkey()) for _ in range(MAX_MULTIPLE_ACCOUNTS + 1)]
    assert rpc(url, "getMultipleAccounts", too_many)["error"]["code"] == -32602
    assert rpc(url, "sendTransaction", "!!!", {"encoding": "base64"})["error"]["code"] == -32602
    assert (
        rpc(url, "sendTransaction", "A" * 5000, {"encoding": "base64"})["error"]["code"] == -32602
    )
    assert (
        rpc(
            url, "sendTransaction", base64.b64encode(b"\x01" * 40).decode(), {"encoding": "base64"}
        )["error"]["code"]
        == -32602
    )
    assert rpc(url, "getSignatureStatuses", ["x"] * 300)["error"]["code"] == -32602
    assert rpc(url, "getTransaction", "1" * 10)["error"]["code"] == -32602
    assert rpc(url, "getSignatureStatuses", [str(Signature.new_unique())])["result"]["value"] == [
        None
    ]
    parse = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert parse.json()["error"]["code"] == -32700
    assert httpx.post(url, json=[]).json()["error"]["code"] == -32600
    assert httpx.post(url, json={"id": 1}).json()["error"]["code"] == -32600
    big = httpx.post(
        url, content=b" " * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"}
    )
    assert big.status_code == 413
    batch = httpx.post(
        url,
        json=[
            {"jsonrpc": "2.0", "id": i, "method": m}
            for i, m in enumerate(["getSlot", "getHealth", "nope"])
        ],
    ).json()
    assert [r["id"] for r in batch] == [0, 1, 2]
    assert batch[1]["result"] == "ok" and batch[2]["error"]["code"] == -32601
    assert (
        httpx.post(url, json=[{"jsonrpc": "2.0", "id": 1, "method": "getSlot"}] * 101).json()[
            "error"
        ]["code"]
        == -32600
    )
    assert httpx.get(f"{url}/health").text == "ok"
    assert rpc(url, "getVersion")["result"]["solana-core"]


def test_launcher_runs_the_module_and_chain_up_status_down(tmp_path: Path) -> None:
    with SolanaLocal(slot_ms=50) as local:
        assert local.running and local.pid is not None and is_solana_node(local.pid)
        assert rpc(local.rpc_url, "getHealth")["result"] == "ok"
        assert rpc(local.rpc_url, "getGenesisHash")["result"] == local.genesis_hash
        pid = local.pid
    assert not pid_alive(pid)

    path = tmp_path / "chains" / "local-solana.json"
    data = chain_up(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text()) == data
        assert is_solana_node(data["node_pid"])
        assert chain_up(path) == data  # idempotent while the node serves
        status = chain_status(path)
        assert status["ok"] and status["running"] and status["mint"] == data["usdc"]["mint"]
        client = Client(data["rpc_url"])
        assert token_balance(client, data["accounts"]["client"]["token_account"]) == 1_000 * 10**6
    finally:
        down = chain_down(path)
    assert down["stopped"] and not path.exists() and not pid_alive(data["node_pid"])
    assert chain_status(path)["ok"] is False


def test_history_is_bounded_but_replays_stay_refused() -> None:
    with NodeServer(SolanaNode(history_limit=3)) as server:
        client = Client(server.rpc_url)
        payer = Keypair()
        wait_for_signature(client, client.request_airdrop(payer.pubkey(), 10**9).value)
        txs = [
            signed(client, payer, [Instruction(MEMO_PROGRAMS[0], f"m{i}".encode(), [])])
            for i in range(4)
        ]
        for tx in txs:
            client.send_raw_transaction(bytes(tx))
        first, last = str(txs[0].signatures[0]), str(txs[-1].signatures[0])
        opts = {"maxSupportedTransactionVersion": 0}
        assert rpc(server.rpc_url, "getTransaction", first, opts)["result"] is None
        assert rpc(server.rpc_url, "getTransaction", last, opts)["result"] is not None
        assert (
            len(rpc(server.rpc_url, "getSignaturesForAddress", str(payer.pubkey()))["result"]) == 3
        )
        # out of the kept history, but its blockhash still lives: still a replay
        replay = rpc(
            server.rpc_url,
            "sendTransaction",
            base64.b64encode(bytes(txs[0])).decode(),
            {"encoding": "base64"},
        )
        assert replay["error"]["data"]["err"] == "AlreadyProcessed"
        assert rpc(server.rpc_url, "getTransactionCount")["result"] == 5  # airdrop + 4


def test_minimum_ledger_slot_is_the_oldest_slot_whose_transactions_are_all_kept() -> None:
    """0 until a transaction is dropped, then the slot after the last one dropped (a slot
    partly dropped does not count); every transaction from it on is still found."""
    now = [0.0]
    with NodeServer(SolanaNode(slot_seconds=1, history_limit=3, clock=lambda: now[0])) as server:
        client = Client(server.rpc_url)
        assert client.get_minimum_ledger_slot().value == 0
        payer = Keypair()
        client.request_airdrop(payer.pubkey(), 10**9)  # slot 0
        sent: list[tuple[int, str]] = []  # (slot, signature)

        def memo_at(slot: int) -> int:
            now[0] = slot
            memo = Instruction(MEMO_PROGRAMS[0], f"m{len(sent)}".encode(), [])
            tx = signed(client, payer, [memo])
            client.send_raw_transaction(bytes(tx))
            sent.append((slot, str(tx.signatures[0])))
            return int(client.get_minimum_ledger_slot().value)

        assert [memo_at(1), memo_at(1)] == [0, 0]  # 3 kept: nothing dropped yet
        assert memo_at(2) == 1  # the airdrop of slot 0 dropped
        assert memo_at(2) == 2  # one of slot 1's two dropped: slot 1 is no longer whole
        assert memo_at(5) == 2  # the other one of slot 1
        assert memo_at(5) == 3  # the first of slot 2: slots 3 and 4 had none
        kept = client.get_signature_statuses(
            [Signature.from_string(s) for _, s in sent], search_transaction_history=True
        ).value
        assert [(slot, found is not None) for (slot, _), found in zip(sent, kept, strict=True)] == [
            (1, False), (1, False), (2, False), (2, True), (5, True), (5, True),
        ]  # fmt: skip
        # the shape of the reply, and the node's refusal of parameters it does not take
        assert rpc(server.rpc_url, "minimumLedgerSlot")["result"] == 3
        refused = rpc(server.rpc_url, "minimumLedgerSlot", {"commitment": "confirmed"})
        assert refused["error"]["code"] == -32602


def test_concurrent_transfers_all_land_once(node: NodeServer, chain: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = Client(node.rpc_url)
    blockhash = client.get_latest_blockhash().value.blockhash
    payer = kp(chain, "client")
    txs = [
        signed(client, payer, [usdc_transfer(chain, "client", "coordinator", 1_000 + i)], blockhash)
        for i in range(16)
    ]

    def send(tx: VersionedTransaction) -> Signature:
        return Client(node.rpc_url).send_raw_transaction(bytes(tx)).value

    with ThreadPoolExecutor(8) as pool:
        sigs = list(pool.map(send, txs))
    statuses = client.get_signature_statuses(sigs).value
    assert all(s is not None and s.err is None for s in statuses)
    sent = sum(1_000 + i for i in range(16))
    assert (
        token_balance(client, chain["accounts"]["client"]["token_account"]) == 1_000 * 10**6 - sent
    )


def test_a_stalled_client_is_disconnected_and_others_are_served() -> None:
    import socket

    with NodeServer(SolanaNode(), request_timeout=0.2) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as stalled:
            stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            assert rpc(server.rpc_url, "getHealth")["result"] == "ok"  # served meanwhile
            assert stalled.recv(1024) == b""  # closed by the node, not by us


def test_a_transaction_whose_fee_cannot_be_paid_does_not_land(node: NodeServer) -> None:
    client = Client(node.rpc_url)
    broke = Keypair()  # no lamports: the fee cannot be charged
    tx = signed(client, broke, [Instruction(MEMO_PROGRAMS[0], b"free ride", [])])
    sim = rpc(
        node.rpc_url,
        "simulateTransaction",
        base64.b64encode(bytes(tx)).decode(),
        {"encoding": "base64"},
    )
    assert sim["result"]["value"]["err"] == "AccountNotFound"
    with pytest.raises(RPCException) as err:
        client.send_raw_transaction(bytes(tx))
    assert err.value.args[0].message == (
        "Transaction simulation failed: "
        "Attempt to debit an account but found no record of a prior credit."
    )
    sig = client.send_raw_transaction(bytes(tx), TxOpts(skip_preflight=True)).value
    assert client.get_signature_statuses([sig], True).value == [None]
    assert (
        rpc(node.rpc_url, "getTransaction", str(sig), {"maxSupportedTransactionVersion": 0})[
            "result"
        ]
        is None
    )
