//! Registering agents and services: validation of what an operator submits, and join tokens.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::{JoinToken, Reach};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::error::HttpError;
use crate::store::{NewWorkload, Store, StoreError, Workload, WorkloadKind};

/// Longest workload name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest owner.
pub const MAX_OWNER_LEN: usize = 256;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Most scopes in a ceiling (or in a workload's autonomous scopes).
pub const MAX_SCOPES: usize = 256;
/// Longest scope pattern.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Most labels on a workload.
pub const MAX_LABELS: usize = 64;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// The keys a ceiling scope may name (see policies/reference/authz.rego).
pub const SCOPE_KEYS: [&str; 9] = [
    "host", "port", "protocol", "method", "path", "mcp", "tool", "resource", "prompt",
];

/// `POST /v1/agents` and `POST /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// DNS-label-like name, unique per kind.
    pub name: String,
    /// Who answers for the workload.
    pub owner: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The most it may ever do: scope objects.
    #[serde(default)]
    pub ceiling: Vec<Value>,
    /// What it may do on its own, with no delegation from a person: scope objects. Policy
    /// intersects them with the ceiling; none (the default) means it acts only when delegated.
    #[serde(default)]
    pub autonomous: Vec<Value>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh.
    #[serde(default)]
    pub reach: Reach,
}

/// The answer to a registration: the workload and its first join token.
#[derive(Debug, Serialize)]
pub struct Registered {
    /// The workload as stored.
    pub workload: Workload,
    /// The one-time join token (secret: shown once).
    pub join_token: String,
    /// When the token stops being redeemable, RFC 3339.
    pub join_token_expires_at: String,
}

/// A freshly issued join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedJoinToken {
    /// The one-time join token (secret: shown once).
    pub join_token: String,
    /// When it stops being redeemable, RFC 3339.
    pub join_token_expires_at: String,
}

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field at fault (`ceiling[1].port`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl From<Invalid> for HttpError {
    fn from(e: Invalid) -> Self {
        HttpError::invalid(e.field, e.message)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a workload name: 1–63 of `a-z 0-9 -`, starting and ending with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!(
                "name {name:?} is not valid: use 1-{MAX_NAME_LEN} lowercase letters, digits and '-', \
                 starting and ending with a letter or digit (like a DNS label)"
            ),
        ))
    }
}

fn check_text(field: &str, text: &str, max: usize, required: bool) -> Result<(), Invalid> {
    if required && text.trim().is_empty() {
        return Err(invalid(field, format!("{field} is required")));
    }
    if text.chars().count() > max {
        return Err(invalid(
            field,
            format!("{field} is longer than {max} characters"),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(
            field,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

/// Checks a ceiling: see [`validate_scopes`].
pub fn validate_ceiling(ceiling: &[Value]) -> Result<(), Invalid> {
    validate_scopes("ceiling", ceiling)
}

/// Checks an array of scopes (a ceiling, autonomous scopes): scope objects whose keys are among
/// [`SCOPE_KEYS`]; `port` is an integer 0–65535 or a pattern string, every other key a non-empty
/// pattern string. Errors name the field under `what`, e.g. `autonomous[1].port`.
pub fn validate_scopes(what: &str, scopes: &[Value]) -> Result<(), Invalid> {
    if scopes.len() > MAX_SCOPES {
        return Err(invalid(
            what,
            format!("{what} has at most {MAX_SCOPES} scopes"),
        ));
    }
    for (i, scope) in scopes.iter().enumerate() {
        let Value::Object(scope) = scope else {
            return Err(invalid(
                format!("{what}[{i}]"),
                "a scope is an object such as {\"host\": \"github\", \"tool\": \"search_*\"}",
            ));
        };
        for (key, value) in scope {
            let field = format!("{what}[{i}].{key}");
            if !SCOPE_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    field,
                    format!("unknown scope key {key:?}; use {}", SCOPE_KEYS.join(", ")),
                ));
            }
            match value {
                Value::Number(n) if key == "port" => {
                    if n.as_u64().is_none_or(|p| p > u64::from(u16::MAX)) {
                        return Err(invalid(
                            field,
                            "port must be an integer 0-65535 or a pattern string",
                        ));
                    }
                }
                Value::String(s) if !s.is_empty() && s.len() <= MAX_PATTERN_LEN => {}
                Value::String(_) => {
                    return Err(invalid(
                        field,
                        format!("a pattern must be 1-{MAX_PATTERN_LEN} characters"),
                    ));
                }
                _ if key == "port" => {
                    return Err(invalid(
                        field,
                        "port must be an integer 0-65535 or a pattern string",
                    ));
                }
                _ => return Err(invalid(field, format!("{key} must be a pattern string"))),
            }
        }
    }
    Ok(())
}

/// Checks labels: keys 1–63 of `A-Z a-z 0-9 . _ / -` starting and ending alphanumeric; values
/// at most 256 characters without control characters.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if labels.len() > MAX_LABELS {
        return Err(invalid("labels", format!("at most {MAX_LABELS} labels")));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
            && key.as_bytes()[0].is_ascii_alphanumeric()
            && key.as_bytes()[key.len() - 1].is_ascii_alphanumeric();
        if !key_ok {
            return Err(invalid(
                format!("labels.{key}"),
                format!(
                    "label key {key:?} is not valid: use 1-63 letters, digits, '.', '_', '/' and '-', \
                     starting and ending with a letter or digit"
                ),
            ));
        }
        check_text(&format!("labels.{key}"), value, MAX_LABEL_VALUE_LEN, false)?;
    }
    Ok(())
}

