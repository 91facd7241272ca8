//! Decision ingest (idempotent by decision_id, batched, appended to the audit hash chain) and the
//! audit query.

use std::collections::HashSet;
use std::fmt::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::backend::{BeginWrite as _, Pool, on_pool};
use super::select::{Arg, Select, bind_all};
use super::{DecisionQuery, DecisionRecord, IngestResult, Store, StoreError};

/// Columns bound per decision row.
const COLUMNS_PER_ROW: usize = 15;

/// Rows per INSERT statement: 15 × 1,000 = 15,000 parameters, under SQLite's 32,766 (and
/// PostgreSQL's 65,535), and large enough that per-statement costs vanish.
const ROWS_PER_STATEMENT: usize = 1_000;
const _: () = assert!(ROWS_PER_STATEMENT * COLUMNS_PER_ROW <= 32_766);

/// A decision flattened into its columns.
struct Row {
    decision_id: String,
    ts: String,
    ts_ms: i64,
    source: String,
    subject: Option<String>,
    grant_id: Option<String>,
    tool: Option<String>,
    allow: i64,
    approval_id: Option<String>,
    approved_by: Option<String>,
    /// The record's canonical JSON (sorted keys, no whitespace), as stored and hashed.
    record: String,
}

impl Row {
    fn new(record: &DecisionRecord, received_ms: i64) -> Result<Self, StoreError> {
        Ok(Self {
            decision_id: record.decision_id.clone(),
            ts: record.timestamp.clone(),
            // A record whose time does not parse is still kept (losing an audit record is worse);
            // it is filed under the time it arrived.
            ts_ms: unix_ms(&record.timestamp).unwrap_or(received_ms),
            source: record.source.clone(),
            subject: record.delegation.as_ref().map(|d| d.subject.clone()),
            grant_id: record.delegation.as_ref().map(|d| d.grant_id.clone()),
            tool: record
                .mcp
                .as_ref()
                .filter(|m| m.method.as_deref() == Some("tools/call"))
                .and_then(|m| m.name.clone()),
            allow: i64::from(record.allow),
            approval_id: record.approval.as_ref().map(|a| a.id.clone()),
            approved_by: record.approval.as_ref().map(|a| a.approved_by.clone()),
            record: crate::audit::canonical(&serde_json::to_value(record).map_err(|e| {
                StoreError::Invalid {
                    what: format!("decision {}", record.decision_id),
                    why: e.to_string(),
                }
            })?),
        })
    }
}

/// The filter columns of a stored decision row, as read back for verification.
pub(super) struct StoredColumns {
    pub ts: String,
    pub ts_ms: i64,
    pub source: String,
    pub subject: Option<String>,
    pub grant_id: Option<String>,
    pub tool: Option<String>,
    pub allow: i64,
    pub approval_id: Option<String>,
    pub approved_by: Option<String>,
}

/// The first filter column of a stored row that is not what ingest copied out of its record.
pub(super) fn altered_column(
    record: &DecisionRecord,
    stored: &StoredColumns,
) -> Option<&'static str> {
    let row = Row::new(record, stored.ts_ms).ok()?;
    [
        ("ts", row.ts == stored.ts),
        ("ts_ms", row.ts_ms == stored.ts_ms),
        ("source", row.source == stored.source),
        ("subject", row.subject == stored.subject),
        ("grant_id", row.grant_id == stored.grant_id),
        ("tool", row.tool == stored.tool),
        ("allow", row.allow == stored.allow),
        ("approval_id", row.approval_id == stored.approval_id),
        ("approved_by", row.approved_by == stored.approved_by),
    ]
    .into_iter()
    .find_map(|(column, same)| (!same).then_some(column))
}

