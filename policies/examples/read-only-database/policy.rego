# Example: read-only database access.
# - MCP database tools: `query` is allowed only for a single read-only SQL statement.
# - A database's HTTP API: only GET and HEAD.
# - Raw TCP to the database: only agents labelled db-access=read-write (a TCP stream cannot be
#   inspected, so read-only agents must go through the query tool).
package mandate.authz

import rego.v1

default decision := {"allow": false, "reason": "denied: not a read-only database operation"}

# ASCII classes: regorus' regex engine has no Unicode \s or \b.
read_only_sql(sql) if {
	statement := lower(sql)
	regex.match(`^[[:space:]]*(select|with|explain|show)[[:space:]][^;]*;?[[:space:]]*$`, statement)
	not regex.match(`(^|[^a-z_])(insert|update|delete|drop|alter|create|truncate|grant|revoke)([^a-z_]|$)`, statement)
}

decision := {"allow": true, "reason": "read-only SQL"} if {
	input.mcp.tool == "query"
	read_only_sql(input.mcp.arguments.sql)
}

decision := {"allow": false, "reason": sprintf("query %q is not a single read-only statement", [input.mcp.arguments.sql])} if {
	input.mcp.tool == "query"
	not read_only_sql(input.mcp.arguments.sql)
}

decision := {"allow": true, "reason": "read-only HTTP method"} if {
	not input.mcp
	input.request.method in {"GET", "HEAD"}
}

decision := {"allow": true, "reason": "read-write database agent"} if {
	input.tcp
	input.registry.labels["db-access"] == "read-write"
}
