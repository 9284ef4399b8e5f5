"""Memo transactions read back over Solana JSON-RPC: a transaction's memo texts and its
signer, and an address's latest transactions searched for a memo (receipt anchoring looks
for an earlier anchor of a root, payouts for a landed payout).

Blocking solana-py code: call it in a worker thread.
"""

from __future__ import annotations

from typing import Any

from solana.rpc.api import Client
from solana.rpc.commitment import Confirmed
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction

MEMO_PROGRAM = Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr")  # v2
MEMO_PROGRAMS = (MEMO_PROGRAM, Pubkey.from_string("Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo"))
PAGE = 1000  # getSignaturesForAddress's largest page


class MemoReadError(RuntimeError):
    """The node answered getTransaction with something that is not a transaction."""


def memos_of(tx: VersionedTransaction) -> list[str]:
    """The texts of a transaction's memo instructions."""
    keys = list(tx.message.account_keys)
    return [
        bytes(ix.data).decode("utf-8", errors="replace")
        for ix in tx.message.instructions
        if ix.program_id_index < len(keys) and keys[ix.program_id_index] in MEMO_PROGRAMS
    ]


def signer_of(tx: VersionedTransaction) -> str:
    """The fee payer (first signer) of a transaction."""
    return str(tx.message.account_keys[0])


def fetch_transaction(
    client: Client, signature: str
) -> tuple[VersionedTransaction, Any, int] | None:
    """(transaction, its error or None, slot) of a landed signature; None if the node has
    none. MemoReadError on an answer that is not a transaction."""
    found = client.get_transaction(
        Signature.from_string(signature),
        encoding="base64",
        commitment=Confirmed,  # the default (finalized) misses the last ~13 s on a cluster
        max_supported_transaction_version=0,
    ).value
    if found is None:
        return None
    tx = found.transaction.transaction
    if not isinstance(tx, VersionedTransaction):
        raise MemoReadError(f"transaction {signature}: unexpected encoding")
    meta = found.transaction.meta
    return tx, (meta.err if meta is not None else None), int(found.slot)


def earliest_memo(client: Client, address: Pubkey, signer: str, prefix: str, lookback: int) -> str:
    """The signature of the earliest transaction among `address`'s `lookback` latest that
    succeeded, was signed (fee paid) by `signer` and has a memo beginning with `prefix`; ""
    if none. The listing (getSignaturesForAddress, whose entries carry their memos) only
    names candidates: each is read back (getTransaction) before it counts, as anyone can
    write any memo naming any address. Reaches no further back than the node's history."""
    candidates: list[str] = []
    before: Signature | None = None
    seen = 0
    while seen < lookback:
        want = min(PAGE, lookback - seen)
        page = client.get_signatures_for_address(
            address, before=before, limit=want, commitment=Confirmed
        ).value
        for entry in page:
            if entry.err is None and entry.memo and prefix in entry.memo:
                candidates.append(str(entry.signature))
        seen += len(page)
        if len(page) < want:
            break
        before = page[-1].signature
    for signature in reversed(candidates):  # oldest first: the first one stands
        fetched = fetch_transaction(client, signature)
        if fetched is None:
            continue
        tx, err, _slot = fetched
        if err is None and signer_of(tx) == signer:
            if any(m.startswith(prefix) for m in memos_of(tx)):
                return signature
    return ""
