//! The sidecar's identity: SVID, key and trust bundle — read from files (standalone) or issued by
//! the control plane (managed) — validated as one set, turned into TLS configurations, and swapped
//! atomically when they change.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mandate_identity::TrustDomain;
use mandate_identity::svid::{Svid, SvidError, check_svid};
use mandate_identity::tls::{PemRootsError, roots_from_pem};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::IdentityFiles;
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::tls::{self, ALPN_H2, ALPN_HTTP1, ALPN_TCP, SvidResolver};

/// Why an identity (files or issued PEM) cannot be used.
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
    /// A part has no usable PEM of the expected kind.
    #[error("{origin}: {why}")]
    Pem {
        /// The file, or what the control plane sent.
        origin: String,
        /// What was expected.
        why: String,
    },
    /// The certificate breaks an X.509-SVID rule.
    #[error("{origin}: not a valid X.509-SVID for this trust domain: {source}")]
    Svid {
        /// The certificate's origin.
        origin: String,
        /// The rule broken.
        source: SvidError,
    },
    /// The private key does not belong to the certificate.
    #[error("key {key} does not match certificate {cert}: {why}")]
    KeyMismatch {
        /// Certificate origin.
        cert: String,
        /// Key origin.
        key: String,
        /// rustls' words.
        why: String,
    },
    /// Outside its validity period.
    #[error(
        "{origin}: certificate is not valid now (valid {not_before}..{not_after} Unix seconds)"
    )]
    Validity {
        /// Certificate origin.
        origin: String,
        /// notBefore.
        not_before: i64,
        /// notAfter.
        not_after: i64,
    },
    /// Our certificate does not chain to our own bundle, so peers would refuse it.
    #[error("{cert} does not chain to the trust bundle {bundle}: {why}")]
    Chain {
        /// Certificate origin.
        cert: String,
        /// Bundle origin.
        bundle: String,
        /// webpki's words.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// An identity as PEM text: certificate chain, private key and trust bundle. No `Debug`: it holds
/// the key.
#[derive(Clone)]
pub struct IdentityPem {
    /// Leaf first, then intermediates.
    pub cert: String,
    /// The private key (PKCS#8, SEC1 or PKCS#1). Secret.
    pub key: String,
    /// CA certificates peers' SVIDs must chain to.
    pub bundle: String,
}

/// What each part is called in errors: its file, or where it came from.
#[derive(Clone)]
struct Origins {
    cert: String,
    key: String,
    bundle: String,
}

impl Origins {
    fn files(files: &IdentityFiles) -> Self {
        Self {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            bundle: files.bundle.display().to_string(),
        }
    }

    fn control_plane() -> Self {
        Self {
            cert: "the certificate issued by the control plane".into(),
            key: "the key generated for it".into(),
            bundle: "the control plane's trust bundle".into(),
        }
    }
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
    /// Our certificate and key as TLS presents them (never once expired).
    pub resolver: Arc<SvidResolver>,
    /// The trust bundle's CA certificates.
    pub roots: Arc<RootCertStore>,
    /// `x5t#S256` of our leaf certificate: what delegation tokens our agent presents are bound to.
    /// Computed once per identity, not per call.
    pub thumbprint: String,
    pem: IdentityPem,
    /// SHA-256 over the three parts: an event that changes nothing is not a reload.
    fingerprint: [u8; 32],
}

impl Identity {
    /// Validates one set; any failure leaves nothing half-loaded.
    fn build(
        origins: &Origins,
        td: &TrustDomain,
        pem: IdentityPem,
        revocations: &Arc<Revocations>,
    ) -> Result<Self, IdentityError> {
        let pem_err = |origin: &str, why: String| IdentityError::Pem {
            origin: origin.to_owned(),
            why,
        };
        let chain = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&origins.cert, format!("bad PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&origins.cert, "no CERTIFICATE block".into()))?;
        let svid = check_svid(leaf, td).map_err(|source| IdentityError::Svid {
            origin: origins.cert.clone(),
            source,
        })?;
        let now = UnixTime::now();
        if !svid.is_valid_at(now.as_secs() as i64) {
            return Err(IdentityError::Validity {
                origin: origins.cert.clone(),
                not_before: svid.not_before,
                not_after: svid.not_after,
            });
        }

        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| {
            pem_err(
                &origins.key,
                format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM): {e}"),
            )
        })?;
        let signing_key = tls::PROVIDER
            .key_provider
            .load_private_key(key)
            .map_err(|e| pem_err(&origins.key, format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(|e| IdentityError::KeyMismatch {
                cert: origins.cert.clone(),
                key: origins.key.clone(),
                why: e.to_string(),
            })?;

        let roots = Arc::new(parse_roots(&pem.bundle, &origins.bundle)?);
        let parsed = ParsedCertificate::try_from(leaf)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            tls::PROVIDER.signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::Chain {
            cert: origins.cert.clone(),
            bundle: origins.bundle.clone(),
            why: e.to_string(),
        })?;

        let resolver = Arc::new(SvidResolver::new(Arc::new(certified), svid.not_after));
        let client = |alpn| {
            tls::client_config(
                td,
                roots.clone(),
                resolver.clone(),
                revocations.clone(),
                alpn,
            )
            .map(Arc::new)
        };
        Ok(Identity {
            server: Arc::new(tls::server_config(
                td,
                roots.clone(),
                resolver.clone(),
                revocations.clone(),
            )?),
            client_http1: client(ALPN_HTTP1)?,
            client_h2: client(ALPN_H2)?,
            client_tcp: client(ALPN_TCP)?,
            fingerprint: fingerprint(&pem),
            thumbprint: mandate_wire::delegation::thumbprint(leaf.as_ref()),
            svid,
            resolver,
            roots,
            pem,
        })
    }

    /// The trust bundle, PEM (what pushed policy bundles are verified against).
    pub fn bundle_pem(&self) -> &str {
        &self.pem.bundle
    }

    /// The whole set as PEM (to persist it; holds the key).
    pub fn pem(&self) -> &IdentityPem {
        &self.pem
    }
}

/// Parses a PEM trust bundle into roots; `origin` names it in errors.
pub fn parse_roots(bundle: &str, origin: &str) -> Result<RootCertStore, IdentityError> {
    let pem_err = |why: String| IdentityError::Pem {
        origin: origin.to_owned(),
        why,
    };
    let roots = roots_from_pem(bundle.as_bytes()).map_err(|e| match e {
        PemRootsError::Pem(e) => pem_err(format!("bad PEM: {e}")),
        PemRootsError::Unusable(e) => pem_err(format!("unusable CA certificate: {e}")),
    })?;
    if roots.is_empty() {
        return Err(pem_err("no CERTIFICATE block".into()));
    }
    Ok(roots)
}

fn read_files(files: &IdentityFiles) -> Result<IdentityPem, IdentityError> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })
    };
    Ok(IdentityPem {
        cert: read(&files.cert)?,
        key: read(&files.key)?,
        bundle: read(&files.bundle)?,
    })
}

