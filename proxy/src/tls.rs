//! rustls configuration for SPIFFE mTLS: the shared SPIFFE verifiers (chain, X.509-SVID rules)
//! made to refuse workloads the registry marks inactive, a resolver that never serves an expired
//! SVID, and the classification of handshake failures into metric reasons.

use std::io;
use std::sync::Arc;

use mandate_identity::TrustDomain;
use mandate_identity::svid::{Svid, SvidError};
use mandate_identity::tls::{
    AdmitPeer, ClientAuth, SpiffeClientVerifier, SpiffePeer, SpiffeServerVerifier,
    certificate_error,
};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::UnixTime;

use crate::revocation::{Inactive, Revocations};

pub use mandate_identity::tls::PROVIDER;

/// ALPN for HTTP/2 between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 between sidecars.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN that marks an opaque TCP stream (database and other non-HTTP protocols).
pub const ALPN_TCP: &[u8] = b"mandate-tcp";

/// The registry's say: a suspended or revoked workload's certificate is refused.
impl AdmitPeer for Revocations {
    fn admit(&self, svid: &Svid) -> Result<(), rustls::Error> {
        self.check(svid.id.as_str()).map_err(certificate_error)
    }
}

/// Peers in both directions: X.509-SVIDs of our trust domain, of workloads that are not inactive,
/// the SVID rules checked before the chain so refusals are labelled by the rule broken.
fn peer(trust_domain: &TrustDomain, revocations: Arc<Revocations>) -> SpiffePeer {
    SpiffePeer::new(trust_domain.clone()).admitted_by(revocations)
}

/// Serves our SVID and our SVID only while it is within its validity period.
#[derive(Debug)]
pub struct SvidResolver {
    key: Arc<CertifiedKey>,
    not_after: i64,
}

impl SvidResolver {
    /// Wraps a certified key whose leaf expires at `not_after` (Unix seconds).
    pub fn new(key: Arc<CertifiedKey>, not_after: i64) -> Self {
        Self { key, not_after }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        if UnixTime::now().as_secs() as i64 > self.not_after {
            tracing::error!(
                not_after = self.not_after,
                "our SVID has expired; refusing to present it (renew it: new --cert/--key files, or renewal by the control plane)"
            );
            return None;
        }
        Some(self.key.clone())
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds the inbound server config: mandatory SVID client auth, ALPN h2 / http/1.1 / mandate-tcp.
pub fn server_config(
    trust_domain: &TrustDomain,
    roots: Arc<RootCertStore>,
    resolver: Arc<SvidResolver>,
    revocations: Arc<Revocations>,
) -> Result<ServerConfig, rustls::Error> {
    // Inbound: no client certificate, no connection.
    let verifier =
        SpiffeClientVerifier::new(peer(trust_domain, revocations), roots, ClientAuth::Required)
            .map_err(|e| rustls::Error::General(format!("trust bundle unusable: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
    Ok(config)
}

/// Builds an outbound client config offering exactly one ALPN protocol.
pub fn client_config(
    trust_domain: &TrustDomain,
    roots: Arc<RootCertStore>,
    resolver: Arc<SvidResolver>,
    revocations: Arc<Revocations>,
    alpn: &[u8],
) -> Result<ClientConfig, rustls::Error> {
    // Outbound: which SPIFFE ID the server must be is checked by the caller after the handshake,
    // per route.
    let verifier = Arc::new(SpiffeServerVerifier::new(
        peer(trust_domain, revocations),
        roots,
    ));
    let mut config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // SPIFFE: the server is identified by its URI SAN, not a DNS name.
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A short, stable label saying why a TLS handshake failed, for metrics and logs.
pub fn failure_reason(err: &io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => "eof_during_handshake",
            io::ErrorKind::TimedOut => "handshake_timeout",
            _ => "io",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(ce) => certificate_reason(ce),
        rustls::Error::AlertReceived(_) => "peer_alert",
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "not_tls"
        }
        rustls::Error::NoApplicationProtocol => "no_alpn",
        _ => "other",
    }
}

fn certificate_reason(ce: &CertificateError) -> &'static str {
    match ce {
        CertificateError::UnknownIssuer => "unknown_ca",
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "not_yet_valid"
        }
        CertificateError::BadSignature => "bad_signature",
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "extended_key_usage"
        }
        CertificateError::Other(OtherError(e)) if e.downcast_ref::<Inactive>().is_some() => {
            "revoked"
        }
        CertificateError::Other(OtherError(e)) => e
            .downcast_ref::<SvidError>()
            .map_or("invalid_certificate", SvidError::reason),
        _ => "invalid_certificate",
    }
}
