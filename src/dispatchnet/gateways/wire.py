"""The gateway's HTTP bodies: OpenAI Chat Completions requests and answers (JSON and SSE
chunks), the /v1/tasks request and answer, /v1/models, and errors in OpenAI's shape
({"error": {"message", "type", "param", "code"}}). Pure functions, no I/O; bad input raises
HttpError with the status to answer.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import betterproto

from dispatchnet import protocol
from dispatchnet.sdk import (
    ComputeResult,
    DispatchError,
    InvalidRequest,
    llm_spec,
    task_spec,
    types,
)

ANY_MODEL = ("", "auto", "dispatch")  # model names that let any desktop answer
MAX_MODEL_CHARS = 128  # a worker's model names are at most this long (worker.proto)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI fields that change nothing here (sampling tweaks, bookkeeping): accepted, ignored
IGNORED = (
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "payment_required",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class HttpError(Exception):
    """An answer other than 200: status, OpenAI error code, the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        details: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, e: DispatchError) -> HttpError:
        """The SDK error's status, code and details (README "SDK", "Errors")."""
        details = e.to_dict()["error"]
        assert isinstance(details, dict)
        extra = {k: v for k, v in details.items() if k not in ("code", "message")}
        return cls(e.http_status, e.message, e.code, details=extra)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "server_error"),
            "param": self.param,
            "code": self.code,
        }
        error.update(self.details)
        return {"error": error}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> HttpError:
    return HttpError(400, message, code, param)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    if not raw.strip():
        raise bad("the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = _strict_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Dispatch's own request settings (chat: the `dispatch` object; tasks: top level)."""

    policy: str = "auto"
    privacy: str = "public"
    max_price_micros: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    spec: types.JobSpec
    model: str  # as asked; "" lets any desktop answer
    stream: bool
    include_usage: bool
    max_tokens: int  # 0: the worker's default
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class TaskRequest:
    name: str
    spec: types.JobSpec
    options: Options = field(default_factory=Options)


def _options(raw: object, where: str) -> Options:
    if raw is None:
        return Options()
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object", where)
    unknown = set(raw) - {"policy", "privacy", "max_price_micros"}
    if unknown:
        raise bad(f"{where} has unknown fields: {', '.join(sorted(unknown))}", where)
    return _settings(raw, f"{where}.")


def _settings(raw: Mapping[str, object], prefix: str) -> Options:
    policy = raw.get("policy", "auto")
    privacy = raw.get("privacy", "public")
    if policy not in ("auto", "fast", "cheap"):
        raise bad(f"{prefix}policy must be auto, fast or cheap", f"{prefix}policy")
    if privacy not in ("public", "private"):
        raise bad(f"{prefix}privacy must be public or private", f"{prefix}privacy")
    cap = raw.get("max_price_micros")
    if cap is not None and (not _is_int(cap) or not 0 <= int(str(cap)) < 2**63):
        raise bad(
            f"{prefix}max_price_micros must be a whole number of micro-USD",
            f"{prefix}max_price_micros",
        )
    return Options(str(policy), str(privacy), None if cap is None else int(str(cap)))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _content(content: object, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(
                    "only text content parts are supported",
                    f"messages[{i}].content",
                    "unsupported_content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad("a text part needs a string `text`", f"messages[{i}].content")
            texts.append(text)
        return "".join(texts)
    raise bad("content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """A Chat Completions request as an LLM job. Refuses what the network cannot honour
    (tools, n > 1, stop sequences, logprobs, non-text content or response formats)."""
    model = body.get("model")
    if model is None:
        raise bad("model is required (`auto` lets any connected model answer)", "model")
    if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
        raise bad(f"model must be a string of at most {MAX_MODEL_CHARS} characters", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    if len(messages) > protocol.MAX_LLM_MESSAGES:
        raise bad(f"messages may hold at most {protocol.MAX_LLM_MESSAGES} messages", "messages")
    conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad("each message must be an object with role and content", f"messages[{i}]")
        role = ROLES.get(str(m.get("role")))
        if role is None:
            raise bad(
                "role must be system, developer, user or assistant (tools are not supported)",
                f"messages[{i}].role",
            )
        conversation.append({"role": role, "content": _content(m.get("content"), i)})
    refused = {
        "tools": bool(body.get("tools")),
        "functions": bool(body.get("functions")),
        "tool_choice": body.get("tool_choice") not in (None, "none"),
        "function_call": body.get("function_call") not in (None, "none"),
        "n": body.get("n") is not None and (type(body.get("n")) is not int or body.get("n") != 1),
        "stop": body.get("stop") not in (None, [], ""),
        "logprobs": bool(body.get("logprobs")),
        "top_logprobs": bool(body.get("top_logprobs")),
        "logit_bias": bool(body.get("logit_bias")),
        "audio": body.get("audio") is not None,
        "modalities": body.get("modalities") not in (None, ["text"]),
        "response_format": body.get("response_format") not in (None, {"type": "text"}),
    }
    for name, is_refused in refused.items():
        if is_refused:
            raise bad(f"{name} is not supported by this gateway", name, "unsupported_parameter")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = 0
    elif not _is_int(max_tokens) or not 1 <= max_tokens < 2**32:
        raise bad("max_tokens must be a positive whole number", "max_tokens")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2  # before float(): a huge integer would overflow it
    ):
        raise bad("temperature must be a number in [0, 2]", "temperature")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    options = _options(body.get("dispatch"), "dispatch")
    try:
        spec = llm_spec(
            conversation,
            None if model in ANY_MODEL else model,
            int(max_tokens),
            float(temperature),
            options.policy,
            options.privacy,
        )
    except InvalidRequest as e:
        raise bad(e.message) from None
    return ChatRequest(
        spec,
        "" if model in ANY_MODEL else model,
        bool(stream),
        bool(stream_options.get("include_usage")),
        int(max_tokens),
        options,
    )


def parse_task(name: str, body: Mapping[str, Any]) -> TaskRequest:
    """POST /v1/tasks/{name}: {"input": text or any JSON, or "input_base64"; "policy",
    "privacy", "use_llm", "max_price_micros"; "wasm_base64" with the name "wasm"}."""
    if not protocol.TASK_NAME.fullmatch(name):
        raise bad(f"a task name is {protocol.TASK_NAME_RULE}", "name")
    known = {"input", "input_base64", "policy", "privacy", "use_llm", "wasm_base64"}
    unknown = set(body) - known - {"max_price_micros"}
    if unknown:
        raise bad(f"unknown fields: {', '.join(sorted(unknown))}", sorted(unknown)[0])
    if "input" in body and "input_base64" in body:
        raise bad("send input or input_base64, not both", "input_base64")
    data: bytes | str | object = b""
    if "input_base64" in body:
        data = _b64(body["input_base64"], "input_base64")
    elif "input" in body:
        data = body["input"]
    use_llm = body.get("use_llm", False)
    if not isinstance(use_llm, bool):
        raise bad("use_llm must be true or false", "use_llm")
    wasm = _b64(body["wasm_base64"], "wasm_base64") if "wasm_base64" in body else None
    options = _settings(body, "")
    try:
        spec = task_spec(name, data, options.policy, options.privacy, use_llm, wasm)
    except InvalidRequest as e:
        raise bad(e.message) from None
    return TaskRequest(name, spec, options)


def _b64(value: object, param: str) -> bytes:
    if not isinstance(value, str):
        raise bad(f"{param} must be a base64 string", param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param} is not valid base64", param) from None


# --- answers ----------------------------------------------------------------------------------


def _msg(m: betterproto.Message | None) -> dict[str, Any] | None:
    snake = betterproto.Casing.SNAKE
    return None if m is None else m.to_dict(casing=snake)  # type: ignore[arg-type]


def dispatch_info(result: ComputeResult) -> dict[str, Any]:
    """The `dispatch` field: where the job ran, what it cost and its signed receipt (proto
    JSON, bytes as base64: `dispatch receipt verify` reads it)."""
    return {
        "job_id": result.job_id,
        "route": result.route,
        "network": result.network,
        "price": {
            "amount_micros": result.price.amount_micros,
            "currency": result.price.currency,
            "estimated": result.price.estimated,
        },
        "latency_ms": round(result.latency_ms, 3),
        "worker": None if result.worker is None else dict(result.worker.__dict__),
        "payment": _msg(result.payment),
        "receipt": _msg(result.receipt),
        "skipped": [s.to_dict() for s in result.skipped],
    }


def usage(result: ComputeResult) -> dict[str, int]:
    u = result.usage or types.TokenUsage()
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def finish_reason(result: ComputeResult, max_tokens: int) -> str:
    """ "length" when the reply used every token asked for, else "stop"."""
    done = result.usage.completion_tokens if result.usage else 0
    return "length" if max_tokens and done >= max_tokens else "stop"


def completion(
    result: ComputeResult, model: str, max_tokens: int, completion_id: str, created: int
) -> dict[str, Any]:
    """A chat.completion object; model: the model that answered ("" when unknown)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model or "dispatch",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.output, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result, max_tokens),
            }
        ],
        "usage": usage(result),
        "dispatch": dispatch_info(result),
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A chat.completion.chunk; delta None gives one with no choices (the usage chunk)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model or "dispatch",
        "choices": choices,
        **extra,
    }


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a double's range")
    return value


