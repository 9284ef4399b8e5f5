"""The feedback outbox without a chain: entries commit with the job's final transition
(one per job), the sender marks them sent, keeps them pending through chain trouble, and
marks a rejected one failed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from test_store import make_job, queued

from dispatchnet.coordinator.models import FeedbackEntry, FeedbackStatus, JobState
from dispatchnet.errors import Unavailable
from dispatchnet.reputation.feedback import FeedbackSender
from dispatchnet.store.threaded import ThreadedStore


class Rejected(Exception):
    pass


class FakePoster:
    def __init__(self) -> None:
        self.down = True
        self.sent: list[str] = []

    async def give(self, entry: FeedbackEntry) -> str:
        if self.down:
            raise Unavailable("connection refused")
        if entry.agent_id == 666:
            raise Rejected("giveFeedback reverts: SelfFeedback")
        self.sent.append(entry.job_id)
        return "0x" + hashlib.sha256(entry.job_id.encode()).hexdigest()


def entry(job_id: str, agent_id: int = 7) -> FeedbackEntry:
    return FeedbackEntry(
        job_id, agent_id, 100, 0, "successRate", "task", f"dispatch://k/jobs/{job_id}",
        bytes(32), created_at=1.0,
    )  # fmt: skip


async def test_outbox_commits_with_the_transition_and_the_sender_retries(
    tmp_path: Path,
) -> None:
    store = ThreadedStore(tmp_path / "db.sqlite")
    for job_id, agent in (("j1", 7), ("j2", 666)):
        await store.create_job(make_job(job_id, key=job_id), queued(job_id))
        done = await store.transition(
            job_id, (JobState.QUEUED,), None, {"state": JobState.FAILED}, None, entry(job_id, agent)
        )
        assert done is not None
    # a failed compare-and-set writes no entry; a second entry for a job is ignored
    assert await store.transition("j1", (JobState.QUEUED,), None, {}, None, entry("j1", 8)) is None
    await store.create_job(make_job("j3", key="j3"), queued("j3"))
    await store.transition("j3", (JobState.QUEUED,), None, {}, None, entry("j1", 9))
    pending = await store.feedback_entries((FeedbackStatus.PENDING,))
    assert [(e.job_id, e.agent_id) for e in pending] == [("j1", 7), ("j2", 666)]

    poster = FakePoster()
    sender = FeedbackSender(store, poster, rejected=(Rejected,), retry_initial_seconds=0)
    assert await sender.send_due() == 0  # the chain is down: nothing lost
    assert "connection refused" in sender.last_error
    assert len(await store.feedback_entries((FeedbackStatus.PENDING,))) == 2
    poster.down = False
    assert await sender.send_due() == 1
    (sent,) = await store.feedback_entries((FeedbackStatus.SENT,))
    assert sent.job_id == "j1" and sent.transaction.startswith("0x") and sent.attempts == 1
    (failed,) = await store.feedback_entries((FeedbackStatus.FAILED,))
    assert failed.job_id == "j2" and "SelfFeedback" in failed.error
    assert await sender.send_due() == 0 and poster.sent == ["j1"]  # exactly once
    await store.close()