/// Validates a registration request into the workload to store.
pub fn validate(
    kind: WorkloadKind,
    trust_domain: &TrustDomain,
    req: RegisterRequest,
) -> Result<NewWorkload, Invalid> {
    validate_name(&req.name)?;
    check_text("owner", &req.owner, MAX_OWNER_LEN, true)?;
    check_text("description", &req.description, MAX_DESCRIPTION_LEN, false)?;
    validate_ceiling(&req.ceiling)?;
    validate_scopes("autonomous", &req.autonomous)?;
    validate_labels(&req.labels)?;
    req.reach
        .validate()
        .map_err(|e| invalid(format!("reach.{}", e.field), e.message))?;
    let spiffe_id = spiffe_id(kind, trust_domain, &req.name)?;
    Ok(NewWorkload {
        name: req.name,
        kind,
        spiffe_id: spiffe_id.as_str().to_owned(),
        owner: req.owner.trim().to_owned(),
        description: req.description,
        ceiling: req.ceiling,
        autonomous: req.autonomous,
        labels: req.labels,
        reach: req.reach,
    })
}

/// The SPIFFE ID of a workload: `spiffe://<td>/agent/<name>` or `spiffe://<td>/service/<name>`.
pub fn spiffe_id(kind: WorkloadKind, td: &TrustDomain, name: &str) -> Result<SpiffeId, Invalid> {
    match kind {
        WorkloadKind::Agent => SpiffeId::agent(td, name),
        WorkloadKind::Service => SpiffeId::service(td, name),
    }
    .map_err(|e| invalid("name", e.to_string()))
}

/// Registers workloads and issues their join tokens.
#[derive(Clone)]
pub struct Registrar {
    store: Store,
    trust_domain: TrustDomain,
    ca_der: std::sync::Arc<[u8]>,
    join_token_ttl: Duration,
}

impl Registrar {
    /// A registrar issuing tokens that pin `ca_der` and expire after `join_token_ttl`.
    pub fn new(
        store: Store,
        trust_domain: TrustDomain,
        ca_der: Vec<u8>,
        join_token_ttl: Duration,
    ) -> Self {
        Self {
            store,
            trust_domain,
            ca_der: ca_der.into(),
            join_token_ttl,
        }
    }

    /// Validates and stores a workload, then issues its first join token.
    pub async fn register(
        &self,
        kind: WorkloadKind,
        req: RegisterRequest,
    ) -> Result<Registered, HttpError> {
        let new = validate(kind, &self.trust_domain, req)?;
        let workload = self.store.insert_workload(&new).await?;
        let token = self.issue_for(&workload.spiffe_id).await?;
        tracing::info!(spiffe_id = %workload.spiffe_id, "registered");
        Ok(Registered {
            workload,
            join_token: token.join_token,
            join_token_expires_at: token.join_token_expires_at,
        })
    }

    /// Issues a fresh join token for an existing, non-revoked workload.
    pub async fn issue_token(
        &self,
        kind: WorkloadKind,
        name: &str,
    ) -> Result<IssuedJoinToken, HttpError> {
        validate_name(name)?;
        let workload = self.store.workload(kind, name).await?;
        if workload.status == mandate_wire::WorkloadStatus::Revoked {
            return Err(HttpError::from(StoreError::Conflict {
                what: format!("{} {name}", kind_word(kind)),
                why: "revoked workloads get no join tokens".to_owned(),
            }));
        }
        self.issue_for(&workload.spiffe_id).await
    }

    async fn issue_for(&self, spiffe_id: &str) -> Result<IssuedJoinToken, HttpError> {
        let token = JoinToken::generate(spiffe_id, &self.ca_der);
        let expires = SystemTime::now() + self.join_token_ttl;
        let expires_unix = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        self.store
            .insert_join_token(&token.secret_hash(), spiffe_id, expires_unix)
            .await?;
        Ok(IssuedJoinToken {
            join_token: token.expose(),
            join_token_expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
        })
    }
}

