package mandate.authz_test

import data.mandate.authz
import rego.v1

# On its own research may search and read, call the REST API and its database; a person's
# delegation can take it as far as its ceiling, which also lets it open issues.
research := {
	"status": "active",
	"owner": "alice@example.com",
	"ceiling": [
		{"host": "tool", "tool": "search"},
		{"host": "tool", "tool": "read_*"},
		{"host": "tool", "tool": "create_issue"},
		{"host": "api", "method": "GET", "path": "/v1/*"},
		{"host": "db", "protocol": "tcp", "port": 5432},
	],
	"autonomous": [
		{"host": "tool", "tool": "search"},
		{"host": "tool", "tool": "read_*"},
		{"host": "api", "method": "GET", "path": "/v1/*"},
		{"host": "db", "protocol": "tcp", "port": 5432},
	],
}

agent := {"spiffe_id": "spiffe://mandate.local/agent/research", "trust_domain": "mandate.local", "kind": "agent", "name": "research"}

tool_call(name) := tool_call_with(name, {})

tool_call_with(name, arguments) := {
	"direction": "outbound",
	"source": agent,
	"destination": {"host": "tool", "port": 8080, "spiffe_id": "spiffe://mandate.local/service/tool", "external": false},
	"request": {"method": "POST", "path": "/mcp", "headers": {}},
	"mcp": {"method": "tools/call", "id": 1, "tool": name, "arguments": arguments},
	"registry": research,
}

http_call(method, host, path) := {
	"direction": "outbound",
	"source": agent,
	"destination": {"host": host, "port": 80, "external": false},
	"request": {"method": method, "path": path, "headers": {}},
	"registry": research,
}

# A verified delegation from alice with these scopes and grant constraints.
delegation(scopes, constraints) := {
	"subject": "alice@example.com",
	"grant_id": "0190c1a2-0000-7000-8000-000000000001",
	"scopes": scopes,
	"constraints": constraints,
	"actors": ["spiffe://mandate.local/agent/research"],
	"approved_by": "alice@example.com",
	"expires_at": "2026-11-21T23:00:00Z",
	"purpose": "triage the Q3 issues",
}

delegated(call, scopes, constraints) := object.union(call, {"delegation": delegation(scopes, constraints)})

# The call made by a workload with this registry entry (object.union would merge the entries).
as_registered(call, entry) := object.union(object.remove(call, ["registry"]), {"registry": entry})

# --- registration ---------------------------------------------------------------------------

test_unregistered_agent_is_denied if {
	d := authz.decision with input as as_registered(tool_call("search"), null)
	not d.allow
	d.reason == "spiffe://mandate.local/agent/research is not registered"
}

test_suspended_agent_is_denied if {
	suspended := object.union(research, {"status": "suspended"})
	d := authz.decision with input as as_registered(tool_call("search"), suspended)
	not d.allow
	d.reason == "spiffe://mandate.local/agent/research is suspended, not active"
}

test_suspended_agent_is_denied_even_when_delegated if {
	suspended := object.union(research, {"status": "revoked"})
	call := delegated(tool_call("search"), [{"tool": "search"}], {})
	d := authz.decision with input as as_registered(call, suspended)
	not d.allow
	d.reason == "spiffe://mandate.local/agent/research is revoked, not active"
}

# --- the ceiling ----------------------------------------------------------------------------

test_tool_outside_ceiling_is_denied_with_reason if {
	d := authz.decision with input as tool_call("delete_repo")
	not d.allow
	d.reason == `research may not call tool "delete_repo" on tool: outside its ceiling`
}

test_delegation_cannot_widen_the_ceiling if {
	d := authz.decision with input as delegated(tool_call("delete_repo"), [{"tool": "*"}], {})
	not d.allow
	d.reason == `research may not call tool "delete_repo" on tool: outside its ceiling`
}

test_autonomous_scopes_cannot_widen_the_ceiling if {
	wide := object.union(research, {"autonomous": [{"host": "tool"}]})
	d := authz.decision with input as as_registered(tool_call("delete_repo"), wide)
	not d.allow
	d.reason == `research may not call tool "delete_repo" on tool: outside its ceiling`
	authz.decision.allow with input as as_registered(tool_call("create_issue"), wide)
}

