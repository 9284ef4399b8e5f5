"""The EVM kind's [chain] settings: what they may hold, checked without web3.

An EVM network is "eip155:<chain id>"; contract addresses are 0x + 40 hex digits, either
all from a deployment file (`deployment`) or given one by one with `rpc_url`.
"""

from __future__ import annotations

import re

from dispatchnet.profiles import ChainConfig

EVM_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,18}")
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
ADDRESS_FIELDS = (
    "identity_registry",
    "reputation_registry",
    "validation_registry",
    "receipt_anchor",
    "usdc",
    "batch_settler",
)
# What an EVM chain provides to a profile (registry.capabilities).
CAPABILITIES = frozenset({"anchor", "identity", "reputation", "feedback", "payments"})
# The chain track a client names to pick coordinators of this kind (registry.track; the
# SDK's chain preference): Dispatch's EVM track is Monad's (local-monad, monad-testnet).
TRACK = "monad"
DEVCHAINS = ("anvil",)
# The [chain] keys this kind reads; any other key set away from its default is refused.
KEYS = frozenset(
    {
        "kind",
        "network",
        "rpc_url",
        "deployment",
        *ADDRESS_FIELDS,
        "key_file",
        "anchor_gas_limit",
        "rpc_timeout_seconds",
        "tx_timeout_seconds",
        "devchain",
        "devchain_port",
    }
)


def chain_id_of(network: str) -> int:
    """The chain id of an "eip155:<id>" network."""
    if not EVM_NETWORK.fullmatch(network):
        raise ValueError(f"{network!r} is not an EVM network (eip155:<chain id>)")
    return int(network.split(":", 1)[1])


def network_problem(network: str, section: str) -> str | None:
    """Why `network` is not an EVM network id, or None."""
    if EVM_NETWORK.fullmatch(network):
        return None
    return f"{section} network must be eip155:<chain id>, not {network!r}"


def asset_problem(asset: str) -> str | None:
    """Why `asset` cannot be a payment asset on this kind (a token address), or None."""
    return None if ADDRESS.fullmatch(asset) else f"asset {asset!r} is not an address"


def problems(c: ChainConfig) -> list[str]:
    out: list[str] = []
    if (p := network_problem(c.network, "[chain]")) is not None:
        out.append(p)
    if bool(c.deployment) == bool(c.rpc_url):
        out.append("[chain] needs exactly one of deployment and rpc_url")
    for name in ADDRESS_FIELDS:
        value = getattr(c, name)
        if c.deployment and value:
            out.append(f"[chain] {name} comes from the deployment; do not set both")
        elif value and not ADDRESS.fullmatch(value):
            out.append(f"[chain] {name} is not an address (0x + 40 hex digits)")
    if c.anchor_gas_limit < 21000:
        out.append("[chain] anchor_gas_limit must be at least 21000")
    if c.rpc_timeout_seconds <= 0 or c.tx_timeout_seconds <= 0:
        out.append("[chain] timeouts must be positive")
    if c.devchain not in ("", *DEVCHAINS):
        out.append(
            f"[chain] devchain must be {' or '.join(DEVCHAINS)} or empty, not {c.devchain!r}"
        )
    elif c.devchain and not c.deployment:
        out.append("[chain] devchain needs a deployment name")
    return out
