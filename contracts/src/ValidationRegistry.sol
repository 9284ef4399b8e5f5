// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IIdentityRegistry} from "./interfaces/IIdentityRegistry.sol";

/// @title ERC-8004 Validation Registry (Dispatch's implementation of the Jan 2026 draft ABI)
/// @notice An agent's owner or operator asks a validator to check its work (requestHash is
/// the keccak256 of the request payload and names the request); the validator answers with
/// a response in 0..100, as often as it likes (the latest answer is kept).
/// @dev Choices the draft leaves open (it is still in flux upstream):
/// - The Identity Registry is a constructor argument (immutable), not an initializer.
/// - A requestHash can be requested once; a second request with it reverts.
/// - getValidationStatus of an unknown requestHash reverts.
/// - getSummary counts only requests that have a response; empty validatorAddresses means
///   any validator and an empty tag means any tag; averageResponse rounds down.
contract ValidationRegistry {
    struct Validation {
        address validatorAddress;
        uint256 agentId;
        uint8 response;
        bool hasResponse;
        bytes32 responseHash;
        string tag;
        uint256 lastUpdate;
    }

    event ValidationRequest(
        address indexed validatorAddress, uint256 indexed agentId, string requestURI, bytes32 indexed requestHash
    );
    event ValidationResponse(
        address indexed validatorAddress,
        uint256 indexed agentId,
        bytes32 indexed requestHash,
        uint8 response,
        string responseURI,
        bytes32 responseHash,
        string tag
    );

    error AgentNotFound(uint256 agentId);
    error NotAuthorized(uint256 agentId, address caller);
    error ZeroValidator();
    error RequestExists(bytes32 requestHash);
    error RequestNotFound(bytes32 requestHash);
    error NotValidator(bytes32 requestHash, address caller);
    error InvalidResponse(uint8 response);

    uint8 public constant MAX_RESPONSE = 100;

    IIdentityRegistry private immutable _identityRegistry;

    mapping(bytes32 requestHash => Validation) private _validations;
    mapping(uint256 agentId => bytes32[]) private _agentValidations;
    mapping(address validator => bytes32[]) private _validatorRequests;

    constructor(address identityRegistry_) {
        _identityRegistry = IIdentityRegistry(identityRegistry_);
    }

    /// @notice The ERC-8004 version this registry implements (as the reference
    /// implementation's getVersion() reports it).
    function getVersion() external pure returns (string memory) {
        return "2.0.0";
    }

    function getIdentityRegistry() external view returns (address identityRegistry) {
        return address(_identityRegistry);
    }

    function validationRequest(
        address validatorAddress,
        uint256 agentId,
        string calldata requestURI,
        bytes32 requestHash
    ) external {
        if (validatorAddress == address(0)) revert ZeroValidator();
        bool authorized;
        try _identityRegistry.isAuthorizedOrOwner(msg.sender, agentId) returns (bool ok) {
            authorized = ok;
        } catch {
            revert AgentNotFound(agentId);
        }
        if (!authorized) revert NotAuthorized(agentId, msg.sender);
        Validation storage v = _validations[requestHash];
        if (v.validatorAddress != address(0)) revert RequestExists(requestHash);
        v.validatorAddress = validatorAddress;
        v.agentId = agentId;
        v.lastUpdate = block.timestamp;
        _agentValidations[agentId].push(requestHash);
        _validatorRequests[validatorAddress].push(requestHash);
        emit ValidationRequest(validatorAddress, agentId, requestURI, requestHash);
    }

    function validationResponse(
        bytes32 requestHash,
        uint8 response,
        string calldata responseURI,
        bytes32 responseHash,
        string calldata tag
    ) external {
        Validation storage v = _validations[requestHash];
        if (v.validatorAddress == address(0)) revert RequestNotFound(requestHash);
        if (v.validatorAddress != msg.sender) revert NotValidator(requestHash, msg.sender);
        if (response > MAX_RESPONSE) revert InvalidResponse(response);
        v.response = response;
        v.hasResponse = true;
        v.responseHash = responseHash;
        v.tag = tag;
        v.lastUpdate = block.timestamp;
        emit ValidationResponse(msg.sender, v.agentId, requestHash, response, responseURI, responseHash, tag);
    }

    function getValidationStatus(bytes32 requestHash)
        external
        view
        returns (
            address validatorAddress,
            uint256 agentId,
            uint8 response,
            bytes32 responseHash,
            string memory tag,
            uint256 lastUpdate
        )
    {
        Validation storage v = _validations[requestHash];
        if (v.validatorAddress == address(0)) revert RequestNotFound(requestHash);
        return (v.validatorAddress, v.agentId, v.response, v.responseHash, v.tag, v.lastUpdate);
    }

    function getSummary(uint256 agentId, address[] calldata validatorAddresses, string calldata tag)
        external
        view
        returns (uint64 count, uint8 averageResponse)
    {
        bool anyTag = bytes(tag).length == 0;
        bytes32 tagHash = keccak256(bytes(tag));
        bytes32[] storage hashes = _agentValidations[agentId];
        uint256 sum;
        for (uint256 i = 0; i < hashes.length; i++) {
            Validation storage v = _validations[hashes[i]];
            if (!v.hasResponse) continue;
            if (!anyTag && keccak256(bytes(v.tag)) != tagHash) continue;
            if (validatorAddresses.length > 0 && !_contains(validatorAddresses, v.validatorAddress)) continue;
            count++;
            sum += v.response;
        }
        if (count > 0) averageResponse = uint8(sum / count);
    }

    function getAgentValidations(uint256 agentId) external view returns (bytes32[] memory requestHashes) {
        return _agentValidations[agentId];
    }

    function getValidatorRequests(address validatorAddress) external view returns (bytes32[] memory requestHashes) {
        return _validatorRequests[validatorAddress];
    }

    function _contains(address[] calldata list, address a) private pure returns (bool) {
        for (uint256 j = 0; j < list.length; j++) {
            if (list[j] == a) return true;
        }
        return false;
    }
}