def _strict_json(data: bytes) -> object:
    """data parsed as strict JSON: ValueError for NaN, Infinity and numbers past a
    double's range, which Python's parser takes and no JSON answer can carry."""
    return json.loads(data, parse_constant=_not_json, parse_float=_finite)


def task_answer(result: ComputeResult, name: str) -> dict[str, Any]:
    """POST /v1/tasks/{name}'s answer: the output (parsed when it is JSON) and `dispatch`."""
    output: object = result.output
    if result.content_type.split(";")[0].strip() == "application/json":
        try:
            output = _strict_json(result.output_bytes)
        except ValueError:
            pass  # not JSON a JSON answer can carry: the text as it is
    return {
        "object": "task.result",
        "task": name,
        "output": output,
        "content_type": result.content_type,
        "dispatch": dispatch_info(result),
    }


def models(workers: list[types.WorkerInfo]) -> list[dict[str, Any]]:
    """The models connected desktops serve, as OpenAI model objects (with how many
    connected workers serve each)."""
    count: dict[str, int] = {}
    for w in workers:
        if w.kind == types.WorkerKind.DESKTOP and not w.draining:
            for m in w.llm_models:
                count[m] = count.get(m, 0) + 1
    return [
        {"id": m, "object": "model", "created": 0, "owned_by": "dispatch", "workers": n}
        for m, n in sorted(count.items())
    ]
