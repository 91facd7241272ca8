package mandate.authz_test

import data.mandate.authz
import rego.v1

query(sql) := {"mcp": {"method": "tools/call", "tool": "query", "arguments": {"sql": sql}}}

test_select_is_allowed if authz.decision.allow with input as query("SELECT id, name FROM users WHERE id = 1")

test_cte_is_allowed if authz.decision.allow with input as query("with t as (select 1) select * from t;")

test_writes_are_denied if {
	not authz.decision.allow with input as query("DELETE FROM users")
	not authz.decision.allow with input as query("update users set admin = true")
}

test_stacked_statements_are_denied if {
	d := authz.decision with input as query("SELECT 1; DROP TABLE users")
	not d.allow
	contains(d.reason, "not a single read-only statement")
}

test_http_reads_only if {
	authz.decision.allow with input as {"request": {"method": "GET", "path": "/tables/users"}}
	not authz.decision.allow with input as {"request": {"method": "POST", "path": "/sql"}}
}

test_raw_tcp_needs_read_write_label if {
	not authz.decision.allow with input as {"tcp": {"port": 5432}, "registry": {"labels": {}}}
	authz.decision.allow with input as {"tcp": {"port": 5432}, "registry": {"labels": {"db-access": "read-write"}}}
}
