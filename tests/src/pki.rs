//! Certificates for the tests: a per-test CA, good SVIDs, and SVIDs that break one rule each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mandate_identity::ca::{CertificateAuthority, svid_params};
use mandate_identity::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The trust domain every test runs in.
pub const TRUST_DOMAIN: &str = "mandate.local";

/// Lifetime of the SVIDs the tests issue.
const SVID_TTL: Duration = Duration::from_secs(3600);

/// A leaf certificate with its key, as PEM.
#[derive(Clone)]
pub struct Svid {
    /// The SPIFFE ID the certificate was issued for (what its URI SAN says, for good SVIDs).
    pub id: String,
    /// Leaf certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
}

impl Svid {
    /// The leaf certificate, DER.
    pub fn leaf_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).expect("issued PEM parses")
    }

    /// The certificate chain to present (just the leaf: peers trust the CA directly).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.leaf_der()]
    }

    /// The private key, DER.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("issued key PEM parses")
    }

    /// Lowercase hex SHA-256 of the leaf DER (the `Hash=` of an Envoy-format x-forwarded-client-cert).
    pub fn sha256_hex(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.leaf_der().as_ref());
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The serial number (of a good SVID), normalised by [`normalize_serial`].
    pub fn serial(&self) -> String {
        let td: TrustDomain = TRUST_DOMAIN.parse().expect("valid trust domain");
        let svid = mandate_identity::svid::check_svid(self.leaf_der().as_ref(), &td)
            .expect("the serial is asked of good SVIDs only");
        normalize_serial(&svid.serial)
    }

    /// notAfter of a good SVID, Unix seconds.
    pub fn not_after(&self) -> i64 {
        let td: TrustDomain = TRUST_DOMAIN.parse().expect("valid trust domain");
        mandate_identity::svid::check_svid(self.leaf_der().as_ref(), &td)
            .expect("notAfter is asked of good SVIDs only")
            .not_after
    }

    /// The base64 body of the private key PEM: key material that must never appear in logs or `/config`.
    pub fn key_material(&self) -> String {
        self.key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    }

    /// Writes the certificate and key to `cert` and `key`, each by writing a temporary file in the same
    /// directory and renaming it over the target, so a watcher never sees a half-written file.
    pub fn write_atomically(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        replace_file(key, self.key_pem.as_bytes())?;
        replace_file(cert, self.cert_pem.as_bytes())
    }
}

/// Replaces `path` with `contents` atomically: write `path.tmp-<pid>-<n>`, then rename it over `path`.
pub fn replace_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename over {}", path.display()))
}

/// Serial numbers compared the way `/config` may print them: hex digits only, lowercase, no leading zeros.
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// A certificate that breaks exactly one rule the inbound listener enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Well-formed SVID for our trust domain, signed by a CA that is not in the bundle.
    OtherCa,
    /// Well-formed SVID for `spiffe://other.org/...`, signed by other.org's own CA.
    OtherTrustDomainCa,
    /// Signed by our CA, but the URI SAN is `spiffe://evil.org/agent/...`.
    ForeignUriSan,
    /// Signed by our CA, validity period entirely in the past.
    Expired,
    /// Signed by our CA, validity period entirely in the future.
    NotYetValid,
    /// Signed by our CA, two URI SANs.
    TwoUriSans,
    /// Signed by our CA, basicConstraints cA=true on the leaf.
    CaFlaggedLeaf,
    /// Signed by our CA, URI SAN is not a spiffe:// URI.
    NotSpiffe,
    /// Signed by our CA, EKU serverAuth only (no clientAuth).
    ServerAuthOnly,
}

/// The test's certificate authority and trust bundle.
pub struct Pki {
    td: TrustDomain,
    ca: CertificateAuthority,
    bundle: PathBuf,
}

