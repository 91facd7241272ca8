//! Policy bundles: what an operator uploads is compiled and its Rego tests run before anything is
//! stored; an accepted bundle is signed with the CA key and becomes active.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mandate_identity::ca::CertificateAuthority;
use mandate_rego::{Module, Policy, PolicyError, TestStatus, Value, run_tests};
use mandate_wire::SignedBundle;
use serde::{Deserialize, Serialize};

use crate::api::error::HttpError;
use crate::store::{BundleSummary, NewBundle, Store};

/// Most modules in one bundle.
pub const MAX_MODULES: usize = 1000;
/// Longest module name.
pub const MAX_MODULE_NAME_LEN: usize = 255;
/// Longest bundle message.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// How long one policy evaluation may take during validation (the sidecar sets its own limit).
const EVAL_LIMIT: Duration = Duration::from_secs(1);

/// `POST /v1/policies`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// Rego modules by file name (`authz.rego`).
    pub modules: BTreeMap<String, String>,
    /// The bundle's JSON data (an object); `registry` in it is replaced by the pushed registry.
    #[serde(default)]
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
    /// What changed, for `mandate policy list`.
    #[serde(default)]
    pub message: String,
}

/// `GET /v1/policies`.
#[derive(Debug, Serialize)]
pub struct BundleList {
    /// The active version, if any.
    pub active: Option<u64>,
    /// Every bundle, newest first.
    pub bundles: Vec<BundleSummary>,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request itself is malformed.
    #[error("{message}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The modules do not compile (or define no entry point).
    #[error("policy bundle refused: it does not compile")]
    Compile(Vec<String>),
    /// Some of the bundle's own tests fail.
    #[error("policy bundle refused: {failed} of {total} Rego tests failed")]
    Tests {
        /// Failing tests.
        failed: usize,
        /// All tests.
        total: usize,
        /// One line per failing test.
        messages: Vec<String>,
    },
}

impl From<Refusal> for HttpError {
    fn from(r: Refusal) -> Self {
        match &r {
            Refusal::Invalid { field, message } => {
                HttpError::invalid(field.clone(), message.clone())
            }
            Refusal::Compile(messages) => {
                HttpError::invalid("modules", r.to_string()).with_messages(messages.clone())
            }
            Refusal::Tests { messages, .. } => {
                HttpError::invalid("modules", r.to_string()).with_messages(messages.clone())
            }
        }
    }
}

/// A bundle that compiled and passed its tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Modules by name.
    pub modules: BTreeMap<String, String>,
    /// Data as JSON text (an object).
    pub data: String,
    /// What changed.
    pub message: String,
    /// Tests that passed (all of them).
    pub tests_passed: u64,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks the request's shape: module names, count and message.
fn check_shape(req: &PushRequest) -> Result<(), Refusal> {
    if req.modules.is_empty() {
        return Err(invalid(
            "modules",
            "a bundle needs at least one .rego module",
        ));
    }
    if req.modules.len() > MAX_MODULES {
        return Err(invalid(
            "modules",
            format!("a bundle has at most {MAX_MODULES} modules"),
        ));
    }
    for name in req.modules.keys() {
        let ok = name.len() <= MAX_MODULE_NAME_LEN
            && name.ends_with(".rego")
            && name.len() > ".rego".len()
            && !name.starts_with('/')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
            && name
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
        if !ok {
            return Err(invalid(
                format!("modules.{name}"),
                format!(
                    "module name {name:?} is not valid: a relative path of letters, digits, '.', '_', \
                     '-' and '/' ending in .rego"
                ),
            ));
        }
    }
    if req.message.chars().count() > MAX_MESSAGE_LEN {
        return Err(invalid(
            "message",
            format!("message is longer than {MAX_MESSAGE_LEN} characters"),
        ));
    }
    Ok(())
}

/// Compiles the bundle (it must define `data.mandate.authz.decision` or `allow`) and runs every
/// `test_*` rule; any compile error or failing test refuses it. CPU-bound: call off the runtime.
pub fn check(req: PushRequest) -> Result<Checked, Refusal> {
    check_shape(&req)?;
    let data_text =
        serde_json::to_string(&req.data.unwrap_or_default()).expect("a JSON map serialises");
    let data = Value::from_json_str(&data_text)
        .map_err(|e| invalid("data", format!("data is not usable as policy data: {e}")))?;
    let modules: Vec<Module> = req
        .modules
        .iter()
        .map(|(name, text)| Module {
            path: name.clone(),
            text: text.clone(),
        })
        .collect();
    Policy::compile(&modules, data.clone(), EVAL_LIMIT).map_err(compile_refusal)?;
    let outcomes = run_tests(&modules, data).map_err(compile_refusal)?;
    let total = outcomes.len();
    let messages: Vec<String> = outcomes
        .iter()
        .filter_map(|t| {
            let name = format!("{}.{}", t.package, t.name);
            match &t.status {
                TestStatus::Pass => None,
                TestStatus::Fail => Some(format!("FAIL {name}")),
                TestStatus::Error(e) => Some(format!("ERROR {name}: {e}")),
            }
        })
        .collect();
    if !messages.is_empty() {
        return Err(Refusal::Tests {
            failed: messages.len(),
            total,
            messages,
        });
    }
    Ok(Checked {
        modules: req.modules,
        data: data_text,
        message: req.message,
        tests_passed: total as u64,
    })
}

