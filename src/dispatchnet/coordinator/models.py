"""Domain types of the coordinator. Plain data: no grpc, no SQL, no protobuf.

Enum values mirror dispatch.v1 so the API layer converts with int().
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, TypeVar

_D = TypeVar("_D")


def evolve(obj: _D, **changes: Any) -> _D:
    """dataclasses.replace(obj, **changes) for the plain frozen dataclasses here (no
    __post_init__, no init=False fields, no slots), without calling __init__ again: a
    copy of obj's fields with `changes` over them. ~1 us for a Job against ~6 us (replace
    assigns every field through object.__setattr__); for the per-job paths. A name that
    is not one of obj's fields raises TypeError, as replace does."""
    state = obj.__dict__
    if not changes.keys() <= state.keys():
        unknown = sorted(changes.keys() - state.keys())
        raise TypeError(f"{type(obj).__name__} has no field {unknown[0]!r}")
    new = object.__new__(type(obj))
    new.__dict__.update(state)
    new.__dict__.update(changes)
    return new


class JobType(enum.IntEnum):
    LLM = 1
    TASK = 2


class Policy(enum.IntEnum):
    FAST = 1
    CHEAP = 2
    AUTO = 3


class Privacy(enum.IntEnum):
    PUBLIC = 1
    PRIVATE = 2


class WorkerKind(enum.IntEnum):
    DESKTOP = 1
    SEEKER = 2


class JobState(enum.IntEnum):
    QUEUED = 1
    OFFERED = 2
    RUNNING = 3
    COMPLETED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