test_no_ceiling_allows_nothing if {
	bare := object.remove(research, ["ceiling"])
	d := authz.decision with input as as_registered(tool_call("search"), bare)
	not d.allow
	d.reason == `research may not call tool "search" on tool: outside its ceiling`
}

# --- on its own: the autonomous scopes ------------------------------------------------------

test_allowed_tool_within_autonomous_scopes if {
	d := authz.decision with input as tool_call("search")
	d.allow
	d.reason == `research may call tool "search" on tool`
}

test_glob_in_autonomous_scopes if {
	authz.decision.allow with input as tool_call("read_file")
}

test_within_ceiling_but_not_autonomous_is_denied_without_delegation if {
	d := authz.decision with input as tool_call("create_issue")
	not d.allow
	d.reason == `research may not call tool "create_issue" on tool on its own: no delegation, and outside its autonomous scopes`
}

test_a_ceiling_without_autonomous_scopes_acts_only_when_delegated if {
	only_delegated := object.remove(research, ["autonomous"])
	d := authz.decision with input as as_registered(tool_call("search"), only_delegated)
	not d.allow
	d.reason == `research may not call tool "search" on tool on its own: no delegation, and outside its autonomous scopes`
	call := delegated(tool_call("search"), [{"tool": "search"}], {})
	authz.decision.allow with input as as_registered(call, only_delegated)
}

test_null_delegation_is_no_delegation if {
	d := authz.decision with input as object.union(tool_call("create_issue"), {"delegation": null})
	not d.allow
	contains(d.reason, "on its own: no delegation")
}

# --- delegated: the delegation's scopes and constraints --------------------------------------

test_delegation_allows_within_its_scopes_and_says_for_whom if {
	d := authz.decision with input as delegated(tool_call("create_issue"), [{"host": "tool", "tool": "create_*"}], {})
	d.allow
	d.reason == `research may call tool "create_issue" on tool on behalf of alice@example.com`
}

test_delegation_narrows_the_ceiling if {
	d := authz.decision with input as delegated(tool_call("read_file"), [{"tool": "search"}], {})
	not d.allow
	d.reason == `research may not call tool "read_file" on tool: not granted by the delegation from alice@example.com`
	authz.decision.allow with input as delegated(tool_call("search"), [{"tool": "search"}], {})
}

test_delegation_replaces_the_autonomous_scopes if {
	# search is autonomous, but a delegated call is held to what the person granted.
	d := authz.decision with input as delegated(tool_call("search"), [{"tool": "create_issue"}], {})
	not d.allow
	d.reason == `research may not call tool "search" on tool: not granted by the delegation from alice@example.com`
}

test_delegation_without_scopes_grants_nothing if {
	no_scopes := object.union(tool_call("search"), {"delegation": object.remove(delegation([], {}), ["scopes"])})
	d := authz.decision with input as no_scopes
	not d.allow
	contains(d.reason, "not granted by the delegation from alice@example.com")
}

test_delegation_without_constraints_is_unconstrained if {
	call := object.union(tool_call("create_issue"), {"delegation": object.remove(delegation([{"tool": "create_issue"}], {}), ["constraints"])})
	authz.decision.allow with input as call
	authz.decision.allow with input as object.union(call, {"delegation": {"constraints": null}})
}

test_argument_constraints_match_by_glob_with_slash_separators if {
	scopes := [{"tool": "create_issue"}]
	constraints := {"arguments": {"repo": "acme/*"}}
	d := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "acme/widgets", "title": "x"}), scopes, constraints)
	d.allow
	d.reason == `research may call tool "create_issue" on tool on behalf of alice@example.com`
	deep := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "acme/widgets/sub"}), scopes, constraints)
	not deep.allow
	deep.reason == `research may not call tool "create_issue" on tool: argument "repo" does not match "acme/*", as the delegation from alice@example.com requires`
	other := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "evil/widgets"}), scopes, constraints)
	not other.allow
}

