"""A local Solana chain: the LiteSVM JSON-RPC node (devchain/solana_node.py) as a process,
and its bootstrap (a test USDC mint and funded dev accounts), all through JSON-RPC.

    with SolanaLocal() as node:              # or: async with; detached=True for `chain up`
        deployment = bootstrap(node.rpc_url) # mint, accounts with base58 secret keys

    data = chain_up(path, port=0)            # idempotent; writes the deployment file (0600)
    chain_status(path); chain_down(path)

The node listens on port 0 by default (no race between choosing a port and binding it) and
prints one JSON line with its rpc_url when ready, to its log file, from which start() reads
it. Nothing here reads LiteSVM directly: a devnet RPC URL works the same way.

x402's SVM schemes accept only mainnet, devnet and testnet CAIP-2 ids, so the deployment's
`network` is devnet's id (solana:EtWT...); `cluster` says "localnet" and `genesis_hash` is
the node's own, so a caller can tell the two apart.

Blocking code (subprocesses, HTTP): async callers use asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from solana.rpc.api import Client
from solana.rpc.commitment import Confirmed
from solana.rpc.models import TxOpts
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.signature import Signature
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import VersionedTransaction
from spl.token.instructions import (
    InitializeMint2Params,
    MintToCheckedParams,
    create_associated_token_account,
    get_associated_token_address,
    initialize_mint2,
    mint_to_checked,
)

from dispatchnet.devchain import processes
from dispatchnet.devchain.processes import pid_alive
from dispatchnet.devchain.solana_node import MINT_LEN, TOKEN_PROGRAM

NODE_MODULE = "dispatchnet.devchain.solana_node"
# x402's CAIP-2 id for devnet: the SDK knows no local cluster (see the module docstring).
X402_NETWORK = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
USDC_DECIMALS = 6
DEMO_USDC = 1_000 * 10**USDC_DECIMALS  # test USDC for each of coordinator and client
DEMO_SOL = 100 * 10**9  # lamports for each dev account (fees, rent)
WARNING = (
    "LOCAL DEVELOPMENT CHAIN ONLY: the secret keys in this file were made for a throw-away "
    "local Solana node. Never send real funds to these accounts or use them on a public network."
)


class SolanaLocalError(RuntimeError):
    """The node did not start, or a bootstrap step failed."""


def _rpc(url: str, method: str, params: list[Any], timeout: float) -> Any:
    reply = httpx.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=timeout
    ).json()
    if "error" in reply:
        raise SolanaLocalError(f"{method}: {reply['error']}")
    return reply["result"]


class SolanaLocal:
    """One local Solana node process on 127.0.0.1. Use it with `with`, `async with`, or
    start()/stop(); `detached=True` plus detach() leaves it running after this process."""

    def __init__(
        self,
        *,
        port: int = 0,
        slot_ms: float = 400.0,
        validity_slots: int = 150,
        log_path: Path | None = None,
        detached: bool = False,
        startup_timeout: float = 20.0,
        python: str = sys.executable,
    ) -> None:
        self.requested_port = port
        self.slot_ms = slot_ms
        self.validity_slots = validity_slots
        self.log_path = log_path
        self.detached = detached
        self.startup_timeout = startup_timeout
        self.python = python
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.genesis_hash: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        if self.port is None:
            raise SolanaLocalError("the Solana node is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        if self._proc is not None:
            raise SolanaLocalError("the Solana node is already started")
        if self.log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dispatch-solana-")
            self.log_path = Path(self._tmp.name) / "solana-node.log"
        log_path = self.log_path
        args = [
            self.python, "-m", NODE_MODULE,
            "--host", self.host,
            "--port", str(self.requested_port),
            "--slot-ms", str(self.slot_ms),
            "--validity-slots", str(self.validity_slots),
        ]  # fmt: skip
        began = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
            )
        atexit.register(self.stop)
        try:
            self._await_ready(log_path, offset, began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, path: Path) -> str:
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _await_ready(self, log_path: Path, offset: int, deadline: float) -> None:
        assert self._proc is not None
        while self.port is None:
            if self._proc.poll() is not None:
                raise SolanaLocalError(
                    f"the Solana node exited with {self._proc.returncode}: "
                    f"{self._log_tail(log_path)}"
                )
            with log_path.open("rb") as f:
                f.seek(offset)
                for line in f.read().splitlines():
                    with contextlib.suppress(ValueError):
                        ready = json.loads(line)
                        if isinstance(ready, dict) and "rpc_url" in ready:
                            self.port = int(ready["port"])
                            self.genesis_hash = str(ready["genesis_hash"])
            if self.port is None:
                if time.monotonic() > deadline:
                    raise SolanaLocalError(
                        f"the Solana node did not start: {self._log_tail(log_path)}"
                    )
                time.sleep(0.01)
        if _rpc(self.rpc_url, "getHealth", [], 2.0) != "ok":
            raise SolanaLocalError("the Solana node is not healthy")

    def detach(self) -> int:
        """Lets the node outlive this object and this process; returns its pid. stop() no
        longer touches it: end it with stop_pid()."""
        if self._proc is None or self._proc.poll() is not None:
            raise SolanaLocalError("the Solana node is not running")
        atexit.unregister(self.stop)
        pid = self._proc.pid
        self._proc = None
        return pid

    def stop(self, timeout: float = 5.0) -> None:
        """Terminates the node (SIGTERM, then SIGKILL after `timeout`). Safe to call twice."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.port = None
        if self._tmp is not None:
            self.log_path = None
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


