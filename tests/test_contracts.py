"""The Solidity contracts (contracts/artifacts) against a real anvil node.

The ABI test pins every selector and event topic to the canonical signatures of the
ERC-8004 draft (Jan 2026), EIP-3009 and our own contracts, so that any ERC-8004 tool can
read our registries. The other tests deploy the artifacts to one anvil per module.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD

from dispatchnet.chains.evm import payments as evm_payments
from dispatchnet.chains.evm.deploy import ARTIFACTS_DIR, Deployment, deploy, load_artifact
from dispatchnet.devchain.anvil import Anvil, _rpc

ZERO32 = b"\x00" * 32


def keccak(text: str) -> bytes:
    return Web3.keccak(text=text)


def selector(signature: str) -> str:
    return "0x" + keccak(signature)[:4].hex()


# --- the ABI ---------------------------------------------------------------------------

# EIP-3009's authorization parameters: from, to, value, validAfter, validBefore, nonce
EIP3009 = "address,address,uint256,uint256,uint256,bytes32"
AUTHORIZATION = "address,address,uint256,uint256,uint256,bytes32,bytes"  # BatchSettler's struct
NEW_FEEDBACK = (
    "NewFeedback(uint256,address,uint64,int128,uint8,string,string,string,string,string,bytes32)"
)

# contract -> function signature -> its output types
FUNCTIONS: dict[str, dict[str, str]] = {
    "IdentityRegistry": {
        "register(string,(string,bytes)[])": "uint256",
        "register(string)": "uint256",
        "register()": "uint256",
        "setAgentURI(uint256,string)": "",
        "getMetadata(uint256,string)": "bytes",
        "setMetadata(uint256,string,bytes)": "",
        "setAgentWallet(uint256,address,uint256,bytes)": "",
        "getAgentWallet(uint256)": "address",
        "unsetAgentWallet(uint256)": "",
        "tokenURI(uint256)": "string",
        "ownerOf(uint256)": "address",
        "isAuthorizedOrOwner(address,uint256)": "bool",
        "version()": "string",
        "getVersion()": "string",
        "name()": "string",
        "symbol()": "string",
    },
    "ReputationRegistry": {
        "giveFeedback(uint256,int128,uint8,string,string,string,string,bytes32)": "",
        "revokeFeedback(uint256,uint64)": "",
        "appendResponse(uint256,address,uint64,string,bytes32)": "",
        "getSummary(uint256,address[],string,string)": "uint64,int128,uint8",
        "readFeedback(uint256,address,uint64)": "int128,uint8,string,string,bool",
        "readAllFeedback(uint256,address[],string,string,bool)": (
            "address[],uint64[],int128[],uint8[],string[],string[],bool[]"
        ),
        "getResponseCount(uint256,address,uint64,address[])": "uint64",
        "getClients(uint256)": "address[]",
        "getLastIndex(uint256,address)": "uint64",
        "getIdentityRegistry()": "address",
        "getVersion()": "string",
    },
    "ValidationRegistry": {
        "validationRequest(address,uint256,string,bytes32)": "",
        "validationResponse(bytes32,uint8,string,bytes32,string)": "",
        "getValidationStatus(bytes32)": "address,uint256,uint8,bytes32,string,uint256",
        "getSummary(uint256,address[],string)": "uint64,uint8",
        "getAgentValidations(uint256)": "bytes32[]",
        "getValidatorRequests(address)": "bytes32[]",
        "getIdentityRegistry()": "address",
        "getVersion()": "string",
    },
    "ReceiptAnchor": {
        "anchor(bytes32,uint32,string)": "bool",
        "anchoredAt(bytes32)": "uint64,address",
    },
    "BatchSettler": {
        f"settle(address,uint256,({AUTHORIZATION})[])": "bool[]",
        "authorizationStates(address,address[],bytes32[])": "bool[]",
    },
    "GasBurningWallet": {
        "isValidSignature(bytes32,bytes)": "bytes4",
        "plenty()": "uint256",
    },
    "TestUSDC": {
        f"transferWithAuthorization({EIP3009},uint8,bytes32,bytes32)": "",
        f"transferWithAuthorization({EIP3009},bytes)": "",
        f"receiveWithAuthorization({EIP3009},uint8,bytes32,bytes32)": "",
        f"receiveWithAuthorization({EIP3009},bytes)": "",
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)": "",
        "cancelAuthorization(address,bytes32,bytes)": "",
        "authorizationState(address,bytes32)": "bool",
        "mint(address,uint256)": "",
        "name()": "string",
        "symbol()": "string",
        "decimals()": "uint8",
        "version()": "string",
        "balanceOf(address)": "uint256",
        "transfer(address,uint256)": "bool",
    },
}

# event signature -> indexed flags, one per parameter
EVENTS: dict[str, dict[str, tuple[bool, ...]]] = {
    "IdentityRegistry": {
        "Registered(uint256,string,address)": (True, False, True),
        "MetadataSet(uint256,string,string,bytes)": (True, True, False, False),
        "URIUpdated(uint256,string,address)": (True, False, True),
        "Transfer(address,address,uint256)": (True, True, True),
    },
    "ReputationRegistry": {
        NEW_FEEDBACK: (
            True, True, False, False, False, True, False, False, False, False, False,
        ),
        "FeedbackRevoked(uint256,address,uint64)": (True, True, True),
        "ResponseAppended(uint256,address,uint64,address,string,bytes32)": (
            True, True, False, True, False, False,
        ),
    },
    "ValidationRegistry": {
        "ValidationRequest(address,uint256,string,bytes32)": (True, True, False, True),
        "ValidationResponse(address,uint256,bytes32,uint8,string,bytes32,string)": (
            True, True, True, False, False, False, False,
        ),
    },
    "ReceiptAnchor": {
        "Anchored(bytes32,address,uint32,string)": (True, True, False, False),
    },
    "BatchSettler": {},
    "GasBurningWallet": {},
    "TestUSDC": {
        "AuthorizationUsed(address,bytes32)": (True, True),
        "AuthorizationCanceled(address,bytes32)": (True, True),
        "Transfer(address,address,uint256)": (True, True, False),
    },
}  # fmt: skip


def _canonical(param: dict[str, Any]) -> str:
    t: str = param["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_canonical(c) for c in param["components"]) + ")" + t[len("tuple") :]
    return t


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(_canonical(i) for i in entry['inputs'])})"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_abi_matches_canonical_signatures(name: str) -> None:
    abi = load_artifact(name).abi
    selectors = {selector(_signature(e)): e for e in abi if e["type"] == "function"}
    for sig, outputs in FUNCTIONS[name].items():
        entry = selectors.get(selector(sig))
        assert entry is not None, f"{name} lacks {sig} ({selector(sig)})"
        assert ",".join(_canonical(o) for o in entry["outputs"]) == outputs, sig
    topics = {"0x" + keccak(_signature(e)).hex(): e for e in abi if e["type"] == "event"}
    for sig, indexed in EVENTS[name].items():
        entry = topics.get("0x" + keccak(sig).hex())
        assert entry is not None, f"{name} lacks event {sig}"
        assert tuple(i["indexed"] for i in entry["inputs"]) == indexed, sig
        assert not entry["anonymous"]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_runtime_bytecode_dispatches_the_selectors(name: str) -> None:
    """The selectors are in the deployed code's dispatcher, not only in the ABI."""
    code = load_artifact(name).deployed_bytecode
    for sig in FUNCTIONS[name]:
        value = keccak(sig)[:4].lstrip(b"\x00")  # the optimizer pushes 0x00339509 as PUSH3
        push = bytes([0x5F + len(value)]) + value
        assert push.hex() in code, f"{name}: no PUSH of {selector(sig)} for {sig}"


