"""MCP client for Mandate's end-to-end tests, built with the official MCP Python SDK.

Connects to URL (e.g. http://tool:8080/mcp) with the streamable HTTP transport — through the
agent's sidecar when HTTP_PROXY / http_proxy name it — then: initialize, list tools, call
`search`, call `delete_repo`. Prints one JSON object on stdout describing what happened to each
step, for the test to judge; exits 0 whenever it could report (a refused call is an outcome, not
a crash).

Usage: client.py URL
Works with mcp 2.x and mcp 1.x.
"""

import json
import sys
import traceback

import anyio
from mcp import ClientSession

try:  # mcp >= 2
    from mcp.client.streamable_http import streamable_http_client as connect
except ImportError:  # mcp 1.x
    from mcp.client.streamable_http import streamablehttp_client as connect


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def error_of(exc):
    """The JSON-RPC error an exception carries (McpError / MCPError), else its text."""
    error = getattr(exc, "error", None)
    if error is not None and hasattr(error, "code"):
        return {"code": error.code, "message": error.message, "data": error.data}
    return {"exception": type(exc).__name__, "text": str(exc)}


async def step(report, name, call):
    try:
        report[name] = {"result": await call()}
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the test
        report[name] = {"error": error_of(exc)}
        print(f"{name}:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)


async def main(url):
    report = {}
    async with connect(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:

            async def initialize():
                result = dump(await session.initialize())
                return {"serverInfo": result.get("serverInfo"), "protocolVersion": result.get("protocolVersion")}

            async def list_tools():
                return sorted(t.name for t in (await session.list_tools()).tools)

            def tool_call(name, arguments):
                async def call():
                    return dump(await session.call_tool(name, arguments))

                return call

            await step(report, "initialize", initialize)
            if "result" in report["initialize"]:
                await step(report, "list_tools", list_tools)
                await step(report, "search", tool_call("search", {"query": "mandate"}))
                await step(report, "delete_repo", tool_call("delete_repo", {"name": "mandate"}))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: client.py URL")
    anyio.run(main, sys.argv[1])