# -- bootstrap ----------------------------------------------------------------------------


def wait_for_signature(client: Client, signature: Signature, timeout: float = 30.0) -> None:
    """Polls getSignatureStatuses until `signature` is confirmed; raises if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_signature_statuses([signature]).value[0]
        if status is not None:
            if status.err is not None:
                raise SolanaLocalError(f"transaction {signature} failed: {status.err}")
            if status.confirmation_status is not None:
                return
        if time.monotonic() > deadline:
            raise SolanaLocalError(f"transaction {signature} not confirmed in {timeout}s")
        time.sleep(0.02)


def send_instructions(
    client: Client, payer: Keypair, instructions: Sequence[Instruction], signers: Sequence[Keypair]
) -> Signature:
    """Signs, sends (with preflight) and waits for one v0 transaction."""
    blockhash: Hash = client.get_latest_blockhash().value.blockhash
    message = MessageV0.try_compile(payer.pubkey(), list(instructions), [], blockhash)
    tx = VersionedTransaction(message, [payer, *[s for s in signers if s != payer]])
    sig = client.send_raw_transaction(bytes(tx), TxOpts(preflight_commitment=Confirmed)).value
    wait_for_signature(client, sig)
    return sig


def bootstrap(
    rpc_url: str,
    *,
    usdc_per_account: int = DEMO_USDC,
    lamports_per_account: int = DEMO_SOL,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Creates a 6-decimal test USDC mint and three dev accounts on the node at `rpc_url`,
    all through JSON-RPC: the deployer (mint authority), the coordinator (x402 fee payer)
    and the client, each with `lamports_per_account` SOL; the coordinator and the client
    also with `usdc_per_account` in their associated token accounts. Returns the
    deployment data (secret keys base58, as `solana-keygen`/Phantom export them)."""
    client = Client(rpc_url, timeout=timeout)
    genesis = str(client.get_genesis_hash().value)
    deployer, coordinator, payer, mint = Keypair(), Keypair(), Keypair(), Keypair()
    airdrops = [
        client.request_airdrop(k.pubkey(), lamports_per_account).value
        for k in (deployer, coordinator, payer)
    ]
    for sig in airdrops:
        wait_for_signature(client, sig, timeout)
    rent = client.get_minimum_balance_for_rent_exemption(MINT_LEN).value
    ixs = [
        create_account(
            CreateAccountParams(
                from_pubkey=deployer.pubkey(),
                to_pubkey=mint.pubkey(),
                lamports=rent,
                space=MINT_LEN,
                owner=TOKEN_PROGRAM,
            )
        ),
        initialize_mint2(
            InitializeMint2Params(
                decimals=USDC_DECIMALS,
                program_id=TOKEN_PROGRAM,
                mint=mint.pubkey(),
                mint_authority=deployer.pubkey(),
                freeze_authority=None,
            )
        ),
    ]
    funded = (("coordinator", coordinator), ("client", payer))
    for _, owner in funded:
        ata = get_associated_token_address(owner.pubkey(), mint.pubkey(), TOKEN_PROGRAM)
        ixs.append(
            create_associated_token_account(deployer.pubkey(), owner.pubkey(), mint.pubkey())
        )
        ixs.append(
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM,
                    mint=mint.pubkey(),
                    dest=ata,
                    mint_authority=deployer.pubkey(),
                    amount=usdc_per_account,
                    decimals=USDC_DECIMALS,
                    signers=[],
                )
            )
        )
    setup_sig = send_instructions(client, deployer, ixs, [mint])

    def account(k: Keypair, usdc: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": str(k.pubkey()),
            "secret_key": str(k),
            "lamports": lamports_per_account,
        }
        if usdc is not None:
            ata = get_associated_token_address(k.pubkey(), mint.pubkey(), TOKEN_PROGRAM)
            out.update(token_account=str(ata), usdc=usdc)
        return out

    return {
        "warning": WARNING,
        "kind": "solana",
        "cluster": "localnet",
        "network": X402_NETWORK,
        "genesis_hash": genesis,
        "rpc_url": rpc_url,
        "usdc": {
            "mint": str(mint.pubkey()),
            "decimals": USDC_DECIMALS,
            "token_program": str(TOKEN_PROGRAM),
            "mint_authority": str(deployer.pubkey()),
        },
        "setup_tx": str(setup_sig),
        "accounts": {
            "deployer": account(deployer, None),
            "coordinator": account(coordinator, usdc_per_account),
            "client": account(payer, usdc_per_account),
        },
        "created_at": int(time.time()),
    }


