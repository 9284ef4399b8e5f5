"""A local Solana node: the real SVM (LiteSVM from solders) behind Solana's JSON-RPC over HTTP.

Every component talks to it as to any Solana RPC URL (solana-py, the x402 SDK), so a
profile pointing at devnet differs only in its URL, mint and facilitator.

    node = SolanaNode()                       # LiteSVM with SPL Token, Token-2022, ATA, Memo
    with NodeServer(node, port=0) as server:  # ThreadingHTTPServer on 127.0.0.1
        server.rpc_url                        # http://127.0.0.1:<port>

    python -m dispatchnet.devchain.solana_node --port 0    # prints one JSON line when ready

What it does as a validator does:
- Slots advance with wall time (`slot_seconds`, 400 ms by default); a slot's blockhash is
  valid for `validity_slots` (150) slots, then a transaction that uses it is refused
  (`BlockhashNotFound`). Block height equals the slot (no skipped slots).
- sendTransaction verifies signatures, runs preflight (unless skipPreflight) and answers with
  the validator's error shapes (-32002 "Transaction simulation failed: ..."); a signature
  already processed within its blockhash's lifetime is refused (`AlreadyProcessed`), or with
  skipPreflight silently dropped, as a real node drops it.
- The last `history_limit` (10,000) transactions are kept with slot, blockTime, err, fee,
  pre/post lamport and token balances and logs, for getSignatureStatuses, getTransaction
  and getSignaturesForAddress. minimumLedgerSlot is the oldest slot whose transactions
  are all still kept (0 until one is dropped, then the slot after the last one dropped),
  as a validator that purges its ledger reports the oldest slot it still has.
- There is a single node and no forks: a processed transaction is final at once
  (confirmationStatus "finalized"), and every commitment level reads the same state.
- requestAirdrop is a real system transfer from the node's faucet keypair.
- Fees: LiteSVM charges 5000 lamports a signature and no priority fee; meta.fee says so.
  A transaction whose fee cannot be charged does not land (no record, no status).
- Not served: getTransaction's jsonParsed encoding (json, base64 and base58 are), balances
  of accounts loaded through address lookup tables, websocket subscriptions.

Bounds: request bodies (1 MiB, HTTP 413 beyond; 30 s to send one), batches (100
requests), a transaction's wire size (1232 bytes, as a validator's packet),
getMultipleAccounts (100 keys), getSignatureStatuses (256 signatures),
getSignaturesForAddress (1000), airdrops (1,000 SOL each). LiteSVM is not thread-safe:
one lock owns it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message, MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.rpc.responses import RpcSimulateTransactionResult
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.token.state import Mint, TokenAccount
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata, TransactionMetadata

_log = logging.getLogger(__name__)

SLOT_SECONDS = 0.4
VALIDITY_SLOTS = 150  # MAX_PROCESSING_AGE: a blockhash's lifetime, in slots
STATUS_CACHE_SLOTS = 300  # getSignatureStatuses without searchTransactionHistory looks this far
HISTORY_LIMIT = 10_000
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_SECONDS = 30.0  # a connection idle this long mid-request is closed
MAX_BATCH = 100
PACKET_DATA_SIZE = 1232  # a transaction's wire size limit
MAX_BASE64_TX = 1644
MAX_BASE58_TX = 1683
MAX_MULTIPLE_ACCOUNTS = 100
MAX_SIGNATURE_STATUSES = 256
MAX_SIGNATURES_FOR_ADDRESS = 1000
MAX_BASE58_ACCOUNT_DATA = 128
MAX_AIRDROP_LAMPORTS = 1_000 * 10**9
LAMPORTS_PER_SIGNATURE = 5000
FAUCET_LAMPORTS = 10**18
SOLANA_CORE_VERSION = "2.1.0"

TOKEN_PROGRAM = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
TOKEN_2022_PROGRAM = Pubkey.from_string("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb")
MEMO_PROGRAMS = (
    Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"),
    Pubkey.from_string("Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo"),
)
# Programs a node must have for Dispatch's payments and anchoring; LiteSVM ships them all
# (SPL Token, Token-2022, Associated Token Account, Memo v1 and v2); start-up checks it.
REQUIRED_PROGRAMS = (
    TOKEN_PROGRAM,
    TOKEN_2022_PROGRAM,
    Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL"),
    *MEMO_PROGRAMS,
)
TOKEN_ACCOUNT_LEN = 165
MINT_LEN = 82

# JSON-RPC error codes, as Agave's RPC server uses them.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SEND_TRANSACTION_PREFLIGHT_FAILURE = -32002
TRANSACTION_SIGNATURE_VERIFICATION_FAILURE = -32003
UNSUPPORTED_TRANSACTION_VERSION = -32015

# TransactionError's Display strings for the errors this node produces (solana-sdk).
_TX_ERROR_TEXT = {
    "AccountInUse": "Account in use",
    "AccountLoadedTwice": "Account loaded twice",
    "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
    "ProgramAccountNotFound": "Attempt to load a program that does not exist",
    "InsufficientFundsForFee": "Insufficient funds for fee",
    "InvalidAccountForFee": "This account may not be used to pay transaction fees",
    "AlreadyProcessed": "This transaction has already been processed",
    "BlockhashNotFound": "Blockhash not found",
    "CallChainTooDeep": "Loader call chain is too deep",
    "MissingSignatureForFee": "Transaction requires a fee but has no signature present",
    "InvalidAccountIndex": "Transaction contains an invalid account reference",
    "SignatureFailure": "Transaction did not pass signature verification",
    "InvalidProgramForExecution": "This program may not be used for executing instructions",
    "SanitizeFailure": "Transaction failed to sanitize accounts offsets correctly",
    "InvalidWritableAccount": "Transaction loads a writable account that cannot be written",
}
_IX_ERROR_TEXT = {
    "GenericError": "generic instruction error",
    "InvalidArgument": "invalid program argument",
    "InvalidInstructionData": "invalid instruction data",
    "InvalidAccountData": "invalid account data for instruction",
    "AccountDataTooSmall": "account data too small for instruction",
    "InsufficientFunds": "insufficient funds for instruction",
    "IncorrectProgramId": "incorrect program id for instruction",
    "MissingRequiredSignature": "missing required signature for instruction",
    "AccountAlreadyInitialized": "instruction requires an uninitialized account",
    "UninitializedAccount": "instruction requires an initialized account",
    "NotEnoughAccountKeys": "insufficient account keys for instruction",
    "AccountNotRentExempt": "An account does not have enough lamports to be rent-exempt",
    "InvalidSeeds": "Provided seeds do not result in a valid address",
    "ProgramFailedToComplete": "Program failed to complete",
    "ComputationalBudgetExceeded": "Computational budget exceeded",
    "PrivilegeEscalation": "Cross-program invocation with unauthorized signer or writable account",
}


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (Solana's)."""
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(text: str) -> bytes:
    """Inverse of b58encode; ValueError on a character outside the alphabet."""
    n = 0
    for c in text:
        if c not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


