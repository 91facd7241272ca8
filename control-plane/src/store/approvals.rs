//! Per-action approvals: asked for by an agent's sidecar, approved or rejected by a person, and
//! redeemed once by the retried call. Every state change is one guarded UPDATE, so concurrent
//! deciders or redeemers (on one replica or several) cannot both succeed.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::backend::on_pool;
use super::{Store, StoreError};

/// The columns [`ApprovalRow`] decodes, in its order.
macro_rules! approval_columns {
    () => {
        "id, agent, decision_id, fingerprint, action, reason, subject, grant_id, policy_version, \
         status, requested_at, expires_at, decided_by, decided_at, used_at"
    };
}

type ApprovalRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

/// Where an approval stands, as the API shows it. The store keeps pending, approved, rejected
/// and used; a pending or approved approval whose time ran out is shown as expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    /// Waiting for a person to decide.
    Pending,
    /// Approved and not yet used: the retried call may redeem it.
    Approved,
    /// Refused by a person.
    Rejected,
    /// Redeemed by the call it was given for (once only).
    Used,
    /// Its time ran out before it was decided or used.
    Expired,
}

impl ApprovalStatus {
    /// The lowercase word used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Used => "used",
            Self::Expired => "expired",
        }
    }

    /// Parses the lowercase word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "approved" => Some(Self::Approved),
            "rejected" => Some(Self::Rejected),
            "used" => Some(Self::Used),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

impl fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sidecar asks approval for (validated by the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApproval {
    /// The asking agent's SPIFFE ID (the sidecar's SVID): only it may redeem the approval.
    pub agent: String,
    /// The decision that was held for approval.
    pub decision_id: String,
    /// Identifies the exact call (hex SHA-256, computed by the sidecar).
    pub fingerprint: String,
    /// The call in words, for the approver.
    pub action: String,
    /// Why the policy asks for approval.
    pub reason: String,
    /// The person on whose behalf, when delegated.
    pub subject: Option<String>,
    /// The grant the delegation came from.
    pub grant_id: Option<String>,
    /// The policy version that asked.
    pub policy_version: Option<String>,
}

/// A stored approval. Times are unix milliseconds in Rust and RFC 3339 in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// UUIDv7.
    pub id: String,
    /// The asking agent's SPIFFE ID.
    pub agent: String,
    /// The decision that was held for approval.
    pub decision_id: String,
    /// Identifies the exact call.
    pub fingerprint: String,
    /// The call in words.
    pub action: String,
    /// Why the policy asks for approval.
    pub reason: String,
    /// On whose behalf.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The policy version that asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// Where it stands (expired when its time ran out while pending or approved).
    pub status: ApprovalStatus,
    /// When it was asked for.
    #[serde(serialize_with = "rfc3339")]
    pub requested_at: i64,
    /// When it stops being decidable or redeemable.
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: i64,
    /// Who approved or rejected it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When it was approved or rejected.
    #[serde(
        serialize_with = "rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub decided_at: Option<i64>,
    /// When the call redeemed it.
    #[serde(
        serialize_with = "rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub used_at: Option<i64>,
}

/// Unix milliseconds as RFC 3339 UTC (to the millisecond).
pub fn ms_to_rfc3339(ms: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn rfc3339<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ms_to_rfc3339(*ms))
}

// serde hands `serialize_with` a reference to the field's type.
fn rfc3339_opt<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&ms_to_rfc3339(*ms)),
        None => s.serialize_none(),
    }
}

/// A person's decision on a pending approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the call through (once).
    Approve,
    /// Refuse it.
    Reject,
}

/// Why an approval could not be redeemed by a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalRefusal {
    /// Another agent asked for it.
    NotYours {
        /// The agent that asked.
        agent: String,
    },
    /// It was given for another call (the fingerprints differ).
    Mismatch,
    /// The call it was given for redeemed it already.
    AlreadyUsed,
    /// A person refused it.
    Rejected {
        /// Who.
        by: String,
    },
    /// Its time ran out.
    Expired {
        /// When (unix milliseconds).
        at: i64,
    },
    /// Nobody has decided yet.
    Pending,
}