def test_artifacts_are_complete() -> None:
    names = sorted(p.stem for p in ARTIFACTS_DIR.glob("*.json"))
    assert names == sorted(FUNCTIONS)
    for n in names:
        data = json.loads((ARTIFACTS_DIR / f"{n}.json").read_text())
        assert set(data) == {
            "contractName", "abi", "bytecode", "deployedBytecode", "solcVersion", "sourceSha256",
        }  # fmt: skip
        assert data["solcVersion"].startswith("0.8.37+")
        assert len(data["deployedBytecode"]) > 2
        assert (len(data["deployedBytecode"]) - 2) // 2 <= 24576, f"{n} exceeds EIP-170"


def test_importing_evm_libraries_keeps_the_recursion_limit() -> None:
    """py_ecc (under eth_account) raises it to 100000 on import, which turns deeply nested
    JSON into a segfault; dispatchnet.chains puts it back (see its docstring)."""
    import dispatchnet.chains.evm  # noqa: F401  (already imported above; this is the point)

    assert "py_ecc" in sys.modules
    assert sys.getrecursionlimit() <= 1000
    with pytest.raises(RecursionError):
        json.loads("[" * 100_000)


# --- a live chain ------------------------------------------------------------------------


@dataclass
class Chain:
    anvil: Anvil
    deployment: Deployment
    w3: Web3
    accounts: list[str]
    keys: list[str]

    def contract(self, name: str, address: str | None = None) -> Contract:
        attr = {
            "IdentityRegistry": "identity",
            "ReputationRegistry": "reputation",
            "ValidationRegistry": "validation",
            "ReceiptAnchor": "receipt_anchor",
            "TestUSDC": "usdc",
        }[name]
        addr = address or getattr(self.deployment, attr)
        return self.w3.eth.contract(
            address=Web3.to_checksum_address(addr), abi=load_artifact(name).abi
        )


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    anvil = Anvil()
    anvil.start()
    try:
        deployment = deploy(anvil.rpc_url, anvil.accounts[0].private_key)
        w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
        yield Chain(
            anvil,
            deployment,
            w3,
            [a.address for a in anvil.accounts],
            [a.private_key for a in anvil.accounts],
        )
    finally:
        anvil.stop()
    assert not anvil.running


