//! The sidecar's identity: SVID, key and trust bundle read from files, validated as one set, turned
//! into TLS configurations, and swapped atomically when the files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mandate_identity::TrustDomain;
use mandate_identity::svid::{Svid, SvidError, check_svid};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::IdentityFiles;
use crate::metrics::Metrics;
use crate::tls::{self, ALPN_H2, ALPN_HTTP1, ALPN_TCP, SvidResolver};

/// Why a set of identity files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file has no usable PEM of the expected kind.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        why: String,
    },
    /// The certificate breaks an X.509-SVID rule.
    #[error("{path}: not a valid X.509-SVID for this trust domain: {source}")]
    Svid {
        /// The certificate file.
        path: PathBuf,
        /// The rule broken.
        source: SvidError,
    },
    /// The private key does not belong to the certificate.
    #[error("key {key} does not match certificate {cert}: {why}")]
    KeyMismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls' words.
        why: String,
    },
    /// Outside its validity period.
    #[error("{path}: certificate is not valid now (valid {not_before}..{not_after} Unix seconds)")]
    Validity {
        /// Certificate file.
        path: PathBuf,
        /// notBefore.
        not_before: i64,
        /// notAfter.
        not_after: i64,
    },
    /// Our certificate does not chain to our own bundle, so peers would refuse it.
    #[error("{cert} does not chain to the trust bundle {bundle}: {why}")]
    Chain {
        /// Certificate file.
        cert: PathBuf,
        /// Bundle file.
        bundle: PathBuf,
        /// webpki's words.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// One consistent identity and the TLS configurations made from it.
pub struct Identity {
    /// Our SVID's identity and validity.
    pub svid: Svid,
    /// Inbound TLS.
    pub server: Arc<ServerConfig>,
    /// Outbound TLS offering HTTP/1.1.
    pub client_http1: Arc<ClientConfig>,
    /// Outbound TLS offering HTTP/2.
    pub client_h2: Arc<ClientConfig>,
    /// Outbound TLS for opaque TCP.
    pub client_tcp: Arc<ClientConfig>,
    /// SHA-256 over the three files' bytes: an event that changes nothing is not a reload.
    fingerprint: [u8; 32],
}

impl Identity {
    /// Reads and validates the files; any failure leaves nothing half-loaded.
    pub fn load(files: &IdentityFiles, td: &TrustDomain) -> Result<Self, IdentityError> {
        let raw = RawFiles::read(files)?;
        Self::from_raw(files, td, raw)
    }

    fn from_raw(
        files: &IdentityFiles,
        td: &TrustDomain,
        raw: RawFiles,
    ) -> Result<Self, IdentityError> {
        let pem_err = |path: &Path, why: String| IdentityError::Pem {
            path: path.to_owned(),
            why,
        };
        let chain = CertificateDer::pem_slice_iter(&raw.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&files.cert, format!("bad PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&files.cert, "no CERTIFICATE block".into()))?;
        let svid = check_svid(leaf, td).map_err(|source| IdentityError::Svid {
            path: files.cert.clone(),
            source,
        })?;
        let now = UnixTime::now();
        if !svid.is_valid_at(now.as_secs() as i64) {
            return Err(IdentityError::Validity {
                path: files.cert.clone(),
                not_before: svid.not_before,
                not_after: svid.not_after,
            });
        }

        let key = PrivateKeyDer::from_pem_slice(&raw.key).map_err(|e| {
            pem_err(
                &files.key,
                format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM): {e}"),
            )
        })?;
        let signing_key = tls::PROVIDER
            .key_provider
            .load_private_key(key)
            .map_err(|e| pem_err(&files.key, format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(|e| IdentityError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                why: e.to_string(),
            })?;

        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&raw.bundle) {
            let ca = ca.map_err(|e| pem_err(&files.bundle, format!("bad PEM: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| pem_err(&files.bundle, format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(pem_err(&files.bundle, "no CERTIFICATE block".into()));
        }
        let roots = Arc::new(roots);
        let parsed = ParsedCertificate::try_from(leaf)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            tls::PROVIDER.signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::Chain {
            cert: files.cert.clone(),
            bundle: files.bundle.clone(),
            why: e.to_string(),
        })?;

        let resolver = Arc::new(SvidResolver::new(Arc::new(certified), svid.not_after));
        let client =
            |alpn| tls::client_config(td, roots.clone(), resolver.clone(), alpn).map(Arc::new);
        Ok(Identity {
            server: Arc::new(tls::server_config(td, roots.clone(), resolver.clone())?),
            client_http1: client(ALPN_HTTP1)?,
            client_h2: client(ALPN_H2)?,
            client_tcp: client(ALPN_TCP)?,
            svid,
            fingerprint: raw.fingerprint(),
        })
    }
}

/// The three files' bytes, read together.
struct RawFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

impl RawFiles {
    fn read(files: &IdentityFiles) -> Result<Self, IdentityError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })
        };
        Ok(Self {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            bundle: read(&files.bundle)?,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.cert, &self.key, &self.bundle] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }
}

/// The identity in force; readers take a snapshot, reloads swap it without blocking them.
pub struct IdentityStore {
    current: ArcSwap<Identity>,
    files: IdentityFiles,
    trust_domain: TrustDomain,
    metrics: Arc<Metrics>,
}

impl IdentityStore {
    /// Loads the initial identity; start-up fails if it is unusable.
    pub fn load(
        files: IdentityFiles,
        trust_domain: TrustDomain,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IdentityError> {
        let identity = Identity::load(&files, &trust_domain)?;
        metrics.cert_expiry.set(identity.svid.not_after);
        Ok(Self {
            current: ArcSwap::from_pointee(identity),
            files,
            trust_domain,
            metrics,
        })
    }

    /// The identity in force now.
    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Re-reads the files and swaps in the new identity if it is valid and different.
    /// Returns whether a new identity was applied; a rejected set leaves the current one in force.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let result = RawFiles::read(&self.files).and_then(|raw| {
            if raw.fingerprint() == self.current.load().fingerprint {
                return Ok(None);
            }
            Identity::from_raw(&self.files, &self.trust_domain, raw).map(Some)
        });
        match result {
            Ok(None) => Ok(false),
            Ok(Some(identity)) => {
                tracing::info!(
                    spiffe_id = %identity.svid.id,
                    serial = %identity.svid.serial,
                    not_after = identity.svid.not_after,
                    "identity reloaded"
                );
                self.metrics.cert_expiry.set(identity.svid.not_after);
                self.metrics.identity_reload(true);
                self.current.store(Arc::new(identity));
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity reload rejected; keeping the current identity");
                self.metrics.identity_reload(false);
                Err(e)
            }
        }
    }

    /// Reloads whenever the identity files change.
    pub fn watch(self: &Arc<Self>) -> notify::Result<()> {
        let store = self.clone();
        let files = [&self.files.cert, &self.files.key, &self.files.bundle];
        crate::watch::on_change(&files.map(PathBuf::as_path), move || {
            let _ = store.reload();
        })
    }

    /// Whether the current SVID is within its validity period.
    pub fn is_valid_now(&self) -> bool {
        self.current
            .load()
            .svid
            .is_valid_at(UnixTime::now().as_secs() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_identity::SpiffeId;
    use mandate_identity::ca::CertificateAuthority;
    use std::time::Duration;

    struct Files {
        _dir: tempfile::TempDir,
        files: IdentityFiles,
        ca: CertificateAuthority,
    }

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    fn setup() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let files = IdentityFiles {
            cert: dir.path().join("svid.pem"),
            key: dir.path().join("svid-key.pem"),
            bundle: dir.path().join("bundle.pem"),
        };
        std::fs::write(&files.bundle, ca.cert_pem()).unwrap();
        let f = Files {
            _dir: dir,
            files,
            ca,
        };
        issue(&f, "agent/a");
        f
    }

    fn issue(f: &Files, id: &str) {
        let id = SpiffeId::from_shorthand(&td(), id).unwrap();
        let svid = f.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        std::fs::write(&f.files.cert, svid.cert_pem).unwrap();
        std::fs::write(&f.files.key, svid.key_pem).unwrap();
    }

    fn store(f: &Files) -> IdentityStore {
        IdentityStore::load(f.files.clone(), td(), Arc::new(Metrics::new())).unwrap()
    }

    #[test]
    fn loads_a_valid_set() {
        let f = setup();
        let s = store(&f);
        assert_eq!(
            s.current().svid.id.as_str(),
            "spiffe://mandate.local/agent/a"
        );
        assert!(s.is_valid_now());
    }

    #[test]
    fn reload_applies_a_new_valid_set_and_ignores_no_op_events() {
        let f = setup();
        let s = store(&f);
        assert!(!s.reload().unwrap(), "unchanged files are not a reload");
        issue(&f, "agent/b");
        assert!(s.reload().unwrap());
        assert_eq!(
            s.current().svid.id.as_str(),
            "spiffe://mandate.local/agent/b"
        );
    }

    #[test]
    fn broken_sets_are_rejected_and_the_old_identity_stays() {
        let f = setup();
        let s = store(&f);
        let before = s.current().svid.serial.clone();

        std::fs::write(&f.files.cert, "garbage").unwrap();
        assert!(matches!(s.reload(), Err(IdentityError::Pem { .. })));

        // A cert whose key is another one's: the half-written rotation case.
        let old_key = std::fs::read(&f.files.key).unwrap();
        issue(&f, "agent/a");
        std::fs::write(&f.files.key, old_key).unwrap();
        assert!(matches!(s.reload(), Err(IdentityError::KeyMismatch { .. })));

        // Signed by a CA that is not in our bundle.
        let other = CertificateAuthority::generate(td(), Duration::from_secs(86400)).unwrap();
        let svid = other
            .issue(
                &SpiffeId::agent(&td(), "a").unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        std::fs::write(&f.files.cert, svid.cert_pem).unwrap();
        std::fs::write(&f.files.key, svid.key_pem).unwrap();
        assert!(matches!(s.reload(), Err(IdentityError::Chain { .. })));

        assert_eq!(s.current().svid.serial, before);
    }

    #[test]
    fn wrong_trust_domain_is_rejected_at_load() {
        let f = setup();
        let err = IdentityStore::load(
            f.files.clone(),
            "other.org".parse().unwrap(),
            Arc::new(Metrics::new()),
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("not in trust domain other.org"),
            "{err}"
        );
    }
}
