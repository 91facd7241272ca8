//! Policies and data documents for the sidecars under test, and readers for what a policy decision
//! looks like on the wire (a denied call's 403 body).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use crate::TestEnv;
use crate::client::Collected;

/// The workspace root (where `policies/`, `.venv` and `tests/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The reference policy directory, `policies/reference`.
pub fn reference_policy() -> PathBuf {
    workspace_root().join("policies").join("reference")
}

/// A data document whose registry holds one active agent `name` with these ceiling scopes (the
/// reference policy's model: objects of glob patterns over host, port, protocol, method, path, mcp,
/// tool, resource, prompt), every one of them autonomous too: the agent may use its whole ceiling
/// without a delegation.
pub fn registry(name: &str, ceiling: Value) -> Value {
    registry_with(name, ceiling.clone(), ceiling)
}

/// As [`registry`], with the agent's `autonomous` scopes (what it may do with no delegation)
/// given apart from its ceiling.
pub fn registry_with(name: &str, ceiling: Value, autonomous: Value) -> Value {
    json!({
        "registry": {
            "agents": {
                name: {
                    "status": "active",
                    "owner": "alice@example.com",
                    "labels": {"team": "e2e"},
                    "ceiling": ceiling,
                    "autonomous": autonomous,
                }
            },
            "services": {}
        }
    })
}

/// A Rego module of package `mandate.authz` with `body` after the package and import lines.
pub fn rego(body: &str) -> String {
    format!("package mandate.authz\n\nimport rego.v1\n\n{body}\n")
}

/// A policy directory with one module, `authz.rego`, that a test can rewrite (the sidecar watches it).
pub struct PolicyDir {
    dir: PathBuf,
}

impl PolicyDir {
    /// The directory (give it to `--policy`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The module file.
    pub fn file(&self) -> PathBuf {
        self.dir.join("authz.rego")
    }

    /// Overwrites the module in place, as an editor saving the file would.
    pub fn write(&self, module: &str) -> anyhow::Result<()> {
        std::fs::write(self.file(), module)
            .with_context(|| format!("write {}", self.file().display()))
    }
}

impl TestEnv {
    /// Writes `module` as `<scratch>/policies/<name>/authz.rego`.
    pub fn policy_dir(&self, name: &str, module: &str) -> anyhow::Result<PolicyDir> {
        let dir = self.dir().join("policies").join(name);
        std::fs::create_dir_all(&dir)?;
        let policy = PolicyDir { dir };
        policy.write(module)?;
        Ok(policy)
    }

    /// A tool sidecar (no policy) in front of `app`, and an agent sidecar routed to it as
    /// `tool:8080` that runs the policy at `policy` with a decision log and `extra` flags.
    /// Returns `(agent, tool)`.
    pub async fn agent_with_policy(
        &self,
        app: &crate::apps::App,
        policy: &Path,
        extra: &[&str],
    ) -> anyhow::Result<(crate::Sidecar, crate::Sidecar)> {
        let tool = self
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let mut agent = self
            .sidecar("agent")
            .identity("agent/alice")
            .route_to("tool:8080", &tool)
            .policy(policy)
            .decision_log();
        for arg in extra {
            agent = agent.arg(*arg);
        }
        Ok((agent.spawn().await?, tool))
    }

    /// Writes `data` as `<scratch>/<name>.json` (for `--data`).
    pub fn data_file(&self, name: &str, data: &Value) -> anyhow::Result<PathBuf> {
        let path = self.dir().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(data)?)?;
        Ok(path)
    }
}

/// A denied call as the caller sees it: `403`, `application/json`,
/// `{"error":"denied","reason","decision_id","policy_version"}` and `x-mandate-decision-id`.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Why.
    pub reason: String,
    /// The decision id (body and header agree).
    pub decision_id: String,
    /// The policy version that decided (`None` when the body says null).
    pub policy_version: Option<String>,
}

impl Denial {
    /// Checks `resp` is a policy denial in DESIGN.md's shape and returns its fields.
    pub fn parse(resp: &Collected) -> anyhow::Result<Self> {
        Self::parse_as(resp, 403, "denied")
    }

    /// Like [`parse`](Self::parse) for another status and `error` code (e.g. 413 `body_too_large`).
    pub fn parse_as(resp: &Collected, status: u16, error: &str) -> anyhow::Result<Self> {
        ensure!(
            resp.status == status,
            "expected {status}, got {} with body {:?}",
            resp.status,
            resp.text()
        );
        ensure!(
            resp.header("content-type").starts_with("application/json"),
            "content-type {:?}",
            resp.header("content-type")
        );
        let body = resp.json()?;
        ensure!(body["error"] == error, "error is not {error:?}: {body}");
        let reason = body["reason"]
            .as_str()
            .with_context(|| format!("no reason: {body}"))?
            .to_owned();
        let decision_id = body["decision_id"]
            .as_str()
            .with_context(|| format!("no decision_id: {body}"))?
            .to_owned();
        ensure!(
            is_uuid_v7(&decision_id),
            "decision_id is not a UUIDv7: {decision_id:?}"
        );
        ensure!(
            resp.header("x-mandate-decision-id") == decision_id,
            "header x-mandate-decision-id {:?} differs from the body's decision_id {decision_id:?}",
            resp.header("x-mandate-decision-id")
        );
        ensure!(
            body.as_object()
                .is_some_and(|o| o.contains_key("policy_version")),
            "the body has no policy_version key: {body}"
        );
        let policy_version = match &body["policy_version"] {
            Value::Null => None,
            Value::String(v) => Some(v.clone()),
            other => anyhow::bail!("policy_version is neither a string nor null: {other}"),
        };
        Ok(Self {
            reason,
            decision_id,
            policy_version,
        })
    }
}

/// Whether `s` is a hyphenated version-7 UUID.
pub fn is_uuid_v7(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
        && groups[2].starts_with('7')
}

/// Whether `v` is a policy version as recorded: 12 lowercase hex digits.
pub fn is_policy_version(v: &str) -> bool {
    v.len() == 12 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TestEnv {
    /// A tool sidecar (`service/<tool>`, forwarding to `app`) and an agent sidecar (`agent/<agent>`,
    /// routing `host_port` to it), both enforcing `policy` with `data` and keeping a decision log.
    /// Returns `(agent, tool)`.
    pub async fn policy_pair(
        &self,
        app: std::net::SocketAddr,
        host_port: &str,
        agent: &str,
        tool: &str,
        policy: &Path,
        data: Option<&Path>,
    ) -> anyhow::Result<(crate::Sidecar, crate::Sidecar)> {
        fn with_policy<'e>(
            b: crate::SidecarBuilder<'e>,
            policy: &Path,
            data: Option<&Path>,
        ) -> crate::SidecarBuilder<'e> {
            let b = b.policy(policy).decision_log();
            match data {
                Some(d) => b.data(d),
                None => b,
            }
        }
        let tool = with_policy(
            self.sidecar("tool")
                .identity(&format!("service/{tool}"))
                .app(app),
            policy,
            data,
        )
        .spawn()
        .await?;
        let agent = with_policy(
            self.sidecar("agent")
                .identity(&format!("agent/{agent}"))
                .route_to(host_port, &tool),
            policy,
            data,
        )
        .spawn()
        .await?;
        Ok((agent, tool))
    }
}
