"""Identity and reputation across chains (issue 10 item 5): on the Solana track a worker is
an ERC-8004 agent on the EVM [identity_chain] whose registration names its Solana key, and
the link counts only when both sides agree (metadata "dispatch.solana" and the registration
file's dispatch.solana name the key; ChallengeResponse.solana_signature proves it). The
Solana coordinator posts feedback to the EVM ReputationRegistry.

Both local chains for the module, brought up as a user would: `dispatch chain up --profile
local-solana --port 0` (a subprocess, DISPATCH_HOME in a temporary directory) starts the
LiteSVM node and the anvil, and the last test's `chain down` stops both.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chain_fixtures
import grpc
import pytest
from chain_fixtures import _env, cluster_for, dispatch
from conftest import FAST, HELLO, RawWorker, wait_until

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatch.v1 import common_pb2, coordinator_pb2, worker_pb2
from dispatchnet import keys
from dispatchnet.agent_identity import base58, solana_link_message
from dispatchnet.chains.evm.identity import (
    identity_contract,
    register_worker,
    sign_agent_proof,
)
from dispatchnet.chains.evm.node import load_or_create_chain_key, resolve_evm_chain, web3_for
from dispatchnet.chains.evm.reputation import reputation_contract
from dispatchnet.chains.solana.wallet import load_or_create_solana_key
from dispatchnet.client import task_spec
from dispatchnet.coordinator.models import FeedbackStatus
from dispatchnet.devchain.solana_local import pid_alive, stop_pid
from dispatchnet.keys import KeyPair
from dispatchnet.profiles import Profile, ProfileError, load_profile
from dispatchnet.worker.runtime import Worker

home = chain_fixtures.home
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def chain(home: Path) -> Iterator[dict[str, Any]]:
    r = dispatch(home, "chain", "up", "--profile", "local-solana", "--port", "0")
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    try:
        yield data
    finally:
        if (home / "chains" / "local-solana.json").exists():  # the last test did not run
            dispatch(home, "chain", "down", "--profile", "local-solana")
        stop_pid(int(data["node_pid"]))  # whatever happened above
        stop_pid(int(data["identity_chain"]["anvil_pid"]))


def evm_deployment(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "chains" / "local-monad.json").read_text())
    return data


def solana_profile(home: Path, **identity: Any) -> Profile:
    """local-solana on this module's two chains, fast timings, payments off."""
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    sections["receipts"] = {"batch_size": 2, "batch_max_age_seconds": 30}
    sections["payments"] = {"enabled": False}
    sections["reputation"] = {"cache_ttl_seconds": 0}
    sections["identity"] = identity
    sections["chain"] = {"deployment": str(home / "chains" / "local-solana.json")}
    sections["identity_chain"] = {"deployment": str(home / "chains" / "local-monad.json")}
    return load_profile("local-solana").with_overrides(**sections)


