//! Managed mode end to end: `mandate serve`, the operator CLI and sidecars that take their identity,
//! policy and registry from the control plane — enrolment by join token, policy versions pushed and
//! rolled back, revocation within a second, and enforcement that survives the control plane.

use std::time::{Duration, Instant};

use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, empty, probe_inbound, proxy_get, proxy_request};
use mandate_e2e::policy::{Denial, rego};
use mandate_e2e::{ControlPlane, Sidecar, Svid, TestEnv, ensure_eq, eventually};

const LIMIT: Duration = Duration::from_secs(120);

/// How long a pushed change may take to reach a sidecar in these tests (the target is 1 s; the
/// slack is for a loaded CI machine, and revocation is measured separately against 1 s).
const PUSH: Duration = Duration::from_secs(10);

/// The test policy: the caller must be active in the registry and the path must start with
/// `data.allowed_prefix`.
fn policy(prefix: &str) -> (String, String) {
    let module = rego(
        r#"default decision := {"allow": false, "reason": "denied: path outside data.allowed_prefix"}

decision := {"allow": false, "reason": sprintf("%s is %s", [input.source.spiffe_id, input.registry.status])} if {
	input.registry.status != "active"
}

decision := {"allow": true, "reason": "allowed prefix"} if {
	input.registry.status == "active"
	startswith(input.request.path, data.allowed_prefix)
}"#,
    );
    (module, format!(r#"{{"allowed_prefix": "{prefix}"}}"#))
}

/// Writes a policy directory for `mandate policy push`.
fn policy_dir(env: &TestEnv, name: &str, module: &str, data: &str) -> anyhow::Result<String> {
    let dir = env.dir().join("bundles").join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("authz.rego"), module)?;
    std::fs::write(dir.join("data.json"), data)?;
    Ok(dir.display().to_string())
}

/// A tool (service/tool in front of `app`) and an agent (agent/research routed to it as `tool:8080`),
/// both enrolled with the control plane by join token. They are live but not ready until a bundle
/// arrives. Returns `(agent, tool)`.
async fn managed_pair(
    env: &TestEnv,
    cp: &ControlPlane,
    app: &App,
) -> anyhow::Result<(Sidecar, Sidecar)> {
    let tool_token = cp.register_service("tool").await?;
    let agent_token = cp
        .register_agent("research", r#"[{"host": "tool"}]"#)
        .await?;
    let tool = env
        .sidecar("tool")
        .managed(cp, &tool_token)
        .app(app.addr())
        .spawn_live()
        .await?;
    // The agent keeps its SVID in a state directory, where a test can read it back.
    let agent = env
        .sidecar("agent")
        .managed(cp, &agent_token)
        .route_to("tool:8080", &tool)
        .arg("--state-dir")
        .arg(agent_state(env).display().to_string())
        .spawn_live()
        .await?;
    Ok((agent, tool))
}

fn agent_state(env: &TestEnv) -> std::path::PathBuf {
    env.dir().join("agent-state")
}

/// The SVID the control plane issued to the agent's sidecar, from its state directory.
fn agent_svid(env: &TestEnv, agent: &Sidecar) -> anyhow::Result<Svid> {
    let dir = agent_state(env);
    Ok(Svid {
        id: agent.id().to_owned(),
        cert_pem: std::fs::read_to_string(dir.join("svid.pem"))?,
        key_pem: std::fs::read_to_string(dir.join("svid-key.pem"))?,
    })
}

/// Pushes `policy(prefix)` (written as bundle directory `name`) with `mandate policy push`;
/// returns what the command printed.
async fn push_policy(
    env: &TestEnv,
    cp: &ControlPlane,
    name: &str,
    prefix: &str,
) -> anyhow::Result<String> {
    let (module, data) = policy(prefix);
    cp.cli_ok(&["policy", "push", &policy_dir(env, name, &module, &data)?])
        .await
}

async fn status_of(agent: &Sidecar, path: &str) -> anyhow::Result<u16> {
    Ok(
        proxy_get(agent.outbound(), &format!("http://tool:8080{path}"), &[])
            .await?
            .status
            .as_u16(),
    )
}

async fn wait_ready(sidecar: &Sidecar) -> anyhow::Result<()> {
    eventually(PUSH, &format!("{} ready", sidecar.name()), || async {
        Ok(sidecar.is_ready().await)
    })
    .await
}

#[tokio::test]
async fn sidecars_enrol_by_join_token_deny_until_a_bundle_arrives_then_enforce_and_report_it() {
    let env = TestEnv::new("cp-enrol");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, tool) = managed_pair(&env, &cp, &app).await?;

        // Enrolled, but no bundle yet: not ready, and every call denied.
        anyhow::ensure!(!agent.is_ready().await, "ready without a policy bundle");
        let resp = proxy_get(agent.outbound(), "http://tool:8080/allowed/x", &[]).await?;
        ensure_eq!(
            resp.status,
            403,
            "a call before any bundle: {}",
            resp.text()
        );
        ensure_eq!(app.request_count(), 0, "nothing reached the app");

        let pushed = push_policy(&env, &cp, "v1", "/allowed").await?;
        anyhow::ensure!(pushed.contains('1'), "push names version 1: {pushed}");
        wait_ready(&agent).await?;
        wait_ready(&tool).await?;

        let allowed = proxy_get(agent.outbound(), "http://tool:8080/allowed/x", &[]).await?;
        ensure_eq!(allowed.status, 200, "allowed call: {}", allowed.text());
        let denied = proxy_get(agent.outbound(), "http://tool:8080/secret", &[]).await?;
        let denial = Denial::parse(&denied)?;
        ensure_eq!(
            denial.policy_version.as_deref(),
            Some("1"),
            "the bundle version decided"
        );

        // The tool saw the agent's identity, proved by the SVID the control plane issued.
        let seen = app.seen();
        ensure_eq!(
            seen.last().map(|s| s.header_all("x-mandate-peer")),
            Some(vec!["spiffe://mandate.local/agent/research".to_owned()]),
            "identity stamped for the app"
        );

        // Both decisions reach the control plane and `mandate audit query` finds them.
        eventually(PUSH, "decisions in the audit log", || async {
            let records = cp.audit(&["--agent", "research"]).await?;
            Ok(records
                .iter()
                .any(|r| r["decision_id"] == denial.decision_id.as_str())
                && records.iter().any(|r| r["allow"] == true))
        })
        .await?;
        let denials = cp
            .audit(&["--agent", "research", "--result", "deny"])
            .await?;
        anyhow::ensure!(
            !denials.is_empty() && denials.iter().all(|r| r["allow"] == false),
            "--result deny filters: {denials:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_join_token_works_once() {
    let env = TestEnv::new("cp-token-reuse");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let token = cp.register_agent("research", "[]").await?;
        let _first = env
            .sidecar("first")
            .managed(&cp, &token)
            .spawn_live()
            .await?;

        let mut second = env
            .sidecar("second")
            .managed(&cp, &token)
            .spawn_unwaited()
            .await?;
        eventually(
            PUSH,
            "the second sidecar gives up on the used token",
            || async { Ok(second.logs().to_ascii_lowercase().contains("used")) },
        )
        .await?;
        anyhow::ensure!(
            !second.is_ready().await,
            "a sidecar with a reused token became ready"
        );
        let _ = second.try_exit();
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn policy_versions_reach_sidecars_broken_ones_are_refused_and_rollback_restores() {
    let env = TestEnv::new("cp-policy-versions");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, _tool) = managed_pair(&env, &cp, &app).await?;
        push_policy(&env, &cp, "v1", "/allowed").await?;
        wait_ready(&agent).await?;
        ensure_eq!(status_of(&agent, "/other").await?, 403, "v1 denies /other");

        // A bundle that does not compile is refused with the compiler's words; v1 stays.
        let broken = policy_dir(
            &env,
            "broken",
            "package mandate.authz\n\ndecision := {\n",
            "{}",
        )?;
        let out = cp.cli(&["policy", "push", &broken]).await?;
        anyhow::ensure!(
            !out.success,
            "a broken bundle was accepted:\n{}",
            out.stdout
        );
        anyhow::ensure!(
            out.stderr.contains("authz.rego") || out.stdout.contains("authz.rego"),
            "the refusal names the module:\n{}{}",
            out.stdout,
            out.stderr
        );
        // A bundle whose own tests fail is refused too.
        let (module, data) = policy("/allowed");
        let failing = policy_dir(
            &env,
            "failing",
            &format!("{module}\ntest_always_fails if {{\n\tfalse\n}}\n"),
            &data,
        )?;
        let out = cp.cli(&["policy", "push", &failing]).await?;
        anyhow::ensure!(!out.success, "a bundle with a failing test was accepted");
        anyhow::ensure!(
            format!("{}{}", out.stdout, out.stderr).contains("test_always_fails"),
            "the refusal names the failing test:\n{}{}",
            out.stdout,
            out.stderr
        );
        ensure_eq!(
            status_of(&agent, "/allowed").await?,
            200,
            "v1 still enforced"
        );
        ensure_eq!(status_of(&agent, "/other").await?, 403, "v1 still enforced");

        // v2 widens the prefix: the decision changes once the push arrives.
        push_policy(&env, &cp, "v2", "/").await?;
        eventually(PUSH, "v2 allows /other", || async {
            Ok(status_of(&agent, "/other").await? == 200)
        })
        .await?;
        let list = cp.cli_ok(&["policy", "list"]).await?;
        anyhow::ensure!(list.contains('2'), "policy list shows version 2:\n{list}");

        // Rollback to v1 narrows it again.
        cp.cli_ok(&["policy", "rollback", "1"]).await?;
        eventually(PUSH, "rollback to v1 denies /other again", || async {
            Ok(status_of(&agent, "/other").await? == 403)
        })
        .await?;
        let denied = proxy_get(agent.outbound(), "http://tool:8080/other", &[]).await?;
        let denial = Denial::parse(&denied)?;
        ensure_eq!(
            denial.policy_version.as_deref(),
            Some("1"),
            "the re-activated version decides"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn revoking_an_agent_denies_its_calls_within_a_second_and_cuts_its_connections() {
    let env = TestEnv::new("cp-revoke");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, tool) = managed_pair(&env, &cp, &app).await?;
        push_policy(&env, &cp, "v1", "/").await?;
        wait_ready(&agent).await?;
        wait_ready(&tool).await?;

        // A keep-alive connection from the agent making calls back to back.
        let mut conn = Http1::connect(agent.outbound()).await?;
        for _ in 0..5 {
            let resp = conn
                .fetch(proxy_request("GET", "http://tool:8080/stream").body(empty())?)
                .await?;
            ensure_eq!(resp.status, 200, "calls before the revocation");
        }

        // The agent's certificate opens the tool's sidecar while the agent is active…
        let svid = agent_svid(&env, &agent)?;
        let probe = probe_inbound(tool.inbound(), Some(&svid)).await?;
        anyhow::ensure!(
            probe.got_http_response(),
            "the active agent's SVID is accepted: {probe:?}"
        );

        cp.cli_ok(&["agent", "revoke", "research"]).await?;
        let revoked_at = Instant::now();

        // Within a second its calls stop being allowed, and the open connection is closed.
        let mut denied_after = None;
        let mut closed_after = None;
        while revoked_at.elapsed() < Duration::from_secs(3) && closed_after.is_none() {
            match conn
                .fetch(proxy_request("GET", "http://tool:8080/stream").body(empty())?)
                .await
            {
                Ok(resp) if resp.status == 200 => {}
                Ok(_) => {
                    denied_after.get_or_insert(revoked_at.elapsed());
                }
                Err(_) => {
                    denied_after.get_or_insert(revoked_at.elapsed());
                    closed_after = Some(revoked_at.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let denied =
            denied_after.ok_or_else(|| anyhow::anyhow!("still allowed 3 s after revoke"))?;
        anyhow::ensure!(
            denied <= Duration::from_secs(1),
            "the revoked agent's calls went on for {denied:?} (target ≤ 1 s)"
        );
        let closed = closed_after.ok_or_else(|| {
            anyhow::anyhow!("the agent's open connection was not closed within 3 s")
        })?;
        anyhow::ensure!(
            closed <= Duration::from_secs(1),
            "the revoked agent's open connection was closed only after {closed:?} (target ≤ 1 s)"
        );
        // …and is refused in the handshake once it is revoked.
        let probe = probe_inbound(tool.inbound(), Some(&svid)).await?;
        anyhow::ensure!(
            !probe.got_http_response(),
            "the tool's sidecar still accepts the revoked agent's certificate: {probe:?}"
        );
        let refused = tool.metrics().await?.sum(
            "mandate_tls_handshake_failures_total",
            &[("reason", "revoked")],
        );
        anyhow::ensure!(refused >= 1.0, "the refusal is counted as reason=revoked");
        // A new call is denied, naming the revocation.
        let resp = proxy_get(agent.outbound(), "http://tool:8080/after", &[]).await?;
        ensure_eq!(resp.status, 403, "a call after revocation: {}", resp.text());
        anyhow::ensure!(
            resp.text().contains("revoked"),
            "the denial says why: {}",
            resp.text()
        );
        // The tool's sidecar counts the refused certificate if the agent tries a handshake again.
        let shown = cp.cli_ok(&["agent", "show", "research"]).await?;
        anyhow::ensure!(
            shown.contains("revoked"),
            "agent show says revoked:\n{shown}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sidecars_keep_enforcing_without_the_control_plane_and_resync_when_it_returns() {
    let env = TestEnv::new("cp-outage");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, _tool) = managed_pair(&env, &cp, &app).await?;
        push_policy(&env, &cp, "v1", "/allowed").await?;
        wait_ready(&agent).await?;

        cp.kill().await?;
        for _ in 0..3 {
            ensure_eq!(
                status_of(&agent, "/allowed").await?,
                200,
                "allowed while away"
            );
            ensure_eq!(status_of(&agent, "/other").await?, 403, "denied while away");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::ensure!(
            agent.is_ready().await,
            "the last good bundle keeps it ready"
        );

        cp.restart().await?;
        push_policy(&env, &cp, "v2", "/").await?;
        eventually(
            Duration::from_secs(30),
            "the sidecar resyncs after the restart",
            || async { Ok(status_of(&agent, "/other").await? == 200) },
        )
        .await?;
        // Decisions taken while the control plane was away arrive after it returns.
        eventually(
            PUSH,
            "decisions from the outage in the audit log",
            || async {
                let records = cp
                    .audit(&["--agent", "research", "--result", "deny"])
                    .await?;
                Ok(records.len() >= 3)
            },
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_sidecar_restarted_during_an_outage_enforces_its_persisted_state_then_resyncs() {
    let env = TestEnv::new("cp-restart-in-outage");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, tool) = managed_pair(&env, &cp, &app).await?;
        push_policy(&env, &cp, "v1", "/allowed").await?;
        wait_ready(&agent).await?;
        let spiffe_id = agent.id().to_owned();

        // The pod restarts while the control plane is down: no token, only the state directory.
        cp.kill().await?;
        drop(agent);
        let agent = env
            .sidecar("agent-restarted")
            .managed_from_state(&cp, &spiffe_id, &agent_state(&env))
            .route_to("tool:8080", &tool)
            .spawn()
            .await?;
        ensure_eq!(
            status_of(&agent, "/allowed").await?,
            200,
            "allowed by the persisted bundle"
        );
        let denied = proxy_get(agent.outbound(), "http://tool:8080/other", &[]).await?;
        let denial = Denial::parse(&denied)?;
        ensure_eq!(
            denial.policy_version.as_deref(),
            Some("1"),
            "the persisted bundle version decided"
        );

        cp.restart().await?;
        push_policy(&env, &cp, "v2", "/").await?;
        eventually(
            Duration::from_secs(30),
            "the restarted sidecar resyncs with the control plane",
            || async { Ok(status_of(&agent, "/other").await? == 200) },
        )
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_sidecar_stopped_cleanly_delivers_its_last_decisions_first() {
    let env = TestEnv::new("cp-clean-shutdown");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (mut agent, _tool) = managed_pair(&env, &cp, &app).await?;
        push_policy(&env, &cp, "v1", "/allowed").await?;
        wait_ready(&agent).await?;

        // Calls answered just before SIGTERM: their decisions are still queued for the next batch.
        let mut ids = Vec::new();
        for path in ["/allowed/last", "/denied/last"] {
            let resp = proxy_get(agent.outbound(), &format!("http://tool:8080{path}"), &[]).await?;
            ids.push(resp.header("x-mandate-decision-id"));
        }
        agent.sigterm()?;
        let status = agent.wait_exit().await?;
        anyhow::ensure!(status.success(), "the sidecar exited with {status}");

        let records = cp.audit(&["--agent", "research"]).await?;
        for id in &ids {
            anyhow::ensure!(
                records.iter().any(|r| r["decision_id"] == id.as_str()),
                "decision {id} was lost on a clean shutdown; the audit log has {records:?}"
            );
        }
        Ok(())
    })
    .await;
}
