//! What policy decisions leave behind for operators: Prometheus metrics by direction, result and
//! enforcement, the version in force, evaluation time; and the trace id of each call in its record
//! (from the caller's `traceparent`, or from the one the agent's sidecar starts).

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, empty, proxy_get, proxy_request};
use mandate_e2e::policy::{Denial, reference_policy, registry};
use mandate_e2e::{Sidecar, TestEnv, ensure_eq};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn start(env: &TestEnv, app: &App) -> anyhow::Result<(Sidecar, Sidecar)> {
    let data = env.data_file(
        "registry",
        &registry(
            "research",
            json!([{"host": "api", "method": "GET", "path": "/v1/*"}]),
        ),
    )?;
    env.policy_pair(
        app.addr(),
        "api:8080",
        "research",
        "api",
        &reference_policy(),
        Some(&data),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_metrics_count_by_direction_result_and_enforcement_and_name_the_policy_version() {
    let env = TestEnv::new("policy_metrics");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = start(&env, &app).await?;

        let ok = proxy_get(agent.outbound(), "http://api:8080/v1/items", &[]).await?;
        ensure_eq!(ok.status, 200, "{}", ok.text());
        let req = proxy_request("DELETE", "http://api:8080/v1/items/1").body(empty())?;
        let denied = Denial::parse(&Http1::connect(agent.outbound()).await?.fetch(req).await?)?;
        let version = denied.policy_version.clone().unwrap_or_default();

        let decisions = |direction: &'static str, result: &'static str| {
            [
                ("direction", direction),
                ("result", result),
                ("enforced", "true"),
            ]
        };
        let m = agent.metrics().await?;
        ensure_eq!(
            m.sum("mandate_decisions_total", &decisions("outbound", "allow")),
            1.0,
            "agent: one allowed outbound decision\n{}",
            m.0
        );
        ensure_eq!(
            m.sum("mandate_decisions_total", &decisions("outbound", "deny")),
            1.0,
            "agent: one denied outbound decision\n{}",
            m.0
        );
        ensure_eq!(
            m.sum("mandate_decisions_total", &[("direction", "inbound")]),
            0.0,
            "agent: no inbound decisions"
        );
        ensure_eq!(
            m.sum("mandate_decisions_total", &[("enforced", "false")]),
            0.0,
            "agent: every decision enforced"
        );
        ensure_eq!(
            m.sum("mandate_policy_info", &[("version", version.as_str())]),
            1.0,
            "agent: mandate_policy_info names the version that decided ({version})\n{}",
            m.0
        );
        ensure_eq!(
            m.matching("mandate_policy_info", &[]).len(),
            1,
            "agent: one policy version in force"
        );
        anyhow::ensure!(
            m.sum("mandate_policy_eval_duration_seconds_count", &[]) >= 2.0,
            "agent: both evaluations are timed\n{}",
            m.0
        );
        ensure_eq!(
            m.sum("mandate_policy_load_errors_total", &[]),
            0.0,
            "agent: no load errors"
        );
        ensure_eq!(
            m.sum("mandate_decisions_dropped_total", &[]),
            0.0,
            "agent: no decision record dropped"
        );

        // The tool's sidecar decided only the call that reached it, inbound.
        let t = tool.metrics().await?;
        ensure_eq!(
            t.sum("mandate_decisions_total", &decisions("inbound", "allow")),
            1.0,
            "tool: one allowed inbound decision\n{}",
            t.0
        );
        ensure_eq!(
            t.sum("mandate_decisions_total", &[("result", "deny")]),
            0.0,
            "tool: no denials"
        );
        ensure_eq!(
            t.sum("mandate_decisions_total", &[("direction", "outbound")]),
            0.0,
            "tool: no outbound decisions"
        );
        ensure_eq!(
            t.sum("mandate_policy_info", &[("version", version.as_str())]),
            1.0,
            "tool: same policy and data, same version"
        );
        anyhow::ensure!(
            t.sum("mandate_policy_eval_duration_seconds_count", &[]) >= 1.0,
            "tool: the evaluation is timed\n{}",
            t.0
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_carries_a_traceparent_whose_trace_id_both_sidecars_record() {
    let env = TestEnv::new("policy_trace_id");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = start(&env, &app).await?;

        let traced = proxy_get(
            agent.outbound(),
            "http://api:8080/v1/traced",
            &[("traceparent", TRACEPARENT)],
        )
        .await?;
        ensure_eq!(traced.status, 200, "{}", traced.text());
        let untraced = proxy_get(agent.outbound(), "http://api:8080/v1/untraced", &[]).await?;
        ensure_eq!(untraced.status, 200, "{}", untraced.text());

        let record = agent
            .decision(&traced.header("x-mandate-decision-id"))
            .await?;
        ensure_eq!(record["trace_id"], TRACE_ID, "outbound: {record}");
        let inbound = tool
            .decision_where("the inbound traced call", |r| r["path"] == "/v1/traced")
            .await?;
        ensure_eq!(inbound["trace_id"], TRACE_ID, "inbound: {inbound}");

        // The app saw the traceparent it was sent, unchanged.
        let seen = app.seen();
        let traced_seen = seen.iter().find(|r| r.uri.ends_with("/v1/traced"));
        ensure_eq!(
            traced_seen.map(|r| r.header_all("traceparent")),
            Some(vec![TRACEPARENT.to_owned()]),
            "the app's traceparent"
        );

        // A call without traceparent starts a trace at the agent's sidecar: the same new trace id is
        // in both sidecars' records and reaches the app.
        let record = agent
            .decision(&untraced.header("x-mandate-decision-id"))
            .await?;
        let started = record["trace_id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(
            started.len() == 32 && started != TRACE_ID,
            "a call without traceparent gets a new trace id: {record}"
        );
        let inbound = tool
            .decision_where("the inbound untraced call", |r| r["path"] == "/v1/untraced")
            .await?;
        ensure_eq!(inbound["trace_id"], started.as_str(), "inbound: {inbound}");
        let untraced_seen = seen.iter().find(|r| r.uri.ends_with("/v1/untraced"));
        let app_traceparent = untraced_seen
            .map(|r| r.header_all("traceparent"))
            .unwrap_or_default();
        anyhow::ensure!(
            app_traceparent.len() == 1 && app_traceparent[0].contains(&started),
            "the app sees the started trace: {app_traceparent:?}"
        );

        // A denied call keeps its trace id too.
        let req = proxy_request("POST", "http://api:8080/v1/traced")
            .header("traceparent", TRACEPARENT)
            .body(empty())?;
        let denial = Denial::parse(&Http1::connect(agent.outbound()).await?.fetch(req).await?)?;
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["trace_id"], TRACE_ID, "denied: {record}");
        Ok(())
    })
    .await;
}
