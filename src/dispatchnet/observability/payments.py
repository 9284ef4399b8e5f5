"""The edges to chains, observed: the x402 gateway (verify and settle timed, failures
counted by reason, each a span of its job's trace) and any chain role whose calls may fail
with Unavailable (counted per chain). The domain sees the same protocols as before.

These calls run in worker threads (asyncio.to_thread), verify_async on the event loop:
prometheus-client is thread-safe, and a span started here joins the caller's trace
(to_thread copies the context).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Iterator
from typing import Any, TypeVar, cast

from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.observability.metrics import CoordinatorMetrics, chain_label
from dispatchnet.observability.tracing import JobTracing
from dispatchnet.payments.service import PaymentGateway, SettlementRefused, WrappingGateway

T = TypeVar("T")


class ObservedGateway(WrappingGateway):
    """A PaymentGateway that times and counts verify and settle_batch."""

    def __init__(
        self,
        inner: PaymentGateway,
        metrics: CoordinatorMetrics | None,
        tracing: JobTracing | None = None,
    ) -> None:
        super().__init__(inner)
        self.metrics = metrics
        self.tracing = tracing

    def verify(self, payment: Payment) -> None:
        with self._verifying(payment):
            self.inner.verify(payment)

    async def verify_async(self, payment: Payment) -> None:
        with self._verifying(payment):
            await self.inner.verify_async(payment)

    @contextlib.contextmanager
    def _verifying(self, payment: Payment) -> Iterator[None]:
        start = time.perf_counter()
        failure: str | None = None
        span = self.tracing.verify_span(payment) if self.tracing is not None else None
        try:
            yield
        except PaymentRequired as e:
            failure = e.reason or "refused"
            raise
        except InvalidArgument:
            failure = "invalid_argument"
            raise
        except Unavailable:
            failure = "unavailable"
            if self.metrics is not None:
                self.metrics.chain_errors(chain_label(payment.network), "verify").inc()
            raise
        except BaseException:
            failure = "error"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.verified(time.perf_counter() - start, failure)
            if span is not None:
                span.end_with(failure)

    def settle_batch(self, payments: list[Payment]) -> dict[str, str | SettlementRefused]:
        start_ns, start = time.time_ns(), time.perf_counter()
        outcome: dict[str, str | SettlementRefused] = {}
        try:
            outcome = self.inner.settle_batch(payments)
            return outcome
        except Unavailable as e:
            outcome = {p.job_id: SettlementRefused("unavailable", e.message) for p in payments}
            if self.metrics is not None and payments:
                self.metrics.chain_errors(chain_label(payments[0].network), "settlement").inc()
            raise
        except BaseException as e:
            outcome = {p.job_id: SettlementRefused("error", str(e)) for p in payments}
            raise
        finally:
            if self.metrics is not None:
                failures = [r.reason for r in outcome.values() if isinstance(r, SettlementRefused)]
                self.metrics.settled(time.perf_counter() - start, failures)
            if self.tracing is not None:
                self.tracing.settle_spans(payments, outcome, start_ns, time.time_ns())


def count_chain_errors(role: T, chain: str, source: str, metrics: CoordinatorMetrics) -> T:
    """role with each of its public methods (plain or async) counting the Unavailable it
    raises as an error of `chain` made by `source` (anchoring, feedback, payouts, identity,
    reputation); every other attribute is role's own."""
    return cast(T, _Counting(role, chain_label(chain), source, metrics))


class _Counting:
    def __init__(self, inner: Any, chain: str, source: str, metrics: CoordinatorMetrics) -> None:
        self._inner = inner
        self._count = metrics.chain_errors(chain, source).inc

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name.startswith("_") or not callable(value):
            return value
        count = self._count
        if inspect.iscoroutinefunction(value):

            @functools.wraps(value)
            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await value(*args, **kwargs)
                except Unavailable:
                    count()
                    raise

            return counted_async

        @functools.wraps(value)
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except Unavailable:
                count()
                raise

        return counted

    def __repr__(self) -> str:
        return repr(self._inner)