# -- chain up / status / down over a deployment file ------------------------------------


def is_solana_node(pid: int) -> bool:
    """Guards against signalling a recycled pid: on Linux the command line must be the
    node's (`python -m dispatchnet.devchain.solana_node`)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return pid_alive(pid)
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return NODE_MODULE.encode() in argv and pid_alive(pid)


def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM (then SIGKILL) for a node pid; True if it was running."""
    return processes.stop_pid(pid, is_solana_node, timeout)


def serves(data: dict[str, Any], timeout: float = 2.0) -> bool:
    """The recorded node is alive, is the same chain (genesis hash) and has the mint."""
    pid = int(data.get("node_pid") or 0)
    if not is_solana_node(pid):
        return False
    try:
        url = str(data["rpc_url"])
        if _rpc(url, "getGenesisHash", [], timeout) != data["genesis_hash"]:
            return False
        mint = _rpc(url, "getAccountInfo", [data["usdc"]["mint"], {"encoding": "base64"}], timeout)
        return mint["value"] is not None
    except (httpx.HTTPError, SolanaLocalError, KeyError, TypeError, ValueError):
        return False


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def chain_up(path: Path, port: int = 0, **node_options: Any) -> dict[str, Any]:
    """Starts (or finds running) a detached node, bootstraps it and writes the deployment
    file at `path`; idempotent: a file whose node still serves is returned untouched."""
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        if serves(data):
            return data
        stop_pid(int(data.get("node_pid") or 0))  # a half-dead leftover
    node = SolanaLocal(
        port=port, detached=True, log_path=path.with_suffix(".node.log"), **node_options
    )
    node.start()
    try:
        data = bootstrap(node.rpc_url)
        data.update(name=path.stem, node_pid=node.pid, node_log=str(node.log_path))
        _write_private(path, json.dumps(data, indent=2) + "\n")
    except BaseException:
        node.stop()
        raise
    node.detach()
    return data


def chain_down(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"deployment_file": str(path), "stopped": False, "note": "no local chain"}
    data = json.loads(path.read_text())
    pid = int(data.get("node_pid") or 0)
    stopped = stop_pid(pid)
    path.unlink(missing_ok=True)
    path.with_suffix(".node.log").unlink(missing_ok=True)
    return {"deployment_file": str(path), "node_pid": pid, "stopped": stopped, "removed": True}


def chain_status(path: Path, timeout: float = 2.0) -> dict[str, Any]:
    """Where the local chain is and whether it answers (`ok`)."""
    out: dict[str, Any] = {"deployment_file": str(path)}
    if not path.exists():
        out.update(ok=False, running=False, note="no local chain: run `dispatch chain up`")
        return out
    data = json.loads(path.read_text())
    pid = int(data.get("node_pid") or 0)
    out.update(
        node_pid=pid,
        running=is_solana_node(pid),
        rpc_url=data.get("rpc_url"),
        network=data.get("network"),
        mint=data.get("usdc", {}).get("mint"),
    )
    try:
        out["slot"] = _rpc(str(data["rpc_url"]), "getSlot", [], timeout)
    except (httpx.HTTPError, SolanaLocalError, KeyError) as e:
        out.update(ok=False, note=f"cannot reach {data.get('rpc_url')}: {type(e).__name__}")
        return out
    out["ok"] = serves(data, timeout)
    if not out["ok"]:
        out["note"] = "the node answers but is not the recorded chain (genesis hash or mint)"
    return out
