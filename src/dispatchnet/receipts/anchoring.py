"""Anchoring a receipt batch's Merkle root somewhere others can check it (a chain).

The batcher calls an Anchorer off the hot path and retries until it succeeds; the profile's
`[receipts] anchor` selects the implementation. `NoAnchor` (anchor = "none") anchors
nowhere: batches keep the status "none" and proofs carry no anchor. Chain implementations
live with the chain adapters (chains/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dispatchnet.profiles import ChainConfig


@dataclass(frozen=True)
class AnchorResult:
    """Where a root was anchored."""

    network: str  # CAIP-2 id of the chain, e.g. "eip155:10143"
    transaction: str  # the anchoring transaction's id on that chain


class Anchorer(Protocol):
    @property
    def enabled(self) -> bool:
        """False when this anchorer anchors nowhere: new batches then get the final status
        "none" and anchor() is never called."""
        ...

    async def anchor(self, root: bytes, leaf_count: int, batch_id: str) -> AnchorResult:
        """Puts a batch's 32-byte Merkle root on chain and returns the transaction once it is
        final. Raises dispatchnet.errors.Unavailable on chain trouble (node down, no funds,
        not confirmed in time): the batch stays "pending" and is retried later. Must not
        block the event loop. May be called again for a batch it already anchored (a crash
        between the chain call and the status write, two coordinators): it should then
        return the existing anchor, or anchor again harmlessly."""
        ...


class NoAnchor:
    """The anchorer of profiles with no chain (`anchor = "none"`), or of a chain profile
    that names no anchor contract (`reason` says why)."""

    enabled = False

    def __init__(self, reason: str = 'receipts.anchor = "none"') -> None:
        self.reason = reason

    def describe(self) -> str:
        return f"off ({self.reason})"

    async def anchor(self, root: bytes, leaf_count: int, batch_id: str) -> AnchorResult:
        return AnchorResult(network="", transaction="")


def anchorer_for(
    name: str, chain: ChainConfig | None = None, data_dir: Path | None = None
) -> Anchorer:
    """The anchorer a profile's `[receipts] anchor` names: "none", or the [chain] kind,
    whose adapter builds it from `[chain]` (data_dir: the coordinator's, where a new chain
    key goes if the profile names none). Raises ValueError for settings that cannot work."""
    if name == "none":
        return NoAnchor()
    if chain is None or name != chain.kind:
        raise ValueError(f'receipts.anchor must be "none" or the [chain] kind, not {name!r}')
    from dispatchnet.chains import registry

    return registry.adapter(chain.kind).anchorer(chain, data_dir)
