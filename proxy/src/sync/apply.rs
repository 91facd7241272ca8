//! Applying one pushed `update`: trust bundle, then registry (revocations take effect at once),
//! then the policy bundle — verified against the trust bundle in force before it is compiled, and
//! refused (keeping the last good one) when its signature, digest or data are wrong; and the
//! delegation state (the keys tokens are verified with, the grants revoked since). What is applied
//! is persisted in the state directory, and restored from it at start-up through the same path.

use std::sync::{Arc, Mutex};

use mandate_wire::{DelegationState, Registry, SignedBundle};

use super::state::StateDir;
use crate::delegation::Verifier;
use crate::discovery::Routes;
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use crate::policy::PolicyStore;

/// A bundle that verified, with its parsed data.
struct GoodBundle {
    bundle: SignedBundle,
    data: serde_json::Value,
}

#[derive(Default)]
struct Applied {
    bundle: Option<GoodBundle>,
    registry: Option<Registry>,
}

/// What an update changed, for the caller's log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The trust bundle was replaced.
    pub trust_bundle: bool,
    /// The registry revision now applied.
    pub registry_revision: Option<u64>,
    /// The bundle version activated by this update.
    pub activated: Option<u64>,
    /// The bundle version refused by this update.
    pub rejected: Option<u64>,
}

/// Holds what has been applied and applies updates on top of it.
pub struct Applier {
    identity: Arc<IdentityStore>,
    policy: Arc<PolicyStore>,
    delegation: Arc<Verifier>,
    metrics: Arc<Metrics>,
    state: Option<StateDir>,
    routes: Option<Arc<Routes>>,
    applied: Mutex<Applied>,
}

impl Applier {
    /// Applies updates to `identity` (trust bundle, revocations), `policy` and `delegation`
    /// (keys, revoked grants).
    pub fn new(
        identity: Arc<IdentityStore>,
        policy: Arc<PolicyStore>,
        delegation: Arc<Verifier>,
        metrics: Arc<Metrics>,
        state: Option<StateDir>,
    ) -> Self {
        Self {
            identity,
            policy,
            delegation,
            metrics,
            state,
            routes: None,
            applied: Mutex::new(Applied::default()),
        }
    }

