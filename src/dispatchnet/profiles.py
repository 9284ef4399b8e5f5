"""Deployment profiles: TOML files that select every behaviour that differs per deployment.

Code never branches on a chain's name; it reads a profile. `--profile NAME` looks for
NAME.toml in $DISPATCH_PROFILE_DIR, then in the project's profiles/ folder; a path to a
.toml file works too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dispatchnet import protocol
from dispatchnet.reputation.score import ScoreParams

PROFILE_DIR = Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    max_message_bytes: int = 4 * 1024 * 1024
    sqlite_synchronous: str = "NORMAL"
    # read connections (threads) serving reads in parallel with the one writer
    sqlite_readers: int = 2
    # where the writes run: "process" (a process of its own, so they never wait for the
    # event loop's interpreter lock; needs a file and readers) or "thread"
    sqlite_writer: str = "process"
    # the writer process's niceness (0-19): below the event loop's CPU priority, since the
    # loop is the coordinator's one serial bottleneck and the writer works in groups that
    # grow when it waits (0: the loop's own priority)
    sqlite_writer_nice: int = 10
    # HTTP/2 keepalive pings to every connection: finds dead peers of long streams
    # (workers are also evicted by their heartbeats); each ping costs a little CPU per
    # connection, which adds up with thousands of connected workers.
    keepalive_seconds: int = 60
    # calls gRPC holds for the coordinator to pick up (each new call waits there until the
    # event loop takes it); past this it refuses new calls with CANCELLED. gRPC's own
    # default (1,000, at most 3,000) refused hundreds of workers in each wave of a few
    # thousand connecting at once (they came back after their backoff).
    max_pending_calls: int = 10000


@dataclass(frozen=True)
class StoreConfig:
    """Where a coordinator keeps its state (`[store]`; README "Storage"); store/registry.py
    picks the implementation by the url's scheme."""

    # "": SQLite in <data dir>/coordinator.db, the embedded default. "sqlite:PATH": SQLite at
    # PATH (relative: under the data dir). "postgresql://USER@HOST:PORT/DATABASE": PostgreSQL
    # (the password from PGPASSWORD or ~/.pgpass rather than in the url).
    url: str = ""
    # PostgreSQL: the most connections this coordinator holds open to the database.
    pool_size: int = 10


@dataclass(frozen=True)
class ClusterConfig:
    """The coordinators of one deployment that share a database (`[cluster]`; README
    "Failover"): the addresses workers and clients use when given none (after
    $DISPATCH_COORDINATOR), in order, failing over from one to the next."""

    coordinators: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LimitsConfig:
    max_task_input_bytes: int = 1024 * 1024
    max_prompt_chars: int = 32768
    # messages of an LLM conversation (each costs the model its template's tokens, however
    # short its text)
    max_llm_messages: int = protocol.MAX_LLM_MESSAGES
    max_llm_tokens: int = 4096
    max_wasm_module_bytes: int = 2 * 1024 * 1024


@dataclass(frozen=True)
class JobsConfig:
    quote_ttl_seconds: int = 300
    max_attempts: int = 3
    offer_lease_seconds: float = 10
    time_limit_seconds: int = 300
    queue_timeout_seconds: float = 600
    sweep_interval_seconds: float = 1.0
    # After a coordinator restart, each job a worker held stays that worker's for this
    # long, so it can reconnect and resume it; then it is requeued without costing an
    # attempt (README "Job lifecycle").
    restart_grace_seconds: float = 30
    # Progress chunks reach watchers from memory at once; the store gets them coalesced,
    # in one row per many chunks, at the latest this long after the first unwritten one
    # (0: a row per chunk). A crash loses at most this much progress text (README "Job
    # lifecycle").
    progress_flush_seconds: float = 1.0
    # Jobs one client may have open (queued, offered or running) at once; CommitJob and
    # RunJob beyond it answer RESOURCE_EXHAUSTED, storing nothing (0: no limit).
    client_max_open_jobs: int = 1000
    # WatchJob and RunJob calls one client may have open at once (each holds a stream and
    # memory); beyond, RESOURCE_EXHAUSTED (0: no limit).
    client_max_watches: int = 1000


