"""The built-in task catalogue: deterministic executors a worker runs for TASK jobs.

Each task is an async function from input bytes to a TaskOutput, registered in _TASKS by
name. To add a task, write the function and add it to _TASKS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction

MAX_SLEEP_MS = 600_000


class TaskError(Exception):
    """A task could not produce a result; retryable=False means the job itself is at fault."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class TaskOutput:
    """What a task (or any executor) produced."""

    output: bytes
    content_type: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


MAX_JSON_DEPTH = 256
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _json_depth(data: bytes) -> int:
    """Deepest array/object nesting in data (strings skipped)."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", data)):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_json(data: bytes) -> tuple[bool, object]:
    """(True, value) if data is valid UTF-8 JSON, else (False, None).

    Input nested deeper than MAX_JSON_DEPTH counts as not JSON: the C parser recurses, and
    with a raised recursion limit (some libraries raise it process-wide) deep input would
    overflow the C stack instead of raising RecursionError."""
    if _json_depth(data) > MAX_JSON_DEPTH:
        return False, None
    try:
        return True, json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return False, None


def _json_output(value: object) -> TaskOutput:
    return TaskOutput(json.dumps(value, separators=(",", ":")).encode(), "application/json")


async def _echo(data: bytes) -> TaskOutput:
    is_json, _ = _parse_json(data)
    return TaskOutput(data, "application/json" if is_json else "application/octet-stream")


async def _sha256(data: bytes) -> TaskOutput:
    return TaskOutput(hashlib.sha256(data).hexdigest().encode(), "text/plain")


async def _sleep(data: bytes) -> TaskOutput:
    is_json, value = _parse_json(data)
    ms = value.get("ms") if is_json and isinstance(value, dict) else None
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_SLEEP_MS:
        raise TaskError("bad_input", f'sleep takes JSON {{"ms": N}} with 0 <= N <= {MAX_SLEEP_MS}')
    await asyncio.sleep(ms / 1000)
    return _json_output({"slept_ms": ms})


async def _word_count(data: bytes) -> TaskOutput:
    is_json, value = _parse_json(data)
    if is_json and isinstance(value, str):
        text = value
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError("bad_input", "word_count takes UTF-8 text or a JSON string") from e
    return _json_output({"words": len(text.split()), "characters": len(text)})


# --- text tasks: summarize, classify, extract_json -----------------------------------------
# Deterministic and dependency-free, so seekers can run them. A desktop may run the same task
# names with an LLM when TaskRequest.use_llm is set; that is another executor's business.

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren as at be because
    been before being below between both but by can could couldn did didn do does doesn
    doing don down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is isn it its itself just ll me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own re
    same she should shouldn so some such than that the their theirs them themselves then
    there these they this those through to too under until up ve very was wasn we were
    weren what when where which while who whom why will with won would wouldn you your
    yours yourself yourselves""".split()
)
_WORD = re.compile(r"[^\W_]+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n\s*\n")


def _text_request(name: str, data: bytes, shape: str) -> dict[str, object]:
    """The task's JSON object input with a string "text"; TaskError naming `shape` if not."""
    is_json, value = _parse_json(data)
    if not is_json or not isinstance(value, dict):
        raise TaskError("bad_input", f"{name} takes a UTF-8 JSON object {shape}")
    if not isinstance(value.get("text"), str):
        raise TaskError("bad_input", f'{name}: "text" must be a string; input is {shape}')
    return value


def _words(text: str) -> list[str]:
    """Case-folded runs of letters and digits."""
    return _WORD.findall(text.casefold())


def _content_words(text: str) -> list[str]:
    """_words without stopwords and one-character words."""
    return [w for w in _words(text) if len(w) > 1 and w not in _STOPWORDS]


def _stem(word: str) -> str:
    """A crude suffix stripper, so that e.g. "sports", "sporting" and "sport" meet."""
    w = word
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ingly", "edly", "ing", "ed", "ly", "ment", "ness", "al"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":
                w = w[:-1]  # running -> run, stopped -> stop
            break
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]  # game, games, gaming -> gam
    return w


def _sentences(text: str) -> list[str]:
    """Naive sentence split: after . ! ? (and a closing quote or bracket), and at blank lines."""
    parts = (" ".join(p.split()) for p in _SENTENCE_BREAK.split(text))
    return [p for p in parts if p]


