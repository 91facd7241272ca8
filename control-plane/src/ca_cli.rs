//! `mandate ca`: a file-based root CA for standalone sidecars (`ca init`) and the SVIDs it issues (`ca issue`).
//!
//! The CA lives in a directory as `ca.pem` (the certificate, which is also the trust bundle sidecars
//! need) and `ca-key.pem`. Private keys are written 0600 from the moment the file exists, so there is
//! no window in which another user could read them.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mandate_identity::ca::{CaError, CertificateAuthority};
use mandate_identity::svid::{self, Svid};
use mandate_identity::{SpiffeId, SpiffeIdError, TrustDomain, WorkloadKind};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// File name of the CA certificate (also the trust bundle) inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Mode for private keys: readable by the owner only.
const KEY_MODE: u32 = 0o600;
/// Mode for certificates: public material.
const CERT_MODE: u32 = 0o644;

/// What went wrong in a `mandate ca` command; every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CaCliError {
    /// `ca init` would overwrite an existing CA.
    #[error("{} already exists: pass --force to overwrite the CA (every SVID it issued stops being trusted)", .0.display())]
    AlreadyExists(PathBuf),
    /// `ca issue` found no CA in the directory.
    #[error("no CA in {dir}: run `mandate ca init --dir {dir}` first", dir = .0.display())]
    NoCa(PathBuf),
    /// The CA files exist but do not make a usable CA.
    #[error("cannot load the CA from {}: {source}", dir.display())]
    BadCa {
        /// The CA directory.
        dir: PathBuf,
        /// Why it is unusable.
        source: CaError,
    },
    /// The identity argument does not parse.
    #[error(
        "invalid identity {id:?}: {source} (use agent/NAME, service/NAME or spiffe://TRUST_DOMAIN/PATH)"
    )]
    BadId {
        /// The argument as given.
        id: String,
        /// Why it is not a SPIFFE ID.
        source: SpiffeIdError,
    },
    /// A bare trust-domain ID names no workload.
    #[error("{0} names a trust domain, not a workload: use agent/NAME or service/NAME")]
    NoWorkloadPath(String),
    /// The identity belongs to another trust domain than the CA's.
    #[error(
        "{id} is not in this CA's trust domain {td}: use agent/NAME or service/NAME, or the CA of {id_td}"
    )]
    ForeignTrustDomain {
        /// The requested ID.
        id: String,
        /// The CA's trust domain.
        td: String,
        /// The requested ID's trust domain.
        id_td: String,
    },
    /// The output files would replace the CA's own files.
    #[error("issuing {id} into {} would overwrite the CA's own {}: choose another --out directory", out.display(), clash.display())]
    ClobbersCa {
        /// The requested ID.
        id: String,
        /// The output directory.
        out: PathBuf,
        /// The CA file that would be overwritten.
        clash: PathBuf,
    },
    /// Issuing failed inside the CA.
    #[error("cannot issue {id}: {source}")]
    Issue {
        /// The requested ID.
        id: String,
        /// What the CA reported.
        source: CaError,
    },
    /// The CA generated a certificate that breaks the X.509-SVID rules (a bug, never expected).
    #[error("the issued certificate for {id} breaks the X.509-SVID rules: {source}")]
    Invalid {
        /// The requested ID.
        id: String,
        /// The rule broken.
        source: svid::SvidError,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot write", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The files `ca init` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The CA certificate (trust bundle).
    pub cert: PathBuf,
    /// The CA private key (mode 0600).
    pub key: PathBuf,
    /// The trust domain the CA serves.
    pub trust_domain: TrustDomain,
}

/// The files `ca issue` wrote and what the certificate says.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// The SVID certificate.
    pub cert: PathBuf,
    /// The SVID private key (mode 0600).
    pub key: PathBuf,
    /// The identity and validity of the issued certificate, as a verifier will read them.
    pub svid: Svid,
}

/// Paths of the CA certificate and key inside `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE))
}