@dataclass(frozen=True)
class QuotesConfig:
    """What GetQuote may store (`[quotes]`; README "Quotes and what they store"). A quote
    counts its serialized spec (task input and WebAssembly module included) plus a fixed
    256 bytes until it expires; beyond a limit GetQuote answers RESOURCE_EXHAUSTED."""

    # The largest spec a GetQuote without `authorization` metadata may have (larger:
    # UNAUTHENTICATED, asking for the metadata).
    anonymous_max_spec_bytes: int = 16 * 1024
    # Unexpired quotes of all anonymous callers together.
    anonymous_max_quotes: int = 10000
    # Bytes of unexpired quotes per authenticated client.
    client_max_bytes: int = 64 * 1024 * 1024
    # Bytes of unexpired quotes of everyone together.
    max_bytes: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class WorkersConfig:
    heartbeat_interval_seconds: int = 10
    eviction_seconds: float = 30
    # Heartbeats the coordinator aims at from all workers together (0: no cap). A worker
    # connecting when N are connected is given the interval
    # max(heartbeat_interval_seconds, N / max_heartbeats_per_second), and an eviction time
    # scaled by the same factor. Sessions keep what they were given, so the total grows
    # only with the logarithm of the crowd (5,000 seekers: ~260/s instead of 500/s).
    max_heartbeats_per_second: float = 100
    # A Connect stream must send Hello, then ChallengeResponse, within this long of
    # opening; otherwise it ends with DEADLINE_EXCEEDED.
    hello_timeout_seconds: float = 10


@dataclass(frozen=True)
class IdentityConfig:
    """Worker identity on chain (`[identity]`), used when [chain] (or [identity_chain]) has an
    ERC-8004 IdentityRegistry: a worker that sends Hello.agent_id must prove it controls
    that agent (ChallengeResponse.chain_signature, and solana_signature on the Solana
    track). require_registration: refuse workers that send no agent id (false: they are
    admitted with no agent id, so no on-chain reputation)."""

    require_registration: bool = False
    # How long a verified (agent id, chain address, ed25519 key) is trusted without
    # reading the chain again (reconnects within it cost no chain reads).
    cache_ttl_seconds: float = 300


@dataclass(frozen=True)
class PricingConfig:
    currency: str = "USD"
    fast_llm: int = 10000
    fast_task: int = 3000
    cheap_llm: int = 5000
    cheap_task: int = 1000


@dataclass(frozen=True)
class AuthConfig:
    max_token_ttl_seconds: int = 86400


@dataclass(frozen=True)
class PairingConfig:
    code_ttl_seconds: int = 3600
    # Failed ClaimPairing calls (a wrong, used or expired code) allowed per worker key in
    # the window; beyond, that key's claims are refused (RESOURCE_EXHAUSTED) until the
    # window has passed, even with the right code.
    max_failed_claims: int = 5
    failed_claims_window_seconds: float = 600
    # The same for all keys together (new keys are free, so this is the real bound).
    max_failed_claims_global: int = 100
    failed_claims_global_window_seconds: float = 60
    # Worker keys whose failures are remembered (in memory, per coordinator); beyond, the
    # key whose last failure is oldest is forgotten.
    max_tracked_keys: int = 10000
    # Unused, unexpired codes one client may hold; beyond, CreatePairingCode is refused
    # (RESOURCE_EXHAUSTED) and nothing is stored.
    max_live_codes: int = 100
    # Pairings kept per client and per worker key, revoked ones included: past it, a new
    # pairing makes the party forget its oldest revoked one, and is refused
    # (RESOURCE_EXHAUSTED) when all of them are active.
    max_pairings: int = 1000


@dataclass(frozen=True)
class AcceptConfig:
    """One network CommitJob accepts x402 payments on (`[[payments.accept]]`)."""

    # CAIP-2 id; EVM networks must be [chain]'s network (its account is paid and refunds).
    network: str = ""
    # Token address. "": [chain]'s usdc (e.g. the deployment's test USDC) if it has one,
    # else the x402 SDK's default stablecoin for the network.
    asset: str = ""
    # "": an in-process facilitator that verifies and settles with [chain]'s node and
    # account; otherwise the URL of an x402 facilitator.
    facilitator: str = ""


