// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IIdentityRegistry} from "./interfaces/IIdentityRegistry.sol";

/// @title ERC-8004 Reputation Registry (Dispatch's implementation of the Jan 2026 draft ABI)
/// @notice Clients post signed fixed-point feedback (value, valueDecimals) about registered
/// agents. value, valueDecimals, tag1, tag2 and isRevoked are stored; endpoint, feedbackURI
/// and feedbackHash are only emitted. Feedback indexes are 1-based per (agent, client).
/// @dev Choices the draft leaves open:
/// - The Identity Registry is a constructor argument (immutable), not an initializer.
/// - An empty tag filter ("") matches any tag.
/// - getSummary averages in 18-decimal fixed point, then returns the average expressed in
///   the largest valueDecimals among the counted entries, rounded toward zero. Feedback that
///   all uses the same decimals (e.g. `starred`, 0 decimals) comes back in those decimals.
///   It reverts (SafeCast) if that value does not fit in int128.
/// - A client listed twice in getSummary's clientAddresses is counted once.
/// - Revoking twice, or revoking/answering feedback that does not exist, reverts.
contract ReputationRegistry {
    struct Feedback {
        int128 value;
        uint8 valueDecimals;
        bool isRevoked;
        string tag1;
        string tag2;
    }

    event NewFeedback(
        uint256 indexed agentId,
        address indexed clientAddress,
        uint64 feedbackIndex,
        int128 value,
        uint8 valueDecimals,
        string indexed indexedTag1,
        string tag1,
        string tag2,
        string endpoint,
        string feedbackURI,
        bytes32 feedbackHash
    );
    event FeedbackRevoked(uint256 indexed agentId, address indexed clientAddress, uint64 indexed feedbackIndex);
    event ResponseAppended(
        uint256 indexed agentId,
        address indexed clientAddress,
        uint64 feedbackIndex,
        address indexed responder,
        string responseURI,
        bytes32 responseHash
    );

    error AgentNotFound(uint256 agentId);
    error SelfFeedback(uint256 agentId, address caller);
    error InvalidValueDecimals(uint8 valueDecimals);
    error FeedbackNotFound(uint256 agentId, address clientAddress, uint64 feedbackIndex);
    error FeedbackAlreadyRevoked(uint256 agentId, address clientAddress, uint64 feedbackIndex);
    error EmptyClientList();

    uint8 public constant MAX_VALUE_DECIMALS = 18;

    IIdentityRegistry private immutable _identityRegistry;

    mapping(uint256 agentId => mapping(address client => Feedback[])) private _feedback;
    mapping(uint256 agentId => address[]) private _clients;
    mapping(uint256 agentId => mapping(address client => mapping(uint64 index => uint64))) private _responseTotal;
    mapping(uint256 agentId => mapping(address client => mapping(uint64 index => mapping(address responder => uint64))))
        private _responseCount;

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

    // --- writes -------------------------------------------------------------------------

    function giveFeedback(
        uint256 agentId,
        int128 value,
        uint8 valueDecimals,
        string calldata tag1,
        string calldata tag2,
        string calldata endpoint,
        string calldata feedbackURI,
        bytes32 feedbackHash
    ) external {
        if (valueDecimals > MAX_VALUE_DECIMALS) revert InvalidValueDecimals(valueDecimals);
        _requireAgent(agentId);
        if (_identityRegistry.isAuthorizedOrOwner(msg.sender, agentId)) revert SelfFeedback(agentId, msg.sender);

        Feedback[] storage list = _feedback[agentId][msg.sender];
        if (list.length == 0) {
            _clients[agentId].push(msg.sender);
        }
        list.push(Feedback({value: value, valueDecimals: valueDecimals, isRevoked: false, tag1: tag1, tag2: tag2}));
        uint64 feedbackIndex = uint64(list.length);
        emit NewFeedback(
            agentId,
            msg.sender,
            feedbackIndex,
            value,
            valueDecimals,
            tag1,
            tag1,
            tag2,
            endpoint,
            feedbackURI,
            feedbackHash
        );
    }

    /// @notice The caller revokes its own feedback; it stays readable with isRevoked = true.
    function revokeFeedback(uint256 agentId, uint64 feedbackIndex) external {
        Feedback storage f = _stored(agentId, msg.sender, feedbackIndex);
        if (f.isRevoked) revert FeedbackAlreadyRevoked(agentId, msg.sender, feedbackIndex);
        f.isRevoked = true;
        emit FeedbackRevoked(agentId, msg.sender, feedbackIndex);
    }

    /// @notice Anyone may answer a feedback entry (the agent showing a refund, a spam tagger).
    function appendResponse(
        uint256 agentId,
        address clientAddress,
        uint64 feedbackIndex,
        string calldata responseURI,
        bytes32 responseHash
    ) external {
        _stored(agentId, clientAddress, feedbackIndex);
        _responseTotal[agentId][clientAddress][feedbackIndex] += 1;
        _responseCount[agentId][clientAddress][feedbackIndex][msg.sender] += 1;
        emit ResponseAppended(agentId, clientAddress, feedbackIndex, msg.sender, responseURI, responseHash);
    }

    // --- reads --------------------------------------------------------------------------

    /// @notice Count and average of the non-revoked feedback that the given clients gave the
    /// agent, optionally filtered by tags ("" = any). clientAddresses must not be empty: pass
    /// the reviewers you trust. See the contract notes for the decimals of summaryValue.
    function getSummary(uint256 agentId, address[] calldata clientAddresses, string calldata tag1, string calldata tag2)
        external
        view
        returns (uint64 count, int128 summaryValue, uint8 summaryValueDecimals)
    {
        if (clientAddresses.length == 0) revert EmptyClientList();
        (bool anyTag1, bytes32 tag1Hash) = _tagFilter(tag1);
        (bool anyTag2, bytes32 tag2Hash) = _tagFilter(tag2);
        int256 sumWad;
        for (uint256 c = 0; c < clientAddresses.length; c++) {
            if (_listedBefore(clientAddresses, c)) continue;
            Feedback[] storage list = _feedback[agentId][clientAddresses[c]];
            for (uint256 i = 0; i < list.length; i++) {
                Feedback storage f = list[i];
                if (f.isRevoked || !_matches(f, anyTag1, tag1Hash, anyTag2, tag2Hash)) continue;
                count++;
                sumWad += int256(f.value) * int256(10 ** (MAX_VALUE_DECIMALS - f.valueDecimals));
                if (f.valueDecimals > summaryValueDecimals) summaryValueDecimals = f.valueDecimals;
            }
        }
        if (count == 0) return (0, 0, 0);
        int256 averageWad = sumWad / int256(uint256(count));
        summaryValue = SafeCast.toInt128(averageWad / int256(10 ** (MAX_VALUE_DECIMALS - summaryValueDecimals)));
    }

    function readFeedback(uint256 agentId, address clientAddress, uint64 feedbackIndex)
        external
        view
        returns (int128 value, uint8 valueDecimals, string memory tag1, string memory tag2, bool isRevoked)
    {
        Feedback storage f = _stored(agentId, clientAddress, feedbackIndex);
        return (f.value, f.valueDecimals, f.tag1, f.tag2, f.isRevoked);
    }

    /// @notice Every feedback entry matching the filters: clientAddresses (empty = all
    /// clients), tags ("" = any), and revoked entries only when includeRevoked.
    function readAllFeedback(
        uint256 agentId,
        address[] calldata clientAddresses,
        string calldata tag1,
        string calldata tag2,
        bool includeRevoked
    )
        external
        view
        returns (
            address[] memory clients,
            uint64[] memory feedbackIndexes,
            int128[] memory values,
            uint8[] memory valueDecimals,
            string[] memory tag1s,
            string[] memory tag2s,
            bool[] memory revokedStatuses
        )
    {
        address[] memory scope = clientAddresses;
        if (scope.length == 0) scope = _clients[agentId];
        (bool anyTag1, bytes32 tag1Hash) = _tagFilter(tag1);
        (bool anyTag2, bytes32 tag2Hash) = _tagFilter(tag2);

        uint256 n;
        for (uint256 c = 0; c < scope.length; c++) {
            Feedback[] storage list = _feedback[agentId][scope[c]];
            for (uint256 i = 0; i < list.length; i++) {
                Feedback storage f = list[i];
                if ((includeRevoked || !f.isRevoked) && _matches(f, anyTag1, tag1Hash, anyTag2, tag2Hash)) n++;
            }
        }
        clients = new address[](n);
        feedbackIndexes = new uint64[](n);
        values = new int128[](n);
        valueDecimals = new uint8[](n);
        tag1s = new string[](n);
        tag2s = new string[](n);
        revokedStatuses = new bool[](n);

        uint256 k;
        for (uint256 c = 0; c < scope.length; c++) {
            Feedback[] storage list = _feedback[agentId][scope[c]];
            for (uint256 i = 0; i < list.length; i++) {
                Feedback storage f = list[i];
                if (!(includeRevoked || !f.isRevoked) || !_matches(f, anyTag1, tag1Hash, anyTag2, tag2Hash)) continue;
                clients[k] = scope[c];
                feedbackIndexes[k] = uint64(i + 1);
                values[k] = f.value;
                valueDecimals[k] = f.valueDecimals;
                tag1s[k] = f.tag1;
                tag2s[k] = f.tag2;
                revokedStatuses[k] = f.isRevoked;
                k++;
            }
        }
    }

    /// @notice Number of responses, filtered by client (zero address = all clients),
    /// feedbackIndex (0 = all of that client's feedback) and responders (empty = anyone).
    function getResponseCount(
        uint256 agentId,
        address clientAddress,
        uint64 feedbackIndex,
        address[] calldata responders
    ) external view returns (uint64 count) {
        address[] memory scope;
        if (clientAddress == address(0)) {
            scope = _clients[agentId];
        } else {
            scope = new address[](1);
            scope[0] = clientAddress;
        }
        for (uint256 c = 0; c < scope.length; c++) {
            uint64 last = uint64(_feedback[agentId][scope[c]].length);
            uint64 first = feedbackIndex == 0 ? 1 : feedbackIndex;
            uint64 end = feedbackIndex == 0 ? last : (feedbackIndex <= last ? feedbackIndex : 0);
            for (uint64 i = first; i <= end; i++) {
                if (responders.length == 0) {
                    count += _responseTotal[agentId][scope[c]][i];
                } else {
                    for (uint256 r = 0; r < responders.length; r++) {
                        if (_listedBefore(responders, r)) continue;
                        count += _responseCount[agentId][scope[c]][i][responders[r]];
                    }
                }
            }
        }
    }

    /// @notice Every address that gave the agent feedback, in order of first feedback.
    function getClients(uint256 agentId) external view returns (address[] memory) {
        return _clients[agentId];
    }

    /// @notice The index of the client's latest feedback for the agent (0 = none).
    function getLastIndex(uint256 agentId, address clientAddress) external view returns (uint64) {
        return uint64(_feedback[agentId][clientAddress].length);
    }

    // --- internals ----------------------------------------------------------------------

    function _requireAgent(uint256 agentId) private view {
        try _identityRegistry.ownerOf(agentId) returns (address owner) {
            if (owner == address(0)) revert AgentNotFound(agentId);
        } catch {
            revert AgentNotFound(agentId);
        }
    }

    function _stored(uint256 agentId, address clientAddress, uint64 feedbackIndex)
        private
        view
        returns (Feedback storage)
    {
        Feedback[] storage list = _feedback[agentId][clientAddress];
        if (feedbackIndex == 0 || feedbackIndex > list.length) {
            revert FeedbackNotFound(agentId, clientAddress, feedbackIndex);
        }
        return list[feedbackIndex - 1];
    }

    function _tagFilter(string calldata tag) private pure returns (bool any, bytes32 tagHash) {
        any = bytes(tag).length == 0;
        tagHash = keccak256(bytes(tag));
    }

    function _matches(Feedback storage f, bool anyTag1, bytes32 tag1Hash, bool anyTag2, bytes32 tag2Hash)
        private
        view
        returns (bool)
    {
        return (anyTag1 || keccak256(bytes(f.tag1)) == tag1Hash) && (anyTag2 || keccak256(bytes(f.tag2)) == tag2Hash);
    }

    function _listedBefore(address[] calldata list, uint256 position) private pure returns (bool) {
        for (uint256 j = 0; j < position; j++) {
            if (list[j] == list[position]) return true;
        }
        return false;
    }
}