    /// Also rebuilds `routes` from every registry applied.
    pub fn with_routes(mut self, routes: Arc<Routes>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Where a stream resumes: `(bundle version in force, registry revision applied)`.
    pub fn resume_point(&self) -> (Option<u64>, Option<u64>) {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        (
            applied.bundle.as_ref().map(|b| b.bundle.version),
            applied.registry.as_ref().map(|r| r.revision),
        )
    }

    /// The delegation revision applied (where the stream resumes delegation from).
    pub fn delegation_revision(&self) -> Option<u64> {
        self.delegation.revision()
    }

    /// Applies pushed delegation state and persists it. Revocations take effect even when the
    /// keys are refused.
    pub fn apply_delegation(&self, state: DelegationState) {
        if let Err(why) = self.delegation.apply(&state) {
            tracing::error!("{why}");
        }
        if let Some(dir) = &self.state
            && let Err(e) = dir.save_delegation(&state)
        {
            tracing::error!(error = %e, "cannot persist the delegation state");
        }
    }

    /// Applies one update. Its parts take effect together as far as safety allows: a refused
    /// policy bundle never holds back a revocation in the same update. What it activates is
    /// persisted in the state directory.
    pub fn apply(
        &self,
        bundle: Option<SignedBundle>,
        registry: Option<Registry>,
        trust_bundle: Option<String>,
    ) -> Outcome {
        self.apply_update(bundle, registry, trust_bundle, true)
    }

    /// Applies the policy bundle and registry an earlier run persisted in the state directory, as
    /// if pushed, so the sidecar enforces them before the stream connects (and the stream resumes
    /// from them). A file that cannot be read or parsed, or a bundle that does not verify against
    /// the current trust bundle, is logged and ignored (left in place).
    pub fn restore(&self) -> Outcome {
        let Some(state) = &self.state else {
            return Outcome::default();
        };
        let dir = state.path().display().to_string();
        match state.load_delegation() {
            Ok(Some(delegation)) => match self.delegation.apply(&delegation) {
                Ok(()) => tracing::info!(
                    state_dir = %dir,
                    revision = delegation.revision,
                    "restored delegation state revision {} from the state directory",
                    delegation.revision
                ),
                Err(why) => tracing::error!(state_dir = %dir, "persisted delegation state: {why}"),
            },
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "persisted delegation state ignored"),
        }
        let registry = state.load_registry().unwrap_or_else(|e| {
            tracing::error!(error = %e, "persisted registry ignored");
            None
        });
        let bundle = state.load_policy_bundle().unwrap_or_else(|e| {
            tracing::error!(error = %e, "persisted policy bundle ignored");
            None
        });
        let bundle = bundle.filter(|bundle| {
            let trust = self.identity.current();
            match bundle.verify(trust.bundle_pem()) {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(
                        state_dir = %dir,
                        version = bundle.version,
                        error = %e,
                        "persisted policy bundle {} ignored: it does not verify against the trust bundle",
                        bundle.version
                    );
                    false
                }
            }
        });
        if bundle.is_none() && registry.is_none() {
            return Outcome::default();
        }
        let outcome = self.apply_update(bundle, registry, None, false);
        tracing::info!(
            state_dir = %dir,
            policy_version = outcome.activated,
            registry_revision = outcome.registry_revision,
            "restored the last applied state from the state directory; enforcing it until the control plane says otherwise"
        );
        outcome
    }

    /// [`apply`](Self::apply), persisting what it applies when `persist`.
    fn apply_update(
        &self,
        bundle: Option<SignedBundle>,
        registry: Option<Registry>,
        trust_bundle: Option<String>,
        persist: bool,
    ) -> Outcome {
        let state = self.state.as_ref().filter(|_| persist);
        // One update at a time, so the registry and the bundle compiled with it always match.
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcome = Outcome::default();

        if let Some(pem) = trust_bundle {
            match self.identity.set_bundle(&pem) {
                Ok(changed) => {
                    outcome.trust_bundle = changed;
                    if changed
                        && let Some(state) = state
                        && let Err(e) = state.save_bundle(&pem)
                    {
                        tracing::error!(error = %e, "cannot persist the new trust bundle");
                    }
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "trust bundle from the control plane refused; keeping the current one"
                ),
            }
        }

        let registry_changed = registry.is_some();
        if let Some(registry) = registry {
            self.apply_registry(&registry);
            outcome.registry_revision = Some(registry.revision);
            if let Some(state) = state
                && let Err(e) = state.save_registry(&registry)
            {
                tracing::error!(error = %e, "cannot persist the registry");
            }
            applied.registry = Some(registry);
        }

        let verified = bundle.and_then(|bundle| {
            let trust = self.identity.current();
            match bundle.verify(trust.bundle_pem()) {
                Ok(data) => Some(GoodBundle { bundle, data }),
                Err(e) => {
                    self.reject(&applied, bundle.version, &e.to_string());
                    outcome.rejected = Some(bundle.version);
                    None
                }
            }
        });

        if let Some(good) = verified {
            match self.install(&good, applied.registry.as_ref()) {
                Ok(()) => {
                    outcome.activated = Some(good.bundle.version);
                    if let Some(state) = state
                        && let Err(e) = state.save_policy_bundle(&good.bundle)
                    {
                        tracing::error!(error = %e, "cannot persist the policy bundle");
                    }
                    applied.bundle = Some(good);
                    return outcome;
                }
                Err(e) => {
                    self.reject(&applied, good.bundle.version, &e.to_string());
                    outcome.rejected = Some(good.bundle.version);
                }
            }
        }
        // The last good bundle sees the new registry as its data.
        if registry_changed && let Some(good) = &applied.bundle {
            let _ = self.install(good, applied.registry.as_ref());
        }
        outcome
    }

    fn install(
        &self,
        good: &GoodBundle,
        registry: Option<&Registry>,
    ) -> Result<(), mandate_rego::PolicyError> {
        let mut data = good.data.clone();
        if let (Some(registry), Some(object)) = (registry, data.as_object_mut()) {
            object.insert("registry".to_owned(), registry.policy_data());
        }
        self.policy
            .install_bundle(good.bundle.version, &good.bundle.modules, data)
    }

    fn reject(&self, applied: &Applied, version: u64, why: &str) {
        self.metrics.bundle_rejects.inc();
        let keeping = applied.bundle.as_ref().map_or_else(
            || "no bundle has been received yet: every call is denied".to_owned(),
            |b| format!("keeping bundle {}", b.bundle.version),
        );
        tracing::error!(version, error = %why, "policy bundle {version} refused; {keeping}");
    }

    fn apply_registry(&self, registry: &Registry) {
        if let Some(routes) = &self.routes {
            routes.set_registry(registry);
        }
        let newly = self.identity.apply_registry(registry);
        let own = self.identity.current().svid.id.clone();
        for id in &newly {
            let status = registry
                .entry_for(id)
                .map_or("inactive", |e| e.status.as_str());
            if id == own.as_str() {
                tracing::error!(
                    spiffe_id = %id,
                    "our own workload {id} is now {status}: every call it makes is denied and its open connections are closed"
                );
            } else {
                tracing::warn!(
                    spiffe_id = %id,
                    "{id} is now {status}: its certificate is refused and its connections are closed"
                );
            }
        }
        tracing::info!(
            revision = registry.revision,
            agents = registry.agents.len(),
            services = registry.services.len(),
            inactive = registry.inactive_ids().count(),
            "registry revision {} applied",
            registry.revision
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use mandate_identity::ca::CertificateAuthority;
    use mandate_identity::{SpiffeId, TrustDomain};
    use mandate_rego::EngineChoice;

    use super::*;
    use crate::identity::IdentityPem;
    use crate::policy::{CompileSettings, PolicySource};
    use crate::revocation::Revocations;

    const REGO: &str = "package mandate.authz\n\nallow if input.x == data.want\n";

    struct Sidecar {
        applier: Applier,
        policy: Arc<PolicyStore>,
    }

    /// A fresh "process": identity issued by `ca`, an empty pushed policy store, `state` as its
    /// state directory.
    fn sidecar(ca: &CertificateAuthority, state: &StateDir) -> Sidecar {
        let td: TrustDomain = "mandate.local".parse().unwrap();
        let id: SpiffeId = "spiffe://mandate.local/agent/a".parse().unwrap();
        let svid = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let pem = IdentityPem {
            cert: svid.cert_pem,
            key: svid.key_pem,
            bundle: ca.cert_pem().to_owned(),
        };
        let identity = Arc::new(
            IdentityStore::from_pem(pem, td, metrics.clone(), Arc::new(Revocations::new()))
                .unwrap(),
        );
        let policy = Arc::new(PolicyStore::load(
            PolicySource::ControlPlane,
            CompileSettings {
                time_limit: Duration::from_millis(50),
                engine: EngineChoice::Interpreter,
            },
            metrics.clone(),
        ));
        let delegation = Arc::new(Verifier::new(
            &"mandate.local".parse().unwrap(),
            true,
            metrics.clone(),
        ));
        let applier = Applier::new(
            identity,
            policy.clone(),
            delegation,
            metrics,
            Some(state.clone()),
        );
        Sidecar { applier, policy }
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("mandate.local".parse().unwrap(), Duration::from_secs(86400))
            .unwrap()
    }

    fn bundle(ca: &CertificateAuthority, version: u64) -> SignedBundle {
        let modules = BTreeMap::from([("authz.rego".to_owned(), REGO.to_owned())]);
        SignedBundle::sign(version, modules, r#"{"want": 1}"#.into(), |i| {
            ca.sign_bytes(i)
        })
        .unwrap()
    }

    fn registry(revision: u64) -> Registry {
        Registry {
            revision,
            ..Registry::default()
        }
    }

    #[test]
    fn a_restart_restores_the_applied_bundle_and_registry_and_resumes_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let ca = ca();

        let first = sidecar(&ca, &state);
        assert_eq!(first.applier.restore(), Outcome::default(), "nothing yet");
        first
            .applier
            .apply(Some(bundle(&ca, 2)), Some(registry(5)), None);
        // A refused bundle is not persisted: the last good one stays the one to restore.
        let mut bad = bundle(&ca, 3);
        bad.data = r#"{"want": 2}"#.into();
        let outcome = first.applier.apply(Some(bad), Some(registry(6)), None);
        assert_eq!(outcome.rejected, Some(3));

        let restarted = sidecar(&ca, &state);
        assert!(restarted.policy.current().is_none());
        assert_eq!(restarted.applier.resume_point(), (None, None));
        let outcome = restarted.applier.restore();
        assert_eq!(outcome.activated, Some(2));
        assert_eq!(outcome.registry_revision, Some(6));
        assert_eq!(restarted.policy.current().unwrap().version(), "2");
        assert_eq!(restarted.applier.resume_point(), (Some(2), Some(6)));
    }

    #[test]
    fn delegation_state_is_persisted_and_restored_and_the_stream_resumes_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let ca = ca();
        let (key, _) = mandate_wire::SigningKey::generate("k1".into());
        let first = sidecar(&ca, &state);
        assert_eq!(first.applier.delegation_revision(), None);
        first.applier.apply_delegation(DelegationState {
            revision: 4,
            keys: vec![key.public_jwk()],
            revoked_grants: Vec::new(),
        });
        assert_eq!(first.applier.delegation_revision(), Some(4));
        assert!(
            super::super::stream::resume_path(&first.applier).ends_with("delegation_revision=4")
        );

        let restarted = sidecar(&ca, &state);
        assert_eq!(restarted.applier.delegation_revision(), None);
        restarted.applier.restore();
        assert_eq!(restarted.applier.delegation_revision(), Some(4));
    }

    #[test]
    fn a_persisted_bundle_that_does_not_verify_is_ignored_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let ca = ca();
        let mut tampered = bundle(&ca, 4);
        tampered
            .modules
            .insert("authz.rego".into(), "package x\n".into());
        // Signed, but by another CA than the trust bundle's.
        let other = bundle(&self::ca(), 5);

        for persisted in [tampered, other] {
            state.save_policy_bundle(&persisted).unwrap();
            let restarted = sidecar(&ca, &state);
            let outcome = restarted.applier.restore();
            assert_eq!(outcome.activated, None);
            assert!(restarted.policy.current().is_none(), "still denying");
            assert_eq!(restarted.applier.resume_point(), (None, None));
            assert_eq!(state.load_policy_bundle().unwrap(), Some(persisted));
        }

        // An unparsable file is ignored as well, and left in place.
        let path = state.path().join("policy-bundle.json");
        std::fs::write(&path, "{not json").unwrap();
        let restarted = sidecar(&ca, &state);
        assert_eq!(restarted.applier.restore(), Outcome::default());
        assert!(restarted.policy.current().is_none());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not json");
    }
}