@dataclass(frozen=True)
class PaymentsConfig:
    """x402 payments for CommitJob (`[payments]`; README "Payments")."""

    enabled: bool = False
    accept: list[AcceptConfig] = field(default_factory=list)
    # Longest authorization asked of a client (the requirement's maxTimeoutSeconds is the
    # job's worst-case lifetime plus settle_margin_seconds, capped by this).
    max_authorization_seconds: int = 3600
    # Settle at the latest this long before the authorization expires: early, while the
    # job still runs, when it must; the payer is then refunded if the job fails.
    settle_margin_seconds: int = 60
    # Gas limits of a transferWithAuthorization settlement and of a refund transfer; a
    # batch settlement gets settle_gas_limit per payment (and its estimate + 25% below that).
    settle_gas_limit: int = 150000
    refund_gas_limit: int = 100000
    # Batched settlement (when [chain] has a batch_settler and the facilitator is the
    # in-process one): payments due are settled together, in one transaction per batch of
    # at most settle_batch_size, sent when a batch is full or when the oldest payment due
    # has waited settle_max_wait_seconds.
    settle_batch_size: int = 50
    settle_max_wait_seconds: float = 2.0
    # Verify CommitJob's payments in this many child processes (0: in a thread of the
    # coordinator). Verification is CPU work that otherwise competes with the event loop
    # for the interpreter lock; see payments/verifier.py.
    verify_processes: int = 0


@dataclass(frozen=True)
class PayoutsConfig:
    """What workers earn (`[payouts]`; README "Workers earn")."""

    # The coordinator's fee, in basis points of each settled payment (1000 = 10%); the
    # worker is credited the rest, in the same transaction that records the settlement.
    fee_bps: int = 1000
    # A registered worker's unpaid balance is paid out in one transfer (coordinator/
    # payouts.py) once it reaches min_payout_micros (atomic units of the payment asset), or
    # interval_seconds after its oldest unpaid credit, whichever comes first.
    min_payout_micros: int = 1_000_000
    interval_seconds: float = 3600.0


@dataclass(frozen=True)
class WalletConfig:
    """The client side (`[wallet]`): what `dispatch job submit` pays with."""

    # secp256k1 key file (`dispatch wallet` format). "": the deployment file's "client" dev
    # account when [chain] has a deployment, else no wallet (no automatic payment).
    key_file: str = ""
    # The most one job may cost, in micro-USD (a 6-decimals stablecoin's atomic units);
    # a coordinator asking more is refused without signing anything.
    max_per_job_micros: int = 100000


@dataclass(frozen=True)
class ReputationConfig:
    """Where matching's worker scores come from: "local" (this coordinator's own job
    records and spot checks) or "erc8004" (the feedback of trusted_reviewers plus the
    coordinator's own chain account, read from the ReputationRegistry's events). Both use
    the formula of reputation/score.py with the settings below."""

    source: str = "local"
    trusted_reviewers: list[str] = field(default_factory=list)
    cache_ttl_seconds: float = 300
    prior: float = 0.3  # the score of a worker with no feedback (or no agent id)
    prior_weight: float = 3  # the prior counts like this many job outcomes
    half_life_days: float = 30  # an outcome this old weighs half
    spot_check_penalty: float = 20  # a spot-check disagreement counts like this many checks
    # erc8004: the first block whose feedback is read (the registry's deployment block;
    # a recent block on public nodes that limit log queries; older feedback is not counted)
    from_block: int = 0

    def score_params(self) -> ScoreParams:
        return ScoreParams(
            prior=self.prior,
            prior_weight=self.prior_weight,
            half_life_days=self.half_life_days,
            spot_check_penalty=self.spot_check_penalty,
        )


@dataclass(frozen=True)
class FeedbackConfig:
    """ERC-8004 feedback on workers (`[feedback]`): every finished job whose worker has an
    agent id gets one giveFeedback from the coordinator's chain account (needs a [chain],
    or an [identity_chain], of kind "evm" with a reputation_registry)."""

    enabled: bool = False
    # The most gas one giveFeedback may use. Each is sent with the node's estimate plus 25%
    # (Monad charges for the limit, so the limit follows the estimate), never more than
    # this. ~192k the first time an agent is rated by this account, ~108k later (the
    # reference registries ~214k / ~132k on anvil, more under Monad's cold-access pricing).
    # An entry that needs more, or that ran out of gas, stays pending and is retried.
    gas_limit: int = 500000


