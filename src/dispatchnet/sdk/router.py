"""ComputeRouter: runs a job on the Dispatch network, or at a hosted provider when the network
cannot serve it.

Decentralized route, per network in the chain preference's order: GetQuote (the first
coordinator that answers), the spending limits, CommitJob with the network's x402 wallet,
WatchJob (LLM tokens stream as they come), then the receipt is verified offline (and its
Merkle proof, when asked). Hosted fallback (README "SDK"), only when no network served:
- no coordinator of any network answered GetQuote within connect_timeout;
- a quote counted no eligible worker;
- a PRIVATE job and none of the client's paired workers that could run it is connected;
- the committed job was not picked up (RUNNING) within pickup_timeout: it is cancelled
  first, so it is never paid as well as the hosted call;
and only for LLM jobs and the text tasks with an LLM form (summarize, classify,
extract_json), never with decentralized_only=True. Every other failure is raised (typed,
sdk/errors.py): a job that ran and failed is not retried elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TypedDict, TypeVar, Unpack

import betterproto
import grpc

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet import keys
from dispatchnet.client import CoordinatorClient, Payer
from dispatchnet.client import PaymentDeclined as WalletDeclined
from dispatchnet.sdk import types
from dispatchnet.sdk.convert import (
    MessageLike,
    PolicyLike,
    PrivacyLike,
    llm_spec,
    spec_pb,
    task_spec,
    to_types,
)
from dispatchnet.sdk.errors import (
    UNREACHABLE,
    CoordinatorUnavailable,
    DeadlineExceeded,
    DispatchError,
    HostedError,
    InvalidRequest,
    JobFailed,
    NoCapacity,
    PaymentDeclined,
    PaymentRejected,
    PaymentRequired,
    ReceiptInvalid,
    Skip,
    from_rpc,
    payment_error,
)
from dispatchnet.sdk.hosted import (
    DEFAULT_MAX_TOKENS,
    HostedProvider,
    HostedReply,
    HostedRequest,
    ModelPrice,
    PriceTable,
    providers_from_env,
)
from dispatchnet.sdk.networks import ANY, Network
from dispatchnet.sdk.result import ComputeResult, Price, WorkerRef
from dispatchnet.sdk.spending import Spending, SpendingLimits
from dispatchnet.sdk.verify import Expected, ReceiptCheck, verify_receipt
from dispatchnet.sealing import SealError
from dispatchnet.worker.llm import CHAT_CONTENT_TYPE, TEXT_TASKS, text_task
from dispatchnet.worker.tasks import TaskError

RUNNING = coordinator_pb2.JOB_STATE_RUNNING
COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED
CANCELLED = coordinator_pb2.JOB_STATE_CANCELLED
UNPAID = ("", "none")  # PaymentReference.status of a job that moves no money
NOT_SERVED = "no_eligible_worker"  # a job failure that means no worker ever took it
WATCH_RETRIES = 5
ABANDON_SECONDS = 5.0  # the most a call that went away spends cancelling its job
T = TypeVar("T")


class CallOptions(TypedDict, total=False):
    """Per-call settings; each defaults to the router's."""

    chain: str
    """A network name ("monad", "solana", ...) or "any"."""
    decentralized_only: bool
    """Never fall back to a hosted provider."""
    max_price_micros: int
    """A per-job limit for this call, applied together with the router's."""
    pickup_timeout: float
    """Seconds a committed job may wait for a worker before it is cancelled."""
    timeout: float
    """Seconds for the whole call; past it the job is cancelled (DeadlineExceeded)."""
    verify_proof: bool
    """Also wait for and verify the receipt's Merkle inclusion proof."""
    idempotency_key: str
    """CommitJob's idempotency key (default: a new one per call)."""
    hosted_model: str
    """The model a hosted fallback uses (default: the provider's)."""
    payer: Payer
    """Pays this call's CommitJob instead of the network's wallet: e.g. a RelayedPayment,
    the caller's own x402 payment that a gateway passes on (sdk/relay.py)."""


@dataclass(frozen=True)
class _Call:
    chain: str
    decentralized_only: bool
    max_price_micros: int | None
    pickup_timeout: float
    timeout: float
    verify_proof: bool
    idempotency_key: str
    hosted_model: str
    streaming: bool
    started: float  # time.monotonic() when the call was made
    deadline: float = 0.0  # loop time; set when the call starts running
    payer: Payer | None = None  # None: the network's wallet


class _NotPickedUp:
    """_follow's answer for a job it cancelled before any worker ran it."""


NOT_PICKED_UP = _NotPickedUp()


