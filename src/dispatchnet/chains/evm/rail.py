"""x402 on EVM chains: one accepted network's rail (EvmRail) for payments/x402.py's
gateway, with the SDK's exact EIP-3009 scheme. Blocking web3.py code: call it in threads."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from x402 import x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm.default_assets import get_default_asset
from x402.mechanisms.evm.exact import (
    ExactEvmFacilitatorScheme,
    ExactEvmSchemeConfig,
    ExactEvmServerScheme,
)
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.schemas import PaymentPayload

from dispatchnet.chains.evm.node import EvmChain, shared_sender
from dispatchnet.chains.evm.payments import (
    Authorization,
    CoordinatorFacilitatorSigner,
    EvmBatchSettler,
    EvmRefunder,
    authorization_use,
    token_balance,
    token_info,
)
from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import InvalidArgument
from dispatchnet.payments.service import SettlementPending, SettlementRefused
from dispatchnet.profiles import AcceptConfig, Profile

log = logging.getLogger("dispatch.payments")

# A payment whose authorization is used with no event of it on the node is looked at
# again after this long, doubling each time up to the most; so many are remembered.
UNEXPLAINED_FIRST_SECONDS = 60.0
UNEXPLAINED_MOST_SECONDS = 3600.0
UNEXPLAINED_KEPT = 10_000

# An exact EIP-3009 authorization's fields as x402 spells them (the only spellings read)
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SIGNATURE = re.compile(r"0x(?:[0-9a-fA-F]{2})+")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")


@dataclass
class Asset:
    address: str
    name: str
    version: str
    decimals: int


class EvmRail:
    """One accepted EVM network of CommitJob (payments/x402.py's PaymentRail): x402's exact
    EIP-3009 scheme, its facilitator (in-process with the coordinator's account, or a URL),
    the pay-to account, the asset, refunds and batched settlement. Every method blocks."""

    def __init__(
        self,
        accept: AcceptConfig,
        chain: EvmChain,
        profile: Profile,
    ) -> None:
        cfg = profile.chain
        pay = profile.payments
        self.network = accept.network
        self.chain = chain
        if not chain.account_key:
            raise ValueError(f"payments on {self.network} need [chain]'s account key")
        self.pay_to = chain.account_address
        sender = shared_sender(
            chain.rpc_url, chain.network, chain.account_key, cfg.rpc_timeout_seconds
        )
        self.signer: CoordinatorFacilitatorSigner | None = None
        self.facilitator: Any
        if accept.facilitator:
            self.facilitator = HTTPFacilitatorClientSync(
                FacilitatorConfig(url=accept.facilitator, timeout=cfg.rpc_timeout_seconds * 3)
            )
            self.describe = f"{self.network} via facilitator {accept.facilitator}"
        else:
            self.signer = CoordinatorFacilitatorSigner(
                sender,
                chain.account_key,
                chain.rpc_url,
                cfg.tx_timeout_seconds,
                pay.settle_gas_limit,
            )
            facilitator = x402FacilitatorSync()
            facilitator.register(
                [self.network],
                ExactEvmFacilitatorScheme(
                    self.signer, ExactEvmSchemeConfig(simulate_in_settle=True)
                ),
            )
            self.facilitator = facilitator
            self.describe = f"{self.network} (in-process facilitator, account {self.pay_to})"
        self._asset_address = accept.asset or chain.usdc
        self._asset: Asset | None = None
        self._lock = threading.Lock()
        self.w3 = sender.w3
        # job_id -> (when to look again, the delay): payments whose use is unexplained
        self._unexplained: dict[str, tuple[float, float]] = {}
        self.refunder = EvmRefunder(sender, pay.refund_gas_limit, cfg.tx_timeout_seconds)
        # Many settlements in one transaction: only where this process settles itself (a
        # remote facilitator settles one payment per call) and the chain has the contract.
        self.batch = (
            EvmBatchSettler(
                sender, chain.batch_settler, pay.settle_gas_limit, cfg.tx_timeout_seconds
            )
            if self.signer is not None and chain.batch_settler
            else None
        )
        if self.batch is not None:
            self.describe += f", settling in batches through {chain.batch_settler}"

    def asset(self) -> Asset:
        """The asset and its EIP-712 domain: the SDK's default for the network, or read
        from the token contract once (Unavailable while the node is down)."""
        with self._lock:
            if self._asset is None:
                if self._asset_address:
                    name, version, decimals = token_info(self.w3, self._asset_address)
                    self._asset = Asset(self._asset_address, name, version, decimals)
                else:
                    d = get_default_asset(self.network)
                    self._asset = Asset(d["asset"], d["name"], d["version"], d["decimals"])
            return self._asset

    def balance(self, payer: str, asset: str) -> int:
        """payer's balance of the token `asset` now (Unavailable while the node is down)."""
        return token_balance(self.w3, asset, payer)

    def server_scheme(self) -> Any:
        """The x402 SDK's server side of the exact scheme on this network."""
        return ExactEvmServerScheme()  # type: ignore[no-untyped-call]

    def authorization(self, payload: PaymentPayload) -> Authorization:
        """The signed EIP-3009 authorization an exact payment carries; InvalidArgument if
        it is not one. No I/O."""
        try:
            exact = ExactEIP3009Payload.from_dict(payload.payload)
            a = exact.authorization
            # One spelling only: the nonce is the replay key, and the SDK and the chain
            # read hex with or without 0x (and bytes.fromhex skips spaces), so another
            # spelling of a used nonce would pass for a new payment.
            for what, text, pattern in (
                ("nonce", a.nonce, _NONCE),
                ("from", a.from_address, _ADDRESS),
                ("to", a.to, _ADDRESS),
                ("signature", exact.signature or "", _SIGNATURE),
            ):
                if not isinstance(text, str) or not pattern.fullmatch(text):
                    raise ValueError(f"authorization {what} is not 0x and hex digits: {text!r:.80}")
            numbers: tuple[tuple[str, object], ...] = (
                ("value", a.value),
                ("validAfter", a.valid_after),
                ("validBefore", a.valid_before),
            )  # strings in x402; JSON numbers read too
            for what, number in numbers:
                if not (isinstance(number, str) and _DECIMAL.fullmatch(number)) and not (
                    type(number) is int and number >= 0
                ):
                    raise ValueError(f"authorization {what} is not a decimal integer")
            auth = Authorization(
                payer=a.from_address,
                to=a.to,
                value=int(a.value),
                valid_after=int(a.valid_after),
                valid_before=int(a.valid_before),
                nonce=a.nonce.lower(),
                signature=exact.signature or "0x",
            )
        except Exception as e:
            raise InvalidArgument(
                f"payment-signature: not an exact EIP-3009 payment: {first_line(e)}"
            ) from None
        return auth

    def transport_error_since(self, t: float) -> str:
        """What went wrong when the in-process facilitator's node failed since monotonic
        time t ("" if it did not, or the facilitator is remote)."""
        if self.signer is not None and self.signer.transport_failed_since(t):
            return self.signer.last_transport_error or "no answer"
        return ""

    def settlement_of(self, payment: Payment) -> tuple[bool, str]:
        """Whether the payment's authorization is used on chain, and the transaction that
        used it ("": its payer cancelled it). SettlementPending when it is used and the node
        has neither event of it (logs that old are gone): the payment stays open, looked
        at again after a back-off, rather than being recorded either way."""
        try:
            valid_after = self.authorization(_payload(payment)).valid_after
        except InvalidArgument:
            valid_after = 0
        use = authorization_use(
            self.w3, payment.asset, payment.payer, payment.authorization_id,
            not_before=valid_after,
        )  # fmt: skip
        if use.unexplained:
            delay = self._unexplained_delay(payment.job_id)
            raise SettlementPending(
                f"its authorization is used on chain, but the node has no AuthorizationUsed "
                f"or AuthorizationCanceled event of it (logs that old may be gone): kept "
                f"open, looked at again in {delay:.0f} s"
            )
        self._unexplained.pop(payment.job_id, None)
        return use.used, use.transaction

    def _unexplained_delay(self, job_id: str) -> float:
        """Backs off the look at a payment whose use the chain cannot explain (doubling
        from UNEXPLAINED_FIRST_SECONDS up to UNEXPLAINED_MOST_SECONDS); the delay set."""
        now = time.monotonic()
        _, delay = self._unexplained.get(job_id, (now, UNEXPLAINED_FIRST_SECONDS / 2))
        delay = min(UNEXPLAINED_MOST_SECONDS, delay * 2)
        if len(self._unexplained) >= UNEXPLAINED_KEPT and job_id not in self._unexplained:
            self._unexplained.pop(next(iter(self._unexplained)))
        self._unexplained[job_id] = (now + delay, delay)
        return delay

    def waits(self, payment: Payment) -> bool:
        """Whether the payment's use is unexplained and its back-off has not run out."""
        due = self._unexplained.get(payment.job_id)
        return due is not None and time.monotonic() < due[0]

    def settlement_failed(self, transaction: str) -> bool:
        """Whether a settlement the SDK reported pending landed with an error: never asked
        here (EVM payments settle in batches, which read their own receipts)."""
        return False

    def settle_batch(
        self,
        asset: str,
        payments: list[Payment],
        refusal: Callable[[Payment], SettlementRefused | None],
    ) -> dict[str, str | SettlementRefused]:
        """Settles payments of one asset in one BatchSettler transaction (see
        X402Gateway.settle_batch for the answer's meaning); refusal(p) says why the token
        refused p (None: try again later). Raises ValueError when this rail cannot batch."""
        batch = self.batch
        if batch is None:
            raise ValueError(f"{self.network} settles one payment at a time")
        out: dict[str, str | SettlementRefused] = {}
        auths: dict[str, Authorization] = {}
        payments = [p for p in payments if not self.waits(p)]  # left open, as they were
        for p in payments:
            try:
                auths[p.job_id] = self.authorization(_payload(p))
            except InvalidArgument as e:  # stored before its spelling was checked
                out[p.job_id] = SettlementRefused("invalid_payload", e.message)
        payments = [p for p in payments if p.job_id in auths]
        todo: list[Payment] = []
        # An earlier attempt (interrupted before it was recorded) may have settled some.
        for p, used in zip(payments, batch.used(asset, list(auths.values())), strict=True):
            if not used:
                todo.append(p)
                continue
            try:
                used_now, tx = self.settlement_of(p)
            except SettlementPending as e:  # this one's own: the others go on
                log.warning("payment of job %s: %s", p.job_id, e.message)
                continue
            if used_now and tx:
                log.info("payment for job %s was already settled in %s", p.job_id, tx)
                out[p.job_id] = tx
            else:
                out[p.job_id] = SettlementRefused(
                    "authorization_used", "the payer cancelled the authorization"
                )
        if not todo:
            return out
        outcome = batch.settle(asset, [auths[p.job_id] for p in todo])
        for p in todo:
            key = auths[p.job_id].key
            if key in outcome.settled:
                out[p.job_id] = outcome.transaction
            elif key in outcome.refused and (refused := refusal(p)) is not None:
                out[p.job_id] = refused
        return out

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        return self.refunder.sign(payment.asset, payment.payer, payment.amount)

    def refund_status(self, payment: Payment) -> bool | None:
        return self.refunder.status(payment.refund_transaction)

    def broadcast_refund(self, payment: Payment) -> bool | None:
        return self.refunder.broadcast(payment.refund_raw, payment.refund_transaction)


def _payload(payment: Payment) -> PaymentPayload:
    return PaymentPayload.model_validate(json.loads(payment.payload_json))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
