"""EarningsService: what workers have earned, as the workers themselves may read it.

The credits are written by the store with each settlement (PaymentService, README
"Workers earn"); this reads them back, paged, for the one worker allowed to see them.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dispatchnet import protocol
from dispatchnet.coordinator.models import Balance, Earning, PayoutRecord
from dispatchnet.coordinator.ports import EarningsLedger
from dispatchnet.errors import InvalidArgument, PermissionDenied

MAX_PAGE = protocol.MAX_EARNINGS_PAGE


@dataclass(frozen=True)
class EarningsPage:
    worker_id: str
    balances: list[Balance]
    jobs: list[Earning]
    next_page_token: str
    fee_bps: int
    payouts: list[PayoutRecord]  # the newest MAX_PAGE, newest first


def _token(e: Earning) -> str:
    return base64.urlsafe_b64encode(f"{e.credited_at!r}|{e.job_id}".encode()).decode()


def _cursor(token: str) -> tuple[float, str]:
    try:
        when, _, job_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        at = float(when)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not one this coordinator issued") from None
    if not job_id or not math.isfinite(at):
        raise InvalidArgument("page_token is not one this coordinator issued")
    return at, job_id


class EarningsService:
    def __init__(self, ledger: EarningsLedger, fee_bps: int) -> None:
        self.ledger = ledger
        self.fee_bps = fee_bps

    async def page(
        self, caller_id: str, worker_id: str, page_size: int, page_token: str
    ) -> EarningsPage:
        """The caller's own earnings (worker_id empty or the caller's id; any other:
        PermissionDenied): balances, one page of jobs newest first, and the next token.
        InvalidArgument for a page_token this service did not issue."""
        worker_id = worker_id.lower() or caller_id
        if worker_id != caller_id:
            raise PermissionDenied("only the worker itself may read its earnings")
        size = min(page_size or MAX_PAGE, MAX_PAGE)
        before = _cursor(page_token) if page_token else None
        rows = await self.ledger.earnings(worker_id, size + 1, before)
        more = len(rows) > size
        rows = rows[:size]
        return EarningsPage(
            worker_id=worker_id,
            balances=(await self.ledger.balances([worker_id])).get(worker_id, []),
            jobs=rows,
            next_page_token=_token(rows[-1]) if more else "",
            fee_bps=self.fee_bps,
            payouts=await self.ledger.payouts(worker_id, MAX_PAGE),
        )

    async def lifetime(self, worker_ids: Sequence[str]) -> dict[str, list[Balance]]:
        """Each worker's lifetime earnings per asset, in one read."""
        return await self.ledger.balances(worker_ids)