@pytest.fixture(scope="module")
def registered(home: Path, chain: dict[str, Any]) -> dict[str, Any]:
    """A worker registered through the CLI for local-solana, as a user would."""
    key_file = home / "w1" / "worker.key"
    r = dispatch(
        home, "worker", "register", "--profile", "local-solana", "--key-file", str(key_file),
        "--name", "solana-worker", "--coordinator", "127.0.0.1:50051",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    out["key_file"] = key_file
    return out


def solana_key(path: Path) -> KeyPair:
    """A Solana keypair file's key as an ed25519 KeyPair (its seed)."""
    return KeyPair.from_seed(bytes(load_or_create_solana_key(path))[:32])


async def connect(
    address: str,
    key: KeyPair,
    agent_id: str,
    chain_key: str,
    solana: KeyPair | None,
    solana_signature: bytes | None = None,
) -> tuple[grpc.StatusCode | None, str, worker_pb2.Welcome | None]:
    """One raw handshake; the Solana proof by `solana` (or exactly `solana_signature`)."""
    async with grpc.aio.insecure_channel(address) as ch:
        w = RawWorker(ch, key)
        w.send(
            hello=worker_pb2.Hello(
                public_key=key.public_key,
                kind=common_pb2.WORKER_KIND_SEEKER,
                capabilities=worker_pb2.Capabilities(tasks=["echo"], max_concurrency=1),
                agent_id=agent_id,
            )
        )
        c = (await w.recv()).challenge
        resp = worker_pb2.ChallengeResponse(
            signature=key.sign(HELLO, c.nonce + c.coordinator_public_key),
            chain_signature=sign_agent_proof(
                chain_key, c.nonce, c.coordinator_public_key, key.public_key, agent_id
            ),
        )
        if solana is not None:
            link = solana_link_message(c.nonce, c.coordinator_public_key, key.public_key, agent_id)
            resp.solana_signature = solana.sign(b"", link)
        if solana_signature is not None:
            resp.solana_signature = solana_signature
        w.send(challenge_response=resp)
        try:
            msg = await w.recv()
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", None
        except AssertionError:
            return await w.status(), await w.call.details() or "", None
        w.close()
        return None, "", msg.welcome


def send_as(w3: Any, private_key: str, fn: Any) -> None:
    """Sends a contract call from private_key's account and waits for its success."""
    account = w3.eth.account.from_key(private_key)
    tx = fn.build_transaction(
        {
            "from": account.address,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "chainId": w3.eth.chain_id,
        }
    )
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10)["status"] == 1


