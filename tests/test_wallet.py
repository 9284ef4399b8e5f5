"""The wallet's EIP-712 signer gives the SDK signer's signature, byte for byte."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from eth_account import Account
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.types import ExactEIP3009Authorization, TypedDataField

from dispatchnet.chains.solana.wallet import SvmWallet
from dispatchnet.client import pay_with
from dispatchnet.gateways.relay import RelayPayer
from dispatchnet.payments.wallet import KeptKeySigner, Wallet
from dispatchnet.sdk.relay import RelayedPayment


def test_kept_key_signer_signs_as_the_sdk_signer_does() -> None:
    account = Account.create()
    sdk, kept = EthAccountSigner(account), KeptKeySigner(account)
    for i in range(40):
        # two tokens on two chains: each domain's hash is kept apart
        token, chain = [("0x" + "ab" * 20, 31337), ("0x" + "cd" * 20, 10143)][i % 2]
        auth = ExactEIP3009Authorization(
            from_address=account.address,
            to="0x" + os.urandom(20).hex(),
            value=str(1000 + i),
            valid_after="0",
            valid_before=str(2**40),
            nonce="0x" + os.urandom(32).hex(),
        )
        domain, types, primary, message = build_typed_data_for_signing(
            auth, chain, token, "USDC", "2"
        )
        fields = {
            k: [TypedDataField(name=f["name"], type=f["type"]) for f in v] for k, v in types.items()
        }
        signature = kept.sign_typed_data(domain, fields, primary, message)
        assert signature == sdk.sign_typed_data(domain, fields, primary, message)
        assert len(signature) == 65 and signature[64] in (27, 28)
        # an authorization is words only: hashed without eth_account's encoder
        assert kept._struct_hash(types, primary, message) is not None


def test_kept_key_signer_signs_other_typed_data_as_the_sdk_signer_does() -> None:
    """Structs that are not 32-byte words only (a string, a nested struct) and values in
    other forms go through eth_account's encoder: the same signature as the SDK's."""
    account = Account.create()
    sdk, kept = EthAccountSigner(account), KeptKeySigner(account)
    domain, _, _, _ = build_typed_data_for_signing(
        ExactEIP3009Authorization(
            from_address=account.address, to=account.address, value="1", valid_after="0",
            valid_before="1", nonce="0x" + "00" * 32,
        ),
        31337, "0x" + "ab" * 20, "USDC", "2",
    )  # fmt: skip
    person = [
        TypedDataField(name="name", type="string"),
        TypedDataField(name="wallet", type="address"),
    ]
    cases: list[tuple[dict[str, list[TypedDataField]], str, dict[str, Any]]] = [
        ({"Person": person}, "Person", {"name": "Bob", "wallet": "0x" + "cd" * 20}),
        (
            {
                "Mail": [
                    TypedDataField(name="from", type="Person"),
                    TypedDataField(name="amount", type="uint64"),
                ],
                "Person": person,
            },
            "Mail",
            {"from": {"name": "Ann", "wallet": "0x" + "ef" * 20}, "amount": 7},
        ),
        (
            {
                "Pay": [
                    TypedDataField(name="to", type="address"),
                    TypedDataField(name="value", type="uint256"),
                ]
            },
            "Pay",
            {"to": "0x" + "12" * 20, "value": 2**255},  # words only: the kept path
        ),
    ]
    for types, primary, message in cases:
        signature = kept.sign_typed_data(domain, types, primary, message)
        assert signature == sdk.sign_typed_data(domain, types, primary, message)
    # an address with spaces in it is 42 characters but not 20 bytes: refused as eth_account
    # refuses it, never signed as some other address
    pay = cases[2][0]
    to = "0x" + "12 " * 13 + " "  # 13 bytes, to bytes.fromhex
    assert len(to) == 42 and len(bytes.fromhex(to[2:])) == 13
    spaced: dict[str, Any] = {"to": to, "value": 1}
    with pytest.raises(Exception) as kept_error:
        kept.sign_typed_data(domain, pay, "Pay", spaced)
    with pytest.raises(Exception) as sdk_error:
        sdk.sign_typed_data(domain, pay, "Pay", spaced)
    assert type(kept_error.value) is type(sdk_error.value)


async def test_a_payer_that_pays_offline_is_called_on_the_loop_any_other_in_a_thread() -> None:
    """An EVM wallet signs with its local key (no I/O): the client calls it at once, as a
    thread's hop would cost more than the signature. A payer that asks a node (a Solana
    wallet, for a blockhash), or says nothing, is called in a worker thread."""

    class Recording:
        def __init__(self, offline: bool | None) -> None:
            if offline is not None:
                self.pays_offline = offline
            self.threads: list[int] = []

        def pay(self, required_header: str) -> str:
            self.threads.append(threading.get_ident())
            return f"paid {required_header}"

    offline, online, silent = Recording(True), Recording(False), Recording(None)
    for payer in (offline, online, silent):
        assert await pay_with(payer, "x") == "paid x"
    assert offline.threads == [threading.get_ident()]
    assert threading.get_ident() not in online.threads + silent.threads
    assert Wallet.pays_offline and not SvmWallet.pays_offline
    assert RelayPayer.pays_offline and RelayedPayment.pays_offline
