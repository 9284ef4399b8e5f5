"""Agent-facing surfaces over the SDK (dispatchnet.sdk.ComputeRouter, the one client
implementation): the MCP server (mcp.py, mcp_http.py)."""
