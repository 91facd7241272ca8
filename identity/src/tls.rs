//! rustls verifiers for SPIFFE mTLS, shared by the sidecar, the control plane and its CLI: a peer
//! certificate must chain to the trust anchors (webpki) and be an X.509-SVID of the trust domain,
//! optionally of one exact SPIFFE ID, and pass whatever further check its owner adds.
//!
//! Refusals are `InvalidCertificate(Other(..))` carrying [`SvidError`](crate::svid::SvidError), [`WrongIdentity`] or the
//! owner's own error, so callers can tell why a handshake failed by downcasting.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::svid::{Svid, check_svid};
use crate::{SpiffeId, TrustDomain};

/// The one crypto provider of the workspace (ring).
pub static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// Wraps a refusal reason as a certificate error, so it survives the handshake for downcasting.
pub fn certificate_error<E>(e: E) -> rustls::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Checks that `end_entity` (with `intermediates`) chains to `roots` and is valid at `now`.
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(end_entity)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        PROVIDER.signature_verification_algorithms.all,
    )
}

/// Why a PEM trust bundle cannot become trust anchors.
#[derive(Debug, thiserror::Error)]
pub enum PemRootsError {
    /// The text is not PEM.
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// A certificate cannot serve as a trust anchor.
    #[error(transparent)]
    Unusable(rustls::Error),
}

/// Every CERTIFICATE of a PEM bundle as a trust anchor (none at all is the caller's to judge).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, PemRootsError> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem) {
        roots.add(der?).map_err(PemRootsError::Unusable)?;
    }
    Ok(roots)
}

/// A valid SVID of the trust domain, but not the SPIFFE ID required.
#[derive(Debug, thiserror::Error)]
#[error("presented {presented}, but {expected} is required")]
pub struct WrongIdentity {
    /// The SPIFFE ID presented.
    pub presented: String,
    /// The SPIFFE ID required.
    pub expected: String,
}

/// A further say on a peer whose certificate passed the X.509-SVID rules (a sidecar refuses
/// workloads its registry marks inactive); its error should come from [`certificate_error`].
pub trait AdmitPeer: Send + Sync {
    /// Refuses `svid` or lets it through.
    fn admit(&self, svid: &Svid) -> Result<(), rustls::Error>;
}

/// Which check runs first; when a certificate fails both, it decides the error reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstCheck {
    /// The X.509-SVID rules: a sidecar labels refusals by the rule broken (`leaf_is_ca`), which
    /// webpki would report less precisely.
    Svid,
    /// The chain: nothing a certificate says counts before its issuer is known.
    Chain,
}

/// Who the peer must be: an X.509-SVID of a trust domain, maybe one exact SPIFFE ID, maybe admitted
/// by an [`AdmitPeer`]; the chain is checked by the verifier that holds it.
#[derive(Clone)]
pub struct SpiffePeer {
    trust_domain: TrustDomain,
    expected: Option<SpiffeId>,
    admit: Option<Arc<dyn AdmitPeer>>,
    first: FirstCheck,
}

impl fmt::Debug for SpiffePeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffePeer")
            .field("trust_domain", &self.trust_domain)
            .field("expected", &self.expected)
            .field("first", &self.first)
            .finish_non_exhaustive()
    }
}

