"""`dispatch worker earnings --profile P`: a worker's payout addresses read on chain, next to
the payouts the coordinator says it sent there, so the worker checks what it was paid
without trusting the coordinator.

One row per network, asset and payout address among the worker's payouts: how many landed
and their total, what is still in flight (pending or signed: it may land), and the
address's balance of the asset read on chain. The balance is the address's own: money it
received elsewhere or spent shows too, so a balance below the landed total (with nothing
spent) is what to look into. No chain library here: balances are read through
`read_balance`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dispatchnet.coordinator.models import PayoutRowState

IN_FLIGHT = (PayoutRowState.PENDING.value, PayoutRowState.SIGNED.value)


@dataclass(frozen=True)
class PaidTo:
    """One payout as GetEarnings lists it (its state: a PayoutRowState value)."""

    network: str
    asset: str
    to: str
    amount: int
    state: str


def addresses_on_chain(
    payouts: Iterable[PaidTo], read_balance: Callable[[str, str, str], int | None]
) -> list[dict[str, Any]]:
    """The rows described above, in first-seen order (GetEarnings lists payouts newest
    first). read_balance(network, asset, address): the balance in atomic units, None when
    it cannot read that network (no chain of the profile is on it); it may block and raise.
    Amounts are decimal text, as in GetEarnings. Payouts without an address are left out."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for p in payouts:
        if not p.to:
            continue
        row = rows.setdefault(
            (p.network, p.asset, p.to),
            {"landed_payouts": 0, "landed_total": 0, "in_flight_total": 0},
        )
        if p.state == PayoutRowState.LANDED.value:
            row["landed_payouts"] += 1
            row["landed_total"] += p.amount
        elif p.state in IN_FLIGHT:
            row["in_flight_total"] += p.amount
    out = []
    for (network, asset, to), row in rows.items():
        balance = read_balance(network, asset, to)
        out.append(
            {
                "network": network,
                "asset": asset,
                "address": to,
                "landed_payouts": row["landed_payouts"],
                "landed_total": str(row["landed_total"]),
                "in_flight_total": str(row["in_flight_total"]),
                "balance": None if balance is None else str(balance),
            }
        )
    return out
