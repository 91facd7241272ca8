//! Clients the tests use: plain HTTP/1.1 and h2c over TCP, and raw TLS probes of a sidecar's inbound port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::pki::Svid;

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Collected {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Trailers, when the response had any.
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, or an error showing the body.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON (status {}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A header's value as a string ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// Reads a response whole, trailers included.
pub async fn collect(resp: Response<Incoming>) -> anyhow::Result<Collected> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.context("read the response body")?;
    let trailers = collected.trailers().cloned();
    Ok(Collected {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// An HTTP/1.1 client connection (keep-alive: send several requests in turn).
pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
}

/// The request body type the clients send.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, anyhow::Error>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

impl Http1 {
    /// Opens a TCP connection to `addr` and starts HTTP/1.1 on it.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        Self::handshake(tcp).await
    }

    /// Starts HTTP/1.1 on an established stream.
    pub async fn handshake<S>(io: S) -> anyhow::Result<Self>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Self { sender })
    }

    /// Sends `req` and returns the response head with a streaming body.
    pub async fn send(&mut self, req: Request<BoxBody>) -> anyhow::Result<Response<Incoming>> {
        self.sender.ready().await.context("connection closed")?;
        Ok(self.sender.send_request(req).await?)
    }

    /// Sends `req` and reads the response whole.
    pub async fn fetch(&mut self, req: Request<BoxBody>) -> anyhow::Result<Collected> {
        collect(self.send(req).await?).await
    }
}

/// An HTTP/2 prior-knowledge (h2c, or h2 over TLS) client connection; clones share the connection.
#[derive(Clone)]
pub struct Http2 {
    sender: hyper::client::conn::http2::SendRequest<BoxBody>,
}

impl Http2 {
    /// Opens a TCP connection to `addr` and starts HTTP/2 with prior knowledge.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        Self::handshake(tcp).await
    }

    /// Starts HTTP/2 on an established stream.
    pub async fn handshake<S>(io: S) -> anyhow::Result<Self>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// Sends `req` and returns the response head with a streaming body.
    pub async fn send(&mut self, req: Request<BoxBody>) -> anyhow::Result<Response<Incoming>> {
        self.sender.ready().await.context("connection closed")?;
        Ok(self.sender.send_request(req).await?)
    }

    /// Sends `req` and reads the response whole.
    pub async fn fetch(&mut self, req: Request<BoxBody>) -> anyhow::Result<Collected> {
        collect(self.send(req).await?).await
    }
}

/// `GET http://{addr}{path}` on a fresh connection, read whole (admin endpoints, plain apps).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Collected> {
    let mut c = Http1::connect(addr).await?;
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(empty())?;
    c.fetch(req).await
}

/// An absolute-form request through an explicit proxy: `METHOD url` sent to `proxy`.
pub fn proxy_request(method: &str, url: &str) -> http::request::Builder {
    let uri: http::Uri = url.parse().expect("absolute URL");
    let host = uri.authority().expect("URL has an authority").to_string();
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
}

/// `GET url` through the explicit proxy at `proxy`, on a fresh connection, with extra `headers`.
pub async fn proxy_get(
    proxy: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Collected> {
    let mut req = proxy_request("GET", url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Http1::connect(proxy).await?.fetch(req.body(empty())?).await
}

/// A frame source for a streaming request body: push chunks with [`BodySender::send`], drop to end.
pub struct BodySender(tokio::sync::mpsc::Sender<anyhow::Result<hyper::body::Frame<Bytes>>>);

impl BodySender {
    /// Sends one chunk.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> anyhow::Result<()> {
        self.0
            .send(Ok(hyper::body::Frame::data(chunk.into())))
            .await
            .map_err(|_| anyhow::anyhow!("request body receiver gone"))
    }
}

/// A streaming body and its sender.
pub fn channel_body() -> (BodySender, BoxBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        BodySender(tx),
        http_body_util::StreamBody::new(stream).boxed(),
    )
}

/// Reads the next data frame of `body` (skipping trailers), or None at the end.
pub async fn next_data<B>(body: &mut B) -> anyhow::Result<Option<Bytes>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// A rustls verifier that accepts any server certificate (it still checks handshake signatures).
///
/// The refusal probes test the *server's* verification of the client; whether the client verifies
/// the server is covered by the sidecar-to-sidecar tests.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client config presenting `client` (or no certificate) and offering `alpn`.
pub fn tls_config(client: Option<&Svid>, alpn: &[&str]) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match client {
        Some(svid) => builder.with_client_auth_cert(svid.chain(), svid.private_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// Connects to a sidecar's inbound listener with mTLS as `client`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    client: Option<&Svid>,
    alpn: &[&str],
) -> anyhow::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(tls_config(client, alpn)?));
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let name = ServerName::try_from("sidecar.mandate.local")?;
    Ok(connector.connect(name, tcp).await?)
}

/// What happened when a client tried to talk HTTP to an inbound listener.
#[derive(Debug)]
pub struct Probe {
    /// The client's own address (what the sidecar logs as the peer address).
    pub local_addr: SocketAddr,
    /// Whether the TLS handshake completed from the client's point of view (with TLS 1.3 the client
    /// finishes before the server has judged its certificate, so this can be true for a refused client).
    pub handshake_completed: bool,
    /// Whatever bytes of an HTTP response came back (empty when refused).
    pub response: String,
    /// The error that ended the exchange, if any.
    pub error: Option<String>,
}

impl Probe {
    /// Whether an HTTP response came back.
    pub fn got_http_response(&self) -> bool {
        self.response.starts_with("HTTP/")
    }
}

/// Connects to `addr` with mTLS as `client` (ALPN http/1.1), sends `GET /probe`, reads what comes back.
pub async fn probe_inbound(addr: SocketAddr, client: Option<&Svid>) -> anyhow::Result<Probe> {
    let connector = TlsConnector::from(Arc::new(tls_config(client, &["http/1.1"])?));
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let local_addr = tcp.local_addr()?;
    let name = ServerName::try_from("sidecar.mandate.local")?;
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            return Ok(Probe {
                local_addr,
                handshake_completed: false,
                response: String::new(),
                error: Some(e.to_string()),
            });
        }
    };
    let mut buf = Vec::new();
    let exchange = async {
        tls.write_all(b"GET /probe HTTP/1.1\r\nhost: tool:8080\r\nconnection: close\r\n\r\n")
            .await?;
        tls.flush().await?;
        let mut chunk = [0u8; 4096];
        loop {
            match tls.read(&mut chunk).await? {
                0 => return Ok::<(), std::io::Error>(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let error = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 10s".to_owned()),
    };
    let response = String::from_utf8_lossy(&buf).into_owned();
    Ok(Probe {
        local_addr,
        handshake_completed: true,
        response,
        error,
    })
}

/// Sends `CONNECT authority` on `tcp` (an explicit proxy's listener) and returns the response head,
/// up to and including the blank line; bytes after it stay unread, for the tunnel.
pub async fn connect_tunnel(tcp: &mut TcpStream, authority: &str) -> anyhow::Result<String> {
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = crate::within(
            Duration::from_secs(10),
            "the CONNECT answer",
            tcp.read(&mut byte),
        )
        .await??;
        anyhow::ensure!(
            n == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
