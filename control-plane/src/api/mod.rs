//! The HTTP API: admin routes (bearer admin token), sidecar routes (client SVID; enrolment by
//! join token), decision queries, and the OpenAPI document describing all of them.

pub mod approvals;
pub mod audit;
pub mod error;
pub mod extract;
pub mod grants;

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Router, body::Body};
use mandate_identity::ca::CertificateAuthority;
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::{
    DECISIONS_PATH, DecisionBatch, ENROLL_PATH, EnrollRequest, IngestResult, NDJSON, RENEW_PATH,
    RenewRequest, STREAM_PATH, StreamQuery, WorkloadStatus,
};
use serde::{Deserialize, Serialize};

use crate::bundles::{self, PushRequest};
use crate::config::AdminToken;
use crate::enroll::Enroller;
use crate::push::{ConnectedSidecar, Hub};
use crate::registry::{RegisterRequest, Registrar};
use crate::store::{DecisionQuery, Store, Workload, WorkloadKind};
use error::HttpError;
use extract::{Admin, JsonBody, NameParam, Peer, QueryParams, VersionParam};

/// The OpenAPI 3.0 document served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");
/// Body limit of policy uploads.
pub const POLICY_BODY_LIMIT: usize = 4 << 20;
/// Body limit of decision batches.
pub const DECISIONS_BODY_LIMIT: usize = 8 << 20;
/// Body limit of every other request.
pub const DEFAULT_BODY_LIMIT: usize = 256 << 10;
/// Default number of decisions a query returns.
pub const DEFAULT_DECISION_LIMIT: u32 = 100;
/// Most decisions a query returns.
pub const MAX_DECISION_LIMIT: u32 = 10_000;
/// Longest decision id accepted by ingest.
const MAX_DECISION_ID_LEN: usize = 128;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// The CA.
    pub ca: Arc<CertificateAuthority>,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// The admin token.
    pub admin_token: Arc<AdminToken>,
    /// Registration and join tokens.
    pub registrar: Registrar,
    /// Enrolment and renewal.
    pub enroller: Enroller,
    /// The push hub.
    pub hub: Arc<Hub>,
    /// Delegation signing keys, token issue and exchange.
    pub delegation: Arc<crate::delegation::Delegation>,
    /// How long a per-action approval may be decided and redeemed after it was asked for.
    pub approval_ttl: std::time::Duration,
}

/// A router together with the (method, path) of every route, for the OpenAPI consistency test.
struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, String)>,
}

impl Routes {
    fn add(mut self, method: Method, path: &str, route: MethodRouter<AppState>) -> Self {
        self.table.push((method, path.to_owned()));
        self.router = self.router.route(path, route);
        self
    }
}

