//! MCP over streamable HTTP: recognising JSON-RPC messages in a request body, what policy sees of
//! them, the `Mcp-Method` / `Mcp-Name` header agreement rule, and JSON-RPC error responses.

use http::HeaderMap;
use mandate_rego::Value;

use crate::input::object;

/// JSON-RPC error code for `Mcp-Method` / `Mcp-Name` headers that disagree with the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// JSON-RPC error code for a call denied by policy (implementation-defined server error range).
pub const DENIED: i64 = -32001;

/// One JSON-RPC message of a request body.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request id (`Undefined` for notifications and absent ids).
    pub id: Value,
    /// The method, or `None` for a response the client sends back to the server.
    pub method: Option<String>,
    /// What policy sees as `input.mcp`.
    pub input: Value,
    /// The tool, prompt or resource the call names (`Mcp-Name` must agree with it).
    pub name: Option<String>,
}

impl Call {
    /// Whether a JSON-RPC response is expected (requests with an id).
    pub fn expects_response(&self) -> bool {
        self.method.is_some() && self.id != Value::Undefined && self.id != Value::Null
    }
}

/// The JSON-RPC content of a body.
#[derive(Debug, Clone)]
pub enum Rpc {
    /// A single message.
    Single(Call),
    /// A batch: authorised element by element, refused whole if any element is denied.
    Batch(Vec<Call>),
}

impl Rpc {
    /// The messages, in order.
    pub fn calls(&self) -> &[Call] {
        match self {
            Self::Single(c) => std::slice::from_ref(c),
            Self::Batch(cs) => cs,
        }
    }
}

/// Recognises JSON-RPC 2.0 in a parsed body: `Ok(None)` when the body is not JSON-RPC at all,
/// an error when it claims to be but is malformed.
pub fn parse(body: &Value) -> Result<Option<Rpc>, String> {
    match body {
        Value::Object(_) if is_jsonrpc(body) => Ok(Some(Rpc::Single(call(body)?))),
        Value::Array(items) if items.iter().any(is_jsonrpc) => {
            if items.iter().all(is_jsonrpc) {
                Ok(Some(Rpc::Batch(
                    items.iter().map(call).collect::<Result<_, _>>()?,
                )))
            } else {
                Err("a JSON-RPC batch may hold only JSON-RPC 2.0 messages".to_owned())
            }
        }
        _ => Ok(None),
    }
}

fn is_jsonrpc(v: &Value) -> bool {
    v["jsonrpc"] == Value::from("2.0")
}

fn string(v: &Value) -> Option<String> {
    v.as_string().ok().map(|s| s.to_string())
}

fn call(msg: &Value) -> Result<Call, String> {
    let id = msg["id"].clone();
    let method = match &msg["method"] {
        Value::Undefined => None,
        m => Some(string(m).ok_or("JSON-RPC \"method\" must be a string")?),
    };
    let params = &msg["params"];
    let (name_key, name) = match method.as_deref() {
        Some("tools/call") => ("tool", string(&params["name"])),
        Some("prompts/get") => ("prompt", string(&params["name"])),
        Some("resources/read") => ("uri", string(&params["uri"])),
        _ => ("", None),
    };
    if !name_key.is_empty() && name.is_none() {
        return Err(format!(
            "{} needs params.{}",
            method.as_deref().unwrap_or_default(),
            if name_key == "uri" { "uri" } else { "name" }
        ));
    }
    let arguments = if method.as_deref() == Some("tools/call") {
        params["arguments"].clone()
    } else {
        Value::Undefined
    };
    let input = object([
        (
            "method",
            method.clone().map_or(Value::Undefined, Value::from),
        ),
        ("id", id.clone()),
        (
            "response",
            if method.is_none() {
                true.into()
            } else {
                Value::Undefined
            },
        ),
        (
            "tool",
            if name_key == "tool" {
                name.clone().map_or(Value::Undefined, Value::from)
            } else {
                Value::Undefined
            },
        ),
        ("arguments", arguments),
        (
            "uri",
            if name_key == "uri" {
                name.clone().map_or(Value::Undefined, Value::from)
            } else {
                Value::Undefined
            },
        ),
        (
            "prompt",
            if name_key == "prompt" {
                name.clone().map_or(Value::Undefined, Value::from)
            } else {
                Value::Undefined
            },
        ),
    ]);
    Ok(Call {
        id,
        method,
        input,
        name,
    })
}

