"""Deploys Dispatch's contracts (contracts/artifacts/*.json) to an EVM chain with web3.py.

    deployment = deploy(rpc_url, private_key)
    deployment.to_json()      # {"chain_id", "rpc_url", "identity", "reputation", ...}

The ReputationRegistry and ValidationRegistry constructors get the IdentityRegistry's
address. Transactions are signed locally with the given key and sent one after another,
each waited for, so the same code deploys to anvil and to a public testnet. Blocking: from
async code, call `await asyncio.to_thread(deploy, ...)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from eth_account import Account
from web3 import Web3
from web3.contract.contract import ContractConstructor
from web3.types import TxParams

# contracts/artifacts/ of the repository this package is installed from (editable install).
ARTIFACTS_DIR = Path(__file__).resolve().parents[4] / "contracts" / "artifacts"


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str


def load_artifact(name: str, artifacts_dir: Path | None = None) -> Artifact:
    path = (artifacts_dir or ARTIFACTS_DIR) / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return Artifact(
        name=data["contractName"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
    )


@dataclass(frozen=True)
class Deployment:
    """Where Dispatch's contracts live on one chain. Addresses are checksummed."""

    chain_id: int
    rpc_url: str
    identity: str
    reputation: str
    validation: str
    receipt_anchor: str
    usdc: str
    batch_settler: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            chain_id=int(data["chain_id"]),
            rpc_url=str(data["rpc_url"]),
            identity=Web3.to_checksum_address(data["identity"]),
            reputation=Web3.to_checksum_address(data["reputation"]),
            validation=Web3.to_checksum_address(data["validation"]),
            receipt_anchor=Web3.to_checksum_address(data["receipt_anchor"]),
            usdc=Web3.to_checksum_address(data["usdc"]),
            batch_settler=Web3.to_checksum_address(data["batch_settler"]),
        )

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))


class DeployError(RuntimeError):
    pass


def _send(w3: Web3, constructor: ContractConstructor, key: str, timeout: float) -> str:
    account = Account.from_key(key)
    tx: TxParams = constructor.build_transaction(
        {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    )
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)
    address = receipt.get("contractAddress")
    if receipt["status"] != 1 or not address:
        raise DeployError(f"deployment transaction {tx_hash.hex()} failed")
    return str(address)


def deploy(
    rpc_url: str,
    private_key: str,
    *,
    artifacts_dir: Path | None = None,
    timeout: float = 120.0,
) -> Deployment:
    """Deploys IdentityRegistry, ReputationRegistry, ValidationRegistry, ReceiptAnchor,
    TestUSDC and BatchSettler from the account of `private_key` (which becomes the USDC minter)."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))

    def constructor(name: str, *args: Any) -> ContractConstructor:
        art = load_artifact(name, artifacts_dir)
        return w3.eth.contract(abi=art.abi, bytecode=art.bytecode).constructor(*args)

    identity = _send(w3, constructor("IdentityRegistry"), private_key, timeout)
    reputation = _send(w3, constructor("ReputationRegistry", identity), private_key, timeout)
    validation = _send(w3, constructor("ValidationRegistry", identity), private_key, timeout)
    anchor = _send(w3, constructor("ReceiptAnchor"), private_key, timeout)
    usdc = _send(w3, constructor("TestUSDC"), private_key, timeout)
    settler = _send(w3, constructor("BatchSettler"), private_key, timeout)
    return Deployment(
        chain_id=w3.eth.chain_id,
        rpc_url=rpc_url,
        identity=identity,
        reputation=reputation,
        validation=validation,
        receipt_anchor=anchor,
        usdc=usdc,
        batch_settler=settler,
    )
