"""What a ComputeRouter call returns: ComputeResult, its Price and the worker that ran it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import betterproto

from dispatchnet.sdk import types
from dispatchnet.sdk.errors import Skip

Route = Literal["dispatch", "openai", "anthropic"]
"""Where a job ran: on the Dispatch network, or at a hosted provider (by its API)."""

MICROS_PER_USD = 1_000_000


@dataclass(frozen=True)
class Price:
    """What a job cost, in micro-units (1 USD = 1,000,000).

    Dispatch route: the quoted price, which is what the payment charged (nothing moves when
    the coordinator has payments off: see ComputeResult.payment). Hosted route: estimated
    from the provider's reported token usage and the router's price table (estimated=True);
    the provider bills your own key."""

    amount_micros: int
    currency: str = "USD"
    estimated: bool = False

    @property
    def usd(self) -> float:
        return self.amount_micros / MICROS_PER_USD


@dataclass(frozen=True)
class WorkerRef:
    """The worker that ran a job: its proven ed25519 key (hex) and its ERC-8004 agent id
    ("" when it has none), both as the signed receipt states them."""

    worker_id: str
    agent_id: str = ""


@dataclass
class ComputeResult:
    """The outcome of one job, whichever route ran it.

    output is the result as text (an LLM reply, a task's JSON; bytes that are not UTF-8
    are decoded with replacement characters: use output_bytes). On the dispatch route the
    receipt has been verified (both signatures, and that it is this job's receipt for
    exactly these output bytes) and, when asked, its Merkle proof; receipt, payment,
    worker and job are None on hosted routes."""

    output: str
    route: Route
    price: Price
    latency_ms: float
    receipt: types.Receipt | None = None
    payment: types.PaymentReference | None = None
    worker: WorkerRef | None = None
    output_bytes: bytes = b""
    content_type: str = ""
    job_id: str = ""
    network: str = ""
    """The network's name (e.g. "monad", "solana") on the dispatch route."""
    coordinator: str = ""
    """The address of the coordinator that ran the job."""
    model: str = ""
    """The model that answered: the hosted provider's, or the LLM job's ("" = the worker's
    default)."""
    usage: types.TokenUsage | None = None
    receipt_body: types.ReceiptBody | None = None
    """The receipt's signed body, decoded (job, input and output hashes, keys, price,
    payment authorization, times)."""
    proof: types.GetReceiptProofResponse | None = None
    """The receipt's verified Merkle inclusion proof (and anchor), when asked for."""
    job: types.Job | None = None
    skipped: list[Skip] = field(default_factory=list)
    """Why networks tried before this route did not serve the job (hosted fallback)."""

    def json(self) -> Any:
        """The output parsed as JSON (task results). ValueError when it is not JSON."""
        return json.loads(self.output_bytes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (bytes as base64, as protobuf JSON has them)."""

        def msg(m: betterproto.Message | None) -> dict[str, Any] | None:
            snake = cast(betterproto.Casing, betterproto.Casing.SNAKE)
            return None if m is None else m.to_dict(casing=snake)

        return {
            "output": self.output,
            "route": self.route,
            "price": {
                "amount_micros": self.price.amount_micros,
                "currency": self.price.currency,
                "estimated": self.price.estimated,
            },
            "latency_ms": round(self.latency_ms, 3),
            "content_type": self.content_type,
            "job_id": self.job_id,
            "network": self.network,
            "coordinator": self.coordinator,
            "model": self.model,
            "worker": None if self.worker is None else self.worker.__dict__.copy(),
            "usage": msg(self.usage),
            "receipt": msg(self.receipt),
            "receipt_body": msg(self.receipt_body),
            "payment": msg(self.payment),
            "proof": msg(self.proof),
            "skipped": [s.to_dict() for s in self.skipped],
        }
