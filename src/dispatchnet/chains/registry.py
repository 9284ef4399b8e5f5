"""The chain registry: the one place that maps a profile's `[chain] kind` to its adapter.

Every chain-specific role the coordinator, the CLI and the demo need is a method of the
kind's ChainAdapter; callers ask the registry for the adapter of their profile and never
compare a chain kind or a network name themselves (tests/test_units.py walks the code and
fails on such a comparison outside chains/).

Adapters are imported lazily: a profile with no chain never imports web3, and the light
settings check (`problems`) never imports a chain library at all.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dispatchnet.agent_identity import IdentityVerifier
    from dispatchnet.payments.payouts import PayoutSender
    from dispatchnet.profiles import AcceptConfig, ChainConfig, Profile
    from dispatchnet.receipts.anchoring import Anchorer
    from dispatchnet.reputation.erc8004 import FeedbackReader
    from dispatchnet.reputation.feedback import FeedbackPoster


class ChainAdapter(Protocol):
    """What a chain kind provides. Methods that talk to a node may block: they build
    objects whose own methods say how they must be called."""

    kind: str

    def anchorer(self, cfg: ChainConfig, data_dir: Path | None) -> Anchorer:
        """Anchors receipt batch roots on this chain ([receipts] anchor = "chain")."""
        ...

    def identity_verifier(self, profile: Profile) -> IdentityVerifier | None:
        """Checks workers' agent id claims at Connect; None: agent ids are ignored."""
        ...

    def summary_reader(
        self, profile: Profile, data_dir: Path, trusted: list[str], tag1: str
    ) -> FeedbackReader:
        """Reads the feedback the trusted reviewers gave worker agents (and getSummary)."""
        ...

    def feedback_poster(
        self, profile: Profile, data_dir: Path
    ) -> tuple[FeedbackPoster, tuple[type[BaseException], ...]] | None:
        """Posts feedback on workers, with the errors that mean a final refusal; None when
        the chain has no reputation registry."""
        ...

    def payment_rail(self, accept: AcceptConfig, profile: Profile, data_dir: Path) -> Any:
        """One accepted x402 network of CommitJob (payments/x402.py's PaymentRail)."""
        ...

    def payouts(self, profile: Profile, data_dir: Path) -> PayoutSender:
        """Pays workers from the coordinator's [chain] account (payments/payouts.py)."""
        ...

    def payout_addresses(self, profile: Profile, data_dir: Path) -> Callable[[str], str | None]:
        """agent id -> where that registered worker is paid on [chain] (None: nowhere yet):
        on EVM its ERC-8004 getAgentWallet, else its owner; on Solana the Solana address its
        registration links. The callable blocks and raises Unavailable on node trouble; a
        chain without identities gives a callable that always answers None."""
        ...

    def client_wallet(self, profile: Profile, key_file: str) -> Any:
        """The wallet `dispatch job submit` pays with (payments/wallet.py), None if none."""
        ...

    def new_wallet_key(self, path: Path) -> str:
        """Creates a wallet key file (mode 0600) for this kind; the wallet's address."""
        ...

    def wallet_balances(self, profile: Profile, wallet: Any) -> dict[str, Any]:
        """`dispatch wallet balance`: the wallet's balances of the assets it pays in."""
        ...

    def check_anchor(self, profile: Profile, root: bytes, network: str, transaction: str,
                     expected_anchorer: str) -> dict[str, Any]:  # fmt: skip
        """`dispatch receipt verify --onchain`: the anchor of a proof's root, read back."""
        ...

    def token_balance(self, profile: Profile, asset: str, account: str) -> int:
        """An account's balance of a payment asset, in atomic units, read on chain.
        Blocking; Unavailable on node trouble, ValueError for an account that is not an
        address of this chain."""
        ...

    def token_flow(
        self, profile: Profile, data_dir: Path, asset: str, transaction: str
    ) -> int | None:
        """How much of `asset` the coordinator's [chain] account gained (negative: paid) in
        one transaction, read on chain (`dispatch payouts audit`); 0 for a failed one, None
        when the chain has no such transaction. Blocking; Unavailable on node trouble."""
        ...

    def chain_up(self, profile: Profile, port: int | None) -> dict[str, Any]:
        """Starts (or finds running) the profile's local chain; its deployment data."""
        ...

    def chain_down(self, profile: Profile) -> dict[str, Any]: ...

    def chain_status(self, profile: Profile) -> dict[str, Any]: ...


# kind -> (module with a light `problems(cfg)` check, CAPABILITIES and KEYS; module with ADAPTER)
_KINDS: dict[str, tuple[str, str]] = {
    "none": ("dispatchnet.chains.nochain", "dispatchnet.chains.nochain"),
    "evm": ("dispatchnet.chains.evm.config", "dispatchnet.chains.evm.adapter"),
    "solana": ("dispatchnet.chains.solana.config", "dispatchnet.chains.solana.adapter"),
}


def kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def adapter(kind: str) -> ChainAdapter:
    """The adapter of a chain kind. ValueError for a kind this build does not know."""
    if kind not in _KINDS:
        raise ValueError(
            f"[chain] kind {kind!r} is unknown (this build knows: {', '.join(_KINDS)})"
        )
    found: ChainAdapter = importlib.import_module(_KINDS[kind][1]).ADAPTER
    return found


def adapter_of(profile: Profile) -> ChainAdapter:
    return adapter(profile.chain.kind)


