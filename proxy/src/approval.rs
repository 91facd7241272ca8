//! Per-action approval: what identifies one call for an approval (its fingerprint), the policy's
//! `require_approval` answer, and the headers an approved call carries between sidecars.
//!
//! The flow: the policy answers `require_approval`; the sidecar asks the control plane for an
//! approval (`POST APPROVALS_PATH`) and refuses the call with its id; a person approves it; the agent
//! retries with `x-mandate-approval: ID`; the policy again requires approval, and the sidecar
//! redeems the approval (`POST redeem_path(ID)`, atomic, single use, bound to the fingerprint): the
//! call goes ahead and its decision records who approved it.

use std::fmt::Write as _;

use http::HeaderName;
use mandate_rego::Value;

/// Sent by an agent's sidecar to the destination's sidecar with a call it let through on an
/// approval it redeemed itself: the approval's id (`x-mandate-approval`) and its approver.
pub static APPROVED_BY: HeaderName = HeaderName::from_static("x-mandate-approved-by");

/// The longest approval id accepted in `x-mandate-approval`.
const MAX_ID: usize = 128;

/// What an approval is bound to: the call, as both the request for it and its redemption see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallShape<'a> {
    /// The caller's SPIFFE ID.
    pub source: &'a str,
    /// Destination host, as addressed.
    pub host: &'a str,
    /// Destination port.
    pub port: u16,
    /// HTTP method.
    pub method: &'a str,
    /// HTTP path and query.
    pub path: &'a str,
    /// JSON-RPC method, for an MCP call.
    pub mcp_method: Option<&'a str>,
    /// The tool, resource or prompt named.
    pub name: Option<&'a str>,
    /// The tool's arguments (MCP), or the JSON body of another call.
    pub arguments: Option<&'a Value>,
    /// The person on whose behalf, when delegated.
    pub subject: Option<&'a str>,
}

/// Hex SHA-256 over the length-prefixed fields of the call (absent fields encoded distinctly from
/// empty ones; arguments as canonical JSON, keys sorted): two calls that differ in any field get
/// different fingerprints, and the same call always the same one.
pub fn fingerprint(call: &CallShape<'_>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |v: Option<&[u8]>| match v {
        Some(bytes) => {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        }
        None => ctx.update(&u64::MAX.to_be_bytes()),
    };
    let port = call.port.to_string();
    let arguments = call.arguments.map(|a| {
        let mut out = String::new();
        canonical_json(&serde_json::to_value(a).unwrap_or_default(), &mut out);
        out
    });
    field(Some(b"mandate-approval-v1"));
    field(Some(call.source.as_bytes()));
    field(Some(call.host.as_bytes()));
    field(Some(port.as_bytes()));
    field(Some(call.method.as_bytes()));
    field(Some(call.path.as_bytes()));
    field(call.mcp_method.map(str::as_bytes));
    field(call.name.map(str::as_bytes));
    field(arguments.as_deref().map(str::as_bytes));
    field(call.subject.map(str::as_bytes));
    let digest = ctx.finish();
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Whether a policy verdict asks for approval: the decision document's `require_approval`
/// (absent or null: no). Anything but a boolean is a malformed decision (denied, fail closed).
pub fn requires_approval(document: &Value) -> Result<bool, String> {
    match &document["require_approval"] {
        Value::Undefined | Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        other => Err(format!(
            "data.mandate.authz.decision.require_approval must be a boolean, got {}",
            serde_json::to_string(other).unwrap_or_else(|_| "an unprintable value".into())
        )),
    }
}

