"""`dispatch payouts audit`: the store's money movements compared with the chain's.

For one network (the profile's [chain]), every transaction the store says moved the
payment asset through the coordinator's account (settlements in, refunds and landed
payouts out) is read back on chain, and the account's gain in it compared with what the
store expects (a batched EVM settlement or payout run is one transaction for several
rows: their sum). Any difference, or a transaction the chain does not have, is reported.
Totals per asset: settled in, refunded, paid out, fees kept (credits' fees not reversed),
and the account's expected change (in - refunds - payouts), as the store and as the chain
say. No chain library here: the chain is read through `read_flow`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AssetTotals:
    settled_in: int = 0
    refunded: int = 0
    paid_out: int = 0
    fees_kept: int = 0
    expected_change: int = 0  # the store's: settled_in - refunded - paid_out
    chain_change: int = 0  # the same transactions' gains, read on chain


@dataclass
class AuditReport:
    network: str
    assets: dict[str, AssetTotals] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "clean": self.clean,
            "assets": {a: vars(t) for a, t in sorted(self.assets.items())},
            "differences": self.differences,
        }


def audit(
    network: str,
    flows: list[tuple[str, str, str, int]],
    fees: dict[str, int],
    read_flow: Callable[[str, str], int | None],
) -> AuditReport:
    """flows: (what, asset, transaction, amount into the account) from the store;
    read_flow(asset, transaction): the account's gain in it on chain, None if missing."""
    report = AuditReport(network)
    expected: dict[tuple[str, str], int] = {}
    kinds: dict[tuple[str, str], set[str]] = {}
    for what, asset, tx, amount in flows:
        t = report.assets.setdefault(asset, AssetTotals())
        if what == "settlement":
            t.settled_in += amount
        elif what == "refund":
            t.refunded -= amount
        else:
            t.paid_out -= amount
        expected[(asset, tx)] = expected.get((asset, tx), 0) + amount
        kinds.setdefault((asset, tx), set()).add(what)
    for (asset, tx), want in sorted(expected.items()):
        got = read_flow(asset, tx)
        t = report.assets[asset]
        t.expected_change += want
        t.chain_change += got or 0
        if got != want:
            report.differences.append(
                {
                    "asset": asset,
                    "transaction": tx,
                    "kinds": sorted(kinds[(asset, tx)]),
                    "store": want,
                    "chain": got,  # None: not on chain
                }
            )
    for asset, fee in fees.items():
        report.assets.setdefault(asset, AssetTotals()).fees_kept = fee
    return report
