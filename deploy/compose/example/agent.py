"""An agent of Mandate's docker-compose mesh, built with the official MCP Python SDK.

Each round it opens an MCP session with the tool at TOOL_URL (default http://tool:8080/mcp) and
calls `search`, then `delete_repo`, printing one line per step: `allowed` with the result, or
`denied` with the reason and decision id its sidecar gave. Every request goes through the sidecar:
HTTP_PROXY=http://127.0.0.1:15001, which the SDK's HTTP client honours. The sidecar shares this
container's network namespace; before the first round the agent waits until the sidecar's admin
listener (SIDECAR_ADMIN, default 127.0.0.1:15000) answers /readyz with 200.

AGENT_NAME names it in the output; CALL_INTERVAL (seconds, default 10) spaces the rounds and
CALL_ROUNDS (default 0: forever) bounds them.
"""

import os
import time
import urllib.error
import urllib.request

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

NAME = os.environ.get("AGENT_NAME", "agent")


def say(step: str, verdict: str, detail: str) -> None:
    print(f"{NAME}: {step:<22} {verdict:<7} {detail}", flush=True)


def refusal(exc: BaseException) -> str:
    """What a failed step says: the sidecar's reason and decision id for a refused JSON-RPC call
    (error code -32001, reason and decision_id in its data), else the error itself."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return refusal(exc.exceptions[0])
    error = getattr(exc, "error", None)
    data = getattr(error, "data", None)
    if isinstance(data, dict) and "reason" in data:
        return f"{data['reason']} (decision {data.get('decision_id')})"
    if error is not None and hasattr(error, "message"):
        return f"{error.message} (JSON-RPC error {error.code})"
    return f"{type(exc).__name__}: {exc}"


def wait_for_sidecar(admin: str, timeout: float = 120.0) -> None:
    """Polls the sidecar's /readyz directly (never through the proxy) until it answers 200."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    why = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with direct.open(f"http://{admin}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            why = f"{exc.code}: {exc.read().decode(errors='replace').strip()}"
        except OSError as exc:
            why = str(exc)
        time.sleep(1)
    raise SystemExit(f"{NAME}: the sidecar at {admin} was not ready within {timeout:.0f}s ({why})")


async def one_round(url: str) -> None:
    try:
        async with streamable_http_client(url) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                try:
                    init = await session.initialize()
                except Exception as exc:  # noqa: BLE001 - a refusal is an outcome to print
                    say("initialize", "denied", refusal(exc))
                    return
                say("initialize", "allowed", f"server {init.server_info.name}")
                calls = (("search", {"query": "mandate"}), ("delete_repo", {"name": "mandate"}))
                for tool, arguments in calls:
                    try:
                        result = await session.call_tool(tool, arguments)
                    except Exception as exc:  # noqa: BLE001
                        say(f"tools/call {tool}", "denied", refusal(exc))
                        continue
                    text = " ".join(c.text for c in result.content if getattr(c, "text", None))
                    say(f"tools/call {tool}", "error" if result.is_error else "allowed", text)
    except Exception as exc:  # noqa: BLE001 - the session itself failed: print it, try next round
        say("session", "failed", refusal(exc))


def main() -> None:
    url = os.environ.get("TOOL_URL", "http://tool:8080/mcp")
    interval = float(os.environ.get("CALL_INTERVAL", "10"))
    rounds = int(os.environ.get("CALL_ROUNDS", "0"))
    wait_for_sidecar(os.environ.get("SIDECAR_ADMIN", "127.0.0.1:15000"))
    print(f"{NAME}: calling {url} through {os.environ.get('HTTP_PROXY', 'no proxy')}", flush=True)
    done = 0
    while rounds == 0 or done < rounds:
        if done:
            time.sleep(interval)
        anyio.run(one_round, url)
        done += 1


if __name__ == "__main__":
    main()
