//! Signed policy bundles: Rego modules and JSON data, versioned by the control plane, signed with
//! its CA key, and verified by sidecars against their trust bundle before activation.
//!
//! The signature covers a length-prefixed encoding of (version, modules by name, data text), after
//! a domain-separation label, so it can never be mistaken for a certificate signature and needs no
//! JSON canonicalisation: the data travels as the exact text that was signed.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::join::hex;

const LABEL: &[u8] = b"mandate-bundle-v1\0";

/// Why a bundle was not activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// The digest does not match the contents.
    #[error("bundle {version}: digest {claimed} does not match its contents ({actual})")]
    Digest {
        /// Bundle version.
        version: u64,
        /// Digest carried.
        claimed: String,
        /// Digest computed.
        actual: String,
    },
    /// The signature is not valid base64.
    #[error("bundle {0}: signature is not base64")]
    SignatureEncoding(u64),
    /// No CA certificate in the trust bundle verifies the signature.
    #[error("bundle {0}: signature does not verify against any CA in the trust bundle")]
    Signature(u64),
    /// The trust bundle has no usable certificate.
    #[error("trust bundle has no parseable CA certificate")]
    TrustBundle,
    /// The data is not a JSON object.
    #[error("bundle {version}: data is not a JSON object: {why}")]
    Data {
        /// Bundle version.
        version: u64,
        /// What is wrong.
        why: String,
    },
}

/// A policy bundle as pushed to sidecars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBundle {
    /// Version assigned by the control plane (1, 2, …); a rollback re-activates an older one.
    pub version: u64,
    /// `sha256:<hex>` of the signed contents.
    pub digest: String,
    /// Rego modules by file name.
    pub modules: BTreeMap<String, String>,
    /// JSON data (an object) as text, exactly as signed.
    pub data: String,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER, base64) by the control plane's CA key.
    pub signature: String,
}

impl SignedBundle {
    /// Builds and signs a bundle; `sign` returns an ECDSA P-256 SHA-256 ASN.1 signature of its input.
    pub fn sign<E>(
        version: u64,
        modules: BTreeMap<String, String>,
        data: String,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Self, E> {
        let input = signing_input(version, &modules, &data);
        let signature = STANDARD.encode(sign(&input)?);
        Ok(Self {
            version,
            digest: digest_of(&input),
            modules,
            data,
            signature,
        })
    }

    /// Checks digest, signature (against any CA certificate in `trust_bundle_pem`) and data shape.
    pub fn verify(&self, trust_bundle_pem: &str) -> Result<serde_json::Value, BundleError> {
        let input = signing_input(self.version, &self.modules, &self.data);
        let actual = digest_of(&input);
        if actual != self.digest {
            return Err(BundleError::Digest {
                version: self.version,
                claimed: self.digest.clone(),
                actual,
            });
        }
        let signature = STANDARD
            .decode(&self.signature)
            .map_err(|_| BundleError::SignatureEncoding(self.version))?;
        let cas: Vec<_> = CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes())
            .filter_map(Result::ok)
            .collect();
        if cas.is_empty() {
            return Err(BundleError::TrustBundle);
        }
        let verified = cas.iter().any(|der| {
            X509Certificate::from_der(der).is_ok_and(|(_, cert)| {
                let key = cert.public_key().subject_public_key.data.as_ref();
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
                    .verify(&input, &signature)
                    .is_ok()
            })
        });
        if !verified {
            return Err(BundleError::Signature(self.version));
        }
        match serde_json::from_str::<serde_json::Value>(&self.data) {
            Ok(data @ serde_json::Value::Object(_)) => Ok(data),
            Ok(_) => Err(BundleError::Data {
                version: self.version,
                why: "top level must be an object".into(),
            }),
            Err(e) => Err(BundleError::Data {
                version: self.version,
                why: e.to_string(),
            }),
        }
    }
}

/// The digest a bundle's contents would carry, `sha256:<hex>`.
pub fn bundle_digest(version: u64, modules: &BTreeMap<String, String>, data: &str) -> String {
    digest_of(&signing_input(version, modules, data))
}

fn digest_of(input: &[u8]) -> String {
    format!("sha256:{}", hex(digest(&SHA256, input).as_ref()))
}

fn signing_input(version: u64, modules: &BTreeMap<String, String>, data: &str) -> Vec<u8> {
    let size = modules
        .iter()
        .map(|(n, t)| n.len() + t.len() + 16)
        .sum::<usize>()
        + data.len();
    let mut input = Vec::with_capacity(LABEL.len() + 24 + size);
    input.extend_from_slice(LABEL);
    input.extend_from_slice(&version.to_be_bytes());
    input.extend_from_slice(&(modules.len() as u64).to_be_bytes());
    for (name, text) in modules {
        put(&mut input, name.as_bytes());
        put(&mut input, text.as_bytes());
    }
    put(&mut input, data.as_bytes());
    input
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_identity::TrustDomain;
    use mandate_identity::ca::CertificateAuthority;
    use std::time::Duration;

    fn ca() -> CertificateAuthority {
        let td: TrustDomain = "mandate.local".parse().unwrap();
        CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap()
    }

    fn bundle(ca: &CertificateAuthority) -> SignedBundle {
        let modules = BTreeMap::from([(
            "authz.rego".to_owned(),
            "package mandate.authz\n".to_owned(),
        )]);
        SignedBundle::sign(3, modules, r#"{"registry":{}}"#.into(), |input| {
            ca.sign_bytes(input)
        })
        .unwrap()
    }

    #[test]
    fn a_bundle_signed_by_the_ca_verifies_against_its_trust_bundle() {
        let ca = ca();
        let bundle = bundle(&ca);
        let data = bundle.verify(ca.cert_pem()).unwrap();
        assert_eq!(data["registry"], serde_json::json!({}));
        assert_eq!(
            bundle.digest,
            bundle_digest(3, &bundle.modules, &bundle.data)
        );
    }

    #[test]
    fn any_change_after_signing_is_detected() {
        let ca = ca();
        let mut tampered = bundle(&ca);
        tampered
            .modules
            .insert("evil.rego".into(), "package x\n".into());
        assert!(matches!(
            tampered.verify(ca.cert_pem()),
            Err(BundleError::Digest { .. })
        ));

        // Re-computing the digest does not help without the key.
        tampered.digest = bundle_digest(tampered.version, &tampered.modules, &tampered.data);
        assert_eq!(
            tampered.verify(ca.cert_pem()),
            Err(BundleError::Signature(3))
        );

        let mut replayed = bundle(&ca);
        replayed.version = 4;
        assert!(matches!(
            replayed.verify(ca.cert_pem()),
            Err(BundleError::Digest { .. })
        ));
    }

    #[test]
    fn a_bundle_from_another_ca_is_refused() {
        let bundle = bundle(&ca());
        assert_eq!(
            bundle.verify(ca().cert_pem()),
            Err(BundleError::Signature(3))
        );
        assert_eq!(bundle.verify("not pem"), Err(BundleError::TrustBundle));
    }

    #[test]
    fn data_must_be_a_json_object() {
        let ca = ca();
        let bundle =
            SignedBundle::sign(1, BTreeMap::new(), "[1]".into(), |i| ca.sign_bytes(i)).unwrap();
        assert!(matches!(
            bundle.verify(ca.cert_pem()),
            Err(BundleError::Data { .. })
        ));
    }
}
