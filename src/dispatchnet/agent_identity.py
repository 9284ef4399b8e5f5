"""Worker identity on chain, the domain side: the exact bytes a worker's chain account signs
to prove it controls an ERC-8004 agent, and the protocol the coordinator checks it through.
No web3 here: chains/identity.py implements IdentityVerifier for EVM chains.

The proof (ChallengeResponse.chain_signature) is an EIP-191 personal_sign signature over

    b"dispatch.v1.WorkerAgent\\n" || nonce || coordinator_public_key || worker_ed25519_key
        || agent_id as decimal ASCII

by the agent's owner or its agent wallet. The coordinator accepts it when the recovered
address is one of those AND the agent's "dispatch.ed25519" metadata equals the ed25519 key
that signed the ordinary challenge, so an agent id is bound to exactly one worker key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

AGENT_CONTEXT = b"dispatch.v1.WorkerAgent\n"
ED25519_METADATA_KEY = "dispatch.ed25519"
SOLANA_METADATA_KEY = "dispatch.solana"
AGENT_ID_FILE = "agent_id"  # next to the worker key: <key>.agent_id


def agent_proof_message(
    nonce: bytes, coordinator_public_key: bytes, worker_public_key: bytes, agent_id: str
) -> bytes:
    return AGENT_CONTEXT + nonce + coordinator_public_key + worker_public_key + agent_id.encode()


def parse_agent_id(agent_id: str) -> int:
    """A decimal agent id (ValueError otherwise)."""
    if not agent_id.isdecimal() or not agent_id.isascii() or len(agent_id) > 78:
        raise ValueError(f"agent id {agent_id[:80]!r} is not a decimal number")
    if agent_id != str(int(agent_id)):
        raise ValueError(f"agent id {agent_id!r} has leading zeros")
    return int(agent_id)


@dataclass(frozen=True)
class VerifiedAgent:
    agent_id: str
    address: str  # the chain address that signed (owner or agent wallet)


class IdentityVerifier(Protocol):
    """Checks a worker's claim to an on-chain agent. Raises Unauthenticated (not the
    agent's owner/wallet, or the agent is bound to another key), FailedPrecondition (the
    registration lacks or has a malformed dispatch.ed25519), or Unavailable (chain down)."""

    async def verify(
        self,
        agent_id: str,
        worker_public_key: bytes,
        nonce: bytes,
        coordinator_public_key: bytes,
        chain_signature: bytes,
    ) -> VerifiedAgent: ...


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58(data: bytes) -> str:
    """Bitcoin-alphabet base58: an ed25519 public key in base58 is its Solana address."""
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out