test_argument_constraints_compare_other_values_exactly if {
	scopes := [{"tool": "create_issue"}]
	constraints := {"arguments": {"priority": 3, "draft": true, "labels": ["bug"]}}
	ok := {"priority": 3, "draft": true, "labels": ["bug"]}
	authz.decision.allow with input as delegated(tool_call_with("create_issue", ok), scopes, constraints)
	d := authz.decision with input as delegated(tool_call_with("create_issue", object.union(ok, {"priority": 4})), scopes, constraints)
	not d.allow
	d.reason == `research may not call tool "create_issue" on tool: argument "priority" does not match 3, as the delegation from alice@example.com requires`

	# A string argument never matches a number pattern, nor a string pattern a number argument.
	not authz.decision.allow with input as delegated(tool_call_with("create_issue", object.union(ok, {"priority": "3"})), scopes, constraints)
	textual := {"arguments": {"n": "4*"}}
	not authz.decision.allow with input as delegated(tool_call_with("create_issue", {"n": 42}), scopes, textual)
	authz.decision.allow with input as delegated(tool_call_with("create_issue", {"n": "42"}), scopes, textual)
}

test_a_constrained_argument_that_is_missing_is_denied if {
	scopes := [{"tool": "create_issue"}]
	d := authz.decision with input as delegated(tool_call_with("create_issue", {"title": "x"}), scopes, {"arguments": {"repo": "acme/*"}})
	not d.allow
	d.reason == `research may not call tool "create_issue" on tool: argument "repo" is missing, and the delegation from alice@example.com requires it to match "acme/*"`

	# Even when the pattern is null: missing is not null.
	not authz.decision.allow with input as delegated(tool_call_with("create_issue", {}), scopes, {"arguments": {"parent": null}})
	authz.decision.allow with input as delegated(tool_call_with("create_issue", {"parent": null}), scopes, {"arguments": {"parent": null}})
}

test_the_first_failing_argument_by_name_is_named if {
	constraints := {"arguments": {"b": "x", "a": "x", "c": "x"}}
	d := authz.decision with input as delegated(tool_call_with("create_issue", {"c": "y"}), [{"tool": "create_issue"}], constraints)
	not d.allow
	contains(d.reason, `argument "a" is missing`)
}

test_argument_constraints_deny_calls_without_arguments if {
	d := authz.decision with input as delegated(http_call("GET", "api", "/v1/items"), [{"host": "api"}], {"arguments": {"repo": "acme/*"}})
	not d.allow
	d.reason == `research may not GET /v1/items on api: argument "repo" is missing, and the delegation from alice@example.com requires it to match "acme/*"`
}

test_require_approval_holds_matching_calls_for_the_subject if {
	constraints := {"require_approval": [{"tool": "create_*"}]}
	d := authz.decision with input as delegated(tool_call("create_issue"), [{"host": "tool"}], constraints)
	not d.allow
	d.require_approval
	d.reason == `research may not call tool "create_issue" on tool yet: the delegation from alice@example.com says this call needs approval from alice@example.com`

	# Other calls under the same grant go through.
	r := authz.decision with input as delegated(tool_call("read_file"), [{"host": "tool"}], constraints)
	r.allow
	not r.require_approval
}

test_require_approval_comes_after_scopes_and_arguments if {
	constraints := {"require_approval": [{"host": "tool"}], "arguments": {"repo": "acme/*"}}
	outside := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "acme/w"}), [{"tool": "search"}], constraints)
	not outside.allow
	not outside.require_approval
	bad := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "evil/w"}), [{"tool": "create_issue"}], constraints)
	not bad.allow
	not bad.require_approval
	contains(bad.reason, `argument "repo" does not match`)
	held := authz.decision with input as delegated(tool_call_with("create_issue", {"repo": "acme/w"}), [{"tool": "create_issue"}], constraints)
	held.require_approval
}

test_unknown_constraints_are_refused if {
	d := authz.decision with input as delegated(tool_call("search"), [{"tool": "search"}], {"max_calls": 3, "arguments": {}})
	not d.allow
	d.reason == `research may not call tool "search" on tool: the delegation from alice@example.com has constraint "max_calls", which this policy does not enforce`
}

test_multi_hop_decides_on_the_current_actor_and_the_subject if {
	chain := object.union(delegation([{"tool": "create_issue"}], {}), {"actors": ["spiffe://mandate.local/agent/planner", "spiffe://mandate.local/agent/research"]})
	d := authz.decision with input as object.union(tool_call("create_issue"), {"delegation": chain})
	d.allow
	d.reason == `research may call tool "create_issue" on tool on behalf of alice@example.com`
}

# --- MCP plumbing -----------------------------------------------------------------------------

mcp_message(method) := object.union(object.remove(tool_call("x"), ["mcp"]), {"mcp": {"method": method, "id": 0}})