/// Creates a root CA for `trust_domain` valid for `ttl` and writes it into `dir` (created if missing).
///
/// Without `force`, an existing `ca.pem` or `ca-key.pem` is an error and nothing is written.
pub fn init(
    dir: &Path,
    trust_domain: TrustDomain,
    ttl: Duration,
    force: bool,
) -> Result<CaFiles, CaCliError> {
    let (cert, key) = ca_paths(dir);
    // Check both before writing either, so a refused init leaves the directory untouched.
    if !force {
        for path in [&cert, &key] {
            if path.symlink_metadata().is_ok() {
                return Err(CaCliError::AlreadyExists(path.clone()));
            }
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaCliError::Io {
        action: "cannot create directory",
        path: dir.to_owned(),
        source,
    })?;
    let ca = CertificateAuthority::generate(trust_domain.clone(), ttl).map_err(|source| {
        CaCliError::BadCa {
            dir: dir.to_owned(),
            source,
        }
    })?;
    // Key first: a CA certificate without its key would look like a CA but could issue nothing.
    write_file(&key, ca.key_pem().as_bytes(), KEY_MODE, force)?;
    if let Err(e) = write_file(&cert, ca.cert_pem().as_bytes(), CERT_MODE, force) {
        if !force {
            // We created the key a moment ago; do not leave half a CA behind.
            let _ = fs::remove_file(&key);
        }
        return Err(e);
    }
    Ok(CaFiles {
        cert,
        key,
        trust_domain,
    })
}

/// Loads the CA stored in `dir` by [`init`].
pub fn load(dir: &Path) -> Result<CertificateAuthority, CaCliError> {
    let (cert, key) = ca_paths(dir);
    if !cert.is_file() || !key.is_file() {
        return Err(CaCliError::NoCa(dir.to_owned()));
    }
    let cert_pem = read_to_string(&cert)?;
    let key_pem = read_to_string(&key)?;
    CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(|source| CaCliError::BadCa {
        dir: dir.to_owned(),
        source,
    })
}

/// Parses `agent/NAME`, `service/NAME` or a full `spiffe://` ID and checks it is in `td`.
pub fn parse_id(td: &TrustDomain, id: &str) -> Result<SpiffeId, CaCliError> {
    let parsed = SpiffeId::from_shorthand(td, id).map_err(|source| CaCliError::BadId {
        id: id.to_owned(),
        source,
    })?;
    if parsed.path().is_empty() {
        return Err(CaCliError::NoWorkloadPath(parsed.to_string()));
    }
    if !parsed.is_member_of(td) {
        return Err(CaCliError::ForeignTrustDomain {
            id: parsed.to_string(),
            td: td.to_string(),
            id_td: parsed.trust_domain_str().to_owned(),
        });
    }
    Ok(parsed)
}

/// The file stem for an identity's SVID: the workload name, with `/` flattened so it stays in one directory.
pub fn file_stem(id: &SpiffeId) -> String {
    match id.kind() {
        WorkloadKind::Agent | WorkloadKind::Service => id.name().to_owned(),
        _ => id.path().trim_start_matches('/').replace('/', "-"),
    }
}

/// Issues an SVID for `id` (see [`parse_id`]) from the CA in `dir`, valid for `ttl`, into `out`
/// (default `dir`) as `NAME.pem` and `NAME-key.pem`. Existing SVID files are replaced atomically.
pub fn issue(
    dir: &Path,
    id: &str,
    out: Option<&Path>,
    ttl: Duration,
) -> Result<IssuedFiles, CaCliError> {
    let ca = load(dir)?;
    let id = parse_id(ca.trust_domain(), id)?;
    let out = out.unwrap_or(dir);
    let stem = file_stem(&id);
    let cert = out.join(format!("{stem}.pem"));
    let key = out.join(format!("{stem}-key.pem"));
    refuse_ca_clobber(dir, out, &id, [&cert, &key])?;

    let issued = ca.issue(&id, ttl).map_err(|source| CaCliError::Issue {
        id: id.to_string(),
        source,
    })?;
    // Read the certificate back as a sidecar will, so what we report is what peers will see.
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).map_err(|e| {
        CaCliError::Invalid {
            id: id.to_string(),
            source: svid::SvidError::Malformed(e.to_string()),
        }
    })?;
    let svid = svid::check_svid(&der, ca.trust_domain()).map_err(|source| CaCliError::Invalid {
        id: id.to_string(),
        source,
    })?;

    fs::create_dir_all(out).map_err(|source| CaCliError::Io {
        action: "cannot create directory",
        path: out.to_owned(),
        source,
    })?;
    write_file(&key, issued.key_pem.as_bytes(), KEY_MODE, true)?;
    write_file(&cert, issued.cert_pem.as_bytes(), CERT_MODE, true)?;
    Ok(IssuedFiles { cert, key, svid })
}

