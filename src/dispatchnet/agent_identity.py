"""Worker identity on chain, the domain side: the exact bytes a worker's chain account signs
to prove it controls an ERC-8004 agent, and the protocol the coordinator checks it through.
No web3 here: chains/evm/identity.py implements IdentityVerifier for EVM chains.

The proof (ChallengeResponse.chain_signature) is an EIP-191 personal_sign signature over

    b"dispatch.v1.WorkerAgent\\n" || nonce || coordinator_public_key || worker_ed25519_key
        || agent_id as decimal ASCII

by the agent's owner or its agent wallet. The coordinator accepts it when the recovered
address is one of those AND the agent's "dispatch.ed25519" metadata equals the ed25519 key
that signed the ordinary challenge, so an agent id is bound to exactly one worker key.

On a chain kind whose identities live on another chain (Solana with an [identity_chain]),
the worker also proves its Solana key (ChallengeResponse.solana_signature): a plain
ed25519 signature, as a Solana wallet's signMessage makes, over

    b"dispatch.v1.WorkerSolana\n" || nonce || coordinator_public_key || worker_ed25519_key
        || agent_id as decimal ASCII

by the key the agent's "dispatch.solana" metadata names (base58), which its registration
file must list too (`dispatch.solana`): the link counts only when both sides agree.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from dispatchnet.errors import quoted

AGENT_CONTEXT = b"dispatch.v1.WorkerAgent\n"
ED25519_METADATA_KEY = "dispatch.ed25519"
SOLANA_METADATA_KEY = "dispatch.solana"
SOLANA_LINK_CONTEXT = b"dispatch.v1.WorkerSolana\n"
AGENT_ID_FILE = "agent_id"  # next to the worker key: <key>.agent_id
REGISTRATION_TYPE = "https://eips.ethereum.org/EIPS/eip-8004#registration-v1"
# agent URIs accepted without being read: fetching them would make Connect depend on the
# network (and on a third-party server); only data: URIs are checked
UNCHECKED_SCHEMES = ("http://", "https://", "ipfs://")


def agent_proof_message(
    nonce: bytes, coordinator_public_key: bytes, worker_public_key: bytes, agent_id: str
) -> bytes:
    return AGENT_CONTEXT + nonce + coordinator_public_key + worker_public_key + agent_id.encode()


def solana_link_message(
    nonce: bytes, coordinator_public_key: bytes, worker_public_key: bytes, agent_id: str
) -> bytes:
    """What the worker's Solana key signs (ChallengeResponse.solana_signature)."""
    return (
        SOLANA_LINK_CONTEXT + nonce + coordinator_public_key + worker_public_key + agent_id.encode()
    )


def parse_agent_id(agent_id: str) -> int:
    """A decimal agent id (ValueError otherwise)."""
    if not agent_id.isdecimal() or not agent_id.isascii() or len(agent_id) > 78:
        raise ValueError(f"agent id {quoted(agent_id)} is not a decimal number")
    if agent_id != str(int(agent_id)):
        raise ValueError(f"agent id {agent_id!r} has leading zeros")
    return int(agent_id)


class RegistrationFileError(ValueError):
    """The agent's registration file (its agentURI) is unusable; the message names why."""


