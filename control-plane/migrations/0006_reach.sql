-- How callers reach each workload through the mesh (mandate_wire::Reach as JSON): the addresses
-- they call it by, where its sidecar accepts mTLS, HTTP or TCP. Workloads registered before it
-- existed are reachable by --route only.
ALTER TABLE workloads ADD COLUMN reach TEXT NOT NULL DEFAULT '{}';
