//! The demo's sample tool: an HTTP/1.1 server standing in for an MCP server with a small REST API.
//!
//! - `POST /mcp` takes JSON-RPC 2.0 (MCP's streamable HTTP transport, JSON responses only):
//!   `initialize`, `tools/list` and `tools/call` of its one tool, `search`; notifications get `202`.
//! - Any other request is answered with JSON describing what it received (method, path and the
//!   identity headers), so the demo can show which identity the tool was told about.
//!
//! Every request is also remembered, so the demo can prove what never reached the tool.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The MCP endpoint's path.
pub const MCP_PATH: &str = "/mcp";

/// One request as the tool received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `x-mandate-*` and `x-forwarded-client-cert` headers, repeated values joined with ", ".
    pub identity_headers: Map<String, Value>,
    /// For a JSON-RPC call: its method, and the tool's name for `tools/call`.
    pub rpc: Option<(String, Option<String>)>,
}

/// A running sample tool; the server stops when this is dropped.
pub struct SampleTool {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    accept_loop: JoinHandle<()>,
}

impl SampleTool {
    /// Starts the tool on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(req, &log).await) }
                    });
                    // A sidecar that drops its connection is not the tool's problem; nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            received,
            accept_loop,
        })
    }

    /// Where the tool listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests reached the tool so far.
    pub fn requests(&self) -> usize {
        self.received().len()
    }

    /// Every request that reached the tool so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for SampleTool {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn answer(req: Request<Incoming>, log: &Mutex<Vec<Received>>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let identity_headers = identity_headers(&parts.headers);
    // The demo's requests are tiny; a body that cannot be read is answered as an empty one.
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mcp = parts.method == Method::POST && parts.uri.path() == MCP_PATH;
    let message = if mcp {
        serde_json::from_slice::<Value>(&body).ok()
    } else {
        None
    };
    let rpc = message.as_ref().and_then(|m| {
        let method = m["method"].as_str()?.to_owned();
        let tool = (method == "tools/call")
            .then(|| m["params"]["name"].as_str().map(str::to_owned))
            .flatten();
        Some((method, tool))
    });
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            method: parts.method.to_string(),
            path: path.clone(),
            identity_headers: identity_headers.clone(),
            rpc,
        });

    if !mcp {
        return json_response(
            StatusCode::OK,
            &json!({
                "tool": "sample-tool",
                "method": parts.method.as_str(),
                "path": path,
                "headers": identity_headers,
            }),
        );
    }
    match message {
        None => json_response(
            StatusCode::BAD_REQUEST,
            &rpc_error(&Value::Null, -32700, "parse error: the body is not JSON"),
        ),
        Some(message) => match json_rpc(&message) {
            Some(reply) => json_response(StatusCode::OK, &reply),
            // A notification or a response: accepted, nothing to say (MCP's streamable HTTP).
            None => Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(Full::new(Bytes::new()))
                .expect("a static response is valid"),
        },
    }
}

/// The `x-mandate-*` and `x-forwarded-client-cert` headers; repeated values are joined with ", "
/// so a spoofed header that slipped through next to the real one would be visible.
fn identity_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for name in headers.keys() {
        let name = name.as_str();
        if name.starts_with("x-mandate-") || name == "x-forwarded-client-cert" {
            let values: Vec<_> = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            out.insert(name.to_owned(), Value::String(values.join(", ")));
        }
    }
    out
}

/// The reply to one JSON-RPC message; `None` for notifications and responses, which get none.
fn json_rpc(message: &Value) -> Option<Value> {
    let id = message.get("id")?;
    let Some(method) = message["method"].as_str() else {
        // A response to a request of ours (the tool sends none): nothing to answer.
        return None;
    };
    let result = match method {
        "initialize" => json!({
            "protocolVersion": message["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "sample-tool", "version": env!("CARGO_PKG_VERSION")},
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": [{
            "name": "search",
            "description": "Search the sample tool's documents",
            "inputSchema": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        }]}),
        "tools/call" => match message["params"]["name"].as_str() {
            Some("search") => {
                let query = message["params"]["arguments"]["query"]
                    .as_str()
                    .unwrap_or("");
                json!({"content": [{"type": "text", "text": format!("results for {query:?}: 3 documents")}]})
            }
            Some(other) => return Some(rpc_error(id, -32602, &format!("unknown tool {other:?}"))),
            None => return Some(rpc_error(id, -32602, "tools/call needs params.name")),
        },
        other => return Some(rpc_error(id, -32601, &format!("method not found: {other}"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
