"""The client side of x402 on Solana: a wallet (payments/wallet.py's interface) that answers
a `payment-required` trailer with an exact SVM payment (an SPL TransferChecked signed by
a Solana keypair, the facilitator paying the fee), through the official SDK's client.

    wallet = SvmWallet.of_deployment(data, max_per_job_micros)   # the "client" dev account
    signature = wallet.pay(required_header)   # blocking (asks the node for a blockhash)

Spend control as the EVM wallet: only known assets (the SDK's default stablecoins and the
deployment's test USDC), never more than max_per_job_micros per job.

Key file: one line, the base58 secret key (64 bytes, as `solana-keygen`/Phantom export
it), mode 0600; a `solana-keygen` JSON array file is read too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from x402 import x402ClientSync
from x402.mechanisms.svm import KeypairSigner, find_default_asset
from x402.mechanisms.svm.exact import ExactSvmClientScheme
from x402.schemas import PaymentRequirements

from dispatchnet.chains.deployments import ChainConfigError
from dispatchnet.payments.wallet import MICROS, Asset, Wallet


class SvmWallet(Wallet):
    """A Solana keypair paying x402 exact SVM payments; rpc_url is the node the client asks
    for a recent blockhash and the mint's decimals (None: the SDK's public cluster URL)."""

    pays_offline = False  # it asks the node (client.Payer: paid in a worker thread)

    def __init__(
        self,
        keypair: Keypair,
        max_per_job_micros: int,
        extra_assets: list[Asset] | None = None,
        rpc_url: str | None = None,
    ) -> None:
        # (Wallet.__init__ makes an EVM account: not called)
        self.keypair = keypair
        self.max_per_job_micros = max_per_job_micros
        self.extra_assets = list(extra_assets or [])
        self.client = x402ClientSync()
        self.client.register("solana:*", ExactSvmClientScheme(KeypairSigner(keypair), rpc_url))

    @classmethod
    def of_deployment(
        cls, data: dict[str, Any], max_per_job_micros: int, account: str = "client"
    ) -> SvmWallet:
        """The wallet of a Solana deployment file's dev account (solana_local.bootstrap funds
        the "client" one with test USDC), knowing the deployment's mint and node."""
        secret = str(((data.get("accounts") or {}).get(account) or {}).get("secret_key") or "")
        if not secret:
            raise ChainConfigError(f"the deployment has no {account!r} account")
        try:
            keypair = Keypair.from_base58_string(secret)
        except Exception:
            raise ChainConfigError(
                f"the deployment's {account!r} secret key is not base58"
            ) from None
        return cls(
            keypair,
            max_per_job_micros,
            svm_deployment_assets(data),
            str(data.get("rpc_url") or "") or None,
        )

    @property
    def address(self) -> str:
        return str(self.keypair.pubkey())

    def _cap(self, req: PaymentRequirements) -> int | None:
        network = str(req.network)
        try:
            default = find_default_asset(req.asset, network)
        except ValueError:  # not a Solana network the SDK knows
            return None
        if default is not None:
            decimals = int(default["decimals"])
        else:
            known = [
                a for a in self.extra_assets if a.network == network and a.address == req.asset
            ]
            if not known:
                return None
            decimals = known[0].decimals
        return int(self.max_per_job_micros * 10**decimals // MICROS)


def svm_deployment_assets(data: dict[str, Any]) -> list[Asset]:
    """The test USDC mint a Solana deployment file names, if any."""
    usdc = data.get("usdc") or {}
    if not isinstance(usdc, dict) or not usdc.get("mint"):
        return []
    return [Asset(str(data.get("network") or ""), str(usdc["mint"]), int(usdc.get("decimals", 6)))]


def load_or_create_solana_key(path: Path) -> Keypair:
    """The keypair in `path` (base58 line or solana-keygen JSON array); a new one, written
    with mode 0600, when the file does not exist. ChainConfigError when it does not load."""
    if path.exists():
        text = path.read_text().strip()
        try:
            if text.startswith("["):
                return Keypair.from_bytes(bytes(json.loads(text)))
            return Keypair.from_base58_string(text)
        except Exception:
            raise ChainConfigError(f"{path} holds no Solana secret key") from None
    keypair = Keypair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(keypair) + "\n")
    return keypair
