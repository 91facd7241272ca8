-- Delegation: grants (a person's consent for an agent to act for them) and the keys that sign
-- delegation tokens.

-- One row per grant. agent is the agent's name, agent_id its SPIFFE ID; scopes is a JSON array
-- of scope objects, constraints a JSON object or NULL. status moves active -> revoked (by an
-- operator) or active -> closed (its task was closed); both are final. Times are unix
-- milliseconds; an active grant whose expires_at has passed is expired (nothing rewrites it).
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    agent_id TEXT NOT NULL REFERENCES workloads (spiffe_id),
    subject TEXT NOT NULL,
    scopes TEXT NOT NULL,
    constraints TEXT,
    purpose TEXT NOT NULL,
    task TEXT,
    approved_by TEXT NOT NULL,
    approved_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'closed')),
    revoked_at BIGINT,
    revoked_by TEXT
);
-- Listing newest first (ids are UUIDv7: time-ordered), by agent, subject or task; and the revoked
-- grants that have not expired yet, which the push stream carries.
CREATE INDEX grants_created ON grants (created_at, id);
CREATE INDEX grants_agent ON grants (agent, created_at, id);
CREATE INDEX grants_subject ON grants (subject, created_at, id);
CREATE INDEX grants_task ON grants (task, status);
CREATE INDEX grants_status_expires ON grants (status, expires_at);

-- Delegation token signing keys (ES256, P-256). key_sealed is the PKCS#8 private key sealed with
-- the store key (AES-256-GCM, like the CA key); public_jwk the JWK published to sidecars. The
-- newest signs; older ones stay published while tokens they signed may still be valid.
CREATE TABLE delegation_keys (
    kid TEXT PRIMARY KEY,
    public_jwk TEXT NOT NULL,
    key_sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX delegation_keys_created ON delegation_keys (created_at, kid);

-- The delegation revision: bumped, in the writing transaction, when a key is created or a grant
-- revoked or closed; sidecars resume their stream from it.
ALTER TABLE state ADD COLUMN delegation_revision BIGINT NOT NULL DEFAULT 0;
