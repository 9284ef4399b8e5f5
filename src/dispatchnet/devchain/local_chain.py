"""`dispatch chain up|down|status`: a local EVM chain that outlives the command.

up starts anvil in its own session, deploys Dispatch's contracts (chains/evm/deploy.py),
mints test USDC to two demo accounts and writes the deployment file
$DISPATCH_HOME/chains/<deployment>.json, which profiles with `deployment = "<name>"` read.
It is idempotent: when the recorded anvil is alive and serves the deployment, the existing
file is returned untouched. down stops that anvil and removes the file.

The deployment file holds the private keys of the demo accounts in clear: they are anvil's
well-known development keys (public, test ether only), never to be used on a public network.
The file is written with mode 0600 anyway.

Blocking code (subprocesses, HTTP): async callers use asyncio.to_thread.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3

from dispatchnet.chains.deployments import ChainConfigError, deployment_path, read_deployment
from dispatchnet.chains.evm.config import chain_id_of
from dispatchnet.chains.evm.deploy import deploy, load_artifact
from dispatchnet.chains.evm.node import TRANSIENT, resolve_evm_chain, web3_for
from dispatchnet.devchain import processes
from dispatchnet.devchain.anvil import Anvil
from dispatchnet.devchain.processes import pid_alive
from dispatchnet.profiles import Profile

# Test USDC minted to each demo account (6 decimals): 1,000 USDC.
DEMO_USDC = 1_000 * 10**6
WARNING = (
    "LOCAL DEVELOPMENT CHAIN ONLY: the private keys in this file are anvil's public "
    "development keys. Never send real funds to these accounts or use them on a public network."
)


def _dev_chain(profile: Profile) -> Path:
    cfg = profile.chain
    if not cfg.devchain:
        raise ChainConfigError(
            f"profile {profile.name} has no local chain ([chain] devchain is empty); "
            "its chain is " + (cfg.rpc_url or cfg.network or "none")
        )
    return deployment_path(cfg.deployment)


def is_anvil(pid: int) -> bool:
    """Guards against signalling a recycled pid: on Linux the command line must be anvil's."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return pid_alive(pid)
    try:
        argv0 = cmdline.read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return Path(argv0.decode(errors="replace")).name.startswith("anvil")


def _serves(data: dict[str, Any]) -> bool:
    """The recorded anvil is alive, answers with the recorded chain id and has the
    contracts."""
    pid = int(data.get("anvil_pid") or 0)
    if not (pid_alive(pid) and is_anvil(pid)):
        return False
    try:
        w3 = web3_for(str(data["rpc_url"]), 2.0)
        if w3.eth.chain_id != int(data["chain_id"]):
            return False
        # a chain deployed by an older build (no batch settler, or one without the gas
        # cap per item this build calls) is replaced
        contracts = data["contracts"]
        anchor = Web3.to_checksum_address(contracts["receipt_anchor"])
        settler = Web3.to_checksum_address(contracts["batch_settler"])
        current = bytes.fromhex(load_artifact("BatchSettler").deployed_bytecode.removeprefix("0x"))
        return len(w3.eth.get_code(anchor)) > 0 and bytes(w3.eth.get_code(settler)) == current
    except (*TRANSIENT, KeyError, TypeError, ValueError):
        return False


