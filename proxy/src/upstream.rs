//! Connections the sidecar originates: mTLS to peer sidecars (checking each route's identity) and
//! plain TCP to the local app, pooled by hyper's client per protocol version.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mandate_identity::svid::check_svid;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::discovery::Routes;
use crate::headers::ProxyBody;
use crate::identity::{Identity, IdentityStore};
use crate::metrics::{Direction, Metrics};
use crate::revocation::ConnectionGuard;
use crate::routes::{Route, split_host_port};
use crate::tls::{self, ALPN_H2};

/// Time allowed for TCP connect plus TLS handshake to a peer or the app.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this long: shorter than the peer's idle close
/// (`server::HEADER_READ_TIMEOUT`), so a pooled connection is never reused just as the peer
/// closes it.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// Why a connection to a peer sidecar or the app could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The destination has no route (only reachable through a pooled client keyed by route).
    #[error("no route for {0}")]
    NoRoute(String),
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Tcp {
        /// Address dialled.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// TLS handshake failed.
    #[error("TLS handshake with {addr} failed ({reason}): {source}")]
    Tls {
        /// Address dialled.
        addr: SocketAddr,
        /// Short reason label.
        reason: &'static str,
        /// The handshake error.
        source: io::Error,
    },
    /// The peer is a valid SVID, but not the one the route names.
    #[error("peer {addr} presented {presented}, but the route requires {expected}")]
    IdentityMismatch {
        /// Address dialled.
        addr: SocketAddr,
        /// The route's `id=`.
        expected: String,
        /// What the peer's certificate says.
        presented: String,
    },
    /// Connect plus handshake took too long.
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Tcp { addr, source })?;
    // Request/response traffic: never wait to coalesce small writes.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Opens mTLS to a route's peer with `config`, and checks the peer is exactly the route's identity.
pub async fn connect_mesh(
    route: &Route,
    config: Arc<ClientConfig>,
    metrics: &Metrics,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let addr = route.addr;
    let attempt = async {
        let tcp = tcp_connect(addr).await?;
        // Our verifier ignores the name: SPIFFE identity is the URI SAN, checked below.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| {
                let reason = tls::failure_reason(&source);
                metrics.handshake_failure(Direction::Outbound, reason);
                ConnectError::Tls {
                    addr,
                    reason,
                    source,
                }
            })?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| check_svid(leaf, &route.id_trust_domain()).ok())
            .map(|svid| svid.id);
        match presented {
            Some(id) if id == route.id => Ok(tls),
            other => {
                metrics.handshake_failure(Direction::Outbound, "peer_identity_mismatch");
                Err(ConnectError::IdentityMismatch {
                    addr,
                    expected: route.id.to_string(),
                    presented: other.map_or_else(|| "no SVID".to_owned(), |id| id.to_string()),
                })
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
}

impl Route {
    /// The trust domain of the route's expected identity (the verifier already enforced ours).
    fn id_trust_domain(&self) -> mandate_identity::TrustDomain {
        self.id
            .trust_domain_str()
            .parse()
            .expect("a parsed SPIFFE ID has a valid trust domain")
    }
}

/// A pooled TLS stream to a peer sidecar that tells hyper which HTTP version ALPN chose, and fails
/// (so hyper drops it from the pool, in use or idle) once the registry marks the peer inactive.
pub struct MeshStream {
    tls: TlsStream<TcpStream>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    _tracked: ConnectionGuard,
}

impl MeshStream {
    fn new(tls: TlsStream<TcpStream>, tracked: ConnectionGuard) -> Self {
        Self {
            tls,
            cut: Box::pin(tracked.token().clone().cancelled_owned()),
            _tracked: tracked,
        }
    }

    /// Polling the cancellation registers the waker, so hyper's pending read wakes up to fail.
    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer is no longer active in the registry",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        if self.tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(cx)?;
        Pin::new(&mut this.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The HTTP version a pooled client speaks; a request leaves with the version it arrived with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2.
    Http2,
}

impl From<http::Version> for HttpVersion {
    fn from(v: http::Version) -> Self {
        if v == http::Version::HTTP_2 {
            Self::Http2
        } else {
            Self::Http1
        }
    }
}

/// hyper connector to peer sidecars: the URI authority names the route (`host:port`).
#[derive(Clone)]
pub struct MeshConnector {
    routes: Arc<Routes>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    version: HttpVersion,
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = ConnectError;
    type Future = BoxFuture<Result<Self::Response, ConnectError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map_or("", |a| a.as_str());
            let route = split_host_port(authority, 80)
                .ok()
                .and_then(|(host, port)| this.routes.current().find(&host, port).cloned())
                .ok_or_else(|| ConnectError::NoRoute(authority.to_owned()))?;
            let identity: Arc<Identity> = this.identity.current();
            let config = match this.version {
                HttpVersion::Http1 => identity.client_http1.clone(),
                HttpVersion::Http2 => identity.client_h2.clone(),
            };
            let tls = connect_mesh(&route, config, &this.metrics).await?;
            let tracked = this
                .identity
                .revocations()
                .track(Arc::from(route.id.as_str()));
            Ok(TokioIo::new(MeshStream::new(tls, tracked)))
        })
    }
}

/// hyper connector to the local app: always dials the one `--app` address, whatever the URI says.
#[derive(Clone)]
pub struct AppConnector(SocketAddr);

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = BoxFuture<Result<Self::Response, ConnectError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move { connect_app(addr).await.map(TokioIo::new) })
    }
}

/// Two pooled clients over one kind of connector, one per HTTP version.
pub struct VersionedClients<C> {
    http1: Client<C, ProxyBody>,
    http2: Client<C, ProxyBody>,
}

impl<C> VersionedClients<C>
where
    C: tower_service::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send,
    C::Future: Send + Unpin,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(connector: impl Fn(HttpVersion) -> C) -> Self {
        let build = |version: HttpVersion| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .http2_only(version == HttpVersion::Http2)
                .build(connector(version))
        };
        Self {
            http1: build(HttpVersion::Http1),
            http2: build(HttpVersion::Http2),
        }
    }

    /// The client for a request of `version`.
    pub fn for_version(&self, version: http::Version) -> &Client<C, ProxyBody> {
        match HttpVersion::from(version) {
            HttpVersion::Http1 => &self.http1,
            HttpVersion::Http2 => &self.http2,
        }
    }
}

/// Pooled clients to peer sidecars.
pub type MeshClients = VersionedClients<MeshConnector>;

/// Clients that dial routes from `routes` with the identity in force at connect time.
pub fn mesh_clients(
    routes: Arc<Routes>,
    identity: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
) -> MeshClients {
    VersionedClients::new(|version| MeshConnector {
        routes: routes.clone(),
        identity: identity.clone(),
        metrics: metrics.clone(),
        version,
    })
}

/// Pooled clients to the local app (plain HTTP/1.1, or h2c with prior knowledge).
pub type AppClients = VersionedClients<AppConnector>;

/// Clients that dial the app at `addr`.
pub fn app_clients(addr: SocketAddr) -> AppClients {
    VersionedClients::new(|_| AppConnector(addr))
}

/// Dials the app for an opaque TCP stream.
pub async fn connect_app(addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, tcp_connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
}

/// Finds a [`ConnectError`] in an error's source chain (hyper wraps connector errors).
pub fn find_connect_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(ce) = e.downcast_ref::<ConnectError>() {
            return Some(ce);
        }
        current = e.source();
    }
    None
}
