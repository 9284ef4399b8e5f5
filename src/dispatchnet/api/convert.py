"""proto <-> domain conversion and request validation (the only place that knows both)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sized

from google.protobuf.timestamp_pb2 import Timestamp

from dispatch.v1 import common_pb2, coordinator_pb2, receipt_pb2, trust_pb2, worker_pb2
from dispatchnet import protocol
from dispatchnet.coordinator import hub as hubmod
from dispatchnet.coordinator.earnings import EarningsPage
from dispatchnet.coordinator.models import (
    Balance,
    Event,
    EventKind,
    Job,
    JobSpec,
    JobType,
    Pairing,
    Policy,
    Privacy,
    Receipt,
    Result,
    WorkerKind,
)
from dispatchnet.coordinator.pricing import resolve_policy
from dispatchnet.coordinator.verification import MAX_RUNS as MAX_VERIFY
from dispatchnet.errors import InvalidArgument, NotFound, quoted
from dispatchnet.profiles import LimitsConfig
from dispatchnet.receipts.core import sha256
from dispatchnet.receipts.notary import payment_to_proto

NAME_RE = re.compile(rf"^{protocol.TASK_NAME.pattern}$")
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}$")
ROLES = {"system", "user", "assistant"}
WASM_TASK = "wasm"
LLM_TEXT_TASKS = frozenset({"summarize", "classify", "extract_json"})


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def _enum(
    value: int, enum_cls: type[Policy] | type[Privacy], field: str, default: Policy | Privacy
) -> Policy | Privacy:
    if value == 0:
        return default
    try:
        return enum_cls(value)
    except ValueError:
        raise InvalidArgument(f"{field}: unknown value {value}") from None


def _wasm_module(
    task: common_pb2.TaskRequest, limits: LimitsConfig, stored: Callable[[bytes], bytes | None]
) -> bytes | None:
    """The module of a "wasm" task, resolving a sha256 reference to the stored bytes."""
    source = task.wasm.WhichOneof("source") if task.HasField("wasm") else None
    if task.name != WASM_TASK:
        if source is not None:
            raise InvalidArgument(f'spec.task.wasm is only for the "{WASM_TASK}" task')
        return None
    if source is None:
        raise InvalidArgument('a "wasm" task needs spec.task.wasm.module or spec.task.wasm.sha256')
    if source == "sha256":
        if len(task.wasm.sha256) != 32:
            raise InvalidArgument("spec.task.wasm.sha256 must be 32 bytes")
        module = stored(task.wasm.sha256)
        if module is None:
            raise NotFound(
                f"no stored WebAssembly module has sha256 {task.wasm.sha256.hex()}; "
                "send the module itself once"
            )
    else:
        module = task.wasm.module
    if not module:
        raise InvalidArgument("spec.task.wasm.module is empty")
    if len(module) > limits.max_wasm_module_bytes:
        raise InvalidArgument(
            f"the WebAssembly module is {len(module)} bytes; "
            f"the limit is {limits.max_wasm_module_bytes}"
        )
    return module


def spec_from_proto(
    spec: common_pb2.JobSpec,
    limits: LimitsConfig,
    stored_module: Callable[[bytes], bytes | None] = lambda sha: None,
) -> tuple[JobSpec, bytes | None]:
    """Validates a JobSpec and resolves its policy, privacy and WebAssembly module.

    Returns the domain spec and, for a "wasm" task, the module bytes (the normalized spec
    always carries the bytes, so a module sent by hash and by value hash the same)."""
    module = None
    work = spec.WhichOneof("work")
    if work is None:
        raise InvalidArgument("spec: set exactly one of spec.llm or spec.task")
    policy = _enum(spec.policy, Policy, "spec.policy", Policy.AUTO)
    privacy = _enum(spec.privacy, Privacy, "spec.privacy", Privacy.PUBLIC)
    job_type = JobType.LLM if work == "llm" else JobType.TASK
    task_name = model = ""
    recipients = _sealed_recipients(spec, privacy, limits)
    if recipients:
        # the payload is in the envelopes: check the clear metadata only
        task_name, model = _sealed_metadata(spec, limits)
    elif work == "task":
        task_name = spec.task.name
        if not NAME_RE.match(task_name):
            raise InvalidArgument(_task_name_problem(task_name))
        if len(spec.task.input) > limits.max_task_input_bytes:
            raise InvalidArgument(
                f"spec.task.input is {len(spec.task.input)} bytes; "
                f"the limit is {limits.max_task_input_bytes}"
            )
        module = _wasm_module(spec.task, limits, stored_module)
        if spec.task.use_llm and task_name not in LLM_TEXT_TASKS:
            raise InvalidArgument(
                f"spec.task.use_llm works only for {', '.join(sorted(LLM_TEXT_TASKS))}"
            )
    else:
        llm = spec.llm
        model = llm.model
        if model and not MODEL_RE.match(model):
            raise InvalidArgument("spec.llm.model is not a valid model name")
        if not llm.prompt and not llm.messages:
            raise InvalidArgument("spec.llm: set prompt or messages")
        if len(llm.messages) > limits.max_llm_messages:
            raise InvalidArgument(
                f"spec.llm.messages has {len(llm.messages)} messages; the limit is "
                f"{limits.max_llm_messages}"
            )
        for i, m in enumerate(llm.messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"spec.llm.messages[{i}].role must be one of {sorted(ROLES)}")
        chars = len(llm.prompt) + sum(len(m.content) for m in llm.messages)
        if chars > limits.max_prompt_chars:
            raise InvalidArgument(
                f"spec.llm prompt is {chars} characters; the limit is {limits.max_prompt_chars}"
            )
        if llm.max_tokens > limits.max_llm_tokens:
            raise InvalidArgument(f"spec.llm.max_tokens must be at most {limits.max_llm_tokens}")
        if not 0.0 <= llm.temperature <= 2.0:
            raise InvalidArgument("spec.llm.temperature must be in [0, 2]")
    if spec.verify > MAX_VERIFY:
        raise InvalidArgument(f"spec.verify must be 0-{MAX_VERIFY} (independent runs)")
    if spec.verify > 1:
        if job_type is JobType.LLM or (work == "task" and spec.task.use_llm):
            raise InvalidArgument(
                "spec.verify > 1 needs a deterministic job (a built-in task or WebAssembly); "
                "model output differs from run to run"
            )
        if privacy is Privacy.PRIVATE:
            raise InvalidArgument(
                "spec.verify > 1 is for PUBLIC jobs: a PRIVATE job runs only on your paired workers"
            )
    resolved = resolve_policy(job_type, Policy(policy))
    normalized = common_pb2.JobSpec()
    normalized.CopyFrom(spec)
    normalized.DiscardUnknownFields()  # the hash covers only what this coordinator knows
    normalized.policy = common_pb2.Policy.ValueType(int(resolved))
    normalized.privacy = common_pb2.Privacy.ValueType(int(privacy))
    if module is not None:
        normalized.task.wasm.module = module
    data = normalized.SerializeToString(deterministic=True)
    use_llm = work == "task" and spec.task.use_llm
    domain = JobSpec(
        job_type,
        resolved,
        Privacy(privacy),
        task_name,
        model,
        data,
        sha256(data),
        use_llm,
        recipients=frozenset(recipients),
        verify=spec.verify,
    )
    return domain, module


def _task_name_problem(name: str) -> str:
    what = "is required" if not name else "must be"
    return f"spec.task.name {what}: {protocol.TASK_NAME_RULE}"


def _sealed_recipients(
    spec: common_pb2.JobSpec, privacy: Policy | Privacy, limits: LimitsConfig
) -> list[str]:
    """The worker ids a sealed spec has envelopes for (empty: not sealed), checked: a
    PRIVATE job, 1-16 envelopes, one per 32-byte key, each box within the input limits."""
    if not spec.HasField("sealed"):
        return []
    if privacy is not Privacy.PRIVATE:
        raise InvalidArgument("spec.sealed needs spec.privacy PRIVACY_PRIVATE")
    envelopes = spec.sealed.envelopes
    if not 1 <= len(envelopes) <= protocol.MAX_SEALED_ENVELOPES:
        raise InvalidArgument(
            f"spec.sealed.envelopes: 1-{protocol.MAX_SEALED_ENVELOPES} envelopes, "
            "one per recipient worker"
        )
    if spec.WhichOneof("work") == "task":
        plain = limits.max_task_input_bytes
        if spec.task.name == WASM_TASK:
            plain += limits.max_wasm_module_bytes
    else:
        plain = 4 * limits.max_prompt_chars  # UTF-8: at most 4 bytes a character
    max_box = plain + protocol.SEALED_OVERHEAD_BYTES
    ids: list[str] = []
    for i, e in enumerate(envelopes):
        if len(e.worker_public_key) != 32:
            raise InvalidArgument(f"spec.sealed.envelopes[{i}].worker_public_key must be 32 bytes")
        if not 40 <= len(e.box) <= max_box:
            raise InvalidArgument(
                f"spec.sealed.envelopes[{i}].box is {len(e.box)} bytes; a box is 40 "
                f"(nonce and MAC) to {max_box} bytes"
            )
        ids.append(e.worker_public_key.hex())
    if len(set(ids)) != len(ids):
        raise InvalidArgument("spec.sealed.envelopes: one envelope per worker key")
    return ids


def _sealed_metadata(spec: common_pb2.JobSpec, limits: LimitsConfig) -> tuple[str, str]:
    """(task name, model) of a sealed spec, whose clear part must carry no payload."""
    if spec.WhichOneof("work") == "task":
        task = spec.task
        if not NAME_RE.match(task.name):
            raise InvalidArgument(_task_name_problem(task.name))
        if task.input or task.HasField("wasm"):
            raise InvalidArgument(
                "a sealed spec carries spec.task.input and spec.task.wasm in its envelopes only"
            )
        if task.use_llm and task.name not in LLM_TEXT_TASKS:
            raise InvalidArgument(
                f"spec.task.use_llm works only for {', '.join(sorted(LLM_TEXT_TASKS))}"
            )
        return task.name, ""
    llm = spec.llm
    if llm.prompt or llm.messages:
        raise InvalidArgument(
            "a sealed spec carries spec.llm.prompt and spec.llm.messages in its envelopes only"
        )
    if llm.model and not MODEL_RE.match(llm.model):
        raise InvalidArgument("spec.llm.model is not a valid model name")
    if llm.max_tokens > limits.max_llm_tokens:
        raise InvalidArgument(f"spec.llm.max_tokens must be at most {limits.max_llm_tokens}")
    if not 0.0 <= llm.temperature <= 2.0:
        raise InvalidArgument("spec.llm.temperature must be in [0, 2]")
    return "", llm.model


def spec_to_proto(spec: JobSpec) -> common_pb2.JobSpec:
    msg = common_pb2.JobSpec()
    msg.ParseFromString(spec.spec_bytes)
    return msg


def receipt_to_proto(r: Receipt) -> receipt_pb2.Receipt:
    return receipt_pb2.Receipt(
        body=r.body,
        worker_signature=r.worker_signature,
        coordinator_signature=r.coordinator_signature,
        receipt_sha256=r.sha256,
    )


def result_to_proto(r: Result) -> common_pb2.JobResult:
    return common_pb2.JobResult(
        output=r.output,
        content_type=r.content_type,
        usage=common_pb2.TokenUsage(
            prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens
        ),
    )


def money(amount_micros: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(currency=currency, amount_micros=amount_micros)


def job_to_proto(job: Job) -> coordinator_pb2.Job:
    msg = coordinator_pb2.Job(
        job_id=job.job_id,
        state=coordinator_pb2.JobState.ValueType(int(job.state)),
        spec=spec_to_proto(job.spec),
        price=money(job.price_micros, job.currency),
        quote_id=job.quote_id,
        client_id=job.client_id,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        worker_id=job.worker_id,
        payment=payment_to_proto(job.payment),
        created_at=ts(job.created_at),
        updated_at=ts(job.updated_at),
        last_sequence=job.last_sequence,
    )
    if job.result is not None:
        msg.result.CopyFrom(result_to_proto(job.result))
    if job.failure is not None:
        msg.failure.CopyFrom(
            common_pb2.JobFailure(code=job.failure.code, message=job.failure.message)
        )
    if job.receipt is not None:
        msg.receipt.CopyFrom(receipt_to_proto(job.receipt))
    return msg


def event_to_proto(e: Event) -> coordinator_pb2.JobEvent:
    msg = coordinator_pb2.JobEvent(
        sequence=e.sequence,
        job_id=e.job_id,
        state=coordinator_pb2.JobState.ValueType(int(e.state)),
        time=ts(e.time),
    )
    if e.kind is EventKind.PROGRESS:
        msg.progress.CopyFrom(coordinator_pb2.Progress(text=e.text, fraction=e.fraction))
    else:
        msg.state_change.CopyFrom(
            coordinator_pb2.StateChange(
                from_state=coordinator_pb2.JobState.ValueType(int(e.from_state or 0)),
                to_state=coordinator_pb2.JobState.ValueType(int(e.state)),
                reason=e.reason,
                worker_id=e.worker_id,
                attempt=e.attempt,
            )
        )
    return msg


def pairing_to_proto(p: Pairing) -> trust_pb2.Pairing:
    msg = trust_pb2.Pairing(
        pairing_id=p.pairing_id,
        client_id=p.client_id,
        worker_id=p.worker_id,
        created_at=ts(p.created_at),
    )
    if p.revoked_at is not None:
        msg.revoked_at.CopyFrom(ts(p.revoked_at))
    return msg


def worker_kind(value: int) -> WorkerKind | None:
    """None for WORKER_KIND_UNSPECIFIED; InvalidArgument for unknown values."""
    if value == 0:
        return None
    try:
        return WorkerKind(value)
    except ValueError:
        raise InvalidArgument(f"unknown worker kind {value}") from None


def _chars(value: str, limit: int, field: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}")


def _bytes(value: bytes, limit: int, field: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} bytes; the limit is {limit}")


def _entries(values: Sized, limit: int, field: str) -> None:
    if len(values) > limit:
        raise InvalidArgument(f"{field} has {len(values)} entries; the limit is {limit}")


def _job_ids(ids: list[str], field: str) -> None:
    _entries(ids, protocol.MAX_RUNNING_JOBS, field)
    for job_id in ids:
        _chars(job_id, protocol.MAX_JOB_ID_CHARS, f"{field} entry")


def hello_from_proto(h: worker_pb2.Hello) -> hubmod.WorkerHello:
    """Validates a Hello (every list and string within dispatchnet.protocol's limits)."""
    if len(h.public_key) != 32:
        raise InvalidArgument("hello.public_key must be a 32-byte ed25519 public key")
    kind = worker_kind(h.kind)
    if kind is None:
        raise InvalidArgument("hello.kind is required (desktop or seeker)")
    caps = h.capabilities
    _entries(caps.tasks, protocol.MAX_TASKS, "hello.capabilities.tasks")
    _entries(caps.llm_models, protocol.MAX_LLM_MODELS, "hello.capabilities.llm_models")
    _chars(h.version, protocol.MAX_VERSION_CHARS, "hello.version")
    _chars(h.agent_id, protocol.MAX_AGENT_ID_CHARS, "hello.agent_id")
    _job_ids([r.job_id for r in h.running], "hello.running")
    for name in caps.tasks:
        if not NAME_RE.match(name):
            raise InvalidArgument(f"hello.capabilities.tasks: {quoted(name)} is not a task name")
    for name in caps.llm_models:
        if not MODEL_RE.match(name):
            raise InvalidArgument(
                f"hello.capabilities.llm_models: {quoted(name)} is not a model name"
            )
    return hubmod.WorkerHello(
        public_key=bytes(h.public_key),
        kind=kind,
        tasks=frozenset(caps.tasks),
        llm_models=frozenset(caps.llm_models),
        max_concurrency=caps.max_concurrency,
        version=h.version,
        agent_id=h.agent_id,
        running=tuple((r.job_id, r.attempt) for r in h.running),
        batched_acks=h.batched_acks,
    )


def check_challenge_response(r: worker_pb2.ChallengeResponse) -> None:
    _bytes(r.signature, protocol.MAX_SIGNATURE_BYTES, "challenge_response.signature")
    _bytes(r.chain_signature, protocol.MAX_SIGNATURE_BYTES, "challenge_response.chain_signature")
    _bytes(r.solana_signature, protocol.MAX_SIGNATURE_BYTES, "challenge_response.solana_signature")


def check_worker_message(msg: worker_pb2.ConnectRequest) -> None:
    """Raises InvalidArgument when a message after the handshake exceeds a limit of
    dispatchnet.protocol (the ones worker.proto documents)."""
    kind = msg.WhichOneof("msg")
    if kind == "heartbeat":
        _job_ids(list(msg.heartbeat.running_job_ids), "heartbeat.running_job_ids")
    elif kind == "offer_response":
        r = msg.offer_response
        _chars(r.job_id, protocol.MAX_JOB_ID_CHARS, "offer_response.job_id")
        _chars(r.reason, protocol.MAX_REASON_CHARS, "offer_response.reason")
    elif kind == "progress":
        p = msg.progress
        _chars(p.job_id, protocol.MAX_JOB_ID_CHARS, "progress.job_id")
        _chars(p.text, protocol.MAX_PROGRESS_TEXT_CHARS, "progress.text")
        if not 0.0 <= p.fraction <= 1.0:  # NaN too
            raise InvalidArgument(f"progress.fraction is {p.fraction}; it must be in [0, 1]")
    elif kind == "completed":
        c = msg.completed
        _chars(c.job_id, protocol.MAX_JOB_ID_CHARS, "completed.job_id")
        _chars(
            c.result.content_type,
            protocol.MAX_CONTENT_TYPE_CHARS,
            "completed.result.content_type",
        )
        _bytes(c.receipt_body, protocol.MAX_RECEIPT_BODY_BYTES, "completed.receipt_body")
        _bytes(c.receipt_signature, protocol.MAX_SIGNATURE_BYTES, "completed.receipt_signature")
        _chars(c.traceparent, protocol.MAX_TRACEPARENT_CHARS, "completed.traceparent")
    elif kind == "failed":
        f = msg.failed
        _chars(f.job_id, protocol.MAX_JOB_ID_CHARS, "failed.job_id")
        _chars(f.failure.code, protocol.MAX_FAILURE_CODE_CHARS, "failed.failure.code")
        _chars(f.failure.message, protocol.MAX_FAILURE_MESSAGE_CHARS, "failed.failure.message")
        _chars(f.traceparent, protocol.MAX_TRACEPARENT_CHARS, "failed.traceparent")
    elif kind == "drain":
        _chars(msg.drain.reason, protocol.MAX_REASON_CHARS, "drain.reason")


def outbound_to_proto(msg: hubmod.Outbound, traceparent: str = "") -> worker_pb2.ConnectResponse:
    """The message for the worker; traceparent: an offer's trace context (see JobOffer)."""
    if isinstance(msg, hubmod.Offer):
        job = msg.job
        return worker_pb2.ConnectResponse(
            offer=worker_pb2.JobOffer(
                job_id=job.job_id,
                attempt=job.attempts,
                spec=spec_to_proto(job.spec),
                lease_expires_at=ts(job.lease_expires_at),
                time_limit_seconds=msg.time_limit_seconds,
                spec_sha256=job.spec.spec_sha256,
                price=money(job.price_micros, job.currency),
                payment=payment_to_proto(job.payment.signed()),
                client_id=job.client_id,
                traceparent=traceparent,
            )
        )
    if isinstance(msg, hubmod.Cancel):
        return worker_pb2.ConnectResponse(
            cancel=worker_pb2.CancelJobInstruction(
                job_id=msg.job_id, attempt=msg.attempt, reason=msg.reason
            )
        )
    if isinstance(msg, hubmod.ResultAck):
        return worker_pb2.ConnectResponse(result_ack=ack_to_proto(msg))
    if isinstance(msg, hubmod.AcksDue):
        return worker_pb2.ConnectResponse()  # acks alone (added by the caller)
    if isinstance(msg, hubmod.HeartbeatSettings):
        return worker_pb2.ConnectResponse(
            heartbeat_settings=worker_pb2.HeartbeatSettings(
                heartbeat_interval_seconds=msg.interval_seconds,
                eviction_seconds=msg.eviction_seconds,
            )
        )
    return worker_pb2.ConnectResponse(
        go_away=worker_pb2.GoAway(reason=msg.reason, retry_after_seconds=msg.retry_after_seconds)
    )


def ack_to_proto(ack: hubmod.ResultAck) -> worker_pb2.ResultAck:
    return worker_pb2.ResultAck(
        job_id=ack.job_id, attempt=ack.attempt, accepted=ack.accepted, reason=ack.reason
    )


def result_from_proto(r: common_pb2.JobResult) -> Result:
    return Result(bytes(r.output), r.content_type, r.usage.prompt_tokens, r.usage.completion_tokens)


def balance(b: Balance) -> coordinator_pb2.Balance:
    return coordinator_pb2.Balance(
        network=b.network, asset=b.asset, earned=str(b.earned), balance=str(b.balance)
    )


def earnings_to_proto(page: EarningsPage) -> coordinator_pb2.GetEarningsResponse:
    return coordinator_pb2.GetEarningsResponse(
        worker_id=page.worker_id,
        balances=[balance(b) for b in page.balances],
        jobs=[
            coordinator_pb2.JobEarning(
                job_id=e.job_id,
                network=e.network,
                asset=e.asset,
                price=str(e.amount),
                fee_bps=e.fee_bps,
                fee=str(e.fee),
                share=str(e.share),
                credited_at=ts(e.credited_at),
                reversed=e.reversed,
            )
            for e in page.jobs
        ],
        next_page_token=page.next_page_token,
        fee_bps=page.fee_bps,
        payouts=[
            coordinator_pb2.Payout(
                amount=str(p.amount),
                network=p.network,
                asset=p.asset,
                transaction=p.transaction,
                state=p.state.value,
                to=p.to,
                payout_id=p.payout_id,
                created_at=ts(p.created_at),
            )
            for p in page.payouts
        ],
    )
