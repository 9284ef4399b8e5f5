"""Hosted fallback: chat completions at OpenAI or Anthropic (bring your own key), through
their official SDKs, for jobs the Dispatch network cannot serve.

    providers = providers_from_env(("openai", "anthropic"))   # those with a key set

OpenAIProvider reads OPENAI_API_KEY and OPENAI_BASE_URL (any OpenAI-compatible server:
llama.cpp's, vLLM, Ollama's /v1 ...); AnthropicProvider reads ANTHROPIC_API_KEY and
ANTHROPIC_BASE_URL. Each has a default model (DISPATCH_OPENAI_MODEL /
DISPATCH_ANTHROPIC_MODEL override it). What a call cost is estimated from the token usage
the provider reports and a price table (PriceTable, micro-USD per million tokens).
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from dispatchnet.sdk.errors import HostedError, InvalidRequest
from dispatchnet.sdk.result import Route

if TYPE_CHECKING:
    import anthropic
    import openai

# The most of one hosted reply read off the wire (non-streamed or streamed): the providers'
# SDKs read a non-streamed body whole, with no limit of their own, before anything here
# can check its length (a 100 MB body took 411 MB). Far above any reply max_tokens allows.
MAX_REPLY_BYTES = 16 * 1024 * 1024
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
ANTHROPIC_DEFAULT_MODEL = "claude-3-5-haiku-latest"
DEFAULT_MAX_TOKENS = 256
"""max_tokens sent to a provider when the job leaves it at 0 (as a desktop worker does)."""


@dataclass(frozen=True)
class HostedRequest:
    """One chat completion: OpenAI-shaped messages ({"role", "content"})."""

    messages: list[dict[str, str]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    model: str = ""
    """"": the provider's default model."""
    json_schema: dict[str, Any] | None = None
    """Constrain the answer to JSON with this schema where the API can (OpenAI)."""


@dataclass(frozen=True)
class HostedReply:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class HostedProvider(Protocol):
    """A hosted chat API. Failures raise HostedError (never the provider SDK's errors)."""

    @property
    def route(self) -> Route:
        """The API it speaks: "openai" or "anthropic" (ComputeResult.route)."""
        ...

    def model_for(self, request: HostedRequest) -> str:
        """The model a request runs on."""
        ...

    async def complete(self, request: HostedRequest) -> HostedReply: ...

    def stream(self, request: HostedRequest) -> AsyncGenerator[str | HostedReply, None]:
        """The reply's text pieces as they come, then the whole HostedReply."""
        ...

    async def close(self) -> None: ...


# --- prices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPrice:
    """micro-USD per million tokens ($0.15 per 1M tokens = 150_000)."""

    input_per_mtok: int
    output_per_mtok: int


DEFAULT_PRICES: dict[str, ModelPrice] = {
    # list prices per 1M tokens (input, output), USD; configure your own with PriceTable
    "gpt-4o-mini": ModelPrice(150_000, 600_000),
    "gpt-4o": ModelPrice(2_500_000, 10_000_000),
    "gpt-4.1-mini": ModelPrice(400_000, 1_600_000),
    "gpt-4.1": ModelPrice(2_000_000, 8_000_000),
    "claude-3-5-haiku": ModelPrice(800_000, 4_000_000),
    "claude-haiku-4-5": ModelPrice(1_000_000, 5_000_000),
    "claude-sonnet-4": ModelPrice(3_000_000, 15_000_000),
}


class PriceTable:
    """Model name -> ModelPrice. A model matches its own entry, else the longest entry its
    name starts with ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini")."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    def lookup(self, model: str) -> ModelPrice | None:
        if model in self.prices:
            return self.prices[model]
        found = [k for k in self.prices if model.startswith(k)]
        return self.prices[max(found, key=len)] if found else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> int | None:
        """micro-USD, rounded up; None for a model the table does not price."""
        p = self.lookup(model)
        if p is None:
            return None
        total = prompt_tokens * p.input_per_mtok + completion_tokens * p.output_per_mtok
        return math.ceil(total / 1_000_000)

    def bound(self, model: str, request: HostedRequest) -> int | None:
        """An upper bound of a request's cost: one token per byte of the messages (plus a few
        per message) and all of max_tokens."""
        prompt = sum(len(m["content"].encode()) + 8 for m in request.messages)
        return self.cost(model, prompt, request.max_tokens)


# --- replies read within a bound ------------------------------------------------------------


class ReplyTooLarge(Exception):
    """A provider's reply went past MAX_REPLY_BYTES: reading it stopped there."""