impl SpiffePeer {
    /// Any workload of `trust_domain`; the X.509-SVID rules are checked before the chain.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            expected: None,
            admit: None,
            first: FirstCheck::Svid,
        }
    }

    /// Only `id` is accepted; any other SVID is refused with [`WrongIdentity`].
    pub fn exactly(mut self, id: SpiffeId) -> Self {
        self.expected = Some(id);
        self
    }

    /// `admit` has the last say on an SVID that passed the rules (and the exact ID, if any).
    pub fn admitted_by(mut self, admit: Arc<dyn AdmitPeer>) -> Self {
        self.admit = Some(admit);
        self
    }

    /// Checks the chain before the SVID rules, so an unknown issuer is what gets reported.
    pub fn chain_first(mut self) -> Self {
        self.first = FirstCheck::Chain;
        self
    }

    /// The X.509-SVID rules, the exact ID, then the owner's check.
    fn identity(&self, end_entity: &CertificateDer<'_>) -> Result<Svid, rustls::Error> {
        let svid = check_svid(end_entity, &self.trust_domain).map_err(certificate_error)?;
        if let Some(expected) = &self.expected
            && svid.id != *expected
        {
            return Err(certificate_error(WrongIdentity {
                presented: svid.id.to_string(),
                expected: expected.to_string(),
            }));
        }
        if let Some(admit) = &self.admit {
            admit.admit(&svid)?;
        }
        Ok(svid)
    }

    /// Runs the identity checks and `chain` in this peer's order.
    fn verify<T>(
        &self,
        end_entity: &CertificateDer<'_>,
        chain: impl FnOnce() -> Result<T, rustls::Error>,
    ) -> Result<T, rustls::Error> {
        match self.first {
            FirstCheck::Svid => {
                self.identity(end_entity)?;
                chain()
            }
            FirstCheck::Chain => {
                let verified = chain()?;
                self.identity(end_entity)?;
                Ok(verified)
            }
        }
    }
}

/// Where one handshake's trust anchors come from: fixed roots, or (first contact) a CA the
/// server's own chain must contain.
pub trait TrustAnchors: fmt::Debug + Send + Sync {
    /// The roots the server's chain must reach, given its `intermediates`.
    fn roots(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Cow<'_, RootCertStore>, rustls::Error>;
}

impl TrustAnchors for Arc<RootCertStore> {
    fn roots(&self, _: &[CertificateDer<'_>]) -> Result<Cow<'_, RootCertStore>, rustls::Error> {
        Ok(Cow::Borrowed(self))
    }
}

/// Client side: the server is identified by its SPIFFE ID, never by a DNS name.
#[derive(Debug)]
pub struct SpiffeServerVerifier<A = Arc<RootCertStore>> {
    peer: SpiffePeer,
    anchors: A,
}

impl<A: TrustAnchors> SpiffeServerVerifier<A> {
    /// A server must be `peer` and chain to `anchors`.
    pub fn new(peer: SpiffePeer, anchors: A) -> Self {
        Self { peer, anchors }
    }
}

impl<A: TrustAnchors> ServerCertVerifier for SpiffeServerVerifier<A> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.anchors.roots(intermediates)?;
        self.peer.verify(end_entity, || {
            verify_chain(end_entity, intermediates, &roots, now)
        })?;
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
            &PROVIDER.signature_verification_algorithms,
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
            &PROVIDER.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        PROVIDER
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection (sidecars).
    Required,
    /// Anonymous clients are let in; a certificate presented must still pass (the control plane's
    /// API, where operators authenticate by token).
    Optional,
}

/// Server side: a client certificate must be `peer` and chain to the roots (webpki's client
/// verifier, which also speaks the root hints and handshake signatures).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    peer: SpiffePeer,
    chain: Arc<dyn ClientCertVerifier>,
}

impl SpiffeClientVerifier {
    /// Clients must be `peer` and chain to `roots`; `auth` says whether they need a certificate.
    pub fn new(
        peer: SpiffePeer,
        roots: Arc<RootCertStore>,
        auth: ClientAuth,
    ) -> Result<Self, VerifierBuilderError> {
        let builder = WebPkiClientVerifier::builder_with_provider(roots, PROVIDER.clone());
        let chain = match auth {
            ClientAuth::Required => builder.build()?,
            ClientAuth::Optional => builder.allow_unauthenticated().build()?,
        };
        Ok(Self { peer, chain })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.peer.verify(end_entity, || {
            self.chain
                .verify_client_cert(end_entity, intermediates, now)
        })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::svid::SvidError;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ca(td: &str) -> CertificateAuthority {
        CertificateAuthority::generate(td.parse().unwrap(), HOUR).unwrap()
    }

    fn roots(ca: &CertificateAuthority) -> Arc<RootCertStore> {
        Arc::new(roots_from_pem(ca.cert_pem().as_bytes()).unwrap())
    }

    fn leaf(ca: &CertificateAuthority, id: &str) -> CertificateDer<'static> {
        let issued = ca.issue(&id.parse().unwrap(), HOUR).unwrap();
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    }

