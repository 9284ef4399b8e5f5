"""Receipt queries for clients: a job's receipt, and its Merkle inclusion proof."""

from __future__ import annotations

from dataclasses import dataclass

from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import Receipt
from dispatchnet.errors import FailedPrecondition


@dataclass(frozen=True)
class ReceiptProof:
    receipt_sha256: bytes
    leaf_index: int
    leaf_count: int
    proof: list[bytes]
    root: bytes
    batch_id: str
    anchor_transaction: str
    anchor_network: str


class ReceiptQueries:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def get(self, client_id: str, job_id: str) -> Receipt:
        job = self.jobs.get(client_id, job_id)
        if job.receipt is None:
            raise FailedPrecondition(
                f"job {job_id} is {job.state.name}; only completed jobs have receipts"
            )
        return job.receipt

    def proof(self, client_id: str, job_id: str) -> ReceiptProof:
        self.get(client_id, job_id)
        raise FailedPrecondition(
            "receipt batching and anchoring are off in this profile (they need a chain profile)"
        )
