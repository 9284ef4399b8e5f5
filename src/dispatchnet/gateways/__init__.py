"""Agent-facing surfaces over the SDK (dispatchnet.sdk.ComputeRouter, the one client
implementation): the OpenAI-compatible HTTP gateway (http.py, `dispatch gateway`), paid per
request with x402 over HTTP and relayed to the coordinator (relay.py), run with uvicorn
(serve.py); and the MCP server (mcp.py, mcp_http.py, `dispatch mcp`)."""
