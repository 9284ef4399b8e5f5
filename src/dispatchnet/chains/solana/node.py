"""The Solana node and account: where a profile's chain is (SolanaChain, resolve_solana_chain),
the coordinator's keypair, and solana-py clients.

Everything here that talks to a node is blocking solana-py code: async callers go through
asyncio.to_thread, so the event loop never waits on the chain.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import httpx2  # solana-py's HTTP client
from solana.exceptions import SolanaRpcException
from solana.rpc.api import Client
from solana.rpc.core import RPCException
from solders.keypair import Keypair

from dispatchnet.chains.deployments import (
    ChainConfigError,
    deployment_path,
    in_home,
    read_deployment,
)
from dispatchnet.chains.solana.config import BASE58_KEY
from dispatchnet.errors import Unavailable
from dispatchnet.profiles import ChainConfig

SOLANA_KEY_HEADER = "dispatch-solana-keypair-v1"

# Errors that mean "the node (or the path to it) is in trouble; try again later".
TRANSIENT = (SolanaRpcException, RPCException, httpx.HTTPError, httpx2.HTTPError, OSError)


@dataclass(frozen=True)
class SolanaChain:
    """A profile's Solana chain, resolved: the deployment file read (or the profile's
    rpc_url and mint), the coordinator's keypair found."""

    network: str
    rpc_url: str
    mint: str = ""
    cluster: str = ""  # "localnet" for the local node (its network id is devnet's)
    genesis_hash: str = ""  # the node's, when a deployment file recorded it
    # base58 64-byte secret key of the coordinator's keypair; "" when unknown
    secret_key: str = field(default="", repr=False)

    @property
    def keypair(self) -> Keypair:
        if not self.secret_key:
            raise ChainConfigError("[chain] has no coordinator keypair (set key_file)")
        return Keypair.from_base58_string(self.secret_key)

    @property
    def address(self) -> str:
        return str(self.keypair.pubkey()) if self.secret_key else ""


def resolve_solana_chain(cfg: ChainConfig, data_dir: Path | None = None) -> SolanaChain:
    """The chain a profile's [chain] describes (kind "solana"). With a deployment name the
    RPC URL, mint and (unless key_file is set) the coordinator keypair come from the
    deployment file; otherwise from the profile. data_dir: where a new solana.key goes when
    neither key_file nor a deployment account is given (None: no key is loaded)."""
    if cfg.kind != "solana":
        raise ChainConfigError(f'[chain] kind is {cfg.kind!r}, not "solana"')
    secret = cluster = genesis = ""
    if cfg.deployment:
        data = read_deployment(cfg.deployment)
        where = str(deployment_path(cfg.deployment))
        if data.get("network") != cfg.network:
            raise ChainConfigError(
                f"{where} is for network {data.get('network')!r}, the profile for {cfg.network!r}"
            )
        rpc_url = str(data.get("rpc_url") or "")
        mint = str((data.get("usdc") or {}).get("mint") or "")
        if mint and not BASE58_KEY.fullmatch(mint):
            raise ChainConfigError(f"{where} usdc.mint: {mint!r} is not a Solana address")
        coordinator = (data.get("accounts") or {}).get("coordinator") or {}
        secret = str(coordinator.get("secret_key") or "")
        cluster = str(data.get("cluster") or "")
        genesis = str(data.get("genesis_hash") or "")
    else:
        rpc_url, mint = cfg.rpc_url, cfg.mint
    if not rpc_url:
        raise ChainConfigError("[chain] has no RPC URL")
    if cfg.key_file:
        secret = load_or_create_solana_key(in_home(cfg.key_file))
    elif not secret and data_dir is not None:
        secret = load_or_create_solana_key(data_dir / "solana.key")
    return SolanaChain(
        network=cfg.network,
        rpc_url=rpc_url,
        mint=mint,
        cluster=cluster,
        genesis_hash=genesis,
        secret_key=secret,
    )


def load_or_create_solana_key(path: Path) -> str:
    """The base58 secret key (64 bytes, as `solana-keygen` and wallets export it) in a
    Solana key file, created (mode 0600, a new random keypair) when missing. The file holds
    a header line and the key."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = str(Keypair())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created meanwhile by another process: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{SOLANA_KEY_HEADER}\n{key}\n")
            return key
    lines = path.read_text().split()
    if len(lines) != 2 or lines[0] != SOLANA_KEY_HEADER:
        raise ChainConfigError(f"{path} is not a Dispatch Solana key file")
    try:
        Keypair.from_base58_string(lines[1])
    except ValueError as e:
        raise ChainConfigError(f"{path}: not a Solana keypair") from e
    return lines[1]


def client_for(rpc_url: str, timeout: float) -> Client:
    """A solana-py client (blocking) whose every request gives up after `timeout` seconds.
    solana-py deprecates its sync Client for AsyncClient; callers run it in a worker thread,
    as every Solana component here does (solana_rpc.py, devchain/solana_local.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return Client(rpc_url, timeout=timeout)


def blockhash_valid(rpc_url: str, blockhash: str, timeout: float) -> bool:
    """isBlockhashValid at confirmed commitment (solana-py's Client has no such call): a
    transaction naming an invalid blockhash can no longer land. Unavailable on an error."""
    reply = httpx.post(
        rpc_url,
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "isBlockhashValid",
            "params": [blockhash, {"commitment": "confirmed"}],
        },
        timeout=timeout,
    ).json()
    if "error" in reply:
        raise Unavailable(f"isBlockhashValid: {reply['error']}")
    return bool(reply["result"]["value"])


def brief(e: BaseException) -> str:
    """A short reason for a TRANSIENT error."""
    for err in (e, e.__cause__):  # solana-py wraps its HTTP errors in SolanaRpcException
        if isinstance(err, httpx.ConnectError | httpx2.ConnectError):
            return "connection refused or lost"
        if isinstance(err, httpx.TimeoutException | httpx2.TimeoutException):
            return "no answer in time"
    detail = e.args[0] if isinstance(e, RPCException) and e.args else None
    if isinstance(getattr(detail, "message", None), str):  # a JSON-RPC error object
        return str(detail.message)[:300]  # type: ignore[union-attr]
    return (str(e) or type(e).__name__)[:300]
