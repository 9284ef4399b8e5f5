"""Assembles a coordinator: store, domain services, servicers, interceptors, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dispatch.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    receipt_pb2,
    receipt_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from dispatchnet import keys
from dispatchnet.agent_identity import IdentityVerifier
from dispatchnet.api import reflection
from dispatchnet.api.convert import WASM_TASK
from dispatchnet.api.edge import EdgeInterceptor
from dispatchnet.api.servicers import (
    CoordinatorServicer,
    ReceiptServicer,
    TrustServicer,
    WorkerServicer,
)
from dispatchnet.chains import registry
from dispatchnet.coordinator.catalogue import TaskCatalogue
from dispatchnet.coordinator.earnings import EarningsService
from dispatchnet.coordinator.hub import WorkerHub
from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.pairing import PairingService
from dispatchnet.coordinator.payouts import PayoutService
from dispatchnet.coordinator.ports import ReputationSource
from dispatchnet.coordinator.receipts import ReceiptQueries
from dispatchnet.errors import Unavailable
from dispatchnet.memory import MemoryTrimmer
from dispatchnet.observability import logs, tracing
from dispatchnet.observability.runtime import Observability
from dispatchnet.observability.sampler import Outboxes
from dispatchnet.payments.interceptor import PaymentInterceptor
from dispatchnet.payments.service import PaymentGateway, PaymentService
from dispatchnet.profiles import Profile
from dispatchnet.protocol import HTTP2_CHANNEL_OPTIONS
from dispatchnet.receipts.anchoring import anchorer_for
from dispatchnet.receipts.batcher import ReceiptBatcher
from dispatchnet.receipts.notary import Notary
from dispatchnet.reputation.feedback import FeedbackSender, feedback_sender_for
from dispatchnet.reputation.local import LocalReputation
from dispatchnet.store import registry as stores
from dispatchnet.store.base import Store
from dispatchnet.worker.tasks import TASK_NAMES

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("dispatch.coordinator")

SERVICE_NAMES = (
    coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    receipt_pb2.DESCRIPTOR.services_by_name["ReceiptService"].full_name,
    trust_pb2.DESCRIPTOR.services_by_name["TrustService"].full_name,
)


@dataclass
class Coordinator:
    """A running coordinator; `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    store: Store
    jobs: JobService
    hub: WorkerHub
    health: health.aio.HealthServicer
    public_key: bytes
    batcher: ReceiptBatcher | None = None
    anchoring: str = ""  # how receipt roots are anchored, for people
    feedback: FeedbackSender | None = None
    payments: PaymentService | None = None
    trimmer: MemoryTrimmer | None = None
    # one per network CommitJob accepts payments on whose chain can pay workers
    payouts: list[PayoutService] = field(default_factory=list)
    observability: Observability | None = None  # metrics, traces, the dashboard

    @property
    def metrics_url(self) -> str:
        return self.observability.metrics_url if self.observability is not None else ""

    @property
    def dashboard_url(self) -> str:
        """The dashboard's address, without its token ("" when it is off)."""
        return self.observability.dashboard_url if self.observability is not None else ""

    async def stop(self, grace: float = 1.0) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.observability is not None:
            await self.observability.stop()
        await self.hub.stop()
        await self.server.stop(grace)
        await self.hub.drain_tasks()
        await self.jobs.drain()
        await self.jobs.flush_progress()  # a clean stop loses no progress text
        if self.trimmer is not None:
            self.trimmer.close()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.feedback is not None:
            await self.feedback.stop()
        if self.payments is not None:
            await self.payments.stop()
        for payouts in self.payouts:
            await payouts.stop()
        stop_reputation = getattr(self.jobs.reputation, "stop", None)
        if stop_reputation is not None:
            await stop_reputation()
        await self.store.close()


def identity_verifier_for(profile: Profile) -> IdentityVerifier | None:
    """The on-chain check of workers' agent ids, from the [chain] kind's adapter; None when
    the chain has no identity registry (agent ids are then ignored)."""
    return registry.adapter_of(profile).identity_verifier(profile)


async def start_coordinator(
    profile: Profile,
    data_dir: Path,
    listen: str,
    tracer_provider: TracerProvider | None = None,
) -> Coordinator:
    """tracer_provider: where traces go (default: the process's, from the OTEL_* variables;
    see observability/tracing.py); None and no process provider: no tracing."""
    data_dir.mkdir(parents=True, exist_ok=True)
    logs.quiet_peer_gone()
    if tracer_provider is None:
        tracer_provider = tracing.process_provider()
    observability = Observability(profile, data_dir, tracer_provider)
    identity_network = (registry.identity_profile(profile) or profile).chain.network
    try:
        anchorer = anchorer_for(profile.receipts.anchor, profile.chain, data_dir)
    except ValueError as e:
        raise ValueError(f"profile {profile.name}: {e}") from e
    describe = getattr(anchorer, "describe", None)
    anchoring = describe() if callable(describe) else profile.receipts.anchor
    if anchorer.enabled:
        log.info("receipt roots are anchored with %s", anchoring)
    elif profile.receipts.anchor != "none":
        log.warning("receipt anchoring is off: %s", anchoring)
    key = keys.load_or_create(data_dir / "coordinator.key")
    store = await stores.open_store(profile, data_dir)
    sessions: dict[str, Any] = {}  # the hub's, once it exists

    def agent_of(worker_id: str) -> str:
        """A connected worker's agent id (its session's), "" for none."""
        session = sessions.get(worker_id)
        return str(session.agent_id) if session is not None else ""

    try:
        reputation = reputation_for(profile, data_dir, store, agent_of, observability)
        feedback = feedback_sender_for(profile, data_dir, store)
    except ValueError as e:
        await store.close()
        raise ValueError(f"profile {profile.name}: {e}") from e
    catalogue = TaskCatalogue(store, [*TASK_NAMES, WASM_TASK])
    jobs = JobService(
        store,
        profile.jobs,
        profile.pricing,
        Notary(key, profile.receipts.max_clock_skew_seconds),
        reputation,
        catalogue=catalogue,
        quotes=profile.quotes,
        coordinator_id=instance_id(data_dir),
        verification=profile.verification,
    )
    try:
        identity = observability.chain_role(
            identity_verifier_for(profile), identity_network, "identity"
        )
    except ValueError as e:
        await store.close()
        raise ValueError(f"profile {profile.name}: {e}") from e
    hub = WorkerHub(
        jobs,
        store,
        reputation,
        key.public_key,
        profile.workers,
        profile.jobs,
        identity=identity,
        require_registration=profile.identity.require_registration,
        catalogue=catalogue,
    )
    sessions = hub.sessions
    batcher = ReceiptBatcher(store, profile.receipts, anchorer)
    jobs.observer = hub.observer = observability.observer
    batcher.observe(observability.observer, profile.chain.network)
    jobs.completion_listeners.append(batcher)
    if feedback is not None:
        jobs.feedback_uri_base = f"dispatch://{key.public_hex}"
        jobs.agent_of = agent_of
        jobs.completion_listeners.append(feedback)
    try:
        payments = payment_service_for(profile, data_dir, store, jobs, observability)
        payouts = payout_services_for(profile, data_dir, store)
    except ValueError as e:
        await store.close()
        raise ValueError(f"profile {profile.name}: {e}") from e
    if feedback is not None:
        feedback.observer, feedback.chain = observability.observer, identity_network
    for loop in [*payouts, *([payments] if payments is not None else [])]:
        loop.observer = observability.observer
    for loop in [
        *payouts,
        *([payments] if payments is not None else []),
        *([feedback] if feedback is not None else []),
        batcher.anchoring,
    ]:
        loop.locks = store  # each pass once across the coordinators sharing the store
    held = await jobs.recover()
    await store.listen_jobs(jobs.job_changed_elsewhere)  # other coordinators' changes
    if held:
        log.info(
            "%d job(s) held by workers before the restart wait %gs for their worker",
            held,
            profile.jobs.restart_grace_seconds,
        )

    opts = [
        ("grpc.max_receive_message_length", profile.server.max_message_bytes),
        ("grpc.max_send_message_length", profile.server.max_message_bytes),
        ("grpc.keepalive_time_ms", profile.server.keepalive_seconds * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.so_reuseport", 0),
        *HTTP2_CHANNEL_OPTIONS,  # a fixed flow-control window: no probing pings per job
        # calls waiting for the event loop to take them (a wave of connecting workers)
        ("grpc.server.max_pending_requests", profile.server.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", profile.server.max_pending_calls),
    ]
    trimmer = MemoryTrimmer()
    interceptors: list[Any] = [
        *([tracing.server_interceptor(tracer_provider)] if tracer_provider is not None else []),
        EdgeInterceptor(profile.auth.max_token_ttl_seconds, trimmer=trimmer),
    ]
    if payments is not None:
        interceptors.append(PaymentInterceptor(payments))
    server = grpc.aio.server(interceptors=interceptors, options=opts)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(
            jobs, hub, profile.limits, EarningsService(store, profile.payouts.fee_bps)
        ),
        server,
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(
        WorkerServicer(hub, profile.workers, observability.tracing), server
    )
    receipt_pb2_grpc.add_ReceiptServiceServicer_to_server(
        ReceiptServicer(ReceiptQueries(jobs), key.public_key), server
    )
    trust_pb2_grpc.add_TrustServiceServicer_to_server(
        TrustServicer(PairingService(store, profile.pairing)), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
    )
    try:
        port = _bind(server, listen)
        await server.start()
        await observability.start(
            store,
            hub,
            Outboxes(
                settlement=tuple(a.network for a in profile.payments.accept)
                if payments is not None
                else (),
                feedback=identity_network if feedback is not None else None,
                anchoring=profile.chain.network if anchorer.enabled else None,
                payouts=tuple(p.network for p in payouts),
            ),
            {
                "profile": profile.name,
                "coordinator_public_key": key.public_hex,
                "listening": f"{listen.rsplit(':', 1)[0]}:{port}",
                "anchoring": str(anchoring),
            },
        )
    except BaseException:
        await server.stop(None)
        if payments is not None:  # e.g. its verifier processes
            await asyncio.to_thread(payments.gateway.close)
        await store.close()
        raise
    hub.start()
    batcher.start()
    if feedback is not None:
        feedback.start()
    if payments is not None:
        payments.start()
    for service in payouts:
        service.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "coordinator %s… listening on port %d (profile %s)", key.public_hex[:12], port, profile.name
    )
    return Coordinator(
        server,
        port,
        store,
        jobs,
        hub,
        health_servicer,
        key.public_key,
        batcher,
        str(anchoring),
        feedback,
        payments,
        trimmer,
        payouts,
        observability if observability.enabled else None,
    )


def _bind(server: grpc.aio.Server, listen: str) -> int:
    """Binds server to listen (HOST:PORT); its port. Unavailable when the address is taken
    or not this machine's (gRPC raises RuntimeError "Failed to bind" or returns 0)."""
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise Unavailable(
            f"cannot listen on {listen}: the port is in use (another coordinator?) or the "
            "host is not an address of this machine; pick another with --listen HOST:PORT"
        )
    return port


def payment_service_for(
    profile: Profile,
    data_dir: Path,
    store: Store,
    jobs: JobService,
    observability: Observability | None = None,
) -> PaymentService | None:
    """x402 payments for CommitJob ([payments] enabled), None when they are off."""
    if not profile.payments.enabled:
        return None
    # imported only by profiles that take payments (x402 and web3 are heavy)
    from dispatchnet.payments.x402 import gateway_for

    gateway: PaymentGateway | None = gateway_for(profile, data_dir)
    assert gateway is not None
    log.info("CommitJob takes x402 payments on %s", gateway.describe())
    if profile.payments.verify_processes:
        from dispatchnet.payments.verifier import ProcessVerifyingGateway

        verifying = ProcessVerifyingGateway(
            gateway, profile, data_dir, profile.payments.verify_processes
        )
        verifying.start()
        gateway = verifying
    observed = observability.gateway(gateway) if observability is not None else gateway
    return PaymentService(
        store, jobs, observed, profile.payments, profile.jobs, payouts=profile.payouts
    )


def instance_id(data_dir: Path) -> str:
    """This coordinator's instance id, kept in <data dir>/coordinator.id (made at first
    start): the jobs its workers hold carry it, so that each of several coordinators on
    one store recovers only its own at a restart."""
    path = data_dir / "coordinator.id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if not text:
        text = secrets.token_hex(8)
        path.write_text(text + "\n")
    return text


def payout_services_for(profile: Profile, data_dir: Path, store: Store) -> list[PayoutService]:
    """Worker payouts (README "Workers earn"), with payments: one PayoutService per network
    CommitJob accepts payments on ([chain], and the [identity_chain] when it takes some),
    each paying from that chain's account through its adapter; none without payments."""
    if not profile.payments.enabled:
        return []
    from dispatchnet.chains.deployments import ChainConfigError

    services = []
    for on in registry.payment_profiles(profile):
        adapter = registry.adapter_of(on)
        try:
            sender = adapter.payouts(on, data_dir)
        except ChainConfigError as e:  # e.g. an EVM chain with no BatchSettler: payments work
            log.warning("workers' balances on %s accrue but are not paid out: %s",
                        on.chain.network, e)  # fmt: skip
            continue
        services.append(
            PayoutService(
                store,
                sender,
                adapter.payout_addresses(on, data_dir),
                on.chain.network,
                profile.payouts,
                tick_seconds=min(1.0, profile.payouts.interval_seconds),
            )
        )
    return services


def reputation_for(
    profile: Profile,
    data_dir: Path,
    store: Store,
    agent_of: Callable[[str], str],
    observability: Observability | None = None,
) -> ReputationSource:
    """The reputation source the profile's [reputation] source names."""
    r = profile.reputation
    if r.source == "local":
        return LocalReputation(store, r.score_params())
    if r.source == "erc8004":
        from dispatchnet.coordinator.jobs import FEEDBACK_TAG1
        from dispatchnet.reputation.erc8004 import Erc8004Reputation

        reader = registry.adapter_of(profile).summary_reader(
            profile, data_dir, r.trusted_reviewers, FEEDBACK_TAG1
        )
        if observability is not None:
            network = (registry.identity_profile(profile) or profile).chain.network
            reader = observability.chain_role(reader, network, "reputation")
        return Erc8004Reputation(
            reader,
            agent_of,
            params=r.score_params(),
            from_block=r.from_block,
            ttl_seconds=r.cache_ttl_seconds,
        )
    raise ValueError(f"unknown reputation source {r.source!r}")
