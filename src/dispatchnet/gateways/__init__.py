"""Agent-facing surfaces over the SDK (dispatchnet.sdk.ComputeRouter, the one client
implementation): the OpenAI-compatible HTTP gateway (http.py, `dispatch gateway`), paid per
request with x402 over HTTP and relayed to the coordinator (relay.py), run with uvicorn
(serve.py); and the MCP server (mcp.py, mcp_http.py, `dispatch mcp`)."""

# A request's line and headers together, at most (both HTTP servers, with uvicorn's h11
# parser): room for a PAYMENT-SIGNATURE at its own limit (relay.MAX_SIGNATURE_CHARS) and
# the usual headers; beyond, the connection gets a 4xx instead of growing the process.
MAX_HEADER_BYTES = 64 * 1024