DEPLOYER, OWNER, CLIENT_A, CLIENT_B, OPERATOR, VALIDATOR, PAYER, PAYEE = range(8)


def send(chain: Chain, fn: Any, sender: int) -> Any:
    """Sends a transaction from an anvil dev account (unlocked) and returns its receipt."""
    tx_hash = fn.transact({"from": chain.accounts[sender]})
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)
    assert receipt["status"] == 1
    return receipt


def reverts(chain: Chain, fn: Any, sender: int, error: str) -> None:
    """Asserts the call reverts with the custom error `error` (a signature such as
    "SelfFeedback(uint256,address)") or a revert string containing `error`."""
    with pytest.raises(ContractLogicError) as info:
        fn.transact({"from": chain.accounts[sender]})
    exc = info.value
    if "(" in error:
        assert isinstance(exc, ContractCustomError), exc
        assert str(exc.data).startswith(selector(error)), (error, exc.data)
    else:
        assert error in str(exc), exc


def topic0(receipt: Any) -> list[bytes]:
    return [bytes(log["topics"][0]) for log in receipt["logs"]]


def word(value: int | str) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value[2:].rjust(64, "0"))
    return value.to_bytes(32, "big")


def register_agent(chain: Chain, owner: int = OWNER, uri: str = "data:,agent") -> int:
    identity = chain.contract("IdentityRegistry")
    receipt = send(chain, identity.functions.register(uri), owner)
    (event,) = identity.events.Registered().process_receipt(receipt, errors=DISCARD)
    return int(event["args"]["agentId"])


def latest_timestamp(chain: Chain) -> int:
    return int(chain.w3.eth.get_block("latest")["timestamp"])


def test_anvil_is_a_local_dev_chain(chain: Chain) -> None:
    assert chain.anvil.rpc_url.startswith("http://127.0.0.1:")
    assert chain.w3.eth.chain_id == 31337 == chain.deployment.chain_id
    # anvil's default mnemonic: the well-known first dev account
    assert chain.accounts[0] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert Deployment.from_json(chain.deployment.to_json()) == chain.deployment
    identity = chain.contract("IdentityRegistry")
    assert identity.functions.version().call() == "2.0.0"
    assert identity.functions.name().call() == "AgentIdentity"
    assert identity.functions.symbol().call() == "AGENT"
    for name in ("ReputationRegistry", "ValidationRegistry"):
        assert chain.contract(name).functions.getIdentityRegistry().call() == identity.address
    # the reference implementation's version getter, on every registry
    for name in ("IdentityRegistry", "ReputationRegistry", "ValidationRegistry"):
        assert chain.contract(name).functions.getVersion().call() == "2.0.0"


