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
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dispatchnet.coordinator.models import FeedbackEntry, FeedbackStatus, Job
from dispatchnet.coordinator.ports import FeedbackOutbox
from dispatchnet.errors import Unavailable
from dispatchnet.loops import OutboxLoop
from dispatchnet.profiles import Profile

log = logging.getLogger("dispatch.feedback")

PAGE = 100


class FeedbackPoster(Protocol):
    async def give(self, entry: FeedbackEntry) -> str:
        """Posts the entry; its transaction hash. Unavailable: try again later; any
        exception a rejection (rejected_by says which)."""
        ...


class FeedbackSender(OutboxLoop):
    name = "feedback-sender"
    outbox = "feedback"
    page = PAGE

    def __init__(
        self,
        store: FeedbackOutbox,
        poster: FeedbackPoster,
        rejected: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
        send_timeout_seconds: float = 120.0,
    ) -> None:
        super().__init__(clock, tick_seconds, retry_initial_seconds, retry_max_seconds)
        self.store = store
        self.poster = poster
        self.rejected = rejected
        self.send_timeout = send_timeout_seconds

    def job_completed(self, job: Job) -> None:
        """CompletionListener: an entry may be waiting."""
        self._wake.set()

    async def run_pass(self) -> int:
        return await self.send_due()

    async def send_due(self) -> int:
        """Sends pending entries, oldest first, unless backing off; how many were sent.
        Stops at the first chain trouble."""
        if self.backing_off():
            return 0
        sent = 0
        for entry in await self.store.feedback_entries((FeedbackStatus.PENDING,), limit=PAGE):
            if not await self.fenced():
                break
            try:
                async with asyncio.timeout(self.send_timeout):
                    tx = await self.poster.give(entry)
            except (Unavailable, TimeoutError) as e:
                delay = self.backed_off(
                    e.message if isinstance(e, Unavailable) else "no answer in time"
                )
                log.warning(
                    "feedback for job %s not sent (%s); retrying in %.1fs",
                    entry.job_id,
                    self.last_error,
                    delay,
                    extra={"job_id": entry.job_id},
                )
                break
            except self.rejected as e:
                log.warning("feedback for job %s rejected: %s", entry.job_id, e,
                            extra={"job_id": entry.job_id})  # fmt: skip
                await self.store.update_feedback(entry.job_id, FeedbackStatus.FAILED, error=str(e))
                continue
            except Exception:  # a bug, not the chain: keep it pending, go on with the rest
                log.exception("sending feedback for job %s failed unexpectedly", entry.job_id,
                              extra={"job_id": entry.job_id})  # fmt: skip
                continue
            self.recovered()
            await self.store.update_feedback(entry.job_id, FeedbackStatus.SENT, transaction=tx)
            log.info("feedback for job %s (agent %d) sent in %s", entry.job_id, entry.agent_id,
                     tx, extra={"job_id": entry.job_id})  # fmt: skip
            sent += 1
        return sent


def feedback_sender_for(
    profile: Profile, data_dir: Path, store: FeedbackOutbox
) -> FeedbackSender | None:
    """The profile's FeedbackSender ([feedback] enabled), None when feedback is off.
    Raises ValueError for settings that cannot work."""
    if not profile.feedback.enabled:
        return None
    from dispatchnet.chains import registry

    made = registry.adapter_of(profile).feedback_poster(profile, data_dir)
    if made is None:
        log.warning("feedback on workers is off: [chain] %s has no reputation registry",
                    profile.chain.network)  # fmt: skip
        return None
    poster, rejected = made
    describe = getattr(poster, "describe", None)
    log.info("feedback on workers is posted with %s", describe() if callable(describe) else poster)
    return FeedbackSender(store, poster, rejected=rejected)