@dataclass(frozen=True)
class VerificationConfig:
    """Redundant execution (`[verification]`, README "Verification"): this fraction of
    the PUBLIC deterministic jobs (built-in tasks, WebAssembly) committed to run once is
    also run on a second independent worker, at the coordinator's expense, and the two
    output hashes compared (a tiebreaker run settles a disagreement)."""

    spot_check_rate: float = 0.0
    # A spot check's next run waits at most this long for an independent worker; then the
    # check is skipped and the job completes with its first run (the client never waits
    # the queue timeout for a check it did not ask for).
    spot_check_wait_seconds: float = 10.0


@dataclass(frozen=True)
class ReceiptsConfig:
    # A batch closes when this many receipts wait, or when the oldest has waited this long.
    batch_size: int = 64
    batch_max_age_seconds: float = 10
    # Where batch roots are anchored: "none" (no chain), or a chain adapter's name.
    anchor: str = "none"
    # How far a worker's clock may be off the coordinator's: a receipt is refused when it
    # started earlier than its offer, or completed later than now, by more than this.
    max_clock_skew_seconds: float = 30


@dataclass(frozen=True)
class ChainConfig:
    """The chain a coordinator talks to (`[chain]`); kind "none" means no chain at all.

    For kind "evm", `network` is the chain's CAIP-2 id ("eip155:<chain id>"). Where the chain
    and the contracts are comes either from `deployment` (the name of a deployment file,
    $DISPATCH_HOME/chains/<name>.json, written by `dispatch chain up`; or a path to such a
    .json file) or from `rpc_url` and the contract addresses given here, never both. An
    empty address means the contract is not used (e.g. no `receipt_anchor`: anchoring off).
    For kind "solana", `network` is "solana:<genesis hash prefix>" and `mint` replaces the
    contract addresses. The keys are typed per kind: each kind refuses, by name, a key it
    does not read that is set away from its default (chains/registry.problems).
    """

    kind: str = "none"  # "none" | "evm" | "solana"
    network: str = ""
    rpc_url: str = ""
    deployment: str = ""
    identity_registry: str = ""
    reputation_registry: str = ""
    validation_registry: str = ""
    receipt_anchor: str = ""
    usdc: str = ""
    # A BatchSettler contract (contracts/src/BatchSettler.sol): the in-process facilitator
    # settles many x402 payments in one transaction through it. Empty: one per payment.
    batch_settler: str = ""
    # Solana: the SPL mint of the payment stablecoin (base58), with rpc_url; from the
    # deployment file otherwise.
    mint: str = ""
    # The coordinator's chain account (a secp256k1 key file for evm, an ed25519 keypair
    # file for solana, created 0600 on first use).
    # Empty: the deployment file's "coordinator" dev account when there is a deployment,
    # else <coordinator data dir>/chain.key.
    key_file: str = ""
    # Gas limit of one ReceiptAnchor.anchor transaction. Some chains (Monad) charge for the
    # limit, not the gas used: keep it tight.
    anchor_gas_limit: int = 60000
    # Solana: before anchoring a root, this many of the coordinator key's latest
    # transactions are searched for an earlier memo of it, so a retry never anchors twice.
    anchor_lookback: int = 1000
    rpc_timeout_seconds: float = 10
    # How long to wait for a sent transaction's receipt before retrying later.
    tx_timeout_seconds: float = 60
    # The local chain `dispatch chain up` starts ("anvil" for evm, "litesvm" for solana),
    # or "" when the profile has none.
    devchain: str = ""
    devchain_port: int = 8545


@dataclass(frozen=True)
class ObservabilityConfig:
    """What operators watch the coordinator with (`[observability]`; README
    "Observability"). Traces are configured by the standard OTEL_* environment variables,
    and JSON logs by `dispatch --log-format json`, not here."""

    # HOST:PORT of the Prometheus endpoint (/metrics, plain HTTP without authentication:
    # bind it to loopback or a private network). "": off. Port 0 picks a free port.
    metrics_listen: str = ""
    # HOST:PORT of the read-only operator dashboard (needs the operator token, written to
    # <data dir>/dashboard.token). "": off. Port 0 picks a free port.
    dashboard_listen: str = ""
    # How often open-job counts, outbox backlogs and connected workers' earnings are read
    # from the store for the metrics and the dashboard.
    sample_seconds: float = 5.0
    # Links to transactions on the dashboard: CAIP-2 network -> URL with "{tx}" where the
    # transaction goes. A network with none shows its transactions without a link.
    explorer_tx_urls: dict[str, str] = field(default_factory=dict)


ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")  # an EVM address (ERC-8004 reviewers, assets)


