"""The Solana chain kind (solana-py over JSON-RPC): node and coordinator keypair, receipt
anchoring with the SPL Memo program; `adapter.py` is its ChainAdapter. Every call goes
through a Solana RPC URL, so the local LiteSVM node (devchain/solana_node.py) and devnet
are reached the same way."""
