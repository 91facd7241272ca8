//! Grants: a person's consent for an agent to act on their behalf, within scopes that must lie
//! inside the agent's ceiling ([`scope`]), for a purpose, until an expiry (minutes by default),
//! optionally as part of a task whose closing ends them all. Revoking or closing reaches sidecars
//! through the push stream (the delegation revision).

pub mod scope;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::error::HttpError;
use crate::registry::{MAX_SCOPES, validate_name, validate_scopes};
use crate::store::{
    Grant, GrantQuery, GrantStatus, NewGrant, Store, StoreError, WorkloadKind, WorkloadStatus,
};

/// Longest grant lifetime: grants are ephemeral; standing authority belongs in the ceiling.
pub const MAX_GRANT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest subject, approver, or revoker.
pub const MAX_PERSON_LEN: usize = 256;
/// Longest purpose.
pub const MAX_PURPOSE_LEN: usize = 1024;
/// Longest task name.
pub const MAX_TASK_LEN: usize = 128;
/// Largest constraints object, as JSON text.
pub const MAX_CONSTRAINTS_BYTES: usize = 16 << 10;
/// Default number of grants a listing returns.
pub const DEFAULT_GRANT_LIMIT: u32 = 100;
/// Most grants a listing returns.
pub const MAX_GRANT_LIMIT: u32 = 10_000;
/// Who revoked or closed, when the request does not say.
pub const DEFAULT_REVOKER: &str = "admin";

/// `POST /v1/grants`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGrantRequest {
    /// The agent's name.
    pub agent: String,
    /// The person on whose behalf it may act.
    pub subject: String,
    /// What it may do for them: scope objects, each within the agent's ceiling.
    pub scopes: Vec<Value>,
    /// Conditions the policy applies on top of the scopes (reference policy: `arguments`,
    /// `require_approval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Map<String, Value>>,
    /// Why.
    pub purpose: String,
    /// The task it belongs to; closing the task ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Who approved it.
    pub approved_by: String,
    /// How long it lasts, in seconds (at most a day; default `--grant-ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `POST /v1/grants/{id}/revoke` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeGrantRequest {
    /// Who revokes it (default `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// `POST /v1/tasks/{task}/close` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseTaskRequest {
    /// Who closes it (default `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<String>,
}

/// The answer to closing a task.
#[derive(Debug, Clone, Serialize)]
pub struct ClosedTask {
    /// The task.
    pub task: String,
    /// The grants closed now (those already ended are not repeated).
    pub closed: Vec<Grant>,
}

