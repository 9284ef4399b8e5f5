"""Local chains for the embedded default profile (an anvil EVM node, a local Solana)."""
