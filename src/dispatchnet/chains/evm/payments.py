"""EVM side of x402 payments: the in-process facilitator's signer, the on-chain lookup of a
used EIP-3009 authorization, and refunds.

Everything here is blocking web3.py code; payments/service.py calls it in worker threads.
Every transaction goes through the coordinator account's shared EvmSender (chains/evm.py),
so settlements, refunds, anchors and feedback never race for a nonce.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3RPCError
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.types import TransactionReceipt

from dispatchnet.chains.evm.deploy import load_artifact
from dispatchnet.chains.evm.node import (
    TRANSIENT,
    AbiFunction,
    Call,
    EvmSender,
    _brief,
    _hex,
)
from dispatchnet.errors import Unavailable

log = logging.getLogger("dispatch.payments.evm")

# How nodes refuse a transaction they hold already (geth and its kind; anvil)
ALREADY_SENT = ("already known", "already imported")
# Gas of a BatchSettler.settle beyond its per-payment share (the call and the loop).
BATCH_BASE_GAS = 30000
ITEM_OVERHEAD_GAS = 15000  # a batch item's own gas around its transfer (see BatchSettler)

# The ERC-20 and EIP-3009 pieces payments use (any USDC-like token has them).
TOKEN_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "transfer",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    },
    {
        "type": "function",
        "name": "decimals",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint8"}],
    },
    {
        "type": "function",
        "name": "name",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string"}],
    },
    {
        "type": "function",
        "name": "version",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string"}],
    },
    {
        "type": "function",
        "name": "authorizationState",
        "stateMutability": "view",
        "inputs": [
            {"name": "authorizer", "type": "address"},
            {"name": "nonce", "type": "bytes32"},
        ],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "type": "event",
        "name": "AuthorizationUsed",
        "anonymous": False,
        "inputs": [
            {"name": "authorizer", "type": "address", "indexed": True},
            {"name": "nonce", "type": "bytes32", "indexed": True},
        ],
    },
    {
        "type": "event",
        "name": "AuthorizationCanceled",
        "anonymous": False,
        "inputs": [
            {"name": "authorizer", "type": "address", "indexed": True},
            {"name": "nonce", "type": "bytes32", "indexed": True},
        ],
    },
]


class CoordinatorFacilitatorSigner(FacilitatorWeb3Signer):
    """The in-process x402 facilitator's signer: the coordinator's chain account.

    - Transactions (transferWithAuthorization) go through the account's shared EvmSender,
      with the profile's gas limit, instead of the SDK's own nonce counter.
    - Calls go through the sender's node connection (the profile's RPC timeout).
    - The SDK reports an unreachable node during verification as an invalid signature;
      this signer notes when a call failed for transport reasons (`transport_failed_since`)
      so the payment edge can answer UNAVAILABLE instead of blaming the payer.
    """

    def __init__(
        self,
        sender: EvmSender,
        private_key: str,
        rpc_url: str,
        tx_timeout: float,
        gas_limit: int,
    ) -> None:
        super().__init__(
            private_key, rpc_url, confirmation_timeout_seconds=tx_timeout, gas_limit=gas_limit
        )
        self._w3 = sender.w3
        self._sender = sender
        self._lock = threading.Lock()
        self._transport_failed_at = 0.0
        self.last_transport_error = ""
        self._codes: dict[str, tuple[float, bytes]] = {}  # address -> (until, code)
        # (address, function, id(abi)) -> (abi, the function's encoding)
        self._functions: dict[tuple[str, str, int], tuple[list[dict[str, Any]], AbiFunction]] = {}

    def transport_failed_since(self, t: float) -> bool:
        with self._lock:
            return self._transport_failed_at >= t

    def _note(self, e: BaseException) -> None:
        if isinstance(e, TRANSIENT) and not _is_revert(e):
            with self._lock:
                self._transport_failed_at = time.monotonic()
                self.last_transport_error = _brief(e)

    def _watched(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(super(), name)(*args, **kwargs)
        except BaseException as e:
            self._note(e)
            raise

    def get_chain_id(self) -> int:
        return int(self._watched("get_chain_id"))

    def read_contract(self, address: str, abi: list[dict[str, Any]], fn: str, *args: Any) -> Any:
        """The SDK's read_contract (an eth_call, decoded) without web3's contract and
        middleware layers, which cost more CPU than the call itself on the verify path:
        encoded and decoded with eth_abi, sent as a bare JSON-RPC request. A revert raises
        web3's ContractLogicError with the node's reason, as web3 would."""
        try:
            return self._eth_call(address, abi, fn, args)
        except BaseException as e:
            self._note(e)
            raise

    def _eth_call(self, address: str, abi: list[dict[str, Any]], fn: str, args: Any) -> Any:
        key = (address.lower(), fn, id(abi))
        found = self._functions.get(key)
        if found is None or found[0] is not abi:
            found = (abi, AbiFunction.of(abi, fn))
            self._functions[key] = found
        function = found[1]
        to = Web3.to_checksum_address(address)
        result = self._sender.call(to, function.calldata(*args), from_us=False)
        return function.result(HexBytes(result))

    def verify_typed_data(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._watched("verify_typed_data", *args, **kwargs))

    def get_balance(self, address: str, token_address: str) -> int:
        return int(self._watched("get_balance", address, token_address))

    def get_code(self, address: str) -> bytes:
        """An account's code, remembered for CODE_CACHE_SECONDS (the SDK asks for the
        payer's on every verification; whatever it says, the transfer's simulation that
        follows is what decides)."""
        now = time.monotonic()
        key = address.lower()
        with self._lock:
            known = self._codes.get(key)
            if known is not None and known[0] > now:
                return known[1]
        code = bytes(self._watched("get_code", address))
        with self._lock:
            if len(self._codes) >= CODE_CACHE_SIZE:
                self._codes.clear()
            self._codes[key] = (now + CODE_CACHE_SECONDS, code)
        return code

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        result: TransactionReceipt = self._watched("wait_for_transaction_receipt", tx_hash)
        return result

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        if data_suffix:
            raise ValueError("calldata suffixes (builder codes) are not used by Dispatch")
        contract = self._w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)
        fn = getattr(contract.functions, function_name)(*args)
        try:
            with self._sender.lock:
                return _hex(self._sender.send(fn, self._gas_limit))
        except BaseException as e:
            self._note(e)
            raise

    def send_transaction(self, to: str, data: bytes) -> str:
        # only used to deploy ERC-6492 smart wallets, which Dispatch does not allow
        raise ValueError("the Dispatch facilitator sends no raw transactions")


# How long an account's code is remembered on the verify path, and for how many accounts.
CODE_CACHE_SECONDS = 60.0
CODE_CACHE_SIZE = 10_000


def _is_revert(e: BaseException) -> bool:
    return isinstance(e, Web3RPCError) and "revert" in str(e).lower()


@dataclass(frozen=True)
class AuthorizationUse:
    """What the chain says of an EIP-3009 authorization: unused; used, by `transaction`
    (its AuthorizationUsed event); cancelled by its signer (its AuthorizationCanceled
    event); or used with neither event found (`unexplained`: the node keeps no logs that
    old, or no longer has them)."""

    used: bool
    transaction: str = ""
    cancelled: bool = False

    @property
    def unexplained(self) -> bool:
        return self.used and not self.transaction and not self.cancelled


# eth_getLogs is asked for at most this many blocks at a time (public nodes cap the range)
LOG_RANGE = 10_000


def authorization_use(
    w3: Web3, asset: str, payer: str, nonce: str, from_block: int = 0, not_before: int = 0
) -> AuthorizationUse:
    """Whether the authorization (payer, nonce) is used or cancelled on chain, and by
    what. The token's AuthorizationUsed and AuthorizationCanceled events of it are looked
    for from from_block, or else from the first block at or after the time not_before
    (the authorization's validAfter: no earlier block can use it; the signer can cancel
    it before, which is then looked for from from_block), to the latest, LOG_RANGE blocks
    a query. Unavailable when the node cannot be reached."""
    token = w3.eth.contract(address=Web3.to_checksum_address(asset), abi=TOKEN_ABI)
    nonce_bytes = HexBytes(nonce)
    try:
        used = bool(
            token.functions.authorizationState(Web3.to_checksum_address(payer), nonce_bytes).call()
        )
        if not used:
            return AuthorizationUse(False)
        latest = int(w3.eth.block_number)
        start = max(from_block, first_block_at(w3, not_before, latest) if not_before else 0)
        topics = [
            [_hex(AUTHORIZATION_USED_TOPIC), _hex(AUTHORIZATION_CANCELED_TOPIC)],
            "0x" + HexBytes(Web3.to_checksum_address(payer)).rjust(32, b"\0").hex(),
            _hex(nonce_bytes),
        ]
        for low in range(start, latest + 1, LOG_RANGE):
            logs = w3.eth.get_logs(
                {
                    "address": token.address,
                    "fromBlock": low,
                    "toBlock": min(latest, low + LOG_RANGE - 1),
                    "topics": topics,
                }
            )
            for entry in logs:
                if HexBytes(entry["topics"][0]) == AUTHORIZATION_CANCELED_TOPIC:
                    return AuthorizationUse(True, cancelled=True)
                return AuthorizationUse(True, _hex(entry["transactionHash"]))
    except TRANSIENT as e:
        raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
    return AuthorizationUse(True)


def first_block_at(w3: Web3, when: int, latest: int) -> int:
    """The first block whose timestamp is at least `when` (latest + 1 if none is yet), by
    bisection: about log2(latest) block reads."""
    low, high = 0, latest + 1
    while low < high:
        mid = (low + high) // 2
        if int(w3.eth.get_block(mid)["timestamp"]) >= when:
            high = mid
        else:
            low = mid + 1
    return low


class EvmRefunder:
    """Pays a settled amount back to the payer with an ERC-20 transfer from the coordinator
    account. Signing and broadcasting are separate so the caller can store the signed
    transaction (and its hash) first: a crash between the two then resends the same
    transaction (same nonce) instead of paying twice."""

    def __init__(self, sender: EvmSender, gas_limit: int, tx_timeout: float) -> None:
        self.sender = sender
        self.gas_limit = gas_limit
        self.tx_timeout = tx_timeout

    @property
    def address(self) -> str:
        return str(self.sender.address)

    def sign(self, asset: str, to: str, amount: int) -> tuple[str, str]:
        """(raw transaction hex, transaction hash) of transfer(to, amount)."""
        w3 = self.sender.w3
        token = w3.eth.contract(address=Web3.to_checksum_address(asset), abi=TOKEN_ABI)
        fn = token.functions.transfer(Web3.to_checksum_address(to), int(amount))
        try:
            with self.sender.lock:
                raw, tx_hash = self.sender.sign(fn, self.gas_limit)
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
        return "0x" + raw.hex(), _hex(tx_hash)

    def status(self, tx_hash: str) -> bool | None:
        """True: mined and succeeded; False: mined and reverted; None: not mined (yet)."""
        try:
            receipt = self.sender.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
        return bool(receipt["status"] == 1)

    def broadcast(self, raw: str, tx_hash: str) -> bool | None:
        """Sends the stored transaction (again) and waits for it; as status(). Returns
        None without waiting when the node refuses it as stale (its nonce was taken by
        another transaction): the caller signs a new one."""
        w3 = self.sender.w3
        try:
            with self.sender.lock:
                w3.eth.send_raw_transaction(HexBytes(raw))
        except Web3RPCError as e:
            text = str(e).lower()
            if "nonce too low" in text:
                mined = self.status(tx_hash)
                if mined is None:
                    log.info("refund %s went stale (nonce taken); signing a new one", tx_hash)
                return mined
            if not any(m in text for m in ALREADY_SENT):  # else: the node has it; wait
                raise Unavailable(f"refund not accepted by the node: {_brief(e)}") from e
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
        try:
            receipt = w3.eth.wait_for_transaction_receipt(
                HexBytes(tx_hash), timeout=self.tx_timeout
            )
        except TRANSIENT as e:
            raise Unavailable(f"no receipt for refund {tx_hash} yet: {_brief(e)}") from e
        return bool(receipt["status"] == 1)


@dataclass(frozen=True)
class Authorization:
    """A signed EIP-3009 transferWithAuthorization, as an x402 exact payment carries it."""

    payer: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str  # 0x hex, 32 bytes
    signature: str  # 0x hex

    @property
    def key(self) -> tuple[str, str]:
        return self.payer.lower(), self.nonce.lower()

    def as_abi(self) -> tuple[Any, ...]:
        """As eth_abi encodes the BatchSettler's Authorization struct."""
        return (
            self.payer.lower(),
            self.to.lower(),
            self.value,
            self.valid_after,
            self.valid_before,
            bytes(HexBytes(self.nonce)),
            bytes(HexBytes(self.signature)),
        )


