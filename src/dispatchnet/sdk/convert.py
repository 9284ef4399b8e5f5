"""The SDK boundary: job specs built from call arguments, and protobuf messages (what
CoordinatorClient speaks) turned into the public betterproto dataclasses and back, through
their wire bytes (both implement the same dispatch.v1 schema)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TypeVar

import betterproto
from google.protobuf.message import Message

from dispatch.v1 import common_pb2
from dispatchnet.protocol import MAX_LLM_MESSAGES
from dispatchnet.sdk import types
from dispatchnet.sdk.errors import InvalidRequest

T = TypeVar("T", bound=betterproto.Message)
P = TypeVar("P", bound=Message)

ROLES = ("system", "user", "assistant")
MAX_VERIFY = 3  # JobSpec.verify's largest value (common.proto)
PolicyLike = types.Policy | str
PrivacyLike = types.Privacy | str
MessageLike = types.ChatMessage | Mapping[str, str]


def to_types(msg: Message, cls: type[T]) -> T:
    """A protobuf message as the SDK's dataclass of the same dispatch.v1 message."""
    return cls().parse(msg.SerializeToString())


def to_pb(msg: betterproto.Message, cls: type[P]) -> P:
    """An SDK dataclass as the protobuf message of the same dispatch.v1 message."""
    return cls.FromString(bytes(msg))


def parse_policy(value: PolicyLike) -> types.Policy:
    """ "auto" | "fast" | "cheap" (any case) or a types.Policy."""
    if isinstance(value, types.Policy):
        return value
    try:
        return types.Policy.from_string(str(value).upper())
    except ValueError:
        raise InvalidRequest(f"policy must be auto, fast or cheap, not {value!r}") from None


def parse_privacy(value: PrivacyLike) -> types.Privacy:
    """ "public" | "private" (any case) or a types.Privacy."""
    if isinstance(value, types.Privacy):
        return value
    try:
        return types.Privacy.from_string(str(value).upper())
    except ValueError:
        raise InvalidRequest(f"privacy must be public or private, not {value!r}") from None


def chat_messages(messages: Sequence[MessageLike]) -> list[types.ChatMessage]:
    """{"role", "content"} mappings (the OpenAI shape) or ChatMessage objects."""
    out = []
    for i, m in enumerate(messages):
        role: object
        content: object
        if isinstance(m, types.ChatMessage):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise InvalidRequest(f"messages[{i}] must be a mapping with role and content")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        out.append(types.ChatMessage(role=str(role), content=content))
    return out


def llm_spec(
    prompt: str | Sequence[MessageLike],
    model: str | None = None,
    max_tokens: int = 0,
    temperature: float = 0.0,
    policy: PolicyLike = "auto",
    privacy: PrivacyLike = "public",
) -> types.JobSpec:
    """An LLM job: a prompt (one user message) or a conversation (see ComputeRouter.run_llm);
    InvalidRequest for arguments the coordinator would refuse."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        llm = types.LlmRequest(prompt=prompt)
    else:
        if not prompt:
            raise InvalidRequest("messages is empty")
        if len(prompt) > MAX_LLM_MESSAGES:
            raise InvalidRequest(f"messages may hold at most {MAX_LLM_MESSAGES} messages")
        llm = types.LlmRequest(messages=chat_messages(prompt))
    if not 0 <= max_tokens <= 2**32 - 1:
        raise InvalidRequest("max_tokens must be 0 (the coordinator's default) or more")
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequest("temperature must be in [0, 2]")
    llm.model = model or ""
    llm.max_tokens = max_tokens
    llm.temperature = temperature
    return types.JobSpec(llm=llm, policy=parse_policy(policy), privacy=parse_privacy(privacy))


def task_input(value: bytes | str | object) -> bytes:
    """A task's input bytes: bytes as they are, str as UTF-8, anything else as JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"the task input is not bytes, text or JSON: {e}") from None


def task_spec(
    name: str,
    data: bytes | str | object = b"",
    policy: PolicyLike = "auto",
    privacy: PrivacyLike = "public",
    use_llm: bool = False,
    wasm: bytes | None = None,
    verify: int = 0,
) -> types.JobSpec:
    """A TASK job: a built-in task by name, or a WebAssembly module (name "wasm"); see
    ComputeRouter.run_task."""
    if not name:
        raise InvalidRequest("the task name is empty")
    if verify not in range(MAX_VERIFY + 1):
        raise InvalidRequest(
            f"verify is the number of independent runs to compare: 2 or 3 (0 or 1: one run), "
            f"not {verify}"
        )
    task = types.TaskRequest(name=name, input=task_input(data), use_llm=use_llm)
    if wasm is not None:
        if name != "wasm":
            raise InvalidRequest('a WebAssembly module goes with the task name "wasm"')
        task.wasm = types.WasmModule(module=wasm)
    return types.JobSpec(
        task=task, policy=parse_policy(policy), privacy=parse_privacy(privacy), verify=verify
    )


def spec_pb(spec: types.JobSpec) -> common_pb2.JobSpec:
    pb = to_pb(spec, common_pb2.JobSpec)
    if pb.WhichOneof("work") is None:
        raise InvalidRequest("the job spec has neither llm nor task")
    return pb
