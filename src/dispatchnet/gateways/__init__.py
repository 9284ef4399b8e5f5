"""Agent-facing surfaces over the SDK (dispatchnet.sdk.ComputeRouter). gateways.http is the
OpenAI-compatible HTTP gateway (`dispatch gateway`), paid per request with x402 over HTTP
and relayed to the coordinator (gateways.relay); gateways.serve runs it with uvicorn."""
