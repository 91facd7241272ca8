//! The X.509-SVID rules a leaf certificate must follow to carry a Mandate identity.
//!
//! Chain and validity-period checks belong to the TLS verifier (webpki); these are the structural
//! rules of the SPIFFE X.509-SVID specification plus our trust-domain check.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, TrustDomain};

/// A leaf certificate that passed the X.509-SVID rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The identity in the certificate's single URI SAN.
    pub id: SpiffeId,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Serial number, colon-separated hex as `openssl x509 -serial` would show it.
    pub serial: String,
}

impl Svid {
    /// Whether `now` (Unix seconds) falls within the certificate's validity period.
    pub fn is_valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Which X.509-SVID rule a certificate broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// Not parseable DER X.509.
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    /// Zero or several URI SANs; an SVID has exactly one.
    #[error("an X.509-SVID has exactly one URI SAN; this certificate has {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    NotSpiffe {
        /// The URI found.
        uri: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    TrustDomain {
        /// The ID presented.
        id: String,
        /// Our trust domain.
        expected: String,
    },
    /// The leaf has basicConstraints cA=true.
    #[error("leaf certificate is a CA (basicConstraints cA=true); an X.509-SVID leaf must not be")]
    LeafIsCa,
    /// keyCertSign or cRLSign set, or digitalSignature missing.
    #[error("leaf key usage must include digitalSignature and exclude keyCertSign and cRLSign")]
    KeyUsage,
    /// An EKU extension that lacks serverAuth or clientAuth.
    #[error("extended key usage must include both serverAuth and clientAuth")]
    ExtendedKeyUsage,
}

impl SvidError {
    /// A short stable label for metrics (`reason` label of handshake failures).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_certificate",
            Self::UriSanCount(_) => "uri_san_count",
            Self::NotSpiffe { .. } => "not_spiffe",
            Self::TrustDomain { .. } => "trust_domain_mismatch",
            Self::LeafIsCa => "leaf_is_ca",
            Self::KeyUsage => "key_usage",
            Self::ExtendedKeyUsage => "extended_key_usage",
        }
    }
}

/// Checks the X.509-SVID rules on a DER leaf certificate and returns its identity.
pub fn check_svid(der: &[u8], trust_domain: &TrustDomain) -> Result<Svid, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());

    let uris: Vec<&str> = match cert.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let [uri] = uris[..] else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e: crate::SpiffeIdError| SvidError::NotSpiffe {
            uri: uri.to_owned(),
            reason: e.to_string(),
        })?;
    if id.path().is_empty() {
        return Err(SvidError::NotSpiffe {
            uri: uri.to_owned(),
            reason: "a workload SPIFFE ID needs a path".to_owned(),
        });
    }
    if !id.is_member_of(trust_domain) {
        return Err(SvidError::TrustDomain {
            id: id.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage().map_err(malformed)? {
        Some(ku)
            if ku.value.digital_signature()
                && !ku.value.key_cert_sign()
                && !ku.value.crl_sign() => {}
        _ => return Err(SvidError::KeyUsage),
    }
    if let Some(eku) = cert.extended_key_usage().map_err(malformed)?
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(SvidError::ExtendedKeyUsage);
    }
    Ok(Svid {
        id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
    })
}
