"""The EVM chain kind (web3.py): node and account, anchoring, reputation, identity,
x402 payments, contract deployment."""
