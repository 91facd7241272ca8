//! Extractors that turn every malformed request into an [`HttpError`] naming the field: JSON
//! bodies, query strings, path parameters, the admin token and the peer's SVID.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use mandate_identity::SpiffeId;
use ring::digest::{SHA256, digest};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::HttpError;

/// The verified SPIFFE ID of the TLS client, inserted by the server for each request (absent
/// when the client presented no certificate).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub SpiffeId);

/// The DER of the TLS client's leaf certificate, inserted by the server with [`PeerIdentity`]:
/// delegation tokens are bound to the certificate of the connection that asked for them.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub std::sync::Arc<[u8]>);

/// A request authenticated with the admin token.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            });
        match presented {
            Some(token) if tokens_match(token, state.admin_token.expose()) => Ok(Admin),
            Some(_) => Err(HttpError::unauthorized("the admin token is not valid")),
            None => Err(HttpError::unauthorized(
                "admin endpoints need `Authorization: Bearer <admin token>`",
            )),
        }
    }
}

/// Compares two tokens in time independent of where they differ (digests have equal length).
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    let a = digest(&SHA256, presented.as_bytes());
    let b = digest(&SHA256, expected.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The caller's verified SVID identity; requests without a client certificate get 401.
#[derive(Debug)]
pub struct Peer(pub SpiffeId);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, HttpError> {
        parts
            .extensions
            .get::<PeerIdentity>()
            .map(|p| Peer(p.0.clone()))
            .ok_or_else(|| {
                HttpError::unauthorized(
                    "sidecar endpoints need a client certificate: the sidecar's SVID issued by this control plane",
                )
            })
    }
}

/// The caller's verified SVID identity and the `x5t#S256` thumbprint of the certificate it
/// presented on this connection; requests without a client certificate get 401.
#[derive(Debug)]
pub struct Presenter {
    /// The SPIFFE ID of the client certificate.
    pub id: SpiffeId,
    /// [`mandate_wire::delegation::thumbprint`] of its DER.
    pub thumbprint: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Presenter {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Peer(id) = Peer::from_request_parts(parts, state).await?;
        let cert = parts.extensions.get::<PeerCertificate>().ok_or_else(|| {
            HttpError::unauthorized("this endpoint needs the client certificate of the connection")
        })?;
        Ok(Presenter {
            id,
            thumbprint: mandate_wire::delegation::thumbprint(&cert.0),
        })
    }
}

/// A JSON body; errors name the field (`ceiling[1].port`, `owner`).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| HttpError::new(e.status(), e.body_text()))?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Deserialises JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = e.inner().to_string();
        let field = field_of(&e.path().to_string(), &message);
        let error = format!("invalid request body: {message}");
        match field {
            Some(f) => HttpError::invalid(f, error),
            None => HttpError::new(axum::http::StatusCode::BAD_REQUEST, error),
        }
    })?;
    de.end().map_err(|e| {
        HttpError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    Ok(value)
}

/// The field a serde error is about: its path, extended by the field named in a
/// "missing field `x`" / "unknown field `x`" message.
fn field_of(path: &str, message: &str) -> Option<String> {
    let path = if path == "." || path == "?" { "" } else { path };
    let named = ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| {
            let rest = &message[message.find(prefix)? + prefix.len()..];
            Some(rest[..rest.find('`')?].to_owned())
        });
    match (path, named) {
        ("", None) => None,
        ("", Some(name)) => Some(name),
        (path, None) => Some(path.to_owned()),
        // serde_path_to_error already ends the path with an unknown field's name.
        (path, Some(name)) if path == name || path.ends_with(&format!(".{name}")) => {
            Some(path.to_owned())
        }
        (path, Some(name)) => Some(format!("{path}.{name}")),
    }
}

/// A query string; errors name the parameter.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, HttpError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryParams)
            .map_err(|e| {
                let message = e.inner().to_string();
                let error = format!("invalid query parameter: {message}");
                match field_of(&e.path().to_string(), &message) {
                    Some(f) => HttpError::invalid(f, error),
                    None => HttpError::new(axum::http::StatusCode::BAD_REQUEST, error),
                }
            })
    }
}

/// The `{name}` path parameter.
#[derive(Debug)]
pub struct NameParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for NameParam {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid("name", e.body_text()))?;
        crate::registry::validate_name(&name)?;
        Ok(Self(name))
    }
}

/// The `{version}` path parameter: a bundle version, 1 or more.
#[derive(Debug)]
pub struct VersionParam(pub u64);

impl<S: Send + Sync> FromRequestParts<S> for VersionParam {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| HttpError::invalid("version", e.body_text()))?;
        match text.parse::<u64>() {
            Ok(v) if v >= 1 => Ok(Self(v)),
            _ => Err(HttpError::invalid(
                "version",
                format!("version {text:?} is not a bundle version (1, 2, …)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    fn field(json: &str) -> Option<String> {
        parse_json::<Outer>(json.as_bytes()).unwrap_err().body.field
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field(r#"{"inner": []}"#).as_deref(), Some("name"));
        assert_eq!(
            field(r#"{"name": "a", "inner": [], "x": 1}"#).as_deref(),
            Some("x")
        );
        assert_eq!(
            field(r#"{"name": 5, "inner": []}"#).as_deref(),
            Some("name")
        );
        assert_eq!(
            field(r#"{"name": "a", "inner": [{"port": 1}, {"port": "x"}]}"#).as_deref(),
            Some("inner[1].port")
        );
        assert_eq!(
            field(r#"{"name": "a", "inner": [{}]}"#).as_deref(),
            Some("inner[0].port")
        );
        let err = parse_json::<Outer>(b"{").unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(err.body.field, None);
        assert!(parse_json::<Outer>(br#"{"name": "a", "inner": []} x"#).is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abd", "abc"));
        assert!(!tokens_match("", "abc"));
    }
}
