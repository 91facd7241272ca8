//! Per-action approvals over HTTP. Sidecars (client SVID) ask for an approval when policy answers
//! `require_approval`, and redeem it when the call is retried; people list, approve and reject
//! them through the admin API (`mandate approve`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use mandate_identity::SpiffeId;
use mandate_wire::{APPROVALS_PATH, ApprovalRequest, ApprovalTicket, RedeemRequest, Redeemed};
use serde::{Deserialize, Serialize};

use super::error::HttpError;
use super::extract::{Admin, JsonBody, Peer, QueryParams};
use super::{AppState, Routes};
use crate::store::{
    Approval, ApprovalRefusal, ApprovalStatus, NewApproval, Store, Verdict, WorkloadStatus,
};

/// Longest decision id, grant id or approval field that names something.
const MAX_ID_LEN: usize = 128;
/// Longest description of the held call.
pub const MAX_ACTION_LEN: usize = 2048;
/// Longest reason.
pub const MAX_REASON_LEN: usize = 4096;
/// Longest subject or approver.
pub const MAX_PERSON_LEN: usize = 256;
/// Longest policy version.
const MAX_POLICY_VERSION_LEN: usize = 64;
/// Default number of approvals a listing returns.
pub const DEFAULT_APPROVAL_LIMIT: u32 = 100;
/// Most approvals a listing returns.
pub const MAX_APPROVAL_LIMIT: u32 = 10_000;

/// Adds the approval routes (sidecar and admin) to the router.
pub(super) fn add_routes(r: Routes) -> Routes {
    r.add(Method::POST, APPROVALS_PATH, post(request_approval))
        .add(
            Method::POST,
            &format!("{APPROVALS_PATH}/{{id}}/redeem"),
            post(redeem_approval),
        )
        .add(Method::GET, "/v1/approvals", get(list_approvals))
        .add(Method::GET, "/v1/approvals/{id}", get(show_approval))
        .add(
            Method::POST,
            "/v1/approvals/{id}/approve",
            post(approve_approval),
        )
        .add(
            Method::POST,
            "/v1/approvals/{id}/reject",
            post(reject_approval),
        )
}

/// `GET /v1/approvals`.
#[derive(Debug, Serialize)]
pub struct ApprovalList {
    /// Matching approvals, newest first.
    pub approvals: Vec<Approval>,
}

/// `GET /v1/approvals` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalParams {
    /// pending, approved, rejected, used or expired.
    pub status: Option<ApprovalStatus>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
}

/// `POST /v1/approvals/{id}/approve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    /// Who approves (recorded, and shown in the audit trail of the call).
    pub approved_by: String,
}

/// `POST /v1/approvals/{id}/reject`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectRequest {
    /// Who rejects (the agent is told).
    pub rejected_by: String,
}

/// The `{id}` path parameter: an approval id (a UUID).
#[derive(Debug)]
pub struct ApprovalId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApprovalId {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid("id", e.body_text()))?;
        parse_id(&text).map(Self)
    }
}

/// An approval id in its canonical form (lowercase, hyphenated).
pub fn parse_id(text: &str) -> Result<String, HttpError> {
    uuid::Uuid::try_parse(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            HttpError::invalid(
                "id",
                format!(
                    "{:?} is not an approval id (a UUID such as 01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b)",
                    text.chars().take(64).collect::<String>()
                ),
            )
        })
}

/// Now, unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks a sidecar's request and turns it into what the store keeps, for `agent`.
pub fn new_approval(agent: &SpiffeId, req: ApprovalRequest) -> Result<NewApproval, HttpError> {
    text("decision_id", &req.decision_id, 1, MAX_ID_LEN)?;
    if req.fingerprint.len() != 64
        || !req
            .fingerprint
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(HttpError::invalid(
            "fingerprint",
            "fingerprint must be the call's SHA-256 as 64 lowercase hex digits",
        ));
    }
    text("action", &req.action, 1, MAX_ACTION_LEN)?;
    text("reason", &req.reason, 0, MAX_REASON_LEN)?;
    let optional = |field: &str, value: &Option<String>, max: usize| match value {
        Some(v) => text(field, v, 1, max),
        None => Ok(()),
    };
    optional("subject", &req.subject, MAX_PERSON_LEN)?;
    optional("grant_id", &req.grant_id, MAX_ID_LEN)?;
    optional(
        "policy_version",
        &req.policy_version,
        MAX_POLICY_VERSION_LEN,
    )?;
    Ok(NewApproval {
        agent: agent.as_str().to_owned(),
        decision_id: req.decision_id,
        fingerprint: req.fingerprint,
        action: req.action,
        reason: req.reason,
        subject: req.subject,
        grant_id: req.grant_id,
        policy_version: req.policy_version,
    })
}

