// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {ERC721URIStorage} from "@openzeppelin/contracts/token/ERC721/extensions/ERC721URIStorage.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @title ERC-8004 Identity Registry (Dispatch's implementation of the Jan 2026 draft ABI)
/// @notice Every agent is an ERC-721 token ("AgentIdentity"/"AGENT"); its tokenURI is the
/// agentURI, which resolves to the agent's registration file.
/// @dev Choices the draft leaves open:
/// - agentIds start at 1 and increase by one per registration, so 0 never names an agent
///   (callers and off-chain records can use 0 for "no agent").
/// - The reserved metadata key `agentWallet` is set to the owner on registration, can only be
///   changed by setAgentWallet (with the new wallet's EIP-712 or ERC-1271 signature), and is
///   cleared when the agent is transferred. getMetadata(agentId, "agentWallet") returns the
///   wallet as 20 bytes (abi.encodePacked), or empty bytes when none is set.
/// - Only the agent's owner, an operator approved for all of the owner's tokens, or the
///   address approved for this token may change an agent.
/// - Agents are minted with _mint, not _safeMint: a contract (a multisig, an agent's own
///   account) may register itself without implementing IERC721Receiver.
contract IdentityRegistry is ERC721URIStorage, EIP712 {
    struct MetadataEntry {
        string metadataKey;
        bytes metadataValue;
    }

    event Registered(uint256 indexed agentId, string agentURI, address indexed owner);
    event MetadataSet(
        uint256 indexed agentId, string indexed indexedMetadataKey, string metadataKey, bytes metadataValue
    );
    event URIUpdated(uint256 indexed agentId, string newURI, address indexed updatedBy);

    error NotAuthorized(uint256 agentId, address caller);
    error ReservedMetadataKey(string metadataKey);
    error EmptyMetadataKey();
    error ZeroWallet();
    error DeadlineExpired(uint256 deadline);
    error DeadlineTooFar(uint256 deadline, uint256 latest);
    error InvalidWalletSignature(address newWallet);

    string private constant AGENT_WALLET_KEY = "agentWallet";
    bytes32 private constant AGENT_WALLET_KEY_HASH = keccak256(bytes(AGENT_WALLET_KEY));

    /// @notice The EIP-712 struct the new wallet signs to accept becoming an agent's wallet,
    /// under the domain {name: "ERC8004IdentityRegistry", version: "1", chainId, this}.
    /// @dev Same struct, domain and deadline rule as the public ERC-8004 deployments, so one
    /// signing routine works against a local chain and a public network. Replay protection
    /// without a nonce:
    /// - `owner` binds the signature to the current owner: after a transfer it is useless.
    /// - `agentId`, the chain id and this contract (domain) bind it to one agent here.
    /// - `deadline` may be at most MAX_DEADLINE_DELAY ahead, so a signature lives <= 5 min.
    /// The only replay left is the same owner setting the same wallet again within those
    /// minutes (e.g. after unsetAgentWallet), which the wallet consented to by signing.
    bytes32 public constant AGENT_WALLET_SET_TYPEHASH =
        keccak256("AgentWalletSet(uint256 agentId,address newWallet,address owner,uint256 deadline)");

    /// @notice A wallet signature's deadline may be at most this far after the block time.
    uint256 public constant MAX_DEADLINE_DELAY = 5 minutes;

    uint256 private _nextAgentId = 1;
    mapping(uint256 agentId => mapping(string metadataKey => bytes)) private _metadata;
    mapping(uint256 agentId => address) private _agentWallets;

    constructor() ERC721("AgentIdentity", "AGENT") EIP712("ERC8004IdentityRegistry", "1") {}

    /// @notice The ERC-8004 version this registry implements (as the reference
    /// implementation's getVersion() reports it).
    function getVersion() external pure returns (string memory) {
        return "2.0.0";
    }

    /// @notice Same as getVersion(), kept for callers of earlier builds.
    function version() external pure returns (string memory) {
        return "2.0.0";
    }

    // --- registration -------------------------------------------------------------------

    function register(string calldata agentURI, MetadataEntry[] calldata metadata)
        external
        returns (uint256 agentId)
    {
        agentId = _mintAgent(agentURI);
        for (uint256 i = 0; i < metadata.length; i++) {
            _setMetadata(agentId, metadata[i].metadataKey, metadata[i].metadataValue);
        }
        emit Registered(agentId, agentURI, msg.sender);
    }

    function register(string calldata agentURI) external returns (uint256 agentId) {
        agentId = _mintAgent(agentURI);
        emit Registered(agentId, agentURI, msg.sender);
    }

    /// @notice Registers an agent with no agentURI yet; set it later with setAgentURI.
    function register() external returns (uint256 agentId) {
        agentId = _mintAgent("");
        emit Registered(agentId, "", msg.sender);
    }

    function setAgentURI(uint256 agentId, string calldata newURI) external {
        _requireAuthorized(agentId);
        _setTokenURI(agentId, newURI);
        emit URIUpdated(agentId, newURI, msg.sender);
    }

    // --- metadata -----------------------------------------------------------------------

    function getMetadata(uint256 agentId, string calldata metadataKey) external view returns (bytes memory) {
        if (keccak256(bytes(metadataKey)) == AGENT_WALLET_KEY_HASH) {
            address wallet = _agentWallets[agentId];
            return wallet == address(0) ? bytes("") : abi.encodePacked(wallet);
        }
        return _metadata[agentId][metadataKey];
    }

    function setMetadata(uint256 agentId, string calldata metadataKey, bytes calldata metadataValue) external {
        _requireAuthorized(agentId);
        _setMetadata(agentId, metadataKey, metadataValue);
    }

    // --- agent wallet -------------------------------------------------------------------

    /// @notice Sets the address where the agent receives payments. `signature` is newWallet's
    /// EIP-712 signature of AgentWalletSet(agentId, newWallet, owner, deadline) (65-byte ECDSA
    /// for an EOA) or its ERC-1271 approval of that digest (a contract wallet).
    function setAgentWallet(uint256 agentId, address newWallet, uint256 deadline, bytes calldata signature)
        external
    {
        address owner = _requireAuthorized(agentId);
        if (newWallet == address(0)) revert ZeroWallet();
        if (deadline < block.timestamp) revert DeadlineExpired(deadline);
        if (deadline > block.timestamp + MAX_DEADLINE_DELAY) {
            revert DeadlineTooFar(deadline, block.timestamp + MAX_DEADLINE_DELAY);
        }
        bytes32 digest =
            _hashTypedDataV4(keccak256(abi.encode(AGENT_WALLET_SET_TYPEHASH, agentId, newWallet, owner, deadline)));
        if (!SignatureChecker.isValidSignatureNowCalldata(newWallet, digest, signature)) {
            revert InvalidWalletSignature(newWallet);
        }
        _agentWallets[agentId] = newWallet;
        emit MetadataSet(agentId, AGENT_WALLET_KEY, AGENT_WALLET_KEY, abi.encodePacked(newWallet));
    }

    /// @notice The agent's wallet, or the zero address when none is set. Reverts when the
    /// agent does not exist.
    function getAgentWallet(uint256 agentId) external view returns (address) {
        _requireOwned(agentId);
        return _agentWallets[agentId];
    }

    function unsetAgentWallet(uint256 agentId) external {
        _requireAuthorized(agentId);
        delete _agentWallets[agentId];
        emit MetadataSet(agentId, AGENT_WALLET_KEY, AGENT_WALLET_KEY, "");
    }

    // --- for the other registries -------------------------------------------------------

    /// @notice True when `spender` may act for the agent (owner or approved operator).
    /// Reverts with ERC721NonexistentToken when the agent does not exist.
    function isAuthorizedOrOwner(address spender, uint256 agentId) external view returns (bool) {
        return _isAuthorized(_requireOwned(agentId), spender, agentId);
    }

    // --- internals ----------------------------------------------------------------------

    function _mintAgent(string memory agentURI) private returns (uint256 agentId) {
        agentId = _nextAgentId++;
        _mint(msg.sender, agentId);
        if (bytes(agentURI).length > 0) {
            _setTokenURI(agentId, agentURI);
        }
        _agentWallets[agentId] = msg.sender;
        emit MetadataSet(agentId, AGENT_WALLET_KEY, AGENT_WALLET_KEY, abi.encodePacked(msg.sender));
    }

    function _setMetadata(uint256 agentId, string calldata metadataKey, bytes calldata metadataValue) private {
        if (bytes(metadataKey).length == 0) revert EmptyMetadataKey();
        if (keccak256(bytes(metadataKey)) == AGENT_WALLET_KEY_HASH) revert ReservedMetadataKey(metadataKey);
        _metadata[agentId][metadataKey] = metadataValue;
        emit MetadataSet(agentId, metadataKey, metadataKey, metadataValue);
    }

    /// @dev Returns the owner; reverts unless the caller is the owner or approved.
    function _requireAuthorized(uint256 agentId) private view returns (address owner) {
        owner = _requireOwned(agentId);
        if (!_isAuthorized(owner, msg.sender, agentId)) revert NotAuthorized(agentId, msg.sender);
    }

    /// @dev A transfer (not a mint) clears the agent wallet: the new owner must verify one.
    function _update(address to, uint256 tokenId, address auth) internal override returns (address from) {
        from = super._update(to, tokenId, auth);
        if (from != address(0) && from != to && _agentWallets[tokenId] != address(0)) {
            delete _agentWallets[tokenId];
            emit MetadataSet(tokenId, AGENT_WALLET_KEY, AGENT_WALLET_KEY, "");
        }
    }
}
