//! Grants and delegation tokens over HTTP. Operators create, list, show and revoke grants and
//! close tasks through the admin API (`mandate grant`); agents' sidecars (client SVID) turn a
//! grant into a delegation token bound to their certificate, or exchange a token another agent
//! passed on; anyone may fetch the verifying keys (JWKS).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use mandate_wire::{
    DELEGATION_EXCHANGE_PATH, DELEGATION_TOKEN_PATH, ExchangeRequest, IssuedToken, JWKS_PATH,
    TokenRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::HttpError;
use super::extract::{Admin, JsonBody, Presenter, QueryParams, parse_json};
use super::{AppState, Routes};
use crate::delegation::now_ms;
use crate::grants::{
    self, CloseTaskRequest, ClosedTask, CreateGrantRequest, GrantParams, RevokeGrantRequest,
};
use crate::store::Grant;

/// Adds the grant, task, JWKS and delegation-token routes to the router.
pub(super) fn add_routes(r: Routes) -> Routes {
    r.add(Method::POST, "/v1/grants", post(create_grant))
        .add(Method::GET, "/v1/grants", get(list_grants))
        .add(Method::GET, "/v1/grants/{id}", get(show_grant))
        .add(Method::POST, "/v1/grants/{id}/revoke", post(revoke_grant))
        .add(Method::POST, "/v1/tasks/{task}/close", post(close_task))
        .add(Method::GET, JWKS_PATH, get(jwks))
        .add(Method::POST, DELEGATION_TOKEN_PATH, post(issue_token))
        .add(Method::POST, DELEGATION_EXCHANGE_PATH, post(exchange_token))
}

/// `GET /v1/grants`.
#[derive(Debug, Serialize)]
pub struct GrantList {
    /// Matching grants, newest first.
    pub grants: Vec<Grant>,
}

/// The `{id}` path parameter: a grant id (a UUID), canonical.
#[derive(Debug)]
pub struct GrantId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for GrantId {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid("id", e.body_text()))?;
        grants::parse_grant_id("id", &text).map(Self)
    }
}

/// The `{task}` path parameter.
#[derive(Debug)]
pub struct TaskParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TaskParam {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(task) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid("task", e.body_text()))?;
        grants::check_task("task", &task)?;
        Ok(Self(task))
    }
}

/// A JSON body that may be left out entirely (then `T::default()`); errors name the field.
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| HttpError::new(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

async fn create_grant(
    _: Admin,
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CreateGrantRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let grant = grants::create(&s.store, s.delegation.config().grant_ttl, req, now_ms()).await?;
    Ok((StatusCode::CREATED, Json(grant)))
}

async fn list_grants(
    _: Admin,
    State(s): State<AppState>,
    QueryParams(params): QueryParams<GrantParams>,
) -> Result<impl IntoResponse, HttpError> {
    let query = grants::query(params)?;
    let grants = s.store.grants(&query, now_ms()).await?;
    Ok(Json(GrantList { grants }))
}

async fn show_grant(
    _: Admin,
    State(s): State<AppState>,
    GrantId(id): GrantId,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.store.grant(&id, now_ms()).await?))
}

async fn revoke_grant(
    _: Admin,
    State(s): State<AppState>,
    GrantId(id): GrantId,
    OptionalJsonBody(req): OptionalJsonBody<RevokeGrantRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let by = grants::revoker("revoked_by", req.revoked_by)?;
    let grant = s.store.revoke_grant(&id, &by, now_ms()).await?;
    tracing::info!(grant = %grant.id, agent = %grant.agent, revoked_by = %by, "grant revoked");
    Ok(Json(grant))
}

async fn close_task(
    _: Admin,
    State(s): State<AppState>,
    TaskParam(task): TaskParam,
    OptionalJsonBody(req): OptionalJsonBody<CloseTaskRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let by = grants::revoker("closed_by", req.closed_by)?;
    let closed = s.store.close_task(&task, &by, now_ms()).await?;
    tracing::info!(task = %task, closed = closed.len(), closed_by = %by, "task closed");
    Ok(Json(ClosedTask { task, closed }))
}

async fn jwks(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Json(s.delegation.jwks(now_ms())),
    )
}

async fn issue_token(
    State(s): State<AppState>,
    caller: Presenter,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Result<Json<IssuedToken>, HttpError> {
    Ok(Json(
        s.delegation
            .issue(&caller.id, &caller.thumbprint, req)
            .await?,
    ))
}

async fn exchange_token(
    State(s): State<AppState>,
    caller: Presenter,
    JsonBody(req): JsonBody<ExchangeRequest>,
) -> Result<Json<IssuedToken>, HttpError> {
    Ok(Json(
        s.delegation
            .exchange(&caller.id, &caller.thumbprint, req)
            .await?,
    ))
}
