//! Loading and hot-reloading policy: a broken policy is rejected and the last good one keeps
//! deciding; a fixed one is picked up; a sidecar that never had a good policy is not ready and
//! denies everything until one loads.

use std::time::Duration;

use mandate_e2e::client::proxy_get;
use mandate_e2e::policy::{Denial, is_policy_version, rego};
use mandate_e2e::{Sidecar, TestEnv, ensure_eq, eventually};

const LIMIT: Duration = Duration::from_secs(90);

/// How long a changed policy file may take to be noticed and compiled.
const RELOAD: Duration = Duration::from_secs(15);

const V1: &str = r#"default decision := {"allow": false, "reason": "v1: only GET /open is allowed"}

decision := {"allow": true, "reason": "v1: GET /open"} if {
	input.request.method == "GET"
	input.request.path == "/open"
}"#;

const V2: &str = r#"default decision := {"allow": false, "reason": "v2: only GET /open and GET /closed are allowed"}

decision := {"allow": true, "reason": "v2: GET /open or /closed"} if {
	input.request.method == "GET"
	input.request.path in {"/open", "/closed"}
}"#;

/// Rego that does not parse: an object literal left open.
const BROKEN: &str = "package mandate.authz\n\ndecision := {\"allow\": true,\n";

async fn load_errors(sidecar: &Sidecar) -> anyhow::Result<f64> {
    Ok(sidecar
        .metrics()
        .await?
        .sum("mandate_policy_load_errors_total", &[]))
}