fn routes() -> Routes {
    let mut r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    r = r.add(Method::GET, "/openapi.json", get(openapi));
    for (kind, base) in [
        (WorkloadKind::Agent, "/v1/agents"),
        (WorkloadKind::Service, "/v1/services"),
    ] {
        r = r
            .add(
                Method::POST,
                base,
                post(move |_: Admin, State(s): State<AppState>, JsonBody(req): JsonBody<RegisterRequest>| async move {
                    let registered = s.registrar.register(kind, req).await?;
                    Ok::<_, HttpError>((StatusCode::CREATED, Json(registered)))
                }),
            )
            .add(
                Method::GET,
                base,
                get(move |_: Admin, State(s): State<AppState>| async move {
                    let workloads = s.store.workloads(Some(kind)).await?;
                    Ok::<_, HttpError>(Json(WorkloadList { workloads }))
                }),
            )
            .add(
                Method::GET,
                &format!("{base}/{{name}}"),
                get(move |_: Admin, State(s): State<AppState>, NameParam(name): NameParam| async move {
                    Ok::<_, HttpError>(Json(s.store.workload(kind, &name).await?))
                }),
            );
        for (action, status) in [
            ("suspend", WorkloadStatus::Suspended),
            ("revoke", WorkloadStatus::Revoked),
            ("activate", WorkloadStatus::Active),
        ] {
            r = r.add(
                Method::POST,
                &format!("{base}/{{name}}/{action}"),
                post(move |_: Admin, State(s): State<AppState>, NameParam(name): NameParam| async move {
                    let workload = s.store.set_status(kind, &name, status).await?;
                    tracing::info!(spiffe_id = %workload.spiffe_id, status = %status, "workload status set");
                    Ok::<_, HttpError>(Json(workload))
                }),
            );
        }
        r = r.add(
            Method::POST,
            &format!("{base}/{{name}}/join-tokens"),
            post(
                move |_: Admin, State(s): State<AppState>, NameParam(name): NameParam| async move {
                    let token = s.registrar.issue_token(kind, &name).await?;
                    Ok::<_, HttpError>((StatusCode::CREATED, Json(token)))
                },
            ),
        );
    }
    r = approvals::add_routes(r);
    r = grants::add_routes(r);
    r = audit::add_routes(r);
    r.add(
        Method::POST,
        "/v1/policies",
        post(push_policy).layer(DefaultBodyLimit::max(POLICY_BODY_LIMIT)),
    )
    .add(Method::GET, "/v1/policies", get(list_policies))
    .add(
        Method::POST,
        "/v1/policies/{version}/activate",
        post(activate_policy),
    )
    .add(Method::GET, "/v1/decisions", get(query_decisions))
    .add(Method::GET, "/v1/sidecars", get(list_sidecars))
    .add(Method::POST, ENROLL_PATH, post(enroll))
    .add(Method::POST, RENEW_PATH, post(renew))
    .add(Method::GET, STREAM_PATH, get(stream))
    .add(
        Method::POST,
        DECISIONS_PATH,
        post(ingest_decisions).layer(DefaultBodyLimit::max(DECISIONS_BODY_LIMIT)),
    )
}

/// The API router with its state.
pub fn router(state: AppState) -> Router {
    routes()
        .router
        .fallback(|| async { HttpError::not_found("no such endpoint; see GET /openapi.json") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint; see GET /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(DEFAULT_BODY_LIMIT))
        .with_state(state)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `GET /v1/agents`, `GET /v1/services`.
#[derive(Debug, Serialize)]
pub struct WorkloadList {
    /// The workloads, by name.
    pub workloads: Vec<Workload>,
}

/// `GET /v1/sidecars`.
#[derive(Debug, Serialize)]
pub struct SidecarList {
    /// The sidecars streaming from this replica.
    pub sidecars: Vec<ConnectedSidecar>,
}

/// `GET /v1/decisions`.
#[derive(Debug, Serialize)]
pub struct DecisionList {
    /// Matching decisions, newest first.
    pub decisions: Vec<mandate_wire::DecisionRecord>,
}

async fn push_policy(
    _: Admin,
    State(s): State<AppState>,
    JsonBody(req): JsonBody<PushRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let summary = bundles::push(&s.store, &s.ca, req).await?;
    Ok((StatusCode::CREATED, Json(summary)))
}

async fn list_policies(
    _: Admin,
    State(s): State<AppState>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(bundles::list(&s.store).await?))
}

async fn activate_policy(
    _: Admin,
    State(s): State<AppState>,
    VersionParam(version): VersionParam,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(bundles::activate(&s.store, version).await?))
}

/// Whether a decision query wants allowed or denied calls.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultFilter {
    /// Allowed calls.
    Allow,
    /// Denied calls.
    Deny,
}

/// `GET /v1/decisions` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionParams {
    /// Agent name (`spiffe://<td>/agent/NAME`) or a full SPIFFE ID.
    pub agent: Option<String>,
    /// The person on whose behalf.
    pub subject: Option<String>,
    /// MCP tool.
    pub tool: Option<String>,
    /// The grant the call's delegation came from.
    pub grant: Option<String>,
    /// Who approved the call (per-action approval).
    pub approver: Option<String>,
    /// allow or deny.
    pub result: Option<ResultFilter>,
    /// RFC 3339, inclusive.
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
}

