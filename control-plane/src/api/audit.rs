//! The audit chain over HTTP (admin): its records and checkpoints in chain order (`mandate audit
//! export` and `tail`), and the verification of the whole chain (`mandate audit verify`).

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::{Admin, QueryParams};
use super::{AppState, Routes, parse_rfc3339};
use crate::audit::{Breakage, Entry, Failure, TrustKeys, Verifier};
use crate::store::{ChainHead, Store};

/// Default number of records a page holds.
pub const DEFAULT_AUDIT_PAGE: u32 = 1_000;
/// Most records a page holds.
pub const MAX_AUDIT_PAGE: u32 = 10_000;
/// Records read at a time while verifying.
const VERIFY_PAGE: u64 = 5_000;

/// Adds the audit chain routes to the router.
pub(super) fn add_routes(r: Routes) -> Routes {
    r.add(Method::GET, "/v1/audit/records", get(records)).add(
        Method::GET,
        "/v1/audit/verify",
        get(verify),
    )
}

/// `GET /v1/audit/records` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordParams {
    /// The first seq (default 1).
    pub from_seq: Option<u64>,
    /// RFC 3339: start at the first record of a decision taken at or after this time (when
    /// `from_seq` is not given).
    pub since: Option<String>,
    /// At most this many records (default 1000, at most 10000).
    pub limit: Option<u32>,
}

/// `GET /v1/audit/records`: records in seq order, each checkpoint right after the record it covers.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditPage {
    /// Records and checkpoints.
    pub entries: Vec<Entry>,
    /// Where the next page starts (`from_seq`).
    pub next_seq: u64,
    /// The chain head when the page was read.
    pub head: ChainHead,
}

/// `GET /v1/audit/verify`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Whether the whole chain verified.
    pub ok: bool,
    /// Records verified (up to the failure, if any).
    pub records: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// The chain head.
    pub head: ChainHead,
    /// What was verified, or where the chain breaks, in words.
    pub summary: String,
    /// The first break, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

async fn records(
    _: Admin,
    State(s): State<AppState>,
    QueryParams(p): QueryParams<RecordParams>,
) -> Result<Json<AuditPage>, HttpError> {
    let limit = p.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(HttpError::invalid(
            "limit",
            format!("limit must be 1-{MAX_AUDIT_PAGE}"),
        ));
    }
    let head = s.store.audit_head().await?;
    let from = match (p.from_seq, &p.since) {
        (Some(0), _) => return Err(HttpError::invalid("from_seq", "from_seq starts at 1")),
        (Some(seq), _) => seq,
        (None, Some(since)) => {
            let t = parse_rfc3339(since).ok_or_else(|| {
                HttpError::invalid(
                    "since",
                    "since must be an RFC 3339 time such as 2026-01-02T15:04:05Z",
                )
            })?;
            let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
            s.store
                .first_audit_seq_since(ms)
                .await?
                .unwrap_or(head.seq + 1)
        }
        (None, None) => 1,
    };
    let (entries, next_seq) = page(&s.store, from, u64::from(limit)).await?;
    Ok(Json(AuditPage {
        entries,
        next_seq,
        head,
    }))
}

/// Up to `limit` records from `from` with their checkpoints interleaved, and where the next page
/// starts. The last page (no records) carries the checkpoints past the last record, if any.
async fn page(store: &Store, from: u64, limit: u64) -> Result<(Vec<Entry>, u64), HttpError> {
    let records = store.audit_records(from, limit).await?;
    let until = records.last().map_or(u64::MAX, |r| r.seq + 1);
    let mut checkpoints = store
        .audit_checkpoints(from, until.min(i64::MAX as u64))
        .await?
        .into_iter()
        .peekable();
    let next_seq = if records.is_empty() { from } else { until };
    let mut entries = Vec::with_capacity(records.len() + 1);
    for record in records {
        // A checkpoint whose record is missing comes before the next record present.
        while let Some(c) = checkpoints.next_if(|c| c.seq < record.seq) {
            entries.push(Entry::Checkpoint(c));
        }
        let seq = record.seq;
        entries.push(Entry::Record(record));
        while let Some(c) = checkpoints.next_if(|c| c.seq == seq) {
            entries.push(Entry::Checkpoint(c));
        }
    }
    entries.extend(checkpoints.map(Entry::Checkpoint));
    Ok((entries, next_seq))
}