class ComputeStream:
    """An async iterator of a job's output text as it is produced (LLM tokens), whichever
    route runs it; `result` holds the ComputeResult once the iteration ended.

        stream = router.stream_llm("Tell me a story.")
        async for token in stream:
            print(token, end="")
        print(stream.result.route, stream.result.price)

    Closing it before the end (aclose, or leaving `async with`) cancels the job when it is
    not final yet; a job that no worker completed is not charged. Errors are raised from
    the iteration, as DispatchError."""

    def __init__(self, items: AsyncGenerator[str | ComputeResult, None]) -> None:
        self._items = items
        self._result: ComputeResult | None = None

    def __aiter__(self) -> ComputeStream:
        return self

    async def __anext__(self) -> str:
        if self._result is not None:
            raise StopAsyncIteration
        item = await anext(self._items)
        if isinstance(item, ComputeResult):
            self._result = item
            await self._items.aclose()
            raise StopAsyncIteration
        return item

    @property
    def result(self) -> ComputeResult:
        """The result; RuntimeError until the iteration has ended."""
        if self._result is None:
            raise RuntimeError("the stream has not ended yet (iterate it, or await final())")
        return self._result

    async def final(self) -> ComputeResult:
        """Reads the rest of the stream and returns the result."""
        async for _ in self:
            pass
        return self.result

    async def aclose(self) -> None:
        await self._items.aclose()

    async def __aenter__(self) -> ComputeStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class ComputeRouter:
    """The Dispatch client SDK (async). One instance is one session: its spending counts
    against per_session limits, and it holds one gRPC channel per coordinator.

        async with ComputeRouter([Network.from_profile("local-monad")]) as router:
            result = await router.run_llm("Name three colors.", max_tokens=32)

    networks: where the decentralized route runs (default: one network "local" at
    $DISPATCH_COORDINATOR or 127.0.0.1:50051, no wallet). chain: the default chain
    preference, a network name or "any" (every network, in order). key: the client's
    ed25519 identity (default $DISPATCH_HOME/client.key, made on first use: PRIVATE jobs
    go to workers paired with this key, and only it may read its jobs). hosted: the
    fallback providers in preference order (default: providers_from_env(hosted_preference),
    those whose API key is set). prices: the price table for hosted cost estimates.
    limits: spending limits (default $0.10 per job, $1.00 per session).
    """

    def __init__(
        self,
        networks: Sequence[Network] | None = None,
        *,
        chain: str = ANY,
        key: keys.KeyPair | None = None,
        hosted: Sequence[HostedProvider] | None = None,
        hosted_preference: Sequence[str] = ("openai", "anthropic"),
        prices: PriceTable | dict[str, ModelPrice] | None = None,
        limits: SpendingLimits | None = None,
        decentralized_only: bool = False,
        pickup_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        timeout: float = 600.0,
        verify_proof: bool = False,
        proof_timeout: float = 60.0,
    ) -> None:
        if networks is None:
            networks = [Network.from_profile("local", name="local")]
        names = [n.name for n in networks]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"network names must be unique: {names}")
        self.networks = list(networks)
        if chain != ANY and chain not in names:
            raise InvalidRequest(f"chain {chain!r} names no network (configured: {names})")
        self.chain = chain
        self.key = key or keys.load_or_create(keys.default_home() / "client.key")
        self.hosted = list(providers_from_env(hosted_preference) if hosted is None else hosted)
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.spending = Spending(limits or SpendingLimits())
        self.decentralized_only = decentralized_only
        self.pickup_timeout = pickup_timeout
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.verify_proof = verify_proof
        self.proof_timeout = proof_timeout
        self._clients: dict[str, CoordinatorClient] = {}  # by network name

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> ComputeRouter:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channels and the hosted clients; idempotent."""
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.close()
        for p in self.hosted:
            await p.close()

    @property
    def client_id(self) -> str:
        """This router's client id (hex ed25519 public key)."""
        return self.key.public_hex

    @property
    def spent_micros(self) -> int:
        """What this session has spent: completed paid jobs and hosted estimates."""
        return self.spending.spent_micros

    # --- the calls --------------------------------------------------------------------------

    async def run_llm(
        self,
        prompt: str | Sequence[MessageLike],
        *,
        model: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        **options: Unpack[CallOptions],
    ) -> ComputeResult:
        """An LLM reply to a prompt (one user message) or a conversation ([{"role",
        "content"}...], roles system/user/assistant). model: the network model name (None:
        any desktop's); max_tokens 0: the coordinator's default (256 at a hosted
        provider)."""
        spec = llm_spec(prompt, model, max_tokens, temperature, policy, privacy)
        return await self.run(spec, **options)

    def stream_llm(
        self,
        prompt: str | Sequence[MessageLike],
        *,
        model: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        **options: Unpack[CallOptions],
    ) -> ComputeStream:
        """run_llm, streamed: iterate the returned ComputeStream for the tokens; its
        `result` is the ComputeResult once the iteration ends."""
        spec = llm_spec(prompt, model, max_tokens, temperature, policy, privacy)
        return self.stream(spec, **options)

    async def run_task(
        self,
        name: str,
        input: bytes | str | object = b"",
        *,
        policy: PolicyLike = "auto",
        privacy: PrivacyLike = "public",
        use_llm: bool = False,
        wasm: bytes | None = None,
        verify: int = 0,
        **options: Unpack[CallOptions],
    ) -> ComputeResult:
        """A task: a built-in one by name (README: echo, sha256, word_count, summarize,
        classify, extract_json, ...), or a WebAssembly module (name "wasm", wasm=the module's
        bytes). input: bytes as they are, str as UTF-8, anything else as JSON.
        use_llm: run a text task with a desktop's LLM. verify 2 or 3: run a deterministic
        PUBLIC task on that many independent workers and return the majority's output (at
        that many times the price); its receipt must then carry the coordinator's record of
        the comparison (receipt_body.verification), and no hosted provider stands in."""
        spec = task_spec(name, input, policy, privacy, use_llm, wasm, verify)
        return await self.run(spec, **options)

    async def run(self, spec: types.JobSpec, **options: Unpack[CallOptions]) -> ComputeResult:
        """Any job spec (types.JobSpec); what run_llm and run_task call."""
        call = self._call(options, streaming=False)
        async with contextlib.aclosing(self._execute(spec, call)) as items:
            async for item in items:
                if isinstance(item, ComputeResult):
                    return item
        raise DispatchError("the job ended without a result")  # not reached

    def stream(self, spec: types.JobSpec, **options: Unpack[CallOptions]) -> ComputeStream:
        """Any job spec, streamed (progress text of the dispatch route, LLM tokens)."""
        return ComputeStream(self._execute(spec, self._call(options, streaming=True)))

    async def quote(self, spec: types.JobSpec, chain: str | None = None) -> types.Quote:
        """What the network would charge for a job, nothing committed: the quote of the
        first network of the chain preference that has an eligible worker, else of the
        first that answers (eligible_workers 0). run() asks for its own quote.
        CoordinatorUnavailable when no coordinator answers."""
        pb = spec_pb(spec)
        first: types.Quote | None = None
        skipped = []
        for net in self._networks(self._call({"chain": chain or self.chain}, False).chain):
            quoted = await self._quote(net, pb)
            if isinstance(quoted, Skip):
                skipped.append(quoted)
                continue
            quote = to_types(quoted[0], types.Quote)
            if quote.eligible_workers:
                return quote
            first = first or quote
        if first is None:
            raise CoordinatorUnavailable("no coordinator answered GetQuote", skipped)
        return first

    # --- verification and lookups -----------------------------------------------------------

    def verify_receipt(
        self,
        receipt: types.Receipt,
        proof: types.GetReceiptProofResponse | None = None,
        expected_coordinator_key: bytes | Iterable[bytes] = b"",
    ) -> ReceiptCheck:
        """Checks any receipt offline (both signatures; with a proof, that it recomputes
        its batch root for this receipt). sdk.verify.verify_receipt does the same."""
        return verify_receipt(
            receipt, expected_coordinator_key=expected_coordinator_key, proof=proof
        )

    async def receipt_proof(
        self, job_id: str, network: str | None = None, wait: float = 0.0
    ) -> types.GetReceiptProofResponse:
        """The Merkle inclusion proof of one of this client's receipts, verified against
        the job's receipt; `wait` seconds for its batch to close (FAILED_PRECONDITION
        until then: InvalidRequest after the wait). ReceiptInvalid when it does not
        verify."""
        net, client = await self._locate(job_id, network)
        job = await self._rpc(client.get(job_id), client.address)
        deadline = asyncio.get_running_loop().time() + wait
        proof = await self._proof(client, job_id, deadline)
        check = verify_receipt(
            to_types(job.receipt, types.Receipt),
            expected_coordinator_key=net.pinned_keys,
            proof=proof,
        )
        if not check.valid:
            raise ReceiptInvalid("the receipt proof does not verify", check.problems)
        return proof

    async def get_job(self, job_id: str, network: str | None = None) -> types.Job:
        """One of this client's jobs, from the first network's coordinator that knows it."""
        _, client = await self._locate(job_id, network)
        return to_types(await self._rpc(client.get(job_id), client.address), types.Job)

    async def cancel_job(self, job_id: str, network: str | None = None) -> types.Job:
        """Cancels one of this client's jobs (not charged when no worker completed it)."""
        _, client = await self._locate(job_id, network)
        job = await self._cancel(client, job_id, "cancelled by the client")
        return to_types(job, types.Job)

    async def list_workers(self, network: str | None = None) -> list[types.WorkerInfo]:
        """The workers connected to the networks of the chain preference (or `network`),
        from the first coordinator of each that answers. CoordinatorUnavailable when no
        coordinator of any of them answers (an empty list means none is connected)."""
        out: list[types.WorkerInfo] = []
        answered = False
        for net in self._networks(network or self.chain):
            client = await self._answering(net)
            if client is not None:
                answered = True
                workers = await self._rpc(client.list_workers(self.connect_timeout), client.address)
                out += [to_types(w, types.WorkerInfo) for w in workers]
        if not answered:
            raise CoordinatorUnavailable("no coordinator answered ListWorkers")
        return out

    # --- the core ---------------------------------------------------------------------------

    def _call(self, o: CallOptions, streaming: bool) -> _Call:
        unknown = set(o) - set(CallOptions.__annotations__)
        if unknown:
            raise InvalidRequest(f"unknown option(s): {', '.join(sorted(unknown))}")
        chain = o.get("chain", self.chain)
        if chain != ANY and chain not in [n.name for n in self.networks]:
            raise InvalidRequest(
                f"chain {chain!r} names no network (configured: "
                f"{', '.join(n.name for n in self.networks) or 'none'}, or any)"
            )
        timeout = o.get("timeout", self.timeout)
        if timeout <= 0 or o.get("pickup_timeout", self.pickup_timeout) <= 0:
            raise InvalidRequest("timeout and pickup_timeout must be positive")
        return _Call(
            chain=chain,
            decentralized_only=o.get("decentralized_only", self.decentralized_only),
            max_price_micros=o.get("max_price_micros"),
            pickup_timeout=o.get("pickup_timeout", self.pickup_timeout),
            timeout=timeout,
            verify_proof=o.get("verify_proof", self.verify_proof),
            idempotency_key=o.get("idempotency_key", ""),
            hosted_model=o.get("hosted_model", ""),
            streaming=streaming,
            started=time.monotonic(),
            payer=o.get("payer"),
        )

    def _networks(self, chain: str) -> list[Network]:
        return [n for n in self.networks if chain in (ANY, n.name)]

    def _client(self, net: Network) -> CoordinatorClient:
        """The network's client: all its coordinators, failing over between them."""
        c = self._clients.get(net.name)
        if c is None:
            c = self._clients[net.name] = CoordinatorClient(
                list(net.coordinators), self.key, net.wallet
            )
        return c

    async def _execute(
        self, spec: types.JobSpec, o: _Call
    ) -> AsyncGenerator[str | ComputeResult, None]:
        """Tokens (str) as they come, then the ComputeResult."""
        o = replace(o, deadline=asyncio.get_running_loop().time() + o.timeout)
        try:
            pb = spec_pb(spec)
            skipped: list[Skip] = []
            networks = self._networks(o.chain)
            if not networks:
                skipped.append(Skip("", "no_network", "no network is configured"))
            for net in networks:
                async with contextlib.aclosing(self._on_network(net, pb, o)) as items:
                    async for item in items:
                        if isinstance(item, Skip):
                            skipped.append(item)
                            break
                        if isinstance(item, ComputeResult):
                            item.skipped = skipped
                            yield item
                            return
                        yield item
            async with contextlib.aclosing(self._hosted(spec, o, skipped)) as hosted:
                async for item in hosted:
                    yield item
        except grpc.aio.AioRpcError as e:  # a call with no mapping of its own
            raise from_rpc(e, "coordinator") from e

    async def _on_network(
        self, net: Network, pb: common_pb2.JobSpec, o: _Call
    ) -> AsyncGenerator[str | Skip | ComputeResult, None]:
        """Quote, limits, commit, watch and verify on one network; a Skip when it cannot
        serve the job (and nothing was charged)."""
        quoted = await self._quote(net, pb)
        if isinstance(quoted, Skip):
            yield quoted
            return
        quote, client, pb = quoted
        address = client.address
        if quote.eligible_workers == 0:
            yield Skip(net.name, "no_eligible_worker", "no connected worker can run it", address)
            return
        if pb.privacy == common_pb2.PRIVACY_PRIVATE and not await self._paired(client, pb):
            detail = "no worker paired with this client that can run it is connected"
            yield Skip(net.name, "no_paired_worker", detail, address)
            return
        reservation = self.spending.reserve(quote.price.amount_micros, o.max_price_micros)
        job: coordinator_pb2.Job | None = None
        final = False
        key = o.idempotency_key or f"sdk-{uuid.uuid4()}"
        try:
            try:
                job = await self._commit(net, client, quote, o, key)
            except asyncio.CancelledError:
                await self._abandon_commit(client, quote.quote_id, key)
                raise
            if job.payment.status in UNPAID:
                reservation.release()
            done: coordinator_pb2.Job | None = None
            async with contextlib.aclosing(self._follow(client, job, o)) as events:
                async for event in events:
                    if isinstance(event, str):
                        yield event
                    elif isinstance(event, _NotPickedUp):
                        final = True
                        detail = f"no worker took it within {o.pickup_timeout:g}s; cancelled"
                        yield Skip(net.name, "not_picked_up", detail, address, job.job_id)
                        return
                    else:
                        done = event
            final = True
            assert done is not None
            if done.state == FAILED and done.failure.code == NOT_SERVED and not done.worker_id:
                yield Skip(net.name, "not_picked_up", done.failure.message, address, job.job_id)
                return
            if done.state == COMPLETED and done.payment.status not in UNPAID:
                reservation.keep()  # completed: the payment is (or will be) settled
            yield await self._result(net, client, quote, done, o)
        finally:
            reservation.release()
            if job is not None and not final:
                await self._abandon(client, job.job_id)

    async def _quote(
        self, net: Network, pb: common_pb2.JobSpec
    ) -> tuple[coordinator_pb2.Quote, CoordinatorClient, common_pb2.JobSpec] | Skip:
        """The quote, the coordinator that gave it, and the spec it is for: a PRIVATE
        spec sealed first to the workers paired with this client there (the coordinator
        never sees its payload, not even in a quote)."""
        client = self._client(net)
        try:  # each coordinator in turn while they are unreachable
            try:
                sealed = await client.seal(pb)
            except SealError as e:
                return Skip(net.name, "no_paired_worker", str(e), client.address)
            return await client.quote(sealed, self.connect_timeout), client, sealed
        except grpc.aio.AioRpcError as e:
            if e.code() not in UNREACHABLE:
                raise from_rpc(e, client.address) from e
            detail = f"{', '.join(net.coordinators)}: {e.code().name}: {e.details()}"
            return Skip(net.name, "coordinator_unavailable", detail, client.address)

    async def _answering(self, net: Network) -> CoordinatorClient | None:
        """The first coordinator of the network that answers ListWorkers."""
        client = self._client(net)
        try:  # each coordinator in turn while they are unreachable
            await client.list_workers(self.connect_timeout)
            return client
        except grpc.aio.AioRpcError as e:
            if e.code() not in UNREACHABLE:
                raise from_rpc(e, client.address) from e
        return None

    async def _paired(self, client: CoordinatorClient, pb: common_pb2.JobSpec) -> bool:
        """Whether a worker paired with this client that could run the job is connected."""
        pairings = await self._rpc(client.list_pairings(), client.address)
        paired = {p.worker_id for p in pairings if p.client_id == self.client_id}
        if not paired:
            return False
        workers = await self._rpc(client.list_workers(self.connect_timeout), client.address)
        return any(w.worker_id in paired and _can_run(w, pb) for w in workers)

    async def _commit(
        self,
        net: Network,
        client: CoordinatorClient,
        quote: coordinator_pb2.Quote,
        o: _Call,
        key: str,
    ) -> coordinator_pb2.Job:
        where = client.address
        payer = o.payer or client.wallet
        try:
            return await client.commit(quote.quote_id, key, payer=o.payer)
        except WalletDeclined as e:
            who = "the payer" if o.payer is not None else f"the {net.name} wallet"
            raise PaymentDeclined(f"{who} will not pay: {e}") from e
        except grpc.aio.AioRpcError as e:
            code = e.code()
            reason = payment_error(e) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
            if reason is not None and payer is None:
                raise PaymentRequired(
                    f"{where} asks for an x402 payment and network {net.name!r} has no wallet"
                ) from e
            if reason is not None:
                raise PaymentRejected(f"{where} refused the payment: {reason}", reason) from e
            if code in UNREACHABLE:
                raise CoordinatorUnavailable(
                    f"{where} did not answer CommitJob ({code.name}); the job may exist: "
                    f"retry with idempotency_key={key!r} to get it without paying twice"
                ) from e
            raise from_rpc(e, where) from e
        except DispatchError:
            raise
        except Exception as e:  # the wallet failed to sign (e.g. its node is down)
            raise PaymentDeclined(f"the {net.name} wallet failed: {type(e).__name__}: {e}") from e

    async def _follow(
        self, client: CoordinatorClient, job: coordinator_pb2.Job, o: _Call
    ) -> AsyncGenerator[str | _NotPickedUp | coordinator_pb2.Job, None]:
        """The job's progress text, then the final job; NOT_PICKED_UP after cancelling a job
        no worker ran within pickup_timeout. DeadlineExceeded (job cancelled) past the
        call's deadline."""
        loop = asyncio.get_running_loop()
        pickup_at = loop.time() + o.pickup_timeout
        picked = job.state in (RUNNING, COMPLETED, FAILED, CANCELLED)
        # what the commit answered is known: the stream starts after it (from the start
        # when the job is final already, so that its final event comes with the job)
        ended = job.state in (COMPLETED, FAILED, CANCELLED)
        after, failures = (0 if ended else job.last_sequence), 0
        while True:
            events = client.watch(job.job_id, after)
            try:
                while True:
                    deadline = o.deadline if picked else min(pickup_at, o.deadline)
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await anext(events)
                    except StopAsyncIteration:
                        break
                    event, failures = item.event, 0
                    after = event.sequence
                    picked = picked or event.state in (RUNNING, COMPLETED)
                    if event.WhichOneof("detail") == "progress" and event.progress.text:
                        yield event.progress.text
                    if item.HasField("job"):
                        yield item.job
                        return
                # the stream ended before the job's final event: watch again from `after`
                failures += 1
                if failures > WATCH_RETRIES:
                    raise CoordinatorUnavailable(
                        f"{client.address}: WatchJob keeps ending before job {job.job_id} is final"
                    )
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))  # backoff before watching again
            except TimeoutError:
                reason = "the client's deadline passed" if picked else "no worker took it in time"
                final = await self._cancel(client, job.job_id, reason)
                if final.state == CANCELLED and not picked:
                    yield NOT_PICKED_UP
                elif final.state == CANCELLED:
                    raise DeadlineExceeded(
                        f"job {job.job_id} did not finish within the call's timeout; cancelled"
                    ) from None
                else:
                    yield final
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in UNREACHABLE or failures >= WATCH_RETRIES:
                    raise from_rpc(e, client.address) from e
                failures += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))  # backoff before watching again
            finally:
                await events.aclose()

    async def _cancel(
        self, client: CoordinatorClient, job_id: str, reason: str
    ) -> coordinator_pb2.Job:
        """Cancels the job; the job as it ended when it was final already."""
        try:
            return await client.cancel(job_id, reason)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise from_rpc(e, client.address) from e
        return await self._rpc(client.get(job_id), client.address)

    async def _abandon_commit(self, client: CoordinatorClient, quote_id: str, key: str) -> None:
        """Best effort: the caller went away while CommitJob was in flight, so the job may
        exist (and would run, and be charged when it completes) without this call knowing
        its id. CommitJob again with the same key and no payment finds it, paying nothing
        (where jobs are paid for and none was made, it answers payment-required and makes
        none; where they are free, it makes the job), and it is cancelled."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ABANDON_SECONDS):
                job = await client.find_committed(quote_id, key)
                if job is not None:
                    await client.cancel(job.job_id, "the client stopped waiting")

    async def _abandon(self, client: CoordinatorClient, job_id: str) -> None:
        """Best effort: the caller went away before the job ended, so it is cancelled."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                client.cancel(job_id, "the client stopped waiting"), ABANDON_SECONDS
            )

    async def _result(
        self,
        net: Network,
        client: CoordinatorClient,
        quote: coordinator_pb2.Quote,
        job: coordinator_pb2.Job,
        o: _Call,
    ) -> ComputeResult:
        if job.state != COMPLETED:
            failure = job.failure
            code = failure.code or ("cancelled" if job.state == CANCELLED else "failed")
            raise JobFailed(
                f"job {job.job_id} {coordinator_pb2.JobState.Name(job.state)[10:].lower()}: "
                f"{code}: {failure.message}",
                job.job_id,
                code,
            )
        output = job.result.output
        result = ComputeResult(
            output=output.decode("utf-8", "replace"),
            route="dispatch",
            price=Price(quote.price.amount_micros, quote.price.currency or "USD"),
            latency_ms=(time.monotonic() - o.started) * 1000,
            receipt=to_types(job.receipt, types.Receipt),
            payment=to_types(job.payment, types.PaymentReference),
            output_bytes=output,
            content_type=job.result.content_type,
            job_id=job.job_id,
            network=net.name,
            coordinator=client.address,
            model=job.spec.llm.model if job.spec.WhichOneof("work") == "llm" else "",
            usage=to_types(job.result.usage, types.TokenUsage),
            job=to_types(job, types.Job),
        )
        expected = Expected(
            job_id=job.job_id,
            client_id=self.key.public_hex,
            output=output,
            input_sha256=quote.spec_sha256,
            price_micros=quote.price.amount_micros,
            worker_id=job.worker_id,
            verified_runs=job.spec.verify,
        )
        proof = await self._proof(client, job.job_id, o.deadline) if o.verify_proof else None
        check = verify_receipt(
            result.receipt or types.Receipt(),
            expected_coordinator_key=net.pinned_keys,
            proof=proof,
            expected=expected,
        )
        result.receipt_body = check.body
        result.proof = proof
        if check.body is not None:
            result.worker = WorkerRef(job.worker_id, check.body.worker_agent_id)
        if not check.valid:
            raise ReceiptInvalid(
                f"job {job.job_id}: the receipt does not verify: {'; '.join(check.problems)}",
                check.problems,
                result,
            )
        if job.spec.HasField("sealed"):
            try:  # the plaintext, checked against the receipt's keyed hashes
                opened = client.open_result(job)
            except SealError as e:
                raise ReceiptInvalid(
                    f"job {job.job_id}: the sealed result is refused: {e}", [str(e)], result
                ) from e
            result.output = opened.output.decode("utf-8", "replace")
            result.output_bytes = opened.output
            result.content_type = opened.content_type
        return result

    async def _proof(
        self, client: CoordinatorClient, job_id: str, deadline: float
    ) -> types.GetReceiptProofResponse:
        """The job's receipt proof, asked again until its batch closes or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = min(deadline, loop.time() + self.proof_timeout)
        while True:
            try:
                return to_types(await client.receipt_proof(job_id), types.GetReceiptProofResponse)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or loop.time() >= deadline:
                    raise from_rpc(e, client.address) from e
            await asyncio.sleep(0.2)  # the receipt's batch has not closed yet

    async def _locate(self, job_id: str, network: str | None) -> tuple[Network, CoordinatorClient]:
        """The network and coordinator that know the job (NOT_FOUND elsewhere)."""
        missing: DispatchError | None = None
        for net in self._networks(network or ANY):
            client = self._client(net)
            try:  # the network's coordinators share their jobs: one answer is enough
                await client.get(job_id)
                return net, client
            except grpc.aio.AioRpcError as e:
                if e.code() not in UNREACHABLE and e.code() != grpc.StatusCode.NOT_FOUND:
                    raise from_rpc(e, client.address) from e
                missing = from_rpc(e, client.address)
        raise missing or InvalidRequest("no network is configured")

    @staticmethod
    async def _rpc(call: Awaitable[T], where: str) -> T:
        """Awaits a CoordinatorClient call, its gRPC error mapped to a DispatchError."""
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise from_rpc(e, where) from e

    # --- hosted fallback --------------------------------------------------------------------

    async def _hosted(
        self, spec: types.JobSpec, o: _Call, skipped: list[Skip]
    ) -> AsyncGenerator[str | ComputeResult, None]:
        """The job at the first hosted provider that answers; NoCapacity when no fallback
        applies."""
        why = "; ".join(f"{s.network or '-'}: {s.reason} ({s.detail})" for s in skipped)
        all_unreachable = all(s.reason == "coordinator_unavailable" for s in skipped)
        error = CoordinatorUnavailable if skipped and all_unreachable else NoCapacity
        if o.decentralized_only:
            raise error(f"the network did not serve the job (decentralized_only): {why}", skipped)
        if spec.verify > 1:
            raise error(
                f"the network did not serve the job, which asks for {spec.verify} independent "
                f"runs compared (verify): a hosted provider cannot give them: {why}",
                skipped,
            )
        work, value = betterproto.which_one_of(spec, "work")
        finish: Callable[[str], object] | None = None
        if work == "llm" and isinstance(value, types.LlmRequest):
            messages = [{"role": m.role, "content": m.content} for m in value.messages]
            if value.prompt:
                messages.append({"role": "user", "content": value.prompt})
            request = HostedRequest(
                messages,
                value.max_tokens or DEFAULT_MAX_TOKENS,
                value.temperature,
                o.hosted_model,
            )
            content_type = CHAT_CONTENT_TYPE
        elif work == "task" and isinstance(value, types.TaskRequest) and value.name in TEXT_TASKS:
            try:
                planned = await text_task(value.name, value.input)
            except TaskError as e:
                raise InvalidRequest(f"{value.name}: {e.message}") from e
            g = planned.generation
            request = HostedRequest(
                g.messages, g.max_tokens, g.temperature, o.hosted_model, g.json_schema
            )
            finish, content_type = planned.finish, "application/json"
        else:
            raise error(
                f"the network did not serve the job, which has no hosted form: {why}", skipped
            )
        if not self.hosted:
            raise error(
                f"the network did not serve the job; no hosted provider is set: {why}", skipped
            )
        failures: list[tuple[str, str]] = []
        for provider in self.hosted:
            async with contextlib.aclosing(
                self._at_provider(provider, request, finish, content_type, o, skipped, failures)
            ) as items:
                async for item in items:
                    yield item
                    if isinstance(item, ComputeResult):
                        return
        raise HostedError(
            "the network did not serve the job and every hosted provider failed: "
            + "; ".join(f"{p}: {m}" for p, m in failures),
            failures,
        )

    async def _at_provider(
        self,
        provider: HostedProvider,
        request: HostedRequest,
        finish: Callable[[str], object] | None,
        content_type: str,
        o: _Call,
        skipped: list[Skip],
        failures: list[tuple[str, str]],
    ) -> AsyncGenerator[str | ComputeResult, None]:
        """One provider's attempt: tokens and the result, or nothing (its failure is added
        to `failures`). A provider that fails after streaming a token raises."""
        name = provider.route
        model = provider.model_for(request)
        bound = self.prices.bound(model, request)
        limits = self.spending.limits
        limited = (
            limits.per_job_micros is not None
            or limits.per_session_micros is not None
            or o.max_price_micros is not None
        )
        if bound is None and limited:
            why = f"model {model!r} has no price in the price table; the spending limits need one"
            failures.append((name, why))
            return
        reservation = self.spending.reserve(bound or 0, o.max_price_micros, f"{name} {model}")
        streamed = False
        most_chars = hosted_chars_bound(request)
        try:  # (the reservation is released however this ends, unless it was kept)
            try:
                reply: HostedReply | str | None = None
                # each step within the call's own timeout (never across a yield: the
                # caller's code runs there)
                if o.streaming and finish is None:
                    received = 0
                    async with contextlib.aclosing(provider.stream(request)) as pieces:
                        while True:
                            try:
                                async with asyncio.timeout_at(o.deadline):
                                    piece = await anext(pieces)
                            except StopAsyncIteration:
                                break
                            if isinstance(piece, str):
                                received += len(piece)
                                if received > most_chars:
                                    raise _too_long(name, most_chars)
                                streamed = True
                                yield piece
                            else:
                                reply = piece
                else:
                    async with asyncio.timeout_at(o.deadline):
                        reply = await provider.complete(request)
                if not isinstance(reply, HostedReply):
                    raise HostedError(f"{name}: no reply", [(name, "no reply")])
                if len(reply.text) > most_chars:
                    raise _too_long(name, most_chars)
                output = reply.text.encode()
                if finish is not None:
                    try:
                        output = json.dumps(finish(reply.text), separators=(",", ":")).encode()
                    except TaskError as e:
                        raise HostedError(f"{name}: {e.message}", [(name, e.message)]) from e
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{name} did not answer within the call's timeout of {o.timeout:g}s"
                ) from None
            except DispatchError:  # HostedError included: already the SDK's own
                raise
            except Exception as e:  # an answer the provider's SDK could not read, or we
                what = f"malformed reply: {type(e).__name__}: {str(e)[:200]}"
                raise HostedError(f"{name}: {what}", [(name, what)]) from e
        except HostedError as e:
            if streamed:
                raise
            failures += e.failures or [(name, e.message)]
            return
        else:
            cost = self.prices.cost(reply.model, reply.prompt_tokens, reply.completion_tokens)
            if cost is None:
                cost = self.prices.cost(model, reply.prompt_tokens, reply.completion_tokens)
            if cost is not None and bound is not None:
                cost = min(cost, bound)  # usage past what was asked for is not believed
            reservation.keep(cost or 0)
        finally:
            reservation.release()  # (nothing after keep)
        yield ComputeResult(
            output=output.decode("utf-8", "replace"),
            route=name,
            price=Price(cost or 0, "USD", estimated=True),
            latency_ms=(time.monotonic() - o.started) * 1000,
            output_bytes=output,
            content_type=content_type,
            model=reply.model,
            usage=types.TokenUsage(reply.prompt_tokens, reply.completion_tokens),
            skipped=list(skipped),
        )


def _can_run(w: coordinator_pb2.WorkerInfo, pb: common_pb2.JobSpec) -> bool:
    """Whether a connected worker could ever run the job (the coordinator's matching rule
    without load and pairing)."""
    if w.draining:
        return False
    work = pb.WhichOneof("work")
    needs_llm = work == "llm" or (work == "task" and pb.task.use_llm)
    if needs_llm:
        model = pb.llm.model if work == "llm" else ""
        if w.kind != common_pb2.WORKER_KIND_DESKTOP or not w.llm_models:
            return False
        if model and model not in w.llm_models:
            return False
        if work == "llm":
            return True
    return pb.task.name in w.tasks


# A hosted answer may be at most this many characters per max_tokens token (and this many
# more): a token is a few characters; a provider sending more is not believed.
HOSTED_CHARS_PER_TOKEN = 64
HOSTED_CHARS_SLACK = 4096


def hosted_chars_bound(request: HostedRequest) -> int:
    return request.max_tokens * HOSTED_CHARS_PER_TOKEN + HOSTED_CHARS_SLACK


def _too_long(name: str, most: int) -> HostedError:
    what = f"the reply ran past {most} characters, more than max_tokens allows"
    return HostedError(f"{name}: {what}", [(name, what)])
