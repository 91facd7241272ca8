-- Per-action approvals, and the decision columns that let the audit log be searched by grant and
-- by approver.

-- One row per call a policy held for a person's approval. The sidecar of `agent` (its SPIFFE ID)
-- asked; the call is identified by `fingerprint` (hex SHA-256 of the call's parts, computed by the
-- sidecar) and described by `action`. status moves pending -> approved | rejected, and approved ->
-- used when the retried call redeems it (once). Times are unix milliseconds; a pending or
-- approved row whose expires_at has passed is expired (nothing rewrites it).
CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    subject TEXT,
    grant_id TEXT,
    policy_version TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'used')),
    requested_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    decided_by TEXT,
    decided_at BIGINT,
    used_at BIGINT
);
-- Listing by status, newest first (ids are UUIDv7: time-ordered).
CREATE INDEX approvals_status ON approvals (status, requested_at, id);
CREATE INDEX approvals_requested ON approvals (requested_at, id);

-- Decisions: the grant the delegation came from, and the approval the call redeemed (NULL when
-- none), copied out of the record like subject. Rows stored before this migration keep NULL.
ALTER TABLE decisions ADD COLUMN grant_id TEXT;
ALTER TABLE decisions ADD COLUMN approval_id TEXT;
ALTER TABLE decisions ADD COLUMN approved_by TEXT;
CREATE INDEX decisions_grant_ts ON decisions (grant_id, ts_ms, decision_id);
CREATE INDEX decisions_approver_ts ON decisions (approved_by, ts_ms, decision_id);
