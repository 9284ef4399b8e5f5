"""The Solana kind's [chain] settings: what they may hold, checked without a Solana library.

A Solana network is "solana:<first 32 characters of the genesis hash>" (CAIP-2). The RPC
URL, the payment mint and the coordinator's keypair come either from a deployment file
(`deployment`, written by `dispatch chain up`) or from `rpc_url` and `mint`, never both.
"""

from __future__ import annotations

import re

from dispatchnet.profiles import ChainConfig

SOLANA_NETWORK = re.compile(r"solana:[1-9A-HJ-NP-Za-km-z]{32}")
BASE58_KEY = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}")  # a base58 public key
# What a Solana chain provides to a profile (registry.capabilities); "payments" is the
# x402 SVM rail (chains/solana/rail.py).
CAPABILITIES = frozenset({"anchor", "payments"})
# The chain track a client names to pick coordinators of this kind (registry.track).
TRACK = "solana"
# Identity, reputation and feedback come from an [identity_chain] (an EVM chain holding the
# ERC-8004 registries) when the profile names one (registry.identity_chain_problems).
LINKS_IDENTITY_CHAIN = True
DEVCHAINS = ("litesvm",)
# The [chain] keys this kind reads; any other key set away from its default is refused.
KEYS = frozenset(
    {
        "kind",
        "network",
        "rpc_url",
        "deployment",
        "mint",
        "key_file",
        "anchor_lookback",
        "rpc_timeout_seconds",
        "tx_timeout_seconds",
        "devchain",
        "devchain_port",
    }
)
MAX_ANCHOR_LOOKBACK = 10_000


def network_problem(network: str, section: str) -> str | None:
    """Why `network` is not a Solana network id, or None."""
    if SOLANA_NETWORK.fullmatch(network):
        return None
    return f"{section} network must be solana:<32-character genesis hash prefix>, not {network!r}"


def asset_problem(asset: str) -> str | None:
    """Why `asset` cannot be a payment asset on this kind (an SPL mint), or None."""
    return None if BASE58_KEY.fullmatch(asset) else f"asset {asset!r} is not a mint address"


def problems(c: ChainConfig) -> list[str]:
    out: list[str] = []
    if (p := network_problem(c.network, "[chain]")) is not None:
        out.append(p)
    if bool(c.deployment) == bool(c.rpc_url):
        out.append("[chain] needs exactly one of deployment and rpc_url")
    if c.deployment and c.mint:
        out.append("[chain] mint comes from the deployment; do not set both")
    elif c.mint and not BASE58_KEY.fullmatch(c.mint):
        out.append("[chain] mint is not a Solana address (base58)")
    if not 1 <= c.anchor_lookback <= MAX_ANCHOR_LOOKBACK:
        out.append(f"[chain] anchor_lookback must be 1 to {MAX_ANCHOR_LOOKBACK}")
    if c.rpc_timeout_seconds <= 0 or c.tx_timeout_seconds <= 0:
        out.append("[chain] timeouts must be positive")
    if c.devchain not in ("", *DEVCHAINS):
        out.append(
            f"[chain] devchain must be {' or '.join(DEVCHAINS)} or empty, not {c.devchain!r}"
        )
    elif c.devchain and not c.deployment:
        out.append("[chain] devchain needs a deployment name")
    return out