def _send(w3: Web3, fn: Any, key: str) -> None:
    account = Account.from_key(key)
    tx = fn.build_transaction(
        {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    )
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.05)
    if receipt["status"] != 1:
        raise ChainConfigError(f"transaction {tx_hash.hex()} failed")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def chain_up(profile: Profile, port: int | None = None) -> dict[str, Any]:
    """Starts (or finds running) the profile's local chain; the deployment file's content."""
    path = _dev_chain(profile)
    cfg = profile.chain
    if path.exists():
        data = read_deployment(str(path))
        if _serves(data):
            return data
        stop_pid(int(data.get("anvil_pid") or 0))  # a half-dead leftover
    chain_id = chain_id_of(cfg.network)
    anvil = Anvil(
        chain_id=chain_id,
        accounts=3,
        port=cfg.devchain_port if port is None else port,
        detached=True,
        log_path=path.with_suffix(".anvil.log"),
    )
    anvil.start()
    try:
        deployer, coordinator, client = anvil.accounts
        deployment = deploy(anvil.rpc_url, deployer.private_key, timeout=30)
        w3 = web3_for(anvil.rpc_url, 10.0)
        usdc = w3.eth.contract(
            address=Web3.to_checksum_address(deployment.usdc), abi=load_artifact("TestUSDC").abi
        )
        for account in (coordinator, client):
            _send(w3, usdc.functions.mint(account.address, DEMO_USDC), deployer.private_key)
        data = {
            "warning": WARNING,
            "name": cfg.deployment,
            "chain_id": chain_id,
            "network": cfg.network,
            "rpc_url": anvil.rpc_url,
            "contracts": {
                "identity_registry": deployment.identity,
                "reputation_registry": deployment.reputation,
                "validation_registry": deployment.validation,
                "receipt_anchor": deployment.receipt_anchor,
                "usdc": deployment.usdc,
                "batch_settler": deployment.batch_settler,
            },
            "deployer": deployer.address,
            "accounts": {
                name: {
                    "address": a.address,
                    "private_key": a.private_key,
                    "usdc": DEMO_USDC,
                }
                for name, a in (("coordinator", coordinator), ("client", client))
            },
            "anvil_pid": anvil.pid,
            "anvil_log": str(anvil.log_path),
            "created_at": int(time.time()),
        }
        _write_private(path, json.dumps(data, indent=2) + "\n")
    except BaseException:
        anvil.stop()
        raise
    anvil.detach()
    return data


def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM (then SIGKILL) for an anvil pid; True if it was running."""
    return processes.stop_pid(pid, is_anvil, timeout)


def chain_down(profile: Profile) -> dict[str, Any]:
    path = _dev_chain(profile)
    if not path.exists():
        return {"deployment_file": str(path), "stopped": False, "note": "no local chain"}
    data = read_deployment(str(path))
    pid = int(data.get("anvil_pid") or 0)
    stopped = stop_pid(pid)
    path.unlink(missing_ok=True)
    path.with_suffix(".anvil.log").unlink(missing_ok=True)
    return {"deployment_file": str(path), "anvil_pid": pid, "stopped": stopped, "removed": True}


def chain_status(profile: Profile) -> dict[str, Any]:
    """Where the profile's chain is and whether it answers (`ok`)."""
    cfg = profile.chain
    out: dict[str, Any] = {"profile": profile.name, "network": cfg.network}
    if cfg.devchain:
        path = deployment_path(cfg.deployment)
        out["deployment_file"] = str(path)
        if not path.exists():
            out.update(ok=False, running=False, note="no local chain: run `dispatch chain up`")
            return out
        data = read_deployment(str(path))
        pid = int(data.get("anvil_pid") or 0)
        out.update(anvil_pid=pid, running=pid_alive(pid) and is_anvil(pid))
    try:
        chain = resolve_evm_chain(cfg)  # no data_dir: never creates a key
    except ChainConfigError as e:
        out.update(ok=False, note=str(e))
        return out
    out.update(
        rpc_url=chain.rpc_url,
        contracts={
            k: getattr(chain, k)
            for k in ("identity_registry", "reputation_registry", "receipt_anchor", "usdc")
        },
    )
    try:
        w3 = web3_for(chain.rpc_url, cfg.rpc_timeout_seconds)
        got = int(w3.eth.chain_id)
        out.update(chain_id=got, block_number=int(w3.eth.block_number))
        ok = got == chain.chain_id
        if not ok:
            out["note"] = f"the node serves chain {got}, the profile {cfg.network}"
        elif chain.receipt_anchor and not w3.eth.get_code(
            Web3.to_checksum_address(chain.receipt_anchor)
        ):
            ok, out["note"] = False, f"no contract at receipt_anchor {chain.receipt_anchor}"
    except TRANSIENT as e:
        ok = False
        out["note"] = f"cannot reach {chain.rpc_url}: {type(e).__name__}"
    out["ok"] = ok
    return out