@dataclass(frozen=True)
class Profile:
    name: str = "local"
    description: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    quotes: QuotesConfig = field(default_factory=QuotesConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    payouts: PayoutsConfig = field(default_factory=PayoutsConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    # `[identity_chain]`: for a [chain] kind with no ERC-8004 registries of its own (solana),
    # the EVM chain that holds the workers' identities and takes the coordinator's
    # feedback (same keys as an evm [chain]; its account posts giveFeedback). Kind "none":
    # no identity chain (agent ids are ignored, no on-chain reputation).
    identity_chain: ChainConfig = field(default_factory=ChainConfig)

    def with_overrides(self, **sections: dict[str, Any]) -> Profile:
        """A copy with some fields of some sections replaced (used by tests and the CLI)."""
        changes: dict[str, Any] = {}
        for section, values in sections.items():
            changes[section] = dataclasses.replace(getattr(self, section), **values)
        profile = dataclasses.replace(self, **changes)
        problems = check_profile(profile)
        if problems:
            raise ProfileError(f"{profile.name}: {'; '.join(problems)}")
        return profile


class ProfileError(ValueError):
    """A profile that cannot be found or does not parse."""


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ProfileError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        expected: type[Any] = hints[name]
        item = (typing.get_args(expected) or (None,))[0]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ProfileError(f"{where}: [{name}] must be a section")
            kwargs[name] = _build(expected, value, f"{where} [{name}]")
        elif isinstance(item, type) and dataclasses.is_dataclass(item):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ProfileError(f"{where}: {name} must be a list of tables ([[...{name}]])")
            kwargs[name] = [_build(item, v, f"{where} [[{name}]]") for v in value]
        elif type(value) is (typing.get_origin(expected) or expected) or (
            expected is float and type(value) is int
        ):
            kwargs[name] = value
        else:
            raise ProfileError(
                f"{where}: {name} must be {expected.__name__}, not {type(value).__name__}"
            )
    return cls(**kwargs)


def check_profile(profile: Profile) -> list[str]:
    """Problems with settings that parse but do not fit together."""
    problems: list[str] = []
    c = profile.chain
    from dispatchnet.chains import registry  # light: no chain library is imported
    from dispatchnet.store import registry as stores  # light: no engine's driver is imported

    problems += stores.problems(profile.store)
    problems += registry.problems(c)
    problems += registry.identity_chain_problems(c, profile.identity_chain)
    can = registry.profile_capabilities(c, profile.identity_chain)

    def needs(capability: str, what: str) -> None:
        if capability not in can:
            problems.append(
                f"{what} needs a [chain] kind (or [identity_chain]) that provides {capability}"
            )

    if not 0.0 <= profile.verification.spot_check_rate <= 1.0:
        problems.append("[verification] spot_check_rate must be between 0 and 1")
    if not 0 < profile.verification.spot_check_wait_seconds <= 3600:
        problems.append("[verification] spot_check_wait_seconds must be in (0, 3600]")
    if not 0 <= c.devchain_port <= 65535:
        problems.append("[chain] devchain_port must be a port number")
    r = profile.reputation
    if r.source not in ("local", "erc8004"):
        problems.append(f"[reputation] source must be local or erc8004, not {r.source!r}")
    elif r.source == "erc8004":
        needs("reputation", '[reputation] source = "erc8004"')
    if not all(isinstance(a, str) and ADDRESS.fullmatch(a) for a in r.trusted_reviewers):
        problems.append("[reputation] trusted_reviewers must be addresses (0x + 40 hex digits)")
    if not 0 <= r.prior <= 1 or r.prior_weight <= 0 or r.cache_ttl_seconds < 0:
        problems.append("[reputation] needs 0 <= prior <= 1, prior_weight > 0, cache_ttl >= 0")
    if not r.half_life_days > 0 or r.spot_check_penalty < 1 or r.from_block < 0:
        problems.append(
            "[reputation] needs half_life_days > 0, spot_check_penalty >= 1, from_block >= 0"
        )
    if profile.feedback.enabled:
        needs("feedback", "[feedback] enabled")
    if profile.feedback.gas_limit < 21000:
        problems.append("[feedback] gas_limit must be at least 21000")
    if profile.identity.require_registration:
        needs("identity", "[identity] require_registration")
    if profile.jobs.client_max_open_jobs < 0:
        problems.append("[jobs] client_max_open_jobs must be 0 (no limit) or more")
    if profile.jobs.client_max_watches < 0:
        problems.append("[jobs] client_max_watches must be 0 (no limit) or more")
    q = profile.quotes
    if min(q.anonymous_max_quotes, q.client_max_bytes, q.max_bytes) < 1:
        problems.append("[quotes] limits must be positive")
    if q.anonymous_max_spec_bytes < 0:
        problems.append("[quotes] anonymous_max_spec_bytes must not be negative")
    if profile.limits.max_llm_messages < 1:
        problems.append("[limits] max_llm_messages must be positive")
    pa = profile.pairing
    if min(pa.max_failed_claims, pa.max_failed_claims_global, pa.max_tracked_keys) < 1 or (
        min(pa.failed_claims_window_seconds, pa.failed_claims_global_window_seconds) <= 0
    ):
        problems.append("[pairing] failed-claim limits and windows must be positive")
    if min(pa.max_live_codes, pa.max_pairings) < 1:
        problems.append("[pairing] max_live_codes and max_pairings must be positive")
    bad = [
        a for a in profile.cluster.coordinators if not isinstance(a, str) or not LISTEN.fullmatch(a)
    ]
    if bad:
        problems.append(f"[cluster] coordinators must be HOST:PORT addresses, not {bad[0]!r}")
    if profile.server.keepalive_seconds < 10:
        problems.append("[server] keepalive_seconds must be at least 10")
    if not 1 <= profile.server.max_pending_calls <= 1_000_000:
        problems.append("[server] max_pending_calls must be between 1 and 1000000")
    if not 0 <= profile.server.sqlite_readers <= 16:
        problems.append("[server] sqlite_readers must be 0-16")
    if profile.server.sqlite_writer not in ("process", "thread"):
        problems.append('[server] sqlite_writer must be "process" or "thread"')
    if not 0 <= profile.server.sqlite_writer_nice <= 19:
        problems.append("[server] sqlite_writer_nice must be 0-19")
    if profile.workers.max_heartbeats_per_second < 0:
        problems.append("[workers] max_heartbeats_per_second must not be negative")
    if profile.workers.hello_timeout_seconds <= 0:
        problems.append("[workers] hello_timeout_seconds must be positive")
    if profile.identity.cache_ttl_seconds < 0:
        problems.append("[identity] cache_ttl_seconds must not be negative")
    if profile.receipts.max_clock_skew_seconds < 0:
        problems.append("[receipts] max_clock_skew_seconds must not be negative")
    anchor = profile.receipts.anchor
    if anchor != "none" and anchor != c.kind:
        problems.append(f'[receipts] anchor must be "none" or the [chain] kind, not {anchor!r}')
    elif anchor != "none":
        needs("anchor", f'[receipts] anchor = "{anchor}"')
    problems += _check_payments(profile)
    problems += _check_observability(profile.observability)
    return problems


LISTEN = re.compile(r"\S+:\d{1,5}")  # HOST:PORT ([::1]:PORT for IPv6)


def _check_observability(o: ObservabilityConfig) -> list[str]:
    problems = []
    for name in ("metrics_listen", "dashboard_listen"):
        value = getattr(o, name)
        if value and (not LISTEN.fullmatch(value) or int(value.rsplit(":", 1)[1]) > 65535):
            problems.append(f"[observability] {name} must be HOST:PORT or empty, not {value!r}")
    if not 0.1 <= o.sample_seconds <= 3600:
        problems.append("[observability] sample_seconds must be 0.1-3600")
    for network, url in o.explorer_tx_urls.items():
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s{}]+\{tx\}[^\s{}]*", url):
            problems.append(
                f"[observability] explorer_tx_urls {network!r} must be an http(s) URL with "
                "one {tx} (e.g. https://explorer.example/tx/{tx})"
            )
    return problems


def _check_payments(profile: Profile) -> list[str]:
    from dispatchnet.chains import registry  # light: no chain library is imported

    p = profile.payments
    problems: list[str] = []
    if p.enabled and not p.accept:
        problems.append("[payments] enabled needs at least one [[payments.accept]] network")
    if p.enabled and profile.pricing.currency != "USD":
        problems.append('[payments] needs [pricing] currency = "USD" (stablecoin prices)')
    seen = set()
    for a in p.accept:
        if a.network in seen:
            problems.append(f"[[payments.accept]] lists {a.network} twice")
        seen.add(a.network)
        on = registry.payment_chain(profile, a.network)
        if on is None:
            problems.append(
                f"[[payments.accept]] {a.network!r} needs a [chain] (or [identity_chain]) on "
                "that network whose kind takes payments"
            )
        elif a.asset and (why := registry.asset_problem(on.kind, a.asset)) is not None:
            problems.append(f"[[payments.accept]] {why}")
        if a.facilitator and not re.fullmatch(r"https?://\S+", a.facilitator):
            problems.append(f"[[payments.accept]] facilitator {a.facilitator!r} is not a URL")
    if p.settle_margin_seconds < 10 or p.max_authorization_seconds <= p.settle_margin_seconds:
        problems.append(
            "[payments] needs settle_margin_seconds >= 10 and max_authorization_seconds above it"
        )
    if min(p.settle_gas_limit, p.refund_gas_limit) < 21000:
        problems.append("[payments] gas limits must be at least 21000")
    if not 1 <= p.settle_batch_size <= 200:
        problems.append("[payments] settle_batch_size must be 1-200")
    if not 0 <= p.settle_max_wait_seconds <= 600:
        problems.append("[payments] settle_max_wait_seconds must be 0-600")
    if not 0 <= p.verify_processes <= 64:
        problems.append("[payments] verify_processes must be 0-64")
    if profile.wallet.max_per_job_micros < 0:
        problems.append("[wallet] max_per_job_micros must not be negative")
    if not 0 <= profile.payouts.fee_bps <= 10000:
        problems.append("[payouts] fee_bps must be 0-10000")
    if profile.payouts.min_payout_micros < 1:
        problems.append("[payouts] min_payout_micros must be at least 1")
    if not profile.payouts.interval_seconds > 0:
        problems.append("[payouts] interval_seconds must be positive")
    return problems


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" and p.exists():
        return p
    dirs = [Path(d) for d in os.environ.get("DISPATCH_PROFILE_DIR", "").split(os.pathsep) if d]
    for d in [*dirs, PROFILE_DIR]:
        candidate = d / f"{name_or_path}.toml"
        if candidate.exists():
            return candidate
    raise ProfileError(f"no profile named {name_or_path!r} (looked in {PROFILE_DIR.name}/)")


def load_profile(name_or_path: str) -> Profile:
    path = resolve_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path.name}: {e}") from e
    # a file with no name is named after itself, not "local": the name picks the default
    # data directory, and two coordinators must not share one
    data.setdefault("name", path.stem)
    profile = _build(Profile, data, path.name)
    problems = check_profile(profile)
    if problems:
        raise ProfileError(f"{path.name}: {'; '.join(problems)}")
    return profile


