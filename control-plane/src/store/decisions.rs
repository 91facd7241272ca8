//! Decision ingest (idempotent by decision_id, batched) and the audit query.

use std::fmt::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::backend::{BeginWrite as _, Pool, on_pool};
use super::{DecisionQuery, DecisionRecord, IngestResult, Store, StoreError};

/// Columns bound per decision row.
const COLUMNS_PER_ROW: usize = 12;

/// Rows per INSERT statement: 12 × 1,000 = 12,000 parameters, under SQLite's 32,766 (and
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
            record: serde_json::to_string(record).map_err(|e| StoreError::Invalid {
                what: format!("decision {}", record.decision_id),
                why: e.to_string(),
            })?,
        })
    }
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

/// `INSERT … VALUES (…), (…) ON CONFLICT (decision_id) DO NOTHING` for `rows` rows.
fn insert_sql(rows: usize, placeholders: Placeholders) -> String {
    let mut sql = String::with_capacity(180 + rows * 80);
    sql.push_str(
        "INSERT INTO decisions (decision_id, ts, ts_ms, source, subject, grant_id, tool, allow, \
         approval_id, approved_by, reported_by, record) VALUES ",
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
    sql.push_str(" ON CONFLICT (decision_id) DO NOTHING");
    sql
}

/// A bound value of a decision query.
enum Arg {
    Text(String),
    Int(i64),
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
        let accepted = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut accepted = 0u64;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let sql = insert_sql(chunk.len(), placeholders);
                let mut query = sqlx::query(&sql);
                for row in chunk {
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
                        .bind(&row.record);
                }
                accepted += query.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            accepted
        });
        Ok(IngestResult {
            accepted,
            duplicates: records.len() as u64 - accepted,
        })
    }

    /// Decisions matching every given filter, newest first, at most `q.limit`.
    pub async fn decisions(&self, q: &DecisionQuery) -> Result<Vec<DecisionRecord>, StoreError> {
        let mut filters = Vec::new();
        let mut args = Vec::new();
        let mut filter = |column: &str, op: &str, arg: Arg| {
            args.push(arg);
            filters.push(format!("{column} {op} ${}", args.len()));
        };
        if let Some(source) = &q.source {
            filter("source", "=", Arg::Text(source.clone()));
        }
        if let Some(subject) = &q.subject {
            filter("subject", "=", Arg::Text(subject.clone()));
        }
        if let Some(tool) = &q.tool {
            filter("tool", "=", Arg::Text(tool.clone()));
        }
        if let Some(grant) = &q.grant {
            filter("grant_id", "=", Arg::Text(grant.clone()));
        }
        if let Some(approver) = &q.approver {
            filter("approved_by", "=", Arg::Text(approver.clone()));
        }
        if let Some(allow) = q.allow {
            filter("allow", "=", Arg::Int(i64::from(allow)));
        }
        if let Some(since) = &q.since {
            filter("ts_ms", ">=", Arg::Int(parse_bound("since", since)?));
        }
        if let Some(until) = &q.until {
            filter("ts_ms", "<", Arg::Int(parse_bound("until", until)?));
        }
        let mut sql = String::from("SELECT decision_id, record FROM decisions");
        if !filters.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&filters.join(" AND "));
        }
        args.push(Arg::Int(i64::from(q.limit)));
        let _ = write!(
            sql,
            " ORDER BY ts_ms DESC, decision_id DESC LIMIT ${}",
            args.len()
        );
        let rows: Vec<(String, String)> = on_pool!(self, pool => {
            let mut query = sqlx::query_as(&sql);
            for arg in &args {
                query = match arg {
                    Arg::Text(text) => query.bind(text),
                    Arg::Int(int) => query.bind(int),
                };
            }
            query.fetch_all(pool).await?
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
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12),\
                 ($13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24) \
                 ON CONFLICT (decision_id) DO NOTHING"
            ),
            "{sql}"
        );
        let sql = insert_sql(2, Placeholders::Anonymous);
        assert!(
            sql.ends_with(
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?),(?,?,?,?,?,?,?,?,?,?,?,?) \
                 ON CONFLICT (decision_id) DO NOTHING"
            ),
            "{sql}"
        );
    }

    #[test]
    fn rfc3339_times_become_unix_milliseconds() {
        assert_eq!(unix_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(unix_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(unix_ms("yesterday"), None);
    }
}
