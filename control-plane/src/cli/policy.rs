//! `mandate policy push|list|rollback|test`: policy bundles through `/v1/policies`, and local tests.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{ApiRequest, Client, ServerArgs, segment};
use super::table::{Table, clean, prefix};

/// The data document a policy directory may carry next to its modules.
const DATA_FILE: &str = "data.json";
/// How many hex digits of a digest the CLI shows.
const DIGEST_PREFIX: usize = 12;

/// `sha256:0123…` → its first [`DIGEST_PREFIX`] hex digits.
fn short_digest(digest: &str) -> String {
    clean(prefix(
        digest.strip_prefix("sha256:").unwrap_or(digest),
        DIGEST_PREFIX,
    ))
}

/// Arguments of `mandate policy`: the server options (unused by `test`) and a verb.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Where the control plane is.
    #[command(flatten)]
    pub server: ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// `mandate policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Upload every *.rego under DIR (and DIR/data.json) as a new bundle; the server compiles it, runs its tests and activates it.
    Push(PushArgs),
    /// List the bundles, newest first; * marks the active one.
    List,
    /// Make VERSION the active bundle again (or roll forward to it).
    Rollback {
        /// The bundle version, as `policy list` shows it.
        #[arg(value_name = "VERSION")]
        bundle: u64,
    },
    /// Run every test_* rule locally; each DIR is one policy (its .rego files and an optional data.json).
    Test(PolicyTestArgs),
}

/// Arguments of `mandate policy push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The policy directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// What changed, kept with the bundle.
    #[arg(long, short, value_name = "TEXT")]
    pub message: Option<String>,
}

/// Arguments of `mandate policy test`.
#[derive(Debug, Args)]
pub struct PolicyTestArgs {
    /// Policy directories [default: .].
    #[arg(value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
}

/// Body of `POST /v1/policies`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushRequest {
    /// Module text by path relative to DIR (`/`-separated).
    pub modules: BTreeMap<String, String>,
    /// DIR/data.json, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// `--message`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl PushRequest {
    /// Reads DIR: every `.rego` file under it (recursively) and `data.json` if present.
    pub fn read(dir: &Path, message: Option<String>) -> anyhow::Result<Self> {
        let mut modules = BTreeMap::new();
        // The error's message already names its cause; keep it one line.
        let read = mandate_rego::read_modules(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        for m in read {
            let path = Path::new(&m.path);
            let relative = match path.strip_prefix(dir) {
                Ok(rel) if !rel.as_os_str().is_empty() => rel,
                // DIR was a single file.
                _ => Path::new(path.file_name().unwrap_or(path.as_os_str())),
            };
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            modules.insert(name, m.text);
        }
        let data_path = dir.join(DATA_FILE);
        let data = if data_path.is_file() {
            let text = std::fs::read(&data_path)
                .with_context(|| format!("cannot read {}", data_path.display()))?;
            let value: Value = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not JSON", data_path.display()))?;
            if !value.is_object() {
                bail!(
                    "{}: the top level must be a JSON object (it becomes `data`)",
                    data_path.display()
                );
            }
            Some(value)
        } else {
            None
        };
        Ok(Self {
            modules,
            data,
            message,
        })
    }
}

/// A bundle as the API summarises it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BundleSummary {
    /// Version, 1, 2, …
    pub version: u64,
    /// SHA-256 of the bundle, hex.
    #[serde(default)]
    pub digest: String,
    /// When pushed (RFC 3339).
    #[serde(default)]
    pub created_at: String,
    /// `--message` at push.
    #[serde(default)]
    pub message: String,
    /// Module names.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Rego tests that passed at push.
    #[serde(default)]
    pub tests_passed: u64,
    /// Whether it is the bundle in force.
    #[serde(default)]
    pub active: bool,
}

/// `{active, bundles}`.
#[derive(Debug, Deserialize)]
struct BundleList {
    #[serde(default)]
    active: Option<u64>,
    bundles: Vec<BundleSummary>,
}

