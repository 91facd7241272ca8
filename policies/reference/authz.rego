# Mandate reference policy.
#
# A call is allowed only when
#   1. the calling workload is registered (input.registry) and active, and
#   2. its effective authority allows the call: the workload's ceiling scopes, intersected with the
#      delegated scopes when the call carries a verified delegation.
# Everything else is denied, with a reason a person (or a model) can read.
#
# A scope is an object of glob patterns over the call's attributes; every field it names must
# match, fields it leaves out match anything:
#   host, port, protocol ("http" | "tcp"), method, path,
#   mcp (JSON-RPC method), tool (tools/call), resource (resources/read URI), prompt (prompts/get)
# e.g. {"host": "github", "tool": "search_*"} or {"host": "api.internal", "method": "GET", "path": "/v1/*"}.
# Patterns follow OPA's glob.match: in `host`, `*` stays within one DNS label ("*.example.com");
# elsewhere `*` stays within one "/"-separated segment ("/v1/*" matches "/v1/items.json", not
# "/v1/a/b"; write "/v1/**" for any depth).
#
# Written for speed on regorus' register VM as well as its interpreter: the call's attributes are
# built once and exact scopes are a single native object.subset test.
#
# MCP session plumbing (initialize, notifications, ping, */list, responses, and the streamable-HTTP
# GET/DELETE of a session) is allowed wherever some scope reaches the host: discovery is not action.
package mandate.authz

import rego.v1

default decision := {"allow": false, "reason": "denied by default: no rule allowed this call"}

decision := verdict

verdict := deny(sprintf("%s is not registered", [input.source.spiffe_id])) if {
	not registered
} else := deny(sprintf("%s is %s, not active", [input.source.spiffe_id, input.registry.status])) if {
	input.registry.status != "active"
} else := deny(sprintf("%s may not %s: outside its ceiling", [input.source.name, action])) if {
	not allows(object.get(input.registry, "ceiling", []), call)
} else := deny(sprintf("%s may not %s: not granted by the delegation from %s", [input.source.name, action, input.delegation.subject])) if {
	input.delegation
	not allows(object.get(input.delegation, "scopes", []), call)
} else := {"allow": true, "reason": sprintf("%s may %s", [input.source.name, action])}

deny(reason) := {"allow": false, "reason": reason}

registered if is_string(input.registry.status)

# The call's attributes, as scopes see them; null where the call has none.
call := {
	"host": input.destination.host,
	"port": input.destination.port,
	"protocol": protocol,
	"method": object.get(input, ["request", "method"], null),
	"path": object.get(input, ["request", "path"], null),
	"mcp": object.get(input, ["mcp", "method"], null),
	"tool": object.get(input, ["mcp", "tool"], null),
	"resource": object.get(input, ["mcp", "uri"], null),
	"prompt": object.get(input, ["mcp", "prompt"], null),
}

protocol := "http" if input.request

else := "tcp"

# Whether some scope allows the call. Exact scopes are one native subset test on the call's
# attributes; only scopes holding glob patterns go through glob matching.
allows(scopes, attributes) if {
	some scope in scopes
	object.subset(attributes, scope)
}

allows(scopes, attributes) if {
	some scope in scopes
	globs_match(scope, attributes)
}

# MCP session plumbing needs only a scope that reaches the destination.
allows(scopes, attributes) if {
	plumbing
	some scope in scopes
	object.subset(attributes, object.remove(scope, ["tool", "resource", "prompt", "mcp", "method", "path"]))
}

globs_match(scope, attributes) if {
	some any_pattern in scope
	is_glob(any_pattern)
	every field, pattern in scope {
		field_matches(field, attributes[field], pattern)
	}
}

field_matches(_, value, pattern) if pattern == value

field_matches(field, value, pattern) if {
	value != null
	is_glob(pattern)
	glob.match(pattern, separators(field), sprintf("%v", [value]))
}

separators("host") := ["."]

separators(field) := ["/"] if field != "host"

is_glob(pattern) if {
	is_string(pattern)
	some meta in ["*", "?", "[", "{"]
	contains(pattern, meta)
}

# What the call does, in words, for reasons.
action := sprintf("call tool %q on %s", [input.mcp.tool, input.destination.host]) if {
	input.mcp.tool
} else := sprintf("read resource %q on %s", [input.mcp.uri, input.destination.host]) if {
	input.mcp.uri
} else := sprintf("get prompt %q on %s", [input.mcp.prompt, input.destination.host]) if {
	input.mcp.prompt
} else := sprintf("send MCP %s to %s", [input.mcp.method, input.destination.host]) if {
	input.mcp.method
} else := sprintf("%s %s on %s", [input.request.method, input.request.path, input.destination.host]) if {
	input.request
} else := sprintf("open TCP to %s:%d", [input.destination.host, input.destination.port])

# MCP messages that are session plumbing rather than an action.
plumbing if {
	input.mcp
	not input.mcp.tool
	not input.mcp.uri
	not input.mcp.prompt
}

plumbing if {
	not input.mcp
	input.request.headers["mcp-session-id"]
	input.request.method in {"GET", "DELETE"}
}
