"""PayoutService: pays workers their balances on chain, batched and exactly once.

Each run (a background OutboxLoop, never on the job path):
1. payouts already recorded but not known landed (after a crash, a node outage, a signed
   payout not sent yet) are looked up on chain with the sender's status() first: LANDED
   and FAILED are recorded, NOT_FOUND is sent (again: the sender makes a second landing
   impossible), STALE is signed anew (same payout id), and UNKNOWN (the chain cannot tell
   whether it landed) is held: it stays signed with the reason, is never signed anew, and
   is looked up again after a back-off (HELD_FIRST_SECONDS, doubling up to
   HELD_MOST_SECONDS), with a warning at each look;
2. every worker with an agent id whose unpaid balance on this chain's network reached
   [payouts] min_payout_micros, or whose oldest unpaid credit waited interval_seconds, and
   whose payout address the chain gives, gets one payout of its whole unpaid balance: the
   row is written and the balance debited in one transaction, then it is signed, the signed
   artifact stored, then sent, and its outcome recorded.
A payout that can never land (FAILED) returns its amount to the worker's balance. Workers
without a payout address (unregistered) accrue and are paid once they register.

Chain trouble (Unavailable) leaves every payout where it is and backs off. Domain code:
the chain is reached through the PayoutSender port and an address resolver.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from dispatchnet.coordinator.models import PayoutDue, PayoutRecord, PayoutRowState
from dispatchnet.coordinator.ports import PayoutLedger
from dispatchnet.errors import Unavailable
from dispatchnet.loops import OutboxLoop
from dispatchnet.payments.payouts import (
    Payout,
    PayoutSender,
    PayoutState,
    PayoutStatus,
    SignedPayout,
)
from dispatchnet.profiles import PayoutsConfig

log = logging.getLogger("dispatch.payouts")

PAGE = 100  # payouts (open, or new) handled per run; a full page runs again at once
MAX_PAGES = 20  # due rows examined per run: at most MAX_PAGES * PAGE
# A payout the chain cannot tell landed or not (UNKNOWN) waits this long before it is
# looked up again (so it is warned about at most once a minute), doubling up to the most.
HELD_FIRST_SECONDS = 60.0
HELD_MOST_SECONDS = 3600.0
HELD_KEPT = 10_000  # held payouts whose back-off is remembered (the oldest forgotten)


def new_payout_id() -> str:
    return "0x" + secrets.token_hex(32)


class PayoutService(OutboxLoop):
    name = "payout-sender"
    outbox = "payouts"
    page = PAGE

    def __init__(
        self,
        ledger: PayoutLedger,
        sender: PayoutSender,
        address_of: Callable[[str], str | None],
        network: str,
        cfg: PayoutsConfig,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 30.0,
    ) -> None:
        """address_of(agent_id) is the agent's payout address on this chain, None when it
        has none (it blocks: it reads the chain; Unavailable on node trouble)."""
        super().__init__(clock, tick_seconds, retry_initial_seconds, retry_max_seconds)
        self.name = f"payout-sender {network}"  # one loop per payment network
        self.ledger = ledger
        self.sender = sender
        self.address_of = address_of
        self.network = network
        self.chain = network
        self.cfg = cfg
        # agent id -> when to look again for a payout address the chain did not give
        self._no_address: dict[str, float] = {}
        self._failed = ""  # why a payout of this run failed for good ("" none)
        # payout id -> (when to look it up again, the delay): payouts held as UNKNOWN
        self._held: dict[str, tuple[float, float]] = {}

    async def run_pass(self) -> int:
        if self.backing_off():
            return 0
        self._failed = ""
        try:
            handled = await self._resume()
            handled += await self._pay_due()
        except Unavailable as e:
            delay = self.backed_off(e.message)
            log.warning("payouts on %s wait (%s); retrying in %.1fs", self.network, e.message,
                        delay)  # fmt: skip
            return 0
        if self._failed:
            # (e.g. the account lacks the funds): new payouts wait, backing off, rather
            # than a new failing payout per worker every tick
            self.backed_off(self._failed)
            return 0
        self.recovered()
        return handled

    async def _resume(self) -> int:
        """Step 1: the payouts recorded before this run, looked up before anything is sent;
        how many moved on. The least lately touched come first, and one whose sending the
        node refused (e.g. a recipient account that cannot take it) waits retry_max before
        it is tried again, one held as UNKNOWN its back-off: such payouts neither hide the
        others nor make every pass a full one."""
        now = self.clock()
        open_ = await self.ledger.open_payouts(self.network, PAGE)
        waiting = {
            p.payout_id
            for p in open_
            if p.state is PayoutRowState.SIGNED
            and (
                (p.error and now < p.updated_at + self.retry_max)
                or now < self._held.get(p.payout_id, (0.0, 0.0))[0]
            )
        }
        to_sign = [p for p in open_ if p.state is PayoutRowState.PENDING]
        to_send: list[PayoutRecord] = []
        held = 0
        for p in open_:
            if p.state is not PayoutRowState.SIGNED or p.payout_id in waiting:
                continue
            status = await asyncio.to_thread(self.sender.status, _signed(p))
            if status.state is PayoutState.UNKNOWN:
                held += 1
                await self._hold(p, status.reason)
                continue
            self._held.pop(p.payout_id, None)
            if status.state is PayoutState.NOT_FOUND:
                to_send.append(p)
            elif status.state is PayoutState.STALE:
                fresh = await self._update(p, state=PayoutRowState.PENDING, raw="", error="stale")
                if fresh is not None:
                    to_sign.append(fresh)
            else:
                await self._outcome(p, status)
        to_send += await self._sign(to_sign)
        return len(open_) - len(waiting) - held - await self._send(to_send)

    async def _pay_due(self) -> int:
        """Step 2: one new payout per worker and asset that is due (at most PAGE)."""
        now = self.clock()
        before = now - self.cfg.interval_seconds
        for t in [a for a, at in self._no_address.items() if at <= now]:
            del self._no_address[t]
        created: list[PayoutRecord] = []
        cursor = None
        # pages on past workers with no payout address, so they never hide the ones behind
        for _ in range(MAX_PAGES):
            page = await self.ledger.payouts_due(
                self.network, self.cfg.min_payout_micros, before, PAGE, cursor
            )
            for d in page:
                if len(created) < PAGE and d.agent_id not in self._no_address:
                    record = await self._record(d, now)
                    if record is not None:
                        created.append(record)
            if len(page) < PAGE or len(created) >= PAGE:
                break
            cursor = page[-1].cursor
        await self._send(await self._sign(created))
        return len(created)  # (recorded and debited, whatever the send said)

    async def _record(self, d: PayoutDue, now: float) -> PayoutRecord | None:
        """The payout of d's whole unpaid balance, recorded (balance debited); None when
        the worker has no payout address (it accrues; asked again after retry_max)."""
        to = await asyncio.to_thread(self.address_of, d.agent_id)
        if not to:
            self._no_address[d.agent_id] = now + self.retry_max
            return None
        record = PayoutRecord(
            payout_id=new_payout_id(),
            worker_id=d.worker_id,
            network=d.network,
            asset=d.asset,
            to=to,
            amount=d.unpaid,
            state=PayoutRowState.PENDING,
            created_at=now,
            updated_at=now,
        )
        return record if await self.ledger.create_payout(record) else None

    async def _sign(self, pending: list[PayoutRecord]) -> list[PayoutRecord]:
        """Signs pending payouts and stores each signed artifact before anything is sent."""
        if not pending:
            return []
        payouts = [Payout(p.payout_id, p.to, p.amount, p.asset) for p in pending]
        signed = await asyncio.to_thread(self.sender.sign, payouts)
        stored = []
        for p, s in zip(pending, signed, strict=True):
            record = await self._update(
                p, state=PayoutRowState.SIGNED, raw=s.raw, transaction=s.transaction, error=""
            )
            if record is not None:
                stored.append(record)
        return stored

    async def _send(self, signed: list[PayoutRecord]) -> int:
        """Sends signed payouts and records what became of them; how many the node refused
        to take or the chain cannot tell landed or not (they stay signed, with the reason,
        and wait: see _resume)."""
        if not signed or not await self.fenced():
            return 0
        results = await asyncio.to_thread(self.sender.send, [_signed(p) for p in signed])
        waiting = 0
        for p in signed:
            status = results.get(p.payout_id)
            if status is None:
                continue
            if status.state is PayoutState.UNKNOWN:
                waiting += 1
                await self._hold(p, status.reason)
                continue
            if status.state is PayoutState.NOT_FOUND and status.reason:
                waiting += 1
                await self._update(p, error=status.reason[:500])
                log.warning("payout %s of %d to %s was not taken (%s); tried again in %.0fs",
                            p.payout_id, p.amount, p.to, status.reason, self.retry_max)  # fmt: skip
                continue
            await self._outcome(p, status)
        return waiting

    async def _hold(self, p: PayoutRecord, reason: str) -> None:
        """Holds a payout the chain cannot tell landed or not: it stays signed, with the
        reason, and is never signed anew (a second signing could pay twice; the stored one
        can no longer land). Looked up again after its back-off; one warning per look."""
        now = self.clock()
        _, delay = self._held.get(p.payout_id, (now, HELD_FIRST_SECONDS / 2))
        delay = min(HELD_MOST_SECONDS, delay * 2)
        if len(self._held) >= HELD_KEPT and p.payout_id not in self._held:
            self._held.pop(next(iter(self._held)))
        self._held[p.payout_id] = (now + delay, delay)
        await self._update(p, error=f"unknown: {reason}"[:500])
        log.warning("payout %s of %d to %s is held, not signed anew (%s); looked up again in "
                    "%.0fs", p.payout_id, p.amount, p.to, reason, delay)  # fmt: skip

    async def _outcome(self, p: PayoutRecord, status: PayoutStatus) -> None:
        if status.state is PayoutState.LANDED:
            done = await self._update(
                p, state=PayoutRowState.LANDED, transaction=status.transaction, error=""
            )
            log.info("payout %s of %d to %s landed in %s", p.payout_id, p.amount, p.to,
                     status.transaction)  # fmt: skip
        elif status.state is PayoutState.FAILED:
            done = await self._update(p, state=PayoutRowState.FAILED, error=status.reason[:500])
            self._failed = f"payout {p.payout_id} failed: {status.reason}"[:500]
            log.warning("payout %s failed for good (%s): its amount is back in the balance",
                        p.payout_id, status.reason)  # fmt: skip
        else:
            return
        if done is not None:
            self.observer.payout_changed(done)

    async def _update(self, p: PayoutRecord, **changes: Any) -> PayoutRecord | None:
        return await self.ledger.update_payout(
            p.payout_id,
            (p.state,),
            {**changes, "updated_at": self.clock()},
        )


def _signed(p: PayoutRecord) -> SignedPayout:
    return SignedPayout(Payout(p.payout_id, p.to, p.amount, p.asset), p.raw, p.transaction)
