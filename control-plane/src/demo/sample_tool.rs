//! The demo's sample tool: an HTTP/1.1 server that answers every request with JSON describing what
//! it received, so the demo can show which identity the tool was told about.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running sample tool; the server stops when this is dropped.
pub struct SampleTool {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    accept_loop: JoinHandle<()>,
}

impl SampleTool {
    /// Starts the tool on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(describe(&req)) }
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
            requests,
            accept_loop,
        })
    }

    /// Where the tool listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests reached the tool so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for SampleTool {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// The JSON answer: method, path, and every identity header, repeated values joined with ", " so a
/// spoofed header that slipped through next to the real one would be visible.
fn describe(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut headers = Map::new();
    for name in req.headers().keys() {
        let name = name.as_str();
        if name.starts_with("x-mandate-") || name == "x-forwarded-client-cert" {
            let values: Vec<_> = req
                .headers()
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            headers.insert(name.to_owned(), Value::String(values.join(", ")));
        }
    }
    let body = json!({
        "tool": "sample-tool",
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