# --- profiles (no chain needed) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        (  # an EVM [chain] has its own registries
            '[chain]\nkind = "evm"\nnetwork = "eip155:1"\nrpc_url = "http://x"\n'
            '[identity_chain]\nkind = "evm"\nnetwork = "eip155:1"\nrpc_url = "http://y"\n',
            r"\[identity_chain\] is not read by \[chain\] kind 'evm'",
        ),
        (
            '[chain]\nkind = "solana"\nnetwork = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"\n'
            'rpc_url = "http://x"\n[identity_chain]\nkind = "solana"\n',
            r"\[identity_chain\] kind must provide feedback, identity, reputation",
        ),
        (
            '[chain]\nkind = "solana"\nnetwork = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"\n'
            'rpc_url = "http://x"\n[identity_chain]\nkind = "evm"\nnetwork = "eip155:1"\n'
            'rpc_url = "http://y"\nmint = "x"\n',
            r"\[identity_chain\] mint is not a setting of kind evm",
        ),
        (  # settings without a kind are not silently ignored
            '[identity_chain]\ndeployment = "local-monad"\n',
            r"\[identity_chain\] deployment is not a setting of kind none",
        ),
        (  # without an identity chain, Solana has no reputation registry
            '[chain]\nkind = "solana"\nnetwork = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"\n'
            'rpc_url = "http://x"\n[feedback]\nenabled = true\n',
            r"\[feedback\] enabled needs a \[chain\] kind \(or \[identity_chain\]\)",
        ),
    ],
)
def test_identity_chain_settings_are_checked(tmp_path: Path, toml: str, error: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n{toml}')
    with pytest.raises(ProfileError, match=error):
        load_profile(str(path))


def test_local_solana_takes_identity_and_reputation_from_its_evm_chain() -> None:
    p = load_profile("local-solana")
    assert (p.identity_chain.kind, p.identity_chain.deployment) == ("evm", "local-monad")
    assert p.reputation.source == "erc8004" and p.feedback.enabled
    assert not p.identity.require_registration
    # the light check accepts what the identity chain lends
    load_profile("local-solana").with_overrides(identity={"require_registration": True})


# --- on both local chains --------------------------------------------------------------------


def test_chain_up_local_solana_starts_both_chains(home: Path, chain: dict[str, Any]) -> None:
    evm = chain["identity_chain"]
    assert pid_alive(chain["node_pid"]) and pid_alive(evm["anvil_pid"])
    assert evm == evm_deployment(home)
    assert int(web3_for(evm["rpc_url"], 5).eth.chain_id) == 31337
    status = dispatch(home, "chain", "status", "--profile", "local-solana")
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["ok"] and shown["node_pid"] == chain["node_pid"]
    assert (
        shown["identity_chain"]["ok"] and shown["identity_chain"]["anvil_pid"] == evm["anvil_pid"]
    )
    again = dispatch(home, "chain", "up", "--profile", "local-solana", "--port", "0")
    assert again.returncode == 0 and json.loads(again.stdout) == chain  # the same two chains


def test_register_names_the_workers_solana_key_on_both_sides(
    home: Path, registered: dict[str, Any]
) -> None:
    key = keys.load_or_create(registered["key_file"])
    solana_file = Path(registered["solana_key_file"])
    assert stat.S_IMODE(solana_file.stat().st_mode) == 0o600
    solana = base58(solana_key(solana_file).public_key)
    assert registered["solana"] == solana != base58(key.public_key)
    agent_file = json.loads(Path(registered["agent_file"]).read_text())
    assert agent_file["solana"] == solana and Path(agent_file["solana_key_file"]) == solana_file

    data = evm_deployment(home)
    reg = identity_contract(web3_for(data["rpc_url"], 5), data["contracts"]["identity_registry"])
    agent = int(registered["agent_id"])
    assert bytes(reg.functions.getMetadata(agent, "dispatch.solana").call()).decode() == solana
    assert bytes(reg.functions.getMetadata(agent, "dispatch.ed25519").call()) == key.public_key
    uri = reg.functions.tokenURI(agent).call()
    doc = json.loads(base64.b64decode(uri.split(",", 1)[1]))
    assert doc["dispatch"]["solana"] == solana


async def test_a_registered_worker_proves_both_keys_and_its_jobs_are_rated_on_the_evm_chain(
    home: Path, registered: dict[str, Any], tmp_path: Path
) -> None:
    agent_id = registered["agent_id"]
    data = evm_deployment(home)
    coordinator = data["accounts"]["coordinator"]["address"]
    async with cluster_for(solana_profile(home), tmp_path / "coord") as c:
        assert c.coord.feedback is not None
        c.coord.feedback.tick = 0.1
        w = Worker(
            c.address, keys.load_or_create(registered["key_file"]), agent_id=agent_id,
            chain_key=load_or_create_chain_key(Path(registered["chain_key_file"])),
            solana_key=solana_key(Path(registered["solana_key_file"])),
            backoff_initial=0.05, backoff_max=0.5,
        )  # fmt: skip
        task = asyncio.create_task(w.run())
        c.workers.append((w, task))
        await asyncio.wait_for(w.connected.wait(), 10)
        assert w.verified_agent_id == agent_id  # Welcome.agent_id
        client = c.client()
        [info] = await client.list_workers()
        assert info.agent_id == agent_id
        job = await client.submit(task_spec("echo", b'"rated"'))
        done = await client.wait(job.job_id)
        assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
        await wait_until(lambda: c.db.feedback_entries((FeedbackStatus.SENT,)), 20, "feedback sent")
    rep = reputation_contract(
        web3_for(data["rpc_url"], 5), data["contracts"]["reputation_registry"]
    )
    count, value, decimals = rep.functions.getSummary(
        int(agent_id), [coordinator], "successRate", ""
    ).call()
    assert (count, value / 10**decimals) == (1, 100)
    # `dispatch chain reputation` reads the identity chain's registry too
    r = dispatch(home, "chain", "reputation", agent_id, "--profile", "local-solana")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["summary"]["count"], shown["network"]) == (1, "eip155:31337")


