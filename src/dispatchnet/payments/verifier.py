"""Payment verification in child processes (`[payments] verify_processes`).

Verifying an x402 payment is CPU work (EIP-712 hashing, signature recovery, ABI encoding
and JSON-RPC round trips through web3 and the x402 SDK) that holds the interpreter lock,
so in the coordinator's process it competes with the event loop and the store's threads.
With `verify_processes = N` (N > 0) the coordinator starts N child processes, each
building the same payment gateway from the profile, and a CommitJob's verification runs
in one of them: the coordinator's thread only waits for the answer. Nothing else moves:
parsing, the replay check, settlement and refunds stay in the coordinator. A child that
dies is replaced (the CommitJob it was verifying answers UNAVAILABLE, the client retries);
when the coordinator dies its children see their pipe close and exit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import threading
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from dispatchnet.coordinator.models import Payment
from dispatchnet.errors import InvalidArgument, PaymentRequired, Unavailable
from dispatchnet.payments.service import PaymentGateway, WrappingGateway
from dispatchnet.profiles import Profile

log = logging.getLogger(__name__)

# How long a CommitJob waits for a child's answer before it is UNAVAILABLE (a verification
# is a few chain calls, each bounded by the profile's RPC timeout).
VERIFY_TIMEOUT_SECONDS = 60.0

_gateway: Any = None  # the child's gateway (built by _start_child)


def _start_child(profile: Profile, data_dir: str) -> None:
    global _gateway
    from dispatchnet.payments.x402 import gateway_for

    logging.basicConfig(level=logging.WARNING)
    _gateway = gateway_for(profile, Path(data_dir))


def _ready() -> bool:
    return _gateway is not None


def _verify(payment: Payment) -> tuple[str, str, str]:
    """In a child: ("ok", "", ""), or the refusal as (kind, message, reason); exceptions
    travel as plain tuples (the error classes carry keyword fields pickling would lose)."""
    try:
        _gateway.verify(payment)
    except PaymentRequired as e:
        return "refused", e.message, e.reason
    except InvalidArgument as e:
        return "invalid", e.message, ""
    except Unavailable as e:
        return "unavailable", e.message, ""
    return "ok", "", ""


class ProcessVerifyingGateway(WrappingGateway):
    """A PaymentGateway whose verify() runs in child processes; everything else is
    `inner`'s. verify() blocks its (worker) thread until a child answers."""

    def __init__(
        self, inner: PaymentGateway, profile: Profile, data_dir: Path, processes: int
    ) -> None:
        if processes < 1:
            raise ValueError("verify_processes must be at least 1 to verify in processes")
        super().__init__(inner)
        self.profile = profile
        self.data_dir = data_dir
        self.processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.inner.describe()}; verified in {self.processes} process(es)"

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self.processes,
                    # not fork: the coordinator has threads (gRPC, the store's)
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_child,
                    initargs=(self.profile, str(self.data_dir)),
                )
            return self._pool

    def start(self) -> None:
        """Starts the children now (each imports web3 and the x402 SDK: a second or two),
        so the first paid CommitJob does not wait for that."""
        pool = self._executor()
        for _ in range(self.processes):
            pool.submit(_ready)

    def verify(self, payment: Payment) -> None:
        pool = self._executor()
        try:
            kind, message, reason = pool.submit(_verify, payment).result(VERIFY_TIMEOUT_SECONDS)
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("a payment verifier process died; starting new ones")
            raise Unavailable("the payment verifier restarted; retry the CommitJob") from None
        except concurrent.futures.TimeoutError:
            raise Unavailable("payment verification took too long; retry the CommitJob") from None
        if kind == "refused":
            raise PaymentRequired(message, reason=reason)
        if kind == "invalid":
            raise InvalidArgument(message)
        if kind == "unavailable":
            raise Unavailable(message)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.inner.close()
