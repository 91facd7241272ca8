//! The audit chain in the store: its head, reading records and checkpoints in chain order,
//! storing checkpoints, and chaining the decisions stored before the chain existed.

use serde_json::Value;

use super::backend::{BeginWrite as _, Pool, on_pool};
use super::decisions::{StoredColumns, altered_column, head_sql};
use super::{Store, StoreError};
use crate::audit::{ChainedRecord, Checkpoint, canonical_entry, chain_hash};

/// The chain's last record: its seq (0 when empty) and hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    /// The last seq.
    pub seq: u64,
    /// Its hash (64 `0`s when the chain is empty).
    pub hash: String,
}

type RecordRow = (i64, String, String, Option<String>, Option<String>, String);

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    fn is_postgres(&self) -> bool {
        matches!(self.inner.pool, Pool::Postgres(_))
    }

    /// The chain head.
    pub async fn audit_head(&self) -> Result<ChainHead, StoreError> {
        let (seq, hash): (i64, String) = on_pool!(self, pool => {
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        Ok(ChainHead {
            seq: to_u64(seq),
            hash,
        })
    }

    /// At most `limit` chained records from seq `from` on, in seq order, as stored: a column
    /// emptied by hand reads as an empty string, a record that is no longer JSON as a JSON string
    /// of its text (either way, its hash no longer matches).
    pub async fn audit_records(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<ChainedRecord>, StoreError> {
        let rows: Vec<RecordRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT seq, decision_id, reported_by, prev_hash, hash, record FROM decisions \
                 WHERE seq >= $1 ORDER BY seq LIMIT $2",
            )
            .bind(to_i64(from))
            .bind(to_i64(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(seq, decision_id, reported_by, prev_hash, hash, record)| ChainedRecord {
                    seq: to_u64(seq),
                    decision_id,
                    reported_by,
                    prev_hash: prev_hash.unwrap_or_default(),
                    hash: hash.unwrap_or_default(),
                    record: serde_json::from_str(&record).unwrap_or(Value::String(record)),
                },
            )
            .collect())
    }

    /// The checkpoints with `from <= seq < until`, in seq order.
    pub async fn audit_checkpoints(
        &self,
        from: u64,
        until: u64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows: Vec<(i64, String, String, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT seq, hash, created_at, signature FROM audit_checkpoints \
                 WHERE seq >= $1 AND seq < $2 ORDER BY seq",
            )
            .bind(to_i64(from))
            .bind(to_i64(until))
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(seq, hash, created_at, signature)| Checkpoint {
                seq: to_u64(seq),
                hash,
                created_at,
                signature,
            })
            .collect())
    }

    /// The newest checkpoint.
    pub async fn last_audit_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let row: Option<(i64, String, String, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT seq, hash, created_at, signature FROM audit_checkpoints \
                 ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|(seq, hash, created_at, signature)| Checkpoint {
            seq: to_u64(seq),
            hash,
            created_at,
            signature,
        }))
    }

    /// Stores a checkpoint (another replica's of the same seq wins quietly).
    pub async fn insert_audit_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO audit_checkpoints (seq, hash, created_at, signature) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING",
            )
            .bind(to_i64(c.seq))
            .bind(&c.hash)
            .bind(&c.created_at)
            .bind(&c.signature)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// A decision stored without a place in the chain (put there by hand), if any.
    pub async fn unchained_decision(&self) -> Result<Option<String>, StoreError> {
        Ok(on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT decision_id FROM decisions WHERE seq IS NULL \
                 ORDER BY ts_ms, decision_id LIMIT 1",
            )
            .fetch_optional(pool)
            .await?
        }))
    }

    /// The first chained decision (by seq) whose filter columns (time, source, subject, grant,
    /// tool, allow, approval) no longer say what its record says: `(seq, decision_id, column)`.
    /// The chain covers the record; this covers the copies `mandate audit query` filters on.
    pub async fn altered_decision_column(
        &self,
    ) -> Result<Option<(u64, String, &'static str)>, StoreError> {
        type ColumnRow = (
            i64,
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            Option<String>,
            Option<String>,
            String,
        );
        let mut from = 1i64;
        loop {
            let rows: Vec<ColumnRow> = on_pool!(self, pool => {
                sqlx::query_as(
                    "SELECT seq, decision_id, ts, ts_ms, source, subject, grant_id, tool, allow, \
                     approval_id, approved_by, record FROM decisions WHERE seq >= $1 \
                     ORDER BY seq LIMIT 5000",
                )
                .bind(from)
                .fetch_all(pool)
                .await?
            });
            let Some(last) = rows.last().map(|r| r.0) else {
                return Ok(None);
            };
            for (
                seq,
                id,
                ts,
                ts_ms,
                source,
                subject,
                grant_id,
                tool,
                allow,
                approval_id,
                approved_by,
                record,
            ) in rows
            {
                let Ok(record) = serde_json::from_str::<mandate_wire::DecisionRecord>(&record)
                else {
                    continue;
                };
                let stored = StoredColumns {
                    ts,
                    ts_ms,
                    source,
                    subject,
                    grant_id,
                    tool,
                    allow,
                    approval_id,
                    approved_by,
                };
                if let Some(column) = altered_column(&record, &stored) {
                    return Ok(Some((to_u64(seq), id, column)));
                }
            }
            from = last + 1;
        }
    }

    /// The first seq of a decision taken at or after `since_ms` (unix milliseconds).
    pub async fn first_audit_seq_since(&self, since_ms: i64) -> Result<Option<u64>, StoreError> {
        let seq: Option<i64> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT MIN(seq) FROM decisions WHERE ts_ms >= $1")
                .bind(since_ms)
                .fetch_one(pool)
                .await?
        });
        Ok(seq.map(to_u64))
    }

    /// Chains the decisions stored before migration 0005, once (in `(ts_ms, decision_id)`
    /// order), and marks the chain backfilled; afterwards this does nothing, so a row put in by
    /// hand is never taken into the chain. Called by [`Store::open`].
    pub(super) async fn backfill_audit_chain(&self) -> Result<u64, StoreError> {
        let head = head_sql(self.is_postgres());
        Ok(on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (mut seq, mut hash): (i64, String) = sqlx::query_as(head).fetch_one(&mut *tx).await?;
            let done: i64 = sqlx::query_scalar("SELECT backfilled FROM audit_head WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
            if done != 0 {
                return Ok(0);
            }
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT decision_id, reported_by, record FROM decisions WHERE seq IS NULL \
                 ORDER BY ts_ms, decision_id",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (decision_id, reported_by, record) in &rows {
                let value: Value = serde_json::from_str(record)
                    .map_err(|e| StoreError::Corrupt(format!("decision {decision_id}: {e}")))?;
                seq += 1;
                let next = chain_hash(
                    &hash,
                    &canonical_entry(to_u64(seq), decision_id, reported_by, &value),
                );
                sqlx::query("UPDATE decisions SET seq = $1, prev_hash = $2, hash = $3 WHERE decision_id = $4")
                    .bind(seq)
                    .bind(&hash)
                    .bind(&next)
                    .bind(decision_id)
                    .execute(&mut *tx)
                    .await?;
                hash = next;
            }
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, backfilled = 1 WHERE id = 1")
                .bind(seq)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            rows.len() as u64
        }))
    }
}
