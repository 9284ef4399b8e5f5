"""An async client for the coordinator's client-facing services, with key-based auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

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
from dispatchnet.protocol import (
    HTTP2_CHANNEL_OPTIONS,
    MAX_SEALED_ENVELOPES,
    coordinator_addresses,
)
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.sealing import PrivateResult, SealError, open_result, seal_spec

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

# How a stream ends when its coordinator goes away: UNAVAILABLE, or CANCELLED when the
# server cancels its calls as it stops (this client's own cancel raises CancelledError)
STREAM_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
FINAL_STATES = (
    coordinator_pb2.JOB_STATE_COMPLETED,
    coordinator_pb2.JOB_STATE_FAILED,
    coordinator_pb2.JOB_STATE_CANCELLED,
)
T = TypeVar("T")
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
    """Pays for jobs. A payer with a true `pays_offline` attribute pays without I/O (a
    local key's signature, ~0.2 ms of CPU for EIP-3009: less than a worker thread's hop
    costs), so the client calls it on the event loop; any other in a worker thread."""

    def pay(self, required_header: str) -> str:
        """A payment-signature value for a payment-required value (blocking);
        PaymentDeclined when it will not pay."""
        ...


async def pay_with(payer: Payer, required_header: str) -> str:
    """payer.pay(required_header): at once when it pays offline, else in a worker thread."""
    if getattr(payer, "pays_offline", False):
        return payer.pay(required_header)
    return await asyncio.to_thread(payer.pay, required_header)


def trailer(metadata: object, key: str) -> str:
    """The value of `key` in gRPC (trailing) metadata, "" when absent."""
    for k, v in cast(tuple[tuple[str, str], ...], metadata or ()):
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode()
    return ""


# Failover (several coordinator addresses): a call that finds its coordinator UNAVAILABLE
# goes to the next address; after a round of them all it waits and tries another round.
FAILOVER_ROUNDS = 3
FAILOVER_BACKOFF_SECONDS = 0.2  # before the second round; doubled before each later one
# A call sent once (ClaimPairing) goes to a coordinator whose channel connects within this.
FAILOVER_CONNECT_SECONDS = 2.0


@dataclass
class _Endpoint:
    """One coordinator address: its channel and the stubs on it."""

    address: str
    channel: grpc.aio.Channel
    jobs: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    receipts: receipt_pb2_grpc.ReceiptServiceAsyncStub
    trust: trust_pb2_grpc.TrustServiceAsyncStub


class CoordinatorClient:
    """A client of one coordinator, or of several that share one database (a cluster);
    every call signs a fresh short-lived token.

    With several addresses (comma-separated, or a list), calls go to the current one
    (the first, at the start) and fail over: a call that is safe to repeat and finds its
    coordinator UNAVAILABLE is sent again to the next address (each address once a
    round, FAILOVER_ROUNDS rounds with a growing pause between them), and the client
    then stays with the coordinator that answered. Safe to repeat: GetQuote, CommitJob
    (the same idempotency key, so the job is committed and paid once), GetJob, CancelJob,
    ListWorkers, GetEarnings, the receipt calls, CreatePairingCode (a code made twice
    leaves an unused one, which expires), ListPairings and RevokePairing; WatchJob resumes
    after the last event it delivered (watch, wait). ClaimPairing (single-use codes) is
    sent once, to a coordinator whose channel connects."""

    def __init__(
        self,
        address: str | Sequence[str],
        key: KeyPair,
        wallet: Payer | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """address: HOST:PORT, or several (comma-separated or a list); ValueError for none.
        wallet: pays CommitJob's x402 payment when the coordinator asks for one
        (payments/wallet.py Wallet); without one such a commit fails RESOURCE_EXHAUSTED.
        tracer_provider: traces each call (the coordinator continues the trace); default:
        the process's (OTEL_* variables, or the application's own OpenTelemetry SDK
        provider), none without one."""
        self.addresses = coordinator_addresses(
            address if isinstance(address, str) else tuple(address)
        )
        self.key = key
        self.wallet = wallet
        # the `payment-response` trailer of the last paid CommitJob ("" for none)
        self.last_payment_response = ""
        provider = tracer_provider or tracing.process_provider()
        self._interceptors = tracing.client_interceptors(provider) if provider is not None else None
        self._endpoints: dict[str, _Endpoint] = {}
        self._current = 0
        self._token: tuple[float, str] = (0.0, "")
        # quote_id -> the payment-required header GetQuote came with (paid at commit)
        self._required: dict[str, str] = {}

    @property
    def address(self) -> str:
        """The coordinator the next call goes to (the last one that answered)."""
        return self.addresses[self._current]

    def _endpoint(self) -> _Endpoint:
        address = self.address
        ep = self._endpoints.get(address)
        if ep is None:
            channel = grpc.aio.insecure_channel(
                address, options=HTTP2_CHANNEL_OPTIONS, interceptors=self._interceptors
            )
            ep = self._endpoints[address] = _Endpoint(
                address,
                channel,
                coordinator_pb2_grpc.CoordinatorServiceStub(channel),
                receipt_pb2_grpc.ReceiptServiceStub(channel),
                trust_pb2_grpc.TrustServiceStub(channel),
            )
        return ep

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current coordinator."""
        return self._endpoint().channel

    @property
    def jobs(self) -> coordinator_pb2_grpc.CoordinatorServiceAsyncStub:
        return self._endpoint().jobs

    @property
    def receipts(self) -> receipt_pb2_grpc.ReceiptServiceAsyncStub:
        return self._endpoint().receipts

    @property
    def trust(self) -> trust_pb2_grpc.TrustServiceAsyncStub:
        return self._endpoint().trust

    def _next(self) -> None:
        self._current = (self._current + 1) % len(self.addresses)

    async def _connected(self) -> _Endpoint:
        """For a call that must be sent once: the current coordinator once its channel is
        connected, else the next one that connects (FAILOVER_CONNECT_SECONDS each); with
        one address, or when none connects, the current one (the call then fails as it
        would)."""
        if len(self.addresses) == 1:
            return self._endpoint()
        for _ in range(len(self.addresses)):
            ep = self._endpoint()
            try:
                async with asyncio.timeout(FAILOVER_CONNECT_SECONDS):
                    await ep.channel.channel_ready()
                return ep
            except TimeoutError:
                self._next()
        return self._endpoint()

    async def _failover(
        self,
        attempt: Callable[[_Endpoint], Awaitable[T]],
        deadline_too: bool = False,
        cancelled_too: bool = False,
    ) -> T:
        """attempt on the current coordinator, and on the next ones while they are
        UNAVAILABLE (also DEADLINE_EXCEEDED with deadline_too: a call whose own short
        deadline bounds the wait for a connection; CANCELLED with cancelled_too: a long
        call its coordinator cancelled as it stopped); the last error when none answers.
        With one address: attempt once."""
        codes = {grpc.StatusCode.UNAVAILABLE}
        if deadline_too:
            codes.add(grpc.StatusCode.DEADLINE_EXCEEDED)
        if cancelled_too:
            codes.add(grpc.StatusCode.CANCELLED)
        n = len(self.addresses)
        if n == 1:
            return await attempt(self._endpoint())
        last: grpc.aio.AioRpcError | None = None
        for round_ in range(FAILOVER_ROUNDS):
            if round_:
                await asyncio.sleep(FAILOVER_BACKOFF_SECONDS * 2 ** (round_ - 1))
            for _ in range(n):
                try:
                    return await attempt(self._endpoint())
                except grpc.aio.AioRpcError as e:
                    if e.code() not in codes:
                        raise
                    last = e
                    self._next()
        assert last is not None
        raise last

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for ep in list(self._endpoints.values()):
            await ep.channel.close()
        self._endpoints.clear()

    async def coordinator_keys(self, timeout: float = 5.0) -> dict[str, bytes]:  # noqa: ASYNC109
        """Each coordinator's ed25519 public key (the key that countersigns the receipts
        of the jobs its workers complete), by address, as the coordinator states it in the
        Challenge of WorkerService.Connect: the stream is opened with a throwaway worker key
        and closed before answering. Coordinators that do not answer within `timeout`
        seconds are left out. Pin the result to accept receipts of this cluster only
        (receipts/core.py verify_receipt's expected_coordinator_key)."""
        from dispatch.v1 import worker_pb2, worker_pb2_grpc

        async def one(address: str) -> tuple[str, bytes]:
            async with grpc.aio.insecure_channel(address) as channel:
                call = worker_pb2_grpc.WorkerServiceStub(channel).Connect()
                try:
                    hello = worker_pb2.Hello(
                        public_key=KeyPair.generate().public_key,
                        kind=common_pb2.WORKER_KIND_SEEKER,
                        capabilities=worker_pb2.Capabilities(max_concurrency=1),
                    )
                    await call.write(worker_pb2.ConnectRequest(hello=hello))
                    msg = await call.read()
                finally:
                    call.cancel()
            if msg is grpc.aio.EOF:
                return address, b""
            response = cast(worker_pb2.ConnectResponse, msg)
            return address, bytes(response.challenge.coordinator_public_key)

        async def bounded(address: str) -> tuple[str, bytes]:
            try:
                async with asyncio.timeout(timeout):
                    return await one(address)
            except (TimeoutError, grpc.aio.AioRpcError):
                return address, b""

        found = await asyncio.gather(*(bounded(a) for a in self.addresses))
        return {address: key for address, key in found if len(key) == 32}

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
        request = coordinator_pb2.GetQuoteRequest(spec=spec)

        async def attempt(ep: _Endpoint) -> tuple[coordinator_pb2.GetQuoteResponse, str]:
            # authenticated: the quote is stored under this key (larger specs need that)
            call = ep.jobs.GetQuote(request, metadata=self.metadata(), timeout=rpc_timeout)
            resp = await call
            # a coordinator taking payments says with the quote what paying for it takes
            return resp, trailer(await call.trailing_metadata(), PAYMENT_REQUIRED)

        resp, required = await self._failover(attempt, deadline_too=rpc_timeout is not None)
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
                signature = await pay_with(wallet, known)
                return await self._commit(request, ((PAYMENT_SIGNATURE, signature),))
            return await self._commit(request, ())
        except grpc.aio.AioRpcError as e:
            required = trailer(e.trailing_metadata(), PAYMENT_REQUIRED)
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not required or not wallet:
                raise
        signature = await pay_with(wallet, required)
        return await self._commit(request, ((PAYMENT_SIGNATURE, signature),))

    async def _commit(
        self, request: coordinator_pb2.CommitJobRequest, extra: tuple[tuple[str, str], ...]
    ) -> coordinator_pb2.Job:
        async def attempt(ep: _Endpoint) -> coordinator_pb2.Job:
            # again on another coordinator: the same key (and payment) finds the job
            # committed there, if this one committed it before it went away
            call = ep.jobs.CommitJob(request, metadata=(*self.metadata(), *extra))
            resp = await call
            self.last_payment_response = trailer(await call.trailing_metadata(), PAYMENT_RESPONSE)
            return resp.job

        return await self._failover(attempt)

    async def find_committed(
        self, quote_id: str, idempotency_key: str
    ) -> coordinator_pb2.Job | None:
        """The job committed for the quote with this key, found by CommitJob again without
        a payment (a retry with its key needs none); None when none was made and the
        coordinator charges for jobs (it answers payment-required and makes none). A
        coordinator that does not charge makes the job if none was made."""
        request = coordinator_pb2.CommitJobRequest(
            quote_id=quote_id, idempotency_key=idempotency_key
        )
        try:
            return await self._commit(request, ())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and trailer(
                e.trailing_metadata(), PAYMENT_REQUIRED
            ):
                return None
            raise

    async def submit(
        self, spec: common_pb2.JobSpec, idempotency_key: str = ""
    ) -> coordinator_pb2.Job:
        quote = await self.quote(spec)
        return await self.commit(quote.quote_id, idempotency_key)

    async def run(
        self, spec: common_pb2.JobSpec, idempotency_key: str = "", payer: Payer | None = None
    ) -> coordinator_pb2.Job:
        """Runs spec and returns the final job, in one RunJob call (one round trip for the
        job, no quote stored). With several addresses, a call that fails UNAVAILABLE is
        made again on the next one with the same key: it finds the job if it was committed.
        A client with a wallet (or `payer`) pays: GetQuote for the price, then RunJob with
        the quote and the payment."""
        key = idempotency_key or str(uuid.uuid4())
        wallet = payer or self.wallet
        extra: tuple[tuple[str, str], ...] = ()
        if wallet is not None:
            quote = await self.quote(spec)
            required = self._required.pop(quote.quote_id, None)
            if required:
                extra = ((PAYMENT_SIGNATURE, await pay_with(wallet, required)),)
            request = coordinator_pb2.RunJobRequest(quote_id=quote.quote_id, idempotency_key=key)
        else:
            request = coordinator_pb2.RunJobRequest(spec=spec, idempotency_key=key)

        async def attempt(ep: _Endpoint) -> coordinator_pb2.Job:
            call = ep.jobs.RunJob(request, metadata=(*self.metadata(), *extra))
            resp = await call
            if extra:
                self.last_payment_response = trailer(
                    await call.trailing_metadata(), PAYMENT_RESPONSE
                )
            return resp.job

        # the same key again: a job committed before its coordinator went away is found
        return await self._failover(attempt, cancelled_too=True)

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
        request = coordinator_pb2.GetJobRequest(job_id=job_id)
        resp = await self._failover(lambda ep: ep.jobs.GetJob(request, metadata=self.metadata()))
        return resp.job

    async def watch(
        self, job_id: str, after: int = 0
    ) -> AsyncGenerator[coordinator_pb2.WatchJobResponse, None]:
        """The job's events after sequence `after`, to its final one. With several
        addresses, a stream that fails UNAVAILABLE or CANCELLED (its coordinator went away)
        is opened again on the next one, after the last event delivered: nothing is missed
        or repeated. The last error when no coordinator answers for FAILOVER_ROUNDS rounds."""
        failures = 0
        while True:
            call = self.jobs.WatchJob(
                coordinator_pb2.WatchJobRequest(job_id=job_id, after_sequence=after),
                metadata=self.metadata(),
            )
            try:
                async for item in call:
                    failures = 0
                    after = item.event.sequence
                    yield item
                return
            except grpc.aio.AioRpcError as e:
                n = len(self.addresses)
                if n == 1 or e.code() not in STREAM_GONE:
                    raise
                failures += 1
                if failures >= n * FAILOVER_ROUNDS:
                    raise
                self._next()
                if failures % n == 0:  # a whole round failed: pause before the next
                    await asyncio.sleep(FAILOVER_BACKOFF_SECONDS * 2 ** (failures // n - 1))
            finally:  # a watcher that stops early (or is cancelled) ends the stream at once
                call.cancel()

    async def wait(self, job_id: str, after: int = 0) -> coordinator_pb2.Job:
        """Watches until the job is final (resuming after dropped streams); the final job.
        after: the last sequence the caller has seen (CommitJob's `job.last_sequence`):
        the stream then carries only what came since."""
        while True:
            try:
                async for item in self.watch(job_id, after):
                    after = item.event.sequence
                    if item.HasField("job"):
                        return item.job
            except grpc.aio.AioRpcError as e:
                if e.code() not in STREAM_GONE:
                    raise
            job = await self.get(job_id)
            if job.state in FINAL_STATES:
                return job

    async def cancel(self, job_id: str, reason: str = "") -> coordinator_pb2.Job:
        request = coordinator_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        resp = await self._failover(lambda ep: ep.jobs.CancelJob(request, metadata=self.metadata()))
        return resp.job

    async def list_workers(
        self, rpc_timeout: float | None = None
    ) -> list[coordinator_pb2.WorkerInfo]:
        request = coordinator_pb2.ListWorkersRequest()
        resp = await self._failover(
            lambda ep: ep.jobs.ListWorkers(request, timeout=rpc_timeout),
            deadline_too=rpc_timeout is not None,
        )
        return list(resp.workers)

    async def earnings(
        self, page_size: int = 0, page_token: str = ""
    ) -> coordinator_pb2.GetEarningsResponse:
        """This key's earnings as a worker (GetEarnings)."""
        request = coordinator_pb2.GetEarningsRequest(page_size=page_size, page_token=page_token)
        return await self._failover(
            lambda ep: ep.jobs.GetEarnings(request, metadata=self.metadata())
        )

    async def create_pairing_code(
        self, ttl_seconds: int = 0
    ) -> trust_pb2.CreatePairingCodeResponse:
        # again elsewhere when unavailable: a code made twice leaves one unused, which expires
        request = trust_pb2.CreatePairingCodeRequest(ttl_seconds=ttl_seconds)
        return await self._failover(
            lambda ep: ep.trust.CreatePairingCode(request, metadata=self.metadata())
        )

    async def claim_pairing(self, code: str) -> trust_pb2.Pairing:
        # sent once (a code is single-use), to a coordinator that is reachable
        ep = await self._connected()
        resp = await ep.trust.ClaimPairing(
            trust_pb2.ClaimPairingRequest(code=code), metadata=self.metadata()
        )
        return resp.pairing

    async def list_pairings(self, include_revoked: bool = False) -> list[trust_pb2.Pairing]:
        request = trust_pb2.ListPairingsRequest(include_revoked=include_revoked)
        resp = await self._failover(
            lambda ep: ep.trust.ListPairings(request, metadata=self.metadata())
        )
        return list(resp.pairings)

    async def revoke_pairing(self, pairing_id: str) -> trust_pb2.Pairing:
        request = trust_pb2.RevokePairingRequest(pairing_id=pairing_id)
        resp = await self._failover(
            lambda ep: ep.trust.RevokePairing(request, metadata=self.metadata())
        )
        return resp.pairing

    async def receipt(self, job_id: str) -> receipt_pb2.GetReceiptResponse:
        request = receipt_pb2.GetReceiptRequest(job_id=job_id)
        return await self._failover(
            lambda ep: ep.receipts.GetReceipt(request, metadata=self.metadata())
        )

    async def receipt_proof(self, job_id: str) -> receipt_pb2.GetReceiptProofResponse:
        """The Merkle inclusion proof of a job's receipt (FAILED_PRECONDITION until the
        receipt's batch closes)."""
        request = receipt_pb2.GetReceiptProofRequest(job_id=job_id)
        return await self._failover(
            lambda ep: ep.receipts.GetReceiptProof(request, metadata=self.metadata())
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