/// Refuses output paths that are the CA's own files (e.g. `service/ca` issued into the CA directory).
fn refuse_ca_clobber(
    dir: &Path,
    out: &Path,
    id: &SpiffeId,
    targets: [&Path; 2],
) -> Result<(), CaCliError> {
    // Compare canonical directories so `--out ./ca` and `--dir ca` are recognised as the same place;
    // an output directory that does not exist yet cannot hold the CA.
    let (Ok(ca_dir), Ok(out_dir)) = (dir.canonicalize(), out.canonicalize()) else {
        return Ok(());
    };
    if ca_dir != out_dir {
        return Ok(());
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    for target in targets {
        for ca_file in [&ca_cert, &ca_key] {
            if target.file_name() == ca_file.file_name() {
                return Err(CaCliError::ClobbersCa {
                    id: id.to_string(),
                    out: out.to_owned(),
                    clash: ca_file.clone(),
                });
            }
        }
    }
    Ok(())
}

fn read_to_string(path: &Path) -> Result<String, CaCliError> {
    fs::read_to_string(path).map_err(|source| CaCliError::Io {
        action: "cannot read",
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` with `mode` set at creation.
///
/// Without `overwrite` the file must not exist (checked atomically by `O_EXCL`). With it, the data
/// goes to a fresh temporary file in the same directory that is then renamed over `path`, so
/// readers (such as a sidecar watching the file) never see a half-written file and an existing
/// file's looser mode is not inherited.
fn write_file(path: &Path, contents: &[u8], mode: u32, overwrite: bool) -> Result<(), CaCliError> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| CaCliError::Io {
            action,
            path,
            source,
        }
    };
    if !overwrite {
        return create_new(path, contents, mode).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => CaCliError::AlreadyExists(path.to_owned()),
            _ => io_err("cannot write", path)(e),
        });
    }
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // A stale temporary from a crashed run would make create_new fail; it holds nothing we need.
    let _ = fs::remove_file(&tmp);
    create_new(&tmp, contents, mode).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("cannot replace", path)(e)
    })
}

fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DAY: Duration = Duration::from_secs(86_400);

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn check(cert: &Path) -> Svid {
        let pem = fs::read_to_string(cert).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        svid::check_svid(&der, &td()).unwrap()
    }

    #[test]
    fn init_creates_the_directory_and_writes_the_key_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/ca");
        let files = init(&dir, td(), DAY, false).unwrap();
        assert_eq!(files.cert, dir.join("ca.pem"));
        assert_eq!(files.key, dir.join("ca-key.pem"));
        assert_eq!(mode(&files.key), 0o600);
        // The umask may narrow the certificate's mode, never widen it.
        assert_eq!(mode(&files.cert) & !0o644, 0);
        let ca = load(&dir).unwrap();
        assert_eq!(ca.trust_domain(), &td());
    }

    #[test]
    fn init_refuses_to_overwrite_without_force_and_leaves_the_ca_intact() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        let before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();

        let err = init(tmp.path(), td(), DAY, false).unwrap_err();
        assert!(matches!(err, CaCliError::AlreadyExists(_)), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), before);

        // Only one of the two files present is still a CA we must not clobber.
        fs::remove_file(tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = init(tmp.path(), td(), DAY, false).unwrap_err();
        assert!(matches!(err, CaCliError::AlreadyExists(p) if p.ends_with(CA_CERT_FILE)));
        assert!(!tmp.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn init_with_force_replaces_the_ca_and_keeps_the_key_private() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        init(tmp.path(), td(), DAY, false).unwrap();
        let before = fs::read(&key).unwrap();
        // A key file someone loosened must not keep its loose mode after a forced re-init.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        init(tmp.path(), td(), DAY, true).unwrap();
        assert_ne!(fs::read(&key).unwrap(), before);
        assert_eq!(mode(&key), 0o600);
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn issue_writes_an_svid_that_passes_the_rules_with_the_right_id() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        let out = tmp.path().join("svids");

        let agent = issue(tmp.path(), "agent/research", Some(&out), DAY).unwrap();
        assert_eq!(agent.cert, out.join("research.pem"));
        assert_eq!(agent.key, out.join("research-key.pem"));
        assert_eq!(mode(&agent.key), 0o600);
        let checked = check(&agent.cert);
        assert_eq!(checked.id.as_str(), "spiffe://mandate.local/agent/research");
        assert_eq!(checked, agent.svid);
        assert!(checked.not_after - checked.not_before >= DAY.as_secs() as i64);

        let full = issue(
            tmp.path(),
            "spiffe://mandate.local/service/tool",
            None,
            Duration::from_secs(90),
        )
        .unwrap();
        assert_eq!(full.cert, tmp.path().join("tool.pem"));
        assert_eq!(
            check(&full.cert).id.as_str(),
            "spiffe://mandate.local/service/tool"
        );
        assert!(
            fs::read_to_string(&full.key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
    }

    #[test]
    fn issue_reissues_over_existing_svid_files() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        let first = issue(tmp.path(), "service/tool", None, DAY).unwrap();
        let second = issue(tmp.path(), "service/tool", None, DAY).unwrap();
        assert_ne!(first.svid.serial, second.svid.serial);
        assert_eq!(check(&second.cert).serial, second.svid.serial);
    }

    #[test]
    fn issue_refuses_an_id_of_another_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        let err = issue(tmp.path(), "spiffe://evil.org/agent/x", None, DAY).unwrap_err();
        assert!(
            matches!(err, CaCliError::ForeignTrustDomain { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mandate.local"), "{err}");
        assert!(!tmp.path().join("x.pem").exists());
    }

    #[test]
    fn issue_without_a_ca_says_to_run_init() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("missing");
        let err = issue(&dir, "agent/research", None, DAY).unwrap_err();
        assert!(matches!(err, CaCliError::NoCa(_)), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "no CA in {d}: run `mandate ca init --dir {d}` first",
                d = dir.display()
            )
        );
    }

    #[test]
    fn issue_rejects_malformed_ids_and_bare_trust_domains() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        for bad in ["agent/", "agent/a b", "https://x/agent/a"] {
            let err = issue(tmp.path(), bad, None, DAY).unwrap_err();
            assert!(matches!(err, CaCliError::BadId { .. }), "{bad}: {err}");
        }
        let err = issue(tmp.path(), "spiffe://mandate.local", None, DAY).unwrap_err();
        assert!(matches!(err, CaCliError::NoWorkloadPath(_)), "{err}");
    }

    #[test]
    fn issue_never_overwrites_the_ca_files() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), td(), DAY, false).unwrap();
        let key_before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        for id in ["service/ca", "agent/ca-key"] {
            let err = issue(tmp.path(), id, None, DAY).unwrap_err();
            assert!(matches!(err, CaCliError::ClobbersCa { .. }), "{id}: {err}");
        }
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), key_before);
        // Into another directory the name is harmless.
        issue(tmp.path(), "service/ca", Some(&tmp.path().join("out")), DAY).unwrap();
    }

    #[test]
    fn file_stem_flattens_paths_outside_the_conventions() {
        let id: SpiffeId = "spiffe://mandate.local/ns/prod/sa/web".parse().unwrap();
        assert_eq!(file_stem(&id), "ns-prod-sa-web");
        let cp: SpiffeId = "spiffe://mandate.local/control-plane".parse().unwrap();
        assert_eq!(file_stem(&cp), "control-plane");
    }
}
