//! The two flags that loosen enforcement, each opt-in: `--dry-run` evaluates and records but always
//! forwards; `--fail-open` allows calls the policy cannot decide (and says so), never calls it denies.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::policy::{Denial, is_uuid_v7, rego};
use mandate_e2e::{Sidecar, TestEnv, ensure_eq};

const LIMIT: Duration = Duration::from_secs(60);

/// A tool sidecar without policy and an agent sidecar running `module` with `extra` flags.
async fn start(
    env: &TestEnv,
    app: &App,
    module: &str,
    extra: &[&str],
) -> anyhow::Result<(Sidecar, Sidecar)> {
    let policy = env.policy_dir("policy", &rego(module))?;
    env.agent_with_policy(app, policy.path(), extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_forwards_a_denied_call_and_records_it_as_denied_but_not_enforced() {
    let env = TestEnv::new("dry_run");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(
            &env,
            &app,
            r#"decision := {"allow": false, "reason": "nothing is allowed (dry run)"}"#,
            &["--dry-run"],
        )
        .await?;

        let resp = proxy_get(agent.outbound(), "http://tool:8080/would-be-denied", &[]).await?;
        ensure_eq!(resp.status, 200, "dry-run forwards: {}", resp.text());
        ensure_eq!(app.request_count(), 1, "the app receives the call");
        let id = resp.header("x-mandate-decision-id");
        anyhow::ensure!(is_uuid_v7(&id), "the decision is named: {id:?}");

        let record = agent.decision(&id).await?;
        ensure_eq!(record["allow"], false, "the verdict is recorded: {record}");
        ensure_eq!(record["enforced"], false, "{record}");
        ensure_eq!(record["reason"], "nothing is allowed (dry run)", "{record}");
        ensure_eq!(record["status"], 200, "{record}");

        let m = agent.metrics().await?;
        ensure_eq!(
            m.sum(
                "mandate_decisions_total",
                &[
                    ("direction", "outbound"),
                    ("result", "deny"),
                    ("enforced", "false")
                ]
            ),
            1.0,
            "the unenforced deny is counted as such"
        );
        ensure_eq!(
            m.sum("mandate_decisions_total", &[("enforced", "true")]),
            0.0,
            "nothing is enforced in dry-run"
        );
        Ok(())
    })
    .await;
}

/// Undefined for /undefined, a runtime error for /error, an explicit deny for /forbidden.
const UNDECIDABLE: &str = r#"decision := {"allow": false, "reason": "explicitly forbidden"} if input.request.path == "/forbidden"

decision := {"allow": 1 / zero > 0, "reason": "never reached"} if input.request.path == "/error"

zero := count(input.request.query)"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_allows_calls_the_policy_cannot_decide_and_says_so_in_the_reason() {
    let env = TestEnv::new("fail_open");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app, UNDECIDABLE, &["--fail-open"]).await?;

        for (path, cause) in [
            ("/undefined", "policy decision is undefined"),
            ("/error", "policy evaluation error:"),
        ] {
            let resp = proxy_get(agent.outbound(), &format!("http://tool:8080{path}"), &[]).await?;
            ensure_eq!(
                resp.status,
                200,
                "{path} is allowed under --fail-open: {}",
                resp.text()
            );
            let record = agent
                .decision(&resp.header("x-mandate-decision-id"))
                .await?;
            ensure_eq!(record["allow"], true, "{path}: {record}");
            ensure_eq!(record["enforced"], true, "{path}: {record}");
            let reason = record["reason"].as_str().unwrap_or_default();
            anyhow::ensure!(
                reason.starts_with(cause) && reason.contains("--fail-open"),
                "{path}: the reason says what failed and that --fail-open allowed it: {reason:?}"
            );
        }
        ensure_eq!(
            app.request_count(),
            2,
            "both undecidable calls reach the app"
        );

        let resp = proxy_get(agent.outbound(), "http://tool:8080/forbidden", &[]).await?;
        let denial = Denial::parse(&resp)?;
        ensure_eq!(
            denial.reason,
            "explicitly forbidden",
            "--fail-open never overrides a decision the policy did take"
        );
        ensure_eq!(
            app.request_count(),
            2,
            "the denied call never reaches the app"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fail_open_the_same_undecidable_calls_are_denied() {
    let env = TestEnv::new("fail_closed");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app, UNDECIDABLE, &[]).await?;
        for (path, cause) in [
            ("/undefined", "policy decision is undefined"),
            ("/error", "policy evaluation error:"),
        ] {
            let resp = proxy_get(agent.outbound(), &format!("http://tool:8080{path}"), &[]).await?;
            let denial = Denial::parse(&resp)?;
            anyhow::ensure!(
                denial.reason.starts_with(cause) && !denial.reason.contains("--fail-open"),
                "{path}: {:?}",
                denial.reason
            );
        }
        ensure_eq!(app.request_count(), 0, "nothing reaches the app");
        Ok(())
    })
    .await;
}
