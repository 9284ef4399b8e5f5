"""Receipt queries for clients: a job's receipt, and its Merkle inclusion proof.

Proofs come from batches the ReceiptBatcher (receipts/batcher.py) closed. A receipt waits
for its batch at most `[receipts] batch_max_age_seconds` (plus a tick); until then its proof
is FAILED_PRECONDITION rather than a batch closed on demand, so that a client polling for
proofs cannot make a coordinator cut one-leaf batches (and, on chain, pay for each).
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatchnet.coordinator.jobs import JobService
from dispatchnet.coordinator.models import AnchorStatus, PaymentRef, Receipt
from dispatchnet.errors import FailedPrecondition, quoted
from dispatchnet.receipts.merkle import merkle_proof, merkle_root


@dataclass(frozen=True)
class ReceiptProof:
    """A receipt's Merkle inclusion proof; the anchor fields are empty until the batch's
    root is anchored (always, in a profile that anchors nowhere)."""

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

    async def get(self, client_id: str, job_id: str) -> Receipt:
        return (await self.get_with_payment(client_id, job_id))[0]

    async def get_with_payment(self, client_id: str, job_id: str) -> tuple[Receipt, PaymentRef]:
        """The receipt and the job's payment as it stands now (settled, refunded...)."""
        job = await self.jobs.get(client_id, job_id)
        if job.receipt is None:
            raise FailedPrecondition(
                f"job {quoted(job_id)} is {job.state.name}; only completed jobs have receipts"
            )
        return job.receipt, job.payment

    async def proof(self, client_id: str, job_id: str) -> ReceiptProof:
        """The inclusion proof of a completed job's receipt in its batch (owner only)."""
        receipt = await self.get(client_id, job_id)
        store = self.jobs.store
        leaf = await store.receipt_leaf(job_id)
        if leaf is None:
            raise FailedPrecondition(
                f"the receipt of job {quoted(job_id)} is not batched yet; retry in a few seconds"
            )
        batch = await store.get_receipt_batch(leaf.batch_id)
        hashes = [x.receipt_sha256 for x in await store.batch_leaves(leaf.batch_id)]
        if (
            batch is None
            or len(hashes) != batch.leaf_count
            or merkle_root(hashes) != batch.merkle_root
            or hashes[leaf.leaf_index] != receipt.sha256
        ):
            raise RuntimeError(f"receipt batch {leaf.batch_id} does not match its stored root")
        anchored = batch.anchor_status is AnchorStatus.ANCHORED
        return ReceiptProof(
            receipt_sha256=receipt.sha256,
            leaf_index=leaf.leaf_index,
            leaf_count=batch.leaf_count,
            proof=merkle_proof(hashes, leaf.leaf_index),
            root=batch.merkle_root,
            batch_id=batch.batch_id,
            anchor_transaction=batch.anchor_transaction if anchored else "",
            anchor_network=batch.anchor_network if anchored else "",
        )
