//! Talking to the control plane: TLS that proves it is the control plane (by the join token's CA
//! pin on first contact, by the trust bundle afterwards, and always by its SPIFFE ID), and HTTP/2
//! (or HTTP/1.1, whichever ALPN picks) requests over it.

use std::borrow::Cow;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mandate_identity::tls::{SpiffePeer, SpiffeServerVerifier, TrustAnchors, certificate_error};
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::{ApiError, CONTROL_PLANE_PATH, JoinToken};
use rustls::{CertificateError, ClientConfig, OtherError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ControlPlaneUrl;
use crate::identity::Identity;
use crate::tls::{ALPN_H2, ALPN_HTTP1, PROVIDER};

/// Time allowed for TCP connect plus TLS handshake plus HTTP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JSON answer read from the control plane (SVIDs, ingest results, errors).
const MAX_ANSWER: usize = 4 << 20;

/// Why a request to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL's host cannot be a TLS server name.
    #[error("--control-plane host {0:?} is not a DNS name or IP address")]
    ServerName(String),
    /// TCP connect failed.
    #[error("cannot connect to the control plane at {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The server presented no CA certificate matching the join token's pin.
    #[error(
        "the server at {0} presented no CA certificate matching the join token's pin: it is not \
         the control plane that issued the token (nothing was sent to it)"
    )]
    PinMismatch(String),
    /// TLS handshake failed for another reason (including a wrong SPIFFE ID).
    #[error("TLS handshake with the control plane at {addr} failed: {source}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// The handshake error.
        source: io::Error,
    },
    /// Connecting (or the request) took too long.
    #[error("the control plane at {0} did not answer in time")]
    Timeout(String),
    /// HTTP failed.
    #[error("HTTP exchange with the control plane failed: {0}")]
    Http(#[from] hyper::Error),
    /// The control plane refused the request.
    #[error("the control plane answered {status}: {error}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Its `error` text (and field, when it named one).
        error: String,
    },
    /// The answer was not what the contract says.
    #[error("unexpected answer from the control plane: {0}")]
    Answer(String),
}

impl ClientError {
    /// Whether retrying later may succeed (the control plane is away or overloaded), as opposed
    /// to a refusal that will not change by itself.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout(_) | Self::Http(_) | Self::Tls { .. } => true,
            Self::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::ServerName(_) | Self::PinMismatch(_) | Self::Answer(_) => false,
        }
    }
}