async def test_the_cli_worker_connects_with_its_agent_file(
    home: Path, registered: dict[str, Any], tmp_path: Path
) -> None:
    async with cluster_for(solana_profile(home), tmp_path / "coord") as c:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatchnet.cli", "worker", "--coordinator", c.address,
            "--key-file", str(registered["key_file"]),
            "--agent-file", str(registered["agent_file"]),
            env=_env(home), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            client = c.client()

            async def listed() -> bool:
                return [w.agent_id for w in await client.list_workers()] == [registered["agent_id"]]

            await wait_until(listed, 30, "the CLI worker with its verified agent id")
        finally:
            proc.kill()
            await proc.wait()


async def test_a_worker_that_cannot_prove_the_listed_solana_key_is_refused(
    home: Path, registered: dict[str, Any], tmp_path: Path
) -> None:
    agent_id = registered["agent_id"]
    key = keys.load_or_create(registered["key_file"])
    owner_key = load_or_create_chain_key(Path(registered["chain_key_file"]))
    listed = solana_key(Path(registered["solana_key_file"]))
    data = evm_deployment(home)
    evm_chain = resolve_evm_chain(solana_profile(home).identity_chain)
    async with cluster_for(solana_profile(home, cache_ttl_seconds=0), tmp_path / "coord") as c:
        # the listed key signs: admitted
        code, details, welcome = await connect(c.address, key, agent_id, owner_key, listed)
        assert code is None and welcome is not None and welcome.agent_id == agent_id, details
        # another key signs (the worker key, not the one its registration lists)
        code, details, _ = await connect(c.address, key, agent_id, owner_key, key)
        assert code == UNAUTHENTICATED
        assert f"does not verify for the Solana key {registered['solana']}" in details
        # no Solana proof at all
        code, details, _ = await connect(c.address, key, agent_id, owner_key, None)
        assert code == UNAUTHENTICATED and "solana_signature must be a 64-byte" in details
        # over the protocol's bound: refused at the edge, naming the field
        code, details, _ = await connect(c.address, key, agent_id, owner_key, None, b"x" * 129)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "challenge_response.solana_signature" in details

        # a registration whose metadata and file both name someone else's Solana key
        other_worker = KeyPair.generate()
        other_owner = load_or_create_chain_key(tmp_path / "other.chain.key")
        w3 = web3_for(data["rpc_url"], 5)
        address = w3.eth.account.from_key(other_owner).address
        w3.provider.make_request("anvil_setBalance", [address, hex(10**18)])  # type: ignore[arg-type]
        elsewhere = base58(KeyPair.generate().public_key)
        other = await asyncio.to_thread(
            register_worker, evm_chain, other_owner, other_worker.public_key,
            name="other", description="", endpoint="x", solana=elsewhere,
        )  # fmt: skip
        code, details, _ = await connect(
            c.address, other_worker, other["agent_id"], other_owner, other_worker
        )
        assert code == UNAUTHENTICATED
        assert f"does not verify for the Solana key {elsewhere}" in details

        # the two sides disagree: the metadata names another key than the registration file
        reg = identity_contract(w3, data["contracts"]["identity_registry"])
        send_as(w3, owner_key, reg.functions.setMetadata(int(agent_id), "dispatch.solana",
                                                         elsewhere.encode()))  # fmt: skip
        try:
            code, details, _ = await connect(c.address, key, agent_id, owner_key, listed)
            assert code == UNAUTHENTICATED
            assert "its registration file lists Solana address" in details
        finally:  # the module's other tests use this agent
            send_as(w3, owner_key, reg.functions.setMetadata(
                int(agent_id), "dispatch.solana", registered["solana"].encode()))  # fmt: skip


def test_chain_down_local_solana_stops_both_chains(home: Path, chain: dict[str, Any]) -> None:
    """Runs last in this module (pytest keeps file order)."""
    r = dispatch(home, "chain", "down", "--profile", "local-solana")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["stopped"] and shown["identity_chain"]["stopped"]
    assert not pid_alive(chain["node_pid"])
    assert not pid_alive(chain["identity_chain"]["anvil_pid"])
    assert not (home / "chains" / "local-solana.json").exists()
    assert not (home / "chains" / "local-monad.json").exists()