def check_registration_uri(uri: str, agent_id: int, agent_registry: str) -> dict[str, Any] | None:
    """Parses and checks an agent's ERC-8004 registration file, given as its agentURI.

    A data: URI (application/json, base64 or percent-encoded) is decoded and must hold a
    JSON object with the registration-v1 `type` and a `services` list; when it has
    `registrations`, one of them must be {agentId: agent_id, agentRegistry: agent_registry}
    ("eip155:<chain id>:<registry address>", compared case-insensitively). Returns the
    document. An http(s):// or ipfs:// URI is not fetched: returns None (not checked).
    Anything else raises RegistrationFileError.
    """
    if not uri:
        raise RegistrationFileError("the agent URI is empty (no registration file)")
    if uri.lower().startswith(UNCHECKED_SCHEMES):
        return None
    if not uri[:5].lower() == "data:":
        raise RegistrationFileError(
            f"agent URI {quoted(uri)} is neither a data: URI nor http(s):// or ipfs://"
        )
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise RegistrationFileError("the data: URI has no ',' before its data")
    params = [p.strip().lower() for p in header.split(";")]
    is_base64 = params[-1] == "base64"
    if is_base64:
        params.pop()
    if params[0] != "application/json":
        raise RegistrationFileError(
            f"the data: URI's media type is {params[0] or 'text/plain'!r}, not application/json"
        )
    raw = unquote_to_bytes(payload)
    if is_base64:
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise RegistrationFileError("the data: URI's base64 does not decode") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistrationFileError(f"the registration file is not valid JSON: {e}") from None
    except RecursionError:
        raise RegistrationFileError("the registration file is nested too deeply") from None
    if not isinstance(doc, dict):
        raise RegistrationFileError("the registration file is not a JSON object")
    if "type" not in doc:
        raise RegistrationFileError(f'the registration file has no "type" ({REGISTRATION_TYPE})')
    if doc["type"] != REGISTRATION_TYPE:
        raise RegistrationFileError(
            f"the registration file's type is {quoted(doc['type'])}, not {REGISTRATION_TYPE!r}"
        )
    services = doc.get("services")
    if not isinstance(services, list):
        raise RegistrationFileError('the registration file has no "services" list')
    for i, service in enumerate(services):
        if not isinstance(service, dict) or not isinstance(service.get("name"), str):
            raise RegistrationFileError(f"services[{i}] is not an object with a string name")
    registrations = doc.get("registrations")
    if registrations is None or registrations == []:
        return doc
    if not isinstance(registrations, list):
        raise RegistrationFileError('the registration file\'s "registrations" is not a list')
    named = []
    for entry in registrations:
        if not isinstance(entry, dict):
            raise RegistrationFileError("a registrations entry is not an object")
        number, registry = entry.get("agentId"), entry.get("agentRegistry")
        if isinstance(number, str) and number.isdecimal() and number.isascii() and len(number) < 80:
            number = int(number)
        if (
            isinstance(number, int)
            and not isinstance(number, bool)
            and number == agent_id
            and isinstance(registry, str)
            and registry.lower() == agent_registry.lower()
        ):
            return doc
        named.append(f"agent {str(number)[:80]} in {str(registry)[:120]}")
    if len(named) > 3:
        named[3:] = [f"{len(named) - 3} more"]
    raise RegistrationFileError(
        f"the registration file's registrations name {', '.join(named)}, "
        f"not agent {agent_id} in {agent_registry}"
    )


@dataclass(frozen=True)
class VerifiedAgent:
    agent_id: str
    address: str  # the chain address that signed (owner or agent wallet)
    owner: str = ""  # the agent's owner (ownerOf): one owner's agents are not independent


class IdentityVerifier(Protocol):
    """Checks a worker's claim to an on-chain agent. Raises Unauthenticated (not the
    agent's owner/wallet, or the agent is bound to another key), FailedPrecondition (the
    registration lacks or has a malformed dispatch.ed25519, or its registration file is
    unusable: check_registration_uri), or Unavailable (chain down). solana_signature is
    checked only by verifiers that link a Solana key (see the module docstring)."""

    async def verify(
        self,
        agent_id: str,
        worker_public_key: bytes,
        nonce: bytes,
        coordinator_public_key: bytes,
        chain_signature: bytes,
        solana_signature: bytes = b"",
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


def base58_decode(text: str) -> bytes:
    """The bytes of a Bitcoin-alphabet base58 string (ValueError when it is not one)."""
    if len(text) > 128:
        raise ValueError("base58 text too long")
    n = 0
    for ch in text:
        i = _B58.find(ch)
        if i < 0:
            raise ValueError(f"{ch!r} is not a base58 character")
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body
