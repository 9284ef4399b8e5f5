// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Gas-burning wallet (tests only)
/// @notice A contract payer (ERC-1271) that approves any signature while it has more gas
/// than `plenty` (as in an eth_call simulation) and otherwise burns every unit it is given:
/// what a payer could do to make a settlement batch run out of gas. The tests check that
/// the BatchSettler's gas cap per item keeps such a payment from holding up the others.
contract GasBurningWallet {
    uint256 public immutable plenty;

    constructor(uint256 plenty_) {
        plenty = plenty_;
    }

    function isValidSignature(bytes32, bytes calldata) external view returns (bytes4) {
        if (gasleft() > plenty) return 0x1626ba7e; // ERC-1271's magic value: valid
        uint256 x;
        while (true) {
            x = uint256(keccak256(abi.encode(x)));
        }
        return bytes4(uint32(x));
    }
}
