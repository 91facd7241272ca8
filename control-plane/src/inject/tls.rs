//! The webhook's TLS: a certificate and key from PEM files (e.g. a cert-manager Secret), checked at
//! start-up and re-read when they change, so a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mandate_identity::tls::PROVIDER;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

/// How often the files are checked for a new certificate (Secret volumes update within a minute
/// or so anyway).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Why the webhook's certificate or key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file cannot be read.
    #[error("{flag} {path}: {source}")]
    Read {
        /// `--webhook-cert` or `--webhook-key`.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no usable PEM of the expected kind.
    #[error("{flag} {path}: {why}")]
    Pem {
        /// `--webhook-cert` or `--webhook-key`.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The key does not belong to the certificate, or is of an unsupported type.
    #[error("--webhook-key {path} does not fit --webhook-cert: {why}")]
    Mismatch {
        /// The key file.
        path: PathBuf,
        /// rustls' reason.
        why: String,
    },
    /// The certificate's validity has ended; the API server would refuse it.
    #[error("--webhook-cert {path}: the certificate expired at {not_after}; renew it")]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its notAfter (RFC 3339).
        not_after: String,
    },
}

/// The webhook's certificate, swapped when its files change.
pub struct WebhookCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The file contents `current` was made from, to notice a change.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for WebhookCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl WebhookCert {
    /// Loads and checks the certificate chain (leaf first) and its key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let (cert_pem, key_pem) = read_both(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &cert_pem, &key_pem)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: ArcSwap::from_pointee(key),
            loaded: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Re-reads the files; swaps in the new certificate when they changed and are usable.
    /// Returns whether it swapped. On error the current certificate stays.
    pub fn reload(&self) -> Result<bool, CertError> {
        let (cert_pem, key_pem) = read_both(&self.cert_path, &self.key_path)?;
        let mut loaded = self.loaded.lock().expect("webhook certificate lock");
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(&self.cert_path, &self.key_path, &cert_pem, &key_pem)?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Checks the files every `every` until `cancel` fires, logging each swap and each unusable
    /// update (the certificate served so far stays in use).
    pub async fn reload_on_change(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.reload() {
                Ok(true) => tracing::info!(
                    cert = %self.cert_path.display(),
                    "webhook certificate reloaded"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "webhook certificate files changed but are unusable; still serving the previous certificate"
                ),
            }
        }
    }

    /// The TLS configuration of the webhook listener: TLS 1.2 and 1.3 (what the API server
    /// offers), no client certificates, ALPN h2 and http/1.1.
    pub fn server_config(self: Arc<Self>) -> ServerConfig {
        let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

impl ResolvesServerCert for WebhookCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_both(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let read = |flag, path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            flag,
            path: path.to_owned(),
            source,
        })
    };
    Ok((read("--webhook-cert", cert)?, read("--webhook-key", key)?))
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            flag: "--webhook-cert",
            path: cert_path.to_owned(),
            why: format!("not PEM certificates: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::Pem {
            flag: "--webhook-cert",
            path: cert_path.to_owned(),
            why: "no CERTIFICATE block".to_owned(),
        });
    };
    let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| CertError::Pem {
        flag: "--webhook-cert",
        path: cert_path.to_owned(),
        why: format!("the first certificate cannot be parsed: {e}"),
    })?;
    let not_after = parsed.validity().not_after;
    if not_after.timestamp() <= time::OffsetDateTime::now_utc().unix_timestamp() {
        return Err(CertError::Expired {
            path: cert_path.to_owned(),
            not_after: not_after.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Pem {
        flag: "--webhook-key",
        path: key_path.to_owned(),
        why: format!("no usable PRIVATE KEY block: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, &PROVIDER).map_err(|e| CertError::Mismatch {
        path: key_path.to_owned(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM.
    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_a_matching_pair_and_reloads_only_a_changed_usable_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = self_signed("mandate.mandate-system.svc");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let loaded = WebhookCert::load(&cert, &key).unwrap();
        let first = loaded.current.load_full();
        assert!(
            !loaded.reload().unwrap(),
            "unchanged files are not reloaded"
        );

        let (c2, k2) = self_signed("mandate.mandate-system.svc");
        std::fs::write(&cert, &c2).unwrap();
        let err = loaded.reload().unwrap_err();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");
        assert!(
            Arc::ptr_eq(&first, &loaded.current.load_full()),
            "kept the old one"
        );

        std::fs::write(&key, &k2).unwrap();
        assert!(loaded.reload().unwrap());
        assert!(!Arc::ptr_eq(&first, &loaded.current.load_full()));
    }

    #[test]
    fn errors_name_the_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let err = WebhookCert::load(&cert, &key).unwrap_err().to_string();
        assert!(err.starts_with("--webhook-cert "), "{err}");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let err = WebhookCert::load(&cert, &key).unwrap_err().to_string();
        assert!(
            err.contains("--webhook-cert") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let (c, _) = self_signed("x");
        std::fs::write(&cert, c).unwrap();
        let err = WebhookCert::load(&cert, &key).unwrap_err().to_string();
        assert!(err.starts_with("--webhook-key "), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        std::fs::write(&cert, params.self_signed(&kp).unwrap().pem()).unwrap();
        std::fs::write(&key, kp.serialize_pem()).unwrap();
        let err = WebhookCert::load(&cert, &key).unwrap_err();
        assert!(matches!(err, CertError::Expired { .. }), "{err}");
    }
}
