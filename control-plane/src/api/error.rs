//! The one error response of the API: a status and a [`mandate_wire::ApiError`] body.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mandate_wire::ApiError;

use crate::store::{JoinTokenRefusal, StoreError};

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ApiError,
}

impl HttpError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ApiError {
                error: error.into(),
                field: None,
                messages: Vec::new(),
            },
        }
    }

    /// 400 naming the field at fault.
    pub fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error).with_field(field)
    }

    /// 401.
    pub fn unauthorized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, error)
    }

    /// 403.
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, error)
    }

    /// 404.
    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error)
    }

    /// 503: the store failed; the details go to the log, not to the client.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control plane's store is unavailable; retry later",
        )
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    /// Adds detail lines (compiler messages, failing tests).
    pub fn with_messages(mut self, messages: Vec<String>) -> Self {
        self.body.messages = messages;
        self
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => Self::not_found(format!("{what} not found")),
            StoreError::Conflict { what, why } => {
                Self::new(StatusCode::CONFLICT, format!("{what}: {why}"))
            }
            StoreError::JoinToken(refusal) => Self::forbidden(join_token_refusal(&refusal)),
            StoreError::Invalid { what, why } => {
                Self::invalid(what.clone(), format!("{what}: {why}"))
            }
            other => {
                crate::metrics::store_error();
                tracing::error!(error = %other, "store operation failed");
                Self::unavailable()
            }
        }
    }
}

/// Why a join token was refused, in words for the operator.
pub fn join_token_refusal(refusal: &JoinTokenRefusal) -> &'static str {
    match refusal {
        JoinTokenRefusal::Unknown => {
            "join token is not known to this control plane (issue one with `mandate agent token NAME`)"
        }
        JoinTokenRefusal::Used => {
            "join token has already been used; issue a fresh one with `mandate agent token NAME`"
        }
        JoinTokenRefusal::Expired => {
            "join token has expired; issue a fresh one with `mandate agent token NAME`"
        }
    }
}
