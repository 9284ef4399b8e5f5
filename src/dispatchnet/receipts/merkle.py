"""Merkle trees over receipt hashes: roots, inclusion proofs, and their verification.

Plain hashlib, no protobuf: domain code (coordinator/, the batcher) uses it directly.

Leaves are receipt hashes. leaf = H(0x00 || receipt_sha256); node = H(0x01 || left || right);
an odd node at the end of a level is carried up unchanged. The prefixes keep a leaf from
being passed off as an inner node. H is SHA-256.
"""

from __future__ import annotations

import hashlib


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _leaf(h: bytes) -> bytes:
    return _sha256(b"\x00" + h)


def _node(a: bytes, b: bytes) -> bytes:
    return _sha256(b"\x01" + a + b)


def merkle_root(receipt_hashes: list[bytes]) -> bytes:
    if not receipt_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = [_leaf(h) for h in receipt_hashes]
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_proof(receipt_hashes: list[bytes], index: int) -> list[bytes]:
    """Sibling hashes from the leaf at index up to the root (carried-up levels add none)."""
    if not 0 <= index < len(receipt_hashes):
        raise ValueError("leaf index out of range")
    level = [_leaf(h) for h in receipt_hashes]
    proof: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return proof


def verify_merkle_proof(
    receipt_sha256: bytes, index: int, count: int, proof: list[bytes], root: bytes
) -> bool:
    if not 0 <= index < count:
        return False
    h, width, steps = _leaf(receipt_sha256), count, iter(proof)
    while width > 1:
        if index % 2 == 1:
            sib = next(steps, None)
            if sib is None:
                return False
            h = _node(sib, h)
        elif index + 1 < width:
            sib = next(steps, None)
            if sib is None:
                return False
            h = _node(h, sib)
        index, width = index // 2, (width + 1) // 2
    return next(steps, None) is None and h == root