/// An approval id as sent in `x-mandate-approval`, if it is one (letters, digits, `-`, `_`).
pub fn approval_id(value: &http::HeaderValue) -> Result<String, String> {
    let text = value
        .to_str()
        .map_err(|_| "x-mandate-approval is not printable ASCII".to_owned())?
        .trim();
    if text.is_empty()
        || text.len() > MAX_ID
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "x-mandate-approval {text:?} is not an approval id (letters, digits, '-' and '_', at most {MAX_ID})"
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(json: &str) -> Value {
        Value::from_json_str(json).unwrap()
    }

    fn shape<'a>(arguments: Option<&'a Value>) -> CallShape<'a> {
        CallShape {
            source: "spiffe://mandate.local/agent/a",
            host: "tool",
            port: 8080,
            method: "POST",
            path: "/mcp",
            mcp_method: Some("tools/call"),
            name: Some("delete_repo"),
            arguments,
            subject: Some("alice@example.com"),
        }
    }

    #[test]
    fn the_fingerprint_is_stable_and_ignores_key_order() {
        let a = args(r#"{"repo": "x", "opts": {"force": true, "depth": 2}}"#);
        let b = args(r#"{"opts": {"depth": 2, "force": true}, "repo": "x"}"#);
        let fa = fingerprint(&shape(Some(&a)));
        assert_eq!(fa.len(), 64);
        assert_eq!(fa, fingerprint(&shape(Some(&b))));
        assert_eq!(fa, fingerprint(&shape(Some(&a))));
        // Known values (computed independently), so the encoding does not drift unnoticed: a
        // sidecar upgraded between asking and redeeming must still match.
        assert_eq!(
            fingerprint(&CallShape::default()),
            "1030c193fd275d64310e1cbef6ae896b65f22cbf630afb6d73ecb3bb72db6d82"
        );
        let repo = args(r#"{"repo": "x"}"#);
        assert_eq!(
            fingerprint(&shape(Some(&repo))),
            "cd541d7064c8f04955f68f171e2b584255834dbfc73517d4c862c0b3e902013b"
        );
    }

    #[test]
    fn every_field_changes_the_fingerprint() {
        let a = args(r#"{"repo": "x"}"#);
        let other = args(r#"{"repo": "y"}"#);
        let base = fingerprint(&shape(Some(&a)));
        let variants = [
            CallShape {
                source: "spiffe://mandate.local/agent/b",
                ..shape(Some(&a))
            },
            CallShape {
                host: "tool2",
                ..shape(Some(&a))
            },
            CallShape {
                port: 8081,
                ..shape(Some(&a))
            },
            CallShape {
                method: "PUT",
                ..shape(Some(&a))
            },
            CallShape {
                path: "/mcp?x=1",
                ..shape(Some(&a))
            },
            CallShape {
                mcp_method: None,
                ..shape(Some(&a))
            },
            CallShape {
                name: Some("delete_repos"),
                ..shape(Some(&a))
            },
            shape(Some(&other)),
            shape(None),
            CallShape {
                subject: None,
                ..shape(Some(&a))
            },
            CallShape {
                subject: Some(""),
                ..shape(Some(&a))
            },
        ];
        let mut seen = std::collections::HashSet::from([base]);
        for v in &variants {
            assert!(seen.insert(fingerprint(v)), "{v:?} collides");
        }
        // Length prefixes: moving a byte from one field to the next changes it too.
        let split1 = CallShape {
            host: "ab",
            method: "c",
            ..CallShape::default()
        };
        let split2 = CallShape {
            host: "a",
            method: "bc",
            ..CallShape::default()
        };
        assert_ne!(fingerprint(&split1), fingerprint(&split2));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let mut out = String::new();
        canonical_json(
            &serde_json::json!({"b": [{"z": 1, "a": "\"q\""}], "a": null}),
            &mut out,
        );
        assert_eq!(out, r#"{"a":null,"b":[{"a":"\"q\"","z":1}]}"#);
    }

    #[test]
    fn require_approval_is_a_boolean_or_absent() {
        assert_eq!(requires_approval(&args(r#"{"allow": false}"#)), Ok(false));
        assert_eq!(
            requires_approval(&args(r#"{"allow": false, "require_approval": true}"#)),
            Ok(true)
        );
        assert_eq!(
            requires_approval(&args(r#"{"allow": true, "require_approval": false}"#)),
            Ok(false)
        );
        assert_eq!(
            requires_approval(&args(r#"{"allow": true, "require_approval": null}"#)),
            Ok(false)
        );
        // The boolean entry point has no document to ask.
        assert_eq!(requires_approval(&Value::Bool(true)), Ok(false));
        let err =
            requires_approval(&args(r#"{"allow": false, "require_approval": "yes"}"#)).unwrap_err();
        assert!(err.contains("must be a boolean"), "{err}");
    }

    #[test]
    fn approval_ids_are_checked_before_they_reach_a_url() {
        let ok = http::HeaderValue::from_static(" 0191d0c2-7f3a-7b4e-9c1d-5e6f7a8b9c0d ");
        assert_eq!(
            approval_id(&ok).unwrap(),
            "0191d0c2-7f3a-7b4e-9c1d-5e6f7a8b9c0d"
        );
        for bad in ["", "../admin", "a/b", "a?b", "a b"] {
            assert!(
                approval_id(&http::HeaderValue::from_static(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
