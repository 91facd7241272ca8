//! TLS to the control plane: trust only the CA the operator names, and accept only a server
//! certificate that is the X.509-SVID `spiffe://<td>/control-plane` — never a DNS name, never an
//! agent's or a service's SVID from the same CA.

use std::io;
use std::path::Path;
use std::sync::Arc;

use mandate_identity::svid::SvidError;
use mandate_identity::tls::{PROVIDER, SpiffePeer, SpiffeServerVerifier, WrongIdentity};
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::CONTROL_PLANE_PATH;
use rustls::{CertificateError, ClientConfig, OtherError, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// ALPN identifiers offered to the control plane, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The CA certificates from `--ca-cert` and the one trust domain they serve.
#[derive(Debug, Clone)]
pub struct CaBundle {
    /// The CA certificates as trust anchors.
    pub roots: Arc<RootCertStore>,
    /// The trust domain named by their `spiffe://<td>` URI SAN.
    pub trust_domain: TrustDomain,
}

impl CaBundle {
    /// Parses a PEM bundle: every certificate must be a CA with a `spiffe://<td>` URI SAN, all of
    /// the same trust domain. `source` names the file in error messages.
    pub fn from_pem(pem: &[u8], source: &Path) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let mut trust_domain: Option<TrustDomain> = None;
        for (i, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let der = der.map_err(|e| format!("{}: not PEM: {e}", source.display()))?;
            let td = ca_trust_domain(&der)
                .map_err(|why| format!("{} (certificate {}): {why}", source.display(), i + 1))?;
            match &trust_domain {
                Some(seen) if *seen != td => {
                    return Err(format!(
                        "{}: holds CAs of two trust domains ({seen} and {td}); give the control plane's own ca.pem",
                        source.display()
                    ));
                }
                _ => trust_domain = Some(td),
            }
            roots.add(der).map_err(|e| {
                format!(
                    "{} (certificate {}): unusable as a trust anchor: {e}",
                    source.display(),
                    i + 1
                )
            })?;
        }
        let trust_domain = trust_domain.ok_or_else(|| {
            format!(
                "{}: no CERTIFICATE found; it should be the control plane's <data-dir>/ca.pem",
                source.display()
            )
        })?;
        Ok(Self {
            roots: Arc::new(roots),
            trust_domain,
        })
    }

    /// The SPIFFE ID the control plane must present: `spiffe://<td>/control-plane`.
    pub fn control_plane_id(&self) -> String {
        format!("{}{CONTROL_PLANE_PATH}", self.trust_domain.id_uri())
    }

    /// Accepts only the control plane's SVID chaining to these CAs. The chain is checked first:
    /// nothing a certificate says counts before its issuer is known.
    pub fn verifier(&self) -> SpiffeServerVerifier {
        let id: SpiffeId = self
            .control_plane_id()
            .parse()
            .expect("a trust domain plus a fixed path is a SPIFFE ID");
        let peer = SpiffePeer::new(self.trust_domain.clone())
            .exactly(id)
            .chain_first();
        SpiffeServerVerifier::new(peer, self.roots.clone())
    }
}

/// The trust domain of a CA certificate: it must be a CA and carry a `spiffe://<td>` URI SAN.
fn ca_trust_domain(der: &[u8]) -> Result<TrustDomain, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not X.509: {e}"))?;
    if !cert.is_ca() {
        return Err(
            "not a CA certificate (basicConstraints cA is not set); give the control plane's <data-dir>/ca.pem, not a workload certificate"
                .to_owned(),
        );
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    san.iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix("spiffe://")?.parse().ok(),
            _ => None,
        })
        .ok_or_else(|| "the CA certificate has no spiffe://<trust domain> URI SAN".to_owned())
}

/// The client configuration: TLS 1.3, no client certificate, the control-plane verifier.
pub fn client_config(ca: &CaBundle) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // SPIFFE: the server is identified by its URI SAN, not a DNS name.
        .with_custom_certificate_verifier(Arc::new(ca.verifier()))
        .with_no_client_auth();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Like [`client_config`], presenting `certs` (leaf first) and `key` as the client certificate:
/// an agent's SVID, for the sidecar endpoints.
pub fn client_config_with_identity(
    ca: &CaBundle,
    certs: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // SPIFFE: the server is identified by its URI SAN, not a DNS name.
        .with_custom_certificate_verifier(Arc::new(ca.verifier()))
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Explains a failed TLS handshake in terms of what the operator can change.
pub fn describe_handshake_error(err: &io::Error, ca_path: &Path) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS handshake failed: {err}");
    };
    let ca = ca_path.display();
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the server's certificate was not issued by the CA in {ca}; point --ca-cert (MANDATE_CACERT) at this control plane's <data-dir>/ca.pem"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired; check this machine's clock and that the control plane renews its certificate".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet; check this machine's clock".to_owned()
            }
            CertificateError::Other(OtherError(inner)) => {
                if let Some(e) = inner.downcast_ref::<SvidError>() {
                    format!(
                        "the server's certificate is not an X.509-SVID of this CA's trust domain: {e}"
                    )
                } else if let Some(WrongIdentity { presented, expected }) = inner.downcast_ref() {
                    format!(
                        "the server presented {presented}, not {expected}: that is not the control plane (check --server)"
                    )
                } else {
                    inner.to_string()
                }
            }
            other => format!("the server's certificate was refused: {other:?}"),
        },
        rustls::Error::PeerIncompatible(why) => format!(
            "the server does not speak what the CLI needs (TLS 1.3): {why:?}"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_identity::ca::CertificateAuthority;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls_pki_types::{ServerName, UnixTime};
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ca(td: &str) -> CertificateAuthority {
        CertificateAuthority::generate(td.parse().unwrap(), HOUR).unwrap()
    }

    fn bundle(ca: &CertificateAuthority) -> CaBundle {
        CaBundle::from_pem(ca.cert_pem().as_bytes(), Path::new("ca.pem")).unwrap()
    }

    fn leaf(ca: &CertificateAuthority, id: &str) -> CertificateDer<'static> {
        let id: SpiffeId = id.parse().unwrap();
        let issued = ca.issue(&id, HOUR).unwrap();
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    }

    fn verify(bundle: &CaBundle, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        bundle
            .verifier()
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn accepts_the_control_plane_svid_of_the_ca() {
        let ca = ca("mandate.local");
        let bundle = bundle(&ca);
        assert_eq!(bundle.trust_domain.as_str(), "mandate.local");
        assert_eq!(
            bundle.control_plane_id(),
            "spiffe://mandate.local/control-plane"
        );
        let cert = leaf(&ca, "spiffe://mandate.local/control-plane");
        verify(&bundle, &cert).unwrap();
    }

    #[test]
    fn refuses_an_agent_svid_from_the_same_ca() {
        let ca = ca("mandate.local");
        let cert = leaf(&ca, "spiffe://mandate.local/agent/research");
        let err = verify(&bundle(&ca), &cert).unwrap_err();
        let io = io::Error::new(io::ErrorKind::InvalidData, err);
        let text = describe_handshake_error(&io, Path::new("ca.pem"));
        assert!(
            text.contains("spiffe://mandate.local/agent/research")
                && text.contains("not spiffe://mandate.local/control-plane"),
            "{text}"
        );
    }

    #[test]
    fn refuses_a_control_plane_svid_from_a_foreign_ca() {
        let ours = ca("mandate.local");
        let theirs = ca("mandate.local");
        let cert = leaf(&theirs, "spiffe://mandate.local/control-plane");
        let err = verify(&bundle(&ours), &cert).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        let io = io::Error::new(io::ErrorKind::InvalidData, err);
        let text = describe_handshake_error(&io, Path::new("/data/ca.pem"));
        assert!(
            text.contains("not issued by the CA in /data/ca.pem") && text.contains("--ca-cert"),
            "{text}"
        );

        // Another trust domain's CA does not even get its identity considered.
        let other = ca("evil.example");
        let cert = leaf(&other, "spiffe://evil.example/control-plane");
        assert!(verify(&bundle(&ours), &cert).is_err());
    }

    #[test]
    fn the_bundle_must_hold_spiffe_cas_of_one_trust_domain() {
        let path = Path::new("x.pem");
        let err = CaBundle::from_pem(b"", path).unwrap_err();
        assert!(err.contains("no CERTIFICATE"), "{err}");

        // A workload certificate is not a CA.
        let ca = ca("mandate.local");
        let issued = ca
            .issue(&"spiffe://mandate.local/agent/a".parse().unwrap(), HOUR)
            .unwrap();
        let err = CaBundle::from_pem(issued.cert_pem.as_bytes(), path).unwrap_err();
        assert!(err.contains("not a CA certificate"), "{err}");

        let two = format!("{}{}", ca.cert_pem(), self::ca("other.td").cert_pem());
        let err = CaBundle::from_pem(two.as_bytes(), path).unwrap_err();
        assert!(err.contains("two trust domains"), "{err}");

        // Two CAs of one trust domain (a rotation) are both trusted.
        let rotated = self::ca("mandate.local");
        let both = format!("{}{}", ca.cert_pem(), rotated.cert_pem());
        let bundle = CaBundle::from_pem(both.as_bytes(), path).unwrap();
        assert_eq!(bundle.roots.len(), 2);
        verify(
            &bundle,
            &leaf(&rotated, "spiffe://mandate.local/control-plane"),
        )
        .unwrap();
    }

    #[test]
    fn client_config_offers_h2_and_http1_over_tls13_only() {
        let config = client_config(&bundle(&ca("mandate.local"))).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