impl ApprovalRefusal {
    /// A short stable word for the refusal: `not_yours`, `mismatch`, `used`, `rejected`,
    /// `expired`, `pending`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotYours { .. } => "not_yours",
            Self::Mismatch => "mismatch",
            Self::AlreadyUsed => "used",
            Self::Rejected { .. } => "rejected",
            Self::Expired { .. } => "expired",
            Self::Pending => "pending",
        }
    }

    /// What went wrong with approval `id`, in words for the agent and the operator.
    pub fn message(&self, id: &str) -> String {
        match self {
            Self::NotYours { .. } => {
                format!("approval {id} was asked for by another workload, not by this caller")
            }
            Self::Mismatch => format!(
                "approval {id} does not match this call: it was given for a different call \
                 (destination, tool, arguments or subject differ); ask for approval of this one"
            ),
            Self::AlreadyUsed => format!(
                "approval {id} was already used: an approval lets one call through; ask again"
            ),
            Self::Rejected { by } => format!("approval {id} was rejected by {by}"),
            Self::Expired { at } => format!(
                "approval {id} expired at {}; ask for approval again",
                ms_to_rfc3339(*at)
            ),
            Self::Pending => format!(
                "approval {id} is still pending: nobody has approved it yet \
                 (`mandate approve {id} --by WHO`); retry once it is approved"
            ),
        }
    }
}

fn approval_from_row(row: ApprovalRow, now_ms: i64) -> Result<Approval, StoreError> {
    let (
        id,
        agent,
        decision_id,
        fingerprint,
        action,
        reason,
        subject,
        grant_id,
        policy_version,
        status,
        requested_at,
        expires_at,
        decided_by,
        decided_at,
        used_at,
    ) = row;
    let stored = match ApprovalStatus::parse(&status) {
        Some(s) if s != ApprovalStatus::Expired => s,
        _ => {
            return Err(StoreError::Corrupt(format!(
                "approval {id}: status: unknown {status:?}"
            )));
        }
    };
    let status = match stored {
        ApprovalStatus::Pending | ApprovalStatus::Approved if expires_at <= now_ms => {
            ApprovalStatus::Expired
        }
        s => s,
    };
    Ok(Approval {
        id,
        agent,
        decision_id,
        fingerprint,
        action,
        reason,
        subject,
        grant_id,
        policy_version,
        status,
        requested_at,
        expires_at,
        decided_by,
        decided_at,
        used_at,
    })
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        what: format!("approval {id}"),
    }
}

/// The WHERE clause selecting approvals whose status (as shown) is `status`; `$1` is now.
fn status_filter(status: ApprovalStatus) -> &'static str {
    match status {
        ApprovalStatus::Pending => "status = 'pending' AND expires_at > $1",
        ApprovalStatus::Approved => "status = 'approved' AND expires_at > $1",
        ApprovalStatus::Expired => "status IN ('pending', 'approved') AND expires_at <= $1",
        ApprovalStatus::Rejected => "status = 'rejected' AND $1 = $1",
        ApprovalStatus::Used => "status = 'used' AND $1 = $1",
    }
}

impl Store {
    /// Stores a pending approval that expires `ttl_ms` after `now_ms`, under a new UUIDv7.
    pub async fn insert_approval(
        &self,
        a: &NewApproval,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Approval, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let expires_at = now_ms.saturating_add(ttl_ms);
        on_pool!(self, pool => {
            sqlx::query(concat!(
                "INSERT INTO approvals (", approval_columns!(), ") VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, NULL, NULL, NULL)"
            ))
            .bind(&id)
            .bind(&a.agent)
            .bind(&a.decision_id)
            .bind(&a.fingerprint)
            .bind(&a.action)
            .bind(&a.reason)
            .bind(&a.subject)
            .bind(&a.grant_id)
            .bind(&a.policy_version)
            .bind(now_ms)
            .bind(expires_at)
            .execute(pool)
            .await?;
        });
        Ok(Approval {
            id,
            agent: a.agent.clone(),
            decision_id: a.decision_id.clone(),
            fingerprint: a.fingerprint.clone(),
            action: a.action.clone(),
            reason: a.reason.clone(),
            subject: a.subject.clone(),
            grant_id: a.grant_id.clone(),
            policy_version: a.policy_version.clone(),
            status: ApprovalStatus::Pending,
            requested_at: now_ms,
            expires_at,
            decided_by: None,
            decided_at: None,
            used_at: None,
        })
    }

    /// One approval, its status as of `now_ms`; NotFound if there is none.
    pub async fn approval(&self, id: &str, now_ms: i64) -> Result<Approval, StoreError> {
        let row: Option<ApprovalRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!("SELECT ", approval_columns!(), " FROM approvals WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        match row {
            Some(row) => approval_from_row(row, now_ms),
            None => Err(not_found(id)),
        }
    }

