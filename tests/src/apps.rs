//! Sample upstream apps that sit behind a tool sidecar.
//!
//! [`App`] is one hyper 1 server (HTTP/1.1 and h2c prior knowledge on the same port) with these paths:
//! - anything else: echo — JSON `{method, uri, path, version, headers, body}` of what it received;
//! - `/sse`: `text/event-stream`; sends event `one`, waits for [`App::release`], then `two`, `three`, ends;
//! - `/stream/response`: sends chunk `first-chunk`, waits for [`App::release`], then `second-chunk`, ends;
//! - `/stream/request`: reports every request-body chunk on [`App::request_chunks`] as it arrives, then
//!   answers JSON `{"received": <bytes>}`;
//! - `/hold`: waits for [`App::release`], then answers `released`;
//! - `/mandate.test.Echo/...`: gRPC-like — answers `application/grpc` with the request body echoed and
//!   trailers `grpc-status: 0`, `grpc-message: ok`, `x-echo-trailer: kept`.
//!
//! Every request is recorded (head only) on arrival, so a test can assert an app was *not* reached.
//!
//! [`WsApp`] is a tokio-tungstenite WebSocket echo server that records the handshake headers.

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// The head of a request an app received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target as received.
    pub uri: String,
    /// HTTP version.
    pub version: Version,
    /// Headers as received.
    pub headers: HeaderMap,
}

impl Seen {
    /// All values of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

struct State {
    seen: Mutex<Vec<Seen>>,
    count: watch::Sender<usize>,
    gate: Semaphore,
    chunks_tx: mpsc::UnboundedSender<Bytes>,
    chunks_rx: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
}

/// The sample HTTP app (see the module docs for its paths).
pub struct App {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl App {
    /// Starts the app on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (chunks_tx, chunks_rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            gate: Semaphore::new(0),
            chunks_tx,
            chunks_rx: Mutex::new(Some(chunks_rx)),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Where the app listens (give this to the tool sidecar's `--app`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The heads of all requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("app state lock").clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.state.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Lets one waiting `/sse`, `/stream/response` or `/hold` handler continue.
    pub fn release(&self) {
        self.state.gate.add_permits(1);
    }

    /// The request-body chunks `/stream/request` receives, in arrival order (can be taken once).
    pub fn request_chunks(&self) -> mpsc::UnboundedReceiver<Bytes> {
        self.state
            .chunks_rx
            .lock()
            .expect("app state lock")
            .take()
            .expect("request_chunks() is taken once")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        map.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    map.into()
}

fn full(b: impl Into<Bytes>) -> RespBody {
    http_body_util::Full::new(b.into()).boxed()
}

/// A response body fed frame by frame from a channel.
fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, RespBody) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let seen = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: req.version(),
        headers: req.headers().clone(),
    };
    st.seen.lock().expect("app state lock").push(seen.clone());
    st.count.send_modify(|c| *c += 1);

    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/sse" => {
            let (tx, body) = channel_body();
            let st = st.clone();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from("data: one\n\n"))).await;
                if let Ok(p) = st.gate.acquire().await {
                    p.forget();
                }
                let _ = tx.send(Frame::data(Bytes::from("data: two\n\n"))).await;
                let _ = tx.send(Frame::data(Bytes::from("data: three\n\n"))).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(body)
        }
        "/stream/response" => {
            let (tx, body) = channel_body();
            let st = st.clone();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from("first-chunk"))).await;
                if let Ok(p) = st.gate.acquire().await {
                    p.forget();
                }
                let _ = tx.send(Frame::data(Bytes::from("second-chunk"))).await;
            });
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(body)
        }
        "/stream/request" => {
            let mut body = req.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(data) = f.into_data() {
                            received += data.len();
                            let _ = st.chunks_tx.send(data);
                        }
                    }
                    Err(_) => break,
                }
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    serde_json::json!({ "received": received }).to_string(),
                ))
        }
        "/hold" => {
            if let Ok(p) = st.gate.acquire().await {
                p.forget();
            }
            Response::builder().body(full("released"))
        }
        p if p.starts_with("/mandate.test.Echo/") => {
            let request = req.into_body().collect().await.map(|c| c.to_bytes());
            let request = request.unwrap_or_default();
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(request)).await;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().expect("header value"));
                trailers.insert("grpc-message", "ok".parse().expect("header value"));
                trailers.insert("x-echo-trailer", "kept".parse().expect("header value"));
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
        }
        _ => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let json = serde_json::json!({
                "method": seen.method,
                "uri": seen.uri,
                "path": path,
                "version": format!("{:?}", seen.version),
                "headers": headers_json(&seen.headers),
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(full(json.to_string()))
        }
    };
    Ok(resp.expect("valid response"))
}

/// A WebSocket echo server (tokio-tungstenite) that records each handshake's headers.
pub struct WsApp {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl WsApp {
    /// Starts the server on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let hs = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let hs = hs.clone();
                tokio::spawn(async move {
                    // The callback's error type is tungstenite's, not ours to shrink.
                    #[allow(clippy::result_large_err)]
                    let record =
                        |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                            hs.lock()
                                .expect("ws state lock")
                                .push(req.headers().clone());
                            Ok(resp)
                        };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                return;
                            }
                        } else if msg.is_close() {
                            let _ = ws.close(None).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            handshakes,
            task,
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Headers of every WebSocket handshake received so far.
    pub fn handshakes(&self) -> Vec<HeaderMap> {
        self.handshakes.lock().expect("ws state lock").clone()
    }
}

impl Drop for WsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw TCP echo server that counts the connections it accepted and the bytes it received.
pub struct TcpEcho {
    addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpEcho {
    /// Starts the server on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (conns, received) = (connections.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let received = received.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        received.fetch_add(n, Ordering::SeqCst);
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            connections,
            bytes,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes received so far.
    pub fn bytes_received(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}
