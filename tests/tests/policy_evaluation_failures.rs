//! A policy that gives no usable decision — a runtime error, a run past its time limit, an undefined
//! decision — denies (fail closed), and the reason says which of these happened.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::policy::{Denial, is_policy_version, rego};
use mandate_e2e::{TestEnv, ensure_eq};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_runtime_error_denies_with_a_reason_naming_the_evaluation_error() {
    let env = TestEnv::new("policy_runtime_error");
    env.run(LIMIT, async {
        let app = App::start().await?;
        // 100 / d: fine for d=4, a division by zero for d=0.
        let policy = env.policy_dir(
            "divides",
            &rego(
                r#"decision := {"allow": quotient > 1, "reason": sprintf("100 / d = %v", [quotient])} if {
	quotient := 100 / to_number(input.request.query.d[0])
}"#,
            ),
        )?;
        let (agent, _tool) = env.agent_with_policy(&app, policy.path(), &[]).await?;

        let ok = proxy_get(agent.outbound(), "http://tool:8080/q?d=4", &[]).await?;
        ensure_eq!(ok.status, 200, "d=4 evaluates: {}", ok.text());

        let resp = proxy_get(agent.outbound(), "http://tool:8080/q?d=0", &[]).await?;
        let denial = Denial::parse(&resp)?;
        anyhow::ensure!(
            denial.reason.starts_with("policy evaluation error:"),
            "the reason names the evaluation error: {:?}",
            denial.reason
        );
        anyhow::ensure!(
            denial
                .policy_version
                .as_deref()
                .is_some_and(is_policy_version),
            "the failing policy's version is named: {denial:?}"
        );
        ensure_eq!(app.request_count(), 1, "the failed evaluation forwards nothing");
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["enforced"], true, "{record}");
        ensure_eq!(record["reason"], denial.reason.as_str(), "{record}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_exceeding_its_time_limit_is_cut_off_and_denies() {
    let env = TestEnv::new("policy_timeout");
    env.run(LIMIT, async {
        let app = App::start().await?;
        // Nine million products for /heavy; nothing to compute elsewhere.
        let policy = env.policy_dir(
            "heavy",
            &rego(
                r#"default decision := {"allow": true, "reason": "light call"}

decision := {"allow": count(products) > 0, "reason": "heavy call"} if input.request.path == "/heavy"

products := [x | some a in numbers.range(1, 3000); some b in numbers.range(1, 3000); x := a * b] if input.request.path == "/heavy""#,
            ),
        )?;
        let (agent, _tool) = env.agent_with_policy(&app, policy.path(), &["--policy-timeout", "20ms"]).await?;

        let ok = proxy_get(agent.outbound(), "http://tool:8080/light", &[]).await?;
        ensure_eq!(ok.status, 200, "a light call is decided in time: {}", ok.text());

        let started = std::time::Instant::now();
        let resp = proxy_get(agent.outbound(), "http://tool:8080/heavy", &[]).await?;
        let took = started.elapsed();
        let denial = Denial::parse(&resp)?;
        anyhow::ensure!(
            denial.reason.contains("exceeded its time limit") && denial.reason.contains("20ms"),
            "the reason names the time limit: {:?}",
            denial.reason
        );
        anyhow::ensure!(
            took < Duration::from_secs(5),
            "the evaluation is cut off, not run to the end: the answer took {took:?}"
        );
        ensure_eq!(app.request_count(), 1, "the timed-out call forwards nothing");
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["reason"], denial.reason.as_str(), "{record}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undefined_decision_denies_with_a_reason_saying_it_is_undefined() {
    let env = TestEnv::new("policy_undefined");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let policy = env.policy_dir(
            "partial",
            &rego(r#"decision := {"allow": true, "reason": "GET only"} if input.request.method == "GET""#),
        )?;
        let (agent, _tool) = env.agent_with_policy(&app, policy.path(), &[]).await?;
        let ok = proxy_get(agent.outbound(), "http://tool:8080/x", &[]).await?;
        ensure_eq!(ok.status, 200, "{}", ok.text());

        let req = mandate_e2e::client::proxy_request("DELETE", "http://tool:8080/x")
            .body(mandate_e2e::client::empty())?;
        let resp = mandate_e2e::client::Http1::connect(agent.outbound())
            .await?
            .fetch(req)
            .await?;
        let denial = Denial::parse(&resp)?;
        anyhow::ensure!(
            denial.reason.starts_with("policy decision is undefined"),
            "the reason says the decision is undefined: {:?}",
            denial.reason
        );
        ensure_eq!(app.request_count(), 1, "the undecided call forwards nothing");
        Ok(())
    })
    .await;
}
