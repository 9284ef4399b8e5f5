"""Agent-facing surfaces over the SDK (dispatchnet.sdk.ComputeRouter, the one client
implementation): the OpenAI-compatible HTTP gateway (http.py, `dispatch gateway`), paid per
request with x402 over HTTP and relayed to the coordinator (relay.py), run with uvicorn
(serve.py); and the MCP server (mcp.py, mcp_http.py, `dispatch mcp`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

# A request's line and headers together, at most (both HTTP servers, with uvicorn's h11
# parser): room for a PAYMENT-SIGNATURE at its own limit (relay.MAX_SIGNATURE_CHARS) and
# the usual headers; beyond, the connection gets a 4xx instead of growing the process.
MAX_HEADER_BYTES = 64 * 1024


def without_addresses(value: T, addresses: Sequence[str]) -> T:
    """An error's text or body as callers of either surface see it: the coordinators'
    addresses are the operator's business, so each is replaced by "coordinator" in every
    string, and the `coordinator` entries (of an error's reasons) are left out."""
    if isinstance(value, str):
        for address in addresses:
            value = value.replace(address, "coordinator")  # type: ignore[assignment]
        return value
    if isinstance(value, list):
        return [without_addresses(v, addresses) for v in value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {  # type: ignore[return-value]
            k: without_addresses(v, addresses) for k, v in value.items() if k != "coordinator"
        }
    return value
