"""The EVM node and account: where a profile's chain is (EvmChain, resolve_evm_chain),
the coordinator's chain key, web3 connections, and the one nonce-safe sender per account
that anchoring, feedback, settlements and refunds share.

Everything here that talks to a node is blocking web3.py code: async callers go through
asyncio.to_thread, so the event loop never waits on the chain.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import requests
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ABIFunction, ChecksumAddress
from eth_utils.abi import (
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
)
from web3 import Web3
from web3._utils.error_formatters_utils import raise_contract_logic_error_on_revert
from web3.exceptions import (
    TimeExhausted,
    Web3RPCError,
)
from web3.types import RPCEndpoint, RPCResponse

from dispatchnet.chains.deployments import (
    ChainConfigError,
    deployment_path,
    in_home,
    read_deployment,
)
from dispatchnet.chains.evm.config import chain_id_of
from dispatchnet.chains.evm.deploy import load_artifact
from dispatchnet.profiles import ChainConfig

log = logging.getLogger("dispatch.chain")

CHAIN_KEY_HEADER = "dispatch-secp256k1-key-v1"


@dataclass(frozen=True)
class EvmChain:
    """A profile's EVM chain, resolved: the deployment file read, addresses checksummed
    ("" where the profile uses no such contract), the coordinator's account key found."""

    network: str
    chain_id: int
    rpc_url: str
    identity_registry: str = ""
    reputation_registry: str = ""
    validation_registry: str = ""
    receipt_anchor: str = ""
    usdc: str = ""
    batch_settler: str = ""
    # secp256k1 private key (0x hex) of the coordinator's chain account; "" when unknown
    account_key: str = field(default="", repr=False)

    @property
    def account_address(self) -> str:
        return str(Account.from_key(self.account_key).address) if self.account_key else ""


def _address(value: Any, what: str) -> str:
    if not value:
        return ""
    try:
        return str(Web3.to_checksum_address(str(value)))
    except ValueError as e:
        raise ChainConfigError(f"{what}: {value!r} is not an address") from e


def resolve_evm_chain(cfg: ChainConfig, data_dir: Path | None = None) -> EvmChain:
    """The chain a profile's [chain] describes (kind "evm"). With a deployment name the RPC
    URL, addresses and (unless key_file is set) the coordinator account come from the
    deployment file; otherwise from the profile. data_dir: where a new chain.key goes when
    neither key_file nor a deployment account is given (None: no key is loaded)."""
    if cfg.kind != "evm":
        raise ChainConfigError(f'[chain] kind is {cfg.kind!r}, not "evm"')
    chain_id = chain_id_of(cfg.network)
    account_key = ""
    if cfg.deployment:
        data = read_deployment(cfg.deployment)
        where = str(deployment_path(cfg.deployment))
        if data.get("network") != cfg.network:
            raise ChainConfigError(
                f"{where} is for network {data.get('network')!r}, the profile for {cfg.network!r}"
            )
        contracts = data.get("contracts") or {}
        values = {k: _address(contracts.get(k), f"{where} contracts.{k}") for k in _CONTRACTS}
        rpc_url = str(data.get("rpc_url") or "")
        coordinator = (data.get("accounts") or {}).get("coordinator") or {}
        account_key = str(coordinator.get("private_key") or "")
    else:
        values = {k: _address(getattr(cfg, k), f"[chain] {k}") for k in _CONTRACTS}
        rpc_url = cfg.rpc_url
    if not rpc_url:
        raise ChainConfigError("[chain] has no RPC URL")
    if cfg.key_file:
        account_key = load_or_create_chain_key(in_home(cfg.key_file))
    elif not account_key and data_dir is not None:
        account_key = load_or_create_chain_key(data_dir / "chain.key")
    return EvmChain(
        network=cfg.network, chain_id=chain_id, rpc_url=rpc_url, account_key=account_key, **values
    )


_CONTRACTS = (
    "identity_registry",
    "reputation_registry",
    "validation_registry",
    "receipt_anchor",
    "usdc",
    "batch_settler",
)