/// `min..=max` characters.
fn text(field: &str, value: &str, min: usize, max: usize) -> Result<(), HttpError> {
    let n = value.chars().count();
    if n < min || n > max {
        let what = if min == 0 {
            format!("at most {max} characters")
        } else {
            format!("{min}-{max} characters")
        };
        return Err(HttpError::invalid(field, format!("{field} must be {what}")));
    }
    Ok(())
}

/// Checks who decides: 1-256 characters, no control characters, not only spaces.
pub fn person(field: &str, who: &str) -> Result<String, HttpError> {
    let who = who.trim();
    if who.is_empty() || who.chars().count() > MAX_PERSON_LEN || who.chars().any(char::is_control) {
        return Err(HttpError::invalid(
            field,
            format!(
                "{field} must name who decides (1-{MAX_PERSON_LEN} characters, no control characters), \
                 e.g. alice@example.com"
            ),
        ));
    }
    Ok(who.to_owned())
}

/// The peer, if it is a registered, active workload.
async fn active_peer(store: &Store, peer: &SpiffeId) -> Result<(), HttpError> {
    match store.workload_by_spiffe_id(peer.as_str()).await? {
        Some(w) if w.status == WorkloadStatus::Active => Ok(()),
        Some(w) => Err(HttpError::forbidden(format!(
            "{peer} is {}, not active",
            w.status
        ))),
        None => Err(HttpError::forbidden(format!("{peer} is not registered"))),
    }
}

