//! rustls configuration for SPIFFE mTLS: verifiers that enforce the X.509-SVID rules on top of
//! webpki chain validation and refuse workloads the registry marks inactive, a resolver that never
//! serves an expired SVID, and the classification of handshake failures into metric reasons.

use std::io;
use std::sync::{Arc, LazyLock};

use mandate_identity::TrustDomain;
use mandate_identity::svid::{SvidError, check_svid};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::revocation::{Inactive, Revocations};

/// ALPN for HTTP/2 between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 between sidecars.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN that marks an opaque TCP stream (database and other non-HTTP protocols).
pub const ALPN_TCP: &[u8] = b"mandate-tcp";

/// The one crypto provider of the workspace (ring).
pub static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

fn algorithms() -> WebPkiSupportedAlgorithms {
    PROVIDER.signature_verification_algorithms
}

fn svid_error(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The X.509-SVID rules, then the registry: a suspended or revoked workload's certificate is refused.
fn check_peer(
    end_entity: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    revocations: &Revocations,
) -> Result<(), rustls::Error> {
    let svid = check_svid(end_entity, trust_domain).map_err(svid_error)?;
    revocations.check(svid.id.as_str()).map_err(|e| {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    })
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

/// Inbound: requires a client certificate that chains to the bundle and is an X.509-SVID of our
/// trust domain, of a workload that is not inactive.
struct SvidClientVerifier {
    trust_domain: TrustDomain,
    chain: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl std::fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_peer(end_entity, &self.trust_domain, &self.revocations)?;
        self.chain
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Outbound: the server must chain to the bundle and be an X.509-SVID of our trust domain, of a
/// workload that is not inactive. Which SPIFFE ID it must be is checked by the caller after the
/// handshake, per route.
struct SvidServerVerifier {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    revocations: Arc<Revocations>,
}

impl std::fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_peer(end_entity, &self.trust_domain, &self.revocations)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Builds the inbound server config: mandatory SVID client auth, ALPN h2 / http/1.1 / mandate-tcp.
pub fn server_config(
    trust_domain: &TrustDomain,
    roots: Arc<RootCertStore>,
    resolver: Arc<SvidResolver>,
    revocations: Arc<Revocations>,
) -> Result<ServerConfig, rustls::Error> {
    let chain = WebPkiClientVerifier::builder_with_provider(roots, PROVIDER.clone())
        .build()
        .map_err(|e| rustls::Error::General(format!("trust bundle unusable: {e}")))?;
    let verifier = Arc::new(SvidClientVerifier {
        trust_domain: trust_domain.clone(),
        chain,
        revocations,
    });
    let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
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
    let verifier = Arc::new(SvidServerVerifier {
        trust_domain: trust_domain.clone(),
        roots,
        revocations,
    });
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
