# Mandate reference policy.
#
# A call is allowed only when
#   1. the calling workload is registered (input.registry) and active,
#   2. its ceiling (registry `ceiling` scopes) allows the call, and
#   3. what it acts on allows the call too:
#      - with a verified delegation (input.delegation): the delegation's scopes and the grant's
#        constraints — the person's consent, never more than the ceiling;
#      - without one: the workload's own `autonomous` scopes — what it may do on its own, again
#        never more than the ceiling.
# So effective authority = ceiling ∩ (delegation scopes and constraints, or autonomous scopes).
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
# Grant constraints (input.delegation.constraints) understood here:
#   arguments         {name: pattern}: every named tools/call argument must be present and match
#                     (a string pattern matches a string argument by glob with "/" separators; any
#                     other pattern must equal the argument). A call without arguments (anything
#                     but tools/call) has none, so is denied: scope such grants to tools.
#   require_approval  [scope, ...]: a delegated call matching one of these scopes is answered
#                     {"allow": false, "require_approval": true, "reason": ...}; the sidecar asks
#                     the control plane for a person's approval and lets the approved retry through.
# Any other constraint is refused (deny): a grant's condition this policy cannot enforce must not
# be silently dropped.
#
# Written for speed on regorus' register VM as well as its interpreter: the call's attributes are
# built once and exact scopes are a single native object.subset test.
#
# MCP session plumbing (initialize, notifications, ping, */list, responses, and the streamable-HTTP
# GET/DELETE of a session) is allowed wherever some ceiling scope reaches the host, delegated or
# not: discovery is not action.
package mandate.authz

import rego.v1

default decision := {"allow": false, "reason": "denied by default: no rule allowed this call"}

decision := verdict

verdict := deny(sprintf("%s is not registered", [input.source.spiffe_id])) if {
	not registered
} else := deny(sprintf("%s is %s, not active", [input.source.spiffe_id, input.registry.status])) if {
	input.registry.status != "active"
} else := deny(sprintf("%s may not %s: outside its ceiling", [input.source.name, action])) if {
	not reaches(object.get(input.registry, "ceiling", []))
} else := allow(sprintf("%s may %s", [input.source.name, action])) if {
	plumbing
} else := deny(sprintf("%s may not %s on its own: no delegation, and outside its autonomous scopes", [input.source.name, action])) if {
	not delegated
	not reaches(object.get(input.registry, "autonomous", []))
} else := allow(sprintf("%s may %s", [input.source.name, action])) if {
	not delegated
} else := deny(sprintf("%s may not %s: not granted by the delegation from %s", [input.source.name, action, input.delegation.subject])) if {
	not reaches(object.get(input.delegation, "scopes", []))
} else := deny(sprintf("%s may not %s: the delegation from %s has constraint %q, which this policy does not enforce", [input.source.name, action, input.delegation.subject, min(unknown_constraints)])) if {
	count(unknown_constraints) > 0
} else := deny(argument_refusal) if {
	count(failed_arguments) > 0
} else := {"allow": false, "require_approval": true, "reason": sprintf("%s may not %s yet: the delegation from %s says this call needs approval from %s", [input.source.name, action, input.delegation.subject, input.delegation.subject])} if {
	reaches(object.get(constraints, "require_approval", []))
} else := allow(sprintf("%s may %s on behalf of %s", [input.source.name, action, input.delegation.subject]))

deny(reason) := {"allow": false, "reason": reason}

allow(reason) := {"allow": true, "reason": reason}

registered if is_string(input.registry.status)

delegated if is_object(input.delegation)

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

# A meshed destination is matched by the host the agent called or by its registered name, so a
# scope {"host": "tool"} reaches the tool service however it is addressed (its name, or an IP
# under transparent interception).
calls contains call

calls contains object.union(call, {"host": input.destination.name}) if is_string(input.destination.name)

reaches(scopes) if {
	some attributes in calls
	allows(scopes, attributes)
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

# The grant's constraints, as the delegation carries them ({} when none).
constraints := c if {
	c := input.delegation.constraints
	is_object(c)
} else := {}

known_constraints := {"arguments", "require_approval"}

unknown_constraints contains name if {
	some name, _ in constraints
	not name in known_constraints
}

# The arguments of the call (tools/call), {} when it has none.
call_arguments := a if {
	a := input.mcp.arguments
	is_object(a)
} else := {}

# Names of the constrained arguments the call does not satisfy: missing, or not matching.
failed_arguments contains name if {
	some name, _ in object.get(constraints, "arguments", {})
	not name in object.keys(call_arguments)
}

failed_arguments contains name if {
	some name, pattern in object.get(constraints, "arguments", {})
	value := call_arguments[name]
	not argument_matches(value, pattern)
}

argument_matches(value, pattern) if value == pattern

argument_matches(value, pattern) if {
	is_string(pattern)
	is_string(value)
	glob.match(pattern, ["/"], value)
}

# Why the first (by name) unsatisfied argument fails.
argument_refusal := sprintf("%s may not %s: argument %q is missing, and the delegation from %s requires it to match %s", [input.source.name, action, name, input.delegation.subject, json.marshal(constraints.arguments[name])]) if {
	name := min(failed_arguments)
	not name in object.keys(call_arguments)
} else := sprintf("%s may not %s: argument %q does not match %s, as the delegation from %s requires", [input.source.name, action, name, json.marshal(constraints.arguments[name]), input.delegation.subject]) if {
	name := min(failed_arguments)
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
