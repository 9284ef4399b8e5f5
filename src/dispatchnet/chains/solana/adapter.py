"""The Solana kind's ChainAdapter (chains/registry.py): every chain role a profile with
[chain] kind = "solana" needs, built from the modules of this package.

Identity and reputation live on an EVM chain, the profile's [identity_chain]: a worker is an
ERC-8004 agent there whose registration names its Solana key (metadata "dispatch.solana" and
the registration file's dispatch.solana), proven at Connect by ChallengeResponse.
solana_signature; feedback goes to that chain's ReputationRegistry. The roles delegate to
the identity chain's adapter (chains/evm), and chain up|down|status handle both chains."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchnet.chains import registry
from dispatchnet.chains.deployments import (
    ChainConfigError,
    DevChainError,
    deployment_path,
    in_home,
)
from dispatchnet.chains.solana.node import TRANSIENT, brief, client_for, resolve_solana_chain
from dispatchnet.profiles import AcceptConfig, ChainConfig, Profile

if TYPE_CHECKING:
    from dispatchnet.agent_identity import IdentityVerifier
    from dispatchnet.payments.payouts import PayoutSender
    from dispatchnet.receipts.anchoring import Anchorer
    from dispatchnet.reputation.erc8004 import FeedbackReader
    from dispatchnet.reputation.feedback import FeedbackPoster


def _local_chain(profile: Profile) -> Path:
    """The deployment file of the profile's local chain."""
    cfg = profile.chain
    if not cfg.devchain:
        raise ChainConfigError(
            f"profile {profile.name} has no local chain ([chain] devchain is empty); "
            "its chain is " + (cfg.rpc_url or cfg.network)
        )
    return deployment_path(cfg.deployment)


def _reading(cfg: ChainConfig) -> ChainConfig:
    """cfg for read-only uses: a key_file that does not exist is not created."""
    if cfg.key_file and not in_home(cfg.key_file).exists():
        return dataclasses.replace(cfg, key_file="")
    return cfg


# An SVM payment's blockhash is valid for ~150 slots: it cannot wait for the job.
SVM_PAYLOAD_SECONDS = 60


