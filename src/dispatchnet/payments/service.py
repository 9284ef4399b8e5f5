"""PaymentService: when a job is paid for, and when the money moves.

At CommitJob (authorize): the payment must meet one of the quote's offers and verify with a
facilitator; it is stored with the job in one transaction, and its one-time authorization
id is unique in the store, so a payment is accepted once, across restarts. Nothing moves
on chain yet.

Afterwards a background loop (settle_due) moves each payment on:

    AUTHORIZED --job completed--------------------------> settle --> SETTLED
    AUTHORIZED --job failed/cancelled-------------------> RELEASED (never settled: not charged)
    AUTHORIZED --settle_by reached, job still open------> settle --> HELD
    HELD       --job completed--------------------------> SETTLED
    HELD       --job failed/cancelled-------------------> REFUND_DUE --refund--> REFUNDED
    AUTHORIZED --the chain refuses the settlement-------> FAILED (not charged; a job
                                                           still open is cancelled)

A payer's balance must cover all its payments not moved yet, not each one alone: each
verifies against the whole balance, so authorize also counts the payer's AUTHORIZED
payments (stored, or being committed here) before it accepts another (see _covered).

Reaching SETTLED (money arrived, job completed) credits the job's worker with the amount
minus the [payouts] fee, in the same store transaction; nothing else credits, and a
refund reverses a credit (README "Workers earn").

settle_by is the authorization's validBefore minus the profile's settle margin: the client
is charged only for completed work whenever the authorization's window allows it, and
otherwise refunded on chain. The chain being down leaves a payment where it is (the error
noted) and the loop backs off; a payment whose settlement was sent before a crash is
found on chain instead of being sent again. Refunds are signed and stored before they are
broadcast, so a retry resends the same transaction rather than paying twice.

Domain code: no grpc, no SQL, no x402 types (the gateway, payments/x402.py, has those).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import Job, JobState, Payment, PaymentStatus, Quote, Split
from dispatchnet.errors import (
    DispatchError,
    FailedPrecondition,
    PaymentRequired,
    PaymentReused,
    Unavailable,
)
from dispatchnet.loops import OutboxLoop
from dispatchnet.profiles import JobsConfig, PaymentsConfig, PayoutsConfig
from dispatchnet.store.base import Store

log = logging.getLogger("dispatch.payments")

COMMIT_RESOURCE = "grpc:///dispatch.v1.CoordinatorService/CommitJob"
PAGE = 100
OFFERS_KEPT = 256  # prices whose payment requirements are kept (see PaymentService.offers)


class SettlementRefused(Exception):
    """The chain will not settle this payment (the payer's balance is gone, the
    authorization was cancelled or expired): final, and the payer is not charged."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class SettlementPending(Unavailable):
    """The payment's settlement was sent and is not confirmed, or the chain cannot tell
    yet what became of it: it stays open (and is looked at again later) without holding
    up the other payments (the node answers)."""


class PaymentGateway(Protocol):
    """The x402 machinery (payments/x402.py). Every method may block, but verify_async:
    the same as verify, awaited on the event loop without blocking it."""

    def describe(self) -> str: ...
    def offers(self, price_micros: int, timeout_seconds: int) -> list[Any]: ...
    def required_header(
        self, offers: list[Any], error: str, resource: str, description: str
    ) -> str: ...
    def parse(self, header: str, offers: list[Any], now: float) -> Payment: ...
    def verify(self, payment: Payment) -> None: ...
    async def verify_async(self, payment: Payment) -> None: ...
    def balance(self, payment: Payment) -> int: ...
    def response_header(self, payment: Payment) -> str: ...
    def settle_batch(self, payments: list[Payment]) -> dict[str, str | SettlementRefused]: ...
    def sign_refund(self, payment: Payment) -> tuple[str, str]: ...
    def refund_status(self, payment: Payment) -> bool | None: ...
    def broadcast_refund(self, payment: Payment) -> bool | None: ...
    def close(self) -> None: ...