/// What the control plane's certificate is verified against.
pub enum Trust<'a> {
    /// First contact: a CA certificate in the server's chain must match the token's pin; no
    /// client certificate is offered.
    Pin(&'a JoinToken),
    /// Afterwards: our trust bundle, and our SVID as client certificate.
    Identity(&'a Identity),
}

/// Where the control plane is and who it must prove to be.
pub struct ControlPlaneClient {
    url: ControlPlaneUrl,
    server_name: ServerName<'static>,
    trust_domain: TrustDomain,
    expected: SpiffeId,
}

impl ControlPlaneClient {
    /// A client for `url` in `trust_domain`; the server must present `spiffe://<td>/control-plane`.
    pub fn new(url: ControlPlaneUrl, trust_domain: TrustDomain) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(url.host.clone())
            .map_err(|_| ClientError::ServerName(url.host.clone()))?;
        let expected = format!("spiffe://{trust_domain}{CONTROL_PLANE_PATH}")
            .parse()
            .expect("a trust domain plus a fixed path is a SPIFFE ID");
        Ok(Self {
            url,
            server_name,
            trust_domain,
            expected,
        })
    }

    /// The control plane's URL.
    pub fn url(&self) -> &ControlPlaneUrl {
        &self.url
    }

    fn tls_config(&self, trust: &Trust<'_>) -> Result<Arc<ClientConfig>, rustls::Error> {
        let (anchor, resolver) = match trust {
            Trust::Pin(token) => (Anchor::Pin((*token).clone()), None),
            Trust::Identity(identity) => (
                Anchor::Roots(identity.roots.clone()),
                Some(identity.resolver.clone()),
            ),
        };
        // The pin or bundle first, then the SVID rules and the control plane's SPIFFE ID, then
        // the chain.
        let peer = SpiffePeer::new(self.trust_domain.clone()).exactly(self.expected.clone());
        let verifier = Arc::new(SpiffeServerVerifier::new(peer, anchor));
        let builder = ClientConfig::builder_with_provider(PROVIDER.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous() // the control plane is identified by its SPIFFE ID, checked by the verifier
            .with_custom_certificate_verifier(verifier);
        let mut config = match resolver {
            Some(resolver) => builder.with_client_cert_resolver(resolver),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }

    /// Opens a connection; the server must pass `trust`.
    pub async fn connect(&self, trust: Trust<'_>) -> Result<Connection, ClientError> {
        let addr = self.url.authority();
        let config = self.tls_config(&trust).map_err(|e| ClientError::Tls {
            addr: addr.clone(),
            source: io::Error::other(e),
        })?;
        let attempt = async {
            let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|source| ClientError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(config)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| {
                    if is_pin_mismatch(&source) {
                        ClientError::PinMismatch(addr.clone())
                    } else {
                        ClientError::Tls {
                            addr: addr.clone(),
                            source,
                        }
                    }
                })?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            let io = TokioIo::new(tls);
            let sender = if h2 {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "control plane connection ended");
                    }
                });
                Sender::H2(sender)
            } else {
                let (sender, conn) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "control plane connection ended");
                    }
                });
                Sender::H1(sender)
            };
            Ok(Connection {
                sender,
                authority: addr.clone(),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| ClientError::Timeout(self.url.authority()))?
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One HTTP connection to the control plane.
pub struct Connection {
    sender: Sender,
    authority: String,
}

impl Connection {
    /// Whether the connection can no longer carry requests.
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends a request for `path_and_query`; the answer's body is left to the caller.
    pub async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let h2 = matches!(self.sender, Sender::H2(_));
        // HTTP/2 carries scheme and authority in the URI; HTTP/1.1 in origin-form plus Host.
        let uri = if h2 {
            format!("https://{}{path_and_query}", self.authority)
        } else {
            path_and_query.to_owned()
        };
        let mut req = Request::builder().method(method).uri(uri);
        if !h2 {
            req = req.header(
                HOST,
                HeaderValue::from_str(&self.authority)
                    .map_err(|e| ClientError::Answer(e.to_string()))?,
            );
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Answer(format!("cannot build the request: {e}")))?;
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        Ok(resp)
    }

    /// POSTs `body` as JSON to `path` and reads the JSON answer; a non-2xx answer is an error
    /// carrying the control plane's `ApiError` text.
    pub async fn post_json<B: Serialize, R: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Answer(e.to_string()))?;
        let resp = self.send(Method::POST, path, Some(body)).await?;
        let status = resp.status();
        let bytes = read_body(resp.into_body()).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer(format!("{path}: {e}")))
    }
}

/// Reads a whole (small) answer body.
pub async fn read_body(body: Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => ClientError::Http(*e),
            Err(e) => ClientError::Answer(format!("answer body: {e}")),
        })
}

/// The error of a non-2xx answer, with the control plane's own words when it sent an `ApiError`.
pub fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => match api.field {
            Some(field) => format!("{} (field {field})", api.error),
            None => api.error,
        },
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    };
    ClientError::Api { status, error }
}

/// No certificate in the server's chain matches the join token's pin.
#[derive(Debug, thiserror::Error)]
#[error("no CA certificate in the chain matches the join token's pin")]
struct PinMismatch;

fn is_pin_mismatch(err: &io::Error) -> bool {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => {
            e.downcast_ref::<PinMismatch>().is_some()
        }
        _ => false,
    }
}

/// What the control plane's chain must reach.
#[derive(Debug)]
enum Anchor {
    /// Trust the CA certificate in the server's chain whose SHA-256 the token pins.
    Pin(JoinToken),
    /// Trust our bundle.
    Roots(Arc<RootCertStore>),
}

impl TrustAnchors for Anchor {
    fn roots(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Cow<'_, RootCertStore>, rustls::Error> {
        match self {
            Anchor::Roots(roots) => Ok(Cow::Borrowed(roots)),
            Anchor::Pin(token) => {
                let ca = intermediates
                    .iter()
                    .find(|der| token.pins(der))
                    .ok_or_else(|| certificate_error(PinMismatch))?;
                let mut pinned = RootCertStore::empty();
                pinned.add(ca.clone().into_owned())?;
                Ok(Cow::Owned(pinned))
            }
        }
    }
}