class SolanaAdapter:
    kind = "solana"

    def anchorer(self, cfg: ChainConfig, data_dir: Path | None) -> Anchorer:
        from dispatchnet.chains.solana.anchoring import SolanaAnchorer

        return SolanaAnchorer.for_chain(resolve_solana_chain(cfg, data_dir), cfg)

    def identity_verifier(self, profile: Profile) -> IdentityVerifier | None:
        """The [identity_chain]'s check plus the Solana link; None without an identity chain
        (agent ids are ignored; require_registration is refused at load time then)."""
        evm = registry.identity_profile(profile)
        if evm is None:
            return None
        from dispatchnet.chains.evm.identity import EvmIdentityVerifier
        from dispatchnet.chains.evm.node import resolve_evm_chain

        chain = resolve_evm_chain(evm.chain)
        if not chain.identity_registry:
            raise ValueError("[identity_chain] has no identity_registry")
        return EvmIdentityVerifier(
            chain,
            rpc_timeout=evm.chain.rpc_timeout_seconds,
            ttl_seconds=profile.identity.cache_ttl_seconds,
            solana_link=True,
        )

    def summary_reader(
        self, profile: Profile, data_dir: Path, trusted: list[str], tag1: str
    ) -> FeedbackReader:
        evm = registry.identity_profile(profile)
        if evm is None:
            raise ChainConfigError(
                "on-chain reputation on [chain] kind solana needs an [identity_chain]"
            )
        return registry.adapter_of(evm).summary_reader(evm, data_dir, trusted, tag1)

    def feedback_poster(
        self, profile: Profile, data_dir: Path
    ) -> tuple[FeedbackPoster, tuple[type[BaseException], ...]] | None:
        evm = registry.identity_profile(profile)
        if evm is None:
            return None
        return registry.adapter_of(evm).feedback_poster(evm, data_dir)

    def payment_rail(self, accept: AcceptConfig, profile: Profile, data_dir: Path) -> Any:
        from dispatchnet.chains.solana.rail import SvmRail

        if profile.payments.settle_margin_seconds < SVM_PAYLOAD_SECONDS:
            # an SVM payment expires with its blockhash: it must be settled at once
            raise ChainConfigError(
                f"[payments] settle_margin_seconds must be at least {SVM_PAYLOAD_SECONDS} on "
                "kind solana (a payment's blockhash expires in about a minute: it is settled "
                "at commit)"
            )
        chain = resolve_solana_chain(profile.chain, data_dir)
        return SvmRail(
            accept.network,
            chain.rpc_url,
            accept.asset or chain.mint,
            chain.keypair,
            rpc_timeout=profile.chain.rpc_timeout_seconds,
            tx_timeout=profile.chain.tx_timeout_seconds,
            facilitator_url=accept.facilitator,
        )

    def payouts(self, profile: Profile, data_dir: Path) -> PayoutSender:
        """One payout transaction per worker and run (chains/solana/payouts.py)."""
        from dispatchnet.chains.solana.payouts import SolanaPayoutSender

        chain = resolve_solana_chain(profile.chain, data_dir)
        return SolanaPayoutSender(
            chain.rpc_url,
            chain.keypair,
            rpc_timeout=profile.chain.rpc_timeout_seconds,
            tx_timeout=profile.chain.tx_timeout_seconds,
        )

    def payout_addresses(self, profile: Profile, data_dir: Path) -> Callable[[str], str | None]:
        """The Solana address each worker's registration on the [identity_chain] links."""
        evm = registry.identity_profile(profile)
        if evm is None:
            return lambda agent_id: None
        from dispatchnet.chains.evm.identity import PayoutAddresses
        from dispatchnet.chains.evm.node import resolve_evm_chain

        chain = resolve_evm_chain(evm.chain)
        if not chain.identity_registry:
            return lambda agent_id: None
        return PayoutAddresses(chain, rpc_timeout=evm.chain.rpc_timeout_seconds, solana=True)

    def client_wallet(self, profile: Profile, key_file: str) -> Any:
        """--wallet-key / [wallet] key_file (a Solana keypair file), else the deployment
        file's "client" dev account, else None."""
        from dispatchnet.chains.deployments import read_deployment
        from dispatchnet.chains.solana.wallet import (
            SvmWallet,
            load_or_create_solana_key,
            svm_deployment_assets,
        )
        from dispatchnet.payments.wallet import Asset

        cfg = profile.chain
        limit = profile.wallet.max_per_job_micros
        data: dict[str, Any] = {}
        if cfg.deployment and deployment_path(cfg.deployment).exists():
            data = read_deployment(cfg.deployment)
        path = key_file or profile.wallet.key_file
        if path:
            p = in_home(path)
            if not p.exists():
                raise ChainConfigError(f"no wallet key file {p}")
            extra = [Asset(cfg.network, cfg.mint)] if cfg.mint else svm_deployment_assets(data)
            rpc_url = cfg.rpc_url or str(data.get("rpc_url") or "") or None
            return SvmWallet(load_or_create_solana_key(p), limit, extra, rpc_url)
        if "client" not in (data.get("accounts") or {}):
            return None
        return SvmWallet.of_deployment(data, limit)

    def check_anchor(
        self, profile: Profile, root: bytes, network: str, transaction: str, expected_anchorer: str
    ) -> dict[str, Any]:
        """Without expected_anchorer, the profile's coordinator keypair (the deployment's
        account or an existing key_file) is expected: anyone can write a memo."""
        from dispatchnet.chains.solana.anchoring import check_anchor_onchain

        chain = resolve_solana_chain(_reading(profile.chain))
        expected = expected_anchorer or chain.address
        check = check_anchor_onchain(
            chain,
            root,
            network,
            transaction,
            expected_anchorer=expected,
            timeout=profile.chain.rpc_timeout_seconds,
        )
        return {"network": chain.network, "expected_anchorer": expected, **check.as_dict()}

    def new_wallet_key(self, path: Path) -> str:
        from dispatchnet.chains.solana.wallet import load_or_create_solana_key

        return str(load_or_create_solana_key(path).pubkey())

    def wallet_balances(self, profile: Profile, wallet: Any) -> dict[str, Any]:
        chain = resolve_solana_chain(_reading(profile.chain))
        mints = {a.address for a in wallet.extra_assets} | ({chain.mint} if chain.mint else set())
        balances = [
            {"asset": m, "balance": self.token_balance(profile, m, wallet.address)}
            for m in sorted(mints)
        ]
        return {"address": wallet.address, "network": chain.network, "balances": balances}

    def token_balance(self, profile: Profile, asset: str, account: str) -> int:
        """`account`'s balance of the SPL mint `asset` ("" = [chain]'s mint), held in its
        associated token account (0 when it has none). Unavailable on node trouble."""
        from solders.pubkey import Pubkey
        from spl.token.constants import TOKEN_PROGRAM_ID
        from spl.token.instructions import get_associated_token_address

        from dispatchnet.errors import Unavailable

        chain = resolve_solana_chain(_reading(profile.chain))
        mint = asset or chain.mint
        try:
            ata = get_associated_token_address(
                Pubkey.from_string(account), Pubkey.from_string(mint), TOKEN_PROGRAM_ID
            )
        except ValueError as e:
            raise ChainConfigError(f"not a Solana address: {e}") from e
        client = client_for(chain.rpc_url, profile.chain.rpc_timeout_seconds)
        try:
            if client.get_account_info(ata).value is None:
                return 0
            return int(client.get_token_account_balance(ata).value.amount)
        except TRANSIENT as e:
            raise Unavailable(f"cannot read {account}'s balance: {brief(e)}") from e

    def token_flow(
        self, profile: Profile, data_dir: Path, asset: str, transaction: str
    ) -> int | None:
        from solana.rpc.commitment import Confirmed
        from solders.signature import Signature

        from dispatchnet.errors import Unavailable

        chain = resolve_solana_chain(profile.chain, data_dir)
        me = str(chain.keypair.pubkey())
        client = client_for(chain.rpc_url, profile.chain.rpc_timeout_seconds)
        try:
            found = client.get_transaction(
                Signature.from_string(transaction),
                encoding="json",
                commitment=Confirmed,
                max_supported_transaction_version=0,
            ).value
        except TRANSIENT as e:
            raise Unavailable(f"cannot read {transaction} on {chain.network}: {brief(e)}") from e
        if found is None:
            return None
        meta = found.transaction.meta
        if meta is None or meta.err is not None:
            return 0

        def held(balances: Any) -> int:
            return sum(
                int(b.ui_token_amount.amount)
                for b in balances or []
                if str(b.owner) == me and str(b.mint) == asset
            )

        return held(meta.post_token_balances) - held(meta.pre_token_balances)

    def chain_up(self, profile: Profile, port: int | None) -> dict[str, Any]:
        """The Solana node (on `port`), then the [identity_chain]'s local chain when the
        profile has one (on its own devchain_port, or any free port when `port` is 0): its
        deployment data under "identity_chain"."""
        data = self._solana_up(profile, port)
        evm = registry.identity_profile(profile)
        if evm is not None and evm.chain.devchain:
            data["identity_chain"] = registry.adapter_of(evm).chain_up(
                evm, 0 if port == 0 else None
            )
        return data

    def _solana_up(self, profile: Profile, port: int | None) -> dict[str, Any]:
        from dispatchnet.devchain import solana_local

        path = _local_chain(profile)
        try:
            data = solana_local.chain_up(
                path, port=profile.chain.devchain_port if port is None else port
            )
        except (solana_local.SolanaLocalError, OSError) as e:
            raise DevChainError(f"the local Solana node: {e}") from e
        if data.get("network") != profile.chain.network:
            raise ChainConfigError(
                f"{path} is for network {data.get('network')!r}, the profile for "
                f"{profile.chain.network!r}"
            )
        return data

    def chain_down(self, profile: Profile) -> dict[str, Any]:
        """Stops both local chains (the [identity_chain]'s too: another profile sharing
        its deployment, e.g. local-monad, loses it as well)."""
        from dispatchnet.devchain import solana_local

        out = solana_local.chain_down(_local_chain(profile))
        evm = registry.identity_profile(profile)
        if evm is not None and evm.chain.devchain:
            out["identity_chain"] = registry.adapter_of(evm).chain_down(evm)
        return out

    def chain_status(self, profile: Profile) -> dict[str, Any]:
        """The Solana chain's status, with the [identity_chain]'s under "identity_chain";
        ok only when both are."""
        out = self._solana_status(profile)
        evm = registry.identity_profile(profile)
        if evm is not None:
            other = registry.adapter_of(evm).chain_status(evm)
            out["identity_chain"] = other
            out["ok"] = bool(out.get("ok")) and bool(other.get("ok"))
        return out

    def _solana_status(self, profile: Profile) -> dict[str, Any]:
        from dispatchnet.devchain import solana_local

        cfg = profile.chain
        if cfg.devchain:
            out = solana_local.chain_status(deployment_path(cfg.deployment))
            return {"profile": profile.name, **out}
        out = {"profile": profile.name, "network": cfg.network, "rpc_url": cfg.rpc_url}
        try:
            client = client_for(cfg.rpc_url, cfg.rpc_timeout_seconds)
            genesis = str(client.get_genesis_hash().value)
            out.update(genesis_hash=genesis, slot=int(client.get_slot().value))
        except TRANSIENT as e:
            out.update(ok=False, note=f"cannot reach {cfg.rpc_url}: {brief(e)}")
            return out
        # a public cluster's CAIP-2 id is its genesis hash's first 32 characters
        out["ok"] = cfg.network == f"solana:{genesis[:32]}"
        if not out["ok"]:
            out["note"] = f"the node's genesis hash {genesis} is not {cfg.network}'s"
        return out


ADAPTER = SolanaAdapter()
