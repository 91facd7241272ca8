//! Applying one pushed `update`: trust bundle, then registry (revocations take effect at once),
//! then the policy bundle — verified against the trust bundle in force before it is compiled, and
//! refused (keeping the last good one) when its signature, digest or data are wrong.

use std::sync::{Arc, Mutex};

use mandate_wire::{Registry, SignedBundle};

use super::state::StateDir;
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
    metrics: Arc<Metrics>,
    state: Option<StateDir>,
    applied: Mutex<Applied>,
}

impl Applier {
    /// Applies updates to `identity` (trust bundle, revocations) and `policy`.
    pub fn new(
        identity: Arc<IdentityStore>,
        policy: Arc<PolicyStore>,
        metrics: Arc<Metrics>,
        state: Option<StateDir>,
    ) -> Self {
        Self {
            identity,
            policy,
            metrics,
            state,
            applied: Mutex::new(Applied::default()),
        }
    }

    /// Where a stream resumes: `(bundle version in force, registry revision applied)`.
    pub fn resume_point(&self) -> (Option<u64>, Option<u64>) {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        (
            applied.bundle.as_ref().map(|b| b.bundle.version),
            applied.registry.as_ref().map(|r| r.revision),
        )
    }

    /// Applies one update. Its parts take effect together as far as safety allows: a refused
    /// policy bundle never holds back a revocation in the same update.
    pub fn apply(
        &self,
        bundle: Option<SignedBundle>,
        registry: Option<Registry>,
        trust_bundle: Option<String>,
    ) -> Outcome {
        // One update at a time, so the registry and the bundle compiled with it always match.
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcome = Outcome::default();

        if let Some(pem) = trust_bundle {
            match self.identity.set_bundle(&pem) {
                Ok(changed) => {
                    outcome.trust_bundle = changed;
                    if changed
                        && let Some(state) = &self.state
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