/// Runs `mandate policy …`.
pub fn main(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let stdout = &mut std::io::stdout().lock();
    match &args.command {
        PolicyCommand::Test(t) => {
            let dirs = if t.dirs.is_empty() {
                vec![PathBuf::from(".")]
            } else {
                t.dirs.clone()
            };
            let totals = crate::policy_cli::test(&dirs, stdout)?;
            return Ok(if totals.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        PolicyCommand::Push(p) => {
            // Read the bundle before anything touches the network: a bad DIR fails fast.
            let body = PushRequest::read(&p.dir, p.message.clone())?;
            let client = Client::from_args(&args.server)?;
            super::block_on(push(&client, &body, stdout))?;
        }
        PolicyCommand::List => {
            let client = Client::from_args(&args.server)?;
            super::block_on(list(&client, stdout))?;
        }
        PolicyCommand::Rollback { bundle } => {
            let client = Client::from_args(&args.server)?;
            super::block_on(rollback(&client, *bundle, stdout))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `POST /v1/policies`; a refused bundle comes back as an error carrying every message.
async fn push(client: &Client, body: &PushRequest, out: &mut impl Write) -> anyhow::Result<()> {
    let s: BundleSummary = client
        .call(&ApiRequest::post("/v1/policies", Some(body)))
        .await?;
    writeln!(
        out,
        "pushed policy version {} ({} modules, {} tests passed, digest {}); it is now active",
        s.version,
        body.modules.len(),
        s.tests_passed,
        short_digest(&s.digest)
    )?;
    Ok(())
}

/// `GET /v1/policies` as a table.
async fn list(client: &Client, out: &mut impl Write) -> anyhow::Result<()> {
    let list: BundleList = client.call(&ApiRequest::get("/v1/policies")).await?;
    write!(out, "{}", list_table(&list.bundles, list.active))?;
    Ok(())
}

/// `POST /v1/policies/{version}/activate`.
async fn rollback(client: &Client, version: u64, out: &mut impl Write) -> anyhow::Result<()> {
    let s: BundleSummary = client
        .call(&ApiRequest::post(
            format!("/v1/policies/{}/activate", segment(&version.to_string())),
            None::<&()>,
        ))
        .await?;
    writeln!(
        out,
        "policy version {} (digest {}) is now active",
        s.version,
        short_digest(&s.digest)
    )?;
    Ok(())
}

/// `VERSION  ACTIVE  CREATED  DIGEST  MODULES  MESSAGE`.
pub fn list_table(bundles: &[BundleSummary], active: Option<u64>) -> String {
    let mut t = Table::new(&[
        "VERSION", "ACTIVE", "CREATED", "DIGEST", "MODULES", "MESSAGE",
    ]);
    for b in bundles {
        let is_active = b.active || active == Some(b.version);
        t.row([
            b.version.to_string(),
            if is_active { "*" } else { "" }.to_owned(),
            b.created_at.clone(),
            short_digest(&b.digest),
            b.modules.len().to_string(),
            b.message.clone(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_reads_every_rego_file_recursively_and_the_data() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("authz.rego"), "package mandate.authz\n").unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/util.rego"), "package util\n").unwrap();
        std::fs::write(dir.path().join("README.md"), "not rego").unwrap();
        std::fs::write(dir.path().join("data.json"), r#"{"k": 1}"#).unwrap();
        let body = PushRequest::read(dir.path(), Some("first".into())).unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({
                "modules": {"authz.rego": "package mandate.authz\n", "lib/util.rego": "package util\n"},
                "data": {"k": 1},
                "message": "first"
            })
        );
    }

    #[test]
    fn push_without_data_or_message_sends_only_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), "package p\n").unwrap();
        let body = PushRequest::read(dir.path(), None).unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"modules": {"p.rego": "package p\n"}})
        );
        // A single file works too and is named by its file name.
        let body = PushRequest::read(&dir.path().join("p.rego"), None).unwrap();
        assert_eq!(body.modules.keys().collect::<Vec<_>>(), ["p.rego"]);
    }

    #[test]
    fn push_refuses_a_directory_without_rego_or_with_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let err = PushRequest::read(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("no .rego files"), "{err}");
        std::fs::write(dir.path().join("p.rego"), "package p\n").unwrap();
        std::fs::write(dir.path().join("data.json"), "[1]").unwrap();
        let err = PushRequest::read(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("JSON object"), "{err}");
        std::fs::write(dir.path().join("data.json"), "{").unwrap();
        let err = PushRequest::read(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn the_list_marks_the_active_bundle_and_shortens_digests() {
        let bundles: Vec<BundleSummary> = serde_json::from_value(serde_json::json!([
            {"version": 2, "digest": "sha256:0123456789abcdef0123", "created_at": "2026-01-02T00:00:00Z",
             "message": "tighten", "modules": ["a.rego", "b.rego"], "tests_passed": 4, "active": false},
            {"version": 1, "digest": "fedcba9876543210fedc", "created_at": "2026-01-01T00:00:00Z",
             "message": "", "modules": ["a.rego"], "tests_passed": 2, "active": true}
        ]))
        .unwrap();
        assert_eq!(
            list_table(&bundles, None),
            "VERSION  ACTIVE  CREATED               DIGEST        MODULES  MESSAGE\n\
             2                2026-01-02T00:00:00Z  0123456789ab  2        tighten\n\
             1        *       2026-01-01T00:00:00Z  fedcba987654  1\n"
        );
        // The list's own `active` field marks it too.
        assert!(list_table(&bundles[..1], Some(2)).contains("2        *"));
    }
}
