//! A compiled policy and its evaluation.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::Program;
use regorus::rvm::vm::{RegoVM, VmError};
use regorus::utils::limits::{ExecutionTimerConfig, LimitError};
use regorus::{Engine, Value};

use crate::PACKAGE;
use crate::source::{Module, PolicyError};

/// Interpreter work units between clock reads of the time limit: cheap, yet checked often.
const TIMER_CHECK_INTERVAL: u32 = 32;

/// Distinguishes compiled policies, so a thread's cached engine is replaced when the policy changes.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's evaluators for the policy it last evaluated.
    static ENGINES: RefCell<Option<ThreadEngines>> = const { RefCell::new(None) };
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

/// Which evaluator runs a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// The register VM when the policy compiles for it, else the interpreter.
    Auto,
    /// The register VM; a policy it cannot compile is refused.
    Vm,
    /// The tree-walking interpreter (the reference semantics `mandate policy test` uses).
    Interpreter,
}

impl EngineChoice {
    /// The word `--policy-engine` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Vm => "rvm",
            Self::Interpreter => "interpreter",
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "rvm" => Ok(Self::Vm),
            "interpreter" => Ok(Self::Interpreter),
            other => Err(format!(
                "unknown policy engine {other:?} (use auto, rvm or interpreter)"
            )),
        }
    }
}

/// The evaluator in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// regorus' register VM.
    Vm,
    /// regorus' interpreter.
    Interpreter,
}

impl EngineKind {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "rvm",
            Self::Interpreter => "interpreter",
        }
    }
}

/// The VM and the interpreter disagreed on one sampled decision; the VM is no longer used.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// Policy version.
    pub version: String,
    /// What the VM answered.
    pub vm: String,
    /// What the interpreter answered.
    pub interpreter: String,
}

/// Called when a divergence is found (once per policy version).
pub type DivergenceHook = Arc<dyn Fn(&Divergence) + Send + Sync>;

/// Where VM/interpreter disagreements go: the first one retires the VM for this policy version.
struct Divergences {
    version: String,
    vm_disabled: AtomicBool,
    hook: Option<DivergenceHook>,
}

impl Divergences {
    fn report(&self, vm: String, interpreter: String) {
        if !self.vm_disabled.swap(true, Ordering::Relaxed)
            && let Some(hook) = &self.hook
        {
            hook(&Divergence {
                version: self.version.clone(),
                vm,
                interpreter,
            });
        }
    }
}

/// Decisions shadow-checked on the interpreter right after a policy loads, then one in `SAMPLE_EVERY`.
const SAMPLE_FIRST: u64 = 1_000;
const SAMPLE_EVERY: u64 = 128;

/// A compiled policy version, evaluated without any lock shared between requests.
///
/// The register VM is several times faster than the interpreter, but it is younger; so when the
/// VM is in use, a sample of its decisions is re-evaluated on the interpreter off the request
/// path, and any disagreement switches this policy to the interpreter for good.
pub struct Policy {
    /// Interpreter, cloned once per thread; the lock is taken only for that clone.
    template: Mutex<Engine>,
    /// The VM program, when the VM runs this policy.
    program: Option<Arc<Program>>,
    /// Retires the VM when it disagrees with the interpreter.
    divergences: Arc<Divergences>,
    guard: Option<Guard>,
    data: Value,
    time_limit: Duration,
    entry: EntryPoint,
    version: String,
    generation: u64,
    engine_note: Option<String>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("entry", &self.entry)
            .field("version", &self.version)
            .field("engine", &self.engine())
            .finish_non_exhaustive()
    }
}

/// One thread's evaluators for one policy version.
struct ThreadEngines {
    generation: u64,
    interpreter: Engine,
    vm: Option<RegoVM>,
}

impl Policy {
    /// Compiles modules with `data` on the interpreter; evaluations are cut off after `time_limit`.
    pub fn compile(
        modules: &[Module],
        data: Value,
        time_limit: Duration,
    ) -> Result<Self, PolicyError> {
        Self::compile_with(modules, data, time_limit, EngineChoice::Interpreter, None)
    }