/// `GET /v1/grants` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantParams {
    /// The agent's name.
    pub agent: Option<String>,
    /// The person.
    pub subject: Option<String>,
    /// active, revoked, closed or expired.
    pub status: Option<GrantStatus>,
    /// The task.
    pub task: Option<String>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), HttpError> {
    if text.trim().is_empty() {
        return Err(HttpError::invalid(field, format!("{field} is required")));
    }
    if text.chars().count() > max {
        return Err(HttpError::invalid(
            field,
            format!("{field} is longer than {max} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(HttpError::invalid(
            field,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

/// Checks a task name: 1–128 characters, no control characters, no `/`.
pub fn check_task(field: &str, task: &str) -> Result<(), HttpError> {
    check_text(field, task, MAX_TASK_LEN)?;
    if task.contains('/') || task != task.trim() {
        return Err(HttpError::invalid(
            field,
            format!("{field} may not contain '/' or start or end with spaces"),
        ));
    }
    Ok(())
}

/// A grant id (a UUID) in canonical form; errors name `field`.
pub fn parse_grant_id(field: &str, text: &str) -> Result<String, HttpError> {
    uuid::Uuid::try_parse(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            HttpError::invalid(
                field,
                format!(
                    "{:?} is not a grant id (a UUID such as 01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b)",
                    text.chars().take(64).collect::<String>()
                ),
            )
        })
}

/// Checks the scopes' shapes: a non-empty array of scope objects (keys and value types as in a
/// ceiling), every glob pattern one that compiles.
pub fn check_scopes(scopes: &[Value]) -> Result<(), HttpError> {
    if scopes.is_empty() {
        return Err(HttpError::invalid(
            "scopes",
            "scopes must name at least one scope, such as {\"host\": \"tool\", \"tool\": \"read_*\"}",
        ));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(HttpError::invalid(
            "scopes",
            format!("scopes has at most {MAX_SCOPES} scopes"),
        ));
    }
    validate_scopes("scopes", scopes)?;
    for (i, scope) in scopes.iter().enumerate() {
        let Value::Object(scope) = scope else {
            continue;
        };
        for (key, value) in scope {
            if let Value::String(pattern) = value {
                scope::check_glob(key, pattern)
                    .map_err(|why| HttpError::invalid(format!("scopes[{i}].{key}"), why))?;
            }
        }
    }
    Ok(())
}

/// Checks the constraints: a JSON object of at most 16 KiB; the keys the reference policy reads
/// must have their shape (`arguments`: an object; `require_approval`: an array of scopes).
pub fn check_constraints(constraints: &Map<String, Value>) -> Result<(), HttpError> {
    let size = serde_json::to_string(constraints).map_or(usize::MAX, |s| s.len());
    if size > MAX_CONSTRAINTS_BYTES {
        return Err(HttpError::invalid(
            "constraints",
            format!("constraints must be at most {MAX_CONSTRAINTS_BYTES} bytes of JSON"),
        ));
    }
    if let Some(arguments) = constraints.get("arguments")
        && !arguments.is_object()
    {
        return Err(HttpError::invalid(
            "constraints.arguments",
            "arguments is an object of argument name to pattern, such as {\"path\": \"/tmp/*\"}",
        ));
    }
    if let Some(required) = constraints.get("require_approval") {
        let Value::Array(scopes) = required else {
            return Err(HttpError::invalid(
                "constraints.require_approval",
                "require_approval is an array of scopes, such as [{\"tool\": \"delete_*\"}]",
            ));
        };
        validate_scopes("constraints.require_approval", scopes)?;
    }
    Ok(())
}

/// Validates a creation request against the store (the agent must be registered and active, the
/// scopes within its ceiling) and stores the grant.
pub async fn create(
    store: &Store,
    default_ttl: Duration,
    req: CreateGrantRequest,
    now_ms: i64,
) -> Result<Grant, HttpError> {
    validate_name(&req.agent).map_err(|e| HttpError::invalid("agent", e.message))?;
    check_text("subject", &req.subject, MAX_PERSON_LEN)?;
    check_text("purpose", &req.purpose, MAX_PURPOSE_LEN)?;
    check_text("approved_by", &req.approved_by, MAX_PERSON_LEN)?;
    if let Some(task) = &req.task {
        check_task("task", task)?;
    }
    check_scopes(&req.scopes)?;
    if let Some(constraints) = &req.constraints {
        check_constraints(constraints)?;
    }
    let ttl = match req.ttl_seconds {
        None => default_ttl,
        Some(secs) if secs >= 1 && secs <= MAX_GRANT_TTL.as_secs() => Duration::from_secs(secs),
        Some(_) => {
            return Err(HttpError::invalid(
                "ttl_seconds",
                format!(
                    "ttl_seconds must be 1-{} (a grant lasts at most a day)",
                    MAX_GRANT_TTL.as_secs()
                ),
            ));
        }
    };
    let agent = match store.workload(WorkloadKind::Agent, &req.agent).await {
        Ok(agent) => agent,
        Err(StoreError::NotFound { .. }) => {
            return Err(HttpError::invalid(
                "agent",
                format!("agent {} is not registered", req.agent),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if agent.status != WorkloadStatus::Active {
        return Err(HttpError::invalid(
            "agent",
            format!(
                "agent {} is {}, not active: grants go only to active agents",
                agent.name, agent.status
            ),
        ));
    }
    scope::check_within(&req.scopes, &agent.ceiling)
        .map_err(|excess| HttpError::invalid(excess.field(), excess.message))?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let grant = store
        .insert_grant(&NewGrant {
            id: uuid::Uuid::now_v7().to_string(),
            agent: agent.name,
            agent_id: agent.spiffe_id,
            subject: req.subject.trim().to_owned(),
            scopes: req.scopes,
            constraints: req.constraints,
            purpose: req.purpose.trim().to_owned(),
            task: req.task,
            approved_by: req.approved_by.trim().to_owned(),
            approved_at: now_ms,
            created_at: now_ms,
            expires_at: now_ms.saturating_add(ttl_ms),
        })
        .await?;
    tracing::info!(
        grant = %grant.id,
        agent = %grant.agent,
        subject = %grant.subject,
        approved_by = %grant.approved_by,
        task = ?grant.task,
        "grant created"
    );
    Ok(grant)
}

/// Turns list parameters into a store query; errors name the parameter.
pub fn query(p: GrantParams) -> Result<GrantQuery, HttpError> {
    if let Some(agent) = &p.agent {
        validate_name(agent).map_err(|e| HttpError::invalid("agent", e.message))?;
    }
    if let Some(task) = &p.task {
        check_task("task", task)?;
    }
    let limit = p.limit.unwrap_or(DEFAULT_GRANT_LIMIT);
    if !(1..=MAX_GRANT_LIMIT).contains(&limit) {
        return Err(HttpError::invalid(
            "limit",
            format!("limit must be 1-{MAX_GRANT_LIMIT}"),
        ));
    }
    Ok(GrantQuery {
        agent: p.agent,
        subject: p.subject,
        status: p.status,
        task: p.task,
        limit,
    })
}

/// Who revokes or closes: as given (checked), or [`DEFAULT_REVOKER`].
pub fn revoker(field: &str, by: Option<String>) -> Result<String, HttpError> {
    match by {
        None => Ok(DEFAULT_REVOKER.to_owned()),
        Some(by) => {
            check_text(field, &by, MAX_PERSON_LEN)?;
            Ok(by.trim().to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(e: HttpError) -> String {
        e.body.field.unwrap_or_default()
    }

    #[test]
    fn scopes_must_be_a_non_empty_array_of_valid_scopes() {
        assert_eq!(field(check_scopes(&[]).unwrap_err()), "scopes");
        assert_eq!(
            field(check_scopes(&[json!("tool")]).unwrap_err()),
            "scopes[0]"
        );
        assert_eq!(
            field(check_scopes(&[json!({"host": "a"}), json!({"tool": 1})]).unwrap_err()),
            "scopes[1].tool"
        );
        assert_eq!(
            field(check_scopes(&[json!({"colour": "red"})]).unwrap_err()),
            "scopes[0].colour"
        );
        let bad_glob = check_scopes(&[json!({"tool": "read_["})]).unwrap_err();
        assert_eq!(bad_glob.body.field.as_deref(), Some("scopes[0].tool"));
        assert!(
            bad_glob.body.error.contains("not a valid glob"),
            "{bad_glob:?}"
        );
        check_scopes(&[json!({"host": "tool", "tool": "read_*", "port": 8080})]).unwrap();
    }

    #[test]
    fn constraints_the_reference_policy_reads_must_have_their_shape() {
        let c = |v: Value| v.as_object().unwrap().clone();
        check_constraints(&c(json!({"arguments": {"path": "/tmp/*"}, "max_rows": 10}))).unwrap();
        assert_eq!(
            field(check_constraints(&c(json!({"arguments": ["x"]}))).unwrap_err()),
            "constraints.arguments"
        );
        assert_eq!(
            field(check_constraints(&c(json!({"require_approval": {"tool": "x"}}))).unwrap_err()),
            "constraints.require_approval"
        );
        assert_eq!(
            field(check_constraints(&c(json!({"require_approval": [{"tool": 5}]}))).unwrap_err()),
            "constraints.require_approval[0].tool"
        );
        let big = c(json!({"x": "y".repeat(MAX_CONSTRAINTS_BYTES)}));
        assert_eq!(field(check_constraints(&big).unwrap_err()), "constraints");
    }

    #[test]
    fn tasks_fit_in_a_path_segment() {
        check_task("task", "JIRA-123").unwrap();
        check_task("task", "ticket #5").unwrap();
        assert!(check_task("task", "").is_err());
        assert!(check_task("task", "a/b").is_err());
        assert!(check_task("task", " a").is_err());
        assert!(check_task("task", "a\nb").is_err());
        assert!(check_task("task", &"x".repeat(MAX_TASK_LEN + 1)).is_err());
    }

    #[test]
    fn grant_ids_are_uuids() {
        assert_eq!(
            parse_grant_id("id", "01980F3A-7C2E-7B61-9A4E-3F0C1D2E5A6B").unwrap(),
            "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b"
        );
        assert_eq!(
            field(parse_grant_id("grant_id", "g1").unwrap_err()),
            "grant_id"
        );
    }

    #[test]
    fn list_parameters_are_checked() {
        assert_eq!(
            query(GrantParams::default()).unwrap().limit,
            DEFAULT_GRANT_LIMIT
        );
        let err = query(GrantParams {
            limit: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(field(err), "limit");
        let err = query(GrantParams {
            agent: Some("Bad Name".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(field(err), "agent");
    }

    #[test]
    fn the_revoker_defaults_to_admin() {
        assert_eq!(revoker("revoked_by", None).unwrap(), "admin");
        assert_eq!(revoker("revoked_by", Some(" bob ".into())).unwrap(), "bob");
        assert_eq!(
            field(revoker("revoked_by", Some("  ".into())).unwrap_err()),
            "revoked_by"
        );
    }
}
