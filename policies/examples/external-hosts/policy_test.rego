package mandate.authz_test

import data.mandate.authz
import rego.v1

to(host, external) := {"destination": {"host": host, "port": 443, "external": external}}

test_meshed_is_allowed if authz.decision.allow with input as to("tool", false)

test_listed_external_is_allowed if {
	authz.decision.allow with input as to("api.github.com", true)
	authz.decision.allow with input as to("storage.googleapis.com", true)
}

test_glob_does_not_cross_dots if not authz.decision.allow with input as to("evil.storage.googleapis.com", true)

test_other_external_is_denied_by_name if {
	d := authz.decision with input as to("exfil.example.com", true)
	not d.allow
	d.reason == "external host exfil.example.com is not on the allow list"
}