async def _summarize(data: bytes) -> TaskOutput:
    """Extractive summary.

    Input: {"text": str, "max_sentences": int >= 1 (default 2)}.
    Output: {"summary": str}: the max_sentences best sentences in their original order,
    joined by one space (whitespace inside a sentence collapsed to single spaces).

    Each content word (not a stopword, two characters or more, case-folded) weighs its
    frequency in the whole text divided by the highest such frequency; a sentence scores
    the sum of its words' weights. Ties go to the earlier sentence.
    """
    shape = '{"text": str, "max_sentences": int >= 1 (default 2)}'
    req = _text_request("summarize", data, shape)
    n = req.get("max_sentences", 2)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TaskError("bad_input", f'summarize: "max_sentences" must be an integer >= 1; {shape}')
    sentences = _sentences(str(req["text"]))
    words = [_content_words(s) for s in sentences]
    freq = Counter(w for ws in words for w in ws)
    top = max(freq.values(), default=1)
    scores = [sum(Fraction(freq[w], top) for w in ws) for ws in words]
    best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:n]
    return _json_output({"summary": " ".join(sentences[i] for i in sorted(best))})


async def _classify(data: bytes) -> TaskOutput:
    """Keyword classification.

    Input: {"text": str, "labels": [str, ...]} with at least two distinct, non-empty labels.
    Output: {"label": str, "scores": {label: float}}.

    Text and labels are split into case-folded words and stemmed crudely ("sports",
    "sporting" -> "sport"); a label's stopwords are ignored unless it has nothing else. A
    label's raw score is the mean, over its distinct stems, of how often the stem occurs in
    the text. "scores" are the raw scores divided by their sum (0.0 for all when the text
    matches no label), rounded to 4 decimals. "label" has the highest raw score; ties go to
    the label listed first.
    """
    shape = '{"text": str, "labels": [str, ...] (at least 2)}'
    req = _text_request("classify", data, shape)
    labels = req.get("labels")
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(label, str) and label.strip() for label in labels)
    ):
        raise TaskError(
            "bad_input", f'classify: "labels" must list 2 or more non-empty strings; {shape}'
        )
    if len(set(labels)) != len(labels):
        raise TaskError("bad_input", 'classify: "labels" must be distinct')
    counts = Counter(_stem(w) for w in _content_words(str(req["text"])))
    raw: dict[str, Fraction] = {}
    for label in labels:
        words = _words(label)
        stems = {_stem(w) for w in words if w not in _STOPWORDS} or {_stem(w) for w in words}
        raw[label] = Fraction(sum(counts[s] for s in stems), max(1, len(stems)))
    total = sum(raw.values())
    best = max(labels, key=lambda label: (raw[label], -labels.index(label)))
    scores = {label: round(float(raw[label] / total), 4) if total else 0.0 for label in labels}
    return _json_output({"label": best, "scores": scores})


