"""Where the decentralized route runs: a Network is one chain track's coordinators and the
wallet that pays them. The router's chain preference ("monad", "solana", "any") picks
networks by name.

    monad = Network.from_profile("local-monad", ["127.0.0.1:50051"])   # its [wallet]
    solana = Network.from_profile("local-solana", ["127.0.0.1:50052"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dispatchnet.client import Payer
from dispatchnet.profiles import Profile, ProfileError, load_profile
from dispatchnet.sdk.errors import InvalidRequest

ANY = "any"
"""The chain preference that tries every network, in the order given."""


@dataclass(frozen=True)
class Network:
    """One chain track: its name, its coordinators (host:port; several coordinators of
    one deployment share its state: calls go to one and fail over to the next when it is
    unavailable, see client.CoordinatorClient), and the x402 wallet that pays CommitJob
    there (payments/wallet.py Wallet on EVM, SvmWallet on Solana; None: jobs the
    coordinator wants paid fail with PaymentRequired).

    coordinator_key, coordinator_keys: when set (32 bytes each), every receipt must be
    countersigned by one of these coordinator keys (a cluster's coordinators each have
    their own; CoordinatorClient.coordinator_keys learns them from the addresses), not
    just by whichever key the answering coordinator holds.
    InvalidRequest (a ValueError) for a name, address list or key that cannot work."""

    name: str
    coordinators: Sequence[str]
    wallet: Payer | None = field(default=None, repr=False)
    coordinator_key: bytes = b""
    coordinator_keys: Sequence[bytes] = ()

    @property
    def pinned_keys(self) -> frozenset[bytes]:
        """The coordinator keys a receipt must be countersigned by (empty: any)."""
        return frozenset(k for k in (self.coordinator_key, *self.coordinator_keys) if k)

    def __post_init__(self) -> None:
        if not self.name or self.name == ANY:
            raise InvalidRequest(f"a network needs a name other than {ANY!r}")
        if not self.coordinators or not all(isinstance(a, str) and a for a in self.coordinators):
            raise InvalidRequest(f"network {self.name!r} needs at least one coordinator address")
        if any(len(k) != 32 for k in self.pinned_keys):
            raise InvalidRequest("coordinator keys must be 32-byte ed25519 public keys")

    @classmethod
    def from_profile(
        cls,
        profile: str | Profile,
        coordinators: Sequence[str] = (),
        *,
        name: str = "",
        wallet_key_file: str = "",
        coordinator_key: bytes = b"",
    ) -> Network:
        """The network of a deployment profile (a name in profiles/ or a .toml path).

        name: default the profile's chain track ("monad" for EVM profiles, "solana",
        "local" for a profile with no chain). coordinators: default $DISPATCH_COORDINATOR
        (comma-separated), else the profile's [cluster] coordinators, else its [server]
        listen. The wallet: wallet_key_file, else the profile's [wallet] (key_file, else
        the local chain deployment's funded
        "client" account), capped at its max_per_job_micros; None when it names none.
        InvalidRequest for a profile or key that does not load."""
        from dispatchnet.chains import registry
        from dispatchnet.chains.deployments import ChainConfigError

        try:
            p = load_profile(profile) if isinstance(profile, str) else profile
            wallet = registry.adapter_of(p).client_wallet(p, wallet_key_file)
        except (ProfileError, ChainConfigError, ValueError, OSError) as e:
            named = profile if isinstance(profile, str) else profile.name
            raise InvalidRequest(f"profile {named!r}: {e}") from e
        addresses = list(coordinators)
        if not addresses:
            env = os.environ.get("DISPATCH_COORDINATOR", "")
            addresses = [a.strip() for a in env.split(",") if a.strip()]
            addresses = addresses or list(p.cluster.coordinators) or [p.server.listen]
        return cls(
            name or registry.track(p.chain.kind),
            addresses,
            wallet,
            coordinator_key,
        )
