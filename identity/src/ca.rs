//! A certificate authority that issues X.509-SVIDs (EC P-256), used by `mandate ca` and the control plane.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::spiffe::{SpiffeId, TrustDomain};

/// Clock skew tolerated by backdating `notBefore`, so a peer whose clock is a little behind accepts a fresh cert.
const BACKDATE: Duration = Duration::from_secs(60);

/// What went wrong creating, loading or using a CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate carries no `spiffe://<trust domain>` URI SAN.
    #[error(
        "CA certificate has no spiffe://<trust domain> URI SAN; cannot tell which trust domain it serves"
    )]
    NoTrustDomain,
    /// The CA certificate is not parseable or not a CA.
    #[error("CA certificate is unusable: {0}")]
    BadCaCertificate(String),
    /// A certificate signing request that cannot be parsed or whose signature is wrong.
    #[error("certificate signing request is unusable: {0}")]
    BadCsr(String),
    /// The requested identity is outside the CA's trust domain.
    #[error("{id} is not in this CA's trust domain {td}")]
    ForeignIdentity {
        /// The requested ID.
        id: String,
        /// The CA's trust domain.
        td: String,
    },
}

/// An X.509-SVID freshly issued together with its private key.
pub struct IssuedSvid {
    /// Leaf certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM. Secret: never log it.
    pub key_pem: String,
}

/// A CA able to issue SVIDs for one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Generates a self-signed root CA (EC P-256) for `trust_domain`, valid for `ttl`.
    pub fn generate(trust_domain: TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mandate");
        // A distinct subject per CA: chain building matches issuers by name, so two CAs of one
        // trust domain (rotation, or a stranger's) must not look alike.
        let serial = random_serial();
        let tag: String = serial.to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        dn.push(
            DnType::CommonName,
            format!("Mandate CA {trust_domain} {tag}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(trust_domain.id_uri().try_into()?)];
        set_validity(&mut params, ttl);
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key PEM; the trust domain comes from the cert's URI SAN.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let trust_domain = ca_trust_domain(cert_pem)?;
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            trust_domain,
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, PEM (the trust bundle peers need).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Secret: write it with mode 0600 and never log it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues an SVID for `id` with a freshly generated P-256 key.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedSvid, CaError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.sign(svid_params(id, ttl), &key, id)?;
        Ok(IssuedSvid {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs `message` with the CA key (ECDSA P-256 SHA-256, ASN.1 DER). Callers must prefix
    /// their own domain-separation label: the same key signs certificates.
    pub fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        use rcgen::SigningKey as _;
        Ok(self.issuer.key().sign(message)?)
    }

    /// Issues an SVID for `id` to the public key of a PEM certificate signing request. Only the
    /// CSR's key is used: the identity, lifetime and extensions are the CA's to decide, and the
    /// caller must first check the CSR asks for `id` (see [`crate::csr::requested_id`]).
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<String, CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        self.sign(svid_params(id, ttl), &csr.public_key, id)
    }

    /// Signs leaf `params` (normally from [`svid_params`]) for `public_key`; returns the certificate PEM.
    ///
    /// `id` must be in this CA's trust domain; the parameters are signed as given, so tests can
    /// deliberately break SVID rules to exercise verifiers.
    pub fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
    ) -> Result<String, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignIdentity {
                id: id.to_string(),
                td: self.trust_domain.to_string(),
            });
        }
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }
}

/// Leaf parameters that follow the X.509-SVID rules: one URI SAN, not a CA,
/// digitalSignature, serverAuth+clientAuth, valid for `ttl` (backdated one minute for clock skew).
pub fn svid_params(id: &SpiffeId, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Mandate");
    dn.push(DnType::CommonName, id.name());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(
        id.as_str()
            .try_into()
            .expect("a validated SPIFFE ID is ASCII"),
    )];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, ttl);
    params
}

fn set_validity(params: &mut CertificateParams, ttl: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG is available");
    bytes[0] &= 0x7f; // keep the DER INTEGER positive
    SerialNumber::from_slice(&bytes)
}

fn ca_trust_domain(cert_pem: &str) -> Result<TrustDomain, CaError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CaError::BadCaCertificate(e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| CaError::BadCaCertificate(e.to_string()))?;
    if !cert.is_ca() {
        return Err(CaError::BadCaCertificate(
            "basicConstraints cA is not set".to_owned(),
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::BadCaCertificate(e.to_string()))?
        .ok_or(CaError::NoTrustDomain)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix("spiffe://")?.parse().ok(),
            _ => None,
        })
        .ok_or(CaError::NoTrustDomain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::{SvidError, check_svid};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn signed(ca: &CertificateAuthority, edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let id = SpiffeId::agent(&td(), "a").unwrap();
        let mut params = svid_params(&id, Duration::from_secs(3600));
        edit(&mut params);
        der(&ca.sign(params, &KeyPair::generate().unwrap(), &id).unwrap())
    }

    #[test]
    fn issued_svid_passes_the_rules_and_carries_its_identity() {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let id = SpiffeId::service(&td(), "tool").unwrap();
        let svid = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let checked = check_svid(&der(&svid.cert_pem), &td()).unwrap();
        assert_eq!(checked.id, id);
        assert!(checked.not_after - checked.not_before >= 3600);
        assert!(svid.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn ca_reloads_from_pem_with_its_trust_domain() {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.trust_domain(), &td());
        let leaf = again
            .issue(
                &SpiffeId::agent(&td(), "x").unwrap(),
                Duration::from_secs(60),
            )
            .unwrap();
        check_svid(&der(&leaf.cert_pem), &td()).unwrap();
    }

    #[test]
    fn ca_refuses_identities_of_another_trust_domain() {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let other = SpiffeId::agent(&"other.org".parse().unwrap(), "x").unwrap();
        assert!(matches!(
            ca.issue(&other, Duration::from_secs(60)),
            Err(CaError::ForeignIdentity { .. })
        ));
    }

    /// A change that breaks one SVID rule.
    type Edit<'a> = Box<dyn FnOnce(&mut CertificateParams) + 'a>;

    #[test]
    fn each_broken_svid_rule_is_named() {
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let cases: Vec<(Edit<'_>, &str)> = vec![
            (
                Box::new(|p| {
                    p.subject_alt_names
                        .push(uri("spiffe://mandate.local/agent/b"))
                }),
                "uri_san_count",
            ),
            (Box::new(|p| p.subject_alt_names.clear()), "uri_san_count"),
            (
                Box::new(|p| p.subject_alt_names = vec![uri("https://example.com/x")]),
                "not_spiffe",
            ),
            (
                Box::new(|p| p.subject_alt_names = vec![uri("spiffe://evil.org/agent/a")]),
                "trust_domain_mismatch",
            ),
            (
                Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
                "leaf_is_ca",
            ),
            (
                Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
                "key_usage",
            ),
            (
                Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
                "extended_key_usage",
            ),
        ];
        for (edit, reason) in cases {
            let err = check_svid(&signed(&ca, edit), &td()).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
        assert!(matches!(
            check_svid(b"not a certificate", &td()),
            Err(SvidError::Malformed(_))
        ));
    }
}