    fn verify_server(
        peer: SpiffePeer,
        roots: Arc<RootCertStore>,
        cert: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        SpiffeServerVerifier::new(peer, roots)
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn other_error<E: std::error::Error + 'static>(err: &rustls::Error) -> Option<&E> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
                e.downcast_ref::<E>()
            }
            _ => None,
        }
    }

    #[test]
    fn an_exact_id_refuses_other_workloads_of_the_trust_domain() {
        let ca = ca("mandate.local");
        let td: TrustDomain = "mandate.local".parse().unwrap();
        let peer =
            SpiffePeer::new(td).exactly("spiffe://mandate.local/control-plane".parse().unwrap());
        verify_server(
            peer.clone(),
            roots(&ca),
            &leaf(&ca, "spiffe://mandate.local/control-plane"),
        )
        .unwrap();
        let err = verify_server(
            peer,
            roots(&ca),
            &leaf(&ca, "spiffe://mandate.local/agent/a"),
        )
        .unwrap_err();
        let wrong = other_error::<WrongIdentity>(&err).expect("WrongIdentity");
        assert_eq!(wrong.presented, "spiffe://mandate.local/agent/a");
    }

    #[test]
    fn the_first_check_decides_what_a_doubly_bad_certificate_is_refused_for() {
        let ours = ca("mandate.local");
        let theirs = ca("other.example");
        let cert = leaf(&theirs, "spiffe://other.example/agent/a");
        let td: TrustDomain = "mandate.local".parse().unwrap();

        let err = verify_server(SpiffePeer::new(td.clone()), roots(&ours), &cert).unwrap_err();
        assert!(
            matches!(
                other_error::<SvidError>(&err),
                Some(SvidError::TrustDomain { .. })
            ),
            "{err}"
        );

        let err =
            verify_server(SpiffePeer::new(td).chain_first(), roots(&ours), &cert).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("barred")]
    struct Barred;

    struct BarAgents;

    impl AdmitPeer for BarAgents {
        fn admit(&self, svid: &Svid) -> Result<(), rustls::Error> {
            match svid.id.path().starts_with("/agent/") {
                true => Err(certificate_error(Barred)),
                false => Ok(()),
            }
        }
    }

    #[test]
    fn client_certificates_pass_the_rules_the_chain_and_the_owners_check() {
        let ca = ca("mandate.local");
        let td: TrustDomain = "mandate.local".parse().unwrap();
        let peer = SpiffePeer::new(td).admitted_by(Arc::new(BarAgents));
        let verifier = SpiffeClientVerifier::new(peer, roots(&ca), ClientAuth::Required).unwrap();
        assert!(verifier.client_auth_mandatory());
        verifier
            .verify_client_cert(
                &leaf(&ca, "spiffe://mandate.local/service/s"),
                &[],
                UnixTime::now(),
            )
            .unwrap();
        let err = verifier
            .verify_client_cert(
                &leaf(&ca, "spiffe://mandate.local/agent/a"),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert!(other_error::<Barred>(&err).is_some(), "{err}");

        let td: TrustDomain = "mandate.local".parse().unwrap();
        let optional =
            SpiffeClientVerifier::new(SpiffePeer::new(td), roots(&ca), ClientAuth::Optional)
                .unwrap();
        assert!(optional.offer_client_auth() && !optional.client_auth_mandatory());
    }

    #[test]
    fn a_pem_bundle_becomes_trust_anchors() {
        let both = format!(
            "{}{}",
            ca("a.example").cert_pem(),
            ca("b.example").cert_pem()
        );
        assert_eq!(roots_from_pem(both.as_bytes()).unwrap().len(), 2);
        assert!(roots_from_pem(b"").unwrap().is_empty());
        assert!(matches!(
            roots_from_pem(
                b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
            ),
            Err(PemRootsError::Pem(_))
        ));
    }
}
