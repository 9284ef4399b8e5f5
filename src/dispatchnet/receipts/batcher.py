"""ReceiptBatcher: closes Merkle batches of completed jobs' receipts and anchors their roots.

Two background tasks, both off the matching hot path:
- batching: a batch closes when `batch_size` receipts wait, or when the oldest waiting
  receipt has waited `batch_max_age_seconds`. The root is computed here (receipts/merkle.py)
  and the batch and its leaves are stored in one transaction. Completing a job wakes this
  loop (job_completed); a periodic tick also picks up receipts other coordinators completed.
- anchoring: batches with status "pending" (or "failed") are handed to the Anchorer, oldest
  first. Chain trouble (Unavailable, or no answer within `anchor_timeout`) leaves the batch
  "pending" with the error noted and pauses anchoring with exponential backoff; any other
  error marks it "failed" and retries it at the slowest pace. Nothing is dropped: every
  batch is retried until it is "anchored". Retry timing is kept in memory, so a restart
  retries at once.

Plain domain code: no grpc, no protobuf, no chain; the store and the anchorer are protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from dispatchnet.coordinator.models import AnchorStatus, Job, ReceiptBatch, UnbatchedReceipt
from dispatchnet.coordinator.observer import NULL_OBSERVER, Observer
from dispatchnet.coordinator.ports import ReceiptBatches
from dispatchnet.errors import Unavailable
from dispatchnet.loops import OutboxLoop, coalesce
from dispatchnet.profiles import ReceiptsConfig
from dispatchnet.receipts.anchoring import Anchorer
from dispatchnet.receipts.merkle import merkle_root

log = logging.getLogger("dispatch.receipts")

MAX_BATCHES_PER_PASS = 100  # a pass closes at most this many batches before yielding
ANCHOR_PAGE = 100  # batches read per anchoring pass
MIN_PASS_GAP = OutboxLoop.min_pass_gap  # see OutboxLoop: kicks within it share one pass
TO_ANCHOR = (AnchorStatus.PENDING, AnchorStatus.FAILED)


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class ReceiptBatcher:
    def __init__(
        self,
        store: ReceiptBatches,
        cfg: ReceiptsConfig,
        anchorer: Anchorer,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
        anchor_timeout_seconds: float = 120.0,
    ) -> None:
        if cfg.batch_size < 1:
            raise ValueError("receipts.batch_size must be at least 1")
        if cfg.batch_max_age_seconds <= 0:
            raise ValueError("receipts.batch_max_age_seconds must be positive")
        self.store = store
        self.cfg = cfg
        self.anchorer = anchorer
        self.clock = clock
        self.tick = tick_seconds
        self.anchor_timeout = anchor_timeout_seconds
        # the anchoring loop, with its backoff after chain trouble
        self.anchoring = _Anchoring(
            self, clock, tick_seconds, retry_initial_seconds, retry_max_seconds
        )
        self._next_due: float | None = None  # when the oldest waiting receipt is due
        self._failed_retry_at: dict[str, float] = {}  # batch_id -> next try ("failed" ones)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.observer: Observer = NULL_OBSERVER  # see observe()

    def observe(self, observer: Observer, chain: str) -> None:
        """Tells observer about closed and anchored batches, and about trouble with the
        anchoring chain (`chain`, its CAIP-2 network)."""
        self.observer = self.anchoring.observer = observer
        self.anchoring.chain = chain

    # --- batching -----------------------------------------------------------------------

    def kick(self) -> None:
        """Something may be due: run a batching pass soon."""
        self._wake.set()

    def job_completed(self, job: Job) -> None:
        """CompletionListener: a completed job has a receipt waiting for a batch."""
        self._wake.set()

    async def close_due(self) -> list[ReceiptBatch]:
        """Closes every batch that is due now (full, or holding a receipt that waited long
        enough); the batches stored."""
        closed: list[ReceiptBatch] = []
        self._next_due = None
        for _ in range(MAX_BATCHES_PER_PASS):
            waiting = await self.store.unbatched_receipts(self.cfg.batch_size)
            if not waiting:
                return closed
            due_at = waiting[0].completed_at + self.cfg.batch_max_age_seconds
            if len(waiting) < self.cfg.batch_size and self.clock() < due_at:
                self._next_due = due_at
                return closed
            batch = await self._close(waiting)
            if batch is not None:
                closed.append(batch)
        self.kick()  # more is due; continue after other tasks had a turn
        return closed

    async def _close(self, waiting: list[UnbatchedReceipt]) -> ReceiptBatch | None:
        batch = ReceiptBatch(
            batch_id=new_batch_id(),
            merkle_root=merkle_root([r.receipt_sha256 for r in waiting]),
            leaf_count=len(waiting),
            created_at=self.clock(),
            anchor_status=AnchorStatus.PENDING if self.anchorer.enabled else AnchorStatus.NONE,
        )
        if not await self.store.create_receipt_batch(batch, waiting):
            # another coordinator batched some of these meanwhile; the next read sees it
            log.info("receipt batch lost a race with another batcher; re-reading")
            return None
        self.observer.receipt_batch_closed(batch, [r.job_id for r in waiting])
        log.info(
            "receipt batch %s closed: %d receipt(s), root %s",
            batch.batch_id,
            batch.leaf_count,
            batch.merkle_root.hex(),
        )
        return batch

    def _batch_wait(self) -> float:
        if self._next_due is None:
            return self.tick
        return min(self.tick, max(0.01, self._next_due - self.clock()))

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                async with self.anchoring.locks.pass_lock("receipt-batcher") as held:
                    if held and await self.close_due() and self.anchorer.enabled:
                        self.anchoring.kick()
            except Exception:
                log.exception("receipt batching pass failed; retrying on the next tick")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._batch_wait()):
                    await self._wake.wait()
            await coalesce(started, MIN_PASS_GAP)  # a completed job wakes it: share passes
            self._wake.clear()

    # --- anchoring ----------------------------------------------------------------------

    async def anchor_due(self) -> int:
        """Anchors the batches waiting for it whose retry time has come, oldest first; how
        many got anchored. Stops at the first chain trouble (the chain is likely down for
        all of them)."""
        if self.anchoring.backing_off():
            return 0
        now = self.clock()
        anchored = 0
        for batch in await self.store.receipt_batches(TO_ANCHOR, limit=ANCHOR_PAGE):
            if self._failed_retry_at.get(batch.batch_id, 0.0) > now:
                continue
            if not await self.anchoring.fenced():
                break
            outcome = await self._anchor(batch)
            if outcome is AnchorStatus.ANCHORED:
                anchored += 1
            elif outcome is AnchorStatus.PENDING:
                break
        return anchored

    async def _anchor(self, batch: ReceiptBatch) -> AnchorStatus:
        try:
            async with asyncio.timeout(self.anchor_timeout):
                result = await self.anchorer.anchor(
                    batch.merkle_root, batch.leaf_count, batch.batch_id
                )
        except (Unavailable, TimeoutError) as e:
            error = e.message if isinstance(e, Unavailable) else "no answer in time"
            delay = self.anchoring.backed_off(error)
            await self.store.update_anchor(batch.batch_id, AnchorStatus.PENDING, error=error)
            log.warning(
                "anchoring batch %s failed (%s); retrying in %.1fs", batch.batch_id, error, delay
            )
            return AnchorStatus.PENDING
        except Exception as e:
            log.exception("anchoring batch %s failed unexpectedly", batch.batch_id)
            self._failed_retry_at[batch.batch_id] = self.clock() + self.anchoring.retry_max
            error = f"{type(e).__name__}: {e}"
            await self.store.update_anchor(batch.batch_id, AnchorStatus.FAILED, error=error)
            return AnchorStatus.FAILED
        self.anchoring.recovered()
        self._failed_retry_at.pop(batch.batch_id, None)
        anchored = await self.store.update_anchor(
            batch.batch_id,
            AnchorStatus.ANCHORED,
            network=result.network,
            transaction=result.transaction,
            anchored_at=self.clock(),
        )
        if anchored is not None:
            self.observer.receipt_batch_anchored(anchored)
        log.info(
            "receipt batch %s anchored on %s in %s",
            batch.batch_id,
            result.network,
            result.transaction,
        )
        return AnchorStatus.ANCHORED

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._batch_loop(), name="receipt-batcher")
            if self.anchorer.enabled:
                self.anchoring.start()

    async def stop(self) -> None:
        await self.anchoring.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class _Anchoring(OutboxLoop):
    """The batcher's anchoring loop: anchor_due every tick, at once when a batch closes,
    paused with exponential backoff after chain trouble."""

    name = "receipt-anchorer"
    outbox = "anchoring"
    page = ANCHOR_PAGE

    def __init__(
        self,
        batcher: ReceiptBatcher,
        clock: Callable[[], float],
        tick_seconds: float,
        retry_initial_seconds: float,
        retry_max_seconds: float,
    ) -> None:
        super().__init__(clock, tick_seconds, retry_initial_seconds, retry_max_seconds)
        self.batcher = batcher

    async def run_pass(self) -> int:
        return await self.batcher.anchor_due()
