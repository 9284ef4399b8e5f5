"""Thin grpc.aio servicers: convert, call the domain, convert back. No logic here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dispatch.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    receipt_pb2,
    receipt_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from dispatchnet.api import convert
from dispatchnet.api.edge import caller, optional_caller
from dispatchnet.coordinator.earnings import EarningsService
from dispatchnet.coordinator.hub import (
    OUTBOX_HIGH,
    AcksDue,
    Offer,
    Outbound,
    WorkerHub,
    WorkerSession,
)
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import Failure, JobSpec
from dispatchnet.coordinator.pairing import PairingService
from dispatchnet.coordinator.receipts import ReceiptQueries
from dispatchnet.errors import DeadlineExceeded, DispatchError, InvalidArgument
from dispatchnet.loops import KeyedOrder
from dispatchnet.observability import logs
from dispatchnet.observability.tracing import JobTracing
from dispatchnet.payments.interceptor import current_payment, payment_stored
from dispatchnet.profiles import LimitsConfig, WorkersConfig
from dispatchnet.receipts.core import verify_receipt_message
from dispatchnet.receipts.notary import payment_to_proto

Ctx = grpc.aio.ServicerContext[Any, Any]

# A worker's messages about its jobs are handled side by side, each job's in order, at most
# this many unfinished per stream: the results of a worker with many slots are written to
# the store together instead of one write after another, and a flood from one worker waits
# for room (the stream is not read meanwhile).
STREAM_HANDLERS = 64
JOB_MESSAGES = frozenset({"offer_response", "progress", "completed", "failed"})


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self, jobs: JobService, hub: WorkerHub, limits: LimitsConfig, earnings: EarningsService
    ) -> None:
        self.jobs, self.hub, self.limits, self.earnings = jobs, hub, limits, earnings

    async def GetQuote(
        self, request: coordinator_pb2.GetQuoteRequest, context: Ctx
    ) -> coordinator_pb2.GetQuoteResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        spec, module = await self._spec(request.spec)
        who = optional_caller()
        q = await self.jobs.quote(spec, module, who.id if who is not None else "")
        return coordinator_pb2.GetQuoteResponse(
            quote=coordinator_pb2.Quote(
                quote_id=q.quote_id,
                spec=convert.spec_to_proto(spec),
                price=convert.money(q.price_micros, q.currency),
                expires_at=convert.ts(q.expires_at),
                spec_sha256=spec.spec_sha256,
                eligible_workers=self.hub.eligible_count(spec),
            )
        )

    async def _spec(self, pb: common_pb2.JobSpec) -> tuple[JobSpec, bytes | None]:
        """The request's spec, and the WebAssembly module it sends (one sent by hash is
        looked up first)."""
        ref = pb.task.wasm.sha256
        known = await self.jobs.stored_module(ref) if len(ref) == 32 else None
        return convert.spec_from_proto(pb, self.limits, lambda _sha: known)

    async def CommitJob(
        self, request: coordinator_pb2.CommitJobRequest, context: Ctx
    ) -> coordinator_pb2.CommitJobResponse:
        job, created = await self.jobs.commit(
            caller().id, request.quote_id, request.idempotency_key, current_payment()
        )
        return coordinator_pb2.CommitJobResponse(job=convert.job_to_proto(job), created=created)

    async def RunJob(
        self, request: coordinator_pb2.RunJobRequest, context: Ctx
    ) -> coordinator_pb2.RunJobResponse:
        who = caller().id
        self.jobs.watch_room(who)  # before a job is made that the call could not wait for
        what = request.WhichOneof("job")
        if what == "quote_id":
            job, created = await self.jobs.commit(
                who, request.quote_id, request.idempotency_key, current_payment()
            )
            payment_stored()  # not at the call's end: it waits for the job
        elif what == "spec":
            spec, module = await self._spec(request.spec)
            job, created = await self.jobs.run(who, spec, module, request.idempotency_key)
        else:
            raise InvalidArgument("spec or quote_id is required")
        final = await self.jobs.wait_final(who, job)
        return coordinator_pb2.RunJobResponse(job=convert.job_to_proto(final), created=created)

    async def GetJob(
        self, request: coordinator_pb2.GetJobRequest, context: Ctx
    ) -> coordinator_pb2.GetJobResponse:
        job = await self.jobs.get(caller().id, request.job_id)
        return coordinator_pb2.GetJobResponse(job=convert.job_to_proto(job))

    async def WatchJob(
        self, request: coordinator_pb2.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        who = caller().id
        # closed here when the call ends early (the client went away), not by the loop
        async with contextlib.aclosing(
            self.jobs.watch(who, request.job_id, request.after_sequence)
        ) as events:
            async for event, ended in events:
                # each event goes out at once (a live token is not held back for the next);
                # the final state's event, always the last, carries the job
                job = ended
                if event.final and job is None:
                    job = await self.jobs.get(who, request.job_id)
                yield coordinator_pb2.WatchJobResponse(
                    event=convert.event_to_proto(event),
                    job=convert.job_to_proto(job) if job is not None else None,
                )

    async def CancelJob(
        self, request: coordinator_pb2.CancelJobRequest, context: Ctx
    ) -> coordinator_pb2.CancelJobResponse:
        job = await self.jobs.cancel(caller().id, request.job_id, request.reason)
        return coordinator_pb2.CancelJobResponse(job=convert.job_to_proto(job))

    async def ListWorkers(
        self, request: coordinator_pb2.ListWorkersRequest, context: Ctx
    ) -> coordinator_pb2.ListWorkersResponse:
        kind = convert.worker_kind(request.kind)
        workers = sorted(self.hub.snapshot(kind), key=lambda x: x[0].connected_at)
        earned = await self.earnings.lifetime([s.worker_id for s, _ in workers])
        return coordinator_pb2.ListWorkersResponse(
            workers=[
                coordinator_pb2.WorkerInfo(
                    worker_id=s.worker_id,
                    kind=common_pb2.WorkerKind.ValueType(int(s.kind)),
                    tasks=sorted(s.tasks),
                    llm_models=sorted(s.llm_models),
                    max_concurrency=s.max_concurrency,
                    active_jobs=s.load,
                    reputation=score,
                    draining=s.draining,
                    connected_at=convert.ts(s.connected_at),
                    agent_id=s.agent_id,
                    lifetime_earnings=[convert.balance(b) for b in earned.get(s.worker_id, [])],
                )
                for s, score in workers
            ]
        )

    async def GetEarnings(
        self, request: coordinator_pb2.GetEarningsRequest, context: Ctx
    ) -> coordinator_pb2.GetEarningsResponse:
        page = await self.earnings.page(
            caller().id, request.worker_id, request.page_size, request.page_token
        )
        return convert.earnings_to_proto(page)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self, hub: WorkerHub, cfg: WorkersConfig, tracing: JobTracing | None = None
    ) -> None:
        """tracing: carries jobs' trace contexts in offers and results (None: off)."""
        self.hub, self.cfg, self.tracing = hub, cfg, tracing

    def _to_proto(self, out: Outbound) -> worker_pb2.ConnectResponse:
        if self.tracing is not None and isinstance(out, Offer):
            return convert.outbound_to_proto(out, self.tracing.offer_traceparent(out.job.job_id))
        return convert.outbound_to_proto(out)

    async def Connect(
        self, request_iterator: AsyncIterator[worker_pb2.ConnectRequest], context: Ctx
    ) -> AsyncIterator[worker_pb2.ConnectResponse]:
        it = aiter(request_iterator)
        deadline = asyncio.get_running_loop().time() + self.cfg.hello_timeout_seconds
        first = await self._handshake_message(it, deadline, "hello")
        if first is None or first.WhichOneof("msg") != "hello":
            raise InvalidArgument("the first message on Connect must be hello")
        hello = convert.hello_from_proto(first.hello)
        nonce = self.hub.new_challenge()
        yield worker_pb2.ConnectResponse(
            challenge=worker_pb2.Challenge(nonce=nonce, coordinator_public_key=self.hub.public_key)
        )
        second = await self._handshake_message(it, deadline, "challenge_response")
        if second is None or second.WhichOneof("msg") != "challenge_response":
            raise InvalidArgument("the second message on Connect must be challenge_response")
        proof = second.challenge_response
        convert.check_challenge_response(proof)
        self.hub.authenticate(hello.public_key, nonce, proof.signature)
        verified = await self.hub.verify_agent(
            hello, nonce, proof.chain_signature, proof.solana_signature
        )
        session = await self.hub.register(verified)
        logs.bind(worker_id=session.worker_id)  # this stream's task, and its reader's
        reader = asyncio.create_task(self._read(it, session))
        reason = "disconnected"
        try:
            yield worker_pb2.ConnectResponse(
                welcome=worker_pb2.Welcome(
                    worker_id=session.worker_id,
                    heartbeat_interval_seconds=session.heartbeat_interval,
                    eviction_seconds=int(session.eviction_seconds),
                    session_id=session.session_id,
                    agent_id=session.agent_id,
                )
            )
            while (out := await session.next_outbound()) is not None:
                if isinstance(out, AcksDue) and not session.acks:
                    continue  # a message before it took them
                msg = self._to_proto(out)
                if session.acks:  # they ride on whatever goes out (see WorkerSession.ack)
                    msg.acks.extend(convert.ack_to_proto(a) for a in session.take_acks())
                yield msg
            reason = "closed"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.hub.unregister_soon(session, reason)
        if reader.done() and not reader.cancelled() and reader.exception() is None:
            refused = reader.result()
            if refused is not None:
                raise refused  # the stream ends with its status (INVALID_ARGUMENT)

    async def _handshake_message(
        self, it: AsyncIterator[worker_pb2.ConnectRequest], deadline: float, what: str
    ) -> worker_pb2.ConnectRequest | None:
        """The next message (None at end of stream); DeadlineExceeded once the handshake
        has taken [workers] hello_timeout_seconds."""
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(it, None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no {what} within {self.cfg.hello_timeout_seconds:g}s of opening the stream "
                "([workers] hello_timeout_seconds)"
            ) from None

    async def _read(
        self, it: AsyncIterator[worker_pb2.ConnectRequest], s: WorkerSession
    ) -> DispatchError | None:
        """Handles the worker's messages. A message beyond the protocol's limits stops the
        reading and is returned (the stream then ends with its status, INVALID_ARGUMENT,
        and no GoAway); a message whose handling fails goes to hub.message_failed."""
        jobs = KeyedOrder(STREAM_HANDLERS)
        try:
            async for msg in it:
                if s.backlog >= OUTBOX_HIGH:
                    await s.room()  # the worker reads what it was sent first
                kind = msg.WhichOneof("msg")
                try:
                    convert.check_worker_message(msg)
                except DispatchError as e:
                    s.end()
                    return e
                about = getattr(msg, kind) if kind else None
                job_id = str(getattr(about, "job_id", ""))
                token = logs.bind(job_id=job_id)
                try:
                    handler = functools.partial(self._handle_logged, s, kind, msg, job_id)
                    if kind in JOB_MESSAGES:  # each job's in order, different jobs' together
                        await jobs.submit(job_id, handler)
                    else:
                        await handler()
                finally:
                    logs.reset(token)
                if s.closed:
                    return None
        finally:
            await jobs.finish()  # what the worker sent before it went is handled
            s.close("stream closed by the worker")
        return None

    async def _handle_logged(
        self, s: WorkerSession, kind: str | None, msg: worker_pb2.ConnectRequest, job_id: str
    ) -> None:
        try:
            await self._handle(s, kind, msg)
        except Exception as e:
            attempt = int(getattr(getattr(msg, kind), "attempt", 0)) if kind else 0
            await self.hub.message_failed(s, kind or "unset", job_id, attempt, e)

    async def _handle(
        self, s: WorkerSession, kind: str | None, msg: worker_pb2.ConnectRequest
    ) -> None:
        if kind == "heartbeat":
            await self.hub.heartbeat(s, list(msg.heartbeat.running_job_ids))
        elif kind == "offer_response":
            r = msg.offer_response
            await self.hub.offer_response(s, r.job_id, r.attempt, r.accept, r.reason)
        elif kind == "progress":
            p = msg.progress
            await self.hub.progress(s, p.job_id, p.attempt, p.text, p.fraction)
        elif kind == "completed":
            c = msg.completed
            if self.tracing is not None:
                self.tracing.worker_result(c.job_id, c.traceparent)
            await self.hub.completed(
                s,
                c.job_id,
                c.attempt,
                convert.result_from_proto(c.result),
                c.receipt_body,
                c.receipt_signature,
            )
        elif kind == "failed":
            f = msg.failed
            if self.tracing is not None:
                self.tracing.worker_result(f.job_id, f.traceparent)
            await self.hub.failed(
                s,
                f.job_id,
                f.attempt,
                Failure(f.failure.code or "worker_failure", f.failure.message),
                f.retryable,
            )
        elif kind == "drain":
            self.hub.drain(s)
        else:
            s.close(f"unexpected message {kind!r} after the handshake")


