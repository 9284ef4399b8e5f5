"""Worker identity on chain: `dispatch worker register` (ERC-8004 IdentityRegistry, a real
anvil), the Connect proof (ChallengeResponse.chain_signature), the verified agent id in
ListWorkers and receipts, and the refusals: someone else's agent, a registration without
the ed25519 key, a registration file that does not parse, require_registration, and a chain
that does not answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import stat
from pathlib import Path
from typing import Any

import chain_fixtures
import grpc
import pytest
from chain_fixtures import chain_profile, cluster_for, dispatch
from conftest import HELLO, RawWorker
from web3.logs import DISCARD

import dispatchnet.chains.evm  # noqa: F401  (before web3: see dispatchnet/chains/__init__.py)
from dispatch.v1 import common_pb2, coordinator_pb2, worker_pb2
from dispatchnet import keys
from dispatchnet.agent_identity import base58
from dispatchnet.chains.evm.identity import identity_contract, sign_agent_proof
from dispatchnet.chains.evm.node import load_or_create_chain_key, web3_for
from dispatchnet.client import task_spec
from dispatchnet.keys import KeyPair
from dispatchnet.worker.runtime import Worker

# one anvil for this module (module-scoped fixtures, see chain_fixtures.py)
home = chain_fixtures.home
chain = chain_fixtures.chain


@pytest.fixture(scope="module")
def registered(home: Path, chain: dict[str, Any]) -> dict[str, Any]:
    """A worker registered through the CLI, as a user would."""
    key_file = home / "w1" / "worker.key"
    r = dispatch(
        home, "worker", "register", "--profile", "local-monad", "--key-file", str(key_file),
        "--name", "test-worker", "--coordinator", "127.0.0.1:50051",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    out["key_file"] = key_file
    return out


def deployment(home: Path) -> str:
    return str(home / "chains" / "local-monad.json")


async def connect(
    address: str, key: KeyPair, agent_id: str = "", chain_key: str = ""
) -> tuple[grpc.StatusCode | None, str, worker_pb2.Welcome | None]:
    """One raw handshake with an agent id; (error code, details, welcome)."""
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
            signature=key.sign(HELLO, c.nonce + c.coordinator_public_key)
        )
        if chain_key:
            resp.chain_signature = sign_agent_proof(
                chain_key, c.nonce, c.coordinator_public_key, key.public_key, agent_id
            )
        w.send(challenge_response=resp)
        try:
            msg = await w.recv()
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", None
        except AssertionError:
            return await w.status(), await w.call.details() or "", None
        w.close()
        return None, "", msg.welcome


def worker_key(registered: dict[str, Any]) -> KeyPair:
    return keys.load_or_create(registered["key_file"])


def test_register_puts_the_worker_on_chain(home: Path, registered: dict[str, Any]) -> None:
    key = worker_key(registered)
    chain_key_file = Path(registered["chain_key_file"])
    assert stat.S_IMODE(chain_key_file.stat().st_mode) == 0o600
    assert registered["chain_address"].startswith("0x") and registered["tx"].startswith("0x")
    assert registered["funded"] is True  # a new account on the local chain: anvil_setBalance
    agent_file = json.loads(Path(registered["agent_file"]).read_text())
    assert agent_file["agent_id"] == registered["agent_id"]

    data = json.loads(Path(deployment(home)).read_text())
    w3 = web3_for(data["rpc_url"], 5)
    reg = identity_contract(w3, data["contracts"]["identity_registry"])
    agent = int(registered["agent_id"])
    assert reg.functions.ownerOf(agent).call() == registered["chain_address"]
    assert bytes(reg.functions.getMetadata(agent, "dispatch.ed25519").call()) == key.public_key
    solana = bytes(reg.functions.getMetadata(agent, "dispatch.solana").call()).decode()
    assert solana == base58(key.public_key) == registered["solana"]
    uri = reg.functions.tokenURI(agent).call()
    assert uri.startswith("data:application/json;base64,")
    doc = json.loads(base64.b64decode(uri.split(",", 1)[1]))
    assert doc["name"] == "test-worker" and doc["supportedTrust"] == ["reputation"]
    assert doc["services"] == [
        {"name": "gRPC", "endpoint": "127.0.0.1:50051", "version": "dispatch.v1"}
    ]
    assert doc["registrations"] == [
        {"agentId": agent, "agentRegistry": f"eip155:31337:{reg.address}"}
    ]


async def test_registered_worker_connects_with_its_agent_id(
    home: Path, registered: dict[str, Any], tmp_path: Path
) -> None:
    chain_key = load_or_create_chain_key(Path(registered["chain_key_file"]))
    agent_id = registered["agent_id"]
    async with cluster_for(chain_profile(deployment(home)), tmp_path / "coord") as c:
        w = Worker(
            c.address, worker_key(registered), agent_id=agent_id, chain_key=chain_key,
            backoff_initial=0.05, backoff_max=0.5,
        )  # fmt: skip
        task = asyncio.create_task(w.run())
        c.workers.append((w, task))
        await asyncio.wait_for(w.connected.wait(), 10)
        assert w.verified_agent_id == agent_id
        client = c.client()
        [info] = await client.list_workers()
        assert info.agent_id == agent_id
        job = await client.submit(task_spec("echo", b'"hi"'))
        done = await client.wait(job.job_id)
        assert done.state == coordinator_pb2.JOB_STATE_COMPLETED
        receipt = await client.receipt(job.job_id)
        assert receipt.decoded.worker_agent_id == agent_id


async def test_refusals(home: Path, registered: dict[str, Any], tmp_path: Path) -> None:
    agent_id = registered["agent_id"]
    owner_key = load_or_create_chain_key(Path(registered["chain_key_file"]))
    async with cluster_for(chain_profile(deployment(home)), tmp_path / "coord") as c:
        # someone else's agent: signed by an account that neither owns it nor is its wallet
        stranger = load_or_create_chain_key(tmp_path / "stranger.chain.key")
        code, details, _ = await connect(c.address, KeyPair.generate(), agent_id, stranger)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert f"agent {agent_id} is not controlled by" in details
        # the owner's chain key, but another worker's ed25519 key: the agent is bound
        code, details, _ = await connect(c.address, KeyPair.generate(), agent_id, owner_key)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "is bound to ed25519 key" in details
        # an agent id but no chain signature
        code, details, _ = await connect(c.address, KeyPair.generate(), agent_id)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "chain_signature" in details
        # an agent that does not exist
        code, details, _ = await connect(c.address, KeyPair.generate(), "999999", owner_key)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "does not exist" in details

        # a registration without the dispatch.ed25519 metadata
        data = json.loads(Path(deployment(home)).read_text())
        w3 = web3_for(data["rpc_url"], 5)
        reg = identity_contract(w3, data["contracts"]["identity_registry"])
        client_account = data["accounts"]["client"]  # a funded anvil account
        tx = reg.functions.register("data:application/json;base64,e30=").transact(
            {"from": client_account["address"]}
        )
        rcpt = w3.eth.wait_for_transaction_receipt(tx)
        [event] = reg.events.Registered().process_receipt(rcpt, errors=DISCARD)
        bare = str(event["args"]["agentId"])
        bare_key = client_account["private_key"]
        code, details, _ = await connect(c.address, KeyPair.generate(), bare, bare_key)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert 'no "dispatch.ed25519" metadata' in details

        # require_registration = false (local-monad): admitted with no agent id
        code, _, welcome = await connect(c.address, KeyPair.generate())
        assert code is None and welcome is not None and welcome.agent_id == ""

    strict = chain_profile(deployment(home)).with_overrides(identity={"require_registration": True})
    async with cluster_for(strict, tmp_path / "strict") as c:
        code, details, _ = await connect(c.address, KeyPair.generate())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "admits registered workers only" in details
        code, _, welcome = await connect(c.address, worker_key(registered), agent_id, owner_key)
        assert code is None and welcome is not None and welcome.agent_id == agent_id


async def test_a_registration_file_that_does_not_parse_is_refused(
    home: Path, chain: dict[str, Any], tmp_path: Path
) -> None:
    data = json.loads(Path(deployment(home)).read_text())
    w3 = web3_for(data["rpc_url"], 5)
    reg = identity_contract(w3, data["contracts"]["identity_registry"])
    client_account = data["accounts"]["client"]  # a funded anvil account
    key = KeyPair.generate()
    broken = "data:application/json;base64," + base64.b64encode(b'{"type": ').decode()
    tx = reg.functions.register(broken, [("dispatch.ed25519", key.public_key)]).transact(
        {"from": client_account["address"]}
    )
    rcpt = w3.eth.wait_for_transaction_receipt(tx)
    [event] = reg.events.Registered().process_receipt(rcpt, errors=DISCARD)
    agent_id = str(event["args"]["agentId"])
    assert bytes(reg.functions.getMetadata(int(agent_id), "dispatch.ed25519").call()) == (
        key.public_key
    )
    async with cluster_for(chain_profile(deployment(home)), tmp_path / "coord") as c:
        code, details, _ = await connect(c.address, key, agent_id, client_account["private_key"])
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "registration file" in details and "not valid JSON" in details


async def test_chain_down_during_connect_is_unavailable(
    home: Path, registered: dict[str, Any], tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = json.loads(Path(deployment(home)).read_text())
    data["rpc_url"] = f"http://127.0.0.1:{port}"
    down = tmp_path / "down.json"
    down.write_text(json.dumps(data))
    owner_key = load_or_create_chain_key(Path(registered["chain_key_file"]))
    profile = chain_profile(str(down), rpc_timeout_seconds=2)
    async with cluster_for(profile, tmp_path / "coord") as c:
        code, details, _ = await connect(
            c.address, worker_key(registered), registered["agent_id"], owner_key
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "cannot check agent" in details
