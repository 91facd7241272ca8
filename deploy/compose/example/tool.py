"""The tool of Mandate's docker-compose mesh: an MCP server built with the official MCP Python SDK,
serving the tools `search` and `delete_repo` over streamable HTTP at /mcp.

It listens on TOOL_LISTEN (default 127.0.0.1:8080): loopback only, so the one way in is its
sidecar, which shares its network namespace, accepts mTLS on :15006, checks the caller's identity
and the policy, and forwards here. Requests keep the Host the agents called, TOOL_HOST (default
tool:8080), the only one the SDK's DNS-rebinding protection lets through.
"""

import os

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings


def build_app(host: str, allowed_host: str):
    server = MCPServer("mandate-compose-tool")

    @server.tool()
    def search(query: str) -> str:
        """Search the code index."""
        return f"3 results for {query!r}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository."""
        return f"deleted {name}"

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[allowed_host],
        allowed_origins=[],
    )
    return server.streamable_http_app(
        streamable_http_path="/mcp", transport_security=security, host=host
    )


def main():
    listen = os.environ.get("TOOL_LISTEN", "127.0.0.1:8080")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"TOOL_LISTEN must be HOST:PORT, not {listen!r}")
    app = build_app(host, os.environ.get("TOOL_HOST", "tool:8080"))
    print(f"tool: MCP server on http://{listen}/mcp", flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level="info")


if __name__ == "__main__":
    main()