_EMAIL = re.compile(r"(?<![\w.+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'`]+", re.IGNORECASE)
_ISO_DATE = re.compile(
    r"(?<![\w-])\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?"
    r"(?:Z|[+-]\d{2}:\d{2})?)?(?![\w-])"
)
_MONTHS = {
    name: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
_MONTH = "(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
_DATE_DMY = re.compile(rf"\b{_DAY}\s+{_MONTH},?\s+(\d{{4}})\b", re.IGNORECASE)
_DATE_MDY = re.compile(rf"\b{_MONTH}\s+{_DAY},?\s+(\d{{4}})\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.,])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?![\w]|[.,]\d)")
_NUMBER_VALUE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_COLON_PAIR = re.compile(
    r"^[ \t]*(?:[-*\u2022][ \t]+)?"  # an optional bullet
    r"([A-Za-z][\w.-]*(?:[ \t]+[\w.-]+){0,2})[ \t]*:[ \t]+(\S.*?)[ \t]*$",
    re.MULTILINE,
)
_EQUALS_PAIR = re.compile(r"(?<![\w=.-])([A-Za-z_][\w.-]{0,39})=(\"[^\"\n]*\"|'[^'\n]*'|[^\s,;&]+)")
_LISTS = ("emails", "urls", "numbers", "dates")


def _key(name: str) -> str:
    """A pair's key as it appears in the output: case-folded, separators as underscores."""
    return re.sub(r"[\s.-]+", "_", name.strip().casefold())


def _value(text: str) -> object:
    """A pair's value: a number or boolean when it is exactly one, else the string."""
    v = text.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    if _NUMBER_VALUE.fullmatch(v):
        return float(v) if "." in v else int(v)
    if v.casefold() in ("true", "false"):
        return v.casefold() == "true"
    return v


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """text with the given spans blanked out, so later patterns skip them."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _dates(text: str) -> list[tuple[int, int, str]]:
    """(start, end, ISO 8601) for each date: ISO dates and times, "5 March 2024", "March 5th,
    2024". ISO-shaped text that is no valid date comes with "" (masked all the same)."""
    found: list[tuple[int, int, str]] = []
    for m in _ISO_DATE.finditer(text):
        iso = ""
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(m.group().replace(" ", "T"))
            timed = len(m.group()) > len("YYYY-MM-DD")
            iso = when.isoformat() if timed else when.date().isoformat()
        found.append((m.start(), m.end(), iso))
    for pattern, day_group, month_group in ((_DATE_DMY, 1, 2), (_DATE_MDY, 2, 1)):
        for m in pattern.finditer(text):
            month = _MONTHS[m.group(month_group).casefold()]
            with contextlib.suppress(ValueError):
                iso = date(int(m.group(3)), month, int(m.group(day_group))).isoformat()
                found.append((m.start(), m.end(), iso))
    return sorted(found)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


async def _extract_json(data: bytes) -> TaskOutput:
    """Pulls structured data out of text with regular expressions.

    Input: {"text": str, "fields": [str, ...] (optional)}.
    Output: {"data": {...}} holding, in this order:

    - each `key: value` line (the key starts a line, optionally after "-", "*" or a bullet,
      and has at most three words; the colon is followed by a space; the value runs to the
      end of the line) and each `key=value` token (the value may be quoted), in text order.
      Keys are case-folded with spaces, dots and hyphens turned into "_"; the first value of
      a key wins; values that are exactly a number or true/false become one.
    - "emails", "urls": unique, in text order (URLs lose trailing punctuation).
    - "dates": unique ISO 8601 dates ("2024-03-05", or with the time when one is given)
      from ISO dates and "5 March 2024" / "March 5, 2024" forms.
    - "numbers": every standalone number outside emails, URLs and dates, in text order
      ("1,200.50" -> 1200.5).

    The four lists are always present; a pair whose key is one of their names is dropped.
    With "fields", "data" holds exactly those keys (looked up after the same case-folding),
    null when the text has none.
    """
    shape = '{"text": str, "fields": [str, ...] (optional)}'
    req = _text_request("extract_json", data, shape)
    fields = req.get("fields")
    if fields is not None and (
        not isinstance(fields, list) or not all(isinstance(f, str) and f.strip() for f in fields)
    ):
        raise TaskError("bad_input", f'extract_json: "fields" must list non-empty strings; {shape}')
    text = str(req["text"])

    emails = list(_EMAIL.finditer(text))
    urls = []
    for m in _URL.finditer(text):
        url = m.group().rstrip(".,;:!?")
        while url.endswith((")", "]")) and url.count(url[-1]) > url.count(
            "(" if url[-1] == ")" else "["
        ):
            url = url[:-1].rstrip(".,;:!?")
        urls.append((m.start(), m.start() + len(url), url))
    masked = _mask(text, [m.span() for m in emails] + [(s, e) for s, e, _ in urls])
    dates = _dates(masked)
    masked = _mask(masked, [(s, e) for s, e, _ in dates])

    pairs: list[tuple[int, str, object]] = []
    for m in _COLON_PAIR.finditer(text):
        pairs.append((m.start(), _key(m.group(1)), _value(m.group(2))))
    for m in _EQUALS_PAIR.finditer(_mask(text, [(s, e) for s, e, _ in urls])):
        pairs.append((m.start(), _key(m.group(1)), _value(m.group(2))))
    found: dict[str, object] = {}
    for _, key, value in sorted(pairs, key=lambda p: p[0]):
        if key not in _LISTS:
            found.setdefault(key, value)
    found["emails"] = _unique([m.group() for m in emails])
    found["urls"] = _unique([url for _, _, url in urls])
    found["dates"] = _unique([iso for _, _, iso in dates if iso])
    found["numbers"] = [_value(m.group().replace(",", "")) for m in _NUMBER.finditer(masked)]
    if fields is not None:
        found = {f: found.get(_key(f)) for f in fields}
    return _json_output({"data": found})


_TASKS: dict[str, Callable[[bytes], Awaitable[TaskOutput]]] = {
    "classify": _classify,
    "echo": _echo,
    "extract_json": _extract_json,
    "sha256": _sha256,
    "sleep": _sleep,
    "summarize": _summarize,
    "word_count": _word_count,
}

TASK_NAMES: list[str] = sorted(_TASKS)


async def run_task(name: str, data: bytes) -> TaskOutput:
    """Runs the built-in task name on data; raises TaskError when it cannot."""
    task = _TASKS.get(name)
    if task is None:
        raise TaskError("unknown_task", f"no built-in task named {name!r}")
    return await task(data)
