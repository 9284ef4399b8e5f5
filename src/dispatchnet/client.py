"""An async client for the coordinator's client-facing services, with key-based auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, cast

import grpc

from dispatch.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    receipt_pb2,
    receipt_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from dispatchnet.auth.tokens import METADATA_KEY, metadata_value
from dispatchnet.keys import KeyPair
from dispatchnet.observability import tracing
from dispatchnet.protocol import MAX_SEALED_ENVELOPES
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.sealing import PrivateResult, SealError, open_result, seal_spec

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

FINAL_STATES = (
    coordinator_pb2.JOB_STATE_COMPLETED,
    coordinator_pb2.JOB_STATE_FAILED,
    coordinator_pb2.JOB_STATE_CANCELLED,
)
TOKEN_TTL = 120
MAX_REQUIRED = 1000  # payment requirements of quotes not committed yet, kept at most
# x402 over gRPC (README "Payments")
PAYMENT_REQUIRED = "payment-required"
PAYMENT_SIGNATURE = "payment-signature"
PAYMENT_RESPONSE = "payment-response"


class PaymentDeclined(ValueError):
    """The wallet will not pay what the coordinator asks (over the limit, unknown asset,
    or a network it cannot pay on)."""


class Payer(Protocol):
    def pay(self, required_header: str) -> str:
        """A payment-signature value for a payment-required value (blocking);
        PaymentDeclined when it will not pay."""
        ...


def trailer(metadata: object, key: str) -> str:
    """The value of `key` in gRPC (trailing) metadata, "" when absent."""
    for k, v in cast(tuple[tuple[str, str], ...], metadata or ()):
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode()
    return ""


class CoordinatorClient:
    """One channel to a coordinator; every call signs a fresh short-lived token."""

    def __init__(
        self,
        address: str,
        key: KeyPair,
        wallet: Payer | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """wallet: pays CommitJob's x402 payment when the coordinator asks for one
        (payments/wallet.py Wallet); without one such a commit fails RESOURCE_EXHAUSTED.
        tracer_provider: traces each call (the coordinator continues the trace); default:
        the process's (OTEL_* variables, or the application's own OpenTelemetry SDK
        provider), none without one."""
        self.address = address
        self.key = key
        self.wallet = wallet
        # the `payment-response` trailer of the last paid CommitJob ("" for none)
        self.last_payment_response = ""
        provider = tracer_provider or tracing.process_provider()
        self.channel = grpc.aio.insecure_channel(
            address,
            interceptors=tracing.client_interceptors(provider) if provider is not None else None,
        )
        self.jobs = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)
        self.receipts = receipt_pb2_grpc.ReceiptServiceStub(self.channel)
        self.trust = trust_pb2_grpc.TrustServiceStub(self.channel)
        self._token: tuple[float, str] = (0.0, "")
        # quote_id -> the payment-required header GetQuote came with (paid at commit)
        self._required: dict[str, str] = {}

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = time.monotonic()
        if now - self._token[0] > TOKEN_TTL / 2:
            self._token = (now, metadata_value(self.key, TOKEN_TTL))
        return ((METADATA_KEY, self._token[1]),)

    async def quote(
        self, spec: common_pb2.JobSpec, rpc_timeout: float | None = None
    ) -> coordinator_pb2.Quote:
        """rpc_timeout: seconds until DEADLINE_EXCEEDED (None: no deadline), also bounding
        how long a first call waits for the connection."""
        # authenticated: the quote is stored under this key (larger specs need that)
        call = self.jobs.GetQuote(
            coordinator_pb2.GetQuoteRequest(spec=spec),
            metadata=self.metadata(),
            timeout=rpc_timeout,
        )
        resp = await call
        # a coordinator taking payments says with the quote what paying for it takes
        required = trailer(await call.trailing_metadata(), PAYMENT_REQUIRED)
        if required:  # kept for commit(), whoever pays then (this wallet or its payer=)
            self._required[resp.quote.quote_id] = required
            while len(self._required) > MAX_REQUIRED:
                del self._required[next(iter(self._required))]
        return resp.quote

    async def commit(
        self, quote_id: str, idempotency_key: str = "", payer: Payer | None = None
    ) -> coordinator_pb2.Job:
        """Commits the quote. When the coordinator answers with x402's `payment-required`
        trailer and this client has a wallet (or `payer`, which pays this commit instead),
        the same call is retried once with a `payment-signature` for it."""
        wallet = payer or self.wallet
        request = coordinator_pb2.CommitJobRequest(
            quote_id=quote_id, idempotency_key=idempotency_key or str(uuid.uuid4())
        )
        known = self._required.pop(quote_id, None)
        try:
            if known and wallet:  # paid at once, with what GetQuote said
                signature = await asyncio.to_thread(wallet.pay, known)
                return await self._commit(request, ((PAYMENT_SIGNATURE, signature),))
            return await self._commit(request, ())
        except grpc.aio.AioRpcError as e:
            required = trailer(e.trailing_metadata(), PAYMENT_REQUIRED)
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not required or not wallet:
                raise
        signature = await asyncio.to_thread(wallet.pay, required)
        return await self._commit(request, ((PAYMENT_SIGNATURE, signature),))

    async def _commit(
        self, request: coordinator_pb2.CommitJobRequest, extra: tuple[tuple[str, str], ...]
    ) -> coordinator_pb2.Job:
        call = self.jobs.CommitJob(request, metadata=(*self.metadata(), *extra))
        resp = await call
        self.last_payment_response = trailer(await call.trailing_metadata(), PAYMENT_RESPONSE)
        return resp.job

    async def submit(
        self, spec: common_pb2.JobSpec, idempotency_key: str = ""
    ) -> coordinator_pb2.Job:
        quote = await self.quote(spec)
        return await self.commit(quote.quote_id, idempotency_key)

    async def paired_workers(self) -> list[bytes]:
        """The ed25519 keys of the workers this client is paired with (the keys they
        proved when claiming, and prove at every Connect), newest pairing first."""
        pairings = await self.list_pairings()
        mine = [p for p in pairings if p.client_id == self.key.public_hex]
        mine.sort(key=lambda p: p.created_at.ToNanoseconds(), reverse=True)
        return list(dict.fromkeys(bytes.fromhex(p.worker_id) for p in mine))

    async def seal(
        self, spec: common_pb2.JobSpec, workers: list[bytes] | None = None
    ) -> common_pb2.JobSpec:
        """A PRIVATE spec with its payload encrypted to each of `workers` (default: every
        worker paired with this client, at most 16, newest pairings first); a spec that is
        public or sealed already is returned as it is. SealError without a paired worker."""
        if spec.privacy != common_pb2.PRIVACY_PRIVATE or spec.HasField("sealed"):
            return spec
        keys = workers if workers is not None else await self.paired_workers()
        if not keys:
            raise SealError(
                "a PRIVATE job is encrypted to the workers you are paired with, and you "
                "have none: pair one first (`dispatch pair create`, `dispatch pair claim`)"
            )
        return seal_spec(spec, self.key, keys[:MAX_SEALED_ENVELOPES])

    def open_result(self, job: coordinator_pb2.Job) -> PrivateResult:
        """The plaintext result of this client's completed sealed job, after checking its
        receipt: both signatures, the hashes of the ciphertexts the coordinator saw and
        the keyed hashes of the plaintexts. SealError naming what does not hold."""
        if job.state != coordinator_pb2.JOB_STATE_COMPLETED or not job.spec.HasField("sealed"):
            raise SealError("only a completed job with sealed input has a sealed result")
        check = verify_receipt_message(job.receipt)
        if not check.valid:
            raise SealError(f"the receipt does not verify: {'; '.join(check.problems)}")
        return open_result(self.key, job.job_id, job.spec, job.result, job.receipt.body)

    async def get(self, job_id: str) -> coordinator_pb2.Job:
        resp = await self.jobs.GetJob(
            coordinator_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata()
        )
        return resp.job

    async def watch(
        self, job_id: str, after: int = 0
    ) -> AsyncGenerator[coordinator_pb2.WatchJobResponse, None]:
        call = self.jobs.WatchJob(
            coordinator_pb2.WatchJobRequest(job_id=job_id, after_sequence=after),
            metadata=self.metadata(),
        )
        try:
            async for item in call:
                yield item
        finally:  # a watcher that stops early (or is cancelled) ends the stream at once
            call.cancel()

    async def wait(self, job_id: str) -> coordinator_pb2.Job:
        """Watches until the job is final (resuming after dropped streams); the final job."""
        after = 0
        while True:
            try:
                async for item in self.watch(job_id, after):
                    after = item.event.sequence
                    if item.HasField("job"):
                        return item.job
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            job = await self.get(job_id)
            if job.state in FINAL_STATES:
                return job

    async def cancel(self, job_id: str, reason: str = "") -> coordinator_pb2.Job:
        resp = await self.jobs.CancelJob(
            coordinator_pb2.CancelJobRequest(job_id=job_id, reason=reason),
            metadata=self.metadata(),
        )
        return resp.job

    async def list_workers(
        self, rpc_timeout: float | None = None
    ) -> list[coordinator_pb2.WorkerInfo]:
        resp = await self.jobs.ListWorkers(
            coordinator_pb2.ListWorkersRequest(), timeout=rpc_timeout
        )
        return list(resp.workers)

    async def earnings(
        self, page_size: int = 0, page_token: str = ""
    ) -> coordinator_pb2.GetEarningsResponse:
        """This key's earnings as a worker (GetEarnings)."""
        return await self.jobs.GetEarnings(
            coordinator_pb2.GetEarningsRequest(page_size=page_size, page_token=page_token),
            metadata=self.metadata(),
        )

    async def create_pairing_code(
        self, ttl_seconds: int = 0
    ) -> trust_pb2.CreatePairingCodeResponse:
        return await self.trust.CreatePairingCode(
            trust_pb2.CreatePairingCodeRequest(ttl_seconds=ttl_seconds), metadata=self.metadata()
        )

    async def claim_pairing(self, code: str) -> trust_pb2.Pairing:
        resp = await self.trust.ClaimPairing(
            trust_pb2.ClaimPairingRequest(code=code), metadata=self.metadata()
        )
        return resp.pairing

    async def list_pairings(self, include_revoked: bool = False) -> list[trust_pb2.Pairing]:
        resp = await self.trust.ListPairings(
            trust_pb2.ListPairingsRequest(include_revoked=include_revoked), metadata=self.metadata()
        )
        return list(resp.pairings)

    async def revoke_pairing(self, pairing_id: str) -> trust_pb2.Pairing:
        resp = await self.trust.RevokePairing(
            trust_pb2.RevokePairingRequest(pairing_id=pairing_id), metadata=self.metadata()
        )
        return resp.pairing

    async def receipt(self, job_id: str) -> receipt_pb2.GetReceiptResponse:
        return await self.receipts.GetReceipt(
            receipt_pb2.GetReceiptRequest(job_id=job_id), metadata=self.metadata()
        )

    async def receipt_proof(self, job_id: str) -> receipt_pb2.GetReceiptProofResponse:
        """The Merkle inclusion proof of a job's receipt (FAILED_PRECONDITION until the
        receipt's batch closes)."""
        return await self.receipts.GetReceiptProof(
            receipt_pb2.GetReceiptProofRequest(job_id=job_id), metadata=self.metadata()
        )


def task_spec(name: str, data: bytes, policy: int = 0, private: bool = False) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        task=common_pb2.TaskRequest(name=name, input=data),
        policy=cast(common_pb2.Policy.ValueType, policy),
        privacy=common_pb2.PRIVACY_PRIVATE if private else common_pb2.PRIVACY_PUBLIC,
    )


def llm_spec(
    prompt: str,
    model: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    policy: int = 0,
    private: bool = False,
) -> common_pb2.JobSpec:
    """An LLM job with one user prompt; an empty model lets the worker choose."""
    return common_pb2.JobSpec(
        llm=common_pb2.LlmRequest(
            prompt=prompt, model=model, max_tokens=max_tokens, temperature=temperature
        ),
        policy=cast(common_pb2.Policy.ValueType, policy),
        privacy=common_pb2.PRIVACY_PRIVATE if private else common_pb2.PRIVACY_PUBLIC,
    )
