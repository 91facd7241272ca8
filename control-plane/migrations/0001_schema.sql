-- The control plane's schema, one text for SQLite and PostgreSQL: only TEXT and BIGINT columns,
-- booleans as 0/1, timestamps as RFC 3339 text (plus unix milliseconds where ranges are queried),
-- JSON as text.

-- The CA: one row. key_sealed is ciphertext (AES-256-GCM under the store key), opaque here.
CREATE TABLE ca (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_sealed TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- Agents and services. (kind, name) is how operators name them; spiffe_id is how certificates do.
CREATE TABLE workloads (
    kind TEXT NOT NULL CHECK (kind IN ('agent', 'service')),
    name TEXT NOT NULL,
    spiffe_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    description TEXT NOT NULL,
    ceiling TEXT NOT NULL,
    labels TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);

-- Join tokens: only the hash of the secret is kept. used_at and expires_at are unix seconds.
CREATE TABLE join_tokens (
    secret_hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL REFERENCES workloads (spiffe_id),
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX join_tokens_spiffe_id ON join_tokens (spiffe_id);

-- Signed policy bundles; modules is a JSON object (file name -> Rego text), data the signed JSON text.
CREATE TABLE bundles (
    version BIGINT PRIMARY KEY,
    digest TEXT NOT NULL,
    modules TEXT NOT NULL,
    data TEXT NOT NULL,
    signature TEXT NOT NULL,
    message TEXT NOT NULL,
    tests_passed BIGINT NOT NULL,
    created_at TEXT NOT NULL
);

-- Singletons: the registry revision (bumped by every registry change, in its transaction) and the
-- active bundle. Writers that assign versions update this row first, which serialises them.
CREATE TABLE state (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    registry_revision BIGINT NOT NULL,
    active_bundle_version BIGINT REFERENCES bundles (version)
);
INSERT INTO state (id, registry_revision, active_bundle_version) VALUES (1, 0, NULL);

-- Decisions as sidecars report them. The filter columns are copied out of the record (the full
-- record is kept as JSON text); ts_ms (unix milliseconds) serves the time ranges and the ordering.
CREATE TABLE decisions (
    decision_id TEXT PRIMARY KEY,
    ts TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    source TEXT NOT NULL,
    subject TEXT,
    tool TEXT,
    allow BIGINT NOT NULL,
    reported_by TEXT NOT NULL,
    record TEXT NOT NULL
);
-- Every query orders newest first; each filter gets an index that already has that order.
CREATE INDEX decisions_ts ON decisions (ts_ms, decision_id);
CREATE INDEX decisions_source_ts ON decisions (source, ts_ms, decision_id);
CREATE INDEX decisions_subject_ts ON decisions (subject, ts_ms, decision_id);
CREATE INDEX decisions_tool_ts ON decisions (tool, ts_ms, decision_id);