    /// Approvals (with this status as of `now_ms`, or all), newest first, at most `limit`.
    pub async fn approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: u32,
        now_ms: i64,
    ) -> Result<Vec<Approval>, StoreError> {
        let filter = status.map_or("$1 = $1", status_filter);
        let sql = format!(
            concat!(
                "SELECT ",
                approval_columns!(),
                " FROM approvals WHERE {} ORDER BY requested_at DESC, id DESC LIMIT $2"
            ),
            filter
        );
        let rows: Vec<ApprovalRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|row| approval_from_row(row, now_ms))
            .collect()
    }

    /// Approves or rejects a pending, unexpired approval on behalf of `by`. Anything else is a
    /// Conflict saying where it stands; NotFound if there is no such approval.
    pub async fn decide_approval(
        &self,
        id: &str,
        verdict: Verdict,
        by: &str,
        now_ms: i64,
    ) -> Result<Approval, StoreError> {
        let new_status = match verdict {
            Verdict::Approve => "approved",
            Verdict::Reject => "rejected",
        };
        // The guard is in the UPDATE: of two people deciding at once, only one matches
        // `status = 'pending'`; the other is told what the first decided.
        let row: Option<ApprovalRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!(
                "UPDATE approvals SET status = $2, decided_by = $3, decided_at = $4 \
                 WHERE id = $1 AND status = 'pending' AND expires_at > $4 RETURNING ",
                approval_columns!()
            ))
            .bind(id)
            .bind(new_status)
            .bind(by)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?
        });
        if let Some(row) = row {
            return approval_from_row(row, now_ms);
        }
        let current = self.approval(id, now_ms).await?;
        let by = current.decided_by.as_deref().unwrap_or("someone");
        let why = match current.status {
            ApprovalStatus::Approved => format!("was already approved by {by}"),
            ApprovalStatus::Rejected => format!("was already rejected by {by}"),
            ApprovalStatus::Used => format!("was already approved by {by} and used"),
            ApprovalStatus::Expired => format!(
                "expired at {}; the agent must ask again",
                ms_to_rfc3339(current.expires_at)
            ),
            // Expired between the UPDATE and this read would show as Expired; a pending row that
            // did not match can only be a clock going backwards between the two.
            ApprovalStatus::Pending => "changed while being decided; try again".to_owned(),
        };
        Err(StoreError::Conflict {
            what: format!("approval {id}"),
            why,
        })
    }

    /// Redeems an approved approval for the call `fingerprint` by `agent`, once: the first
    /// redeemer gets the approval (now used), every other caller the reason it was refused.
    /// NotFound if there is no such approval.
    pub async fn redeem_approval(
        &self,
        id: &str,
        agent: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> Result<Result<Approval, ApprovalRefusal>, StoreError> {
        // One conditional UPDATE decides: of two concurrent redeems only one matches
        // `status = 'approved'`; the other finds the approval used.
        let row: Option<ApprovalRow> = on_pool!(self, pool => {
            sqlx::query_as(concat!(
                "UPDATE approvals SET status = 'used', used_at = $4 \
                 WHERE id = $1 AND agent = $2 AND fingerprint = $3 AND status = 'approved' \
                 AND expires_at > $4 RETURNING ",
                approval_columns!()
            ))
            .bind(id)
            .bind(agent)
            .bind(fingerprint)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?
        });
        if let Some(row) = row {
            return Ok(Ok(approval_from_row(row, now_ms)?));
        }
        let current = self.approval(id, now_ms).await?;
        Ok(Err(refusal(&current, agent, fingerprint)))
    }
}