impl Pki {
    /// A fresh CA for [`TRUST_DOMAIN`]; its certificate is written to `dir/bundle.pem`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        Self::with_trust_domain(dir, TRUST_DOMAIN, "bundle.pem")
    }

    /// A fresh CA for trust domain `td`; its certificate is written to `dir/bundle_name`.
    pub fn with_trust_domain(dir: &Path, td: &str, bundle_name: &str) -> anyhow::Result<Self> {
        let td: TrustDomain = td.parse()?;
        let ca = CertificateAuthority::generate(td.clone(), Duration::from_secs(86400))?;
        let bundle = dir.join(bundle_name);
        std::fs::write(&bundle, ca.cert_pem())?;
        Ok(Self { td, ca, bundle })
    }

    /// The trust bundle file (our CA certificate).
    pub fn bundle_path(&self) -> &Path {
        &self.bundle
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// `agent/NAME`, `service/NAME` or a full `spiffe://` ID, as a full ID string in our trust domain.
    pub fn id(&self, shorthand: &str) -> String {
        SpiffeId::from_shorthand(&self.td, shorthand)
            .expect("valid SPIFFE ID shorthand")
            .to_string()
    }

    /// A good SVID for `shorthand` (see [`Pki::id`]).
    pub fn issue(&self, shorthand: &str) -> Svid {
        self.issue_with(shorthand, |_| {})
    }

    /// An SVID for `shorthand` signed by our CA after `edit` has changed its parameters.
    pub fn issue_with(&self, shorthand: &str, edit: impl FnOnce(&mut CertificateParams)) -> Svid {
        let id = SpiffeId::from_shorthand(&self.td, shorthand).expect("valid SPIFFE ID shorthand");
        sign_with(&self.ca, &id, edit)
    }

    /// A certificate for `shorthand` (`agent/NAME`, `service/NAME`) that breaks rule `kind`.
    pub fn broken(&self, kind: Broken, shorthand: &str) -> Svid {
        let uri = |s: &str| SanType::URI(s.try_into().expect("ASCII URI"));
        let now = time::OffsetDateTime::now_utc();
        match kind {
            Broken::OtherCa => {
                let other =
                    CertificateAuthority::generate(self.td.clone(), Duration::from_secs(86400))
                        .expect("second CA");
                let id = SpiffeId::from_shorthand(&self.td, shorthand).expect("valid shorthand");
                sign_with(&other, &id, |_| {})
            }
            Broken::OtherTrustDomainCa => {
                let td: TrustDomain = "other.org".parse().expect("valid trust domain");
                let other = CertificateAuthority::generate(td.clone(), Duration::from_secs(86400))
                    .expect("other.org CA");
                let id = SpiffeId::from_shorthand(&td, shorthand).expect("valid shorthand");
                sign_with(&other, &id, |_| {})
            }
            Broken::ForeignUriSan => {
                let evil = format!("spiffe://evil.org/{shorthand}");
                let mut svid = self.issue_with(shorthand, |p| {
                    p.subject_alt_names = vec![uri(&evil)];
                });
                svid.id = evil;
                svid
            }
            Broken::Expired => self.issue_with(shorthand, |p| {
                p.not_before = now - time::Duration::hours(2);
                p.not_after = now - time::Duration::hours(1);
            }),
            Broken::NotYetValid => self.issue_with(shorthand, |p| {
                p.not_before = now + time::Duration::hours(1);
                p.not_after = now + time::Duration::hours(2);
            }),
            Broken::TwoUriSans => {
                let second = self.id(&format!("{shorthand}-twin"));
                self.issue_with(shorthand, |p| {
                    p.subject_alt_names.push(uri(&second));
                })
            }
            Broken::CaFlaggedLeaf => self.issue_with(shorthand, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }),
            Broken::NotSpiffe => self.issue_with(shorthand, |p| {
                p.subject_alt_names = vec![uri("https://example.com/agent")];
            }),
            Broken::ServerAuthOnly => self.issue_with(shorthand, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            }),
        }
    }
}

fn sign_with(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    edit: impl FnOnce(&mut CertificateParams),
) -> Svid {
    let mut params = svid_params(id, SVID_TTL);
    edit(&mut params);
    let key = KeyPair::generate().expect("generate a P-256 key");
    let cert_pem = ca
        .sign(params, &key, id)
        .expect("sign the test certificate");
    Svid {
        id: id.to_string(),
        cert_pem,
        key_pem: key.serialize_pem(),
    }
}
