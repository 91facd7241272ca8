//! The policy in force: Rego modules and JSON data — read from files (standalone) or pushed by the
//! control plane as signed bundles (managed) — compiled once per version and swapped atomically. A
//! policy that fails to compile is rejected with the compiler's message and the previous one stays
//! in force. Both sources share one compile/swap/version path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use mandate_rego::{
    Divergence, DivergenceHook, EngineChoice, Module, Policy, PolicyError, Value, read_data,
    read_modules, version_of,
};

use crate::metrics::Metrics;

/// Where the policy comes from.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum PolicySource {
    /// Rego files and an optional data file, watched and reloaded.
    Files {
        /// A `.rego` file or a directory of them.
        path: PathBuf,
        /// Optional JSON data document (becomes `data`).
        data: Option<PathBuf>,
    },
    /// Signed bundles pushed by the control plane (managed mode).
    ControlPlane,
}

/// How every policy version is compiled and evaluated, whatever its source.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CompileSettings {
    /// Evaluation time limit.
    #[serde(with = "humantime_serde_compat")]
    pub time_limit: Duration,
    /// Which evaluator runs the policy.
    #[serde(serialize_with = "crate::routes::serialize_display")]
    pub engine: EngineChoice,
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// A compiled policy and the data it was compiled with (the registry lives in the data).
pub struct LoadedPolicy {
    /// The compiled policy.
    pub policy: Policy,
    data: Value,
    /// The version recorded with decisions: the content hash for files, the bundle version
    /// (decimal) for pushed bundles.
    version: String,
}

impl LoadedPolicy {
    /// The version recorded with every decision this policy takes.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The registry entry of a workload: `data.registry.<agents|services>.<name>`, or null.
    pub fn registry_entry(&self, kind: &str, name: &str) -> Value {
        let collection = match kind {
            "agent" => "agents",
            "service" => "services",
            _ => return Value::Null,
        };
        match &self.data["registry"][collection][name] {
            Value::Undefined => Value::Null,
            entry => entry.clone(),
        }
    }
}

/// The policy in force, if any has loaded.
pub struct PolicyStore {
    current: ArcSwapOption<LoadedPolicy>,
    /// Version label and content hash last compiled, good or bad: an event that changes nothing
    /// (a neighbouring file, a touch, a re-sent bundle) neither recompiles nor repeats an error.
    last_attempt: Mutex<Option<(String, String)>>,
    source: PolicySource,
    settings: CompileSettings,
    metrics: Arc<Metrics>,
}

impl PolicyStore {
    /// Loads the policy; a failure is logged and leaves the store empty (everything denied, not ready).
    /// A `ControlPlane` source starts empty and is filled by [`PolicyStore::install_bundle`].
    pub fn load(source: PolicySource, settings: CompileSettings, metrics: Arc<Metrics>) -> Self {
        let store = Self {
            current: ArcSwapOption::empty(),
            last_attempt: Mutex::new(None),
            source,
            settings,
            metrics,
        };
        if matches!(store.source, PolicySource::Files { .. }) {
            let _ = store.reload();
        }
        store
    }

