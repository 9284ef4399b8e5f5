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

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from x402 import x402ResourceServerSync
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.schemas import (
    AssetAmount,
    PaymentPayload,
    PaymentRequirements,
    ResourceConfig,
    ResourceInfo,
    SettleResponse,
)

from dispatchnet.chains import registry
from dispatchnet.coordinator.models import Payment, PaymentStatus
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.payments.service import SettlementPending, SettlementRefused
from dispatchnet.profiles import Profile

log = logging.getLogger("dispatch.payments")

SCHEME = "exact"
# x402's error reason for a settlement sent but not confirmed yet (every scheme's word)
SETTLEMENT_PENDING = "settlement_pending"
T = TypeVar("T")
MICROS = 10**6


class PaymentRail(Protocol):
    """One accepted network, as its chain kind implements it (chains/<kind>/rail.py, made by
    the kind's ChainAdapter.payment_rail). Every method may block."""

    network: str
    pay_to: str
    describe: str
    facilitator: Any  # an x402 facilitator (in-process) or facilitator client (a URL)

    def asset(self) -> Any:  # .address .name .version .decimals
        ...

    def server_scheme(self) -> Any: ...
    def authorization(self, payload: PaymentPayload) -> Any:  # .payer .value .nonce ...
        ...

    def balance(self, payer: str, asset: str) -> int: ...
    def transport_error_since(self, t: float) -> str: ...
    def settlement_of(self, payment: Payment) -> tuple[bool, str]: ...
    def settlement_failed(self, transaction: str) -> bool: ...
    def waits(self, payment: Payment) -> bool:  # a back-off of the rail's own: skip it now
        ...

    batch: Any  # None when the rail settles one payment at a time

    def settle_batch(
        self,
        asset: str,
        payments: list[Payment],
        refusal: Callable[[Payment], SettlementRefused | None],
    ) -> dict[str, str | SettlementRefused]: ...

    def sign_refund(self, payment: Payment) -> tuple[str, str]: ...
    def refund_status(self, payment: Payment) -> bool | None: ...
    def broadcast_refund(self, payment: Payment) -> bool | None: ...


