"""The built-in task catalogue."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from dispatchnet.worker.tasks import TASK_NAMES, TaskError, TaskOutput, run_task


def test_task_names_are_sorted_and_complete() -> None:
    assert TASK_NAMES == [
        "classify",
        "echo",
        "extract_json",
        "sha256",
        "sleep",
        "summarize",
        "word_count",
    ]


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


# --- text tasks ----------------------------------------------------------------------------


async def run_json(name: str, value: object) -> object:
    out = await run_task(name, json.dumps(value).encode())
    assert out.content_type == "application/json"
    return json.loads(out.output)


SOLAR = (
    "Solar power is growing fast. Solar panels are cheaper every year, and solar farms now "
    "supply cheap power to millions. Critics worry about storage. Batteries store solar "
    "power for the night! The weather was nice."
)


@pytest.mark.parametrize(
    ("request_", "summary"),
    [
        (
            {"text": SOLAR},
            "Solar panels are cheaper every year, and solar farms now supply cheap power to "
            "millions. Batteries store solar power for the night!",
        ),
        (
            {"text": SOLAR, "max_sentences": 1},
            "Solar panels are cheaper every year, and solar farms now supply cheap power to "
            "millions.",
        ),
        # ties go to the earlier sentence; the chosen ones keep their order
        ({"text": "Cats purr. Dogs bark. Cats nap.", "max_sentences": 1}, "Cats purr."),
        ({"text": "Cats purr. Dogs bark. Cats nap."}, "Cats purr. Cats nap."),
        # fewer sentences than asked for: all of them, whitespace collapsed
        ({"text": "One.  Two\nlines.\n\nThree", "max_sentences": 5}, "One. Two lines. Three"),
        ({"text": 'He said "stop." Then he left.', "max_sentences": 1}, 'He said "stop."'),
        ({"text": ""}, ""),
    ],
)
async def test_summarize(request_: dict[str, object], summary: str) -> None:
    assert await run_json("summarize", request_) == {"summary": summary}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            {
                "text": "The team won the match after two late goals; fans of the sport cheered.",
                "labels": ["sports", "politics", "technology"],
            },
            {"label": "sports", "scores": {"sports": 1.0, "politics": 0.0, "technology": 0.0}},
        ),
        (
            {
                "text": "The election debate covered new technology for voting machines and "
                "the technology budget.",
                "labels": ["politics", "technology", "election"],
            },
            {
                "label": "technology",
                "scores": {"politics": 0.0, "technology": 0.6667, "election": 0.3333},
            },
        ),
        # a label's score is the mean over its stems: machin 2, learn 3 -> 2.5
        (
            {
                "text": "Machine learning models learn from data; machines learned quickly.",
                "labels": ["machine learning", "cooking"],
            },
            {"label": "machine learning", "scores": {"machine learning": 1.0, "cooking": 0.0}},
        ),
        # ties go to the label listed first
        (
            {"text": "apples and oranges", "labels": ["orange", "apple"]},
            {"label": "orange", "scores": {"orange": 0.5, "apple": 0.5}},
        ),
        (
            {"text": "nothing relevant here", "labels": ["cats", "dogs"]},
            {"label": "cats", "scores": {"cats": 0.0, "dogs": 0.0}},
        ),
    ],
)
async def test_classify(request_: dict[str, object], expected: dict[str, object]) -> None:
    assert await run_json("classify", request_) == expected


PROFILE = """Name: Ada Lovelace
Email: ada@example.org
Age: 36
- Website: https://example.org/ada
status=active retries=3 ratio=0.5 note="two words"
Born 10 December 1815; met Babbage on June 5th, 1833. Review on 2024-03-05, call at \
2024-03-05T10:30:00Z.
Total: 1,200.50 for 3 items (15% off), version 1.2.3, see www.example.com/docs."""


@pytest.mark.parametrize(
    ("request_", "data"),
    [
        (
            {"text": PROFILE},
            {
                "name": "Ada Lovelace",
                "email": "ada@example.org",
                "age": 36,
                "website": "https://example.org/ada",
                "status": "active",
                "retries": 3,
                "ratio": 0.5,
                "note": "two words",
                "total": "1,200.50 for 3 items (15% off), version 1.2.3, see www.example.com/docs.",
                "emails": ["ada@example.org"],
                "urls": ["https://example.org/ada", "www.example.com/docs"],
                "dates": ["1815-12-10", "1833-06-05", "2024-03-05", "2024-03-05T10:30:00+00:00"],
                "numbers": [36, 3, 0.5, 1200.5, 3, 15],
            },
        ),
        (
            {
                "text": "Name: Ada\nE-mail: x@y.io\nphone=555-1234",
                "fields": ["Name", "e-mail", "emails", "phone", "missing"],
            },
            {
                "Name": "Ada",
                "e-mail": "x@y.io",
                "emails": ["x@y.io"],
                "phone": "555-1234",
                "missing": None,
            },
        ),
        # the first value of a key wins; a pair cannot replace one of the lists
        (
            {"text": "id: 1\nid: 2\nemails: none"},
            {"id": 1, "emails": [], "urls": [], "dates": [], "numbers": [1, 2]},
        ),
        # an impossible date is neither a date nor numbers
        (
            {"text": "due 2024-02-30 or 2024-02-29"},
            {"emails": [], "urls": [], "dates": ["2024-02-29"], "numbers": []},
        ),
        (
            {"text": "(see https://en.wikipedia.org/wiki/Ada_(language)), or http://x.org/y."},
            {
                "emails": [],
                "urls": ["https://en.wikipedia.org/wiki/Ada_(language)", "http://x.org/y"],
                "dates": [],
                "numbers": [],
            },
        ),
        ({"text": ""}, {"emails": [], "urls": [], "dates": [], "numbers": []}),
    ],
)
async def test_extract_json(request_: dict[str, object], data: dict[str, object]) -> None:
    assert await run_json("extract_json", request_) == {"data": data}


@pytest.mark.parametrize(
    ("name", "data"),
    [
        *[
            (name, data)
            for name in ("summarize", "classify", "extract_json")
            for data in [b"", b"not json", b"[]", b'"text"', b"{}", b'{"text": 5}', b"\xff"]
        ],
        ("summarize", b'{"text": "a", "max_sentences": 0}'),
        ("summarize", b'{"text": "a", "max_sentences": 1.5}'),
        ("summarize", b'{"text": "a", "max_sentences": "2"}'),
        ("summarize", b'{"text": "a", "max_sentences": true}'),
        ("classify", b'{"text": "a"}'),
        ("classify", b'{"text": "a", "labels": "x,y"}'),
        ("classify", b'{"text": "a", "labels": ["only"]}'),
        ("classify", b'{"text": "a", "labels": ["x", 1]}'),
        ("classify", b'{"text": "a", "labels": ["x", " "]}'),
        ("classify", b'{"text": "a", "labels": ["x", "x"]}'),
        ("extract_json", b'{"text": "a", "fields": "name"}'),
        ("extract_json", b'{"text": "a", "fields": ["name", 2]}'),
        ("extract_json", b'{"text": "a", "fields": [""]}'),
    ],
)
async def test_text_tasks_bad_input(name: str, data: bytes) -> None:
    with pytest.raises(TaskError) as err:
        await run_task(name, data)
    assert err.value.code == "bad_input"
    assert not err.value.retryable
    assert name in err.value.message


async def test_text_tasks_are_deterministic() -> None:
    for name, value in [
        ("summarize", {"text": SOLAR}),
        ("classify", {"text": SOLAR, "labels": ["energy", "solar power"]}),
        ("extract_json", {"text": PROFILE}),
    ]:
        data = json.dumps(value).encode()
        first = await run_task(name, data)
        assert await run_task(name, data) == first


async def test_deeply_nested_json_is_refused_even_with_a_raised_recursion_limit() -> None:
    # Some libraries (py_ecc, via web3) raise the recursion limit process-wide; the C JSON
    # parser would then overflow the C stack on deep input instead of raising.
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        out = await run_task("echo", b"[" * 100_000)
        assert out.content_type == "application/octet-stream"
        with pytest.raises(TaskError) as e:
            await run_task("summarize", b"[" * 100_000 + b"]" * 100_000)
        assert e.value.code == "bad_input" and not e.value.retryable
    finally:
        sys.setrecursionlimit(previous)