/// Why `current` cannot be redeemed by `agent` for `fingerprint`: whose it is first (another
/// agent learns nothing more), then whether it is for this call, then where it stands.
fn refusal(current: &Approval, agent: &str, fingerprint: &str) -> ApprovalRefusal {
    if current.agent != agent {
        return ApprovalRefusal::NotYours {
            agent: current.agent.clone(),
        };
    }
    if current.fingerprint != fingerprint {
        return ApprovalRefusal::Mismatch;
    }
    match current.status {
        ApprovalStatus::Used => ApprovalRefusal::AlreadyUsed,
        ApprovalStatus::Rejected => ApprovalRefusal::Rejected {
            by: current
                .decided_by
                .clone()
                .unwrap_or_else(|| "someone".to_owned()),
        },
        ApprovalStatus::Expired => ApprovalRefusal::Expired {
            at: current.expires_at,
        },
        ApprovalStatus::Pending => ApprovalRefusal::Pending,
        // Approved, unexpired, same agent and call, yet the UPDATE did not match: it was used
        // between the two statements (a concurrent redeem won).
        ApprovalStatus::Approved => ApprovalRefusal::AlreadyUsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(status: ApprovalStatus) -> Approval {
        Approval {
            id: "0198".into(),
            agent: "spiffe://td/agent/a".into(),
            decision_id: "d".into(),
            fingerprint: "f".repeat(64),
            action: "tools/call delete".into(),
            reason: "needs approval".into(),
            subject: Some("alice".into()),
            grant_id: None,
            policy_version: Some("3".into()),
            status,
            requested_at: 0,
            expires_at: 600_000,
            decided_by: Some("bob".into()),
            decided_at: Some(1_500),
            used_at: None,
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            ApprovalStatus::Pending,
            ApprovalStatus::Approved,
            ApprovalStatus::Rejected,
            ApprovalStatus::Used,
            ApprovalStatus::Expired,
        ] {
            assert_eq!(ApprovalStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(ApprovalStatus::parse("Pending"), None);
    }

    #[test]
    fn refusals_name_whose_and_which_call_before_the_status() {
        let f = "f".repeat(64);
        let a = approval(ApprovalStatus::Used);
        assert!(matches!(
            refusal(&a, "spiffe://td/agent/b", &f),
            ApprovalRefusal::NotYours { .. }
        ));
        assert_eq!(
            refusal(&a, "spiffe://td/agent/a", "0"),
            ApprovalRefusal::Mismatch
        );
        assert_eq!(
            refusal(&a, "spiffe://td/agent/a", &f),
            ApprovalRefusal::AlreadyUsed
        );
        let a = approval(ApprovalStatus::Rejected);
        assert_eq!(
            refusal(&a, "spiffe://td/agent/a", &f),
            ApprovalRefusal::Rejected { by: "bob".into() }
        );
        let a = approval(ApprovalStatus::Expired);
        assert_eq!(
            refusal(&a, "spiffe://td/agent/a", &f),
            ApprovalRefusal::Expired { at: 600_000 }
        );
        let a = approval(ApprovalStatus::Pending);
        assert_eq!(
            refusal(&a, "spiffe://td/agent/a", &f),
            ApprovalRefusal::Pending
        );
    }

    #[test]
    fn refusal_messages_say_which() {
        let cases = [
            (ApprovalRefusal::Pending, "pending"),
            (
                ApprovalRefusal::Rejected { by: "bob".into() },
                "rejected by bob",
            ),
            (ApprovalRefusal::AlreadyUsed, "already used"),
            (
                ApprovalRefusal::Expired { at: 0 },
                "expired at 1970-01-01T00:00:00Z",
            ),
            (ApprovalRefusal::Mismatch, "does not match this call"),
            (
                ApprovalRefusal::NotYours {
                    agent: "spiffe://td/agent/secret".into(),
                },
                "another workload",
            ),
        ];
        for (refusal, words) in cases {
            let message = refusal.message("A1");
            assert!(message.contains(words), "{message}");
            assert!(message.contains("A1"), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn times_show_as_rfc3339() {
        let json = serde_json::to_value(approval(ApprovalStatus::Approved)).unwrap();
        assert_eq!(json["requested_at"], "1970-01-01T00:00:00Z");
        assert_eq!(json["expires_at"], "1970-01-01T00:10:00Z");
        assert_eq!(json["decided_at"], "1970-01-01T00:00:01.5Z");
        assert!(json.get("used_at").is_none() && json.get("grant_id").is_none());
        assert_eq!(json["status"], "approved");
    }

    #[test]
    fn expiry_is_computed_from_the_time() {
        let row = |status: &str| -> ApprovalRow {
            (
                "id".into(),
                "a".into(),
                "d".into(),
                "f".into(),
                "x".into(),
                "r".into(),
                None,
                None,
                None,
                status.into(),
                0,
                1_000,
                None,
                None,
                None,
            )
        };
        let status = |s: &str, now| approval_from_row(row(s), now).unwrap().status;
        assert_eq!(status("pending", 999), ApprovalStatus::Pending);
        assert_eq!(status("pending", 1_000), ApprovalStatus::Expired);
        assert_eq!(status("approved", 1_000), ApprovalStatus::Expired);
        assert_eq!(status("used", 5_000), ApprovalStatus::Used);
        assert_eq!(status("rejected", 5_000), ApprovalStatus::Rejected);
        assert!(approval_from_row(row("expired"), 0).is_err());
        assert!(approval_from_row(row("maybe"), 0).is_err());
    }
}
