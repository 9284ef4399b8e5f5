"""The wallet's EIP-712 signer gives the SDK signer's signature, byte for byte."""

from __future__ import annotations

import os

from eth_account import Account
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.types import ExactEIP3009Authorization, TypedDataField

from dispatchnet.payments.wallet import KeptKeySigner


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
