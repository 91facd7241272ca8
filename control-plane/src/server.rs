//! The listeners: the API over TLS 1.3 (client certificates optional, verified as SVIDs of our
//! trust domain when presented; HTTP/1.1 and HTTP/2) and plain-HTTP metrics and health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mandate_identity::TrustDomain;
use mandate_identity::svid::{SvidError, check_svid};
use mandate_identity::tls::{
    ClientAuth, PROVIDER, SpiffeClientVerifier, SpiffePeer, roots_from_pem,
};
use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, OtherError, ServerConfig};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

use crate::api::extract::{PeerCertificate, PeerIdentity};
use crate::push::Hub;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send request headers (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address cannot be bound.
    #[error("cannot listen on {addr} ({flag})")]
    Bind {
        /// The flag that gave it.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS configuration cannot be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The API's TLS configuration: TLS 1.3, optional SVID client auth, ALPN h2 and http/1.1.
pub fn tls_config(
    trust_domain: &TrustDomain,
    ca_pem: &str,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, ServerError> {
    let roots = roots_from_pem(ca_pem.as_bytes())
        .map_err(|e| ServerError::Tls(format!("CA certificate: {e}")))?;
    // Client certificates are optional; when presented they must chain to the CA and follow the
    // X.509-SVID rules for our trust domain.
    let verifier = SpiffeClientVerifier::new(
        SpiffePeer::new(trust_domain.clone()),
        Arc::new(roots),
        ClientAuth::Optional,
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Binds `addr`, naming `flag` on failure.
pub async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { flag, addr, source })
}

/// Serves the API on `listener` until `cancel` fires, then lets in-flight requests finish
/// (connections are tracked by `tracker`).
pub async fn serve_api(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    trust_domain: TrustDomain,
    router: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let cancel = cancel.clone();
        let trust_domain = trust_domain.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    if let Some(e) = svid_refusal(&e) {
                        tracing::info!(reason = e.reason(), error = %e, "refused a client certificate");
                    }
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            // The verifier already checked chain and SVID rules; read the identity once.
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| {
                    let svid = check_svid(leaf, &trust_domain).ok()?;
                    Some((
                        PeerIdentity(svid.id),
                        PeerCertificate(Arc::from(leaf.as_ref())),
                    ))
                });
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    if let Some((peer, cert)) = &peer {
                        req.extensions_mut().insert(peer.clone());
                        req.extensions_mut().insert(cert.clone());
                    }
                    let mut router = router.clone();
                    async move { router.call(req.map(axum::body::Body::new)).await }
                });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The X.509-SVID rule a client certificate broke, when that is why its handshake failed.
fn svid_refusal(err: &std::io::Error) -> Option<&SvidError> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            e.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// Liveness and readiness of this replica.
#[derive(Clone)]
pub struct Health {
    /// Set once every listener is up.
    pub started: Arc<AtomicBool>,
    /// The push hub (ready only while its store refreshes succeed).
    pub hub: Arc<Hub>,
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn metrics_router(health: Health) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    crate::metrics::render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    if !health.started.load(Ordering::Relaxed) {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
                    } else if !health.hub.is_healthy() {
                        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
                    } else {
                        "ready\n".into_response()
                    }
                }
            }),
        )
}

/// Serves plain HTTP on `listener` until `cancel` fires.
pub async fn serve_plain(listener: TcpListener, router: Router, cancel: CancellationToken) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
