//! A real Prometheus server scraping a managed pair's sidecars and the control plane, with the alert
//! rules an operator deploys (`deploy/prometheus/alerts.yml`) loaded: the decisions the test makes
//! show up in PromQL with the counts it made them in, the control plane's ingest counter reaches
//! their total, every rule loads and evaluates healthy, and none fires on a healthy mesh. Skipped
//! when `prometheus` (Debian package `prometheus`) is not installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::prometheus::{Prometheus, Sample};
use mandate_e2e::{TestEnv, ensure_eq};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);
/// How long a change may take to show in Prometheus (scraped and evaluated every second).
const SCRAPED: Duration = Duration::from_secs(30);

const ALLOWED: usize = 3;
const DENIED: usize = 2;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A query's samples keyed by the values of `by` (in that order).
fn keyed(samples: &[Sample], by: &[&str]) -> BTreeMap<Vec<String>, f64> {
    samples
        .iter()
        .map(|s| {
            let key = by
                .iter()
                .map(|l| s.labels.get(*l).cloned().unwrap_or_default())
                .collect();
            (key, s.value)
        })
        .collect()
}

/// Waits until `expr`, keyed by the labels `by`, equals `want`; the error shows what it last was.
async fn until_equals(
    prom: &Prometheus,
    expr: &str,
    by: &[&str],
    want: &[(&[&str], f64)],
) -> anyhow::Result<()> {
    let want: BTreeMap<Vec<String>, f64> = want
        .iter()
        .map(|(k, v)| (k.iter().map(|s| (*s).to_owned()).collect(), *v))
        .collect();
    let deadline = tokio::time::Instant::now() + SCRAPED;
    loop {
        let last = match prom.query(expr).await {
            Ok(samples) => {
                let got = keyed(&samples, by);
                if got == want {
                    return Ok(());
                }
                format!("{got:?}")
            }
            Err(e) => format!("error {e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{expr} did not reach {want:?} within {SCRAPED:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The groups in an alert rules file, each with its alerts in file order (read line by line:
/// `- name:` starts a group, `- alert:` names a rule in it).
fn rule_groups(yaml: &str) -> BTreeMap<String, Vec<String>> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in yaml.lines() {
        let line = line.trim_start();
        if let Some(name) = line.strip_prefix("- name:") {
            groups.push((name.trim().trim_matches('"').to_owned(), Vec::new()));
        } else if let Some(alert) = line.strip_prefix("- alert:")
            && let Some((_, rules)) = groups.last_mut()
        {
            rules.push(alert.trim().trim_matches('"').to_owned());
        }
    }
    groups.into_iter().collect()
}

/// The rule groups Prometheus loaded, with each rule's name, health and last error.
type Loaded = Vec<(String, Vec<(String, String, String)>)>;

fn loaded_groups(data: &Value) -> Loaded {
    data["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let rules = g["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                    (s("name"), s("health"), s("lastError"))
                })
                .collect();
            (g["name"].as_str().unwrap_or_default().to_owned(), rules)
        })
        .collect()
}