class ReceiptServicer(receipt_pb2_grpc.ReceiptServiceServicer):
    def __init__(self, receipts: ReceiptQueries, coordinator_public_key: bytes) -> None:
        self.receipts = receipts
        self.public_key = coordinator_public_key  # VerifyReceipt's key unless one is named

    async def GetReceipt(
        self, request: receipt_pb2.GetReceiptRequest, context: Ctx
    ) -> receipt_pb2.GetReceiptResponse:
        r, payment = await self.receipts.get_with_payment(caller().id, request.job_id)
        msg = convert.receipt_to_proto(r)
        decoded = receipt_pb2.ReceiptBody()
        decoded.ParseFromString(r.body)
        return receipt_pb2.GetReceiptResponse(
            receipt=msg, decoded=decoded, payment=payment_to_proto(payment)
        )

    async def VerifyReceipt(
        self, request: receipt_pb2.VerifyReceiptRequest, context: Ctx
    ) -> receipt_pb2.VerifyReceiptResponse:
        # countersigned by this coordinator, unless the caller names another's key: a
        # receipt signed by a key of the caller's own making is not valid here
        expected = request.expected_coordinator_public_key or self.public_key
        if len(expected) != 32:
            raise InvalidArgument(
                f"expected_coordinator_public_key is {len(expected)} bytes; an ed25519 "
                "public key is 32"
            )
        v = verify_receipt_message(request.receipt, expected)
        resp = receipt_pb2.VerifyReceiptResponse(valid=v.valid, problems=v.problems)
        if v.body is not None:
            resp.decoded.CopyFrom(v.body)
        return resp

    async def GetReceiptProof(
        self, request: receipt_pb2.GetReceiptProofRequest, context: Ctx
    ) -> receipt_pb2.GetReceiptProofResponse:
        p = await self.receipts.proof(caller().id, request.job_id)
        return receipt_pb2.GetReceiptProofResponse(
            receipt_sha256=p.receipt_sha256,
            leaf_index=p.leaf_index,
            leaf_count=p.leaf_count,
            proof=p.proof,
            merkle_root=p.root,
            batch_id=p.batch_id,
            anchor_transaction=p.anchor_transaction,
            anchor_network=p.anchor_network,
        )


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self, pairing: PairingService) -> None:
        self.pairing = pairing

    async def CreatePairingCode(
        self, request: trust_pb2.CreatePairingCodeRequest, context: Ctx
    ) -> trust_pb2.CreatePairingCodeResponse:
        code, expires = await self.pairing.create_code(caller().id, request.ttl_seconds)
        return trust_pb2.CreatePairingCodeResponse(code=code, expires_at=convert.ts(expires))

    async def ClaimPairing(
        self, request: trust_pb2.ClaimPairingRequest, context: Ctx
    ) -> trust_pb2.ClaimPairingResponse:
        p = await self.pairing.claim(caller().id, request.code)
        return trust_pb2.ClaimPairingResponse(pairing=convert.pairing_to_proto(p))

    async def ListPairings(
        self, request: trust_pb2.ListPairingsRequest, context: Ctx
    ) -> trust_pb2.ListPairingsResponse:
        ps = await self.pairing.list(caller().id, request.include_revoked)
        return trust_pb2.ListPairingsResponse(pairings=[convert.pairing_to_proto(p) for p in ps])

    async def RevokePairing(
        self, request: trust_pb2.RevokePairingRequest, context: Ctx
    ) -> trust_pb2.RevokePairingResponse:
        p = await self.pairing.revoke(caller().id, request.pairing_id)
        return trust_pb2.RevokePairingResponse(pairing=convert.pairing_to_proto(p))
