"""Paying workers on chain: the PayoutSender port each chain kind implements (chains/evm/
payouts.py, chains/solana/payouts.py), and the records it takes and gives. No chain library
here: the ledger and the payout loop depend on this module only.

Exactly once, across crashes and node outages, is split between the caller and the sender:
- the caller records a payout (its id, 32 random bytes) and stores what `sign` returns
  before it calls `send`; after a crash it asks `status` before sending again;
- the sender makes a second landing impossible on chain: on EVM the payout id is the
  EIP-3009 authorization nonce (the token refuses a used nonce), on Solana the stored signed
  transaction is sent again, never re-signed while it can still land (same signature: the
  chain processes it once) nor unless the chain proves it never landed, and carries a memo
  "dispatch:payout:<id>". When the chain cannot tell (its node no longer keeps that part
  of its history), status() says UNKNOWN and the caller holds the payout: neither sent nor
  signed anew, looked at again later.

Every method blocks (web3.py / solana-py): async callers run them in a worker thread. Node
trouble raises errors.Unavailable (retry later, nothing is lost).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Protocol

PAYOUT_ID = re.compile(r"0x[0-9a-f]{64}")
# The memo a Solana payout carries (and what an audit looks for on chain).
MEMO_PREFIX = "dispatch:payout:"


@dataclass(frozen=True)
class Payout:
    """One transfer to one worker in one payout run."""

    payout_id: str  # "0x" + 64 lowercase hex: 32 bytes, unique per payout
    to: str  # the worker's registered address on the chain
    amount: int  # atomic units of `asset`, > 0
    asset: str  # token contract (EVM) or mint (Solana)

    def __post_init__(self) -> None:
        if not PAYOUT_ID.fullmatch(self.payout_id):
            raise ValueError(f"payout id {self.payout_id!r} is not 0x + 64 lowercase hex")
        if self.amount <= 0:
            raise ValueError(f"payout {self.payout_id}: amount must be positive")


@dataclass(frozen=True)
class SignedPayout:
    """What to store (durably) before sending: the signed payout in `raw` is what is
    sent, again after a crash."""

    payout: Payout
    # EVM: the signed authorization (JSON); Solana: the signed transaction (base64) and
    # the slot it was signed at (JSON); opaque to the caller
    raw: str
    transaction: str  # the transaction it lands in when known at signing (Solana), else ""


class PayoutState(enum.Enum):
    LANDED = "landed"  # paid, in `transaction`
    FAILED = "failed"  # can never pay: the caller returns the amount to the balance
    NOT_FOUND = "not_found"  # not on chain and may still land: send it (again)
    STALE = "stale"  # proven never landed, and this signed payout never can: sign it anew
    # may have landed: the node no longer keeps the history that would tell. Hold it
    # (signing it anew could pay twice) and look again later
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PayoutStatus:
    state: PayoutState
    transaction: str = ""
    reason: str = ""


class PayoutSender(Protocol):
    """A chain kind's payouts from the coordinator's account (see the module docstring)."""

    def sign(self, payouts: list[Payout]) -> list[SignedPayout]:
        """One signed payout per payout, in order; nothing is sent. Unavailable on node
        trouble (signing reads the chain: time or a recent blockhash, the asset);
        ValueError for an address that is not one of this chain's."""
        ...

    def send(self, signed: list[SignedPayout]) -> dict[str, PayoutStatus]:
        """Sends the signed payouts (as few transactions as the chain allows) and waits
        for them; each one's status by payout id. Sending one that already landed pays
        nothing more. Unavailable on node trouble or a transaction not confirmed in time."""
        ...

    def status(self, signed: SignedPayout) -> PayoutStatus:
        """Where a signed payout stands on chain (read only). Unavailable on node trouble."""
        ...