#[tokio::test]
async fn a_real_prometheus_counts_the_decisions_made_and_loads_the_alert_rules_healthy() {
    if !Prometheus::available() {
        println!("SKIP: prometheus not found (apt-get install prometheus)");
        return;
    }
    let env = TestEnv::new("prometheus-server");
    env.run(LIMIT, async {
        // A control plane and a managed pair under a policy that allows only /allowed….
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

        // …scraped by Prometheus with the deployed alert rules, every second.
        let alerts = repo_root().join("deploy/prometheus/alerts.yml");
        let config = format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
  - "{alerts}"

scrape_configs:
  - job_name: mandate-sidecar
    static_configs:
      - targets: ["{agent}", "{tool}"]
  - job_name: mandate-control-plane
    static_configs:
      - targets: ["{cp}"]
"#,
            alerts = alerts.display(),
            agent = agent.admin(),
            tool = tool.admin(),
            cp = cp.metrics_addr(),
        );
        let prom = Prometheus::start(&env, "prometheus", &config).await?;
        let (agent_at, tool_at, cp_at) = (
            agent.admin().to_string(),
            tool.admin().to_string(),
            cp.metrics_addr().to_string(),
        );
        until_equals(
            &prom,
            "up",
            &["job", "instance"],
            &[
                (&["mandate-control-plane", &cp_at], 1.0),
                (&["mandate-sidecar", &agent_at], 1.0),
                (&["mandate-sidecar", &tool_at], 1.0),
            ],
        )
        .await?;

        // A known number of allowed and denied calls.
        for i in 0..ALLOWED {
            let resp = proxy_get(
                agent.outbound(),
                &format!("http://tool:8080/allowed/{i}"),
                &[],
            )
            .await?;
            ensure_eq!(resp.status, 200, "allowed call {i}: {}", resp.text());
        }
        for i in 0..DENIED {
            let resp =
                proxy_get(agent.outbound(), &format!("http://tool:8080/secret/{i}"), &[]).await?;
            ensure_eq!(resp.status, 403, "denied call {i}: {}", resp.text());
        }

        // The agent's sidecar decided every call outbound; the tool's decided the allowed ones
        // again inbound (the denied ones never left the agent's).
        until_equals(
            &prom,
            r#"sum by (instance, result, enforced) (mandate_decisions_total{job="mandate-sidecar", direction="outbound"})"#,
            &["instance", "result", "enforced"],
            &[
                (&[&agent_at, "allow", "true"], ALLOWED as f64),
                (&[&agent_at, "deny", "true"], DENIED as f64),
            ],
        )
        .await?;
        until_equals(
            &prom,
            r#"sum by (instance, result) (mandate_decisions_total{job="mandate-sidecar", direction="inbound"})"#,
            &["instance", "result"],
            &[(&[&tool_at, "allow"], ALLOWED as f64)],
        )
        .await?;
        // Both sidecars ship every decision to the control plane, which stores each once.
        let decided = (2 * ALLOWED + DENIED) as f64;
        until_equals(
            &prom,
            r#"sum(mandate_decisions_sent_total{job="mandate-sidecar"})"#,
            &[],
            &[(&[], decided)],
        )
        .await?;
        until_equals(
            &prom,
            r#"sum(mandate_cp_decisions_ingested_total{job="mandate-control-plane"})"#,
            &[],
            &[(&[], decided)],
        )
        .await?;
        until_equals(
            &prom,
            r#"sum(mandate_cp_connected_sidecars{job="mandate-control-plane"})"#,
            &[],
            &[(&[], 2.0)],
        )
        .await?;

        // Every group and rule of alerts.yml loaded, and each has been evaluated healthy.
        let want = rule_groups(&std::fs::read_to_string(&alerts)?);
        anyhow::ensure!(
            !want.is_empty() && want.values().all(|rules| !rules.is_empty()),
            "alerts.yml has an empty group (or this test misread it): {want:?}"
        );
        let deadline = tokio::time::Instant::now() + SCRAPED;
        loop {
            let loaded = loaded_groups(&prom.api("rules", &[]).await?);
            let names: BTreeMap<String, Vec<String>> = loaded
                .iter()
                .map(|(g, rules)| (g.clone(), rules.iter().map(|r| r.0.clone()).collect()))
                .collect();
            ensure_eq!(names, want, "the rule groups Prometheus loaded from alerts.yml");
            let broken: Vec<_> = loaded
                .iter()
                .flat_map(|(_, rules)| rules)
                .filter(|(_, health, _)| health == "err")
                .collect();
            anyhow::ensure!(broken.is_empty(), "rules evaluate with errors: {broken:?}");
            let pending: Vec<_> = loaded
                .iter()
                .flat_map(|(_, rules)| rules)
                .filter(|(_, health, _)| health != "ok")
                .collect();
            if pending.is_empty() {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "rules not evaluated healthy within {SCRAPED:?}: {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        // Nothing is wrong, so nothing fires.
        let firing: Vec<Value> = prom.api("alerts", &[]).await?["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .cloned()
            .collect();
        anyhow::ensure!(
            firing.is_empty(),
            "alerts fire on a healthy mesh: {firing:#?}"
        );
        Ok(())
    })
    .await;
}