fn unix_ms(rfc3339: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(rfc3339, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

fn parse_bound(name: &str, value: &str) -> Result<i64, StoreError> {
    unix_ms(value).ok_or_else(|| StoreError::Invalid {
        what: name.into(),
        why: format!("{value:?} is not an RFC 3339 time (e.g. 2025-01-31T12:00:00Z)"),
    })
}

/// How an INSERT numbers its parameters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Placeholders {
    /// `$1, $2, …` (PostgreSQL).
    Numbered,
    /// `?, ?, …` (SQLite). sqlx binds a named (`$n`) SQLite parameter by asking SQLite for its
    /// name, a linear scan: quadratic over a 9,000-parameter statement, and slower than the insert.
    Anonymous,
}

/// `INSERT … VALUES (…), (…)` for `rows` rows (all new: ingest checked first, under the chain
/// head's lock, which ids are stored already).
fn insert_sql(rows: usize, placeholders: Placeholders) -> String {
    let mut sql = String::with_capacity(200 + rows * 100);
    sql.push_str(
        "INSERT INTO decisions (decision_id, ts, ts_ms, source, subject, grant_id, tool, allow, \
         approval_id, approved_by, reported_by, record, seq, prev_hash, hash) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push('(');
        for column in 0..COLUMNS_PER_ROW {
            if column > 0 {
                sql.push(',');
            }
            match placeholders {
                Placeholders::Numbered => {
                    let _ = write!(sql, "${}", row * COLUMNS_PER_ROW + column + 1);
                }
                Placeholders::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// `SELECT decision_id FROM decisions WHERE decision_id IN (…)` for `ids` ids.
fn existing_sql(ids: usize, placeholders: Placeholders) -> String {
    let mut sql = String::with_capacity(64 + ids * 6);
    sql.push_str("SELECT decision_id FROM decisions WHERE decision_id IN (");
    for i in 0..ids {
        if i > 0 {
            sql.push(',');
        }
        match placeholders {
            Placeholders::Numbered => {
                let _ = write!(sql, "${}", i + 1);
            }
            Placeholders::Anonymous => sql.push('?'),
        }
    }
    sql.push(')');
    sql
}

/// Reading the chain head in a write transaction: PostgreSQL locks the row (replicas append one
/// at a time); SQLite's BEGIN IMMEDIATE already holds the database's only write lock.
pub(super) fn head_sql(postgres: bool) -> &'static str {
    if postgres {
        "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT seq, hash FROM audit_head WHERE id = 1"
    }
}

/// A row's place in the chain.
struct Link {
    seq: i64,
    prev_hash: String,
    hash: String,
}

impl Store {
    /// Stores decisions reported by the sidecar `reported_by` (its SPIFFE ID), all or none, in one
    /// transaction; ids already stored (or repeated in the batch) count as duplicates. This is
    /// also the ingest micro-benchmark's entry point.
    pub async fn insert_decisions(
        &self,
        reported_by: &str,
        records: &[DecisionRecord],
    ) -> Result<IngestResult, StoreError> {
        if records.is_empty() {
            return Ok(IngestResult {
                accepted: 0,
                duplicates: 0,
            });
        }
        let received_ms = unix_ms_now();
        let rows = records
            .iter()
            .map(|r| Row::new(r, received_ms))
            .collect::<Result<Vec<_>, _>>()?;
        let placeholders = match self.inner.pool {
            Pool::Sqlite(_) => Placeholders::Anonymous,
            Pool::Postgres(_) => Placeholders::Numbered,
        };
        let head = head_sql(placeholders == Placeholders::Numbered);
        let accepted = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (mut seq, mut hash): (i64, String) = sqlx::query_as(head).fetch_one(&mut *tx).await?;
            // Under the head's lock no other ingest can store these ids before we commit.
            let mut stored: HashSet<String> = HashSet::new();
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let sql = existing_sql(chunk.len(), placeholders);
                let mut query = sqlx::query_scalar::<_, String>(&sql);
                for row in chunk {
                    query = query.bind(&row.decision_id);
                }
                stored.extend(query.fetch_all(&mut *tx).await?);
            }
            let mut fresh = Vec::with_capacity(rows.len());
            for row in &rows {
                // The first of repeated ids in a batch wins; stored ids are duplicates.
                if stored.insert(row.decision_id.clone()) {
                    seq += 1;
                    let seq_u = u64::try_from(seq).unwrap_or_default();
                    let next = crate::audit::chain_hash(
                        &hash,
                        &crate::audit::canonical_entry_raw(seq_u, &row.decision_id, reported_by, &row.record),
                    );
                    let prev_hash = std::mem::replace(&mut hash, next.clone());
                    fresh.push((row, Link { seq, prev_hash, hash: next }));
                }
            }
            for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
                let sql = insert_sql(chunk.len(), placeholders);
                let mut query = sqlx::query(&sql);
                for (row, link) in chunk {
                    query = query
                        .bind(&row.decision_id)
                        .bind(&row.ts)
                        .bind(row.ts_ms)
                        .bind(&row.source)
                        .bind(&row.subject)
                        .bind(&row.grant_id)
                        .bind(&row.tool)
                        .bind(row.allow)
                        .bind(&row.approval_id)
                        .bind(&row.approved_by)
                        .bind(reported_by)
                        .bind(&row.record)
                        .bind(link.seq)
                        .bind(&link.prev_hash)
                        .bind(&link.hash);
                }
                query.execute(&mut *tx).await?;
            }
            if !fresh.is_empty() {
                sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                    .bind(seq)
                    .bind(&hash)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            fresh.len() as u64
        });
        Ok(IngestResult {
            accepted,
            duplicates: records.len() as u64 - accepted,
        })
    }

    /// Decisions matching every given filter, newest first, at most `q.limit`.
    pub async fn decisions(&self, q: &DecisionQuery) -> Result<Vec<DecisionRecord>, StoreError> {
        let mut select = Select::new("SELECT decision_id, record FROM decisions");
        if let Some(source) = &q.source {
            select.filter("source", "=", Arg::Text(source.clone()));
        }
        if let Some(subject) = &q.subject {
            select.filter("subject", "=", Arg::Text(subject.clone()));
        }
        if let Some(tool) = &q.tool {
            select.filter("tool", "=", Arg::Text(tool.clone()));
        }
        if let Some(grant) = &q.grant {
            select.filter("grant_id", "=", Arg::Text(grant.clone()));
        }
        if let Some(approver) = &q.approver {
            select.filter("approved_by", "=", Arg::Text(approver.clone()));
        }
        if let Some(allow) = q.allow {
            select.filter("allow", "=", Arg::Int(i64::from(allow)));
        }
        if let Some(since) = &q.since {
            select.filter("ts_ms", ">=", Arg::Int(parse_bound("since", since)?));
        }
        if let Some(until) = &q.until {
            select.filter("ts_ms", "<", Arg::Int(parse_bound("until", until)?));
        }
        let (sql, args) = select.finish("ts_ms DESC, decision_id DESC", q.limit);
        let rows: Vec<(String, String)> = on_pool!(self, pool => {
            bind_all!(sqlx::query_as(&sql), &args).fetch_all(pool).await?
        });
        rows.into_iter()
            .map(|(id, record)| {
                serde_json::from_str(&record)
                    .map_err(|e| StoreError::Corrupt(format!("decision {id}: {e}")))
            })
            .collect()
    }
}

fn unix_ms_now() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_sql_numbers_every_parameter_once() {
        let sql = insert_sql(2, Placeholders::Numbered);
        assert!(
            sql.ends_with(
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15),\
                 ($16,$17,$18,$19,$20,$21,$22,$23,$24,$25,$26,$27,$28,$29,$30)"
            ),
            "{sql}"
        );
        let sql = insert_sql(2, Placeholders::Anonymous);
        assert!(
            sql.ends_with("VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?),(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"),
            "{sql}"
        );
        assert!(
            existing_sql(3, Placeholders::Numbered).ends_with("IN ($1,$2,$3)")
                && existing_sql(2, Placeholders::Anonymous).ends_with("IN (?,?)")
        );
    }

    #[test]
    fn rfc3339_times_become_unix_milliseconds() {
        assert_eq!(unix_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(unix_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(unix_ms("yesterday"), None);
    }
}
