-- The tamper-evident audit log: every decision gets a gap-free sequence number and a hash chained
-- to the previous record's (see control-plane/src/audit.rs and docs/control-plane.md), and the
-- control plane signs checkpoints of the chain.
--
-- Decisions stored before this migration have no seq yet: SQL cannot compute SHA-256 on SQLite,
-- so the control plane chains them at start-up, once (audit_head.backfilled), in (ts_ms,
-- decision_id) order, before it serves. After that, a row without a seq was put there by hand.
ALTER TABLE decisions ADD COLUMN seq BIGINT;
ALTER TABLE decisions ADD COLUMN prev_hash TEXT;
ALTER TABLE decisions ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX decisions_seq ON decisions (seq);

-- The chain's head: the last seq and its hash. Every append reads it first (PostgreSQL: SELECT …
-- FOR UPDATE) and moves it in the same transaction, which serialises appends across replicas.
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    backfilled BIGINT NOT NULL
);
INSERT INTO audit_head (id, seq, hash, backfilled)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0);

-- Checkpoints signed by the control plane's CA key: record `seq` of the chain has hash `hash`.
CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    signature TEXT NOT NULL
);