def test_register_with_metadata_emits_events_and_ids_start_at_1(chain: Chain) -> None:
    # A fresh registry, so the first id is known whatever ran before.
    art = load_artifact("IdentityRegistry")
    factory = chain.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    created = send(chain, factory.constructor(), DEPLOYER)
    identity = chain.contract("IdentityRegistry", created["contractAddress"])
    owner = chain.accounts[OWNER]

    uri = "data:application/json;base64,eyJ0eXBlIjoiYWdlbnQifQ=="
    entries = [("name", b"worker-1"), ("grpc", b"127.0.0.1:50051")]
    receipt = send(chain, identity.functions.register(uri, entries), OWNER)
    (registered,) = identity.events.Registered().process_receipt(receipt, errors=DISCARD)
    assert registered["args"]["agentId"] == 1
    assert registered["args"]["agentURI"] == uri
    assert registered["args"]["owner"] == owner
    assert keccak("Registered(uint256,string,address)") in topic0(receipt)

    metadata = identity.events.MetadataSet().process_receipt(receipt, errors=DISCARD)
    keys = [m["args"]["metadataKey"] for m in metadata]
    assert keys == ["agentWallet", "name", "grpc"]
    assert metadata[0]["args"]["metadataValue"] == bytes.fromhex(owner[2:])
    name_log = next(
        log
        for log in receipt["logs"]
        if bytes(log["topics"][0]) == keccak("MetadataSet(uint256,string,string,bytes)")
        and bytes(log["topics"][2]) == keccak("name")  # the indexed key is its keccak
    )
    assert bytes(name_log["topics"][1]) == word(1)

    assert identity.functions.tokenURI(1).call() == uri
    assert identity.functions.ownerOf(1).call() == owner
    assert identity.functions.getMetadata(1, "name").call() == b"worker-1"
    assert identity.functions.getAgentWallet(1).call() == owner
    assert identity.functions.getMetadata(1, "agentWallet").call() == bytes.fromhex(owner[2:])

    # register() and register(string): the next ids
    receipt = send(chain, identity.functions.register(), CLIENT_A)
    (registered,) = identity.events.Registered().process_receipt(receipt, errors=DISCARD)
    assert (registered["args"]["agentId"], registered["args"]["agentURI"]) == (2, "")
    reverts(chain, identity.functions.ownerOf(0), OWNER, "ERC721NonexistentToken(uint256)")

    # only the owner (or an approved operator) changes an agent
    receipt = send(chain, identity.functions.setAgentURI(1, "data:,v2"), OWNER)
    (updated,) = identity.events.URIUpdated().process_receipt(receipt, errors=DISCARD)
    assert updated["args"]["newURI"] == "data:,v2"
    assert updated["args"]["updatedBy"] == owner
    assert identity.functions.tokenURI(1).call() == "data:,v2"
    reverts(
        chain, identity.functions.setAgentURI(1, "x"), CLIENT_A, "NotAuthorized(uint256,address)"
    )
    reverts(
        chain,
        identity.functions.setMetadata(1, "name", b"x"),
        CLIENT_A,
        "NotAuthorized(uint256,address)",
    )
    send(chain, identity.functions.setApprovalForAll(chain.accounts[OPERATOR], True), OWNER)
    send(chain, identity.functions.setMetadata(1, "name", b"worker-1b"), OPERATOR)
    assert identity.functions.getMetadata(1, "name").call() == b"worker-1b"
    # agentWallet is reserved
    reverts(
        chain,
        identity.functions.setMetadata(1, "agentWallet", b"\x01" * 20),
        OWNER,
        "ReservedMetadataKey(string)",
    )
    reverts(
        chain,
        identity.functions.register("u", [("agentWallet", b"\x01" * 20)]),
        OWNER,
        "ReservedMetadataKey(string)",
    )