def load_or_create_chain_key(path: Path) -> str:
    """The secp256k1 private key (0x hex) in a chain key file, created (mode 0600, a new
    random key) when missing. The file holds a header line and the key in hex."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "0x" + bytes(Account.create().key).hex()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created meanwhile by another process: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{CHAIN_KEY_HEADER}\n{key}\n")
            return key
    lines = path.read_text().split()
    if len(lines) != 2 or lines[0] != CHAIN_KEY_HEADER:
        raise ChainConfigError(f"{path} is not a Dispatch chain key file")
    try:
        Account.from_key(lines[1])
    except (ValueError, TypeError) as e:
        raise ChainConfigError(f"{path}: not a secp256k1 private key") from e
    return lines[1]


def web3_for(rpc_url: str, timeout: float) -> Web3:
    # eth_chainId is cached: web3 validates every call's chain id, which otherwise costs a
    # round trip to the node per call (two per paid CommitJob), and a node's id is fixed.
    return Web3(
        Web3.HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": timeout},
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
        )
    )


_ABI_CACHE: dict[str, list[dict[str, Any]]] = {}


class BareRpc:
    """JSON-RPC requests over one kept-alive HTTP connection per thread, answered as the
    node sends them ({"result": …} or {"error": …}), for the calls made per payment (the
    verification's eth_call) and per settlement batch. web3's HTTPProvider goes through
    requests and urllib3 (a session, an adapter, a pool, merged headers, parsed response
    headers per call): on the verify path that cost more CPU than everything else.

    For read-only methods: a request on a kept connection the node has closed meanwhile
    is sent once more on a new one. Transport trouble raises OSError (ConnectionError,
    TimeoutError), which TRANSIENT covers, as requests' errors do."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ChainConfigError(f"not an http(s) JSON-RPC URL: {url}")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        self._timeout = timeout
        self._local = threading.local()
        self._ids = itertools.count(1)

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self._timeout)
            self._local.connection = connection
        return connection

    def request(self, method: str, params: list[Any]) -> RPCResponse:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        ).encode()
        for attempt in range(2):
            connection = self._connection()
            kept = connection.sock is not None
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                self._local.connection = None
                stale = isinstance(e, (ConnectionError, http.client.BadStatusLine))
                if kept and stale and attempt == 0:
                    continue  # the node closed the kept connection: once more, on a new one
                if isinstance(e, OSError):
                    raise
                raise ConnectionError(f"{self._host}: {type(e).__name__}: {e}") from e
            if response.status != 200:
                raise ConnectionError(f"{self._host} answered HTTP {response.status} to {method}")
            try:
                return cast(RPCResponse, json.loads(data))
            except ValueError as e:
                raise ConnectionError(f"{self._host} answered {method} with no JSON") from e
        raise AssertionError("unreachable")


# Errors that mean "the node (or the path to it) is in trouble; try again later".
TRANSIENT = (requests.RequestException, OSError, TimeExhausted, Web3RPCError)


def _hex(tx_hash: bytes | str) -> str:
    if isinstance(tx_hash, str):
        return tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash
    return "0x" + bytes(tx_hash).hex()


def _brief(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, requests.ConnectionError):
        text = "connection refused or lost"
    elif isinstance(e, requests.Timeout):
        text = "no answer in time"
    return text[:300]


# --- the shared sender ----------------------------------------------------------------------


