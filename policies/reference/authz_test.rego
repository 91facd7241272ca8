package mandate.authz_test

import data.mandate.authz
import rego.v1

research := {
	"status": "active",
	"owner": "alice@example.com",
	"ceiling": [
		{"host": "tool", "tool": "search"},
		{"host": "tool", "tool": "read_*"},
		{"host": "api", "method": "GET", "path": "/v1/*"},
		{"host": "db", "protocol": "tcp", "port": 5432},
	],
}

agent := {"spiffe_id": "spiffe://mandate.local/agent/research", "trust_domain": "mandate.local", "kind": "agent", "name": "research"}

tool_call(name) := {
	"direction": "outbound",
	"source": agent,
	"destination": {"host": "tool", "port": 8080, "spiffe_id": "spiffe://mandate.local/service/tool", "external": false},
	"request": {"method": "POST", "path": "/mcp", "headers": {}},
	"mcp": {"method": "tools/call", "id": 1, "tool": name, "arguments": {}},
	"registry": research,
}

http_call(method, host, path) := {
	"direction": "outbound",
	"source": agent,
	"destination": {"host": host, "port": 80, "external": false},
	"request": {"method": method, "path": path, "headers": {}},
	"registry": research,
}

test_allowed_tool_within_ceiling if {
	d := authz.decision with input as tool_call("search")
	d.allow
	d.reason == `research may call tool "search" on tool`
}

test_glob_in_ceiling if {
	authz.decision.allow with input as tool_call("read_file")
}

test_tool_outside_ceiling_is_denied_with_reason if {
	d := authz.decision with input as tool_call("delete_repo")
	not d.allow
	d.reason == `research may not call tool "delete_repo" on tool: outside its ceiling`
}

test_unregistered_agent_is_denied if {
	d := authz.decision with input as object.union(tool_call("search"), {"registry": null})
	not d.allow
	contains(d.reason, "is not registered")
}

test_suspended_agent_is_denied if {
	suspended := object.union(research, {"status": "suspended"})
	d := authz.decision with input as object.union(tool_call("search"), {"registry": suspended})
	not d.allow
	d.reason == "spiffe://mandate.local/agent/research is suspended, not active"
}

mcp_message(method) := object.union(object.remove(tool_call("x"), ["mcp"]), {"mcp": {"method": method, "id": 0}})

test_mcp_plumbing_is_allowed_where_a_scope_reaches_the_host if {
	authz.decision.allow with input as mcp_message("initialize")
	authz.decision.allow with input as mcp_message("tools/list")
	authz.decision.allow with input as mcp_message("notifications/initialized")
}

test_mcp_plumbing_is_denied_on_unreachable_hosts if {
	call := tool_call("x")
	elsewhere := object.union(call, {"destination": {"host": "other", "port": 8080, "external": false}, "mcp": {"method": "initialize", "id": 0}})
	not authz.decision.allow with input as elsewhere
}

test_streamable_http_session_requests_are_plumbing if {
	get := object.union(http_call("GET", "tool", "/mcp"), {"request": {"method": "GET", "path": "/mcp", "headers": {"mcp-session-id": "abc"}}})
	authz.decision.allow with input as get
	not authz.decision.allow with input as http_call("GET", "tool", "/mcp")
}

test_path_globs_stay_within_a_segment if {
	authz.decision.allow with input as http_call("GET", "api", "/v1/items.json")
	not authz.decision.allow with input as http_call("GET", "api", "/v1/items/42")
}

test_host_globs_stay_within_a_label if {
	wildcard := object.union(research, {"ceiling": [{"host": "*.internal", "method": "GET"}]})
	authz.decision.allow with input as object.union(http_call("GET", "api.internal", "/"), {"registry": wildcard})
	not authz.decision.allow with input as object.union(http_call("GET", "evil.api.internal", "/"), {"registry": wildcard})
}

test_plain_http_by_method_and_path if {
	authz.decision.allow with input as http_call("GET", "api", "/v1/items")
	not authz.decision.allow with input as http_call("POST", "api", "/v1/items")
	not authz.decision.allow with input as http_call("GET", "api", "/admin")
}

test_tcp_by_host_and_port if {
	tcp := {"direction": "outbound", "source": agent, "destination": {"host": "db", "port": 5432, "external": false}, "tcp": {"port": 5432}, "registry": research}
	d := authz.decision with input as tcp
	d.allow
	d.reason == "research may open TCP to db:5432"
	not authz.decision.allow with input as object.union(tcp, {"destination": {"host": "db", "port": 3306, "external": false}})
}

test_delegation_narrows_the_ceiling if {
	delegated := object.union(tool_call("read_file"), {"delegation": {"subject": "alice@example.com", "scopes": [{"tool": "search"}]}})
	d := authz.decision with input as delegated
	not d.allow
	d.reason == `research may not call tool "read_file" on tool: not granted by the delegation from alice@example.com`
	authz.decision.allow with input as object.union(tool_call("search"), {"delegation": {"subject": "alice@example.com", "scopes": [{"tool": "search"}]}})
}

test_delegation_cannot_widen_the_ceiling if {
	delegated := object.union(tool_call("delete_repo"), {"delegation": {"subject": "alice@example.com", "scopes": [{"tool": "*"}]}})
	not authz.decision.allow with input as delegated
}

test_inbound_applies_the_same_rules_to_the_caller if {
	inbound := object.union(tool_call("delete_repo"), {"direction": "inbound"})
	not authz.decision.allow with input as inbound
	authz.decision.allow with input as object.union(tool_call("search"), {"direction": "inbound"})
}