def capabilities(kind: str) -> frozenset[str]:
    """What a chain kind provides to a profile: "anchor", "identity", "reputation",
    "feedback", "payments" (no chain library imported); empty for an unknown kind."""
    if kind not in _KINDS:
        return frozenset()
    found: frozenset[str] = importlib.import_module(_KINDS[kind][0]).CAPABILITIES
    return found


def track(kind: str) -> str:
    """The chain track a client names to pick coordinators of this kind ("monad",
    "solana", "local"; the SDK's chain preference), without importing a chain library.
    ValueError for a kind this build does not know."""
    if kind not in _KINDS:
        known = ", ".join(_KINDS)
        raise ValueError(f"[chain] kind {kind!r} is unknown (this build knows: {known})")
    found: str = importlib.import_module(_KINDS[kind][0]).TRACK
    return found


def asset_problem(kind: str, asset: str) -> str | None:
    """Why `asset` cannot be a payment asset on a chain of this kind, or None (light)."""
    if kind not in _KINDS:
        return f"[chain] kind {kind!r} is unknown"
    check: Callable[[str], str | None] = importlib.import_module(_KINDS[kind][0]).asset_problem
    return check(asset)


def problems(cfg: ChainConfig) -> list[str]:
    """What is wrong with a [chain] section for its kind (no chain library imported): first
    the keys of other kinds (set away from their defaults), named, then the kind's checks."""
    if cfg.kind not in _KINDS:
        return [f"[chain] kind must be one of {', '.join(_KINDS)}, not {cfg.kind!r}"]
    module = importlib.import_module(_KINDS[cfg.kind][0])
    own: frozenset[str] = module.KEYS
    defaults = type(cfg)()
    out = [
        f"[chain] {f.name} is not a setting of kind {cfg.kind}"
        for f in dataclasses.fields(cfg)
        if f.name not in own and getattr(cfg, f.name) != getattr(defaults, f.name)
    ]
    check: Callable[[ChainConfig], list[str]] = module.problems
    return out + check(cfg)


# What an [identity_chain] lends to a profile whose [chain] kind lacks it.
_LENT = frozenset({"identity", "reputation", "feedback"})


def identity_chain_problems(chain: ChainConfig, identity_chain: ChainConfig) -> list[str]:
    """What is wrong with an [identity_chain] section (none when its kind is "none"): only a
    [chain] kind that links one (LINKS_IDENTITY_CHAIN) takes it, and it must be a chain that
    provides identity, reputation and feedback, checked like a [chain] of its kind."""
    if identity_chain.kind == "none":  # only settings left over without a kind
        return [p.replace("[chain]", "[identity_chain]") for p in problems(identity_chain)]
    if chain.kind not in _KINDS or not getattr(
        importlib.import_module(_KINDS[chain.kind][0]), "LINKS_IDENTITY_CHAIN", False
    ):
        return [f"[identity_chain] is not read by [chain] kind {chain.kind!r}"]
    if not _LENT <= capabilities(identity_chain.kind):
        return [
            f"[identity_chain] kind must provide {', '.join(sorted(_LENT))}, "
            f"not {identity_chain.kind!r}"
        ]
    out = [p.replace("[chain]", "[identity_chain]") for p in problems(identity_chain)]
    if not 0 <= identity_chain.devchain_port <= 65535:
        out.append("[identity_chain] devchain_port must be a port number")
    return out


def profile_capabilities(chain: ChainConfig, identity_chain: ChainConfig) -> frozenset[str]:
    """What a profile's chains provide: [chain]'s kind, plus identity, reputation and
    feedback from its [identity_chain] when it has one (light)."""
    own = capabilities(chain.kind)
    if identity_chain.kind == "none" or identity_chain_problems(chain, identity_chain):
        return own
    return own | (capabilities(identity_chain.kind) & _LENT)


def payment_chain(profile: Profile, network: str) -> ChainConfig | None:
    """The chain an accepted payment network is on: [chain], or the [identity_chain] (a
    coordinator may take payments on both: the client picks), when it is on that network
    and its kind takes payments; None otherwise. Light: no chain library is imported."""
    for cfg in (profile.chain, profile.identity_chain):
        if cfg.kind != "none" and cfg.network == network and "payments" in capabilities(cfg.kind):
            return cfg
    return None


def payment_profile(profile: Profile, network: str) -> Profile | None:
    """The profile as the adapter of the chain an accepted payment network is on sees it
    ([chain] replaced by payment_chain's), None when no chain of the profile takes
    payments on that network (light)."""
    chain = payment_chain(profile, network)
    return None if chain is None else dataclasses.replace(profile, chain=chain)


def payment_profiles(profile: Profile) -> list[Profile]:
    """payment_profile of each [[payments.accept]] network (each is listed once), in their
    order: every chain the coordinator takes payments on, so pays workers on and audits
    (light). ValueError for an accepted network on no chain of the profile (load_profile
    refuses such a profile)."""
    out = []
    for accept in profile.payments.accept:
        on = payment_profile(profile, accept.network)
        if on is None:
            raise ValueError(f"[[payments.accept]] {accept.network}: no chain of the profile")
        out.append(on)
    return out


def identity_profile(profile: Profile) -> Profile | None:
    """The profile as its [identity_chain]'s adapter sees it ([chain] replaced by the
    identity chain), None when the profile has no [identity_chain]."""
    if profile.identity_chain.kind == "none":
        return None
    return dataclasses.replace(profile, chain=profile.identity_chain)
