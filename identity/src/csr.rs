//! Certificate signing requests: the sidecar makes its key and asks for an SVID without the key
//! ever leaving it; the control plane reads which identity a request asks for.

use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair, SanType};

use crate::SpiffeId;

/// Why a CSR could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// rcgen could not generate the key or the request.
    #[error("cannot create a certificate signing request: {0}")]
    Generate(#[from] rcgen::Error),
    /// Not a parseable, correctly self-signed PEM CSR.
    #[error("certificate signing request is unusable: {0}")]
    Unparseable(String),
    /// The CSR does not ask for exactly one SPIFFE ID URI SAN.
    #[error("certificate signing request must ask for exactly one spiffe:// URI SAN, found {0}")]
    Identity(usize),
}

/// A fresh P-256 key and a CSR for it.
pub struct CertificateRequest {
    /// PKCS#8 private key, PEM. Secret: never log or send it.
    pub key_pem: String,
    /// The CSR, PEM.
    pub csr_pem: String,
}

/// Generates a key and a CSR asking for `id` (one URI SAN, nothing else).
pub fn request(id: &SpiffeId) -> Result<CertificateRequest, CsrError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        id.as_str()
            .try_into()
            .expect("a validated SPIFFE ID is ASCII"),
    )];
    let csr = params.serialize_request(&key)?;
    Ok(CertificateRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}

/// The SPIFFE ID a PEM CSR asks for, after checking its self-signature.
pub fn requested_id(csr_pem: &str) -> Result<String, CsrError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CsrError::Unparseable(e.to_string()))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] if uri.starts_with("spiffe://") && csr.params.subject_alt_names.len() == 1 => {
            Ok((*uri).to_owned())
        }
        _ => Err(CsrError::Identity(csr.params.subject_alt_names.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrustDomain;

    #[test]
    fn a_request_asks_for_exactly_the_identity_given() {
        let td: TrustDomain = "mandate.local".parse().unwrap();
        let id = SpiffeId::agent(&td, "research").unwrap();
        let req = request(&id).unwrap();
        assert!(req.csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        assert!(req.key_pem.contains("PRIVATE KEY"));
        assert_eq!(requested_id(&req.csr_pem).unwrap(), id.as_str());
    }

    #[test]
    fn requests_without_one_spiffe_id_are_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["example.com".to_owned()]).unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(requested_id(&pem), Err(CsrError::Identity(1))));
        params.subject_alt_names.clear();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(requested_id(&pem), Err(CsrError::Identity(0))));
        assert!(matches!(
            requested_id("garbage"),
            Err(CsrError::Unparseable(_))
        ));
    }
}
