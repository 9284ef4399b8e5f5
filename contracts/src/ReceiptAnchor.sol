// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Receipt anchor
/// @notice Records the Merkle root of a batch of Dispatch receipt hashes, with the block it
/// was anchored in and who anchored it. Anyone may anchor; what a root is worth depends on
/// who anchored it (verifiers trust the coordinator addresses they know).
/// @dev Re-anchoring a root that is already anchored is a no-op: the call succeeds, changes
/// nothing, emits nothing and returns false; the first anchor (block and anchorer) stands.
/// This keeps a retried anchoring transaction (e.g. after a lost receipt) harmless, and an
/// outbox can read anchoredAt to learn where the root really landed.
contract ReceiptAnchor {
    struct Anchor {
        uint64 blockNumber;
        address anchorer;
    }

    event Anchored(bytes32 indexed merkleRoot, address indexed anchorer, uint32 leafCount, string batchId);

    error ZeroRoot();
    error EmptyBatch();

    mapping(bytes32 merkleRoot => Anchor) private _anchors;

    /// @return anchored true when this call anchored the root, false when it already was.
    function anchor(bytes32 merkleRoot, uint32 leafCount, string calldata batchId) external returns (bool anchored) {
        if (merkleRoot == bytes32(0)) revert ZeroRoot();
        if (leafCount == 0) revert EmptyBatch();
        if (_anchors[merkleRoot].blockNumber != 0) return false;
        _anchors[merkleRoot] = Anchor({blockNumber: uint64(block.number), anchorer: msg.sender});
        emit Anchored(merkleRoot, msg.sender, leafCount, batchId);
        return true;
    }

    /// @notice (0, 0x0) when the root was never anchored.
    function anchoredAt(bytes32 merkleRoot) external view returns (uint64 blockNumber, address anchorer) {
        Anchor storage a = _anchors[merkleRoot];
        return (a.blockNumber, a.anchorer);
    }
}