/// The HTTP answer to a refused redeem: 403 for another agent's approval, 409 otherwise, with
/// the refusal's short code as the one message line.
pub fn refused(id: &str, refusal: &ApprovalRefusal) -> HttpError {
    let status = match refusal {
        ApprovalRefusal::NotYours { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::CONFLICT,
    };
    HttpError::new(status, refusal.message(id)).with_messages(vec![refusal.code().to_owned()])
}

async fn request_approval(
    State(s): State<AppState>,
    Peer(peer): Peer,
    JsonBody(req): JsonBody<ApprovalRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let new = new_approval(&peer, req)?;
    active_peer(&s.store, &peer).await?;
    let ttl_ms = i64::try_from(s.approval_ttl.as_millis()).unwrap_or(i64::MAX);
    let approval = s.store.insert_approval(&new, now_ms(), ttl_ms).await?;
    tracing::info!(
        approval = %approval.id,
        agent = %approval.agent,
        decision_id = %approval.decision_id,
        action = %approval.action,
        "approval requested"
    );
    Ok((
        StatusCode::CREATED,
        Json(ApprovalTicket {
            id: approval.id,
            expires_at: approval.expires_at.div_euclid(1000),
        }),
    ))
}

async fn redeem_approval(
    State(s): State<AppState>,
    Peer(peer): Peer,
    ApprovalId(id): ApprovalId,
    JsonBody(req): JsonBody<RedeemRequest>,
) -> Result<Json<Redeemed>, HttpError> {
    active_peer(&s.store, &peer).await?;
    match s
        .store
        .redeem_approval(&id, peer.as_str(), &req.fingerprint, now_ms())
        .await?
    {
        Ok(approval) => {
            let approved_by = approval.decided_by.unwrap_or_default();
            tracing::info!(approval = %id, agent = %peer, approved_by = %approved_by, "approval redeemed");
            Ok(Json(Redeemed {
                approved_by,
                approved_at: approval.decided_at.unwrap_or_default().div_euclid(1000),
            }))
        }
        Err(refusal) => {
            tracing::info!(approval = %id, agent = %peer, refusal = refusal.code(), "approval not redeemed");
            Err(refused(&id, &refusal))
        }
    }
}

async fn list_approvals(
    _: Admin,
    State(s): State<AppState>,
    QueryParams(params): QueryParams<ApprovalParams>,
) -> Result<Json<ApprovalList>, HttpError> {
    let limit = params.limit.unwrap_or(DEFAULT_APPROVAL_LIMIT);
    if !(1..=MAX_APPROVAL_LIMIT).contains(&limit) {
        return Err(HttpError::invalid(
            "limit",
            format!("limit must be 1-{MAX_APPROVAL_LIMIT}"),
        ));
    }
    let approvals = s.store.approvals(params.status, limit, now_ms()).await?;
    Ok(Json(ApprovalList { approvals }))
}

async fn show_approval(
    _: Admin,
    State(s): State<AppState>,
    ApprovalId(id): ApprovalId,
) -> Result<Json<Approval>, HttpError> {
    Ok(Json(s.store.approval(&id, now_ms()).await?))
}

async fn approve_approval(
    _: Admin,
    State(s): State<AppState>,
    ApprovalId(id): ApprovalId,
    JsonBody(req): JsonBody<ApproveRequest>,
) -> Result<Json<Approval>, HttpError> {
    let by = person("approved_by", &req.approved_by)?;
    decide(&s.store, &id, Verdict::Approve, &by).await
}

async fn reject_approval(
    _: Admin,
    State(s): State<AppState>,
    ApprovalId(id): ApprovalId,
    JsonBody(req): JsonBody<RejectRequest>,
) -> Result<Json<Approval>, HttpError> {
    let by = person("rejected_by", &req.rejected_by)?;
    decide(&s.store, &id, Verdict::Reject, &by).await
}

async fn decide(
    store: &Store,
    id: &str,
    verdict: Verdict,
    by: &str,
) -> Result<Json<Approval>, HttpError> {
    let approval = store.decide_approval(id, verdict, by, now_ms()).await?;
    tracing::info!(
        approval = %approval.id,
        agent = %approval.agent,
        status = %approval.status,
        by = %by,
        "approval decided"
    );
    Ok(Json(approval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            decision_id: "0198a1b2-0000-7000-8000-000000000001".into(),
            fingerprint: "ab".repeat(32),
            action: "tools/call delete_file on tool:8080".into(),
            reason: "deleting needs a person's approval".into(),
            subject: Some("alice@example.com".into()),
            grant_id: None,
            policy_version: Some("4".into()),
        }
    }

    fn field(req: ApprovalRequest) -> Option<String> {
        let agent: SpiffeId = "spiffe://mandate.local/agent/research".parse().unwrap();
        new_approval(&agent, req).unwrap_err().body.field
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let agent: SpiffeId = "spiffe://mandate.local/agent/research".parse().unwrap();
        let new = new_approval(&agent, request()).unwrap();
        assert_eq!(new.agent, agent.as_str());
        assert_eq!(new.subject.as_deref(), Some("alice@example.com"));

        let mut r = request();
        r.fingerprint = "AB".repeat(32);
        assert_eq!(field(r).as_deref(), Some("fingerprint"));
        let mut r = request();
        r.fingerprint = "ab".into();
        assert_eq!(field(r).as_deref(), Some("fingerprint"));
        let mut r = request();
        r.decision_id = String::new();
        assert_eq!(field(r).as_deref(), Some("decision_id"));
        let mut r = request();
        r.action = String::new();
        assert_eq!(field(r).as_deref(), Some("action"));
        let mut r = request();
        r.reason = "x".repeat(MAX_REASON_LEN + 1);
        assert_eq!(field(r).as_deref(), Some("reason"));
        let mut r = request();
        r.subject = Some(String::new());
        assert_eq!(field(r).as_deref(), Some("subject"));
        let mut r = request();
        r.grant_id = Some("g".repeat(MAX_ID_LEN + 1));
        assert_eq!(field(r).as_deref(), Some("grant_id"));
    }

    #[test]
    fn deciders_are_named() {
        assert_eq!(
            person("approved_by", " bob@example.com ").unwrap(),
            "bob@example.com"
        );
        for bad in ["", "   ", "bob\nmallory"] {
            let err = person("approved_by", bad).unwrap_err();
            assert_eq!(err.body.field.as_deref(), Some("approved_by"), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_uuids_in_canonical_form() {
        assert_eq!(
            parse_id("01980F3A-7C2E-7B61-9A4E-3F0C1D2E5A6B").unwrap(),
            "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b"
        );
        let err = parse_id("nope").unwrap_err();
        assert_eq!(err.body.field.as_deref(), Some("id"));
    }

    #[test]
    fn refusals_are_409_except_another_agents_approval() {
        let err = refused("A", &ApprovalRefusal::Pending);
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert_eq!(err.body.messages, ["pending"]);
        let err = refused(
            "A",
            &ApprovalRefusal::NotYours {
                agent: "spiffe://td/agent/x".into(),
            },
        );
        assert_eq!(err.status, StatusCode::FORBIDDEN);
    }
}
