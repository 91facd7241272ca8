//! The policy input document, built once per decision from what the sidecar already knows.
//! Field by field it follows docs/policy.md; names keep the opa-envoy-plugin habits.

use std::time::SystemTime;

use http::request::Parts;
use mandate_identity::SpiffeId;
use mandate_rego::Value;

use crate::delegation::Verified;
use crate::mcp::Call;
use crate::metrics::Direction;

/// Where a call goes.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// Host as addressed.
    pub host: &'a str,
    /// Port as addressed.
    pub port: u16,
    /// The identity the destination proves, when it is in the mesh.
    pub id: Option<&'a SpiffeId>,
}

/// The HTTP request of a call (absent for opaque TCP).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Method, URI, version and headers (identity headers already stripped).
    pub parts: &'a Parts,
    /// `http` or `https` (inbound calls arrive over mTLS).
    pub scheme: &'static str,
    /// Body size, when known.
    pub size: Option<u64>,
    /// The body parsed as JSON, when it is JSON and within the limit.
    pub body: Option<&'a Value>,
}

/// Everything known about one call at decision time.
#[derive(Debug, Clone, Copy)]
pub struct CallFacts<'a> {
    /// Outbound or inbound.
    pub direction: Direction,
    /// The caller.
    pub source: &'a SpiffeId,
    /// The destination.
    pub destination: Destination<'a>,
    /// The HTTP request, or `None` for an opaque TCP connection or tunnel.
    pub request: Option<RequestFacts<'a>>,
    /// The MCP (JSON-RPC) message being decided, if any.
    pub mcp: Option<&'a Call>,
    /// The verified delegation the call carries, if any (only verified claims reach policy).
    pub delegation: Option<&'a Verified>,
}

/// Builds an object, leaving out undefined values.
pub fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    let mut value = Value::new_object();
    let map = value.as_object_mut().expect("a new object is an object");
    for (key, field) in fields {
        if field != Value::Undefined {
            map.insert(Value::from(key), field);
        }
    }
    value
}

fn optional<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Undefined, Into::into)
}

/// `{spiffe_id, trust_domain, kind, name}` of a workload.
pub fn workload(id: &SpiffeId) -> Value {
    object([
        ("spiffe_id", id.as_str().into()),
        ("trust_domain", id.trust_domain_str().into()),
        ("kind", id.kind().as_str().into()),
        ("name", id.name().into()),
    ])
}

/// The whole input document; `registry` is the source's registry entry (or null).
pub fn document(facts: &CallFacts<'_>, registry: Value) -> Value {
    let dest = facts.destination;
    object([
        ("direction", facts.direction.as_str().into()),
        ("source", workload(facts.source)),
        (
            "destination",
            object([
                ("host", dest.host.into()),
                ("port", u64::from(dest.port).into()),
                ("spiffe_id", optional(dest.id.map(SpiffeId::as_str))),
                ("name", optional(dest.id.map(SpiffeId::name))),
                ("external", dest.id.is_none().into()),
            ]),
        ),
        (
            "request",
            facts.request.map_or(Value::Undefined, |r| request(&r)),
        ),
        (
            "mcp",
            facts.mcp.map_or(Value::Undefined, |c| c.input.clone()),
        ),
        (
            "tcp",
            if facts.request.is_none() {
                object([("port", u64::from(dest.port).into())])
            } else {
                Value::Undefined
            },
        ),
        (
            "delegation",
            facts
                .delegation
                .map_or(Value::Undefined, |v| v.input.clone()),
        ),
        ("registry", registry),
        (
            "time",
            humantime::format_rfc3339_micros(SystemTime::now())
                .to_string()
                .into(),
        ),
    ])
}