class X402Gateway:
    def __init__(self, rails: list[PaymentRail], settle_margin_seconds: float) -> None:
        if not rails:
            raise ValueError("payments need at least one accepted network")
        self.rails = {r.network: r for r in rails}
        self.settle_margin = settle_margin_seconds
        self.server = x402ResourceServerSync([r.facilitator for r in rails])
        for r in rails:
            self.server.register(r.network, r.server_scheme())
        self._initialized = False
        self._lock = threading.Lock()
        self._refused_valid: set[str] = set()  # jobs whose "verifies but refused" is logged

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
        auth = self.rails[str(requirement.network)].authorization(payload)
        longest = now + requirement.max_timeout_seconds + CLOCK_SLACK_SECONDS
        if float(auth.valid_before) > longest:
            # a payment stays due until it expires: one valid for years could be retried
            # (or held back) that long
            raise PaymentRequired(
                f"the authorization is valid until {int(auth.valid_before)}, past the "
                f"{requirement.max_timeout_seconds}s this quote accepts (maxTimeoutSeconds)",
                reason="authorization_too_long",
            )
        return Payment(
            job_id="",
            network=str(requirement.network),
            asset=requirement.asset,
            pay_to=requirement.pay_to,
            payer=auth.payer,
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

    async def verify_async(self, payment: Payment) -> None:
        """verify in a worker thread (the SDK and web3 block)."""
        await asyncio.to_thread(self.verify, payment)

    def balance(self, payment: Payment) -> int:
        """The payer's balance of the payment's asset on its network now."""
        return self.rails[payment.network].balance(payment.payer, payment.asset)

    def _facilitate(self, payment: Payment, call: Callable[[Any, Any], T]) -> tuple[T, str]:
        """call(payload, requirement) (the SDK's verify or settle) and, when the in-process
        facilitator's node failed meanwhile, what went wrong ("" otherwise): the SDK reports
        an unreachable node as an invalid payment. An exception means the facilitator is
        unusable: Unavailable."""
        # After a restart the settlement loop comes before any offer: initialize here too.
        self._init()
        rail = self.rails[payment.network]
        payload, requirement = _x402_objects(payment)
        started = time.monotonic()
        try:
            result = call(payload, requirement)
        except Exception as e:
            raise Unavailable(f"x402 facilitator failed: {_first_line(e)}") from e
        return result, rail.transport_error_since(started)

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
        if reason == SETTLEMENT_PENDING:
            tx = str(result.transaction or "")
            if tx and rail.settlement_failed(tx):  # it ran and failed: nothing moved
                raise SettlementRefused(
                    "settlement_failed", f"settlement {tx} landed with an error"
                )
            raise SettlementPending(f"settlement {tx} not confirmed yet")
        if node_down:
            raise Unavailable(f"chain node unreachable while settling: {node_down}")
        used, tx = rail.settlement_of(payment)
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
                    if rail.waits(p):
                        continue  # left open, as it was
                    try:
                        out[p.job_id] = self.settle(p)
                    except SettlementRefused as e:
                        out[p.job_id] = e
                    except SettlementPending as e:  # this one's own: the others go on
                        log.warning("payment of job %s: %s", p.job_id, e.message,
                                    extra={"job_id": p.job_id})  # fmt: skip
                continue
            out.update(rail.settle_batch(asset, group, self._refusal))
        return out

    def _refusal(self, payment: Payment) -> SettlementRefused | None:
        """Why the token will not take a payment, in x402's words (the facilitator's
        verification names the reason: balance, expiry, ...); None when it still verifies
        (it stays open and is tried again, until its authorization expires)."""
        verified, node_down = self._facilitate(payment, self.server.verify_payment)
        if node_down:
            raise Unavailable(f"chain node unreachable while settling: {node_down}")
        if verified.is_valid:
            if payment.job_id not in self._refused_valid:  # once: it is tried every pass
                if len(self._refused_valid) >= 10_000:
                    self._refused_valid.clear()
                self._refused_valid.add(payment.job_id)
                log.warning(
                    "payment of job %s verifies but the token refused it (kept open, tried "
                    "again until its authorization expires)",
                    payment.job_id,
                )
            return None
        return SettlementRefused(verified.invalid_reason or "settlement_failed")

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        return self.rails[payment.network].sign_refund(payment)

    def refund_status(self, payment: Payment) -> bool | None:
        return self.rails[payment.network].refund_status(payment)

    def broadcast_refund(self, payment: Payment) -> bool | None:
        return self.rails[payment.network].broadcast_refund(payment)

    def close(self) -> None:
        pass


# How far ahead of this machine a client's clock may be when it signs an authorization
CLOCK_SLACK_SECONDS = 120


def _x402_objects(payment: Payment) -> tuple[PaymentPayload, PaymentRequirements]:
    return (
        PaymentPayload.model_validate(json.loads(payment.payload_json)),
        PaymentRequirements.model_validate(json.loads(payment.requirement_json)),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def gateway_for(profile: Profile, data_dir: Path) -> X402Gateway | None:
    """The profile's payment gateway ([payments] enabled), None when payments are off; each
    accepted network's rail comes from the adapter of the chain that network is on ([chain],
    or [identity_chain]: a coordinator may accept both, the client picks)."""
    if not profile.payments.enabled:
        return None
    rails = []
    for accept in profile.payments.accept:
        on = registry.payment_profile(profile, accept.network)
        if on is None:
            raise ValueError(f"[[payments.accept]] {accept.network}: no chain of the profile")
        rails.append(registry.adapter_of(on).payment_rail(accept, on, data_dir))
    return X402Gateway(rails, profile.payments.settle_margin_seconds)
