package mandate.authz_test

import data.mandate.authz
import rego.v1

call(agent, tool) := {"source": {"name": agent, "kind": "agent"}, "mcp": {"method": "tools/call", "tool": tool}}

test_listed_tool_is_allowed if authz.decision.allow with input as call("research", "search")

test_unlisted_tool_is_denied_with_its_name if {
	d := authz.decision with input as call("research", "restart_service")
	not d.allow
	d.reason == "research may not call restart_service"
}

test_unknown_agent_is_denied if not authz.decision.allow with input as call("stranger", "search")

test_plumbing_for_listed_agents if {
	authz.decision.allow with input as {"source": {"name": "ops"}, "mcp": {"method": "tools/list"}}
	not authz.decision.allow with input as {"source": {"name": "stranger"}, "mcp": {"method": "tools/list"}}
}

test_plain_http_is_denied if not authz.decision.allow with input as {"source": {"name": "research"}, "request": {"method": "GET", "path": "/"}}
