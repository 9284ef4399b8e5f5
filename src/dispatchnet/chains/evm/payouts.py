"""Worker payouts on EVM chains (payments/payouts.py's PayoutSender): each payout is an
EIP-3009 transferWithAuthorization signed by the coordinator account, from itself to the
worker, whose nonce is the payout id; a payout run's authorizations go in one
BatchSettler.settle transaction. The token uses a nonce once, so a payout sent twice (after
a crash, or by two coordinators) pays once, whatever the caller does.

Blocking web3.py code: call it in a worker thread. Transactions go through the account's
shared EvmSender, so payouts never race settlements, refunds or anchors for a nonce.
"""

from __future__ import annotations

import json

from eth_account import Account
from web3 import Web3

from dispatchnet.chains.evm.node import TRANSIENT, EvmSender, _brief
from dispatchnet.chains.evm.payments import (
    Authorization,
    EvmBatchSettler,
    authorization_use,
    token_info,
)
from dispatchnet.errors import Unavailable
from dispatchnet.payments.payouts import Payout, PayoutState, PayoutStatus, SignedPayout

# How long a signed payout may land, from the chain's time at signing. Past it, a payout
# never sent (or refused meanwhile) is failed for good: its amount goes back to the balance.
VALIDITY_SECONDS = 24 * 3600
# Payouts per BatchSettler.settle transaction: its gas grows with each one and must stay
# well under a block's gas limit (a larger run is sent in several transactions).
MAX_PER_TRANSACTION = 50


class EvmPayoutSender:
    """Payouts from the coordinator account (`sender`) through the BatchSettler contract at
    `batch_settler`. Every method blocks; node trouble raises Unavailable."""

    def __init__(
        self,
        sender: EvmSender,
        private_key: str,
        batch_settler: str,
        per_payment_gas: int,
        tx_timeout: float,
        validity_seconds: int = VALIDITY_SECONDS,
        max_per_transaction: int = MAX_PER_TRANSACTION,
    ) -> None:
        self.sender = sender
        self._key = private_key
        self.batch = EvmBatchSettler(sender, batch_settler, per_payment_gas, tx_timeout)
        self.validity_seconds = validity_seconds
        self.max_per_transaction = max_per_transaction
        self._domains: dict[str, tuple[str, str]] = {}

    @property
    def address(self) -> str:
        return str(self.sender.address)

    def _domain(self, asset: str) -> tuple[str, str]:
        """The token's EIP-712 (name, version), read once per token."""
        key = asset.lower()
        if key not in self._domains:
            name, version, _ = token_info(self.sender.w3, asset)
            self._domains[key] = (name, version)
        return self._domains[key]

    def sign(self, payouts: list[Payout]) -> list[SignedPayout]:
        """One authorization per payout, valid from now until the chain's time plus
        validity_seconds. The chain's time, not ours: a node whose clock differs must not
        expire a payout early or keep it alive late."""
        try:
            block = self.sender.w3.eth.get_block("latest")
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
        now, number = int(block["timestamp"]), int(block["number"])
        out = []
        for p in payouts:
            name, version = self._domain(p.asset)
            message = {
                "from": self.address,
                "to": Web3.to_checksum_address(p.to),
                "value": p.amount,
                "validAfter": 0,
                "validBefore": now + self.validity_seconds,
                "nonce": bytes.fromhex(p.payout_id[2:]),
            }
            signed = Account.sign_typed_data(
                self._key,
                domain_data={
                    "name": name,
                    "version": version,
                    "chainId": self.sender.chain_id,
                    "verifyingContract": Web3.to_checksum_address(p.asset),
                },
                message_types={"TransferWithAuthorization": _FIELDS},
                message_data=message,
            )
            raw = {
                "asset": Web3.to_checksum_address(p.asset),
                "from": self.address,
                "to": message["to"],
                "value": p.amount,
                "valid_after": 0,
                "valid_before": message["validBefore"],
                "nonce": p.payout_id,
                "signature": "0x" + bytes(signed.signature).hex(),
                "from_block": number,  # no earlier block can hold its AuthorizationUsed
            }
            out.append(SignedPayout(p, json.dumps(raw, sort_keys=True), ""))
        return out

    def send(self, signed: list[SignedPayout]) -> dict[str, PayoutStatus]:
        """One BatchSettler.settle per asset (and per max_per_transaction payouts) for the
        payouts the token takes now (a used or expired authorization is left out by the
        batch's simulation and reported by its status); each payout's status after it."""
        result: dict[str, PayoutStatus] = {}
        by_asset: dict[str, list[SignedPayout]] = {}
        for s in signed:
            by_asset.setdefault(s.payout.asset.lower(), []).append(s)
        n = self.max_per_transaction
        groups = [g[i : i + n] for g in by_asset.values() for i in range(0, len(g), n)]
        for group in groups:
            auths = [_authorization(s) for s in group]
            outcome = self.batch.settle(group[0].payout.asset, auths)
            for s, a in zip(group, auths, strict=True):
                if a.key in outcome.settled:
                    result[s.payout.payout_id] = PayoutStatus(
                        PayoutState.LANDED, outcome.transaction
                    )
                else:
                    result[s.payout.payout_id] = self.status(s)
        return result

    def status(self, signed: SignedPayout) -> PayoutStatus:
        """LANDED when the token marks the nonce used (with the transaction of its
        AuthorizationUsed event, "" if the node keeps no logs that old); FAILED when unused
        and the chain's time is past valid_before (it can never be used); else NOT_FOUND."""
        raw = json.loads(signed.raw)
        w3 = self.sender.w3
        use = authorization_use(
            w3, raw["asset"], raw["from"], raw["nonce"], int(raw.get("from_block", 0))
        )
        if use.used:  # signed by the coordinator's own account: never cancelled
            return PayoutStatus(PayoutState.LANDED, use.transaction)
        try:
            now = int(w3.eth.get_block("latest")["timestamp"])
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
        if now >= int(raw["valid_before"]):
            return PayoutStatus(
                PayoutState.FAILED, "", "the authorization expired before it was used"
            )
        return PayoutStatus(PayoutState.NOT_FOUND)


_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


def _authorization(signed: SignedPayout) -> Authorization:
    raw = json.loads(signed.raw)
    return Authorization(
        payer=raw["from"],
        to=raw["to"],
        value=int(raw["value"]),
        valid_after=int(raw["valid_after"]),
        valid_before=int(raw["valid_before"]),
        nonce=raw["nonce"],
        signature=raw["signature"],
    )