@dataclass(frozen=True)
class BatchOutcome:
    """What one BatchSettler.settle did: the transaction ("" when nothing was sent), the
    authorizations it moved (by Authorization.key, from the token's AuthorizationUsed
    events), and those the token would not take (a simulation left them out)."""

    transaction: str
    settled: frozenset[tuple[str, str]]
    refused: frozenset[tuple[str, str]]


class EvmBatchSettler:
    """Settles many EIP-3009 authorizations of one token in one BatchSettler.settle
    transaction from the coordinator account (through its shared EvmSender).

    A simulation first leaves out what the token would refuse (a spent balance, an expired
    or already used authorization), so one bad payment never holds up the others. The
    chain makes it exactly once: an authorization's nonce can be used once, and `used()`
    tells which ones an earlier, interrupted attempt already settled."""

    def __init__(
        self, sender: EvmSender, address: str, per_payment_gas: int, tx_timeout: float
    ) -> None:
        self.sender = sender
        self.per_payment_gas = per_payment_gas
        # what one transfer may burn inside the batch (the rest of its share is the batch's
        # own work): a contract payer's signature check cannot take the others' gas
        self.gas_per_item = max(21000, per_payment_gas - ITEM_OVERHEAD_GAS)
        self.tx_timeout = tx_timeout
        self.address = Web3.to_checksum_address(address)
        # Encoded with eth_abi and sent as bare requests: web3's contract layer normalises
        # every address of a batch through a checksum (a keccak each), which cost more CPU
        # than the rest of a settlement pass together.
        abi = load_artifact("BatchSettler").abi
        self._settle = AbiFunction.of(abi, "settle")
        self._states = AbiFunction.of(abi, "authorizationStates")

    def _call(self, fn: AbiFunction, *args: Any) -> Any:
        return fn.result(self._call_data(fn.calldata(*args)))

    def _call_data(self, calldata: str) -> HexBytes:
        """eth_call of the contract with calldata, from the coordinator's account."""
        return HexBytes(self.sender.call(self.address, calldata))

    def used(self, asset: str, auths: list[Authorization]) -> list[bool]:
        """Whether each authorization is used (or cancelled) on chain, in one call."""
        try:
            return [
                bool(u)
                for u in self._call(
                    self._states,
                    asset.lower(),
                    [a.payer.lower() for a in auths],
                    [HexBytes(a.nonce) for a in auths],
                )
            ]
        except TRANSIENT as e:
            raise Unavailable(f"chain node unreachable: {_brief(e)}") from e

    def settle(self, asset: str, auths: list[Authorization]) -> BatchOutcome:
        """One transaction for every authorization the token takes now. Unavailable on
        node trouble, a transaction not mined in time, or a reverted batch (nothing moved:
        retry)."""
        token = asset.lower()
        try:
            calldata = self._settle.calldata(token, self.gas_per_item, [a.as_abi() for a in auths])
            ok = self._settle.result(self._call_data(calldata))
            send = [a for a, good in zip(auths, ok, strict=True) if good]
            refused = frozenset(a.key for a, good in zip(auths, ok, strict=True) if not good)
            if not send:
                return BatchOutcome("", frozenset(), refused)
            # the simulated call's calldata when the token takes all of them (the usual case)
            data = (
                calldata
                if len(send) == len(auths)
                else self._settle.calldata(token, self.gas_per_item, [a.as_abi() for a in send])
            )
            # Not an estimate: the batch catches each transfer's failure, so the node's
            # estimate is the least gas at which the batch *succeeds*, even when every
            # transfer inside it then runs out of gas.
            gas = self.per_payment_gas * len(send) + BATCH_BASE_GAS
            with self.sender.lock:
                tx_hash = self.sender.send(Call(self.address, data), gas)
            receipt = self.sender.receipt(_hex(tx_hash), self.tx_timeout, RECEIPT_POLL_SECONDS)
        except TRANSIENT as e:
            raise Unavailable(f"batch settlement: {_brief(e)}") from e
        if int(receipt["status"], 16) != 1:
            raise Unavailable(
                f"batch settlement {_hex(tx_hash)} reverted (gas used "
                f"{int(receipt['gasUsed'], 16)} of {gas}); nothing moved, retrying"
            )
        return BatchOutcome(_hex(tx_hash), authorizations_used(receipt, token), refused)