    /// Compiles for the chosen engine; `on_divergence` hears about VM/interpreter disagreements.
    pub fn compile_with(
        modules: &[Module],
        data: Value,
        time_limit: Duration,
        choice: EngineChoice,
        on_divergence: Option<DivergenceHook>,
    ) -> Result<Self, PolicyError> {
        let version = version_of(modules, &data);
        let (mut engine, packages) = load_engine(modules, data.clone(), time_limit)?;
        let mut entry = None;
        for (module, package) in modules.iter().zip(&packages) {
            if package != PACKAGE {
                continue;
            }
            let declares = |name: &str| {
                engine
                    .has_declared_rule_rooted_at(&module.path, name)
                    .map_err(compile_error)
            };
            // `decision` wins over `allow` when a policy defines both.
            if declares("decision")? {
                entry = Some(EntryPoint::Decision);
            } else if entry.is_none() && declares("allow")? {
                entry = Some(EntryPoint::Allow);
            }
        }
        let entry = entry.ok_or(PolicyError::NoEntryPoint)?;
        // Analyse now: compile-time errors surface here rather than on the first request, and
        // every per-thread clone starts prepared.
        let compiled = engine
            .compile_with_entrypoint(&regorus::Rc::from(entry.rule()))
            .map_err(compile_error)?;

        let (program, engine_note) = match choice {
            EngineChoice::Interpreter => (None, None),
            EngineChoice::Vm | EngineChoice::Auto => {
                match Compiler::compile_from_policy(&compiled, &[entry.rule()]) {
                    Ok(program) => (Some(program), None),
                    Err(e) if choice == EngineChoice::Vm => {
                        return Err(PolicyError::Compile(format!(
                            "the register VM cannot run this policy ({e}); use --policy-engine interpreter"
                        )));
                    }
                    Err(e) => (
                        None,
                        Some(format!(
                            "the register VM cannot run this policy ({e}); using the interpreter"
                        )),
                    ),
                }
            }
        };
        let divergences = Arc::new(Divergences {
            version: version.clone(),
            vm_disabled: AtomicBool::new(false),
            hook: on_divergence,
        });
        let guard = program
            .as_ref()
            .map(|_| Guard::start(engine.clone(), entry, divergences.clone()));
        Ok(Self {
            template: Mutex::new(engine),
            program,
            divergences,
            guard,
            data,
            time_limit,
            entry,
            version,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            engine_note,
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

    /// The evaluator answering now.
    pub fn engine(&self) -> EngineKind {
        if self.program.is_some() && !self.divergences.vm_disabled.load(Ordering::Relaxed) {
            EngineKind::Vm
        } else {
            EngineKind::Interpreter
        }
    }

    /// Why the VM is not used although it was asked for (`auto` with a policy it cannot compile).
    pub fn engine_note(&self) -> Option<&str> {
        self.engine_note.as_deref()
    }

    /// Evaluates the policy for `input`.
    pub fn evaluate(&self, input: Value) -> Result<Verdict, EvalError> {
        ENGINES.with_borrow_mut(|slot| {
            let engines = match slot {
                Some(e) if e.generation == self.generation => e,
                _ => slot.insert(self.thread_engines()),
            };
            match (&mut engines.vm, self.engine()) {
                (Some(vm), EngineKind::Vm) => {
                    let shadow = self
                        .guard
                        .as_ref()
                        .and_then(|g| g.wants_sample().then(|| input.clone()));
                    // Values share their contents: this copy is a reference count, kept for the fallback.
                    let fallback_input = input.clone();
                    vm.set_input(input);
                    let result = vm.execute_entry_point_by_index(0).map_err(|e| match e {
                        VmError::TimeLimitExceeded { limit, .. } => EvalError::Timeout(limit),
                        other => EvalError::Failed(other.to_string()),
                    });
                    if matches!(result, Ok(Value::Undefined)) {
                        // The VM reports runtime errors as undefined, and regorus 0.14's VM has
                        // answered undefined where the interpreter had a value: the interpreter,
                        // whose semantics `mandate policy test` checks, gives the answer.
                        engines.interpreter.set_input(fallback_input);
                        let reference = engines
                            .interpreter
                            .eval_rule(self.entry.rule().to_owned())
                            .map_err(interpreter_error);
                        if let Ok(value) = &reference
                            && *value != Value::Undefined
                        {
                            self.divergences
                                .report("<undefined>".to_owned(), short_json(value));
                        }
                        return self.entry.verdict(reference);
                    }
                    if let (Some(guard), Some(input)) = (&self.guard, shadow) {
                        guard.submit(input, &result);
                    }
                    self.entry.verdict(result)
                }
                _ => {
                    engines.interpreter.set_input(input);
                    let result = engines.interpreter.eval_rule(self.entry.rule().to_owned());
                    self.entry.verdict(result.map_err(interpreter_error))
                }
            }
        })
    }

    fn thread_engines(&self) -> ThreadEngines {
        let interpreter = self
            .template
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let vm = self.program.as_ref().map(|program| {
            let mut vm = RegoVM::new();
            vm.load_program(program.clone());
            vm.set_execution_timer_config(Some(timer(self.time_limit)));
            // The time limit bounds evaluation; the VM's default instruction cap (25,000) would
            // deny legitimate policies that iterate over large data.
            vm.set_max_instructions(usize::MAX);
            // The same data was accepted by the interpreter, so the VM accepts it too.
            let _ = vm.set_data(self.data.clone());
            vm
        });
        ThreadEngines {
            generation: self.generation,
            interpreter,
            vm,
        }
    }
}

impl EntryPoint {
    /// Turns the entry point's value (or the evaluation error) into a verdict.
    fn verdict(self, result: Result<Value, EvalError>) -> Result<Verdict, EvalError> {
        let value = result?;
        if value == Value::Undefined {
            return Err(EvalError::Undefined(self.rule()));
        }
        match self {
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
                let allow = value["allow"].as_bool().ok().copied();
                let Some(allow) = allow else {
                    return Err(EvalError::Malformed(format!(
                        "data.mandate.authz.decision must be an object with a boolean \"allow\", got {}",
                        short_json(&value)
                    )));
                };
                let reason = value["reason"].as_string().ok().map(|r| r.to_string());
                Ok(Verdict {
                    allow,
                    reason,
                    document: value,
                })
            }
        }
    }
}

/// An interpreter holding `modules` and `data`, evaluations cut off after `time_limit`, and the
/// package of each module in order: what both a policy and its test run start from.
pub(crate) fn load_engine(
    modules: &[Module],
    data: Value,
    time_limit: Duration,
) -> Result<(Engine, Vec<String>), PolicyError> {
    let mut engine = Engine::new();
    engine.set_execution_timer_config(timer(time_limit));
    let packages = modules
        .iter()
        .map(|m| {
            engine
                .add_policy(m.path.clone(), m.text.clone())
                .map_err(compile_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    engine.add_data(data).map_err(compile_error)?;
    Ok((engine, packages))
}

/// A compiler or loader error, with regorus' full context.
pub(crate) fn compile_error(e: anyhow::Error) -> PolicyError {
    PolicyError::Compile(format!("{e:#}"))
}

fn interpreter_error(e: anyhow::Error) -> EvalError {
    match e.chain().find_map(|c| c.downcast_ref::<LimitError>()) {
        Some(LimitError::TimeLimitExceeded { limit, .. }) => EvalError::Timeout(*limit),
        _ => EvalError::Failed(format!("{e:#}")),
    }
}

fn timer(limit: Duration) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::new(TIMER_CHECK_INTERVAL).expect("non-zero"),
    }
}

/// Re-evaluates sampled VM decisions on the interpreter, on its own thread.
struct Guard {
    samples: SyncSender<(Value, Result<Value, String>)>,
    evaluations: AtomicU64,
}

impl Guard {
    fn start(mut interpreter: Engine, entry: EntryPoint, divergences: Arc<Divergences>) -> Self {
        let (samples, rx) = sync_channel::<(Value, Result<Value, String>)>(1024);
        let checked = divergences.clone();
        let spawned = std::thread::Builder::new()
            .name("policy-guard".into())
            .spawn(move || {
                // Ends when the policy (and so the sender) is dropped.
                while let Ok((input, vm_result)) = rx.recv() {
                    if checked.vm_disabled.load(Ordering::Relaxed) {
                        continue;
                    }
                    interpreter.set_input(input);
                    let reference = interpreter
                        .eval_rule(entry.rule().to_owned())
                        .map_err(|e| interpreter_error(e).kind().to_owned());
                    // Time limits depend on load, not semantics: a timeout on either side proves nothing.
                    let comparable =
                        |r: &Result<Value, String>| r.as_ref().err().is_none_or(|k| k != "timeout");
                    if comparable(&vm_result) && comparable(&reference) && vm_result != reference {
                        let show = |r: &Result<Value, String>| match r {
                            Ok(v) => short_json(v),
                            Err(kind) => format!("<{kind}>"),
                        };
                        checked.report(show(&vm_result), show(&reference));
                    }
                }
            });
        if spawned.is_err() {
            // Without a guard the VM's answers cannot be checked: do not use it.
            divergences.vm_disabled.store(true, Ordering::Relaxed);
        }
        Self {
            samples,
            evaluations: AtomicU64::new(0),
        }
    }

    fn wants_sample(&self) -> bool {
        let n = self.evaluations.fetch_add(1, Ordering::Relaxed);
        n < SAMPLE_FIRST || n.is_multiple_of(SAMPLE_EVERY)
    }

    fn submit(&self, input: Value, result: &Result<Value, EvalError>) {
        let outcome = match result {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(e.kind().to_owned()),
        };
        // A busy guard skips the sample rather than slowing the request.
        let _ = self.samples.try_send((input, outcome));
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

/// Content hash of modules and data (12 hex digits): the version every decision records.
pub fn version_of(modules: &[Module], data: &Value) -> String {
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

    const ENGINES: [EngineChoice; 2] = [EngineChoice::Interpreter, EngineChoice::Vm];

    fn module(text: &str) -> Vec<Module> {
        vec![Module {
            path: "policy.rego".into(),
            text: text.into(),
        }]
    }

    fn compile_for(text: &str, choice: EngineChoice) -> Result<Policy, PolicyError> {
        Policy::compile_with(
            &module(text),
            Value::new_object(),
            Duration::from_millis(50),
            choice,
            None,
        )
    }

    fn input(json: &str) -> Value {
        Value::from_json_str(json).unwrap()
    }

    #[test]
    fn decision_object_gives_allow_and_reason() {
        for engine in ENGINES {
            let p = compile_for(
                r#"package mandate.authz
                decision := {"allow": true, "reason": "ok", "extra": 1} if input.tool == "search"
                decision := {"allow": false, "reason": "no"} if input.tool != "search""#,
                engine,
            )
            .unwrap();
            assert_eq!(p.entry_point(), EntryPoint::Decision);
            let v = p.evaluate(input(r#"{"tool":"search"}"#)).unwrap();
            assert!(v.allow, "{engine:?}");
            assert_eq!(v.reason.as_deref(), Some("ok"));
            let v = p.evaluate(input(r#"{"tool":"delete"}"#)).unwrap();
            assert_eq!(
                (v.allow, v.reason.as_deref()),
                (false, Some("no")),
                "{engine:?}"
            );
        }
    }

    #[test]
    fn boolean_allow_is_accepted_too() {
        for engine in ENGINES {
            let p = compile_for(
                "package mandate.authz\ndefault allow := false\nallow if input.ok",
                engine,
            )
            .unwrap();
            assert_eq!(p.entry_point(), EntryPoint::Allow);
            assert!(
                p.evaluate(input(r#"{"ok":true}"#)).unwrap().allow,
                "{engine:?}"
            );
            assert!(!p.evaluate(input("{}")).unwrap().allow, "{engine:?}");
        }
    }

    #[test]
    fn undefined_error_timeout_and_bad_shapes_are_told_apart() {
        for engine in ENGINES {
            let p = compile_for(
                "package mandate.authz\ndecision := {\"allow\": true} if input.x == 1",
                engine,
            )
            .unwrap();
            assert_eq!(
                p.evaluate(input("{}")).unwrap_err().kind(),
                "undefined",
                "{engine:?}"
            );

            let p = compile_for(
                "package mandate.authz\ndecision := {\"allow\": 1 / input.zero == 1}",
                engine,
            )
            .unwrap();
            // The VM alone would say undefined; the answer must still name the runtime error.
            let err = p.evaluate(input(r#"{"zero":0}"#)).unwrap_err();
            assert_eq!(err.kind(), "error", "{engine:?}: {err}");
            let expected = match engine {
                EngineChoice::Interpreter => EngineKind::Interpreter,
                _ => EngineKind::Vm,
            };
            assert_eq!(p.engine(), expected, "a runtime error is not a divergence");

            let p = compile_for("package mandate.authz\ndecision := \"yes\"", engine).unwrap();
            assert_eq!(
                p.evaluate(input("{}")).unwrap_err().kind(),
                "malformed",
                "{engine:?}"
            );

            let slow = compile_for(
                r#"package mandate.authz
                decision := {"allow": count([x | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000); x := a * b]) > 0}"#,
                engine,
            )
            .unwrap();
            assert_eq!(
                slow.evaluate(input("{}")).unwrap_err(),
                EvalError::Timeout(Duration::from_millis(50)),
                "{engine:?}"
            );
        }
    }

    #[test]
    fn compile_errors_and_missing_entry_points_are_refused() {
        let err =
            compile_for("package mandate.authz\ndecision := {", EngineChoice::Auto).unwrap_err();
        assert!(matches!(err, PolicyError::Compile(_)), "{err}");
        let err = compile_for(
            "package other\ndecision := {\"allow\": true}",
            EngineChoice::Auto,
        )
        .unwrap_err();
        assert!(matches!(err, PolicyError::NoEntryPoint), "{err}");
        // regorus resolves functions at evaluation time: an unknown one is an evaluation error (deny).
        let p = compile_for(
            "package mandate.authz\ndecision := {\"allow\": nosuchfn(1)}",
            EngineChoice::Interpreter,
        )
        .unwrap();
        assert_eq!(p.evaluate(input("{}")).unwrap_err().kind(), "error");
    }

    #[test]
    fn auto_falls_back_to_the_interpreter_for_what_the_vm_cannot_compile() {
        // Partial objects with constant keys are outside the VM's compiler.
        let text = "package mandate.authz\nattrs[\"k\"] := input.v\nallow if attrs.k == 1";
        let p = compile_for(text, EngineChoice::Auto).unwrap();
        assert_eq!(p.engine(), EngineKind::Interpreter);
        assert!(
            p.engine_note()
                .unwrap()
                .contains("register VM cannot run this policy")
        );
        assert!(p.evaluate(input(r#"{"v":1}"#)).unwrap().allow);
        let err = compile_for(text, EngineChoice::Vm).unwrap_err();
        assert!(
            err.to_string().contains("--policy-engine interpreter"),
            "{err}"
        );
        assert_eq!(
            compile_for("package mandate.authz\nallow := true", EngineChoice::Auto)
                .unwrap()
                .engine(),
            EngineKind::Vm
        );
    }

    #[test]
    fn guard_switches_to_the_interpreter_when_the_vm_disagrees() {
        // regorus 0.14's VM answers undefined when a function's first else-branch loop finds nothing;
        // the interpreter (OPA semantics) falls through to the second branch.
        let text = r#"package mandate.authz
            f(xs) := true if { some x in xs; x == 5 } else := true if { some x in xs; x == input.id } else := false
            decision := {"allow": f([1, 2, 3]), "reason": "r"}"#;
        let seen = Arc::new(Mutex::new(Vec::<Divergence>::new()));
        let hook_seen = seen.clone();
        let hook: DivergenceHook =
            Arc::new(move |d: &Divergence| hook_seen.lock().unwrap().push(d.clone()));
        let p = Policy::compile_with(
            &module(text),
            Value::new_object(),
            Duration::from_millis(50),
            EngineChoice::Vm,
            Some(hook),
        )
        .unwrap();
        assert_eq!(p.engine(), EngineKind::Vm);
        // The VM's undefined is re-asked of the interpreter at once: the call gets the right answer.
        assert!(p.evaluate(input(r#"{"id":1}"#)).unwrap().allow);
        assert_eq!(p.engine(), EngineKind::Interpreter);
        assert!(p.evaluate(input(r#"{"id":1}"#)).unwrap().allow);
        let divergences = seen.lock().unwrap();
        assert_eq!(divergences.len(), 1);
        assert_eq!(divergences[0].version, p.version());
    }

    #[test]
    fn version_follows_content_and_data_is_visible() {
        let text = "package mandate.authz\nallow if data.agents[input.name].active";
        let data = Value::from_json_str(r#"{"agents":{"a":{"active":true}}}"#).unwrap();
        for engine in ENGINES {
            let p1 = Policy::compile_with(
                &module(text),
                data.clone(),
                Duration::from_millis(50),
                engine,
                None,
            )
            .unwrap();
            let p2 = Policy::compile_with(
                &module(text),
                data.clone(),
                Duration::from_millis(50),
                engine,
                None,
            )
            .unwrap();
            assert_eq!(p1.version(), p2.version());
            assert_eq!(p1.version().len(), 12);
            assert!(
                p1.evaluate(input(r#"{"name":"a"}"#)).unwrap().allow,
                "{engine:?}"
            );
            let p3 = Policy::compile_with(
                &module(text),
                Value::new_object(),
                Duration::from_millis(50),
                engine,
                None,
            )
            .unwrap();
            assert_ne!(p1.version(), p3.version());
        }
    }

    #[test]
    fn evaluation_runs_concurrently_on_many_threads() {
        for engine in ENGINES {
            let p = Arc::new(
                compile_for(
                    "package mandate.authz\ndefault allow := false\nallow if input.n % 2 == 0",
                    engine,
                )
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
            assert!(handles.into_iter().all(|h| h.join().unwrap()), "{engine:?}");
        }
    }
}