class EvmSender:
    """Signs and sends transactions from one chain account. Every user of the account in
    this process (the anchorer, the feedback sender) shares one EvmSender (shared_sender),
    and holds `lock` around everything from reading the nonce to sending, so their nonces
    never collide. The nonce is the node's pending count, fetched for every transaction; a
    "nonce too low" answer (another process used the account) refetches it and sends again.
    Blocking: call it in a worker thread.

    The node is asked through BareRpc, not web3's provider: a transaction is the nonce, the
    fees (as web3 fills them), the send and the receipt's polls, and through web3 each of
    those requests cost ~1 ms of CPU (its middleware, requests and urllib3), held under the
    interpreter lock the event loop needs."""

    def __init__(self, w3: Web3, network: str, private_key: str) -> None:
        self.w3 = w3
        self.network = network
        self.chain_id = chain_id_of(network)
        self.account: LocalAccount = Account.from_key(private_key)
        self.lock = threading.Lock()
        provider = cast(Any, w3.provider)  # an HTTPProvider (web3_for)
        timeout = float(dict(provider.get_request_kwargs()).get("timeout") or 30.0)
        self.rpc = BareRpc(str(provider.endpoint_uri), timeout)

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    def result(self, method: str, params: list[Any]) -> Any:
        """The node's answer to one request; its error as Web3RPCError, as web3 raises it."""
        response = self.rpc.request(method, params)
        if response.get("error") is not None:
            raise Web3RPCError(str(response["error"]), rpc_response=response)
        return response.get("result")

    def call(self, to: str, data: str, method: str = "eth_call", from_us: bool = True) -> Any:
        """An eth_call (or eth_estimateGas) of `data` on contract `to`, from this account
        unless from_us is false; the node's result. A revert raises web3's
        ContractLogicError with the node's reason, as web3 would; another error
        Web3RPCError."""
        request = (
            {"from": self.address, "to": to, "data": data} if from_us else {"to": to, "data": data}
        )
        response = self.rpc.request(
            method, [request, "latest"] if method == "eth_call" else [request]
        )
        if response.get("error") is not None:
            raise_contract_logic_error_on_revert(response)
            raise Web3RPCError(str(response["error"]), rpc_response=response)
        return response["result"]

    def fees(self) -> dict[str, int]:
        """The fee fields web3 would fill: EIP-1559 maxPriorityFeePerGas (the node's
        eth_maxPriorityFeePerGas) and maxFeePerGas (twice the latest block's base fee plus
        that); a legacy gasPrice on a chain whose blocks have no base fee."""
        block = self.result("eth_getBlockByNumber", ["latest", False]) or {}
        base = block.get("baseFeePerGas")
        if base is None:
            return {"gasPrice": int(self.result("eth_gasPrice", []), 16)}
        try:
            tip = int(self.result("eth_maxPriorityFeePerGas", []), 16)
        except Web3RPCError:  # not served: web3's own estimate (from the fee history)
            tip = int(self.w3.eth.max_priority_fee)
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": tip + 2 * int(base, 16)}

    def sign(self, fn: Any, gas_limit: int) -> tuple[bytes, bytes]:
        """(raw transaction, hash) of the contract call fn (a web3 contract function or a
        Call), with the pending nonce, the fees and the given gas limit; the caller holds
        `lock`. Every field is filled here, so building it asks the node nothing more."""
        nonce = int(self.result("eth_getTransactionCount", [self.address, "pending"]), 16)
        tx = fn.build_transaction(
            {
                "from": self.address,
                "nonce": nonce,
                "gas": gas_limit,
                "chainId": self.chain_id,
                **self.fees(),
            }
        )
        signed = self.account.sign_transaction(tx)
        return bytes(signed.raw_transaction), bytes(signed.hash)

    def send(self, fn: Any, gas_limit: int, nonce_retries: int = 3) -> bytes:
        """Signs and sends with the pending nonce and the given gas limit; the transaction's
        hash. The caller holds `lock`."""
        for attempt in range(nonce_retries + 1):
            raw, tx_hash = self.sign(fn, gas_limit)
            try:
                self.result("eth_sendRawTransaction", ["0x" + raw.hex()])
                return tx_hash
            except Web3RPCError as e:
                if "nonce too low" not in str(e).lower() or attempt == nonce_retries:
                    raise
                log.info("a nonce was taken meanwhile; refetching the pending nonce")
        raise AssertionError("unreachable")

    def receipt(self, tx_hash: str, timeout: float, poll_seconds: float) -> dict[str, Any]:
        """The transaction's receipt as the node sends it (hex strings), polled every
        poll_seconds; TimeExhausted after timeout. (web3's receipt formatters checksum the
        address of each log, a keccak each: hundreds for a settlement batch.)"""
        deadline = time.monotonic() + timeout
        while True:
            found = self.result("eth_getTransactionReceipt", [tx_hash])
            if found:
                return cast(dict[str, Any], found)
            if time.monotonic() >= deadline:
                raise TimeExhausted(f"{tx_hash} not mined within {timeout:g}s")
            time.sleep(poll_seconds)


@dataclass(frozen=True)
class Call:
    """A contract call already encoded (AbiFunction.calldata), as EvmSender.send takes
    it: sent with no value."""

    to: str
    data: str

    def build_transaction(self, tx: dict[str, Any]) -> dict[str, Any]:
        return {**tx, "to": self.to, "data": self.data, "value": 0}


@dataclass(frozen=True)
class AbiFunction:
    """One contract function's selector and types, encoded and decoded with eth_abi (no
    web3 contract layer: it checksums every address it sees, a keccak each)."""

    selector: bytes
    inputs: list[str]
    outputs: list[str]

    @classmethod
    def of(cls, abi: list[dict[str, Any]], name: str) -> AbiFunction:
        [element] = [
            cast(ABIFunction, e) for e in abi if e.get("type") == "function" and e["name"] == name
        ]
        return cls(
            function_abi_to_4byte_selector(element),
            list(get_abi_input_types(element)),
            list(get_abi_output_types(element)),
        )

    def calldata(self, *args: Any) -> str:
        return "0x" + (self.selector + abi_encode(self.inputs, list(args))).hex()

    def result(self, data: bytes) -> Any:
        """The decoded return value: the value, a list of them, or None when there are none."""
        values = abi_decode(self.outputs, data)
        return values[0] if len(values) == 1 else list(values) if values else None


_SENDERS: dict[tuple[str, str], EvmSender] = {}
_SENDERS_LOCK = threading.Lock()


def shared_sender(rpc_url: str, network: str, private_key: str, rpc_timeout: float) -> EvmSender:
    """The process's one EvmSender for this account on this node."""
    address = str(Account.from_key(private_key).address)
    with _SENDERS_LOCK:
        sender = _SENDERS.get((rpc_url, address))
        if sender is None:
            sender = EvmSender(web3_for(rpc_url, rpc_timeout), network, private_key)
            _SENDERS[(rpc_url, address)] = sender
        return sender


def load_abi(name: str) -> list[dict[str, Any]]:
    """A contract's ABI from contracts/artifacts/, read once."""
    if name not in _ABI_CACHE:
        _ABI_CACHE[name] = load_artifact(name).abi
    return _ABI_CACHE[name]
