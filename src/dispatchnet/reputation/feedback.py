"""FeedbackSender: sends the feedback outbox to the chain's ReputationRegistry.

Entries are written by JobService in the same transaction as a job's final transition
(store.transition(..., feedback=...)), so a finished job cannot lose its feedback. This
background loop sends PENDING entries oldest first with the poster (chains/evm.py
EvmFeedbackPoster: giveFeedback in a worker thread through the account's shared sender).
Chain trouble (Unavailable, or no answer within send_timeout) leaves the entry PENDING with
the error noted and pauses with exponential backoff; jobs never wait for it. A revert
(FeedbackRejected, e.g. self-feedback) marks the entry FAILED with the reason: it is kept,
not retried. A sent entry is SENT with its transaction hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dispatchnet.coordinator.models import FeedbackEntry, FeedbackStatus, Job
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import Profile
from dispatchnet.store.base import Store

log = logging.getLogger("dispatch.feedback")

PAGE = 100


class FeedbackPoster(Protocol):
    async def give(self, entry: FeedbackEntry) -> str:
        """Posts the entry; its transaction hash. Unavailable: try again later; any
        exception a rejection (rejected_by says which)."""
        ...


class FeedbackSender:
    def __init__(
        self,
        store: Store,
        poster: FeedbackPoster,
        rejected: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
        send_timeout_seconds: float = 120.0,
    ) -> None:
        self.store = store
        self.poster = poster
        self.rejected = rejected
        self.clock = clock
        self.tick = tick_seconds
        self.retry_initial = retry_initial_seconds
        self.retry_max = retry_max_seconds
        self.send_timeout = send_timeout_seconds
        self._failures = 0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error = ""

    def job_completed(self, job: Job) -> None:
        """CompletionListener: an entry may be waiting."""
        self._wake.set()

    def kick(self) -> None:
        self._wake.set()

    async def send_due(self) -> int:
        """Sends pending entries, oldest first, unless backing off; how many were sent.
        Stops at the first chain trouble."""
        if self.clock() < self._retry_at:
            return 0
        sent = 0
        for entry in self.store.feedback_entries((FeedbackStatus.PENDING,), limit=PAGE):
            try:
                async with asyncio.timeout(self.send_timeout):
                    tx = await self.poster.give(entry)
            except (Unavailable, TimeoutError) as e:
                self.last_error = e.message if isinstance(e, Unavailable) else "no answer in time"
                self._failures += 1
                delay = min(self.retry_max, self.retry_initial * 2 ** (self._failures - 1))
                self._retry_at = self.clock() + delay
                log.warning(
                    "feedback for job %s not sent (%s); retrying in %.1fs",
                    entry.job_id,
                    self.last_error,
                    delay,
                )
                break
            except self.rejected as e:
                log.warning("feedback for job %s rejected: %s", entry.job_id, e)
                self.store.update_feedback(entry.job_id, FeedbackStatus.FAILED, error=str(e))
                continue
            except Exception:  # a bug, not the chain: keep it pending, go on with the rest
                log.exception("sending feedback for job %s failed unexpectedly", entry.job_id)
                continue
            self._failures, self._retry_at, self.last_error = 0, 0.0, ""
            self.store.update_feedback(entry.job_id, FeedbackStatus.SENT, transaction=tx)
            log.info("feedback for job %s (agent %d) sent in %s", entry.job_id, entry.agent_id, tx)
            sent += 1
        return sent

    def _wait(self) -> float:
        backoff = self._retry_at - self.clock()
        return min(self.tick, max(0.01, backoff)) if backoff > 0 else self.tick

    async def _loop(self) -> None:
        while True:
            try:
                if await self.send_due() >= PAGE:
                    self._wake.set()
            except Exception:
                log.exception("feedback pass failed; retrying on the next tick")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait()):
                    await self._wake.wait()
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="feedback-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def feedback_sender_for(profile: Profile, data_dir: Path, store: Store) -> FeedbackSender | None:
    """The profile's FeedbackSender ([feedback] enabled), None when feedback is off.
    Raises ValueError for settings that cannot work."""
    if not profile.feedback.enabled:
        return None
    # the adapter, imported only by profiles that use it (web3 is heavy)
    from dispatchnet.chains.evm import EvmFeedbackPoster, FeedbackRejected, resolve_evm_chain

    chain = resolve_evm_chain(profile.chain, data_dir)
    if not chain.reputation_registry:
        log.warning("feedback on workers is off: no reputation_registry on %s", chain.network)
        return None
    poster = EvmFeedbackPoster(
        chain,
        gas_limit=profile.feedback.gas_limit,
        rpc_timeout=profile.chain.rpc_timeout_seconds,
        tx_timeout=profile.chain.tx_timeout_seconds,
    )
    log.info("feedback on workers is posted with %s", poster.describe())
    return FeedbackSender(store, poster, rejected=(FeedbackRejected,))
