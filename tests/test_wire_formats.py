"""The README's wire formats, rebuilt from the README alone (as a client in another
language would), checked against the coordinator."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import nacl.signing
from conftest import Cluster, Proc

from dispatch.v1 import common_pb2, coordinator_pb2
from dispatchnet.auth.tokens import verify_header
from dispatchnet.client import task_spec

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"### {title}")
    return README[start : README.index("\n### ", start + 1)]


def _example(label: str) -> str:
    m = re.search(rf"^{re.escape(label)}\s+(\S+)$", _section("Wire formats"), re.M)
    assert m, f"README's wire formats example has no {label!r} line"
    return m.group(1)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_the_token_example_rebuilds_from_the_readme_and_verifies() -> None:
    # Built with nacl and base64 only, following the README's table, not our token module.
    key = nacl.signing.SigningKey(bytes(range(32)))
    public = bytes(key.verify_key)
    expiry = "1767225600"
    message = b"dispatch.v1.ClientAuth\n" + public + expiry.encode()
    signature = key.sign(message).signature
    token = f"v1.{_b64url(public)}.{expiry}.{_b64url(signature)}"
    assert _example("public key (hex)") == public.hex()
    assert _example("signed message") == message.hex()
    assert _example("token") == token
    assert _example("client_id") == public.hex()
    caller = verify_header(f"Dispatch {token}", max_ttl_seconds=60, now=1767225600 - 30)
    assert caller.id == public.hex()


def _canonical_echo_hi() -> bytes:
    # JobSpec{task(2): TaskRequest{name(1): "echo", input(2): "hi"}, policy(3): 2,
    # privacy(4): 1}, hand-encoded: tag = field << 3 | wire type.
    task = b"\x0a\x04echo" + b"\x12\x02hi"
    return b"\x12" + bytes([len(task)]) + task + b"\x18\x02" + b"\x20\x01"


def test_the_spec_hash_example_matches_the_readme() -> None:
    encoded = _canonical_echo_hi()
    text = _section("Wire formats")
    assert f"`{encoded.hex()}`" in text
    assert f"`{hashlib.sha256(encoded).hexdigest()}`" in text


async def test_spec_sha256_is_the_hash_of_the_canonical_normalized_spec(
    cluster: Cluster,
) -> None:
    c = cluster.client()
    q = await c.quote(task_spec("echo", b"hi"))
    assert q.spec_sha256 == hashlib.sha256(_canonical_echo_hi()).digest()
    # the quote's normalized spec hashes to the same value, however it is re-encoded
    assert hashlib.sha256(q.spec.SerializeToString(deterministic=True)).digest() == (q.spec_sha256)
    # an LLM spec: AUTO resolves to FAST, unset privacy to PUBLIC
    spec = common_pb2.JobSpec(llm=common_pb2.LlmRequest(prompt="hi", max_tokens=8))
    q = await c.quote(spec)
    expected = common_pb2.JobSpec()
    expected.CopyFrom(spec)
    expected.policy = common_pb2.POLICY_FAST
    expected.privacy = common_pb2.PRIVACY_PUBLIC
    assert q.spec_sha256 == hashlib.sha256(expected.SerializeToString(deterministic=True)).digest()
    assert isinstance(q, coordinator_pb2.Quote)


def test_the_startup_line_fields_are_the_documented_ones(
    procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    coord = procs(["coordinator", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")])
    table = README[README.index("**The coordinator's start-up line.**") :]
    table = table[: table.index("\n\n", table.index("| field |"))]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert set(coord.info) == documented
    assert re.fullmatch(r"127\.0\.0\.1:\d+", coord.info["listening"])
    assert len(bytes.fromhex(coord.info["coordinator_public_key"])) == 32