AUTHORIZATION_USED_TOPIC = Web3.keccak(text="AuthorizationUsed(address,bytes32)")
AUTHORIZATION_CANCELED_TOPIC = Web3.keccak(text="AuthorizationCanceled(address,bytes32)")
RECEIPT_POLL_SECONDS = 0.05  # how often a batch's receipt is asked for until it is mined


def authorizations_used(receipt: Any, token: str) -> frozenset[tuple[str, str]]:
    """(authorizer, nonce), lower-case 0x hex, of every AuthorizationUsed event the token
    logged in the transaction (both are indexed: topics 1 and 2). The receipt may be web3's
    (bytes) or the node's own (hex strings)."""
    used = set()
    for log_entry in receipt["logs"]:
        topics = log_entry["topics"]
        if (
            str(log_entry["address"]).lower() == token.lower()
            and len(topics) == 3
            and HexBytes(topics[0]) == AUTHORIZATION_USED_TOPIC
        ):
            authorizer = "0x" + HexBytes(topics[1])[-20:].hex()
            used.add((authorizer.lower(), _hex(HexBytes(topics[2])).lower()))
    return frozenset(used)


def token_info(w3: Web3, asset: str) -> tuple[str, str, int]:
    """(EIP-712 name, version, decimals) of an EIP-3009 token."""
    token = w3.eth.contract(address=Web3.to_checksum_address(asset), abi=TOKEN_ABI)
    try:
        return (
            str(token.functions.name().call()),
            str(token.functions.version().call()),
            int(token.functions.decimals().call()),
        )
    except TRANSIENT as e:
        raise Unavailable(f"chain node unreachable: {_brief(e)}") from e


def token_balance(w3: Web3, asset: str, account: str) -> int:
    token = w3.eth.contract(address=Web3.to_checksum_address(asset), abi=TOKEN_ABI)
    try:
        return int(token.functions.balanceOf(Web3.to_checksum_address(account)).call())
    except TRANSIENT as e:
        raise Unavailable(f"chain node unreachable: {_brief(e)}") from e