class WrappingGateway:
    """A PaymentGateway that wraps another: every method is the inner gateway's, and
    anything else it has (e.g. X402Gateway.settle, for tools and tests) reads through;
    subclasses change what they add to (timing, verifying elsewhere)."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.inner = inner

    def describe(self) -> str:
        return self.inner.describe()

    def offers(self, price_micros: int, timeout_seconds: int) -> list[Any]:
        return self.inner.offers(price_micros, timeout_seconds)

    def required_header(
        self, offers: list[Any], error: str, resource: str, description: str
    ) -> str:
        return self.inner.required_header(offers, error, resource, description)

    def parse(self, header: str, offers: list[Any], now: float) -> Payment:
        return self.inner.parse(header, offers, now)

    def verify(self, payment: Payment) -> None:
        self.inner.verify(payment)

    async def verify_async(self, payment: Payment) -> None:
        await self.inner.verify_async(payment)

    def balance(self, payment: Payment) -> int:
        return self.inner.balance(payment)

    def response_header(self, payment: Payment) -> str:
        return self.inner.response_header(payment)

    def settle_batch(self, payments: list[Payment]) -> dict[str, str | SettlementRefused]:
        return self.inner.settle_batch(payments)

    def sign_refund(self, payment: Payment) -> tuple[str, str]:
        return self.inner.sign_refund(payment)

    def refund_status(self, payment: Payment) -> bool | None:
        return self.inner.refund_status(payment)

    def broadcast_refund(self, payment: Payment) -> bool | None:
        return self.inner.broadcast_refund(payment)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class PaymentService(OutboxLoop):
    name = "payment-settler"
    outbox = "settlement"
    page = PAGE

    def __init__(
        self,
        store: Store,
        jobs: JobService,
        gateway: PaymentGateway,
        cfg: PaymentsConfig,
        jobs_cfg: JobsConfig,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 30.0,
        payouts: PayoutsConfig | None = None,
    ) -> None:
        super().__init__(clock, tick_seconds, retry_initial_seconds, retry_max_seconds)
        self.payouts = payouts or PayoutsConfig()
        self.store = store
        self.jobs = jobs
        self.gateway = gateway
        self.cfg = cfg
        self.jobs_cfg = jobs_cfg
        # job_id -> when its payment was first seen due for settlement (batching window)
        self._due_since: dict[str, float] = {}
        self._offers: dict[tuple[int, int], list[Any]] = {}  # (price, timeout) -> offers
        # payments this process handed to the gateway to settle and not recorded since
        self._sent: set[str] = set()
        # (network, asset, payer) -> {authorization id: amount} of the payments passed by
        # authorize whose commit has not ended yet (see _covered)
        self._committing: dict[tuple[str, str, str], dict[str, int]] = {}
        # a payment due before this process started may have been sent by the one before
        self.started_at = clock()
        jobs.final_listeners.append(self.job_final)

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.gateway.close)  # e.g. its verifier processes

    # --- at CommitJob -------------------------------------------------------------------------

    def timeout_seconds(self) -> int:
        """The authorization window asked of clients: the job's worst-case lifetime (queue
        wait plus every attempt's time limit) plus the settle margin, capped."""
        j = self.jobs_cfg
        lifetime = j.queue_timeout_seconds + j.max_attempts * j.time_limit_seconds
        return int(
            min(self.cfg.max_authorization_seconds, lifetime + self.cfg.settle_margin_seconds)
        )

    async def offers(self, quote: Quote) -> list[Any]:
        """The quote's payment requirements. They depend on its price and this
        coordinator's configuration only, so each price's are built once (on a thread: the
        first may read the token's metadata from the chain) and kept (OFFERS_KEPT prices)."""
        key = (quote.price_micros, self.timeout_seconds())
        offers = self._offers.get(key)
        if offers is None:
            offers = await asyncio.to_thread(self.gateway.offers, *key)
            if len(self._offers) >= OFFERS_KEPT:
                self._offers.clear()
            self._offers[key] = offers
        return offers

    def refusal(
        self, quote: Quote, offers: list[Any], message: str, reason: str
    ) -> PaymentRequired:
        """A PaymentRequired error carrying the payment-required header for the quote."""
        header = self.gateway.required_header(
            offers,
            reason or message,
            f"{COMMIT_RESOURCE}?quote_id={quote.quote_id}",
            f"{quote.spec.job_type.name} job ({quote.spec.policy.name}), quote {quote.quote_id}",
        )
        return PaymentRequired(message, reason=reason, required_header=header)

    async def authorize(
        self, client_id: str, quote_id: str, idempotency_key: str, header: str | None
    ) -> Payment | None:
        """The verified payment for CommitJob(quote_id), to be stored with the job; None
        when the idempotency key names an existing job (which costs nothing more). Raises
        PaymentRequired (none sent, or refused), InvalidArgument (malformed), Unavailable
        (facilitator or node down), and whatever would stop the commit anyway
        (JobService.check_commit), before any payment is verified."""
        # The key's job is looked up only when the payment does not pass (or none is
        # sent): a new job, most commits, costs no read for it. A payment that passes for
        # a key used before is not stored (create_job returns the key's job instead).
        quote, existing = await self.jobs.check_commit(
            client_id, quote_id, idempotency_key, look_up=False
        )
        if existing is not None:  # (an expired quote's key: its job, looked up)
            return None
        now = self.clock()
        offers = await self.offers(quote)
        try:
            if not header:
                raise self.refusal(
                    quote,
                    offers,
                    "CommitJob needs an x402 payment: send `payment-signature` metadata for "
                    "one of the payment-required trailer's `accepts` (README: Payments)",
                    "payment_required",
                )
            try:
                payment = self.gateway.parse(header, offers, now)
                used, _ = await self.store.payment_standing(
                    payment.network, payment.asset, payment.payer, payment.authorization_id
                )
                if used:
                    raise PaymentReused("this payment was already used for a job; sign a new one")
                await self.gateway.verify_async(payment)
                await self._covered(payment)  # reserved from here: see committed()
            except PaymentRequired as e:
                raise self.refusal(quote, offers, e.message, e.reason) from None
        except DispatchError:
            # a job committed with the key before costs nothing more, whatever was sent
            _, existing = await self.jobs.check_commit(client_id, quote_id, idempotency_key)
            if existing is not None:
                return None
            raise
        return payment

    async def _covered(self, payment: Payment) -> None:
        """Refuses a verified payment that the payer's balance does not cover beside its
        payments not moved on chain yet (stored AUTHORIZED, or being committed here):
        each verifies against the whole balance, so without this a payer could commit
        many jobs on one price's worth and only the first would settle. Once it passes,
        the payment's amount stays reserved here until committed() (the job is stored,
        or not): a commit beside it counts it before its job is written. The store is
        read after the reservation, so a commit that ended before it is in the store.
        Called after verify: only a payer's own signature reserves any of its balance."""
        key = (payment.network, payment.asset.lower(), payment.payer.lower())
        committing = self._committing.setdefault(key, {})
        others = sum(committing.values())
        committing[payment.authorization_id] = payment.amount
        try:
            used, stored = await self.store.payment_standing(
                payment.network, payment.asset, payment.payer, payment.authorization_id
            )
            if used:
                raise PaymentReused("this payment was already used for a job; sign a new one")
            owed = stored + others
            if owed:  # else verify's own balance check covers this payment alone
                balance = await asyncio.to_thread(self.gateway.balance, payment)
                if balance < owed + payment.amount:
                    raise PaymentRequired(
                        f"payment refused: the payer's balance ({balance}) does not cover "
                        f"this payment ({payment.amount}) beside its payments not settled "
                        f"yet ({owed}); wait for them to settle, or add funds",
                        reason="insufficient_funds",
                    )
        except BaseException:
            self.committed(payment)
            raise

    def committed(self, payment: Payment) -> None:
        """The commit of a payment that passed authorize has ended (its job is stored with
        it, or will never be): its reservation of the payer's balance ends (once: again is
        a no-op)."""
        key = (payment.network, payment.asset.lower(), payment.payer.lower())
        committing = self._committing.get(key)
        if committing is not None:
            committing.pop(payment.authorization_id, None)
            if not committing:
                del self._committing[key]

    async def quote_header(self, quote_id: str) -> str:
        """The payment-required header for a quote just made (sent with GetQuote)."""
        quote = await self.jobs.get_quote(quote_id)
        refusal = self.refusal(
            quote,
            await self.offers(quote),
            "CommitJob needs an x402 payment for this quote",
            "payment_required",
        )
        return refusal.required_header

    async def refusal_for(self, quote_id: str, e: PaymentRequired) -> PaymentRequired:
        """e with the quote's payment-required header (for refusals raised at commit)."""
        quote = await self.jobs.get_quote(quote_id)
        return self.refusal(quote, await self.offers(quote), e.message, e.reason)

    async def response_header(self, job: Job, committed_with: Payment | None = None) -> str:
        """The payment-response header for a committed job: from the payment it was just
        committed with when given (no read), else as the store has it ("" for none)."""
        if committed_with is not None:
            payment: Payment | None = dataclasses.replace(committed_with, job_id=job.job_id)
        else:
            payment = await self.store.get_payment(job.job_id)
        return self.gateway.response_header(payment) if payment is not None else ""

    # --- settlement loop --------------------------------------------------------------------

    def job_final(self, job: Job) -> None:
        """JobService final listener: the job's payment may be due."""
        self.kick()

    async def run_pass(self) -> int:
        return await self.settle_due()

    async def settle_due(self) -> int:
        """One pass over the payments due; how many changed. Settlements are gathered and
        sent in batches (see _settle_due). Chain trouble backs the loop off; a payment
        whose own step failed (a refund that reverted) waits its own back-off and does not
        hold up the others (they are older or newer; the pass goes on)."""
        if self.backing_off():
            return 0
        changed = 0
        due: list[Payment] = []
        states: dict[str, JobState] = {}  # the jobs' states as read with their payments
        for payment, job_state in await self.store.due_payments(self.clock(), PAGE):
            states[payment.job_id] = job_state
            try:
                if await self._advance(payment, job_state, due):
                    changed += 1
            except Unavailable as e:
                await self._back_off(payment, e.message)
                continue
            except Exception:  # a bug, not the chain: keep the payment, go on
                log.exception("payment of job %s failed unexpectedly", payment.job_id,
                              extra={"job_id": payment.job_id})  # fmt: skip
                continue
            self.recovered()
        if due and not await self.fenced():
            return changed
        return changed + await self._settle_due(due, states)

    async def _back_off(self, payment: Payment, error: str) -> None:
        delay = self.backed_off(error, payment.network)
        await self._update(payment, (payment.status,), error=error, attempts=payment.attempts + 1)
        log.warning("payment of job %s waits (%s); retrying in %.1fs", payment.job_id, error,
                    delay, extra={"job_id": payment.job_id})  # fmt: skip

    async def _advance(self, p: Payment, job_state: JobState, due: list[Payment]) -> bool:
        """Moves p on where that needs no settlement; a payment to settle goes to `due`."""
        now = self.clock()
        done = job_state is JobState.COMPLETED
        dropped = job_state in (JobState.FAILED, JobState.CANCELLED)
        if p.status is PaymentStatus.AUTHORIZED:
            if dropped:
                if self._maybe_sent(p):
                    # its settlement may be on its way (sent, then the receipt was lost or
                    # the process died): released, it could still land and charge the
                    # payer for nothing. It is settled instead (once: the chain sees to
                    # that, whichever transaction lands) and paid back (REFUND_DUE).
                    due.append(p)
                    return False
                return await self._update(p, (p.status,), status=PaymentStatus.RELEASED) is not None
            if done or now >= p.settle_by:
                # (an expired authorization is refused, unless an earlier attempt settled
                # it after all: settlement finds that on chain)
                due.append(p)
            return False
        if p.status is PaymentStatus.HELD:
            if done:
                return await self._update(p, (p.status,), status=PaymentStatus.SETTLED) is not None
            if dropped:
                p = await self._update(p, (p.status,), status=PaymentStatus.REFUND_DUE) or p
        if p.status is PaymentStatus.REFUND_DUE:
            if p.error and now < p.updated_at + self._retry_delay(p.attempts):
                return False  # its last refund failed: not again before its back-off
            return await self._refund(p)
        return False

    def _retry_delay(self, attempts: int) -> float:
        """How long a payment whose step failed `attempts` times waits before the next."""
        return float(min(self.retry_max, self.retry_initial * 2 ** max(0, attempts - 1)))

    def _maybe_sent(self, p: Payment) -> bool:
        """Whether a settlement of this authorized payment may have been sent: an attempt
        failed or left no answer (its receipt lost), this process sent one, or it came due
        (settle_by) before this process started, so the one before may have."""
        return p.attempts > 0 or p.job_id in self._sent or p.settle_by <= self.started_at

    async def _settle_due(self, due: list[Payment], states: dict[str, JobState]) -> int:
        """Settles the payments due in batches of settle_batch_size: a full batch at once,
        a smaller one once its oldest payment has waited settle_max_wait_seconds (or when a
        payment's settle_by has come). Nothing is lost by waiting: the payments stay
        authorized in the store."""
        now = self.clock()
        seen = {p.job_id for p in due}
        for job_id in list(self._due_since):
            if job_id not in seen:
                del self._due_since[job_id]
        for p in due:
            self._due_since.setdefault(p.job_id, now)
        size = self.cfg.settle_batch_size
        oldest = min((self._due_since[p.job_id] for p in due), default=now)
        urgent = any(now >= p.settle_by for p in due)
        ready = len(due) >= size or urgent or now - oldest >= self.cfg.settle_max_wait_seconds
        if not ready:
            self.wake_at(oldest + self.cfg.settle_max_wait_seconds)
            return 0
        changed = 0
        for i in range(0, len(due), size):
            chunk = due[i : i + size]
            if len(chunk) < size and not urgent and now - oldest < self.cfg.settle_max_wait_seconds:
                self.wake_at(oldest + self.cfg.settle_max_wait_seconds)
                break
            chunk = await self._mark_early(chunk, states)
            if not chunk:
                continue
            self._sent.update(p.job_id for p in chunk)
            try:
                results = await asyncio.to_thread(self.gateway.settle_batch, chunk)
            except Unavailable as e:
                for p in chunk:
                    await self._back_off(p, e.message)
                break
            self.recovered()
            settled = [(p, r) for p in chunk if (r := results.get(p.job_id)) is not None]
            for p, _ in settled:
                self._due_since.pop(p.job_id, None)
                self._sent.discard(p.job_id)
            # recorded together: the store commits them in one transaction
            recorded = [self._settled(p, r, states.get(p.job_id)) for p, r in settled]
            changed += sum(await asyncio.gather(*recorded))
        return changed

    async def _mark_early(self, chunk: list[Payment], states: dict[str, JobState]) -> list[Payment]:
        """chunk, with the payments settled before their jobs completed (settle_by came)
        marked in the store first as maybe sent (an attempt), unless they are already: if
        this process dies while the settlement is out and the job is then cancelled, the
        coordinator that takes the payment over (after a restart, or another one on a
        shared store) settles and pays back instead of releasing a payment whose
        settlement may still land (see _maybe_sent). Marked together: one transaction.
        A payment that changed meanwhile is left out of this batch."""
        early = [
            p for p in chunk if p.attempts == 0 and states.get(p.job_id) is not JobState.COMPLETED
        ]
        if not early:
            return chunk
        marked = await asyncio.gather(
            *(self._update(p, (p.status,), attempts=p.attempts + 1) for p in early)
        )
        lost = {p.job_id for p, m in zip(early, marked, strict=True) if m is None}
        return [p for p in chunk if p.job_id not in lost]

    async def _settled(
        self, p: Payment, result: str | SettlementRefused, job_state: JobState | None = None
    ) -> int:
        """Records one settlement's outcome: the transaction, or a final refusal. job_state:
        the job's state when the pass read it (a final one cannot have changed since)."""
        if isinstance(result, SettlementRefused):
            if job_state in (JobState.FAILED, JobState.CANCELLED):  # nothing to charge for
                await self._update(p, (p.status,), status=PaymentStatus.RELEASED, error="")
                return 1
            log.warning("settlement of job %s refused: %s (not charged)", p.job_id, result,
                        extra={"job_id": p.job_id})  # fmt: skip
            failed = await self._update(
                p, (p.status,), status=PaymentStatus.FAILED, error=str(result)
            )
            if failed is not None and (job_state is None or not job_state.final):
                # settled early, the job still open: it must not run for nothing
                await self._cancel_unpaid(p.job_id, result)
            return 1
        if job_state is None or not job_state.final:
            job = await self.store.get_job(p.job_id)
            job_state = job.state if job is not None else JobState.FAILED
        state = job_state
        status = (
            PaymentStatus.SETTLED
            if state is JobState.COMPLETED
            else PaymentStatus.REFUND_DUE
            if state.final
            else PaymentStatus.HELD
        )
        log.info("payment of job %s settled in %s (%s)", p.job_id, result, status.value,
                 extra={"job_id": p.job_id})  # fmt: skip
        await self._update(p, (p.status,), status=status, transaction=result, error="")
        return 1

    async def _cancel_unpaid(self, job_id: str, refused: SettlementRefused) -> None:
        """Cancels a job still open whose payment the chain refused (settled early: the
        payer's balance went elsewhere, the authorization was cancelled or expired): it
        would otherwise run, and its worker work, for nothing."""
        job = await self.store.get_job(job_id)
        if job is None or job.state.final:
            return
        try:
            await self.jobs.cancel(
                job.client_id,
                job_id,
                f"its payment was refused on chain ({refused.reason}); commit it again "
                "with a payment that can settle",
            )
        except FailedPrecondition:  # it ended meanwhile
            pass

    async def _refund(self, p: Payment) -> bool:
        if not await self.fenced():
            return False
        if p.refund_transaction:
            mined = await asyncio.to_thread(self.gateway.refund_status, p)
            if mined is None:
                mined = await asyncio.to_thread(self.gateway.broadcast_refund, p)
            if mined is None:  # stale: sign a new one
                await self._update(p, (p.status,), refund_transaction="", refund_raw="")
                return True
            if not mined:
                # reverted (e.g. the account lacks the funds): keep it due, try a new one
                await self._update(
                    p,
                    (p.status,),
                    refund_transaction="",
                    refund_raw="",
                    error=f"refund {p.refund_transaction} reverted",
                )
                raise Unavailable(f"refund {p.refund_transaction} reverted")
            await self._update(
                p, (p.status,), status=PaymentStatus.REFUNDED, refund_raw="", error=""
            )
            log.info("payment of job %s refunded in %s", p.job_id, p.refund_transaction,
                     extra={"job_id": p.job_id})  # fmt: skip
            return True
        raw, tx = await asyncio.to_thread(self.gateway.sign_refund, p)
        stored = await self._update(p, (p.status,), refund_transaction=tx, refund_raw=raw)
        return await self._refund(stored) if stored is not None else False

    async def _update(
        self, p: Payment, from_statuses: tuple[PaymentStatus, ...], **changes: Any
    ) -> Payment | None:
        # the money arrived and the job completed: its worker is credited in the same
        # transaction (refunds reverse a credit in the store; see Store.update_payment)
        if "status" in changes:
            self._sent.discard(p.job_id)
        settled = changes.get("status") is PaymentStatus.SETTLED
        updated = await self.store.update_payment(
            p.job_id,
            from_statuses,
            {**changes, "updated_at": self.clock()},
            credit=Split.of(p.amount, self.payouts.fee_bps) if settled else None,
        )
        if updated is not None:
            self.jobs.notifier.notify(p.job_id)
            self.observer.payment_changed(updated)
        return updated