test_mcp_plumbing_is_allowed_where_a_scope_reaches_the_host if {
	d := authz.decision with input as mcp_message("initialize")
	d.allow
	d.reason == "research may send MCP initialize to tool"
	authz.decision.allow with input as mcp_message("tools/list")
	authz.decision.allow with input as mcp_message("notifications/initialized")
}

test_mcp_plumbing_needs_only_the_ceiling if {
	# Discovery is not action: no autonomous scopes, no delegation, or a delegation elsewhere.
	only_delegated := object.remove(research, ["autonomous"])
	authz.decision.allow with input as as_registered(mcp_message("initialize"), only_delegated)
	authz.decision.allow with input as object.union(mcp_message("tools/list"), {"delegation": delegation([{"host": "api"}], {"require_approval": [{"host": "tool"}]})})
}

test_mcp_plumbing_is_denied_on_unreachable_hosts if {
	elsewhere := object.union(mcp_message("initialize"), {"destination": {"host": "other", "spiffe_id": "spiffe://mandate.local/service/other"}})
	d := authz.decision with input as elsewhere
	not d.allow
	d.reason == "research may not send MCP initialize to other: outside its ceiling"
}

test_streamable_http_session_requests_are_plumbing if {
	get := object.union(http_call("GET", "tool", "/mcp"), {"request": {"method": "GET", "path": "/mcp", "headers": {"mcp-session-id": "abc"}}})
	authz.decision.allow with input as get
	not authz.decision.allow with input as http_call("GET", "tool", "/mcp")
}

# --- scopes -----------------------------------------------------------------------------------

test_path_globs_stay_within_a_segment if {
	authz.decision.allow with input as http_call("GET", "api", "/v1/items.json")
	not authz.decision.allow with input as http_call("GET", "api", "/v1/items/42")
}

test_host_globs_stay_within_a_label if {
	wildcard := object.union(research, {"ceiling": [{"host": "*.internal", "method": "GET"}], "autonomous": [{"method": "GET"}]})
	authz.decision.allow with input as as_registered(http_call("GET", "api.internal", "/"), wildcard)
	not authz.decision.allow with input as as_registered(http_call("GET", "evil.api.internal", "/"), wildcard)
}

test_plain_http_by_method_and_path if {
	d := authz.decision with input as http_call("GET", "api", "/v1/items")
	d.allow
	d.reason == "research may GET /v1/items on api"
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

test_resources_and_prompts_are_named_in_reasons if {
	resource := object.union(object.remove(tool_call("x"), ["mcp"]), {"mcp": {"method": "resources/read", "id": 2, "uri": "file:///etc/passwd"}})
	d := authz.decision with input as resource
	d.reason == `research may not read resource "file:///etc/passwd" on tool: outside its ceiling`
	prompt := object.union(object.remove(tool_call("x"), ["mcp"]), {"mcp": {"method": "prompts/get", "id": 3, "prompt": "summarise"}})
	p := authz.decision with input as prompt
	p.reason == `research may not get prompt "summarise" on tool: outside its ceiling`
}

test_inbound_applies_the_same_rules_to_the_caller if {
	inbound := object.union(tool_call("delete_repo"), {"direction": "inbound"})
	not authz.decision.allow with input as inbound
	authz.decision.allow with input as object.union(tool_call("search"), {"direction": "inbound"})
	not authz.decision.allow with input as object.union(tool_call("create_issue"), {"direction": "inbound"})
	authz.decision.allow with input as delegated(object.union(tool_call("create_issue"), {"direction": "inbound"}), [{"tool": "create_issue"}], {})
}

# Under transparent interception the agent calls the tool by IP: the tool's registered name still
# matches scopes on host "tool".
test_a_meshed_destination_called_by_ip_matches_scopes_on_its_name if {
	by_ip := object.union(tool_call("search"), {"destination": {"host": "10.77.0.3", "port": 8080, "spiffe_id": "spiffe://mandate.local/service/tool", "name": "tool", "external": false}})
	authz.decision.allow with input as by_ip
}

test_an_ip_that_is_not_the_tool_does_not_match_scopes_on_the_tool if {
	other := object.union(tool_call("search"), {"destination": {"host": "10.77.0.3", "port": 15006, "external": true}})
	not authz.decision.allow with input as other
}
