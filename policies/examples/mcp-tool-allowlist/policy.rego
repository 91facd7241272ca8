# Example: an allow-list of MCP tools per agent. Everything that is not MCP is denied.
package mandate.authz

import rego.v1

# agent name -> tools it may call
allowed_tools := {
	"research": {"search", "fetch"},
	"ops": {"search", "restart_service"},
}

default decision := {"allow": false, "reason": "only MCP calls to allow-listed tools are permitted"}

decision := {"allow": true, "reason": sprintf("%s may call %s", [input.source.name, input.mcp.tool])} if {
	input.mcp.tool in allowed_tools[input.source.name]
}

decision := {"allow": false, "reason": sprintf("%s may not call %s", [input.source.name, input.mcp.tool])} if {
	not input.mcp.tool in allowed_tools[input.source.name]
}

# Session plumbing (initialize, notifications, tools/list, ...) for agents on the list.
decision := {"allow": true, "reason": "MCP session plumbing"} if {
	input.mcp.method
	not input.mcp.tool
	allowed_tools[input.source.name]
}