/// `Mcp-Method` and `Mcp-Name` headers, when sent, must say what the body says.
pub fn check_headers(headers: &HeaderMap, call: &Call) -> Result<(), String> {
    if let Some(h) = headers.get("mcp-method") {
        let h = String::from_utf8_lossy(h.as_bytes());
        if call.method.as_deref() != Some(h.as_ref()) {
            return Err(format!(
                "Mcp-Method header {h:?} disagrees with the body's method {:?}",
                call.method.as_deref().unwrap_or("")
            ));
        }
    }
    if let Some(h) = headers.get("mcp-name") {
        let h = String::from_utf8_lossy(h.as_bytes());
        if call.name.as_deref() != Some(h.as_ref()) {
            return Err(format!(
                "Mcp-Name header {h:?} disagrees with the body's name {:?}",
                call.name.as_deref().unwrap_or("")
            ));
        }
    }
    Ok(())
}

/// A JSON-RPC error response for `id` (null when the request had none).
pub fn error_response(
    id: &Value,
    code: i64,
    message: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    let id = match id {
        Value::Undefined => serde_json::Value::Null,
        id => serde_json::to_value(id).unwrap_or(serde_json::Value::Null),
    };
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": code, "message": message, "data": data},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Rpc>, String> {
        parse(&Value::from_json_str(s).unwrap())
    }

    #[test]
    fn tools_call_exposes_tool_and_arguments() {
        let rpc = parse_str(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":"rust"}}}"#)
            .unwrap()
            .unwrap();
        let call = &rpc.calls()[0];
        assert_eq!(call.input["tool"], Value::from("search"));
        assert_eq!(call.input["arguments"]["q"], Value::from("rust"));
        assert_eq!(call.input["id"], Value::from(7u64));
        assert!(call.expects_response());
    }

    #[test]
    fn resources_prompts_notifications_and_responses() {
        let r = parse_str(
            r#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.calls()[0].input["uri"], Value::from("file:///x"));
        let p = parse_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"greet"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.calls()[0].input["prompt"], Value::from("greet"));
        let n = parse_str(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .unwrap()
            .unwrap();
        assert!(!n.calls()[0].expects_response());
        let resp = parse_str(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(resp.calls()[0].input["response"], Value::from(true));
    }

    #[test]
    fn non_jsonrpc_and_malformed_bodies() {
        assert!(parse_str(r#"{"query":"x"}"#).unwrap().is_none());
        assert!(parse_str("[1,2]").unwrap().is_none());
        assert!(parse_str(r#"[{"jsonrpc":"2.0","method":"ping","id":1},{"x":1}]"#).is_err());
        assert!(
            parse_str(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#).is_err()
        );
        let batch = parse_str(r#"[{"jsonrpc":"2.0","method":"ping","id":1},{"jsonrpc":"2.0","method":"ping","id":2}]"#)
            .unwrap()
            .unwrap();
        assert_eq!(batch.calls().len(), 2);
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let rpc = parse_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}"#,
        )
        .unwrap()
        .unwrap();
        let call = &rpc.calls()[0];
        let mut h = HeaderMap::new();
        assert!(check_headers(&h, call).is_ok());
        h.insert("mcp-method", "tools/call".parse().unwrap());
        h.insert("mcp-name", "search".parse().unwrap());
        assert!(check_headers(&h, call).is_ok());
        h.insert("mcp-name", "delete_repo".parse().unwrap());
        assert!(check_headers(&h, call).unwrap_err().contains("Mcp-Name"));
        h.remove("mcp-name");
        h.insert("mcp-method", "tools/list".parse().unwrap());
        assert!(check_headers(&h, call).unwrap_err().contains("Mcp-Method"));
    }

    #[test]
    fn error_response_keeps_the_id() {
        let e = error_response(
            &Value::from("abc"),
            DENIED,
            "denied",
            serde_json::json!({"reason": "r"}),
        );
        assert_eq!(e["id"], "abc");
        assert_eq!(e["error"]["code"], DENIED);
        assert_eq!(
            error_response(
                &Value::Undefined,
                HEADER_MISMATCH,
                "m",
                serde_json::Value::Null
            )["id"],
            serde_json::Value::Null
        );
    }
}
