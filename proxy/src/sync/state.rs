//! The state directory (`--state-dir`): key, SVID and trust bundle kept across restarts, so a
//! restarted sidecar renews with its still-valid SVID instead of needing a fresh join token; and
//! the last applied policy bundle, registry and delegation state (keys and revoked grants), so it
//! enforces them at once, even while the control plane is unreachable.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use mandate_wire::{DelegationState, Registry, SignedBundle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::identity::IdentityPem;

const CERT: &str = "svid.pem";
const KEY: &str = "svid-key.pem";
const BUNDLE: &str = "bundle.pem";
const POLICY_BUNDLE: &str = "policy-bundle.json";
const REGISTRY: &str = "registry.json";
const DELEGATION: &str = "delegation.json";

/// Why the state directory could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("--state-dir {path}: {source}")]
pub struct StateError {
    /// The file or directory.
    pub path: PathBuf,
    /// The I/O error.
    pub source: io::Error,
}

/// Where managed identity and the last applied state are persisted.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The directory (created on first save).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The identity saved by an earlier run, if all three files are there. Unreadable files
    /// count as absent: enrolment then starts afresh.
    pub fn load(&self) -> Option<IdentityPem> {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).ok();
        Some(IdentityPem {
            cert: read(CERT)?,
            key: read(KEY)?,
            bundle: read(BUNDLE)?,
        })
    }

    /// Saves the whole identity; the key is written first and readable by us only (0600). Each
    /// file is replaced atomically, so a crash leaves the old or the new one, never half of one.
    pub fn save(&self, pem: &IdentityPem) -> Result<(), StateError> {
        self.ensure_dir()?;
        self.write(KEY, &pem.key, 0o600)?;
        self.write(CERT, &pem.cert, 0o644)?;
        self.write(BUNDLE, &pem.bundle, 0o644)
    }

    /// Saves a new trust bundle.
    pub fn save_bundle(&self, bundle: &str) -> Result<(), StateError> {
        self.ensure_dir()?;
        self.write(BUNDLE, bundle, 0o644)
    }

    /// Saves the policy bundle last activated, as received (signature included).
    pub fn save_policy_bundle(&self, bundle: &SignedBundle) -> Result<(), StateError> {
        self.save_json(POLICY_BUNDLE, bundle)
    }

    /// Saves the registry last applied (with its revision).
    pub fn save_registry(&self, registry: &Registry) -> Result<(), StateError> {
        self.save_json(REGISTRY, registry)
    }

    /// Saves the delegation state last applied (keys and revoked grants, with its revision).
    pub fn save_delegation(&self, state: &DelegationState) -> Result<(), StateError> {
        self.save_json(DELEGATION, state)
    }

    /// The delegation state saved by an earlier run: `Ok(None)` when there is none, an error
    /// when the file cannot be read or parsed.
    pub fn load_delegation(&self) -> Result<Option<DelegationState>, StateError> {
        self.load_json(DELEGATION)
    }

    /// The policy bundle saved by an earlier run: `Ok(None)` when there is none, an error when
    /// the file cannot be read or parsed. Not verified here.
    pub fn load_policy_bundle(&self) -> Result<Option<SignedBundle>, StateError> {
        self.load_json(POLICY_BUNDLE)
    }

    /// The registry saved by an earlier run: `Ok(None)` when there is none, an error when the
    /// file cannot be read or parsed.
    pub fn load_registry(&self) -> Result<Option<Registry>, StateError> {
        self.load_json(REGISTRY)
    }

    fn save_json(&self, name: &str, value: &impl Serialize) -> Result<(), StateError> {
        let text = serde_json::to_string(value).map_err(|e| StateError {
            path: self.dir.join(name),
            source: e.into(),
        })?;
        self.ensure_dir()?;
        self.write(name, &text, 0o600)
    }

    fn load_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError {
                path,
                source: e.into(),
            })
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| StateError {
            path: self.dir.clone(),
            source,
        })
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let err = |source| StateError {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(text.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saved_identity_loads_back_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert!(state.load().is_none());
        let pem = IdentityPem {
            cert: "CERT".into(),
            key: "KEY".into(),
            bundle: "BUNDLE".into(),
        };
        state.save(&pem).unwrap();
        state.save_bundle("BUNDLE2").unwrap();
        let back = state.load().unwrap();
        assert_eq!(
            (back.cert.as_str(), back.key.as_str(), back.bundle.as_str()),
            ("CERT", "KEY", "BUNDLE2")
        );
        let mode = std::fs::metadata(state.path().join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn saved_bundle_and_registry_load_back_privately_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert!(state.load_policy_bundle().unwrap().is_none());
        assert!(state.load_registry().unwrap().is_none());
        let bundle = SignedBundle {
            version: 3,
            digest: "sha256:00".into(),
            modules: [("authz.rego".to_owned(), "package x".to_owned())].into(),
            data: r#"{"a": 1}"#.into(),
            signature: "c2ln".into(),
        };
        let registry = Registry {
            revision: 7,
            ..Registry::default()
        };
        let delegation = DelegationState {
            revision: 4,
            keys: Vec::new(),
            revoked_grants: vec![mandate_wire::RevokedGrant {
                id: "g".into(),
                expires_at: 9,
            }],
        };
        assert!(state.load_delegation().unwrap().is_none());
        state.save_policy_bundle(&bundle).unwrap();
        state.save_registry(&registry).unwrap();
        state.save_delegation(&delegation).unwrap();
        assert_eq!(state.load_policy_bundle().unwrap(), Some(bundle));
        assert_eq!(state.load_registry().unwrap(), Some(registry));
        assert_eq!(state.load_delegation().unwrap(), Some(delegation));
        for name in [POLICY_BUNDLE, REGISTRY, DELEGATION] {
            let mode = std::fs::metadata(state.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }

        std::fs::write(state.path().join(REGISTRY), "{not json").unwrap();
        let err = state.load_registry().unwrap_err();
        assert!(err.path.ends_with(REGISTRY), "{err}");
    }
}