/// `agent` or `service`.
pub fn kind_word(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Agent => "agent",
        WorkloadKind::Service => "service",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    fn req(body: Value) -> RegisterRequest {
        serde_json::from_value(body).unwrap()
    }

    fn refusal(body: Value) -> Invalid {
        validate(WorkloadKind::Agent, &td(), req(body)).unwrap_err()
    }

    #[test]
    fn a_valid_registration_becomes_a_workload_with_its_spiffe_id() {
        let new = validate(
            WorkloadKind::Agent,
            &td(),
            req(json!({"name": "research-1", "owner": " alice ",
                       "ceiling": [{"host": "github", "tool": "search_*"}, {"host": "db", "port": 5432}],
                       "labels": {"team": "ml", "app.kubernetes.io/name": "r"}})),
        )
        .unwrap();
        assert_eq!(new.spiffe_id, "spiffe://mandate.local/agent/research-1");
        assert_eq!(new.owner, "alice");
        let service = validate(
            WorkloadKind::Service,
            &td(),
            req(json!({"name": "tool", "owner": "ops"})),
        )
        .unwrap();
        assert_eq!(service.spiffe_id, "spiffe://mandate.local/service/tool");
    }

    #[test]
    fn names_must_be_dns_labels() {
        for bad in [
            "",
            "Research",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a/b",
            &"x".repeat(64),
        ] {
            let e = refusal(json!({"name": bad, "owner": "o"}));
            assert_eq!(e.field, "name");
            assert!(e.message.contains("DNS label"), "{e}");
        }
        validate_name(&"x".repeat(63)).unwrap();
    }

    #[test]
    fn owner_is_required() {
        let e = refusal(json!({"name": "a", "owner": "  "}));
        assert_eq!(e.field, "owner");
        assert_eq!(e.message, "owner is required");
    }

    #[test]
    fn ceiling_scopes_are_objects_of_known_keys() {
        let e = refusal(json!({"name": "a", "owner": "o", "ceiling": ["github"]}));
        assert_eq!(e.field, "ceiling[0]");
        let e =
            refusal(json!({"name": "a", "owner": "o", "ceiling": [{"host": "x"}, {"hots": "x"}]}));
        assert_eq!(e.field, "ceiling[1].hots");
        assert!(e.message.contains("unknown scope key \"hots\""), "{e}");
        assert!(e.message.contains("prompt"), "{e}");
        let e = refusal(json!({"name": "a", "owner": "o", "ceiling": [{"port": 70000}]}));
        assert_eq!(e.field, "ceiling[0].port");
        let e = refusal(json!({"name": "a", "owner": "o", "ceiling": [{"tool": 5}]}));
        assert_eq!(e.message, "tool must be a pattern string");
        validate_ceiling(&[json!({"port": "80*"}), json!({})]).unwrap();
        let e = refusal(json!({"name": "a", "owner": "o", "ceiling": vec![json!({}); 257]}));
        assert_eq!(e.field, "ceiling");
        assert_eq!(e.message, "ceiling has at most 256 scopes");
    }

    #[test]
    fn autonomous_scopes_are_checked_like_the_ceiling() {
        let new = validate(
            WorkloadKind::Agent,
            &td(),
            req(
                json!({"name": "a", "owner": "o", "ceiling": [{"host": "tool"}],
                       "autonomous": [{"host": "tool", "tool": "search"}]}),
            ),
        )
        .unwrap();
        assert_eq!(new.autonomous, [json!({"host": "tool", "tool": "search"})]);
        let none = validate(
            WorkloadKind::Agent,
            &td(),
            req(json!({"name": "a", "owner": "o"})),
        )
        .unwrap();
        assert!(none.autonomous.is_empty());
        let e = refusal(
            json!({"name": "a", "owner": "o", "autonomous": [{"host": "x"}, {"port": 70000}]}),
        );
        assert_eq!(e.field, "autonomous[1].port");
        let e = refusal(json!({"name": "a", "owner": "o", "autonomous": [{"hots": "x"}]}));
        assert_eq!(e.field, "autonomous[0].hots");
        let e = refusal(json!({"name": "a", "owner": "o", "autonomous": ["search"]}));
        assert_eq!(e.field, "autonomous[0]");
    }

    #[test]
    fn reach_is_checked_and_kept() {
        let new = validate(
            WorkloadKind::Service,
            &td(),
            req(json!({"name": "tool", "owner": "o",
                       "reach": {"addresses": ["tool:8080"], "inbound": "tool:15006"}})),
        )
        .unwrap();
        assert_eq!(new.reach.addresses, ["tool:8080"]);
        assert_eq!(new.reach.inbound.as_deref(), Some("tool:15006"));
        let e = refusal(json!({"name": "a", "owner": "o", "reach": {"addresses": ["tool"]}}));
        assert_eq!(e.field, "reach.addresses[0]");
        assert!(e.message.contains("port is missing"), "{}", e.message);
    }

    #[test]
    fn labels_are_checked() {
        let e = refusal(json!({"name": "a", "owner": "o", "labels": {"bad key": "v"}}));
        assert_eq!(e.field, "labels.bad key");
        let e = refusal(json!({"name": "a", "owner": "o", "labels": {"k": "a\u{7}b"}}));
        assert_eq!(e.field, "labels.k");
        assert!(e.message.contains("control characters"));
    }

    #[test]
    fn unknown_request_fields_are_refused() {
        let err = serde_json::from_value::<RegisterRequest>(
            json!({"name": "a", "owner": "o", "colour": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"));
    }
}
