"""The `dispatch` command as a user runs it: real subprocesses against an in-process coordinator.

The coordinator lives in the test's event loop, so every subprocess is awaited through
asyncio (never subprocess.run) to keep the coordinator serving while the CLI talks to it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from conftest import Cluster, wait_until

from dispatch.v1 import receipt_pb2
from dispatchnet import keys
from dispatchnet.coordinator.models import JobState

COMPLETED = "JOB_STATE_COMPLETED"
PROCESS_TIMEOUT = 30.0  # seconds any one CLI or grpcurl run may take


def cli_env(home: Path) -> dict[str, str]:
    """The environment for a CLI subprocess: its own DISPATCH_HOME, no inherited coordinator."""
    env = {k: v for k, v in os.environ.items() if k != "DISPATCH_COORDINATOR"}
    env["DISPATCH_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_exe(
    argv: list[str],
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> tuple[int, str, str]:
    """Runs argv without blocking the event loop; (exit code, stdout, stderr)."""
    p = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(p.communicate(input), PROCESS_TIMEOUT)
    except TimeoutError:
        p.kill()
        out, err = await p.communicate()
        raise AssertionError(
            f"{argv} timed out after {PROCESS_TIMEOUT}s\n"
            f"stdout: {out.decode()}\nstderr: {err.decode()}"
        ) from None
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def run(*args: str, env: dict[str, str], input: bytes | None = None) -> tuple[int, str, str]:
    """Runs `dispatch ARGS...`; (exit code, stdout, stderr)."""
    return await run_exe([sys.executable, "-m", "dispatchnet.cli", *args], env=env, input=input)


def ok_json(result: tuple[int, str, str]) -> Any:
    """The parsed stdout of a run that must have exited 0."""
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, err
    return json.loads(out)


def failed(result: tuple[int, str, str], code: int = 1) -> str:
    """The stderr of a run that must have exited with code, without a traceback."""
    got, out, err = result
    assert got == code, f"expected exit {code}, got {got}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, err
    return err


def free_port() -> int:
    """A port where nothing listens (bound then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- submit and receipts ------------------------------------------------------------------


async def test_submit_wait_and_verify_receipt_offline(cluster: Cluster, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    w = await cluster.worker()

    job = ok_json(
        await run(
            "job", "submit", "--coordinator", cluster.address,
            "--task", "sha256", "--input", '"hi"', "--wait",
            env=env,
        )
    )  # fmt: skip
    assert job["state"] == COMPLETED
    assert job["output_decoded"] == hashlib.sha256(b'"hi"').hexdigest()
    assert job["worker_id"] == w.key.public_hex
    assert job["price"] == {"currency": "USD", "amount_micros": "1000"}
    assert job["client_id"] == keys.load(tmp_path / "home" / "client.key").public_hex

    saved = tmp_path / "job.json"
    saved.write_text(json.dumps(job))
    verified = ok_json(await run("receipt", "verify", str(saved), env=env))
    assert verified["valid"] is True and verified["problems"] == []
    assert verified["receipt"]["job_id"] == job["job_id"]

    right_key = cluster.coord.public_key.hex()
    ok_json(await run("receipt", "verify", str(saved), "--coordinator-key", right_key, env=env))

    other_key = keys.KeyPair.generate().public_hex
    result = await run("receipt", "verify", str(saved), "--coordinator-key", other_key, env=env)
    failed(result)
    report = json.loads(result[1])
    assert report["valid"] is False
    assert any("different coordinator" in p for p in report["problems"]), report

    # Tampering 1: the body replaced by another well-formed body (a lower price).
    body = receipt_pb2.ReceiptBody.FromString(base64.b64decode(job["receipt"]["body"]))
    assert body.price.amount_micros == 1000
    body.price.amount_micros = 1
    forged_body = base64.b64encode(body.SerializeToString()).decode()
    cheaper = {**job, "receipt": {**job["receipt"], "body": forged_body}}
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(cheaper))
    # Tampering 2: a bare Receipt whose body bytes are garbage (still valid base64).
    garbage = tmp_path / "garbage.json"
    garbage.write_text(
        json.dumps({**job["receipt"], "body": base64.b64encode(b"not a receipt body").decode()})
    )
    reports = {}
    for path in (forged, garbage):
        result = await run("receipt", "verify", str(path), env=env)
        failed(result)
        reports[path] = json.loads(result[1])
        assert reports[path]["valid"] is False and reports[path]["problems"], reports[path]
    forged_problems = reports[forged]["problems"]
    assert any("worker signature" in p for p in forged_problems), forged_problems
    assert any("coordinator signature" in p for p in forged_problems), forged_problems
    assert any("receipt_sha256" in p for p in forged_problems), forged_problems
    assert reports[forged]["receipt"]["price"]["amount_micros"] == "1"

    no_receipt = tmp_path / "queued.json"
    no_receipt.write_text(json.dumps({"job_id": job["job_id"], "state": "JOB_STATE_QUEUED"}))
    err = failed(await run("receipt", "verify", str(no_receipt), env=env), code=2)
    assert "holds no receipt" in err and str(no_receipt) in err


# --- pairing and private jobs -------------------------------------------------------------


async def test_private_job_through_cli_pairing(cluster: Cluster, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    worker_key_file = tmp_path / "paired-worker.key"
    paired = await cluster.worker(key=keys.load_or_create(worker_key_file))
    await cluster.worker()  # an unpaired worker that must never get the private job
    submit_private = (
        "job", "submit", "--coordinator", cluster.address,
        "--task", "sha256", "--input", '"secret"', "--private",
    )  # fmt: skip

    err = failed(await run(*submit_private, env=env))
    assert "paired with" in err and "pair one first" in err  # nothing to encrypt it to

    code = ok_json(await run("pair", "create", "--coordinator", cluster.address, env=env))
    assert code["code"] and code["expires_at"]

    claimed = ok_json(
        await run(
            "pair", "claim", code["code"], "--coordinator", cluster.address,
            "--key-file", str(worker_key_file),
            env=env,
        )
    )  # fmt: skip
    client_id = keys.load(tmp_path / "home" / "client.key").public_hex
    assert claimed["worker_id"] == paired.key.public_hex
    assert claimed["client_id"] == client_id
    assert not (tmp_path / "home" / "worker.key").exists(), "--key-file was ignored"

    listed = ok_json(await run("pair", "list", "--coordinator", cluster.address, env=env))
    assert [p["pairing_id"] for p in listed] == [claimed["pairing_id"]]

    job = ok_json(await run(*submit_private, "--wait", env=env))
    assert job["state"] == COMPLETED
    assert job["spec"]["privacy"] == "PRIVACY_PRIVATE"
    assert job["worker_id"] == paired.key.public_hex
    assert job["output_decoded"] == hashlib.sha256(b'"secret"').hexdigest()
    assert job["spec"]["sealed"]["envelopes"] and "input" not in job["spec"]["task"]

    revoked = ok_json(
        await run(
            "pair", "revoke", claimed["pairing_id"], "--coordinator", cluster.address, env=env
        )
    )
    assert revoked["pairing_id"] == claimed["pairing_id"] and revoked["revoked_at"]


# --- get, watch, cancel, ownership --------------------------------------------------------


async def test_job_get_watch_cancel_and_errors(cluster: Cluster, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    await cluster.worker()
    coord = ("--coordinator", cluster.address)

    done = ok_json(
        await run("job", "submit", *coord, "--task", "echo", "--input", "[1, 2]", "--wait", env=env)
    )
    assert done["state"] == COMPLETED and done["output_decoded"] == [1, 2]
    job_id = done["job_id"]

    got = ok_json(await run("job", "get", job_id, *coord, env=env))
    assert got["job_id"] == job_id and got["state"] == COMPLETED
    assert got["receipt"] == done["receipt"]

    code, out, err = await run("job", "watch", job_id, *coord, env=env)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert int(got["last_sequence"]) == len(events)
    assert all(e["job_id"] == job_id for e in events)
    assert events[0]["state"] == "JOB_STATE_QUEUED"
    assert events[-1]["state"] == COMPLETED

    slow = ok_json(
        await run("job", "submit", *coord, "--task", "sleep", "--input", '{"ms": 60000}', env=env)
    )
    # a free worker gets it in the commit's own write (offer at commit)
    assert slow["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_OFFERED")
    client_id = slow["client_id"]

    async def running() -> bool:
        return (await cluster.coord.jobs.get(client_id, slow["job_id"])).state is JobState.RUNNING

    await wait_until(running, what="the sleep job running")
    cancelled = ok_json(
        await run("job", "cancel", slow["job_id"], *coord, "--reason", "changed my mind", env=env)
    )
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    assert cancelled["failure"]["message"] == "changed my mind"

    err = failed(await run("job", "get", "job_000000000000000000000000", *coord, env=env))
    assert "NOT_FOUND" in err

    other = tmp_path / "other-client.key"
    keys.load_or_create(other)  # another client that exists (a missing key file: exit 2)
    err = failed(await run("job", "get", job_id, *coord, "--key-file", str(other), env=env))
    assert "PERMISSION_DENIED" in err


# --- local checks, listing, keys ----------------------------------------------------------


async def test_bad_input_workers_and_client_key(cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    w = await cluster.worker()

    err = failed(
        await run(
            "job", "submit", "--coordinator", cluster.address,
            "--task", "echo", "--input", "not json",
            env=env,
        ),
        code=2,
    )  # fmt: skip
    assert "--input must be JSON" in err and "not json" in err

    workers = ok_json(await run("workers", "--coordinator", cluster.address, env=env))
    assert [x["worker_id"] for x in workers] == [w.key.public_hex]
    assert workers[0]["kind"] == "WORKER_KIND_SEEKER"
    assert "sha256" in workers[0]["tasks"]
    assert not (home / "client.key").exists(), "listing workers needs no client key"

    me = ok_json(await run("auth", "whoami", env=env))
    key_file = home / "client.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert me["client_id"] == keys.load(key_file).public_hex
    assert len(me["client_id"]) == 64


async def test_unreachable_coordinator_is_a_one_line_error(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    address = f"127.0.0.1:{free_port()}"
    for args in (
        ("job", "submit", "--coordinator", address, "--task", "echo", "--input", "1", "--wait"),
        ("workers", "--coordinator", address),
    ):
        code, out, err = await run(*args, env=env)
        assert code != 0, out
        assert "UNAVAILABLE" in err
        assert "Traceback" not in err, err
        assert out == ""
