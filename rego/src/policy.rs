//! A compiled policy and its evaluation.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use regorus::utils::limits::{ExecutionTimerConfig, LimitError};
use regorus::{Engine, Value};

use crate::PACKAGE;
use crate::source::{Module, PolicyError};

/// Interpreter work units between clock reads of the time limit: cheap, yet checked often.
const TIMER_CHECK_INTERVAL: u32 = 32;

/// Distinguishes compiled policies, so a thread's cached engine is replaced when the policy changes.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's clone of the engine of the policy it last evaluated.
    static ENGINE: RefCell<Option<(u64, Engine)>> = const { RefCell::new(None) };
}

/// Which rule a policy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// `data.mandate.authz.decision`: `{"allow": bool, "reason": string, ...}`.
    Decision,
    /// `data.mandate.authz.allow`: a boolean.
    Allow,
}

impl EntryPoint {
    /// The full rule path.
    pub fn rule(self) -> &'static str {
        match self {
            Self::Decision => "data.mandate.authz.decision",
            Self::Allow => "data.mandate.authz.allow",
        }
    }
}

/// What the policy decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether the call may proceed.
    pub allow: bool,
    /// The policy's reason, if it gave one.
    pub reason: Option<String>,
    /// The whole decision document (extra keys such as `require_approval` included).
    pub document: Value,
}

/// Why a policy gave no usable decision. Every one of these means deny unless fail-open is chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The entry point has no value for this input.
    #[error("policy decision is undefined: {0} has no value for this input")]
    Undefined(&'static str),
    /// A runtime error in the policy.
    #[error("policy evaluation error: {0}")]
    Failed(String),
    /// Evaluation ran past the time limit.
    #[error("policy evaluation exceeded its time limit of {0:?}")]
    Timeout(Duration),
    /// The entry point's value has the wrong shape.
    #[error("policy decision is malformed: {0}")]
    Malformed(String),
}

