// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @notice The EIP-3009 pieces the settler calls (FiatToken v2.2 and TestUSDC have them).
interface IEIP3009 {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;

    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
}

/// @title Batch settler
/// @notice Settles many EIP-3009 transferWithAuthorization payments in one transaction.
/// @dev EIP-3009 lets anyone submit a signed authorization: the token checks the payer's
/// signature and moves exactly what was signed, to whom it was signed for, at most once
/// (the nonce). So this contract holds no funds and needs no owner or allow-list: it only
/// saves a transaction per payment. Each authorization is tried on its own: one that the
/// token refuses (spent balance, expired, already used) is skipped and reported false,
/// and the rest still settle. The token's AuthorizationUsed events say which settled.
contract BatchSettler {
    struct Authorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        bytes signature;
    }

    /// @param gasPerItem the most gas one transfer may use. A payer that is a contract
    /// (ERC-1271) checks the signature in its own code, which could burn all the gas it is
    /// given: capped, it fails alone (false), in the caller's simulation as on chain, and
    /// the others still settle.
    /// @return settled settled[i] is true when auths[i] was transferred by this call; the
    /// ones after a shortfall of gas are left false (not tried).
    function settle(address token, uint256 gasPerItem, Authorization[] calldata auths)
        external
        returns (bool[] memory settled)
    {
        settled = new bool[](auths.length);
        for (uint256 i = 0; i < auths.length; i++) {
            // a call is given at most 63/64 of what is left (EIP-150)
            if (gasleft() < gasPerItem + gasPerItem / 63 + ITEM_RESERVE) break;
            Authorization calldata a = auths[i];
            try IEIP3009(token).transferWithAuthorization{gas: gasPerItem}(
                a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, a.signature
            ) {
                settled[i] = true;
            } catch {}
        }
    }

    /// @dev gas kept back for an item's own work around the call (its result, the loop)
    uint256 private constant ITEM_RESERVE = 10_000;

    /// @notice Whether each (authorizer, nonce) is used (or cancelled), in one call.
    function authorizationStates(address token, address[] calldata authorizers, bytes32[] calldata nonces)
        external
        view
        returns (bool[] memory used)
    {
        require(authorizers.length == nonces.length, "length mismatch");
        used = new bool[](nonces.length);
        for (uint256 i = 0; i < nonces.length; i++) {
            used[i] = IEIP3009(token).authorizationState(authorizers[i], nonces[i]);
        }
    }
}