fn fingerprint(pem: &IdentityPem) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [&pem.cert, &pem.key, &pem.bundle] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The identity in force; readers take a snapshot, reloads swap it without blocking them.
pub struct IdentityStore {
    current: ArcSwap<Identity>,
    /// Standalone: the files it is reloaded from. Managed: none; the control plane installs.
    files: Option<IdentityFiles>,
    trust_domain: TrustDomain,
    metrics: Arc<Metrics>,
    revocations: Arc<Revocations>,
    /// Serialises read-modify-write updates (a renewal and a trust bundle swap), so neither undoes
    /// the other. Readers never take it.
    update: Mutex<()>,
}

impl IdentityStore {
    /// Loads the initial identity from files; start-up fails if it is unusable.
    pub fn load(
        files: IdentityFiles,
        trust_domain: TrustDomain,
        metrics: Arc<Metrics>,
        revocations: Arc<Revocations>,
    ) -> Result<Self, IdentityError> {
        let pem = read_files(&files)?;
        let identity = Identity::build(&Origins::files(&files), &trust_domain, pem, &revocations)?;
        Ok(Self::with(
            identity,
            Some(files),
            trust_domain,
            metrics,
            revocations,
        ))
    }

    /// An identity issued by the control plane (or restored from the state directory), validated
    /// exactly as files are.
    pub fn from_pem(
        pem: IdentityPem,
        trust_domain: TrustDomain,
        metrics: Arc<Metrics>,
        revocations: Arc<Revocations>,
    ) -> Result<Self, IdentityError> {
        let identity =
            Identity::build(&Origins::control_plane(), &trust_domain, pem, &revocations)?;
        Ok(Self::with(
            identity,
            None,
            trust_domain,
            metrics,
            revocations,
        ))
    }

    /// Validates a set without installing it (an identity restored from the state directory).
    pub fn validate(pem: IdentityPem, trust_domain: &TrustDomain) -> Result<Svid, IdentityError> {
        Identity::build(
            &Origins::control_plane(),
            trust_domain,
            pem,
            &Arc::new(Revocations::new()),
        )
        .map(|identity| identity.svid)
    }