async fn verify(_: Admin, State(s): State<AppState>) -> Result<Json<VerifyReport>, HttpError> {
    let keys = TrustKeys::from_pem(s.ca.cert_pem())
        .map_err(|e| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(verify_store(&s.store, keys).await?))
}

/// Walks the stored chain from seq 1 and reports the first break.
pub async fn verify_store(store: &Store, keys: TrustKeys) -> Result<VerifyReport, HttpError> {
    let head_before = store.audit_head().await?;
    let mut v = Verifier::new(keys);
    let mut from = 1;
    let mut failure = None;
    loop {
        let (entries, next) = page(store, from, VERIFY_PAGE).await?;
        if let Some(f) = entries.iter().find_map(|e| v.entry(e).err()) {
            failure = Some(beyond_head(store, f).await?);
            break;
        }
        if next == from {
            break;
        }
        from = next;
    }
    if failure.is_none() {
        failure = trailing_failure(store, &v, &head_before).await?;
    }
    let head = store.audit_head().await?;
    let summary = match &failure {
        None => v.summary(),
        Some(f) => format!(
            "audit chain broken: {} ({} verified before it)",
            f.message,
            v.counts()
        ),
    };
    Ok(VerifyReport {
        ok: failure.is_none(),
        records: v.records,
        checkpoints: v.checkpoints,
        head,
        summary,
        failure,
    })
}

/// A broken record past the chain head was not appended by the control plane: say so.
async fn beyond_head(store: &Store, f: Failure) -> Result<Failure, HttpError> {
    let head = store.audit_head().await?;
    Ok(match (f.seq, &f.decision_id) {
        (Some(seq), Some(id)) if seq > head.seq && f.kind != Breakage::Removed => Failure {
            kind: Breakage::Inserted,
            message: format!(
                "record seq {seq} (decision {id}) lies beyond the chain head (seq {}): inserted",
                head.seq
            ),
            ..f
        },
        _ => f,
    })
}

/// What the walk cannot see: records missing at the end (the head was further), records beyond
/// the head, filter columns edited apart from their record, and decisions put in without a place
/// in the chain.
async fn trailing_failure(
    store: &Store,
    v: &Verifier,
    head_before: &ChainHead,
) -> Result<Option<Failure>, HttpError> {
    let last = v.last_seq();
    if last < head_before.seq {
        return Ok(Some(Failure {
            kind: Breakage::Removed,
            seq: Some(last + 1),
            decision_id: None,
            message: format!(
                "records seq {}-{} are missing (removed): the chain ends at seq {last}, its head is at seq {}",
                last + 1,
                head_before.seq,
                head_before.seq
            ),
        }));
    }
    // Appends committed during the walk moved the head on; anything beyond it now was not appended.
    let head = store.audit_head().await?;
    if last > head.seq
        && let Some(r) = store.audit_records(head.seq + 1, 1).await?.pop()
    {
        return Ok(Some(Failure {
            kind: Breakage::Inserted,
            seq: Some(r.seq),
            decision_id: Some(r.decision_id.clone()),
            message: format!(
                "record seq {} (decision {}) lies beyond the chain head (seq {}): inserted",
                r.seq, r.decision_id, head.seq
            ),
        }));
    }
    if let Some((seq, id, column)) = store.altered_decision_column().await? {
        return Ok(Some(Failure {
            kind: Breakage::Altered,
            seq: Some(seq),
            decision_id: Some(id.clone()),
            message: format!(
                "record seq {seq} (decision {id}): its {column} column no longer matches its hashed record (altered)"
            ),
        }));
    }
    if let Some(id) = store.unchained_decision().await? {
        return Ok(Some(Failure {
            kind: Breakage::Inserted,
            seq: None,
            decision_id: Some(id.clone()),
            message: format!("decision {id} is stored without a place in the chain: inserted"),
        }));
    }
    Ok(None)
}
