"""The built-in task catalogue."""

from __future__ import annotations

import hashlib
import json

import pytest

from dispatchnet.worker.tasks import TASK_NAMES, TaskError, TaskOutput, run_task


def test_task_names_are_sorted_and_complete() -> None:
    assert TASK_NAMES == ["echo", "sha256", "sleep", "word_count"]


async def test_unknown_task() -> None:
    with pytest.raises(TaskError) as err:
        await run_task("nope", b"")
    assert err.value.code == "unknown_task"
    assert not err.value.retryable


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b'{"a": [1, 2]}', "application/json"),
        (b'"text"', "application/json"),
        (b"not json", "application/octet-stream"),
        (b"", "application/octet-stream"),
        (b"\xff\xfe\x00binary", "application/octet-stream"),
        (b"[" * 100_000, "application/octet-stream"),
        ('"hi"'.encode("utf-16"), "application/octet-stream"),
    ],
)
async def test_echo(data: bytes, content_type: str) -> None:
    assert await run_task("echo", data) == TaskOutput(data, content_type)


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256))])
async def test_sha256(data: bytes) -> None:
    out = await run_task("sha256", data)
    assert out == TaskOutput(hashlib.sha256(data).hexdigest().encode(), "text/plain")


async def test_sha256_known_vector() -> None:
    out = await run_task("sha256", b"abc")
    assert out.output == b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("ms", [0, 5])
async def test_sleep(ms: int) -> None:
    out = await run_task("sleep", json.dumps({"ms": ms}).encode())
    assert out.content_type == "application/json"
    assert json.loads(out.output) == {"slept_ms": ms}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[5]",
        b"{}",
        b'{"ms": -1}',
        b'{"ms": 600001}',
        b'{"ms": 1.5}',
        b'{"ms": "10"}',
        b'{"ms": true}',
        b'{"ms": null}',
    ],
)
async def test_sleep_bad_input(data: bytes) -> None:
    with pytest.raises(TaskError) as err:
        await run_task("sleep", data)
    assert err.value.code == "bad_input"
    assert not err.value.retryable


@pytest.mark.parametrize(
    ("data", "words", "characters"),
    [
        (b"hello world", 2, 11),
        (b"  spaced\tout\nwords  ", 3, 20),
        (b"", 0, 0),
        ("caf\u00e9 \u00fcber".encode(), 2, 9),
        (b'"a JSON string"', 3, 13),
        (b"42", 1, 2),
        (b'{"text": "x"}', 2, 13),
    ],
)
async def test_word_count(data: bytes, words: int, characters: int) -> None:
    out = await run_task("word_count", data)
    assert out.content_type == "application/json"
    assert json.loads(out.output) == {"words": words, "characters": characters}


async def test_word_count_rejects_non_utf8() -> None:
    with pytest.raises(TaskError) as err:
        await run_task("word_count", b"\xff\xfe\xfd")
    assert err.value.code == "bad_input"
    assert not err.value.retryable


async def test_outputs_are_deterministic() -> None:
    for name, data in [("sleep", b'{"ms": 0}'), ("word_count", b"a b c")]:
        first = await run_task(name, data)
        assert await run_task(name, data) == first
