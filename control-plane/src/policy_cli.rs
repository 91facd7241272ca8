//! `mandate policy test`: runs every `test_*` rule of one or more policy directories.

use std::path::{Path, PathBuf};

use mandate_rego::{TestStatus, Value, read_data, read_modules, run_tests};

/// The data document a policy directory may carry next to its modules.
const DATA_FILE: &str = "data.json";

/// Totals of a test run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Tests that evaluated to true.
    pub passed: usize,
    /// Tests that failed or errored.
    pub failed: usize,
}

/// Tests each directory as its own policy (its `.rego` files plus `data.json` if present),
/// printing one line per test; a directory that does not compile or holds no test counts as a failure.
pub fn test(dirs: &[PathBuf], out: &mut impl std::io::Write) -> std::io::Result<Totals> {
    let mut totals = Totals::default();
    for dir in dirs {
        match test_dir(dir) {
            Ok(results) if results.is_empty() => {
                writeln!(out, "FAIL {}: no test_* rules found", dir.display())?;
                totals.failed += 1;
            }
            Ok(results) => {
                for t in results {
                    let name = format!("{}.{}", t.package, t.name);
                    match t.status {
                        TestStatus::Pass => {
                            totals.passed += 1;
                            writeln!(out, "PASS {name}")?;
                        }
                        TestStatus::Fail => {
                            totals.failed += 1;
                            writeln!(out, "FAIL {name}")?;
                        }
                        TestStatus::Error(e) => {
                            totals.failed += 1;
                            writeln!(out, "ERROR {name}: {e}")?;
                        }
                    }
                }
            }
            Err(e) => {
                writeln!(out, "FAIL {}: {e}", dir.display())?;
                totals.failed += 1;
            }
        }
    }
    writeln!(out, "{} passed, {} failed", totals.passed, totals.failed)?;
    Ok(totals)
}

fn test_dir(dir: &Path) -> Result<Vec<mandate_rego::TestOutcome>, mandate_rego::PolicyError> {
    let modules = read_modules(dir)?;
    let data_path = dir.join(DATA_FILE);
    let data = if data_path.is_file() {
        read_data(&data_path)?
    } else {
        Value::new_object()
    };
    run_tests(&modules, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reports_each_test_and_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "p.rego",
            "package mandate.authz\nallow if data.ok\n",
        );
        write(dir.path(), "data.json", r#"{"ok": true}"#);
        write(
            dir.path(),
            "p_test.rego",
            "package mandate.authz_test\nimport data.mandate.authz\ntest_ok if authz.allow\ntest_bad if not authz.allow\n",
        );
        let mut out = Vec::new();
        let totals = test(&[dir.path().to_owned()], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            totals,
            Totals {
                passed: 1,
                failed: 1
            }
        );
        assert!(
            text.contains("PASS data.mandate.authz_test.test_ok"),
            "{text}"
        );
        assert!(
            text.contains("FAIL data.mandate.authz_test.test_bad"),
            "{text}"
        );
        assert!(text.ends_with("1 passed, 1 failed\n"), "{text}");
    }

    #[test]
    fn broken_or_testless_directories_fail() {
        let broken = tempfile::tempdir().unwrap();
        write(broken.path(), "p.rego", "package p\nallow if {");
        let empty = tempfile::tempdir().unwrap();
        write(empty.path(), "p.rego", "package p\nallow := true\n");
        let mut out = Vec::new();
        let totals = test(
            &[broken.path().to_owned(), empty.path().to_owned()],
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(totals.failed, 2, "{text}");
        assert!(text.contains("does not compile"), "{text}");
        assert!(text.contains("no test_* rules"), "{text}");
    }
}