def profile_toml(name_or_path: str, overrides: dict[str, dict[str, Any]]) -> str:
    """The TOML text of a profile file with some settings replaced (`overrides`: section
    -> setting -> value; a "" section is the top level): for writing a variant of a
    profile for child processes (`dispatch cluster up`, demos, tests). ProfileError when
    the result does not load."""
    data = tomllib.loads(resolve_path(name_or_path).read_text())
    for section, values in overrides.items():
        target = data if not section else data.setdefault(section, {})
        target.update(values)
    text = _toml_table(data, "")
    problems = check_profile(_build(Profile, tomllib.loads(text), "profile"))
    if problems:
        raise ProfileError("; ".join(problems))
    return text


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ProfileError(f"cannot write {type(v).__name__} in a profile")


def _toml_table(data: dict[str, Any], prefix: str) -> str:
    """A table's settings, then (at the top level) its sections and arrays of tables;
    dicts inside a section are inline tables."""
    lines, tables = [], []
    for k, v in data.items():
        if not prefix and isinstance(v, dict):
            tables.append(f"\n[{k}]\n" + _toml_table(v, k + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables += [f"\n[[{prefix}{k}]]\n" + _toml_table(x, f"{prefix}{k}.") for x in v]
        else:
            lines.append(f"{k} = {_toml_value(v)}\n")
    return "".join(lines) + "".join(tables)