/// Turns query parameters into a store query; errors name the parameter.
pub fn decision_query(td: &TrustDomain, p: DecisionParams) -> Result<DecisionQuery, HttpError> {
    let source = match p.agent {
        None => None,
        Some(a) if a.starts_with("spiffe://") => Some(
            a.parse::<SpiffeId>()
                .map_err(|e| HttpError::invalid("agent", e.to_string()))?
                .as_str()
                .to_owned(),
        ),
        Some(name) => {
            crate::registry::validate_name(&name)
                .map_err(|e| HttpError::invalid("agent", e.message))?;
            Some(
                SpiffeId::agent(td, &name)
                    .map_err(|e| HttpError::invalid("agent", e.to_string()))?
                    .as_str()
                    .to_owned(),
            )
        }
    };
    for (field, value) in [("since", &p.since), ("until", &p.until)] {
        if let Some(v) = value {
            parse_rfc3339(v).ok_or_else(|| {
                HttpError::invalid(
                    field,
                    format!("{field} must be an RFC 3339 time such as 2026-01-02T15:04:05Z"),
                )
            })?;
        }
    }
    let limit = p.limit.unwrap_or(DEFAULT_DECISION_LIMIT);
    if !(1..=MAX_DECISION_LIMIT).contains(&limit) {
        return Err(HttpError::invalid(
            "limit",
            format!("limit must be 1-{MAX_DECISION_LIMIT}"),
        ));
    }
    Ok(DecisionQuery {
        source,
        subject: p.subject,
        tool: p.tool,
        grant: p.grant,
        approver: p.approver,
        allow: p.result.map(|r| matches!(r, ResultFilter::Allow)),
        since: p.since,
        until: p.until,
        limit,
    })
}

fn parse_rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

async fn query_decisions(
    _: Admin,
    State(s): State<AppState>,
    QueryParams(params): QueryParams<DecisionParams>,
) -> Result<impl IntoResponse, HttpError> {
    let query = decision_query(&s.trust_domain, params)?;
    let decisions = s.store.decisions(&query).await?;
    Ok(Json(DecisionList { decisions }))
}

async fn list_sidecars(_: Admin, State(s): State<AppState>) -> impl IntoResponse {
    Json(SidecarList {
        sidecars: s.hub.connected(),
    })
}

async fn enroll(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.enroller.enroll(req).await?))
}

async fn renew(
    State(s): State<AppState>,
    Peer(peer): Peer,
    JsonBody(req): JsonBody<RenewRequest>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.enroller.renew(&peer, req).await?))
}

async fn stream(
    State(s): State<AppState>,
    Peer(peer): Peer,
    QueryParams(query): QueryParams<StreamQuery>,
) -> Result<Response, HttpError> {
    // Streams open rarely: ask the store, and bring the snapshot up to it if it lags, so the
    // first line already carries the registry that made this workload active.
    match s.store.workload_by_spiffe_id(peer.as_str()).await? {
        Some(w) if w.status == WorkloadStatus::Active => {}
        Some(w) => {
            return Err(HttpError::forbidden(format!(
                "{peer} is {}, not active",
                w.status
            )));
        }
        None => return Err(HttpError::forbidden(format!("{peer} is not registered"))),
    }
    if s.hub.snapshot().status_of(peer.as_str()) != Some(WorkloadStatus::Active) {
        s.hub.refresh_now(&s.store).await?;
    }
    let lines = s.hub.stream(peer.as_str().to_owned(), query);
    Ok((
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn ingest_decisions(
    State(s): State<AppState>,
    Peer(peer): Peer,
    JsonBody(batch): JsonBody<DecisionBatch>,
) -> Result<Json<IngestResult>, HttpError> {
    // No status check: a suspended or revoked workload's sidecar still reports the denials it
    // took after the change, and the audit log must keep them. Its SVID still proves who reports.
    for (i, record) in batch.decisions.iter().enumerate() {
        if record.decision_id.is_empty() || record.decision_id.len() > MAX_DECISION_ID_LEN {
            return Err(HttpError::invalid(
                format!("decisions[{i}].decision_id"),
                format!("decision_id must be 1-{MAX_DECISION_ID_LEN} characters"),
            ));
        }
        if parse_rfc3339(&record.timestamp).is_none() {
            return Err(HttpError::invalid(
                format!("decisions[{i}].timestamp"),
                "timestamp must be RFC 3339",
            ));
        }
    }
    let result = s
        .store
        .insert_decisions(peer.as_str(), &batch.decisions)
        .await?;
    crate::metrics::metrics()
        .decisions_ingested
        .inc_by(result.accepted);
    Ok(Json(result))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_approvals;
#[cfg(test)]
mod tests_grants;
