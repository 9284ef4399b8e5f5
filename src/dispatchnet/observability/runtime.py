"""Observability: a coordinator's metrics, traces and dashboard, assembled from its profile
(`[observability]`) and tracer provider, started after the gRPC server and stopped before
the store closes. server.py hands its observer to the domain services and lets it wrap
the chain-facing roles."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dispatchnet
from dispatchnet.coordinator.observer import NULL_OBSERVER, Observer
from dispatchnet.observability.metrics import CoordinatorMetrics, MetricsServer
from dispatchnet.observability.observer import Observers
from dispatchnet.observability.payments import ObservedGateway, count_chain_errors
from dispatchnet.observability.sampler import Outboxes, Sampler
from dispatchnet.observability.tracing import JobTracing
from dispatchnet.payments.service import PaymentGateway
from dispatchnet.profiles import Profile
from dispatchnet.store.base import Store

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from dispatchnet.coordinator.hub import WorkerHub
    from dispatchnet.observability.dashboard import Dashboard
    from dispatchnet.observability.feed import Feed

log = logging.getLogger("dispatch.observability")

T = TypeVar("T")


class Observability:
    def __init__(
        self,
        profile: Profile,
        data_dir: Path,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        cfg = self.cfg = profile.observability
        self.profile = profile
        self.data_dir = data_dir
        self.metrics = (
            CoordinatorMetrics(profile.name, dispatchnet.__version__)
            if cfg.metrics_listen
            else None
        )
        self.tracing = JobTracing(tracer_provider) if tracer_provider is not None else None
        self.feed: Feed | None = None
        if cfg.dashboard_listen:
            from dispatchnet.observability.feed import Feed

            self.feed = Feed(cfg.explorer_tx_urls)
        parts: list[Observer] = [p for p in (self.metrics, self.tracing, self.feed) if p]
        self.observer: Observer = Observers(parts) if parts else NULL_OBSERVER
        self.sampler: Sampler | None = None
        self.metrics_server: MetricsServer | None = None
        self.dashboard: Dashboard | None = None

    @property
    def enabled(self) -> bool:
        return self.observer is not NULL_OBSERVER

    # --- wrapping the chain-facing roles -------------------------------------------------

    def gateway(self, gateway: PaymentGateway) -> PaymentGateway:
        if self.metrics is None and self.tracing is None:
            return gateway
        return ObservedGateway(gateway, self.metrics, self.tracing)

    def chain_role(self, role: T, chain: str, source: str) -> T:
        """role with its Unavailable errors counted for `chain` (identity, reputation)."""
        if self.metrics is None or role is None:
            return role
        return count_chain_errors(role, chain, source, self.metrics)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(
        self, store: Store, hub: WorkerHub, outboxes: Outboxes, describe: dict[str, Any]
    ) -> None:
        """Starts the sampler and the HTTP endpoints; undoes itself when one fails.
        describe: what the dashboard says about the coordinator (profile, key, ...)."""
        if self.metrics is None and self.feed is None:
            return
        try:
            workers = None
            if self.feed is not None:

                def workers(n: int) -> list[str]:
                    return [s.worker_id for s in itertools.islice(hub.sessions.values(), n)]

            self.sampler = Sampler(store, outboxes, self.cfg.sample_seconds, self.metrics, workers)
            if self.metrics is not None:
                self.metrics_server = MetricsServer(self.metrics.registry)
                await self.metrics_server.start(self.cfg.metrics_listen)
                log.info("Prometheus metrics on %s", self.metrics_server.url)
            if self.feed is not None:
                from dispatchnet.observability.dashboard import Dashboard

                self.sampler.listeners.append(self.feed.sampled)
                self.feed.wants_sample = self.sampler.kick
                self.dashboard = Dashboard(self.feed, hub, self.data_dir, describe)
                await self.dashboard.start(self.cfg.dashboard_listen)
                log.info("operator dashboard on %s (token in %s)", self.dashboard.url,
                         self.dashboard.token_file)  # fmt: skip
            self.sampler.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Idempotent."""
        if self.dashboard is not None:
            await self.dashboard.stop()
            self.dashboard = None
        if self.sampler is not None:
            await self.sampler.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None

    @property
    def metrics_url(self) -> str:
        return self.metrics_server.url if self.metrics_server is not None else ""

    @property
    def dashboard_url(self) -> str:
        return self.dashboard.url if self.dashboard is not None else ""
