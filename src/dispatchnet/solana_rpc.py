"""The x402 SVM facilitator signer over any Solana JSON-RPC URL (local node or devnet).

`RpcFacilitatorSigner` implements x402's `FacilitatorSvmSigner` protocol with solana-py:
it co-signs a client's payment transaction as fee payer, simulates it, sends it and waits
for its confirmation. Unlike the SDK's FacilitatorKeypairSigner it talks to one RPC URL
whatever the CAIP-2 id (the SDK's only knows the public clusters' URLs), polls at a
configurable interval, and treats "already processed" on a resend as sent: a settlement
retried after a lost reply confirms the first broadcast instead of failing.

Blocking (solana-py's sync client, as the SDK's facilitator interface is sync): async
callers run it in a thread.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable

from solana.exceptions import SolanaRpcException
from solana.rpc.api import Client
from solana.rpc.commitment import Confirmed
from solana.rpc.core import RPCException
from solana.rpc.models import TxOpts
from solders.keypair import Keypair
from solders.message import to_bytes_versioned
from solders.rpc.errors import SendTransactionPreflightFailureMessage
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from solders.transaction_status import TransactionConfirmationStatus, TransactionErrorFieldless


class RpcFacilitatorSigner:
    """Fee-payer keypairs plus one Solana RPC URL (x402 FacilitatorSvmSigner)."""

    def __init__(
        self,
        keypairs: Keypair | Iterable[Keypair],
        rpc_url: str,
        *,
        timeout: float = 10.0,
        confirm_timeout: float = 30.0,
        poll_seconds: float = 0.2,
    ) -> None:
        pairs = [keypairs] if isinstance(keypairs, Keypair) else list(keypairs)
        if not pairs:
            raise ValueError("at least one fee-payer keypair is required")
        self._keypairs = {str(kp.pubkey()): kp for kp in pairs}
        self.rpc_url = rpc_url
        self.confirm_timeout = confirm_timeout
        self.poll_seconds = poll_seconds
        self._client = Client(rpc_url, timeout=timeout)

    def get_addresses(self) -> list[str]:
        return list(self._keypairs)

    def sign_transaction(self, tx_base64: str, fee_payer: str, network: str) -> str:
        """Adds the fee payer's signature at its signer position (legacy or v0 message)."""
        keypair = self._keypairs.get(fee_payer)
        if keypair is None:
            raise ValueError(f"no signer for fee payer {fee_payer}")
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        message = tx.message
        signers = list(message.account_keys)[: message.header.num_required_signatures]
        if keypair.pubkey() not in signers:
            raise ValueError(f"{fee_payer} is not a signer of this transaction")
        signatures = list(tx.signatures)
        signatures[signers.index(keypair.pubkey())] = keypair.sign_message(
            to_bytes_versioned(message)
        )
        signed = VersionedTransaction.populate(message, signatures)
        return base64.b64encode(bytes(signed)).decode()

    def simulate_transaction(self, tx_base64: str, network: str) -> None:
        tx = VersionedTransaction.from_bytes(base64.b64decode(tx_base64))
        result = self._client.simulate_transaction(tx, sig_verify=True, commitment=Confirmed)
        if result.value.err is not None:
            logs = " | ".join((result.value.logs or [])[-3:])
            raise RuntimeError(f"simulation failed: {result.value.err} {logs}".strip())

    def send_transaction(self, tx_base64: str, network: str) -> str:
        """Broadcasts with preflight; returns the signature (also when a previous attempt
        already landed it)."""
        raw = base64.b64decode(tx_base64)
        signature = str(VersionedTransaction.from_bytes(raw).signatures[0])
        try:
            self._client.send_raw_transaction(raw, TxOpts(preflight_commitment=Confirmed))
        except RPCException as e:
            data = e.args[0] if e.args else None
            if isinstance(data, SendTransactionPreflightFailureMessage) and (
                data.data.err == TransactionErrorFieldless.AlreadyProcessed
            ):
                return signature
            raise RuntimeError(f"send failed: {data}") from None
        return signature

    def confirm_transaction(self, signature: str, network: str) -> None:
        """Polls getSignatureStatuses until confirmed or finalized; RuntimeError when the
        transaction failed on chain or was not confirmed within confirm_timeout."""
        sig = Signature.from_string(signature)
        deadline = time.monotonic() + self.confirm_timeout
        while True:
            try:
                status = self._client.get_signature_statuses([sig]).value[0]
            except SolanaRpcException:
                status = None  # transient: the next poll retries
            if status is not None:
                if status.err is not None:
                    raise RuntimeError(f"transaction failed: {status.err}")
                if status.confirmation_status in (
                    TransactionConfirmationStatus.Confirmed,
                    TransactionConfirmationStatus.Finalized,
                ):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("transaction confirmation timeout")
            time.sleep(self.poll_seconds)
