//! The demo's HTTP/1.1 client: one connection per request, so each call is independent of the last.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one request may take before the demo calls it a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI or a header could not be put into a request.
    #[error("cannot build the request: {0}")]
    Build(#[from] hyper::http::Error),
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where we tried to connect.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed response, …).
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http {
        /// The server we talked to.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
    /// No complete response within the timeout.
    #[error("no response from {0} within {REQUEST_TIMEOUT:?}")]
    Timeout(SocketAddr),
}

/// A fully read response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body (demo responses are small).
    pub body: Bytes,
}

impl Response {
    /// The body as text, lossily decoded, for printing.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The value of `name` if present and valid text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `GET target` to the server at `addr` with `Host: host` and the extra `headers`.
///
/// `target` is written as given: an absolute URI (`http://tool:8080/x`) makes this an explicit-proxy
/// request, a path (`/metrics`) an ordinary one.
pub async fn get(
    addr: SocketAddr,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<Response, ClientError> {
    send(addr, Method::GET, target, host, headers, Bytes::new()).await
}

/// Sends `POST target` with a JSON body, accepting JSON or an event stream back as MCP's streamable
/// HTTP transport does.
pub async fn post_json(
    addr: SocketAddr,
    target: &str,
    host: &str,
    body: &serde_json::Value,
) -> Result<Response, ClientError> {
    let headers = [
        (CONTENT_TYPE.as_str(), "application/json"),
        (ACCEPT.as_str(), "application/json, text/event-stream"),
    ];
    let body = Bytes::from(body.to_string());
    send(addr, Method::POST, target, host, &headers, body).await
}

/// Sends one request (an empty `body` sends none) and reads the whole response.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Response, ClientError> {
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .header(HOST, host);
    for (name, value) in headers {
        request = request.header(
            HeaderName::from_bytes(name.as_bytes()).map_err(hyper::http::Error::from)?,
            HeaderValue::from_str(value).map_err(hyper::http::Error::from)?,
        );
    }
    let request = request.body(Full::new(body))?;
    tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, request))
        .await
        .map_err(|_| ClientError::Timeout(addr))?
}

async fn exchange(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<Response, ClientError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let http = |source| ClientError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection future drives the socket; it ends when the response is read and `sender` drops.
    let driver = tokio::spawn(conn);
    let response = sender.send_request(request).await.map_err(http)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(http)?.to_bytes();
    drop(sender);
    driver.abort();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
