"""Manual testing with the real grpcurl binary against an in-process coordinator.

These are the commands the README shows: reflection, health, a public quote, and an
authenticated commit/poll with the metadata `dispatch auth header` prints.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, wait_until
from test_cli import cli_env, run, run_exe

from dispatchnet import keys

GRPCURL = Path(sys.executable).parent / "grpcurl"
COORDINATOR = "dispatch.v1.CoordinatorService"
ECHO_SPEC = {"spec": {"task": {"name": "echo", "input": "eyJhIjoxfQ=="}}}  # {"a":1}

pytestmark = pytest.mark.skipif(not GRPCURL.exists(), reason=f"no grpcurl at {GRPCURL}")


async def grpcurl(*args: str) -> tuple[int, str]:
    """`grpcurl -plaintext -max-time 10 ARGS...`; (exit code, stdout + stderr)."""
    code, out, err = await run_exe([str(GRPCURL), "-plaintext", "-max-time", "10", *args])
    return code, out + err


async def call(address: str, method: str, body: dict[str, Any], *flags: str) -> Any:
    """A unary call that must succeed; its JSON response."""
    code, out = await grpcurl(*flags, "-d", json.dumps(body), address, method)
    assert code == 0, out
    return json.loads(out)


async def test_reflection_lists_services_and_describes_messages(cluster: Cluster) -> None:
    code, out = await grpcurl(cluster.address, "list")
    assert code == 0, out
    services = out.split()
    for name in (
        COORDINATOR,
        "dispatch.v1.WorkerService",
        "dispatch.v1.ReceiptService",
        "dispatch.v1.TrustService",
        "grpc.health.v1.Health",
    ):
        assert name in services, out

    code, out = await grpcurl(cluster.address, "describe", COORDINATOR)
    assert code == 0, out
    assert f"{COORDINATOR} is a service:" in out
    rpcs = ("GetQuote", "CommitJob", "RunJob", "GetJob", "WatchJob", "CancelJob", "ListWorkers")
    for rpc in rpcs:
        assert f"rpc {rpc} (" in out, out
    assert "returns ( stream .dispatch.v1.WatchJobResponse )" in out

    code, out = await grpcurl(cluster.address, "describe", "dispatch.v1.JobSpec")
    assert code == 0, out
    assert "dispatch.v1.JobSpec is a message:" in out
    for field in (
        "oneof work",
        ".dispatch.v1.LlmRequest llm = 1;",
        ".dispatch.v1.TaskRequest task = 2;",
        ".dispatch.v1.Policy policy = 3;",
        ".dispatch.v1.Privacy privacy = 4;",
    ):
        assert field in out, out


async def test_describe_shows_the_proto_comments(cluster: Cluster) -> None:
    code, out = await grpcurl(cluster.address, "describe", "dispatch.v1.JobSpec")
    assert code == 0, out
    assert "Everything that defines a job" in out, out


async def test_health_check(cluster: Cluster) -> None:
    for service in ("", COORDINATOR):
        resp = await call(cluster.address, "grpc.health.v1.Health/Check", {"service": service})
        assert resp == {"status": "SERVING"}


async def test_invalid_request_names_the_field(cluster: Cluster) -> None:
    code, out = await grpcurl("-d", '{"spec":{}}', cluster.address, f"{COORDINATOR}/GetQuote")
    assert code != 0, out
    assert "InvalidArgument" in out
    assert "spec.llm or spec.task" in out, out


async def test_quote_commit_and_poll_with_cli_credentials(cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)

    quote = (await call(cluster.address, f"{COORDINATOR}/GetQuote", ECHO_SPEC))["quote"]
    assert quote["price"] == {"currency": "USD", "amount_micros": "1000"}
    assert quote["spec"]["task"] == ECHO_SPEC["spec"]["task"]
    assert quote["spec"]["policy"] == "POLICY_CHEAP"
    commit = {"quote_id": quote["quote_id"], "idempotency_key": "readme-1"}

    code, out = await grpcurl("-d", json.dumps(commit), cluster.address, f"{COORDINATOR}/CommitJob")
    assert code != 0, out
    assert "Unauthenticated" in out and "dispatch auth header" in out

    code, header, err = await run("auth", "header", env=env)
    assert code == 0, err
    flags = shlex.split(header)
    assert len(flags) == 2 and flags[0] == "-H", header
    assert flags[1].startswith("authorization: Dispatch v1."), header
    code, raw, err = await run("auth", "header", "--raw", env=env)
    assert code == 0, err
    raw = raw.strip()
    assert raw.startswith("Dispatch v1.") and "\n" not in raw
    assert raw.split(".")[1] == flags[1].split(".")[1], "both name the same client key"

    created = await call(cluster.address, f"{COORDINATOR}/CommitJob", commit, *flags)
    job = created["job"]
    assert created["created"] is True
    assert job["state"] == "JOB_STATE_QUEUED"
    assert job["client_id"] == keys.load(home / "client.key").public_hex
    again = await call(
        cluster.address, f"{COORDINATOR}/CommitJob", commit, "-H", f"authorization: {raw}"
    )
    assert again["job"]["job_id"] == job["job_id"] and "created" not in again  # false is omitted

    worker = await cluster.worker()
    final: dict[str, Any] = {}

    async def completed() -> bool:
        got = await call(
            cluster.address,
            f"{COORDINATOR}/GetJob",
            {"job_id": job["job_id"]},
            "-H",
            f"authorization: {raw}",
        )
        final.update(got["job"])
        return bool(got["job"]["state"] == "JOB_STATE_COMPLETED")

    await wait_until(completed, within=20, what="the job completed (polled with grpcurl)")
    assert final["worker_id"] == worker.key.public_hex
    assert final["result"]["output"] == ECHO_SPEC["spec"]["task"]["input"]
    assert final["receipt"]["body"] and final["receipt"]["coordinator_signature"]

    # RunJob: the spec in, the final job out, in one call
    run_job = {**ECHO_SPEC, "idempotency_key": "readme-run"}
    ran = await call(cluster.address, f"{COORDINATOR}/RunJob", run_job, *flags)
    assert ran["created"] is True and ran["job"]["state"] == "JOB_STATE_COMPLETED"
    assert ran["job"]["result"]["output"] == ECHO_SPEC["spec"]["task"]["input"]