fn request(r: &RequestFacts<'_>) -> Value {
    let uri = &r.parts.uri;
    let mut headers = Value::new_object();
    let map = headers.as_object_mut().expect("object");
    for name in r.parts.headers.keys() {
        let joined = r
            .parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(Value::from(name.as_str()), Value::from(joined));
    }
    object([
        ("method", r.parts.method.as_str().into()),
        ("path", uri.path().into()),
        ("parsed_path", parsed_path(uri.path())),
        ("query", query(uri.query().unwrap_or(""))),
        ("headers", headers),
        ("scheme", r.scheme.into()),
        ("protocol", format!("{:?}", r.parts.version).into()),
        ("size", optional(r.size)),
        ("body", r.body.cloned().unwrap_or(Value::Undefined)),
    ])
}

/// Path segments, percent-decoded: `/a/b%20c` → `["a", "b c"]`; `/` → `[]`.
fn parsed_path(path: &str) -> Value {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return Value::new_array();
    }
    trimmed
        .split('/')
        .map(|seg| {
            Value::from(
                percent_encoding::percent_decode_str(seg)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
        .collect::<Vec<_>>()
        .into()
}

/// Query parameters as `{name: [values…]}`, decoded.
fn query(q: &str) -> Value {
    let mut out: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        out.entry(k.into_owned())
            .or_default()
            .push(Value::from(v.into_owned()));
    }
    let mut value = Value::new_object();
    let map = value.as_object_mut().expect("object");
    for (k, vs) in out {
        map.insert(Value::from(k), Value::from(vs));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_carries_identity_destination_and_request() {
        let source: SpiffeId = "spiffe://mandate.local/agent/research".parse().unwrap();
        let tool: SpiffeId = "spiffe://mandate.local/service/tool".parse().unwrap();
        let req = http::Request::post("http://tool:8080/api/v1/a%20b?x=1&x=2&y=")
            .header("Content-Type", "application/json")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let body = Value::from_json_str(r#"{"k":"v"}"#).unwrap();
        let facts = CallFacts {
            direction: Direction::Outbound,
            source: &source,
            destination: Destination {
                host: "tool",
                port: 8080,
                id: Some(&tool),
            },
            request: Some(RequestFacts {
                parts: &parts,
                scheme: "http",
                size: Some(9),
                body: Some(&body),
            }),
            mcp: None,
            delegation: None,
        };
        let doc = document(&facts, Value::Null);
        let json: serde_json::Value = serde_json::from_str(&doc.to_json_str().unwrap()).unwrap();
        assert_eq!(json["direction"], "outbound");
        assert_eq!(json["source"]["kind"], "agent");
        assert_eq!(json["source"]["name"], "research");
        assert_eq!(
            json["destination"]["spiffe_id"],
            "spiffe://mandate.local/service/tool"
        );
        assert_eq!(json["destination"]["external"], false);
        assert_eq!(json["request"]["method"], "POST");
        assert_eq!(
            json["request"]["parsed_path"],
            serde_json::json!(["api", "v1", "a b"])
        );
        assert_eq!(
            json["request"]["query"],
            serde_json::json!({"x": ["1", "2"], "y": [""]})
        );
        assert_eq!(
            json["request"]["headers"]["content-type"],
            "application/json"
        );
        assert_eq!(json["request"]["headers"]["accept"], "a, b");
        assert_eq!(json["request"]["protocol"], "HTTP/1.1");
        assert_eq!(json["request"]["body"]["k"], "v");
        assert!(json.get("tcp").is_none() && json.get("mcp").is_none());
        assert!(json.get("delegation").is_none());
        assert_eq!(json["registry"], serde_json::Value::Null);
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn tcp_calls_have_no_request_but_a_tcp_section() {
        let source: SpiffeId = "spiffe://td/agent/a".parse().unwrap();
        let facts = CallFacts {
            direction: Direction::Outbound,
            source: &source,
            destination: Destination {
                host: "db",
                port: 5432,
                id: None,
            },
            request: None,
            mcp: None,
            delegation: None,
        };
        let json: serde_json::Value =
            serde_json::from_str(&document(&facts, Value::Null).to_json_str().unwrap()).unwrap();
        assert!(json.get("request").is_none());
        assert_eq!(json["tcp"]["port"], 5432);
        assert_eq!(json["destination"]["external"], true);
    }
}