/// The versions `mandate_policy_info` reports with value 1.
async fn policy_info(sidecar: &Sidecar) -> anyhow::Result<Vec<String>> {
    Ok(sidecar
        .metrics()
        .await?
        .matching("mandate_policy_info", &[])
        .into_iter()
        .filter(|s| s.value == 1.0)
        .filter_map(|s| s.labels.get("version").cloned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_on_reload_is_rejected_and_the_last_good_one_keeps_deciding_until_a_fixed_one_lands()
 {
    let env = TestEnv::new("policy_reload");
    env.run(LIMIT, async {
        let app = mandate_e2e::apps::App::start().await?;
        let policy = env.policy_dir("reloaded", &rego(V1))?;
        let (agent, _tool) = env.agent_with_policy(&app, policy.path(), &[]).await?;
        let open = || proxy_get(agent.outbound(), "http://tool:8080/open", &[]);
        let closed = || proxy_get(agent.outbound(), "http://tool:8080/closed", &[]);

        ensure_eq!(open().await?.status, 200, "v1 allows GET /open");
        let v1 = Denial::parse(&closed().await?)?;
        ensure_eq!(
            v1.reason,
            "v1: only GET /open is allowed",
            "v1 denies GET /closed"
        );
        let v1_version = v1.policy_version.clone().unwrap_or_default();
        anyhow::ensure!(
            is_policy_version(&v1_version),
            "v1's version: {v1_version:?}"
        );
        ensure_eq!(
            policy_info(&agent).await?,
            vec![v1_version.clone()],
            "policy info"
        );
        let errors_before = load_errors(&agent).await?;

        // Broken: rejected, counted, logged, and v1 still decides.
        policy.write(BROKEN)?;
        eventually(
            RELOAD,
            "mandate_policy_load_errors_total to increase",
            || async { Ok(load_errors(&agent).await? > errors_before) },
        )
        .await?;
        let logs = agent.logs();
        let rejected = logs
            .lines()
            .find(|l| l.contains("policy rejected"))
            .unwrap_or_default();
        anyhow::ensure!(
            rejected.contains("ERROR"),
            "the rejection is logged at ERROR: {rejected:?}"
        );
        anyhow::ensure!(
            rejected.contains(&format!("keeping policy version {v1_version}")),
            "the log says which version stays in force: {rejected:?}"
        );
        anyhow::ensure!(
            rejected.contains("does not compile"),
            "the log names the problem: {rejected:?}"
        );
        anyhow::ensure!(
            logs.contains("authz.rego:"),
            "the log points at the broken file:\n{logs}"
        );
        ensure_eq!(
            open().await?.status,
            200,
            "after a rejected reload, v1 still allows GET /open"
        );
        let still = Denial::parse(&closed().await?)?;
        ensure_eq!(
            still.reason,
            "v1: only GET /open is allowed",
            "after a rejected reload, v1 still denies GET /closed"
        );
        ensure_eq!(
            still.policy_version,
            Some(v1_version.clone()),
            "the deciding version"
        );
        ensure_eq!(
            policy_info(&agent).await?,
            vec![v1_version.clone()],
            "policy info after the rejected reload"
        );

        // Fixed, with a changed decision: picked up.
        policy.write(&rego(V2))?;
        eventually(RELOAD, "v2 to allow GET /closed", || async {
            Ok(closed().await?.status == 200)
        })
        .await?;
        let elsewhere =
            Denial::parse(&proxy_get(agent.outbound(), "http://tool:8080/elsewhere", &[]).await?)?;
        ensure_eq!(
            elsewhere.reason,
            "v2: only GET /open and GET /closed are allowed",
            "v2 decides"
        );
        let v2_version = elsewhere.policy_version.clone().unwrap_or_default();
        anyhow::ensure!(
            is_policy_version(&v2_version) && v2_version != v1_version,
            "v2 has its own version: {v2_version:?} (v1 {v1_version:?})"
        );
        ensure_eq!(
            policy_info(&agent).await?,
            vec![v2_version.clone()],
            "policy info names only v2"
        );
        let record = agent
            .decision_where("an allowed GET /closed under v2", |r| {
                r["path"] == "/closed" && r["allow"] == true
            })
            .await?;
        ensure_eq!(record["policy_version"], v2_version.as_str(), "{record}");
        ensure_eq!(record["reason"], "v2: GET /open or /closed", "{record}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_whose_policy_never_compiled_is_not_ready_and_denies_every_call_until_one_loads() {
    let env = TestEnv::new("policy_never_loaded");
    env.run(LIMIT, async {
        let app = mandate_e2e::apps::App::start().await?;
        let policy = env.policy_dir("broken", BROKEN)?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route_to("tool:8080", &tool)
            .policy(policy.path())
            .decision_log()
            .spawn_live()
            .await?;

        let ready = agent.admin_get("/readyz").await?;
        ensure_eq!(
            ready.status,
            503,
            "/readyz without a policy: {}",
            ready.text()
        );
        anyhow::ensure!(
            ready.text().contains("no policy"),
            "/readyz says why it is not ready: {:?}",
            ready.text()
        );
        anyhow::ensure!(
            load_errors(&agent).await? >= 1.0,
            "the failed load is counted"
        );
        anyhow::ensure!(
            agent
                .logs()
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("policy rejected")),
            "the failed load is logged at ERROR"
        );

        let resp = proxy_get(agent.outbound(), "http://tool:8080/anything", &[]).await?;
        let denial = Denial::parse(&resp)?;
        ensure_eq!(denial.reason, "no policy is loaded", "the reason");
        ensure_eq!(denial.policy_version, None, "no version decided");
        ensure_eq!(app.request_count(), 0, "nothing reaches the app");
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["reason"], "no policy is loaded", "{record}");
        anyhow::ensure!(
            record.get("policy_version").is_none(),
            "no policy version is recorded: {record}"
        );

        // A good policy lands: ready, and deciding.
        policy.write(&rego(
            r#"decision := {"allow": true, "reason": "finally a policy"}"#,
        ))?;
        eventually(RELOAD, "/readyz to answer 200", || async {
            Ok(agent.admin_get("/readyz").await?.status == 200)
        })
        .await?;
        let ok = proxy_get(agent.outbound(), "http://tool:8080/anything", &[]).await?;
        ensure_eq!(ok.status, 200, "{}", ok.text());
        ensure_eq!(app.request_count(), 1, "the call reaches the app");
        Ok(())
    })
    .await;
}
