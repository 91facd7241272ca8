//! The policy in force: Rego modules and JSON data read from files, compiled once per version,
//! swapped atomically on change. A policy that fails to compile is rejected with the compiler's
//! message and the previous one stays in force.

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
pub struct PolicySource {
    /// A `.rego` file or a directory of them.
    pub path: PathBuf,
    /// Optional JSON data document (becomes `data`).
    pub data: Option<PathBuf>,
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
}

impl LoadedPolicy {
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
    /// Content hash of the sources last compiled, good or bad: an event that changes nothing
    /// (a neighbouring file, a touch) neither recompiles nor repeats an error.
    last_attempt: Mutex<Option<String>>,
    source: PolicySource,
    metrics: Arc<Metrics>,
}

impl PolicyStore {
    /// Loads the policy; a failure is logged and leaves the store empty (everything denied, not ready).
    pub fn load(source: PolicySource, metrics: Arc<Metrics>) -> Self {
        let store = Self {
            current: ArcSwapOption::empty(),
            last_attempt: Mutex::new(None),
            source,
            metrics,
        };
        let _ = store.reload();
        store
    }

    /// The policy in force.
    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.current.load_full()
    }

    /// Re-reads and recompiles; on failure the current policy stays in force.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let metrics = self.metrics.clone();
        let on_divergence: DivergenceHook = Arc::new(move |d: &Divergence| {
            tracing::error!(
                version = %d.version,
                vm = %d.vm,
                interpreter = %d.interpreter,
                "the policy VM disagreed with the interpreter on a sampled decision; this policy now runs on the interpreter"
            );
            metrics.policy_engine_divergence(&d.version);
        });
        let loaded = read_sources(&self.source).and_then(|(modules, data)| {
            let version = version_of(&modules, &data);
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_deref() == Some(version.as_str()) {
                return Ok(None);
            }
            *last = Some(version);
            drop(last);
            compile(&self.source, modules, data, on_divergence).map(Some)
        });
        match loaded {
            Ok(None) => Ok(()),
            Ok(Some(loaded)) => {
                let version = loaded.policy.version().to_owned();
                let unchanged = self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.policy.version() == version);
                if !unchanged {
                    let engine = loaded.policy.engine().as_str();
                    if let Some(note) = loaded.policy.engine_note() {
                        tracing::warn!(%version, "{note}");
                    }
                    tracing::info!(%version, engine, path = %self.source.path.display(), "policy loaded");
                    self.metrics.policy_loaded(&version, engine);
                    self.current.store(Some(Arc::new(loaded)));
                }
                Ok(())
            }
            Err(e) => {
                let keeping = self.current.load().as_ref().map_or_else(
                    || "no policy is loaded: every call is denied".to_owned(),
                    |c| format!("keeping policy version {}", c.policy.version()),
                );
                tracing::error!(error = %e, "policy rejected; {keeping}");
                self.metrics.policy_load_error();
                Err(e)
            }
        }
    }

    /// Recompiles whenever the policy files or the data file change.
    pub fn watch(self: &Arc<Self>) -> notify::Result<()> {
        let store = self.clone();
        let mut paths = vec![self.source.path.as_path()];
        paths.extend(self.source.data.as_deref());
        crate::watch::on_change(&paths, move || {
            let _ = store.reload();
        })
    }
}

fn read_sources(source: &PolicySource) -> Result<(Vec<Module>, Value), PolicyError> {
    let modules = read_modules(&source.path)?;
    let data = match &source.data {
        Some(path) => read_data(path)?,
        None => Value::new_object(),
    };
    Ok((modules, data))
}

fn compile(
    source: &PolicySource,
    modules: Vec<Module>,
    data: Value,
    on_divergence: DivergenceHook,
) -> Result<LoadedPolicy, PolicyError> {
    let policy = Policy::compile_with(
        &modules,
        data.clone(),
        source.time_limit,
        source.engine,
        Some(on_divergence),
    )?;
    Ok(LoadedPolicy { policy, data })
}
