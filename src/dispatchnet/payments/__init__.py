"""x402 payments over gRPC: the CommitJob interceptor (interceptor.py), when money moves
(service.py), the SDK's server and facilitator side (x402.py) and the client side
(wallet.py)."""
