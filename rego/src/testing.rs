//! The Rego test runner: every `test_*` rule of every package, OPA-style.

use std::time::Duration;

use regorus::Value;

use crate::policy::{compile_error, load_engine};
use crate::source::{Module, PolicyError};

/// How long one test may run before it counts as an error.
const TEST_TIME_LIMIT: Duration = Duration::from_secs(10);

/// How one test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestStatus {
    /// Evaluated to `true`.
    Pass,
    /// Evaluated to anything else, or was undefined.
    Fail,
    /// Evaluation failed.
    Error(String),
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// `data.<package>` of the test.
    pub package: String,
    /// The rule name (`test_…`).
    pub name: String,
    /// How it ended.
    pub status: TestStatus,
}

/// Compiles every module with `data` and runs each `test_*` rule; compile errors abort the run.
pub fn run_tests(modules: &[Module], data: Value) -> Result<Vec<TestOutcome>, PolicyError> {
    let (mut engine, packages) = load_engine(modules, data, TEST_TIME_LIMIT)?;
    let mut tests = Vec::new();
    for (module, package) in modules.iter().zip(packages) {
        for name in test_rule_names(&module.text) {
            // The scan finds candidates; the parser confirms they are rules of this module.
            if engine
                .has_declared_rule_rooted_at(&module.path, &name)
                .map_err(compile_error)?
                && !tests.contains(&(package.clone(), name.clone()))
            {
                tests.push((package.clone(), name));
            }
        }
    }
    Ok(tests
        .into_iter()
        .map(|(package, name)| {
            let status = match engine.eval_rule(format!("{package}.{name}")) {
                Ok(Value::Bool(true)) => TestStatus::Pass,
                Ok(_) => TestStatus::Fail,
                Err(e) => TestStatus::Error(format!("{e:#}")),
            };
            TestOutcome {
                package,
                name,
                status,
            }
        })
        .collect())
}

/// Names of top-level rules that start with `test_` (rule heads start a line).
fn test_rule_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with("test_").then_some(name)
        })
        .collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_each_test_rule_and_reports_pass_fail_error() {
        let modules = vec![
            Module {
                path: "p.rego".into(),
                text: "package p\nallow if input.ok\n".into(),
            },
            Module {
                path: "p_test.rego".into(),
                text: "package p_test\nimport data.p\n\
                       test_allows if p.allow with input as {\"ok\": true}\n\
                       test_wrong if p.allow with input as {\"ok\": false}\n\
                       test_boom if 1 / 0 == 1\n\
                       # test_commented if true\n"
                    .into(),
            },
        ];
        let results = run_tests(&modules, Value::new_object()).unwrap();
        let by_name = |n: &str| &results.iter().find(|t| t.name == n).unwrap().status;
        assert_eq!(results.len(), 3);
        assert_eq!(by_name("test_allows"), &TestStatus::Pass);
        assert_eq!(by_name("test_wrong"), &TestStatus::Fail);
        assert!(matches!(
            by_name("test_boom"),
            TestStatus::Error(_) | TestStatus::Fail
        ));
        assert_eq!(results[0].package, "data.p_test");
    }
}
