"""The EVM kind's ChainAdapter (chains/registry.py): every chain role a profile with
[chain] kind = "evm" needs, built from the modules of this package."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchnet.chains.evm.node import resolve_evm_chain
from dispatchnet.profiles import AcceptConfig, ChainConfig, Profile

if TYPE_CHECKING:
    from dispatchnet.agent_identity import IdentityVerifier
    from dispatchnet.payments.payouts import PayoutSender
    from dispatchnet.receipts.anchoring import Anchorer
    from dispatchnet.reputation.erc8004 import FeedbackReader
    from dispatchnet.reputation.feedback import FeedbackPoster


# keccak256("Transfer(address,address,uint256)"): the ERC-20 Transfer event's topic
_TRANSFER = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")


class EvmAdapter:
    kind = "evm"

    def anchorer(self, cfg: ChainConfig, data_dir: Path | None) -> Anchorer:
        from dispatchnet.chains.evm.anchoring import EvmAnchorer
        from dispatchnet.receipts.anchoring import NoAnchor

        if not cfg.deployment and not cfg.receipt_anchor:
            return NoAnchor(f"[chain] receipt_anchor is empty: no ReceiptAnchor on {cfg.network}")
        resolved = resolve_evm_chain(cfg, data_dir)
        if not resolved.receipt_anchor:
            return NoAnchor(f"the deployment has no receipt_anchor on {cfg.network}")
        return EvmAnchorer.for_chain(resolved, cfg)

    def identity_verifier(self, profile: Profile) -> IdentityVerifier | None:
        from dispatchnet.chains.evm.identity import EvmIdentityVerifier

        chain = resolve_evm_chain(profile.chain)
        if not chain.identity_registry:
            if profile.identity.require_registration:
                raise ValueError("[identity] require_registration needs an identity_registry")
            return None
        return EvmIdentityVerifier(
            chain,
            rpc_timeout=profile.chain.rpc_timeout_seconds,
            ttl_seconds=profile.identity.cache_ttl_seconds,
        )

    def summary_reader(
        self, profile: Profile, data_dir: Path, trusted: list[str], tag1: str
    ) -> FeedbackReader:
        from dispatchnet.chains.evm.reputation import EvmReputationReader

        chain = resolve_evm_chain(profile.chain, data_dir)
        return EvmReputationReader(chain, trusted, tag1, profile.chain.rpc_timeout_seconds)

    def feedback_poster(
        self, profile: Profile, data_dir: Path
    ) -> tuple[FeedbackPoster, tuple[type[BaseException], ...]] | None:
        from dispatchnet.chains.evm.reputation import EvmFeedbackPoster, FeedbackRejected

        chain = resolve_evm_chain(profile.chain, data_dir)
        if not chain.reputation_registry:
            return None
        poster = EvmFeedbackPoster(
            chain,
            gas_limit=profile.feedback.gas_limit,
            rpc_timeout=profile.chain.rpc_timeout_seconds,
            tx_timeout=profile.chain.tx_timeout_seconds,
        )
        return poster, (FeedbackRejected,)

    def payment_rail(self, accept: AcceptConfig, profile: Profile, data_dir: Path) -> Any:
        from dispatchnet.chains.evm.rail import EvmRail

        return EvmRail(accept, resolve_evm_chain(profile.chain, data_dir), profile)

    def payouts(self, profile: Profile, data_dir: Path) -> PayoutSender:
        """Batched EIP-3009 payouts through the chain's BatchSettler (chains/evm/payouts.py)."""
        from dispatchnet.chains.deployments import ChainConfigError
        from dispatchnet.chains.evm.node import shared_sender
        from dispatchnet.chains.evm.payouts import EvmPayoutSender

        cfg = profile.chain
        chain = resolve_evm_chain(cfg, data_dir)
        if not chain.batch_settler:
            raise ChainConfigError(f"paying workers on {cfg.network} needs a batch_settler")
        sender = shared_sender(
            chain.rpc_url, chain.network, chain.account_key, cfg.rpc_timeout_seconds
        )
        return EvmPayoutSender(
            sender,
            chain.account_key,
            chain.batch_settler,
            profile.payments.settle_gas_limit,
            cfg.tx_timeout_seconds,
        )

    def payout_addresses(self, profile: Profile, data_dir: Path) -> Callable[[str], str | None]:
        from dispatchnet.chains.evm.identity import PayoutAddresses

        chain = resolve_evm_chain(profile.chain, data_dir)
        if not chain.identity_registry:
            return lambda agent_id: None
        return PayoutAddresses(chain, rpc_timeout=profile.chain.rpc_timeout_seconds)

    def client_wallet(self, profile: Profile, key_file: str) -> Any:
        from dispatchnet.payments.wallet import wallet_for

        return wallet_for(profile, key_file)

    def new_wallet_key(self, path: Path) -> str:
        from eth_account import Account

        from dispatchnet.chains.evm.node import load_or_create_chain_key

        return str(Account.from_key(load_or_create_chain_key(path)).address)

    def wallet_balances(self, profile: Profile, wallet: Any) -> dict[str, Any]:
        from x402.mechanisms.evm.default_assets import get_default_asset

        from dispatchnet.chains.evm.node import web3_for
        from dispatchnet.chains.evm.payments import token_balance

        chain = resolve_evm_chain(profile.chain)
        assets = {a.address.lower(): a.address for a in wallet.extra_assets}
        with contextlib.suppress(ValueError, KeyError):
            default = get_default_asset(chain.network)["asset"]
            assets.setdefault(default.lower(), default)
        w3 = web3_for(chain.rpc_url, profile.chain.rpc_timeout_seconds)
        balances = [
            {"asset": a, "balance": token_balance(w3, a, wallet.address)} for a in assets.values()
        ]
        return {"address": wallet.address, "network": chain.network, "balances": balances}

    def check_anchor(
        self, profile: Profile, root: bytes, network: str, transaction: str, expected_anchorer: str
    ) -> dict[str, Any]:
        from dispatchnet.chains.evm.anchoring import check_anchor_onchain

        chain = resolve_evm_chain(profile.chain)
        check = check_anchor_onchain(
            chain,
            root,
            network,
            transaction,
            expected_anchorer=expected_anchorer,
            timeout=profile.chain.rpc_timeout_seconds,
        )
        return {"network": chain.network, "receipt_anchor": chain.receipt_anchor, **check.as_dict()}

    def token_balance(self, profile: Profile, asset: str, account: str) -> int:
        from dispatchnet.chains.evm.node import web3_for
        from dispatchnet.chains.evm.payments import token_balance

        chain = resolve_evm_chain(profile.chain)
        return token_balance(
            web3_for(chain.rpc_url, profile.chain.rpc_timeout_seconds), asset, account
        )

    def token_flow(
        self, profile: Profile, data_dir: Path, asset: str, transaction: str
    ) -> int | None:
        from web3.exceptions import TransactionNotFound

        from dispatchnet.chains.evm.node import TRANSIENT, _brief, web3_for
        from dispatchnet.errors import Unavailable

        chain = resolve_evm_chain(profile.chain, data_dir)
        me = chain.account_address.lower()
        w3 = web3_for(chain.rpc_url, profile.chain.rpc_timeout_seconds)
        try:
            receipt = w3.eth.get_transaction_receipt(transaction)  # type: ignore[arg-type]
        except TransactionNotFound:
            return None
        except TRANSIENT as e:
            raise Unavailable(f"cannot read {transaction} on {chain.network}: {_brief(e)}") from e
        if not receipt["status"]:
            return 0
        flow = 0
        for log in receipt["logs"]:
            topics = log["topics"]
            if (
                str(log["address"]).lower() != asset.lower()
                or len(topics) != 3
                or bytes(topics[0]) != _TRANSFER
            ):
                continue
            sender, to = ("0x" + bytes(t)[-20:].hex() for t in topics[1:])
            amount = int.from_bytes(bytes(log["data"]), "big")
            flow += (amount if to == me else 0) - (amount if sender == me else 0)
        return flow

    def chain_up(self, profile: Profile, port: int | None) -> dict[str, Any]:
        from dispatchnet.devchain import local_chain

        return local_chain.chain_up(profile, port)

    def chain_down(self, profile: Profile) -> dict[str, Any]:
        from dispatchnet.devchain import local_chain

        return local_chain.chain_down(profile)

    def chain_status(self, profile: Profile) -> dict[str, Any]:
        from dispatchnet.devchain import local_chain

        return local_chain.chain_status(profile)


ADAPTER = EvmAdapter()
