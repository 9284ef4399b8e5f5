"""The x402 server side, with the official SDK: what a quote costs on every accepted network
(the PaymentRequirements), decoding a client's payment, verifying and settling it through a
facilitator, refunds and the on-chain check of a used authorization.

    gateway = gateway_for(profile, data_dir)
    offers = gateway.offers(price_micros, timeout_seconds)      # one requirement per network
    header = gateway.required_header(offers, "payment required", resource)
    payment = gateway.parse(payment_signature_header, offers, now)  # matched, no I/O
    gateway.verify(payment)                                 # with the facilitator
    tx = gateway.settle(payment)

Every method blocks (the SDK's facilitator and web3.py make blocking RPC calls): callers on
the event loop use asyncio.to_thread. Errors are the domain's: InvalidArgument (malformed
payment), PaymentRequired (refused, with the x402 reason), Unavailable (facilitator or node
down; try again), SettlementRefused (the chain will not take it; final).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from x402 import x402FacilitatorSync, x402ResourceServerSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm.constants import ERR_SETTLEMENT_PENDING
from x402.mechanisms.evm.default_assets import get_default_asset
from x402.mechanisms.evm.exact import (
    ExactEvmFacilitatorScheme,
    ExactEvmSchemeConfig,
    ExactEvmServerScheme,
)
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.schemas import (
    AssetAmount,
    PaymentPayload,
    PaymentRequirements,
    ResourceConfig,
    ResourceInfo,
    SettleResponse,
)

from dispatchnet.chains.evm.node import EvmChain, resolve_evm_chain, shared_sender
from dispatchnet.chains.evm.payments import (
    Authorization,
    CoordinatorFacilitatorSigner,
    EvmBatchSettler,
    EvmRefunder,
    authorization_use,
    token_info,
)
from dispatchnet.coordinator.models import Payment, PaymentStatus
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.payments.service import SettlementRefused
from dispatchnet.profiles import AcceptConfig, Profile

log = logging.getLogger("dispatch.payments")

SCHEME = "exact"
T = TypeVar("T")
MICROS = 10**6


@dataclass
class _Asset:
    address: str
    name: str
    version: str
    decimals: int


class NetworkRail:
    """One accepted network: its facilitator, pay-to account, asset and refunder."""

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
        self._asset: _Asset | None = None
        self._lock = threading.Lock()
        self.w3 = sender.w3
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

    def asset(self) -> _Asset:
        """The asset and its EIP-712 domain: the SDK's default for the network, or read
        from the token contract once (Unavailable while the node is down)."""
        with self._lock:
            if self._asset is None:
                if self._asset_address:
                    name, version, decimals = token_info(self.w3, self._asset_address)
                    self._asset = _Asset(self._asset_address, name, version, decimals)
                else:
                    d = get_default_asset(self.network)
                    self._asset = _Asset(d["asset"], d["name"], d["version"], d["decimals"])
            return self._asset


class X402Gateway:
    def __init__(self, rails: list[NetworkRail], settle_margin_seconds: float) -> None:
        if not rails:
            raise ValueError("payments need at least one accepted network")
        self.rails = {r.network: r for r in rails}
        self.settle_margin = settle_margin_seconds
        self.server = x402ResourceServerSync([r.facilitator for r in rails])
        for r in rails:
            scheme: Any = ExactEvmServerScheme()  # type: ignore[no-untyped-call]
            self.server.register(r.network, scheme)
        self._initialized = False
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "; ".join(r.describe for r in self.rails.values())

    def _init(self) -> None:
        with self._lock:
            if self._initialized:
                return
            try:
                self.server.initialize()
            except Exception as e:
                raise Unavailable(f"x402 facilitator unreachable: {e}") from e
            self._initialized = True

    # --- what a quote costs -----------------------------------------------------------

    def offers(self, price_micros: int, timeout_seconds: int) -> list[PaymentRequirements]:
        """One requirement per accepted network: the quote's price in the network's asset,
        payable to the coordinator's account within timeout_seconds."""
        self._init()
        offers: list[PaymentRequirements] = []
        for rail in self.rails.values():
            asset = rail.asset()
            # price in micro-USD -> the asset's atomic units, rounded up
            amount = -(-price_micros * 10**asset.decimals // MICROS)
            config = ResourceConfig(
                scheme=SCHEME,
                network=rail.network,
                pay_to=rail.pay_to,
                price=AssetAmount(
                    amount=str(amount),
                    asset=asset.address,
                    extra={"name": asset.name, "version": asset.version},
                ),
                max_timeout_seconds=timeout_seconds,
            )
            offers += self.server.build_payment_requirements(config)
        return offers

    def required_header(
        self, offers: list[PaymentRequirements], error: str, resource: str, description: str
    ) -> str:
        """The `payment-required` value: base64 JSON of an x402 v2 PaymentRequired."""
        required = self.server.create_payment_required_response(
            offers,
            resource=ResourceInfo(url=resource, description=description),
            error=error,
        )
        return encode_payment_required_header(required)

    # --- a client's payment ---------------------------------------------------------------

    def decode(self, header: str) -> PaymentPayload:
        try:
            payload = decode_payment_signature_header(header)
        except Exception as e:
            raise InvalidArgument(
                f"payment-signature must be base64 JSON of an x402 PaymentPayload: {_first_line(e)}"
            ) from None
        if not isinstance(payload, PaymentPayload) or payload.x402_version != 2:
            raise InvalidArgument("payment-signature: only x402 version 2 payments are accepted")
        return payload

    def parse(self, header: str, offers: list[PaymentRequirements], now: float) -> Payment:
        """The payment a `payment-signature` value carries, matched to one of the quote's
        offers: AUTHORIZED-to-be (job_id empty), not verified yet. No I/O."""
        payload = self.decode(header)
        requirement = self.server.find_matching_requirements(offers, payload)
        if requirement is None:
            raise PaymentRequired(
                "the payment does not match what this quote accepts (scheme, network, "
                "asset, amount, payTo and maxTimeoutSeconds must be one of `accepts`)",
                reason="no_matching_requirements",
            )
        try:
            auth = ExactEIP3009Payload.from_dict(payload.payload).authorization
            int(auth.value), int(auth.valid_before), bytes.fromhex(auth.nonce.removeprefix("0x"))
        except Exception as e:
            raise InvalidArgument(
                f"payment-signature: not an exact EIP-3009 payment: {_first_line(e)}"
            ) from None
        return Payment(
            job_id="",
            network=str(requirement.network),
            asset=requirement.asset,
            pay_to=requirement.pay_to,
            payer=auth.from_address,
            amount=int(auth.value),
            authorization_id=auth.nonce.lower(),
            valid_before=float(auth.valid_before),
            settle_by=float(auth.valid_before) - self.settle_margin,
            payload_json=payload.model_dump_json(by_alias=True, exclude_none=True),
            requirement_json=requirement.model_dump_json(by_alias=True, exclude_none=True),
            status=PaymentStatus.AUTHORIZED,
            created_at=now,
            updated_at=now,
        )

    def verify(self, payment: Payment) -> None:
        """Verifies the parsed payment with its network's facilitator (signature, amount,
        recipient, validity window, unused nonce, the payer's balance). Nothing moves."""
        verified, node_down = self._facilitate(payment, self.server.verify_payment)
        if not verified.is_valid:
            if node_down:
                raise Unavailable(f"chain node unreachable while verifying: {node_down}")
            reason = verified.invalid_reason or "invalid_payment"
            raise PaymentRequired(f"payment refused: {reason}", reason=reason)

    def _facilitate(self, payment: Payment, call: Callable[[Any, Any], T]) -> tuple[T, str]:
        """call(payload, requirement) (the SDK's verify or settle) and, when the in-process
        facilitator's node failed meanwhile, what went wrong ("" otherwise): the SDK reports
        an unreachable node as an invalid payment. An exception means the facilitator is
        unusable: Unavailable."""
        rail = self.rails[payment.network]
        payload, requirement = _x402_objects(payment)
        started = time.monotonic()
        try:
            result = call(payload, requirement)
        except Exception as e:
            raise Unavailable(f"x402 facilitator failed: {_first_line(e)}") from e
        signer = rail.signer
        if signer is not None and signer.transport_failed_since(started):
            return result, signer.last_transport_error or "no answer"
        return result, ""

    def response_header(self, payment: Payment) -> str:
        """The `payment-response` value for a committed job: an x402 SettleResponse whose
        transaction is empty while settlement waits for the job (extra.status says so)."""
        return encode_payment_response_header(
            SettleResponse(
                success=True,
                payer=payment.payer,
                transaction=payment.transaction,
                network=payment.network,
                amount=str(payment.amount),
                extra={"status": payment.status.value, "jobId": payment.job_id},
            )
        )

    # --- settlement and refunds -------------------------------------------------------------

    def settle(self, payment: Payment) -> str:
        """Settles the payment on chain; its transaction hash. Before any refusal is
        final, the chain is asked whether the authorization was used: a settlement sent by
        an earlier attempt (that crashed, or lost its receipt, perhaps until the
        authorization expired) is found by its AuthorizationUsed event and returned instead
        of being sent again or written off."""
        rail = self.rails[payment.network]
        result, node_down = self._facilitate(payment, self.server.settle_payment)
        if result.success:
            return str(result.transaction)
        reason = result.error_reason or "settlement_failed"
        if reason == ERR_SETTLEMENT_PENDING:
            raise Unavailable(f"settlement {result.transaction} not confirmed yet")
        if node_down:
            raise Unavailable(f"chain node unreachable while settling: {node_down}")
        used, tx = authorization_use(
            rail.w3, payment.asset, payment.payer, payment.authorization_id
        )
        if used and tx:
            log.info("payment for job %s was already settled in %s", payment.job_id, tx)
            return tx
        if used:
            raise SettlementRefused(reason, "the payer cancelled the authorization")
        raise SettlementRefused(reason, result.error_message or "")

    def settle_batch(self, payments: list[Payment]) -> dict[str, str | SettlementRefused]:
        """Settles the payments, in one transaction per network and asset where the
        network's rail can batch (else one by one, as settle()); job_id -> the transaction
        that settled it, or the SettlementRefused that makes it final. A payment missing
        from the answer is still open (its batch did not move it: try again). Unavailable:
        chain trouble, nothing recorded, try again later."""
        out: dict[str, str | SettlementRefused] = {}
        groups: dict[tuple[str, str], list[Payment]] = {}
        for p in payments:
            groups.setdefault((p.network, p.asset), []).append(p)
        for (network, asset), group in groups.items():
            rail = self.rails[network]
            if rail.batch is None:
                for p in group:
                    try:
                        out[p.job_id] = self.settle(p)
                    except SettlementRefused as e:
                        out[p.job_id] = e
                continue
            out.update(self._settle_group(rail, rail.batch, asset, group))
        return out

    def _settle_group(
        self, rail: NetworkRail, batch: EvmBatchSettler, asset: str, group: list[Payment]
    ) -> dict[str, str | SettlementRefused]:
        out: dict[str, str | SettlementRefused] = {}
        auths = {p.job_id: _authorization(p) for p in group}
        todo: list[Payment] = []
        # An earlier attempt (interrupted before it was recorded) may have settled some.
        for p, used in zip(group, batch.used(asset, list(auths.values())), strict=True):
            if not used:
                todo.append(p)
                continue
            used_now, tx = authorization_use(rail.w3, asset, p.payer, p.authorization_id)
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
            elif key in outcome.refused and (refusal := self._refusal(p)) is not None:
                out[p.job_id] = refusal
        return out

    def _refusal(self, payment: Payment) -> SettlementRefused | None:
        """Why the token will not take a payment, in x402's words (the facilitator's
        verification names the reason: balance, expiry, ...); None when it still verifies
        (it stays open and is tried again, until its authorization expires)."""
        verified, node_down = self._facilitate(payment, self.server.verify_payment)
        if node_down:
            raise Unavailable(f"chain node unreachable while settling: {node_down}")
        if verified.is_valid:
            log.warning("payment of job %s verifies but the token refused it", payment.job_id)
            return None
        return SettlementRefused(verified.invalid_reason or "settlement_failed")

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        return self.rails[payment.network].refunder.sign(
            payment.asset, payment.payer, payment.amount
        )

    def refund_status(self, payment: Payment) -> bool | None:
        return self.rails[payment.network].refunder.status(payment.refund_transaction)

    def broadcast_refund(self, payment: Payment) -> bool | None:
        return self.rails[payment.network].refunder.broadcast(
            payment.refund_raw, payment.refund_transaction
        )


def _x402_objects(payment: Payment) -> tuple[PaymentPayload, PaymentRequirements]:
    return (
        PaymentPayload.model_validate(json.loads(payment.payload_json)),
        PaymentRequirements.model_validate(json.loads(payment.requirement_json)),
    )


def _authorization(payment: Payment) -> Authorization:
    exact = ExactEIP3009Payload.from_dict(json.loads(payment.payload_json)["payload"])
    a = exact.authorization
    return Authorization(
        payer=a.from_address,
        to=a.to,
        value=int(a.value),
        valid_after=int(a.valid_after),
        valid_before=int(a.valid_before),
        nonce=a.nonce,
        signature=exact.signature or "0x",
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def gateway_for(profile: Profile, data_dir: Path) -> X402Gateway | None:
    """The profile's payment gateway ([payments] enabled), None when payments are off."""
    if not profile.payments.enabled:
        return None
    chain = resolve_evm_chain(profile.chain, data_dir)
    rails = [NetworkRail(a, chain, profile) for a in profile.payments.accept]
    return X402Gateway(rails, profile.payments.settle_margin_seconds)