    /// The policy in force.
    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.current.load_full()
    }

    /// Why there is no policy, for denials and `/readyz`.
    pub fn missing_reason(&self) -> &'static str {
        match self.source {
            PolicySource::Files { .. } => "no policy is loaded",
            PolicySource::ControlPlane => "no policy from the control plane yet",
        }
    }

    /// Re-reads and recompiles the files; on failure the current policy stays in force.
    /// A no-op for pushed policies.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let PolicySource::Files { path, data } = &self.source else {
            return Ok(());
        };
        let sources = read_sources(path, data.as_ref());
        match sources {
            Ok((modules, data)) => {
                let label = version_of(&modules, &data);
                self.activate(label, modules, data)
            }
            Err(e) => Err(self.rejected(e)),
        }
    }

    /// Compiles and activates a verified bundle's modules with `data` (the bundle's data with the
    /// current registry in it). Decisions then record `version` as their policy version. On
    /// failure the current policy stays in force.
    pub fn install_bundle(
        &self,
        version: u64,
        modules: &BTreeMap<String, String>,
        data: serde_json::Value,
    ) -> Result<(), PolicyError> {
        let data: Value = serde_json::from_value(data).map_err(|e| {
            self.rejected(PolicyError::Data {
                path: PathBuf::from(format!("bundle {version}")),
                why: e.to_string(),
            })
        })?;
        let modules = modules
            .iter()
            .map(|(name, text)| Module {
                path: name.clone(),
                text: text.clone(),
            })
            .collect();
        self.activate(version.to_string(), modules, data)
    }

    /// The one compile-and-swap path of both sources.
    fn activate(
        &self,
        label: String,
        modules: Vec<Module>,
        data: Value,
    ) -> Result<(), PolicyError> {
        let content = version_of(&modules, &data);
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_ref() == Some(&(label.clone(), content.clone())) {
                return Ok(());
            }
            *last = Some((label.clone(), content.clone()));
        }
        let loaded = match self.compile(label, modules, data) {
            Ok(loaded) => loaded,
            Err(e) => return Err(self.rejected(e)),
        };
        let unchanged = self.current.load().as_ref().is_some_and(|c| {
            c.version == loaded.version && c.policy.version() == loaded.policy.version()
        });
        if !unchanged {
            let version = loaded.version.clone();
            let engine = loaded.policy.engine().as_str();
            if let Some(note) = loaded.policy.engine_note() {
                tracing::warn!(%version, "{note}");
            }
            match &self.source {
                PolicySource::Files { path, .. } => {
                    tracing::info!(%version, engine, path = %path.display(), "policy loaded")
                }
                PolicySource::ControlPlane => tracing::info!(
                    %version,
                    engine,
                    content = loaded.policy.version(),
                    "policy bundle {version} active"
                ),
            }
            self.metrics.policy_loaded(&version, engine);
            self.current.store(Some(Arc::new(loaded)));
        }
        Ok(())
    }

    /// Logs and counts a rejected policy; returns the error for the caller.
    fn rejected(&self, e: PolicyError) -> PolicyError {
        let keeping = self.current.load().as_ref().map_or_else(
            || format!("{}: every call is denied", self.missing_reason()),
            |c| format!("keeping policy version {}", c.version),
        );
        tracing::error!(error = %e, "policy rejected; {keeping}");
        self.metrics.policy_load_error();
        e
    }

    fn compile(
        &self,
        label: String,
        modules: Vec<Module>,
        data: Value,
    ) -> Result<LoadedPolicy, PolicyError> {
        let metrics = self.metrics.clone();
        let hook_label = label.clone();
        let on_divergence: DivergenceHook = Arc::new(move |d: &Divergence| {
            tracing::error!(
                version = %hook_label,
                vm = %d.vm,
                interpreter = %d.interpreter,
                "the policy VM disagreed with the interpreter on a sampled decision; this policy now runs on the interpreter"
            );
            metrics.policy_engine_divergence(&hook_label);
        });
        let policy = Policy::compile_with(
            &modules,
            data.clone(),
            self.settings.time_limit,
            self.settings.engine,
            Some(on_divergence),
        )?;
        Ok(LoadedPolicy {
            policy,
            data,
            version: label,
        })
    }

    /// Recompiles whenever the policy files or the data file change (files only).
    pub fn watch(self: &Arc<Self>) -> notify::Result<()> {
        let PolicySource::Files { path, data } = &self.source else {
            return Ok(());
        };
        let store = self.clone();
        let mut paths = vec![path.as_path()];
        paths.extend(data.as_deref());
        crate::watch::on_change(&paths, move || {
            let _ = store.reload();
        })
    }
}

fn read_sources(
    path: &std::path::Path,
    data: Option<&PathBuf>,
) -> Result<(Vec<Module>, Value), PolicyError> {
    let modules = read_modules(path)?;
    let data = match data {
        Some(path) => read_data(path)?,
        None => Value::new_object(),
    };
    Ok((modules, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: &str = "package mandate.authz\n\nallow if input.x == data.want\n";

    fn pushed() -> PolicyStore {
        PolicyStore::load(
            PolicySource::ControlPlane,
            CompileSettings {
                time_limit: Duration::from_millis(50),
                engine: EngineChoice::Interpreter,
            },
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn pushed_bundles_compile_through_the_same_path_and_carry_their_version() {
        let store = pushed();
        assert!(store.current().is_none());
        assert_eq!(
            store.missing_reason(),
            "no policy from the control plane yet"
        );
        let modules = BTreeMap::from([("authz.rego".to_owned(), ALLOW.to_owned())]);
        store
            .install_bundle(
                7,
                &modules,
                serde_json::json!({"want": 1, "registry": {"agents": {"a": {"status": "active"}}}}),
            )
            .unwrap();
        let loaded = store.current().unwrap();
        assert_eq!(loaded.version(), "7");
        assert_eq!(
            loaded.registry_entry("agent", "a")["status"],
            Value::from("active")
        );

        // A broken bundle is refused; 7 stays.
        let broken = BTreeMap::from([(
            "authz.rego".to_owned(),
            "package mandate.authz\nallow if {".to_owned(),
        )]);
        assert!(
            store
                .install_bundle(8, &broken, serde_json::json!({}))
                .is_err()
        );
        assert_eq!(store.current().unwrap().version(), "7");

        // The same bundle with new data (a registry change) is a new policy under the same version.
        store
            .install_bundle(7, &modules, serde_json::json!({"want": 2}))
            .unwrap();
        let reloaded = store.current().unwrap();
        assert_eq!(reloaded.version(), "7");
        assert!(!Arc::ptr_eq(&loaded, &reloaded));
    }
}