def _wallet_signature(
    chain: Chain, key: str, agent_id: int, new_wallet: str, owner: str, deadline: int
) -> bytes:
    signed = Account.sign_typed_data(
        key,
        domain_data={
            "name": "ERC8004IdentityRegistry",
            "version": "1",
            "chainId": chain.w3.eth.chain_id,
            "verifyingContract": chain.deployment.identity,
        },
        message_types={
            "AgentWalletSet": [
                {"name": "agentId", "type": "uint256"},
                {"name": "newWallet", "type": "address"},
                {"name": "owner", "type": "address"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        message_data={
            "agentId": agent_id,
            "newWallet": new_wallet,
            "owner": owner,
            "deadline": deadline,
        },
    )
    return bytes(signed.signature)


def test_set_agent_wallet_with_eip712_signature(chain: Chain) -> None:
    identity = chain.contract("IdentityRegistry")
    agent = register_agent(chain)
    owner = chain.accounts[OWNER]
    wallet = Account.create()
    stranger = Account.create()
    deadline = latest_timestamp(chain) + 120

    good = _wallet_signature(chain, wallet.key.hex(), agent, wallet.address, owner, deadline)
    wrong_signer = _wallet_signature(
        chain, stranger.key.hex(), agent, wallet.address, owner, deadline
    )
    reverts(
        chain,
        identity.functions.setAgentWallet(agent, wallet.address, deadline, wrong_signer),
        OWNER,
        "InvalidWalletSignature(address)",
    )
    past = latest_timestamp(chain) - 1
    expired = _wallet_signature(chain, wallet.key.hex(), agent, wallet.address, owner, past)
    reverts(
        chain,
        identity.functions.setAgentWallet(agent, wallet.address, past, expired),
        OWNER,
        "DeadlineExpired(uint256)",
    )
    far = latest_timestamp(chain) + 3600
    too_far = _wallet_signature(chain, wallet.key.hex(), agent, wallet.address, owner, far)
    reverts(
        chain,
        identity.functions.setAgentWallet(agent, wallet.address, far, too_far),
        OWNER,
        "DeadlineTooFar(uint256,uint256)",
    )
    # a valid signature, but sent by someone who does not control the agent
    reverts(
        chain,
        identity.functions.setAgentWallet(agent, wallet.address, deadline, good),
        CLIENT_A,
        "NotAuthorized(uint256,address)",
    )

    receipt = send(
        chain, identity.functions.setAgentWallet(agent, wallet.address, deadline, good), OWNER
    )
    (event,) = identity.events.MetadataSet().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["metadataKey"] == "agentWallet"
    assert event["args"]["metadataValue"] == bytes.fromhex(wallet.address[2:])
    assert identity.functions.getAgentWallet(agent).call() == wallet.address

    send(chain, identity.functions.unsetAgentWallet(agent), OWNER)
    assert identity.functions.getAgentWallet(agent).call() == "0x" + "0" * 40
    assert identity.functions.getMetadata(agent, "agentWallet").call() == b""

    # a transfer clears the wallet, and the old owner's signature is useless to the new one
    send(chain, identity.functions.setAgentWallet(agent, wallet.address, deadline, good), OWNER)
    new_owner = chain.accounts[CLIENT_B]
    send(chain, identity.functions.transferFrom(owner, new_owner, agent), OWNER)
    assert identity.functions.getAgentWallet(agent).call() == "0x" + "0" * 40
    reverts(
        chain,
        identity.functions.setAgentWallet(agent, wallet.address, deadline, good),
        CLIENT_B,
        "InvalidWalletSignature(address)",
    )


def _feedback(
    rep: Contract, agent: int, value: int, decimals: int, tag1: str = "starred", tag2: str = ""
) -> Any:
    return rep.functions.giveFeedback(
        agent, value, decimals, tag1, tag2, "grpc://127.0.0.1:50051", "", ZERO32
    )


def test_feedback_summary_revocation_and_reads(chain: Chain) -> None:
    rep = chain.contract("ReputationRegistry")
    identity = chain.contract("IdentityRegistry")
    agent = register_agent(chain)
    a, b = chain.accounts[CLIENT_A], chain.accounts[CLIENT_B]

    receipt = send(chain, _feedback(rep, agent, 80, 0), CLIENT_A)
    (event,) = rep.events.NewFeedback().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["feedbackIndex"] == 1
    assert event["args"]["value"] == 80
    assert event["args"]["endpoint"] == "grpc://127.0.0.1:50051"
    log = receipt["logs"][0]
    assert bytes(log["topics"][0]) == keccak(NEW_FEEDBACK)
    assert [bytes(t) for t in log["topics"][1:]] == [word(agent), word(a), keccak("starred")]

    send(chain, _feedback(rep, agent, 85, 0), CLIENT_B)
    send(chain, _feedback(rep, agent, 9050, 2), CLIENT_A)  # 90.50
    send(chain, _feedback(rep, agent, 9977, 2, tag1="uptime"), CLIENT_A)

    # the owner and its operators may not rate the agent
    reverts(chain, _feedback(rep, agent, 100, 0), OWNER, "SelfFeedback(uint256,address)")
    send(chain, identity.functions.setApprovalForAll(chain.accounts[OPERATOR], True), OWNER)
    reverts(chain, _feedback(rep, agent, 100, 0), OPERATOR, "SelfFeedback(uint256,address)")
    reverts(chain, _feedback(rep, agent, 1, 19), CLIENT_A, "InvalidValueDecimals(uint8)")
    reverts(chain, _feedback(rep, 10**9, 1, 0), CLIENT_A, "AgentNotFound(uint256)")

    summary = rep.functions.getSummary
    # (80 + 85 + 90.50) / 3 = 85.1666.. in the largest decimals seen (2), rounded toward zero
    assert summary(agent, [a, b], "starred", "").call() == [3, 8516, 2]
    assert summary(agent, [b], "", "").call() == [1, 85, 0]
    assert summary(agent, [a, b, a], "starred", "").call() == [3, 8516, 2]  # duplicates once
    assert summary(agent, [a], "uptime", "").call() == [1, 9977, 2]
    assert summary(agent, [a], "responseTime", "").call() == [0, 0, 0]
    with pytest.raises(ContractCustomError) as info:
        summary(agent, [], "", "").call()
    assert str(info.value.data).startswith(selector("EmptyClientList()"))

    receipt = send(chain, rep.functions.revokeFeedback(agent, 1), CLIENT_A)
    assert bytes(receipt["logs"][0]["topics"][0]) == keccak(
        "FeedbackRevoked(uint256,address,uint64)"
    )
    assert bytes(receipt["logs"][0]["topics"][3]) == word(1)
    # (85 + 90.50) / 2 = 87.75
    assert summary(agent, [a, b], "starred", "").call() == [2, 8775, 2]
    reverts(
        chain,
        rep.functions.revokeFeedback(agent, 1),
        CLIENT_A,
        "FeedbackAlreadyRevoked(uint256,address,uint64)",
    )
    reverts(
        chain,
        rep.functions.revokeFeedback(agent, 9),
        CLIENT_A,
        "FeedbackNotFound(uint256,address,uint64)",
    )

    assert rep.functions.readFeedback(agent, a, 1).call() == [80, 0, "starred", "", True]
    assert rep.functions.readFeedback(agent, a, 2).call() == [9050, 2, "starred", "", False]
    with pytest.raises(ContractCustomError):
        rep.functions.readFeedback(agent, a, 0).call()  # indexes are 1-based
    assert rep.functions.getClients(agent).call() == [a, b]
    assert rep.functions.getLastIndex(agent, a).call() == 3
    assert rep.functions.getLastIndex(agent, b).call() == 1
    assert rep.functions.getLastIndex(agent, chain.accounts[PAYER]).call() == 0

    clients, indexes, values, decimals, tag1s, _, revoked = rep.functions.readAllFeedback(
        agent, [], "starred", "", False
    ).call()
    assert (clients, indexes, values, decimals) == ([a, b], [2, 1], [9050, 85], [2, 0])
    assert tag1s == ["starred", "starred"] and revoked == [False, False]
    all_rows = rep.functions.readAllFeedback(agent, [a], "", "", True).call()
    assert all_rows[1] == [1, 2, 3] and all_rows[6] == [True, False, False]

    receipt = send(
        chain,
        rep.functions.appendResponse(agent, b, 1, "data:,refunded", b"\x11" * 32),
        OWNER,
    )
    (response,) = rep.events.ResponseAppended().process_receipt(receipt, errors=DISCARD)
    assert response["args"]["responder"] == chain.accounts[OWNER]
    assert response["args"]["feedbackIndex"] == 1
    assert rep.functions.getResponseCount(agent, b, 1, []).call() == 1
    assert rep.functions.getResponseCount(agent, "0x" + "0" * 40, 0, []).call() == 1
    assert rep.functions.getResponseCount(agent, b, 1, [chain.accounts[PAYER]]).call() == 0
    reverts(
        chain,
        rep.functions.appendResponse(agent, b, 2, "", ZERO32),
        OWNER,
        "FeedbackNotFound(uint256,address,uint64)",
    )


def test_validation_request_and_response(chain: Chain) -> None:
    val = chain.contract("ValidationRegistry")
    agent = register_agent(chain)
    validator = chain.accounts[VALIDATOR]
    request_hash = keccak(f"job-{agent}")

    reverts(
        chain,
        val.functions.validationRequest(validator, agent, "data:,req", request_hash),
        CLIENT_A,
        "NotAuthorized(uint256,address)",
    )
    receipt = send(
        chain, val.functions.validationRequest(validator, agent, "data:,req", request_hash), OWNER
    )
    assert bytes(receipt["logs"][0]["topics"][0]) == keccak(
        "ValidationRequest(address,uint256,string,bytes32)"
    )
    reverts(
        chain,
        val.functions.validationResponse(request_hash, 100, "", ZERO32, "hard"),
        CLIENT_A,
        "NotValidator(bytes32,address)",
    )
    receipt = send(
        chain, val.functions.validationResponse(request_hash, 100, "", ZERO32, "hard"), VALIDATOR
    )
    (event,) = val.events.ValidationResponse().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["response"] == 100 and event["args"]["tag"] == "hard"
    status = val.functions.getValidationStatus(request_hash).call()
    assert status[:5] == [validator, agent, 100, ZERO32, "hard"]
    assert val.functions.getSummary(agent, [], "").call() == [1, 100]
    assert val.functions.getSummary(agent, [validator], "soft").call() == [0, 0]
    assert val.functions.getAgentValidations(agent).call() == [request_hash]


def test_receipt_anchor(chain: Chain) -> None:
    anchor = chain.contract("ReceiptAnchor")
    root = keccak("batch-root-1")
    receipt = send(chain, anchor.functions.anchor(root, 3, "batch-1"), DEPLOYER)
    (event,) = anchor.events.Anchored().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["merkleRoot"] == root
    assert event["args"]["anchorer"] == chain.accounts[DEPLOYER]
    assert event["args"]["leafCount"] == 3 and event["args"]["batchId"] == "batch-1"
    log = receipt["logs"][0]
    assert bytes(log["topics"][0]) == keccak("Anchored(bytes32,address,uint32,string)")
    assert bytes(log["topics"][1]) == root
    assert anchor.functions.anchoredAt(root).call() == [
        receipt["blockNumber"],
        chain.accounts[DEPLOYER],
    ]
    # re-anchoring is a no-op: no event, the first anchor stands
    again = send(chain, anchor.functions.anchor(root, 5, "batch-1-retry"), CLIENT_A)
    assert again["logs"] == []
    assert anchor.functions.anchoredAt(root).call()[0] == receipt["blockNumber"]
    assert anchor.functions.anchoredAt(keccak("never")).call() == [0, "0x" + "0" * 40]
    reverts(chain, anchor.functions.anchor(ZERO32, 1, ""), DEPLOYER, "ZeroRoot()")


def _authorization(
    chain: Chain, key: str, payee: str, value: int, nonce: bytes, kind: str = "Transfer"
) -> tuple[dict[str, Any], Any]:
    message = {
        "from": Account.from_key(key).address,
        "to": payee,
        "value": value,
        "validAfter": 0,
        "validBefore": latest_timestamp(chain) + 3600,
        "nonce": nonce,
    }
    signed = Account.sign_typed_data(
        key,
        domain_data={
            "name": "USDC",
            "version": "2",
            "chainId": chain.w3.eth.chain_id,
            "verifyingContract": chain.deployment.usdc,
        },
        message_types={
            f"{kind}WithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        message_data=message,
    )
    return message, signed


def test_usdc_transfer_with_authorization(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    usdc = chain.contract("TestUSDC")
    assert usdc.functions.name().call() == "USDC"
    assert usdc.functions.symbol().call() == "USDC"
    assert usdc.functions.decimals().call() == 6
    assert usdc.functions.version().call() == "2"

    payer, payee = chain.accounts[PAYER], chain.accounts[PAYEE]
    send(chain, usdc.functions.mint(payer, 5_000_000), DEPLOYER)
    reverts(chain, usdc.functions.mint(payer, 1), PAYER, "caller is not the minter")
    before = usdc.functions.balanceOf(payee).call()

    nonce = os.urandom(32)
    m, sig = _authorization(chain, chain.keys[PAYER], payee, 1_250_000, nonce)
    args = (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"])
    transfer = usdc.functions.transferWithAuthorization(
        *args, sig.v, sig.r.to_bytes(32, "big"), sig.s.to_bytes(32, "big")
    )
    receipt = send(chain, transfer, DEPLOYER)  # the facilitator submits and pays the gas
    transferred = (receipt, m["validAfter"])
    (used,) = usdc.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert used["args"]["authorizer"] == payer and used["args"]["nonce"] == nonce
    assert usdc.functions.balanceOf(payee).call() == before + 1_250_000
    assert usdc.functions.balanceOf(payer).call() == 5_000_000 - 1_250_000
    assert usdc.functions.authorizationState(payer, nonce).call() is True

    reverts(chain, transfer, DEPLOYER, "authorization is used or canceled")  # replay

    # the `bytes signature` overload, and a tampered amount
    nonce2 = os.urandom(32)
    m, sig = _authorization(chain, chain.keys[PAYER], payee, 250_000, nonce2)
    args = (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"])
    tampered = (*args[:2], 999_999, *args[3:])
    reverts(
        chain,
        usdc.functions.transferWithAuthorization(*tampered, bytes(sig.signature)),
        DEPLOYER,
        "invalid signature",
    )
    send(chain, usdc.functions.transferWithAuthorization(*args, bytes(sig.signature)), DEPLOYER)
    assert usdc.functions.balanceOf(payee).call() == before + 1_500_000

    # receiveWithAuthorization: only the payee may submit it
    nonce3 = os.urandom(32)
    m, sig = _authorization(chain, chain.keys[PAYER], payee, 1, nonce3, kind="Receive")
    args = (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"])
    receive = usdc.functions.receiveWithAuthorization(*args, bytes(sig.signature))
    reverts(chain, receive, DEPLOYER, "caller must be the payee")
    send(chain, receive, PAYEE)

    # cancelAuthorization burns an unused nonce
    nonce4 = os.urandom(32)
    cancel = Account.sign_typed_data(
        chain.keys[PAYER],
        domain_data={
            "name": "USDC",
            "version": "2",
            "chainId": chain.w3.eth.chain_id,
            "verifyingContract": chain.deployment.usdc,
        },
        message_types={
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        message_data={"authorizer": payer, "nonce": nonce4},
    )
    receipt = send(
        chain, usdc.functions.cancelAuthorization(payer, nonce4, bytes(cancel.signature)), PAYEE
    )
    assert usdc.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    m, sig = _authorization(chain, chain.keys[PAYER], payee, 1, nonce4)
    args = (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"])
    reverts(
        chain,
        usdc.functions.transferWithAuthorization(*args, bytes(sig.signature)),
        DEPLOYER,
        "authorization is used or canceled",
    )

    # what settlement's recovery reads of an authorization: by whom it was used (its
    # event, looked for in bounded ranges from its validAfter), or that it was cancelled,
    # or that the node cannot say (no event of it in the blocks searched)
    monkeypatch.setattr(evm_payments, "LOG_RANGE", 2)  # many ranges, as on a public node
    w3, token = chain.w3, chain.deployment.usdc
    tx_receipt, valid_after = transferred
    use = evm_payments.authorization_use(
        w3, token, payer, "0x" + nonce.hex(), not_before=valid_after
    )
    assert use == evm_payments.AuthorizationUse(
        True, "0x" + bytes(tx_receipt["transactionHash"]).hex()
    )
    assert evm_payments.authorization_use(w3, token, payer, "0x" + nonce4.hex()) == (
        evm_payments.AuthorizationUse(True, cancelled=True)
    )
    later = w3.eth.block_number + 1
    gone = evm_payments.authorization_use(w3, token, payer, "0x" + nonce.hex(), from_block=later)
    assert gone.used and gone.unexplained
    unused = evm_payments.authorization_use(w3, token, payer, "0x" + os.urandom(32).hex())
    assert not unused.used and not unused.unexplained
    assert evm_payments.first_block_at(w3, 0, w3.eth.block_number) == 0
    newest = w3.eth.get_block("latest")
    assert evm_payments.first_block_at(w3, newest["timestamp"] + 1, newest["number"]) == (
        newest["number"] + 1
    )


async def test_anvil_async_context_manager(tmp_path: Path) -> None:
    log = tmp_path / "anvil.log"
    async with Anvil(chain_id=31338, accounts=2, log_path=log) as node:
        assert node.running and len(node.accounts) == 2
        got = await asyncio.to_thread(_rpc, node.rpc_url, "eth_chainId", [], 2.0)
        assert int(str(got), 16) == 31338
        assert node.startup_seconds is not None and node.startup_seconds < 10
    assert not node.running
    assert "Listening on 127.0.0.1:" in log.read_text()
