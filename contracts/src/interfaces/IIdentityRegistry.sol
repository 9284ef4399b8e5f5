// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @notice What the Reputation and Validation registries need from the Identity Registry.
interface IIdentityRegistry {
    /// @dev ERC-721 ownerOf: reverts when the agent does not exist.
    function ownerOf(uint256 agentId) external view returns (address);

    /// @dev True when `spender` is the agent's owner, an operator approved for all of the
    /// owner's agents, or the address approved for this agent. Reverts when the agent does
    /// not exist.
    function isAuthorizedOrOwner(address spender, uint256 agentId) external view returns (bool);
}