fn compile_refusal(e: PolicyError) -> Refusal {
    let text = match e {
        PolicyError::Compile(message) => message,
        other => other.to_string(),
    };
    Refusal::Compile(
        text.lines()
            .map(str::to_owned)
            .filter(|l| !l.trim().is_empty())
            .collect(),
    )
}

/// Validates, signs and stores a bundle, which becomes active.
pub async fn push(
    store: &Store,
    ca: &Arc<CertificateAuthority>,
    req: PushRequest,
) -> Result<BundleSummary, HttpError> {
    let checked = tokio::task::spawn_blocking(move || check(req))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "policy validation task failed");
            HttpError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "policy validation failed unexpectedly",
            )
        })??;
    let (modules, data) = (checked.modules.clone(), checked.data.clone());
    let ca = ca.clone();
    let summary = store
        .insert_bundle(
            NewBundle {
                modules: checked.modules,
                data: checked.data,
                message: checked.message,
                tests_passed: checked.tests_passed,
            },
            move |version| SignedBundle::sign(version, modules, data, |input| ca.sign_bytes(input)),
        )
        .await?;
    tracing::info!(version = summary.version, digest = %summary.digest, "policy bundle accepted and activated");
    Ok(summary)
}

/// Re-activates a stored bundle (rollback or roll forward).
pub async fn activate(store: &Store, version: u64) -> Result<BundleSummary, HttpError> {
    let summary = store.activate_bundle(version).await?;
    tracing::info!(version, "policy bundle activated");
    Ok(summary)
}

/// Lists the bundles and the active version.
pub async fn list(store: &Store) -> Result<BundleList, HttpError> {
    let bundles = store.bundles().await?;
    Ok(BundleList {
        active: bundles.iter().find(|b| b.active).map(|b| b.version),
        bundles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "package mandate.authz\n\ndefault allow := false\n\nallow if input.ok\n";
    const TESTS: &str = "package mandate.authz_test\n\nimport data.mandate.authz\n\n\
        test_allows if authz.allow with input as {\"ok\": true}\n\n\
        test_denies if not authz.allow with input as {\"ok\": false}\n";

    fn req(modules: &[(&str, &str)]) -> PushRequest {
        PushRequest {
            modules: modules
                .iter()
                .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
                .collect(),
            data: None,
            message: "m".into(),
        }
    }

    #[test]
    fn a_compiling_bundle_whose_tests_pass_is_accepted() {
        let checked = check(req(&[("authz.rego", POLICY), ("authz_test.rego", TESTS)])).unwrap();
        assert_eq!(checked.tests_passed, 2);
        assert_eq!(checked.data, "{}");
        assert_eq!(checked.message, "m");
    }

    #[test]
    fn a_bundle_that_does_not_compile_is_refused_with_the_compilers_words() {
        let err = check(req(&[(
            "authz.rego",
            "package mandate.authz\n\ndecision := {\n",
        )]))
        .unwrap_err();
        let Refusal::Compile(messages) = &err else {
            panic!("not a compile refusal: {err:?}");
        };
        assert!(messages.join("\n").contains("authz.rego"), "{messages:?}");
        let http = HttpError::from(err);
        assert_eq!(http.status, 400);
        assert!(!http.body.messages.is_empty());
    }

    #[test]
    fn a_bundle_without_an_entry_point_is_refused() {
        let err = check(req(&[("p.rego", "package other\n\nx := 1\n")])).unwrap_err();
        let Refusal::Compile(messages) = err else {
            panic!("not a compile refusal");
        };
        assert!(
            messages[0].contains("data.mandate.authz.decision"),
            "{messages:?}"
        );
    }

    #[test]
    fn a_failing_test_refuses_the_bundle_and_is_named() {
        let failing = format!("{TESTS}\ntest_always_fails if {{\n\tfalse\n}}\n");
        let err = check(req(&[
            ("authz.rego", POLICY),
            ("authz_test.rego", &failing),
        ]))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy bundle refused: 1 of 3 Rego tests failed"
        );
        let Refusal::Tests { messages, .. } = &err else {
            panic!("not a test refusal");
        };
        assert_eq!(
            messages,
            &["FAIL data.mandate.authz_test.test_always_fails"]
        );
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let err = check(req(&[])).unwrap_err();
        assert!(matches!(err, Refusal::Invalid { ref field, .. } if field == "modules"));
        for bad in [
            "authz.txt",
            "../authz.rego",
            "/abs.rego",
            "a//b.rego",
            ".rego",
        ] {
            let err = check(req(&[(bad, POLICY)])).unwrap_err();
            assert!(
                matches!(&err, Refusal::Invalid { field, .. } if field == &format!("modules.{bad}")),
                "{bad}: {err:?}"
            );
        }
        let err =
            serde_json::from_str::<PushRequest>(r#"{"modules": {}, "data": [1]}"#).unwrap_err();
        assert!(err.to_string().contains("map"), "{err}");
    }

    #[test]
    fn data_is_kept_as_the_json_text_that_will_be_signed() {
        let mut r = req(&[("authz.rego", POLICY)]);
        r.data = Some(serde_json::from_str(r#"{"b": 1, "a": [true]}"#).unwrap());
        let checked = check(r).unwrap();
        assert_eq!(checked.tests_passed, 0);
        let back: serde_json::Value = serde_json::from_str(&checked.data).unwrap();
        assert_eq!(back["a"][0], true);
    }
}
