//! Rego policies for Mandate, shared by the sidecar (which evaluates them on every call) and the
//! control plane (which compiles and tests them before accepting a bundle).
//!
//! A policy defines `data.mandate.authz.decision` (an object with a boolean `allow` and a `reason`)
//! or just a boolean `data.mandate.authz.allow`. Evaluation runs on a per-thread clone of the
//! compiled engine, so concurrent requests never wait on each other.

mod policy;
mod source;
mod testing;

pub use policy::{
    Divergence, DivergenceHook, EngineChoice, EngineKind, EntryPoint, EvalError, Policy, Verdict,
    version_of,
};
pub use regorus::Value;
pub use source::{Module, PolicyError, read_data, read_modules};
pub use testing::{TestOutcome, TestStatus, run_tests};

/// The package every Mandate policy decides in.
pub const PACKAGE: &str = "data.mandate.authz";