ACTIVE_STATES = (JobState.OFFERED, JobState.RUNNING)
OPEN_STATES = (JobState.QUEUED, JobState.OFFERED, JobState.RUNNING)


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec. spec_bytes is the deterministic serialization the API layer
    produced (what workers receive); spec_sha256 its hash (the receipt's input hash)."""

    job_type: JobType
    policy: Policy
    privacy: Privacy
    task_name: str
    llm_model: str
    spec_bytes: bytes
    spec_sha256: bytes
    use_llm: bool = False
    verify: int = 0  # runs on independent workers the client asked for (0/1: one)
    # hex ids of the workers a sealed (end-to-end encrypted) PRIVATE job has an envelope
    # for: only they may be offered it. Empty: the input is not sealed.
    recipients: frozenset[str] = frozenset()

    @property
    def sealed(self) -> bool:
        """The input is encrypted to its recipients: the coordinator holds ciphertext."""
        return bool(self.recipients)

    @property
    def needs_llm(self) -> bool:
        """LLM jobs, and text tasks the client wants run by a model."""
        return self.job_type is JobType.LLM or self.use_llm

    @property
    def deterministic(self) -> bool:
        """Whether two honest workers give the same output (built-in tasks and
        WebAssembly, not models): what redundant runs and spot checks compare."""
        return not self.needs_llm

    @property
    def runs(self) -> int:
        """How many independent runs the client pays for (JobSpec.verify)."""
        return max(1, self.verify)


@dataclass(frozen=True)
class Quote:
    quote_id: str
    spec: JobSpec
    price_micros: int
    currency: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Result:
    output: bytes
    content_type: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Failure:
    code: str
    message: str


@dataclass(frozen=True)
class Receipt:
    body: bytes
    worker_signature: bytes
    coordinator_signature: bytes
    sha256: bytes


@dataclass(frozen=True)
class PaymentRef:
    """What a job (and its receipt) says about its payment; see PaymentStatus."""

    network: str = ""
    payer: str = ""
    transaction: str = ""
    amount: str = ""
    asset: str = ""
    status: str = "none"
    refund_transaction: str = ""
    authorization_id: str = ""
    pay_to: str = ""

    def signed(self) -> PaymentRef:
        """What offers and receipts carry: the authorization the job runs under (status
        "authorized", no transactions), not its settlement, which may change while the job
        runs (an early settlement) and happens after the receipt is signed."""
        if self.status == "none":
            return self
        return dataclasses.replace(self, status="authorized", transaction="", refund_transaction="")


class PaymentStatus(enum.Enum):
    """Where a job's payment stands (payments/service.py moves it)."""

    AUTHORIZED = "authorized"  # verified at commit; nothing moved yet
    HELD = "held"  # settled early (its window was closing), the job is still open
    SETTLED = "settled"  # the job completed and the payment is on chain; final
    RELEASED = "released"  # the job did not complete; never settled, not charged; final
    REFUND_DUE = "refund_due"  # settled early, then the job did not complete
    REFUNDED = "refunded"  # settled and paid back; final
    FAILED = "failed"  # the chain refused the settlement; not charged; final

    @property
    def final(self) -> bool:
        return self in (
            PaymentStatus.SETTLED,
            PaymentStatus.RELEASED,
            PaymentStatus.REFUNDED,
            PaymentStatus.FAILED,
        )


@dataclass(frozen=True)
class Payment:
    """A job's x402 payment: the verified authorization (the client's payload and the
    requirement it met, as x402 JSON) and what has happened to it since. One row per job;
    (network, asset, payer, authorization_id) is unique, so a payment is accepted once."""

    job_id: str
    network: str
    asset: str
    pay_to: str
    payer: str
    amount: int  # atomic units of the asset
    authorization_id: str  # EIP-3009 nonce (0x hex, lower case)
    valid_before: float  # the authorization cannot be settled after this
    settle_by: float  # settle (early if need be) no later than this
    payload_json: str
    requirement_json: str
    status: PaymentStatus
    created_at: float
    updated_at: float
    transaction: str = ""
    refund_transaction: str = ""
    refund_raw: str = ""  # the signed refund transaction, kept until it is mined
    error: str = ""
    attempts: int = 0

    def ref(self) -> PaymentRef:
        return PaymentRef(
            network=self.network,
            payer=self.payer,
            transaction=self.transaction,
            amount=str(self.amount),
            asset=self.asset,
            status=self.status.value,
            refund_transaction=self.refund_transaction,
            authorization_id=self.authorization_id,
            pay_to=self.pay_to,
        )


@dataclass(frozen=True)
class Split:
    """How a settled payment divides between the coordinator (fee) and the worker (share),
    in atomic units of the payment's asset. The fee rounds down: the odd unit goes to
    the worker."""

    fee_bps: int
    fee: int
    share: int

    @staticmethod
    def of(amount: int, fee_bps: int) -> Split:
        fee = amount * fee_bps // 10000
        return Split(fee_bps, fee, amount - fee)

    def among(self, mode: str, payees: int) -> list[tuple[int, int]]:
        """(fee, share) per worker whose output agreed, the result's worker first
        (README "Verification"): one worker takes (fee, share); a REDUNDANT job's
        agreeing workers split the share evenly (the odd units to the first), the fee
        counted once; a SPOT_CHECK's extra workers split the fee instead (the check is
        the coordinator's expense: it keeps no fee), the first keeping its whole share."""
        if payees <= 1:
            return [(self.fee, self.share)]
        if mode == VERIFY_SPOT_CHECK:
            rest = _even(self.fee, payees - 1)
            return [(0, self.share)] + [(0, part) for part in rest]
        parts = _even(self.share, payees)
        return [(self.fee if i == 0 else 0, part) for i, part in enumerate(parts)]


def _even(amount: int, n: int) -> list[int]:
    """amount in n parts differing by one unit at most, the larger first."""
    base, odd = divmod(amount, n)
    return [base + (1 if i < odd else 0) for i in range(n)]


@dataclass(frozen=True)
class Earning:
    """A worker's credit for one settled job (one per job); `reversed` when its payment
    was refunded afterwards (the share then no longer counts)."""

    job_id: str
    worker_id: str
    network: str
    asset: str
    amount: int  # the payment, atomic units of the asset
    fee_bps: int
    fee: int
    share: int
    credited_at: float
    reversed: bool = False


# Verification modes of a job (Job.verify_mode; README "Verification")
VERIFY_REDUNDANT = "redundant"  # the client asked for JobSpec.verify = 2 or 3 runs
VERIFY_SPOT_CHECK = "spot_check"  # picked at commit, at the coordinator's expense
# A run's verdict once the runs were compared
AGREED = "agree"
DISAGREED = "disagree"


@dataclass(frozen=True)
class Run:
    """One completed run of a verified job: a worker's result and its receipt (signed
    by the worker and countersigned), kept until the runs are compared."""

    job_id: str
    attempt: int
    worker_id: str
    agent_id: str  # the session's verified agent id, "" when none
    result: Result
    receipt: Receipt
    created_at: float
    verdict: str = ""  # AGREED or DISAGREED once compared, else ""
    agent_owner: str = ""  # its agent's owner (in memory: counted into job.verify_seen)

    @property
    def output_sha256(self) -> bytes:
        return hashlib.sha256(self.result.output).digest()


class PayoutRowState(enum.Enum):
    """Where a recorded payout stands (coordinator/payouts.py moves it)."""

    PENDING = "pending"  # recorded, the balance debited; not signed yet (or signed anew)
    SIGNED = "signed"  # its signed artifact is stored: it may have been sent
    LANDED = "landed"  # on chain; final
    FAILED = "failed"  # can never land: its amount went back to the balance; final


@dataclass(frozen=True)
class PayoutRecord:
    """One payout of a worker's whole unpaid balance in one asset (README "Workers earn")."""

    payout_id: str  # "0x" + 64 hex: the EIP-3009 nonce on EVM, the memo on Solana
    worker_id: str
    network: str
    asset: str
    to: str  # the worker's payout address on the chain
    amount: int
    state: PayoutRowState
    raw: str = ""  # the signed artifact, stored before it is sent
    transaction: str = ""
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class PayoutDue:
    """A worker whose unpaid balance in one asset is due for a payout."""

    worker_id: str
    agent_id: str  # its last verified agent id, "" when it never connected registered
    network: str
    asset: str
    unpaid: int
    unpaid_since: float = 0.0  # when its oldest unpaid credit came (the page order)

    @property
    def cursor(self) -> tuple[float, str, str]:
        return (self.unpaid_since, self.worker_id, self.asset)


@dataclass(frozen=True)
class Balance:
    """A worker's earnings in one asset: lifetime credits (shares not reversed), and
    what is left to pay out."""

    network: str
    asset: str
    earned: int
    balance: int


@dataclass(frozen=True)
class Job:
    job_id: str
    client_id: str
    state: JobState
    spec: JobSpec
    price_micros: int
    currency: str
    quote_id: str
    idempotency_key: str
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    queued_at: float
    last_sequence: int = 0
    worker_id: str = ""
    lease_expires_at: float = 0.0
    # the coordinator (its instance id) whose worker was last offered or resumed the job:
    # the one that recovers it at its restart and requeues it when the worker is lost
    coordinator_id: str = ""
    result: Result | None = None
    failure: Failure | None = None
    receipt: Receipt | None = None
    payment: PaymentRef = field(default_factory=PaymentRef)
    # Verification (README "Verification"): VERIFY_REDUNDANT or VERIFY_SPOT_CHECK, ""
    # for a job run once; verify_runs, the runs to compare (grows to 3 for a tiebreak);
    # verify_seen, the identities ("key:<worker id>", "agent:<agent id>") of the
    # workers whose runs are recorded, none of which may run it again.
    verify_mode: str = ""
    verify_runs: int = 0
    verify_seen: tuple[str, ...] = ()


class EventKind(enum.Enum):
    STATE = "state"
    PROGRESS = "progress"


# How the reason of a move back to QUEUED begins when the attempt's worker gave it up: it
# refused the offer, reported a failure, or its result was refused (its receipt, or the
# result itself). Such an attempt stays given up: no late result of it counts and its
# worker cannot resume it (Store.offered_at and held_attempts leave it out). An attempt
# taken back for any other reason (the stream dropped, the lease ran out) may still
# deliver while the job is open: the first valid result wins.
REJECTED = "rejected: "
FAILED = "failed: "
BAD_RECEIPT = "bad receipt: "
GIVEN_UP = (REJECTED, FAILED, BAD_RECEIPT)
# ... and how it is when the attempt's lease ran out (the offer went unanswered, or the
# job ran past its time limit) or its run of a verified job was recorded: such an attempt
# may still deliver (a lapsed one: the first valid result wins), but its worker cannot
# resume it by listing it at Connect (held_attempts leaves it out), which would give it
# the job, and a new lease, again and again.
OFFER_LAPSED = "offer_lease_expired"
TIME_LAPSED = "time_limit_exceeded"
RUN_RECORDED = "run "
NOT_HELD = (*GIVEN_UP, OFFER_LAPSED, TIME_LAPSED, RUN_RECORDED)


@dataclass(frozen=True)
class Event:
    """One entry of a job's history; sequence is assigned by the store."""

    job_id: str
    kind: EventKind
    state: JobState
    time: float
    sequence: int = 0
    from_state: JobState | None = None
    reason: str = ""
    worker_id: str = ""
    attempt: int = 0
    text: str = ""
    fraction: float = 0.0

    @property
    def final(self) -> bool:
        """A change to a final state: the job's last event."""
        return self.kind is EventKind.STATE and self.state.final


@dataclass(frozen=True)
class PriorMove:
    """A job's earlier transition not written yet (an accept kept in memory), written
    first in the transaction of its next one (see JobRepository.transition)."""

    from_states: tuple[JobState, ...]
    attempt: int | None
    changes: dict[str, Any]
    event: Event


@dataclass(frozen=True)
class Pairing:
    pairing_id: str
    client_id: str
    worker_id: str
    created_at: float
    revoked_at: float | None = None


# --- receipt batches --------------------------------------------------------------------


class AnchorStatus(enum.Enum):
    """Where a batch's Merkle root stands with its chain."""

    NONE = "none"  # the profile anchors on no chain; final
    PENDING = "pending"  # waiting for (or retrying after) a chain's trouble
    ANCHORED = "anchored"  # the root is on chain: anchor_network + anchor_transaction; final
    FAILED = "failed"  # the anchorer failed unexpectedly (a bug?); retried, slowly


@dataclass(frozen=True)
class UnbatchedReceipt:
    """A completed job's receipt that belongs to no batch yet."""

    job_id: str
    receipt_sha256: bytes
    completed_at: float


@dataclass(frozen=True)
class ReceiptLeaf:
    """A receipt's place in its batch's Merkle tree."""

    batch_id: str
    leaf_index: int
    job_id: str
    receipt_sha256: bytes


@dataclass(frozen=True)
class ReceiptBatch:
    """A closed batch of receipts: the Merkle root over their hashes and its anchor."""

    batch_id: str
    merkle_root: bytes
    leaf_count: int
    created_at: float
    anchor_status: AnchorStatus
    anchor_network: str = ""
    anchor_transaction: str = ""
    anchor_error: str = ""
    anchored_at: float | None = None


# --- feedback outbox --------------------------------------------------------------------


class FeedbackStatus(enum.Enum):
    """Where a feedback entry of the outbox stands with the ReputationRegistry."""

    PENDING = "pending"  # waiting to be sent (or retried after chain trouble)
    SENT = "sent"  # on chain: transaction; final
    FAILED = "failed"  # reverted (e.g. the coordinator owns the agent): error; final


@dataclass(frozen=True)
class FeedbackEntry:
    """One giveFeedback call owed for a finished job (one per job: job_id is the key)."""

    job_id: str
    agent_id: int
    value: int
    value_decimals: int
    tag1: str
    tag2: str
    feedback_uri: str
    feedback_hash: bytes  # 32 bytes
    created_at: float
    status: FeedbackStatus = FeedbackStatus.PENDING
    transaction: str = ""
    error: str = ""
    attempts: int = 0


DAY_SECONDS = 86400


def day_of(t: float) -> int:
    """The UTC day (days since 1970-01-01) of a unix time."""
    return int(t // DAY_SECONDS)


@dataclass(frozen=True)
class WorkerDay:
    """One UTC day of a worker's record: job outcomes counted by transition() and
    spot-check verdicts (agreed with the majority, or in the minority)."""

    day: int  # days since 1970-01-01 (UTC)
    completed: int = 0
    failed: int = 0
    agreed: int = 0
    disagreed: int = 0
