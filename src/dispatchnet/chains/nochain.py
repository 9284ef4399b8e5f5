"""The chain kind "none": a coordinator with no chain. No anchoring (receipts stay local),
no on-chain identity or reputation, no payments; `dispatch chain` has nothing to start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchnet.chains.deployments import ChainConfigError

if TYPE_CHECKING:
    from dispatchnet.agent_identity import IdentityVerifier
    from dispatchnet.payments.payouts import PayoutSender
    from dispatchnet.profiles import AcceptConfig, ChainConfig, Profile
    from dispatchnet.receipts.anchoring import Anchorer
    from dispatchnet.reputation.erc8004 import FeedbackReader
    from dispatchnet.reputation.feedback import FeedbackPoster

CAPABILITIES: frozenset[str] = frozenset()
# The chain track a client names to pick coordinators of this kind (registry.track).
TRACK = "local"
# The [chain] keys this kind reads (devchain only to refuse it with a clearer message).
KEYS = frozenset({"kind", "devchain"})


def asset_problem(asset: str) -> str | None:
    return "no chain to pay on"


def problems(c: ChainConfig) -> list[str]:
    if c.devchain:
        return ["[chain] devchain needs a chain kind that has a local chain"]
    return []


class NoChain:
    kind = "none"

    def _none(self, what: str) -> ChainConfigError:
        return ChainConfigError(f"{what} needs a [chain]; this profile has none (kind = none)")

    def anchorer(self, cfg: ChainConfig, data_dir: Path | None) -> Anchorer:
        from dispatchnet.receipts.anchoring import NoAnchor

        return NoAnchor("[chain] kind is none: no chain to anchor on")

    def identity_verifier(self, profile: Profile) -> IdentityVerifier | None:
        return None

    def summary_reader(
        self, profile: Profile, data_dir: Path, trusted: list[str], tag1: str
    ) -> FeedbackReader:
        raise self._none("on-chain reputation")

    def feedback_poster(
        self, profile: Profile, data_dir: Path
    ) -> tuple[FeedbackPoster, tuple[type[BaseException], ...]] | None:
        return None

    def payment_rail(self, accept: AcceptConfig, profile: Profile, data_dir: Path) -> Any:
        raise self._none("x402 payments")

    def payouts(self, profile: Profile, data_dir: Path) -> PayoutSender:
        raise self._none("paying workers")

    def payout_addresses(self, profile: Profile, data_dir: Path) -> Callable[[str], str | None]:
        return lambda agent_id: None

    def client_wallet(self, profile: Profile, key_file: str) -> Any:
        return None

    def new_wallet_key(self, path: Path) -> str:
        raise self._none("a wallet")

    def wallet_balances(self, profile: Profile, wallet: Any) -> dict[str, Any]:
        raise self._none("a wallet")

    def check_anchor(
        self, profile: Profile, root: bytes, network: str, transaction: str, expected_anchorer: str
    ) -> dict[str, Any]:
        raise self._none("--onchain")

    def token_balance(self, profile: Profile, asset: str, account: str) -> int:
        raise self._none("a balance")

    def token_flow(
        self, profile: Profile, data_dir: Path, asset: str, transaction: str
    ) -> int | None:
        raise self._none("audits")

    def chain_up(self, profile: Profile, port: int | None) -> dict[str, Any]:
        raise self._none("`dispatch chain up`")

    def chain_down(self, profile: Profile) -> dict[str, Any]:
        raise self._none("`dispatch chain down`")

    def chain_status(self, profile: Profile) -> dict[str, Any]:
        return {"profile": profile.name, "kind": "none", "ok": False, "note": "no chain"}


ADAPTER = NoChain()