class RpcError(Exception):
    """A JSON-RPC error object: what the node answers instead of a result."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


def _invalid(message: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message)


def error_json(err: Any) -> Any:
    """A solders TransactionErrorType as the RPC's JSON value (e.g. "BlockhashNotFound",
    {"InstructionError": [2, {"Custom": 1}]})."""
    if err is None:
        return None
    return json.loads(RpcSimulateTransactionResult(err=err).to_json())["err"]


def error_text(err: Any) -> str:
    """The validator's Display text for a TransactionError in its JSON form."""
    if isinstance(err, str):
        return _TX_ERROR_TEXT.get(err, err)
    if isinstance(err, dict) and "InstructionError" in err:
        index, inner = err["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            text = f"custom program error: 0x{int(inner['Custom']):x}"
        elif isinstance(inner, str):
            text = _IX_ERROR_TEXT.get(inner, inner)
        else:
            text = json.dumps(inner)
        return f"Error processing Instruction {index}: {text}"
    return json.dumps(err)


def _unsimulated(err: Any) -> dict[str, Any]:
    """A simulation result for a transaction refused before execution (age, status cache)."""
    return {
        "accounts": None,
        "err": err,
        "innerInstructions": None,
        "loadedAccountsDataSize": None,
        "logs": [],
        "replacementBlockhash": None,
        "returnData": None,
        "unitsConsumed": 0,
    }


def _preflight_failure(sim: dict[str, Any]) -> RpcError:
    """sendTransaction's refusal when preflight fails: the simulation result as data."""
    return RpcError(
        SEND_TRANSACTION_PREFLIGHT_FAILURE,
        f"Transaction simulation failed: {error_text(sim['err'])}",
        sim,
    )


# -- parameter helpers -------------------------------------------------------------------


def _params(raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid("Invalid params: expected an array of parameters")
    return raw


def _config(params: list[Any], index: int) -> dict[str, Any]:
    if len(params) <= index or params[index] is None:
        return {}
    cfg = params[index]
    if not isinstance(cfg, dict):
        raise _invalid(f"Invalid params: parameter {index} must be a configuration object")
    return cfg


def _required(params: list[Any], index: int, what: str) -> Any:
    if len(params) <= index:
        raise _invalid(f"Invalid params: missing {what}")
    return params[index]


def _pubkey(value: Any) -> Pubkey:
    if not isinstance(value, str) or not 32 <= len(value) <= 44:
        raise _invalid("Invalid param: Invalid")
    try:
        return Pubkey.from_string(value)
    except ValueError:
        raise _invalid("Invalid param: Invalid") from None


def _signature(value: Any) -> Signature:
    if not isinstance(value, str) or len(value) > 88:
        raise _invalid("Invalid param: Invalid")
    try:
        return Signature.from_string(value)
    except ValueError:
        raise _invalid("Invalid param: Invalid") from None


def _u64(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise _invalid(f"Invalid params: {what} must be an unsigned 64-bit integer")
    return value


def _decode_tx(encoded: Any, encoding: str) -> VersionedTransaction:
    """A wire transaction from its base58/base64 text, with the validator's size checks."""
    if not isinstance(encoded, str):
        raise _invalid("Invalid params: the transaction must be a string")
    if encoding == "base58":
        if len(encoded) > MAX_BASE58_TX:
            raise _invalid(
                f"base58 encoded solana_transaction::versioned::VersionedTransaction too large:"
                f" {len(encoded)} bytes (max: encoded/raw {MAX_BASE58_TX}/{PACKET_DATA_SIZE})"
            )
        try:
            raw = b58decode(encoded)
        except ValueError as e:
            raise _invalid(f"invalid base58 encoding: {e}") from None
    elif encoding == "base64":
        if len(encoded) > MAX_BASE64_TX:
            raise _invalid(
                f"base64 encoded solana_transaction::versioned::VersionedTransaction too large:"
                f" {len(encoded)} bytes (max: encoded/raw {MAX_BASE64_TX}/{PACKET_DATA_SIZE})"
            )
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError as e:
            raise _invalid(f"invalid base64 encoding: {e}") from None
    else:
        raise _invalid(f"Invalid params: unsupported encoding: {encoding}")
    if len(raw) > PACKET_DATA_SIZE:
        raise _invalid(
            f"decoded solana_transaction::versioned::VersionedTransaction too large:"
            f" {len(raw)} bytes (max: {PACKET_DATA_SIZE} bytes)"
        )
    try:
        tx = VersionedTransaction.from_bytes(raw)
    except ValueError as e:
        raise _invalid(
            f"failed to deserialize solana_transaction::versioned::VersionedTransaction: {e}"
        ) from None
    try:
        tx.sanitize()
    except Exception as e:  # solders raises its own SanitizeError type
        raise _invalid(f"invalid transaction: {e}") from None
    return tx


def _tx_encoding(cfg: dict[str, Any]) -> str:
    encoding = cfg.get("encoding", "base58")
    if encoding not in ("base58", "base64"):
        raise _invalid(f"Invalid params: unsupported encoding: {encoding}")
    return str(encoding)


def _ui_amount(amount: int, decimals: int) -> dict[str, Any]:
    if decimals:
        whole, frac = divmod(amount, 10**decimals)
        text = f"{whole}.{frac:0{decimals}d}".rstrip("0").rstrip(".")
    else:
        text = str(amount)
    return {
        "amount": str(amount),
        "decimals": decimals,
        "uiAmount": amount / 10**decimals,
        "uiAmountString": text,
    }


def _message_bytes(message: Message | MessageV0) -> bytes:
    return to_bytes_versioned(message)


def _fee(message: Message | MessageV0) -> int:
    """What LiteSVM charges: 5000 lamports a signature. It charges no priority fee (compute
    unit price), so neither does this node's fee reporting: meta.fee matches the balances."""
    return LAMPORTS_PER_SIGNATURE * message.header.num_required_signatures


# -- the ledger ---------------------------------------------------------------------------


@dataclass
class TxRecord:
    """One processed transaction, as getTransaction shows it."""

    signature: str
    slot: int
    block_time: int
    tx: VersionedTransaction
    err: Any  # JSON form, None when it succeeded
    fee: int
    pre_balances: list[int]
    post_balances: list[int]
    pre_token_balances: list[dict[str, Any]]
    post_token_balances: list[dict[str, Any]]
    logs: list[str]
    units: int
    account_keys: list[str] = field(default_factory=list)
    memo: str | None = None


class SolanaNode:
    """The chain state and the JSON-RPC methods over it (transport-free: `handle` takes and
    returns decoded JSON). Thread-safe: every method runs under one lock."""

    def __init__(
        self,
        *,
        slot_seconds: float = SLOT_SECONDS,
        validity_slots: int = VALIDITY_SLOTS,
        history_limit: int = HISTORY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slot_seconds <= 0 or validity_slots < 1 or history_limit < 1:
            raise ValueError("slot_seconds, validity_slots and history_limit must be positive")
        self.slot_seconds = slot_seconds
        self.validity_slots = validity_slots
        self.history_limit = history_limit
        self._clock = clock
        self._lock = threading.Lock()
        # Blockhashes and signature de-duplication are this node's (a validator's bank and
        # status cache); LiteSVM only knows its single latest blockhash, so its own check and
        # history are off.
        self._svm = (
            LiteSVM()
            .with_blockhash_check(False)
            .with_sigverify(False)
            .with_transaction_history(0)
            .with_lamports(FAUCET_LAMPORTS * 2)
        )
        missing = [str(p) for p in REQUIRED_PROGRAMS if self._svm.get_account(p) is None]
        if missing:
            raise RuntimeError(f"LiteSVM lacks programs {missing}")
        self._seed = os.urandom(32)
        self.genesis_hash = str(Hash(hashlib.sha256(b"genesis" + self._seed).digest()))
        self._t0 = clock()
        self._wall0 = time.time()
        self._slot = 0
        self._blockhashes: OrderedDict[str, int] = OrderedDict()  # handed out -> slot
        self._recent_sigs: dict[str, int] = {}  # status cache: signature -> blockhash slot
        self._history: OrderedDict[str, TxRecord] = OrderedDict()
        self._ledger_from = 0  # minimumLedgerSlot: every transaction from this slot on is kept
        self._tx_count = 0
        self.faucet = Keypair()
        self._svm.airdrop(self.faucet.pubkey(), FAUCET_LAMPORTS)
        self._methods: dict[str, Callable[[list[Any]], Any]] = {
            "getAccountInfo": self.get_account_info,
            "getBalance": self.get_balance,
            "getBlockHeight": self.get_block_height,
            "getEpochInfo": self.get_epoch_info,
            "getFeeForMessage": self.get_fee_for_message,
            "getGenesisHash": lambda _p: self.genesis_hash,
            "getHealth": lambda _p: "ok",
            "getLatestBlockhash": self.get_latest_blockhash,
            "getMinimumBalanceForRentExemption": self.get_minimum_balance_for_rent_exemption,
            "getMultipleAccounts": self.get_multiple_accounts,
            "getSignatureStatuses": self.get_signature_statuses,
            "getSignaturesForAddress": self.get_signatures_for_address,
            "getSlot": lambda _p: self._slot,
            "getTokenAccountBalance": self.get_token_account_balance,
            "getTransaction": self.get_transaction,
            "getTransactionCount": lambda _p: self._tx_count,
            "getVersion": lambda _p: {"solana-core": SOLANA_CORE_VERSION, "feature-set": 0},
            "isBlockhashValid": self.is_blockhash_valid,
            "minimumLedgerSlot": self.minimum_ledger_slot,
            "requestAirdrop": self.request_airdrop,
            "sendTransaction": self.send_transaction,
            "simulateTransaction": self.simulate_transaction,
        }

    # -- JSON-RPC dispatch --

    def handle(self, request: Any) -> Any:
        """One decoded JSON-RPC 2.0 request or batch -> its response (a list for a batch)."""
        if isinstance(request, list):
            if not request:
                return self._error(None, RpcError(INVALID_REQUEST, "Invalid request"))
            if len(request) > MAX_BATCH:
                return self._error(
                    None, RpcError(INVALID_REQUEST, f"batch larger than {MAX_BATCH} requests")
                )
            return [self._handle_one(r) for r in request]
        return self._handle_one(request)

    @staticmethod
    def _error(rid: Any, e: RpcError) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "error": e.to_json(), "id": rid}

    def _handle_one(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return self._error(None, RpcError(INVALID_REQUEST, "Invalid request"))
        rid = req.get("id")
        if not (rid is None or isinstance(rid, (int, str))) or isinstance(rid, bool):
            return self._error(None, RpcError(INVALID_REQUEST, "Invalid request"))
        method = self._methods.get(req["method"])
        if method is None:
            return self._error(rid, RpcError(METHOD_NOT_FOUND, "Method not found"))
        try:
            params = _params(req.get("params"))
            with self._lock:
                self._tick()
                result = method(params)
        except RpcError as e:
            return self._error(rid, e)
        except Exception as e:  # a bug must not take the server down
            _log.exception("%s failed", req["method"])
            return self._error(rid, RpcError(INTERNAL_ERROR, f"Internal error: {e}"))
        return {"jsonrpc": "2.0", "result": result, "id": rid}

    # -- clock and blockhashes (callers hold the lock) --

    def _tick(self) -> None:
        slot = int((self._clock() - self._t0) / self.slot_seconds)
        if slot <= self._slot:
            return
        self._slot = slot
        self._svm.warp_to_slot(slot)
        clock = self._svm.get_clock()
        clock.unix_timestamp = self._block_time(slot)
        self._svm.set_clock(clock)
        oldest = slot - self.validity_slots
        while self._blockhashes and next(iter(self._blockhashes.values())) < oldest:
            self._blockhashes.popitem(last=False)
        if len(self._recent_sigs) > 0:
            stale = [s for s, bs in self._recent_sigs.items() if bs < oldest]
            for s in stale:
                del self._recent_sigs[s]

    def _block_time(self, slot: int) -> int:
        return int(self._wall0 + slot * self.slot_seconds)

    def _blockhash(self, slot: int) -> str:
        h = str(Hash(hashlib.sha256(self._seed + slot.to_bytes(8, "little")).digest()))
        if h not in self._blockhashes:
            self._blockhashes[h] = slot
        return h

    def _blockhash_slot(self, blockhash: Hash) -> int | None:
        """The slot of a still-valid blockhash, None when unknown or expired."""
        slot = self._blockhashes.get(str(blockhash))
        if slot is None or self._slot - slot > self.validity_slots:
            return None
        return slot

    def _context(self, value: Any) -> dict[str, Any]:
        return {"context": {"apiVersion": SOLANA_CORE_VERSION, "slot": self._slot}, "value": value}

    # -- accounts --

    def _account_json(self, key: Pubkey, encoding: str) -> dict[str, Any] | None:
        acct = self._svm.get_account(key)
        if acct is None:
            return None
        data = bytes(acct.data)
        out: dict[str, Any] = {
            "executable": acct.executable,
            "lamports": acct.lamports,
            "owner": str(acct.owner),
            "rentEpoch": acct.rent_epoch,
            "space": len(data),
        }
        if encoding == "jsonParsed":
            parsed = self._parse_token_data(acct.owner, data)
            out["data"] = (
                parsed if parsed is not None else [base64.b64encode(data).decode(), "base64"]
            )
        elif encoding == "base64":
            out["data"] = [base64.b64encode(data).decode(), "base64"]
        elif encoding == "base58":
            if len(data) > MAX_BASE58_ACCOUNT_DATA:
                raise RpcError(
                    INVALID_REQUEST,
                    "Encoded binary (base 58) data should be less than 128 bytes, "
                    "please use Base64 encoding.",
                )
            out["data"] = [b58encode(data), "base58"]
        else:
            raise _invalid(f"Invalid params: unsupported encoding: {encoding}")
        return out

    def _mint_decimals(self, mint: Pubkey) -> int | None:
        acct = self._svm.get_account(mint)
        if acct is None or acct.owner not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM):
            return None
        data = bytes(acct.data)
        return data[44] if len(data) >= MINT_LEN else None

    def _token_account(self, owner: Pubkey, data: bytes) -> TokenAccount | None:
        if owner not in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM) or len(data) < TOKEN_ACCOUNT_LEN:
            return None
        if len(data) > TOKEN_ACCOUNT_LEN and data[TOKEN_ACCOUNT_LEN] != 2:  # 2022 AccountType
            return None
        try:
            return TokenAccount.from_bytes(data[:TOKEN_ACCOUNT_LEN])
        except ValueError:
            return None

    def _parse_token_data(self, owner: Pubkey, data: bytes) -> dict[str, Any] | None:
        program = "spl-token" if owner == TOKEN_PROGRAM else "spl-token-2022"
        account = self._token_account(owner, data)
        if account is not None:
            decimals = self._mint_decimals(account.mint) or 0
            info: dict[str, Any] = {
                "isNative": account.is_native is not None,
                "mint": str(account.mint),
                "owner": str(account.owner),
                "state": {0: "uninitialized", 1: "initialized", 2: "frozen"}.get(
                    int(account.state), "initialized"
                ),
                "tokenAmount": _ui_amount(account.amount, decimals),
            }
            if account.delegate is not None:
                info["delegate"] = str(account.delegate)
                info["delegatedAmount"] = _ui_amount(account.delegated_amount, decimals)
            if account.close_authority is not None:
                info["closeAuthority"] = str(account.close_authority)
            parsed = {"info": info, "type": "account"}
        elif owner in (TOKEN_PROGRAM, TOKEN_2022_PROGRAM) and len(data) >= MINT_LEN:
            try:
                mint = Mint.from_bytes(data[:MINT_LEN])
            except ValueError:
                return None
            parsed = {
                "info": {
                    "decimals": mint.decimals,
                    "freezeAuthority": str(mint.freeze_authority)
                    if mint.freeze_authority
                    else None,
                    "isInitialized": mint.is_initialized,
                    "mintAuthority": str(mint.mint_authority) if mint.mint_authority else None,
                    "supply": str(mint.supply),
                },
                "type": "mint",
            }
        else:
            return None
        return {"parsed": parsed, "program": program, "space": len(data)}

    def get_account_info(self, params: list[Any]) -> Any:
        key = _pubkey(_required(params, 0, "the account address"))
        encoding = str(_config(params, 1).get("encoding", "base58"))
        return self._context(self._account_json(key, encoding))

    def get_multiple_accounts(self, params: list[Any]) -> Any:
        keys = _required(params, 0, "the account addresses")
        if not isinstance(keys, list):
            raise _invalid("Invalid params: expected an array of addresses")
        if len(keys) > MAX_MULTIPLE_ACCOUNTS:
            raise _invalid(f"Too many inputs provided; max {MAX_MULTIPLE_ACCOUNTS}")
        encoding = str(_config(params, 1).get("encoding", "base64"))
        return self._context([self._account_json(_pubkey(k), encoding) for k in keys])

    def get_balance(self, params: list[Any]) -> Any:
        key = _pubkey(_required(params, 0, "the account address"))
        return self._context(self._svm.get_balance(key) or 0)

    def get_token_account_balance(self, params: list[Any]) -> Any:
        key = _pubkey(_required(params, 0, "the token account address"))
        acct = self._svm.get_account(key)
        if acct is None:
            raise _invalid("Invalid param: could not find account")
        account = self._token_account(acct.owner, bytes(acct.data))
        if account is None:
            raise _invalid("Invalid param: not a Token account")
        decimals = self._mint_decimals(account.mint)
        if decimals is None:
            raise _invalid("Invalid param: could not find mint")
        return self._context(_ui_amount(account.amount, decimals))

    def get_minimum_balance_for_rent_exemption(self, params: list[Any]) -> Any:
        size = _u64(_required(params, 0, "the data length"), "data length")
        if size > 10 * 1024 * 1024:
            raise _invalid("Invalid params: data length exceeds 10 MiB")
        return self._svm.minimum_balance_for_rent_exemption(size)

    # -- slots and blockhashes --

    def get_block_height(self, params: list[Any]) -> Any:
        return self._slot

    def get_epoch_info(self, params: list[Any]) -> Any:
        schedule = self._svm.get_epoch_schedule()
        per_epoch = schedule.slots_per_epoch
        return {
            "absoluteSlot": self._slot,
            "blockHeight": self._slot,
            "epoch": self._slot // per_epoch,
            "slotIndex": self._slot % per_epoch,
            "slotsInEpoch": per_epoch,
            "transactionCount": self._tx_count,
        }

    def minimum_ledger_slot(self, params: list[Any]) -> Any:
        if params:
            raise _invalid("Invalid params: No parameters were expected")
        return self._ledger_from

    def get_latest_blockhash(self, params: list[Any]) -> Any:
        return self._context(
            {
                "blockhash": self._blockhash(self._slot),
                "lastValidBlockHeight": self._slot + self.validity_slots,
            }
        )

    def is_blockhash_valid(self, params: list[Any]) -> Any:
        value = _required(params, 0, "the blockhash")
        try:
            blockhash = Hash.from_string(value) if isinstance(value, str) else None
        except ValueError:
            blockhash = None
        if blockhash is None:
            raise _invalid("Invalid param: Invalid")
        return self._context(self._blockhash_slot(blockhash) is not None)

    def get_fee_for_message(self, params: list[Any]) -> Any:
        encoded = _required(params, 0, "the message")
        if not isinstance(encoded, str) or len(encoded) > MAX_BASE64_TX:
            raise _invalid("Invalid params: the message must be a base64 string")
        try:
            raw = base64.b64decode(encoded, validate=True)
            message: Message | MessageV0 = (
                MessageV0.from_bytes(raw[1:]) if raw[:1] == b"\x80" else Message.from_bytes(raw)
            )
        except (ValueError, IndexError):
            raise _invalid("Invalid params: could not decode the message") from None
        if self._blockhash_slot(message.recent_blockhash) is None:
            return self._context(None)
        return self._context(_fee(message))

    # -- transactions --

    def _verify_signatures(self, tx: VersionedTransaction) -> None:
        if not all(tx.verify_with_results()):
            raise RpcError(
                TRANSACTION_SIGNATURE_VERIFICATION_FAILURE,
                "Transaction signature verification failure",
            )

    def _check(self, tx: VersionedTransaction) -> Any:
        """A bank's age and status-cache checks: the error's JSON form, or None."""
        if self._blockhash_slot(tx.message.recent_blockhash) is None:
            return "BlockhashNotFound"
        if str(tx.signatures[0]) in self._recent_sigs:
            return "AlreadyProcessed"
        return None

    def _simulate(self, tx: VersionedTransaction) -> dict[str, Any]:
        result = self._svm.simulate_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            meta, err = result.meta(), error_json(result.err())
        else:
            meta, err = result.meta(), None
        return {
            "accounts": None,
            "err": err,
            "innerInstructions": None,
            "loadedAccountsDataSize": None,
            "logs": list(meta.logs()),
            "replacementBlockhash": None,
            "returnData": None,
            "unitsConsumed": meta.compute_units_consumed(),
            "fee": _fee(tx.message),
        }

    def simulate_transaction(self, params: list[Any]) -> Any:
        cfg = _config(params, 1)
        tx = _decode_tx(_required(params, 0, "the transaction"), _tx_encoding(cfg))
        if cfg.get("sigVerify") and cfg.get("replaceRecentBlockhash"):
            raise _invalid("sigVerify may not be used with replaceRecentBlockhash")
        if cfg.get("sigVerify"):
            self._verify_signatures(tx)
        replacement = None
        if cfg.get("replaceRecentBlockhash"):
            replacement = {
                "blockhash": self._blockhash(self._slot),
                "lastValidBlockHeight": self._slot + self.validity_slots,
            }
            err = None
        else:
            err = self._check(tx)
        if err is not None:
            value = _unsimulated(err)
        else:
            value = self._simulate(tx)
            value["replacementBlockhash"] = replacement
        return self._context(value)

    def send_transaction(self, params: list[Any]) -> Any:
        cfg = _config(params, 1)
        tx = _decode_tx(_required(params, 0, "the transaction"), _tx_encoding(cfg))
        signature = str(tx.signatures[0])
        self._verify_signatures(tx)
        err = self._check(tx)
        if not cfg.get("skipPreflight"):
            sim = _unsimulated(err) if err is not None else self._simulate(tx)
            if sim["err"] is not None:
                raise _preflight_failure(sim)
        if err is None:
            self._process(tx)
        # else: a validator drops a stale or duplicate transaction without a word
        return signature

    def _token_balances(self, keys: list[Pubkey]) -> list[dict[str, Any]]:
        out = []
        for i, key in enumerate(keys):
            acct = self._svm.get_account(key)
            if acct is None:
                continue
            account = self._token_account(acct.owner, bytes(acct.data))
            if account is None:
                continue
            decimals = self._mint_decimals(account.mint) or 0
            out.append(
                {
                    "accountIndex": i,
                    "mint": str(account.mint),
                    "owner": str(account.owner),
                    "programId": str(acct.owner),
                    "uiTokenAmount": _ui_amount(account.amount, decimals),
                }
            )
        return out

    def _process(self, tx: VersionedTransaction) -> TxRecord | None:
        """Executes `tx` and records it; None when it did not land: a transaction whose fee
        cannot be charged (unknown or poor fee payer, an account that cannot be loaded) is
        dropped by a validator, with no fee and no record."""
        keys = list(tx.message.account_keys)
        pre = [self._svm.get_balance(k) or 0 for k in keys]
        pre_tokens = self._token_balances(keys)
        result = self._svm.send_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            meta: TransactionMetadata = result.meta()
            err = error_json(result.err())
        else:
            meta, err = result, None
        post = [self._svm.get_balance(k) or 0 for k in keys]
        if err is not None and post[0] == pre[0]:
            return None
        signature = str(tx.signatures[0])
        record = TxRecord(
            signature=signature,
            slot=self._slot,
            block_time=self._block_time(self._slot),
            tx=tx,
            err=err,
            fee=_fee(tx.message),
            pre_balances=pre,
            post_balances=post,
            pre_token_balances=pre_tokens,
            post_token_balances=self._token_balances(keys),
            logs=list(meta.logs()),
            units=meta.compute_units_consumed(),
            account_keys=[str(k) for k in keys],
            memo=self._memo_of(tx),
        )
        blockhash_slot = self._blockhash_slot(tx.message.recent_blockhash)
        self._recent_sigs[signature] = self._slot if blockhash_slot is None else blockhash_slot
        self._history[signature] = record
        while len(self._history) > self.history_limit:
            _, dropped = self._history.popitem(last=False)
            self._ledger_from = dropped.slot + 1
        self._tx_count += 1
        return record

    @staticmethod
    def _memo_of(tx: VersionedTransaction) -> str | None:
        """getSignaturesForAddress's memo field: "[len] text" for each memo, joined by "; "."""
        keys = list(tx.message.account_keys)
        memos = []
        for ix in tx.message.instructions:
            if keys[ix.program_id_index] in MEMO_PROGRAMS:
                text = bytes(ix.data).decode("utf-8", errors="replace")
                memos.append(f"[{len(bytes(ix.data))}] {text}")
        return "; ".join(memos) if memos else None

    def request_airdrop(self, params: list[Any]) -> Any:
        key = _pubkey(_required(params, 0, "the recipient address"))
        lamports = _u64(_required(params, 1, "the lamports"), "lamports")
        if not 0 < lamports <= MAX_AIRDROP_LAMPORTS:
            raise _invalid(f"Invalid params: an airdrop is 1 to {MAX_AIRDROP_LAMPORTS} lamports")
        message = MessageV0.try_compile(
            self.faucet.pubkey(),
            [
                transfer(
                    TransferParams(
                        from_pubkey=self.faucet.pubkey(), to_pubkey=key, lamports=lamports
                    )
                )
            ],
            [],
            Hash.from_string(self._blockhash(self._slot)),
        )
        record = self._process(VersionedTransaction(message, [self.faucet]))
        if record is None or record.err is not None:
            raise RpcError(INTERNAL_ERROR, "airdrop request failed: the faucet's transfer failed")
        return record.signature

    def _status(self, record: TxRecord) -> dict[str, Any]:
        return {
            "slot": record.slot,
            "confirmations": None,
            "err": record.err,
            "status": {"Ok": None} if record.err is None else {"Err": record.err},
            "confirmationStatus": "finalized",
        }

    def get_signature_statuses(self, params: list[Any]) -> Any:
        sigs = _required(params, 0, "the signatures")
        if not isinstance(sigs, list):
            raise _invalid("Invalid params: expected an array of signatures")
        if len(sigs) > MAX_SIGNATURE_STATUSES:
            raise _invalid(f"Too many inputs provided; max {MAX_SIGNATURE_STATUSES}")
        search_history = bool(_config(params, 1).get("searchTransactionHistory"))
        out: list[Any] = []
        for s in sigs:
            record = self._history.get(str(_signature(s)))
            recent = record is not None and self._slot - record.slot <= STATUS_CACHE_SLOTS
            out.append(self._status(record) if record and (recent or search_history) else None)
        return self._context(out)

    def get_transaction(self, params: list[Any]) -> Any:
        sig = str(_signature(_required(params, 0, "the signature")))
        cfg = params[1] if len(params) > 1 and isinstance(params[1], str) else None
        config = {"encoding": cfg} if cfg else _config(params, 1)
        encoding = config.get("encoding", "json")
        if encoding not in ("json", "base64", "base58"):
            raise _invalid(f"Invalid params: unsupported encoding: {encoding}")
        max_version = config.get("maxSupportedTransactionVersion")
        if max_version is not None and max_version != 0:
            raise _invalid("Invalid params: unsupported maxSupportedTransactionVersion")
        record = self._history.get(sig)
        if record is None:
            return None
        is_v0 = isinstance(record.tx.message, MessageV0)
        if is_v0 and max_version is None:
            raise RpcError(
                UNSUPPORTED_TRANSACTION_VERSION,
                "Transaction version (0) is not supported by the requesting client. Please "
                "try the request again with the following configuration parameter: "
                '"maxSupportedTransactionVersion": 0',
            )
        raw = bytes(record.tx)
        transaction: Any
        if encoding == "base64":
            transaction = [base64.b64encode(raw).decode(), "base64"]
        elif encoding == "base58":
            transaction = [b58encode(raw), "base58"]
        else:
            transaction = self._ui_transaction(record.tx)
        out: dict[str, Any] = {
            "slot": record.slot,
            "blockTime": record.block_time,
            "transaction": transaction,
            "meta": {
                "err": record.err,
                "status": {"Ok": None} if record.err is None else {"Err": record.err},
                "fee": record.fee,
                "preBalances": record.pre_balances,
                "postBalances": record.post_balances,
                "innerInstructions": [],
                "logMessages": record.logs,
                "preTokenBalances": record.pre_token_balances,
                "postTokenBalances": record.post_token_balances,
                "rewards": [],
                "loadedAddresses": {"writable": [], "readonly": []},
                "computeUnitsConsumed": record.units,
            },
        }
        if max_version is not None:
            out["version"] = 0 if is_v0 else "legacy"
        return out

    @staticmethod
    def _ui_transaction(tx: VersionedTransaction) -> dict[str, Any]:
        msg = tx.message
        header = msg.header
        message: dict[str, Any] = {
            "header": {
                "numRequiredSignatures": header.num_required_signatures,
                "numReadonlySignedAccounts": header.num_readonly_signed_accounts,
                "numReadonlyUnsignedAccounts": header.num_readonly_unsigned_accounts,
            },
            "accountKeys": [str(k) for k in msg.account_keys],
            "recentBlockhash": str(msg.recent_blockhash),
            "instructions": [
                {
                    "programIdIndex": ix.program_id_index,
                    "accounts": list(bytes(ix.accounts)),
                    "data": b58encode(bytes(ix.data)),
                    "stackHeight": None,
                }
                for ix in msg.instructions
            ],
        }
        if isinstance(msg, MessageV0):
            message["addressTableLookups"] = [
                {
                    "accountKey": str(lookup.account_key),
                    "writableIndexes": list(bytes(lookup.writable_indexes)),
                    "readonlyIndexes": list(bytes(lookup.readonly_indexes)),
                }
                for lookup in msg.address_table_lookups
            ]
        return {"signatures": [str(s) for s in tx.signatures], "message": message}

    def get_signatures_for_address(self, params: list[Any]) -> Any:
        address = str(_pubkey(_required(params, 0, "the address")))
        cfg = _config(params, 1)
        limit = cfg.get("limit")
        limit = MAX_SIGNATURES_FOR_ADDRESS if limit is None else limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise _invalid(f"Invalid limit; max {MAX_SIGNATURES_FOR_ADDRESS}")
        before, until = cfg.get("before"), cfg.get("until")
        out: list[dict[str, Any]] = []
        started = before is None
        for record in reversed(self._history.values()):
            if not started:
                started = record.signature == before
                continue
            if record.signature == until or len(out) >= limit:
                break
            if address in record.account_keys:
                out.append(
                    {
                        "signature": record.signature,
                        "slot": record.slot,
                        "err": record.err,
                        "memo": record.memo,
                        "blockTime": record.block_time,
                        "confirmationStatus": "finalized",
                    }
                )
        return out


# -- HTTP transport -----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # a stalled client lets go

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the log

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, b"ok", "text/plain")
        else:
            self._reply(
                405, b"Used HTTP Method is not allowed. POST or OPTIONS is required", "text/plain"
            )

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(411, b"Content-Length required", "text/plain")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(413, b"Payload Too Large", "text/plain")
            return
        body = self.rfile.read(length)
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            reply: Any = {
                "jsonrpc": "2.0",
                "error": {"code": PARSE_ERROR, "message": "Parse error"},
                "id": None,
            }
        else:
            reply = self.server.node.handle(request)
        self._reply(200, json.dumps(reply).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    node: SolanaNode
    request_timeout: float


class NodeServer:
    """Serves a SolanaNode's JSON-RPC over HTTP on a background thread. `port=0` lets the
    kernel pick a free port (read `port` / `rpc_url` after start())."""

    def __init__(
        self,
        node: SolanaNode | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self.node = node or SolanaNode()
        self.host = host
        self.requested_port = port
        self.request_timeout = request_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the node is not serving")
        return int(self._server.server_address[1])

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        server = _Server((self.host, self.requested_port), _Handler)
        server.node = self.node
        server.request_timeout = self.request_timeout
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
            name="solana-node-http",
        )  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispatchnet.devchain.solana_node",
        description="A local Solana JSON-RPC node over LiteSVM (development only).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--slot-ms", type=float, default=SLOT_SECONDS * 1000)
    parser.add_argument("--validity-slots", type=int, default=VALIDITY_SLOTS)
    parser.add_argument("--history", type=int, default=HISTORY_LIMIT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    node = SolanaNode(
        slot_seconds=args.slot_ms / 1000,
        validity_slots=args.validity_slots,
        history_limit=args.history,
    )
    server = NodeServer(node, host=args.host, port=args.port).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ready = {
        "rpc_url": server.rpc_url,
        "port": server.port,
        "pid": os.getpid(),
        "genesis_hash": node.genesis_hash,
        "slot_ms": args.slot_ms,
        "validity_slots": args.validity_slots,
    }
    print(json.dumps(ready), flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