    fn with(
        identity: Identity,
        files: Option<IdentityFiles>,
        trust_domain: TrustDomain,
        metrics: Arc<Metrics>,
        revocations: Arc<Revocations>,
    ) -> Self {
        metrics.cert_expiry.set(identity.svid.not_after);
        Self {
            current: ArcSwap::from_pointee(identity),
            files,
            trust_domain,
            metrics,
            revocations,
            update: Mutex::new(()),
        }
    }

    /// The identity in force now.
    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Our trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The registry's inactive workloads, refused by every verifier built from this store.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Applies a registry's inactive workloads: refused by every verifier from now on, their
    /// tracked connections closed. Returns the IDs that became inactive.
    ///
    /// TLS session resumption skips certificate verification, so when the set grows the TLS
    /// configurations are rebuilt from the same certificate and key: their session caches go with
    /// the old ones, and every later handshake with a newly inactive peer is verified in full.
    pub fn apply_registry(&self, registry: &mandate_wire::Registry) -> Vec<String> {
        let newly = self.revocations.apply(registry);
        if !newly.is_empty() {
            let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
            let pem = self.current.load().pem.clone();
            let origins = match &self.files {
                Some(files) => Origins::files(files),
                None => Origins::control_plane(),
            };
            match Identity::build(&origins, &self.trust_domain, pem, &self.revocations) {
                Ok(identity) => self.current.store(Arc::new(identity)),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot rebuild the TLS configurations; resumed sessions may skip the revocation check until the next identity change"
                ),
            }
        }
        newly
    }

    /// Re-reads the files and swaps in the new identity if it is valid and different.
    /// Returns whether a new identity was applied; a rejected set leaves the current one in force.
    /// Managed identities have no files: nothing to reload.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let result = read_files(files).and_then(|pem| {
            if fingerprint(&pem) == self.current.load().fingerprint {
                return Ok(None);
            }
            Identity::build(
                &Origins::files(files),
                &self.trust_domain,
                pem,
                &self.revocations,
            )
            .map(Some)
        });
        match result {
            Ok(None) => Ok(false),
            Ok(Some(identity)) => {
                self.swap(identity, "identity reloaded");
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "identity reload rejected; keeping the current identity");
                self.metrics.identity_reload(false);
                Err(e)
            }
        }
    }

    /// Installs a complete new set (an SVID the control plane issued or renewed). A set that fails
    /// validation leaves the current identity in force.
    pub fn install(&self, pem: IdentityPem) -> Result<(), IdentityError> {
        let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
        self.build_and_swap(pem, "identity installed")
    }

    /// Keeps certificate and key, trusts `bundle` from now on. Returns whether it differed.
    pub fn set_bundle(&self, bundle: &str) -> Result<bool, IdentityError> {
        let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load();
        if current.pem.bundle == bundle {
            return Ok(false);
        }
        let pem = IdentityPem {
            bundle: bundle.to_owned(),
            ..current.pem.clone()
        };
        drop(current);
        self.build_and_swap(pem, "trust bundle replaced")
            .map(|()| true)
    }

    fn build_and_swap(&self, pem: IdentityPem, what: &str) -> Result<(), IdentityError> {
        match Identity::build(
            &Origins::control_plane(),
            &self.trust_domain,
            pem,
            &self.revocations,
        ) {
            Ok(identity) => {
                self.swap(identity, what);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "{what}: rejected; keeping the current identity");
                self.metrics.identity_reload(false);
                Err(e)
            }
        }
    }

    fn swap(&self, identity: Identity, what: &str) {
        tracing::info!(
            spiffe_id = %identity.svid.id,
            serial = %identity.svid.serial,
            not_after = identity.svid.not_after,
            "{what}"
        );
        self.metrics.cert_expiry.set(identity.svid.not_after);
        self.metrics.identity_reload(true);
        self.current.store(Arc::new(identity));
    }

    /// Reloads whenever the identity files change (standalone only).
    pub fn watch(self: &Arc<Self>) -> notify::Result<()> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let store = self.clone();
        let files = [&files.cert, &files.key, &files.bundle];
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
        IdentityStore::load(
            f.files.clone(),
            td(),
            Arc::new(Metrics::new()),
            Arc::new(Revocations::new()),
        )
        .unwrap()
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
            Arc::new(Revocations::new()),
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("not in trust domain other.org"),
            "{err}"
        );
    }
}