def bounded_http_client(sdk: Any, limit: int = MAX_REPLY_BYTES) -> Any:
    """The provider SDK's own httpx client (sdk.DefaultAsyncHttpxClient: its defaults),
    whose responses stop being read past `limit` bytes (ReplyTooLarge, which the SDK
    reports as a connection error caused by it). The SDKs are built on httpx2 (httpx's
    fork), whose transport classes they require."""
    import httpx2 as httpx

    class Body(httpx.AsyncByteStream):
        def __init__(self, inner: httpx.AsyncByteStream) -> None:
            self.inner = inner

        async def __aiter__(self) -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in self.inner:
                seen += len(chunk)
                if seen > limit:
                    raise ReplyTooLarge(f"the reply is larger than {limit:,} bytes")
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class Transport(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            stream = response.stream
            assert isinstance(stream, httpx.AsyncByteStream)
            response.stream = Body(stream)
            return response

        async def aclose(self) -> None:
            await self.inner.aclose()

    return sdk.DefaultAsyncHttpxClient(transport=Transport())


def _what(e: Exception) -> str:
    """An SDK error's message, naming a ReplyTooLarge behind it."""
    message = str(getattr(e, "message", "") or e)
    cause = e.__cause__
    return f"{message} ({cause})" if isinstance(cause, ReplyTooLarge) else message


# --- OpenAI ---------------------------------------------------------------------------------


class OpenAIProvider:
    """Chat completions through the official `openai` SDK (AsyncOpenAI): OpenAI itself, or
    any OpenAI-compatible server at base_url."""

    route: Route = "openai"

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 1,
    ) -> None:
        """api_key: default OPENAI_API_KEY; base_url: default OPENAI_BASE_URL, else OpenAI's
        API; model: default DISPATCH_OPENAI_MODEL, else gpt-4o-mini. InvalidRequest (a
        ValueError) without a key."""
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        if not self.api_key:
            raise InvalidRequest("the OpenAI provider needs an API key (OPENAI_API_KEY)")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.model = model or os.environ.get("DISPATCH_OPENAI_MODEL") or OPENAI_DEFAULT_MODEL
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: openai.AsyncOpenAI | None = None

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r}, model={self.model!r})"

    def _api(self) -> openai.AsyncOpenAI:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=bounded_http_client(openai),
            )
        return self._client

    def model_for(self, request: HostedRequest) -> str:
        return request.model or self.model

    def _args(self, request: HostedRequest) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.json_schema is not None:
            args["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "result", "schema": request.json_schema},
            }
        return args

    def _error(self, e: Exception) -> HostedError:
        status = int(getattr(e, "status_code", 0) or 0)
        message = _what(e)
        what = f"HTTP {status}: {message}" if status else message
        return HostedError(f"openai: {what}", [("openai", what)], status)

    async def complete(self, request: HostedRequest) -> HostedReply:
        import openai

        try:
            resp = await self._api().chat.completions.create(**self._args(request))
        except openai.OpenAIError as e:
            raise self._error(e) from e
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        usage = resp.usage
        return HostedReply(
            text,
            resp.model or self.model_for(request),
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def stream(self, request: HostedRequest) -> AsyncGenerator[str | HostedReply, None]:
        import openai

        parts: list[str] = []
        usage: Any = None
        model = ""
        try:
            stream = await self._api().chat.completions.create(
                **self._args(request), stream=True, stream_options={"include_usage": True}
            )
            async with stream:
                async for chunk in stream:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            parts.append(text)
                            yield text
        except openai.OpenAIError as e:
            raise self._error(e) from e
        completion = int(getattr(usage, "completion_tokens", 0) or 0) or len(parts)
        yield HostedReply(
            "".join(parts),
            model or self.model_for(request),
            int(getattr(usage, "prompt_tokens", 0) or 0),
            completion,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# --- Anthropic ------------------------------------------------------------------------------


class AnthropicProvider:
    """The Messages API through the official `anthropic` SDK (AsyncAnthropic). System
    messages become the `system` parameter. The temperature is not sent (the Messages API
    of the pinned SDK takes none), nor a JSON schema: text tasks get their JSON from the
    prompt, and their answer is parsed as a worker's LLM would parse it."""

    route: Route = "anthropic"

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 1,
    ) -> None:
        """api_key: default ANTHROPIC_API_KEY; base_url: default ANTHROPIC_BASE_URL, else
        Anthropic's API; model: default DISPATCH_ANTHROPIC_MODEL, else
        claude-3-5-haiku-latest. InvalidRequest (a ValueError) without a key."""
        self.api_key = api_key or os.environ.get("ANTHROPIC_API_KEY", "")
        if not self.api_key:
            raise InvalidRequest("the Anthropic provider needs an API key (ANTHROPIC_API_KEY)")
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        self.model = model or os.environ.get("DISPATCH_ANTHROPIC_MODEL") or ANTHROPIC_DEFAULT_MODEL
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: anthropic.AsyncAnthropic | None = None

    def __repr__(self) -> str:
        return f"AnthropicProvider(base_url={self.base_url!r}, model={self.model!r})"

    def _api(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            import anthropic

            self._client = anthropic.AsyncAnthropic(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=bounded_http_client(anthropic),
            )
        return self._client

    def model_for(self, request: HostedRequest) -> str:
        return request.model or self.model

    def _args(self, request: HostedRequest) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
        args: dict[str, Any] = {
            "model": self.model_for(request),
            "max_tokens": request.max_tokens,
            "messages": [m for m in request.messages if m["role"] != "system"],
        }
        if system:
            args["system"] = system
        return args

    def _error(self, e: Exception) -> HostedError:
        status = int(getattr(e, "status_code", 0) or 0)
        message = _what(e)
        what = f"HTTP {status}: {message}" if status else message
        return HostedError(f"anthropic: {what}", [("anthropic", what)], status)

    async def complete(self, request: HostedRequest) -> HostedReply:
        import anthropic

        try:
            resp = await self._api().messages.create(**self._args(request))
        except anthropic.AnthropicError as e:
            raise self._error(e) from e
        text = "".join(getattr(b, "text", "") for b in resp.content if b.type == "text")
        return HostedReply(
            text,
            resp.model or self.model_for(request),
            int(resp.usage.input_tokens or 0),
            int(resp.usage.output_tokens or 0),
        )

    async def stream(self, request: HostedRequest) -> AsyncGenerator[str | HostedReply, None]:
        import anthropic

        parts: list[str] = []
        model, prompt_tokens, completion_tokens = "", 0, 0
        try:
            stream = await self._api().messages.create(**self._args(request), stream=True)
            async with stream:
                async for event in stream:
                    kind = event.type
                    if kind == "message_start":
                        model = event.message.model
                        prompt_tokens = int(event.message.usage.input_tokens or 0)
                    elif kind == "content_block_delta":
                        text = cast(str, getattr(event.delta, "text", "") or "")
                        if text:
                            parts.append(text)
                            yield text
                    elif kind == "message_delta":
                        completion_tokens = int(event.usage.output_tokens or 0)
        except anthropic.AnthropicError as e:
            raise self._error(e) from e
        yield HostedReply(
            "".join(parts), model or self.model_for(request), prompt_tokens, completion_tokens
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# --- from the environment -------------------------------------------------------------------

PROVIDERS: dict[str, tuple[str, type[OpenAIProvider] | type[AnthropicProvider]]] = {
    "openai": ("OPENAI_API_KEY", OpenAIProvider),
    "anthropic": ("ANTHROPIC_API_KEY", AnthropicProvider),
}


def providers_from_env(
    preference: Sequence[str] = ("openai", "anthropic"),
) -> list[HostedProvider]:
    """A provider for each name in `preference`, in that order, whose API key is set in the
    environment. InvalidRequest (a ValueError) for a name that is not "openai" or
    "anthropic"."""
    out: list[HostedProvider] = []
    for name in preference:
        if name not in PROVIDERS:
            raise InvalidRequest(f"unknown hosted provider {name!r} (openai or anthropic)")
        env, cls = PROVIDERS[name]
        if os.environ.get(env):
            out.append(cls())
    return out