impl EvalError {
    /// A short stable label for metrics and decision records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Undefined(_) => "undefined",
            Self::Failed(_) => "error",
            Self::Timeout(_) => "timeout",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// A compiled policy version, evaluated without any lock shared between requests.
pub struct Policy {
    /// Cloned once per thread per policy; the lock is taken only for that clone.
    template: Mutex<Engine>,
    entry: EntryPoint,
    version: String,
    generation: u64,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("entry", &self.entry)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles modules with `data`; evaluations are cut off after `time_limit`.
    pub fn compile(
        modules: &[Module],
        data: Value,
        time_limit: Duration,
    ) -> Result<Self, PolicyError> {
        let mut engine = Engine::new();
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: time_limit,
            check_interval: NonZeroU32::new(TIMER_CHECK_INTERVAL).expect("non-zero"),
        });
        let compile_err = |e: anyhow::Error| PolicyError::Compile(format!("{e:#}"));
        let mut entry = None;
        for module in modules {
            let package = engine
                .add_policy(module.path.clone(), module.text.clone())
                .map_err(compile_err)?;
            if package != PACKAGE {
                continue;
            }
            let declares = |name: &str| {
                engine
                    .has_declared_rule_rooted_at(&module.path, name)
                    .map_err(compile_err)
            };
            // `decision` wins over `allow` when a policy defines both.
            if declares("decision")? {
                entry = Some(EntryPoint::Decision);
            } else if entry.is_none() && declares("allow")? {
                entry = Some(EntryPoint::Allow);
            }
        }
        let entry = entry.ok_or(PolicyError::NoEntryPoint)?;
        let version = version_of(modules, &data);
        engine.add_data(data).map_err(compile_err)?;
        // Analyse now: compile-time errors surface here rather than on the first request, and
        // every per-thread clone starts prepared.
        engine
            .compile_with_entrypoint(&regorus::Rc::from(entry.rule()))
            .map_err(compile_err)?;
        Ok(Self {
            template: Mutex::new(engine),
            entry,
            version,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Content hash of the modules and data: the policy version recorded with every decision.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The rule this policy answers with.
    pub fn entry_point(&self) -> EntryPoint {
        self.entry
    }

    /// Evaluates the policy for `input`.
    pub fn evaluate(&self, input: Value) -> Result<Verdict, EvalError> {
        ENGINE.with_borrow_mut(|slot| {
            let engine = match slot {
                Some((generation, engine)) if *generation == self.generation => engine,
                _ => {
                    let engine = self
                        .template
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .clone();
                    &mut slot.insert((self.generation, engine)).1
                }
            };
            engine.set_input(input);
            let result = engine.eval_rule(self.entry.rule().to_owned());
            self.verdict(result)
        })
    }

    fn verdict(&self, result: anyhow::Result<Value>) -> Result<Verdict, EvalError> {
        let value =
            result.map_err(
                |e| match e.chain().find_map(|c| c.downcast_ref::<LimitError>()) {
                    Some(LimitError::TimeLimitExceeded { limit, .. }) => EvalError::Timeout(*limit),
                    _ => EvalError::Failed(format!("{e:#}")),
                },
            )?;
        if value == Value::Undefined {
            return Err(EvalError::Undefined(self.entry.rule()));
        }
        match self.entry {
            EntryPoint::Allow => match value {
                Value::Bool(allow) => Ok(Verdict {
                    allow,
                    reason: None,
                    document: value,
                }),
                other => Err(EvalError::Malformed(format!(
                    "data.mandate.authz.allow must be a boolean, got {}",
                    short_json(&other)
                ))),
            },
            EntryPoint::Decision => {
                let allow = value
                    .as_object()
                    .ok()
                    .and_then(|o| o.get(&Value::from("allow")))
                    .and_then(|a| a.as_bool().ok().copied());
                let Some(allow) = allow else {
                    return Err(EvalError::Malformed(format!(
                        "data.mandate.authz.decision must be an object with a boolean \"allow\", got {}",
                        short_json(&value)
                    )));
                };
                let reason = value
                    .as_object()
                    .ok()
                    .and_then(|o| o.get(&Value::from("reason")))
                    .and_then(|r| r.as_string().ok())
                    .map(|r| r.to_string());
                Ok(Verdict {
                    allow,
                    reason,
                    document: value,
                })
            }
        }
    }
}

fn short_json(v: &Value) -> String {
    let mut s = v.to_json_str().unwrap_or_else(|_| "?".to_owned());
    if s.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn version_of(modules: &[Module], data: &Value) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for m in modules {
        for part in [m.path.as_bytes(), m.text.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    ctx.update(data.to_json_str().unwrap_or_default().as_bytes());
    let mut version = String::with_capacity(12);
    for b in &ctx.finish().as_ref()[..6] {
        let _ = write!(version, "{b:02x}");
    }
    version
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(text: &str) -> Vec<Module> {
        vec![Module {
            path: "policy.rego".into(),
            text: text.into(),
        }]
    }

    fn compile(text: &str) -> Result<Policy, PolicyError> {
        Policy::compile(
            &module(text),
            Value::new_object(),
            Duration::from_millis(50),
        )
    }

    fn input(json: &str) -> Value {
        Value::from_json_str(json).unwrap()
    }

    #[test]
    fn decision_object_gives_allow_and_reason() {
        let p = compile(
            r#"package mandate.authz
            decision := {"allow": true, "reason": "ok", "extra": 1} if input.tool == "search"
            decision := {"allow": false, "reason": "no"} if input.tool != "search""#,
        )
        .unwrap();
        assert_eq!(p.entry_point(), EntryPoint::Decision);
        let v = p.evaluate(input(r#"{"tool":"search"}"#)).unwrap();
        assert!(v.allow);
        assert_eq!(v.reason.as_deref(), Some("ok"));
        let v = p.evaluate(input(r#"{"tool":"delete"}"#)).unwrap();
        assert_eq!((v.allow, v.reason.as_deref()), (false, Some("no")));
    }

    #[test]
    fn boolean_allow_is_accepted_too() {
        let p =
            compile("package mandate.authz\ndefault allow := false\nallow if input.ok").unwrap();
        assert_eq!(p.entry_point(), EntryPoint::Allow);
        assert!(p.evaluate(input(r#"{"ok":true}"#)).unwrap().allow);
        assert!(!p.evaluate(input("{}")).unwrap().allow);
    }

    #[test]
    fn undefined_error_timeout_and_bad_shapes_are_told_apart() {
        let p = compile("package mandate.authz\ndecision := {\"allow\": true} if input.x == 1")
            .unwrap();
        assert_eq!(p.evaluate(input("{}")).unwrap_err().kind(), "undefined");

        let p =
            compile("package mandate.authz\ndecision := {\"allow\": 1 / input.zero == 1}").unwrap();
        let err = p.evaluate(input(r#"{"zero":0}"#)).unwrap_err();
        assert_eq!(err.kind(), "error", "{err}");

        let p = compile("package mandate.authz\ndecision := \"yes\"").unwrap();
        assert_eq!(p.evaluate(input("{}")).unwrap_err().kind(), "malformed");

        let slow = compile(
            r#"package mandate.authz
            decision := {"allow": count([x | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000); x := a * b]) > 0}"#,
        )
        .unwrap();
        let err = slow.evaluate(input("{}")).unwrap_err();
        assert_eq!(err, EvalError::Timeout(Duration::from_millis(50)));
    }

    #[test]
    fn compile_errors_and_missing_entry_points_are_refused() {
        let err = compile("package mandate.authz\ndecision := {").unwrap_err();
        assert!(matches!(err, PolicyError::Compile(_)), "{err}");
        let err = compile("package other\ndecision := {\"allow\": true}").unwrap_err();
        assert!(matches!(err, PolicyError::NoEntryPoint), "{err}");
        // regorus resolves functions at evaluation time: an unknown one is an evaluation error (deny).
        let p = compile("package mandate.authz\ndecision := {\"allow\": nosuchfn(1)}").unwrap();
        assert_eq!(p.evaluate(input("{}")).unwrap_err().kind(), "error");
    }

    #[test]
    fn version_follows_content_and_data_is_visible() {
        let text = "package mandate.authz\nallow if data.agents[input.name].active";
        let data = Value::from_json_str(r#"{"agents":{"a":{"active":true}}}"#).unwrap();
        let p1 = Policy::compile(&module(text), data.clone(), Duration::from_millis(50)).unwrap();
        let p2 = Policy::compile(&module(text), data, Duration::from_millis(50)).unwrap();
        assert_eq!(p1.version(), p2.version());
        assert_eq!(p1.version().len(), 12);
        assert!(p1.evaluate(input(r#"{"name":"a"}"#)).unwrap().allow);
        let p3 = Policy::compile(
            &module(text),
            Value::new_object(),
            Duration::from_millis(50),
        )
        .unwrap();
        assert_ne!(p1.version(), p3.version());
    }

    #[test]
    fn evaluation_runs_concurrently_on_many_threads() {
        let p = std::sync::Arc::new(
            compile("package mandate.authz\ndefault allow := false\nallow if input.n % 2 == 0")
                .unwrap(),
        );
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..200).all(|i| {
                        let n = t * 1000 + i;
                        p.evaluate(Value::from_json_str(&format!(r#"{{"n":{n}}}"#)).unwrap())
                            .unwrap()
                            .allow
                            == (n % 2 == 0)
                    })
                })
            })
            .collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap()));
    }
}
