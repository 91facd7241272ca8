# Example: meshed destinations are allowed; external hosts only when on the list.
package mandate.authz

import rego.v1

allowed_external := {"api.github.com", "*.googleapis.com", "pypi.org"}

default decision := {"allow": false, "reason": "denied by default"}

decision := {"allow": true, "reason": "meshed destination"} if {
	not input.destination.external
}

decision := {"allow": true, "reason": sprintf("external host %s is on the allow list", [input.destination.host])} if {
	input.destination.external
	some pattern in allowed_external
	glob.match(pattern, ["."], input.destination.host)
}

decision := {"allow": false, "reason": sprintf("external host %s is not on the allow list", [input.destination.host])} if {
	input.destination.external
	every pattern in allowed_external {
		not glob.match(pattern, ["."], input.destination.host)
	}
}
