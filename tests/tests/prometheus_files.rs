//! The operator's files under `deploy/`: the Prometheus scrape config and alert rules pass
//! `promtool check`, both binaries' `/metrics` pass `promtool check metrics`, and every metric the
//! Grafana dashboard queries exists in one of those scrapes. Skipped when `promtool` (Debian package
//! `prometheus`) is not installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::{TestEnv, ensure_eq, eventually};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(120);
const PUSH: Duration = Duration::from_secs(10);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn promtool_available() -> bool {
    std::process::Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `promtool args…` with `stdin`, and fails with its output unless it succeeds.
async fn promtool(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await?;
    }
    drop(input);
    let out = child.wait_with_output().await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    Ok(text)
}

/// `promtool check metrics` on a scrape: it must succeed and report nothing.
async fn check_metrics(what: &str, scrape: &str) -> anyhow::Result<()> {
    let report = promtool(&["check", "metrics"], Some(scrape))
        .await
        .map_err(|e| e.context(format!("{what} /metrics:\n{scrape}")))?;
    anyhow::ensure!(
        report.trim().is_empty(),
        "promtool check metrics on {what} reported problems:\n{report}"
    );
    Ok(())
}

/// The metric (series) names in a scrape.
fn series_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `mandate_…` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("mandate_") {
                names.push(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard: panel targets (rows included) and query variables.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn panels(list: &serde_json::Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query"
            && let Some(q) = var["query"]["query"].as_str().or(var["query"].as_str())
        {
            out.push(q.to_owned());
        }
    }
    out
}

#[tokio::test]
async fn prometheus_config_alerts_scrapes_and_dashboard_pass_promtool() {
    if !promtool_available() {
        println!("SKIP: promtool not found (apt-get install prometheus)");
        return;
    }
    let env = TestEnv::new("prometheus-files");
    env.run(LIMIT, async {
        // (a) The files an operator deploys.
        promtool(
            &["check", "config", "deploy/prometheus/prometheus.yml"],
            None,
        )
        .await?;
        promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None).await?;

        // (b) Real scrapes: a control plane and a managed pair that has decided something.
        let cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, tool) = cp
            .managed_pair(
                &env,
                app.addr(),
                r#"default decision := {"allow": false, "reason": "denied: not under /allowed"}

decision := {"allow": true, "reason": "allowed prefix"} if {
	startswith(input.request.path, "/allowed")
}"#,
                &[],
            )
            .await?;
        let allowed = proxy_get(agent.outbound(), "http://tool:8080/allowed/x", &[]).await?;
        ensure_eq!(allowed.status, 200, "allowed call: {}", allowed.text());
        let denied = proxy_get(agent.outbound(), "http://tool:8080/secret", &[]).await?;
        ensure_eq!(denied.status, 403, "denied call: {}", denied.text());
        eventually(PUSH, "decisions ingested by the control plane", || async {
            Ok(cp
                .metrics()
                .await?
                .sum("mandate_cp_decisions_ingested_total", &[])
                >= 2.0)
        })
        .await?;

        let cp_scrape = cp.metrics().await?.0;
        let agent_scrape = agent.metrics().await?.0;
        let tool_scrape = tool.metrics().await?.0;
        check_metrics("the control plane", &cp_scrape).await?;
        check_metrics("the agent's sidecar", &agent_scrape).await?;
        check_metrics("the tool's sidecar", &tool_scrape).await?;

        // (c) The dashboard parses and queries only metrics the binaries expose.
        let text = std::fs::read_to_string(repo_root().join("deploy/grafana/mandate.json"))?;
        let dashboard: serde_json::Value = serde_json::from_str(&text)?;
        let exprs = dashboard_exprs(&dashboard);
        anyhow::ensure!(!exprs.is_empty(), "the dashboard has no PromQL expressions");
        let mut known = series_names(&cp_scrape);
        known.extend(series_names(&agent_scrape));
        known.extend(series_names(&tool_scrape));
        let mut used = BTreeSet::new();
        for expr in &exprs {
            for name in metric_names(expr) {
                anyhow::ensure!(
                    known.contains(&name),
                    "the dashboard queries {name}, which neither binary exposes (in {expr})"
                );
                used.insert(name);
            }
        }
        for needed in [
            "mandate_decisions_total",
            "mandate_request_duration_seconds_bucket",
            "mandate_policy_eval_duration_seconds_bucket",
            "mandate_certificate_expiry_timestamp_seconds",
            "mandate_decision_spool_bytes",
            "mandate_cp_connected_sidecars",
            "mandate_cp_decisions_ingested_total",
            "mandate_cp_push_latency_seconds_bucket",
        ] {
            anyhow::ensure!(
                used.contains(needed),
                "the dashboard has no panel on {needed}"
            );
        }

        // The alert rules, likewise, use only metrics the binaries expose.
        let alerts = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))?;
        for line in alerts
            .lines()
            .filter(|l| l.trim_start().starts_with("expr:"))
        {
            for name in metric_names(line) {
                anyhow::ensure!(
                    known.contains(&name),
                    "alerts.yml uses {name}, which neither binary exposes ({line})"
                );
            }
        }
        Ok(())
    })
    .await;
}
