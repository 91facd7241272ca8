"""MCP server for Mandate's end-to-end tests, built with the official MCP Python SDK.

Serves tools `search` and `delete_repo` over the streamable HTTP transport (stateful: sessions,
SSE responses) at http://127.0.0.1:<port>/mcp, where <port> is free and chosen here. Once
listening it prints `LISTENING <port>` on stdout. Every HTTP request it receives is appended to
the JSON-lines file given as the first argument (method, path, and the JSON-RPC method and name
of each message in the body), so a test can prove a call never reached it.

Usage: server.py RECORD_FILE
Works with mcp 2.x (MCPServer) and mcp 1.x (FastMCP).
"""

import json
import socket
import sys

import anyio
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

    MCP_MAJOR = 1

# The sidecars keep the address the agent used: requests arrive with `Host: tool:8080`.
SECURITY = TransportSecuritySettings(
    enable_dns_rebinding_protection=True,
    allowed_hosts=["tool:8080", "127.0.0.1:*"],
    allowed_origins=[],
)


def build_app():
    if MCP_MAJOR >= 2:
        server = Server("mandate-e2e-tool")
    else:
        server = Server("mandate-e2e-tool", transport_security=SECURITY)

    @server.tool()
    def search(query: str) -> str:
        """Search the code index."""
        return f"3 results for {query!r}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository."""
        return f"deleted {name}"

    if MCP_MAJOR >= 2:
        return server.streamable_http_app(
            streamable_http_path="/mcp", transport_security=SECURITY, host="127.0.0.1"
        )
    return server.streamable_http_app()


def messages(body: bytes):
    """(method, name) of each JSON-RPC message in a request body."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    out = []
    for msg in doc if isinstance(doc, list) else [doc]:
        if not isinstance(msg, dict):
            continue
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        out.append({"method": msg.get("method"), "id": msg.get("id"), "name": params.get("name")})
    return out


class Recorder:
    """ASGI wrapper that records each HTTP request (head and JSON-RPC messages) before serving it."""

    def __init__(self, app, path):
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        buffered, body = [], b""
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        record = {
            "method": scope["method"],
            "path": scope["path"],
            "host": headers.get("host"),
            "peer": headers.get("x-mandate-peer"),
            "messages": messages(body),
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

        async def replay():
            if buffered:
                return buffered.pop(0)
            return await receive()

        await self.app(scope, replay, send)


async def main(record_path):
    app = Recorder(build_app(), record_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on"))
    # Connections queue in the backlog until uvicorn has started the app's lifespan.
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: server.py RECORD_FILE")
    anyio.run(main, sys.argv[1])
