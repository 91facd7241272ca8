//! The decision spool under faults, with the real binaries: a steady load of calls through the
//! agent's sidecar while the control plane is away for 10 s, while the sidecar itself is killed
//! with SIGKILL and restarted from its state directory, and with a spool too small for the outage
//! (calls refused with `spool_full`, never forwarded unrecorded). Afterwards the audit log holds
//! exactly one decision per call the agent got an answer to.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::{ControlPlane, Sidecar, TestEnv, ensure_eq, eventually};

const LIMIT: Duration = Duration::from_secs(150);
/// One call every 50 ms: about 20 a second.
const PACE: Duration = Duration::from_millis(50);
/// How long the spooled records may take to reach the audit log once the control plane is back.
const DELIVERY: Duration = Duration::from_secs(30);

const POLICY: &str = r#"default decision := {"allow": false, "reason": "denied: path outside /allowed"}

decision := {"allow": true, "reason": "allowed prefix"} if {
	startswith(input.request.path, "/allowed")
}"#;

/// The tool and the agent (see [`ControlPlane::managed_pair`]), the agent keeping its state (and
/// so its spool) in [`state_dir`] and started with `agent_args`. Returns `(agent, tool)`.
async fn setup(
    env: &TestEnv,
    cp: &ControlPlane,
    app: &App,
    agent_args: &[&str],
) -> anyhow::Result<(Sidecar, Sidecar)> {
    let state = state_dir(env).display().to_string();
    let mut args = vec!["--state-dir", state.as_str()];
    args.extend_from_slice(agent_args);
    cp.managed_pair(env, app.addr(), POLICY, &args).await
}

fn state_dir(env: &TestEnv) -> std::path::PathBuf {
    env.dir().join("agent-state")
}

/// The decision ids of the calls the agent got an answer to, and how many got none.
#[derive(Default)]
struct Answers {
    ids: Vec<String>,
    unanswered: usize,
}

/// About 20 calls a second through the agent's sidecar at `*target` (allowed and denied in turn)
/// until cancelled, noting each answer's decision id.
struct Load {
    target: Arc<Mutex<SocketAddr>>,
    answers: Arc<Mutex<Answers>>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Self {
        let target = Arc::new(Mutex::new(outbound));
        let answers = Arc::new(Mutex::new(Answers::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (target, answers, stop) = (target.clone(), answers.clone(), stop.clone());
            let paused = paused.clone();
            async move {
                let mut tick = tokio::time::interval(PACE);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if paused.load(Ordering::Relaxed) {
                        continue;
                    }
                    n += 1;
                    let allowed = n.is_multiple_of(2);
                    let path = if allowed { "/allowed" } else { "/other" };
                    let addr = *target.lock().unwrap();
                    let call = tokio::time::timeout(
                        Duration::from_secs(5),
                        proxy_get(addr, &format!("http://tool:8080{path}/{n}"), &[]),
                    )
                    .await;
                    let mut a = answers.lock().unwrap();
                    match call {
                        Ok(Ok(resp)) => {
                            let id = resp.header("x-mandate-decision-id");
                            let expected = if allowed { 200 } else { 403 };
                            anyhow::ensure!(
                                resp.status == expected && !id.is_empty(),
                                "call {n} to {path}: {} with decision id {id:?}: {}",
                                resp.status,
                                resp.text()
                            );
                            a.ids.push(id);
                        }
                        _ => a.unanswered += 1,
                    }
                }
                Ok(())
            }
        });
        Self {
            target,
            answers,
            stop,
            paused,
            task,
        }
    }

    /// Stops making calls (the one in flight finishes) until [`resume`](Self::resume).
    fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    fn answered(&self) -> usize {
        self.answers.lock().unwrap().ids.len()
    }

    async fn finish(self) -> anyhow::Result<Answers> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        Ok(Arc::try_unwrap(self.answers)
            .map_err(|_| anyhow::anyhow!("load still shared"))?
            .into_inner()
            .unwrap())
    }
}

/// The agent's outbound decisions in the audit log.
async fn outbound_audit(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    Ok(cp
        .audit(&["--agent", "research", "--limit", "10000"])
        .await?
        .into_iter()
        .filter(|r| r["direction"] == "outbound")
        .map(|r| r["decision_id"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// Waits until the audit log holds exactly the decisions of `ids`, once each.
async fn audit_matches(cp: &ControlPlane, ids: &[String]) -> anyhow::Result<()> {
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    ensure_eq!(want.len(), ids.len(), "decision ids answered are distinct");
    let deadline = tokio::time::Instant::now() + DELIVERY;
    let last = loop {
        let last = outbound_audit(cp).await?;
        if last.len() >= ids.len() || tokio::time::Instant::now() >= deadline {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let got: HashSet<&str> = last.iter().map(String::as_str).collect();
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    ensure_eq!(got.len(), last.len(), "no decision recorded twice");
    anyhow::ensure!(
        missing.is_empty() && extra.is_empty(),
        "audit log differs from the calls answered: missing {missing:?}, extra {extra:?}"
    );
    ensure_eq!(last.len(), ids.len(), "one decision per call answered");
    Ok(())
}

async fn run_for(load: &Load, d: Duration) -> anyhow::Result<()> {
    let before = load.answered();
    tokio::time::sleep(d).await;
    anyhow::ensure!(
        load.answered() > before,
        "no call was answered in {d:?} (the load is stuck)"
    );
    Ok(())
}

#[tokio::test]
async fn every_call_is_in_the_audit_log_once_after_a_control_plane_outage() {
    let env = TestEnv::new("spool-cp-outage");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, _tool) = setup(&env, &cp, &app, &[]).await?;
        let load = Load::start(agent.outbound());
        run_for(&load, Duration::from_secs(2)).await?;
        cp.kill().await?;
        run_for(&load, Duration::from_secs(10)).await?;
        let spooled = agent
            .metrics()
            .await?
            .sum("mandate_decision_spool_bytes", &[]);
        anyhow::ensure!(spooled > 0.0, "the outage's records are spooled");
        cp.restart().await?;
        run_for(&load, Duration::from_secs(3)).await?;
        let answers = load.finish().await?;
        ensure_eq!(answers.unanswered, 0, "every call answered");
        audit_matches(&cp, &answers.ids).await?;
        eventually(DELIVERY, "the spool drained", || async {
            let m = agent.metrics().await?;
            Ok(m.sum("mandate_decision_spool_bytes", &[]) == 0.0
                && m.sum("mandate_decisions_dropped_total", &[]) == 0.0)
        })
        .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn every_call_is_in_the_audit_log_once_after_the_sidecar_is_killed_during_an_outage() {
    let env = TestEnv::new("spool-sigkill");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (mut agent, tool) = setup(&env, &cp, &app, &[]).await?;
        let spiffe_id = agent.id().to_owned();
        let load = Load::start(agent.outbound());
        run_for(&load, Duration::from_secs(2)).await?;
        // The control plane goes away, the sidecar spools, and is then killed outright: what it
        // spooled must survive in its state directory.
        cp.kill().await?;
        run_for(&load, Duration::from_secs(3)).await?;
        // The spool's promise for `kill -9` covers records that reached its writer's `write`, about
        // a millisecond after their call (docs/sidecar.md, "fsync policy"); a call answered in the
        // very instant of the kill may lose its record. Let the last answered call's record land.
        load.pause();
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.sigkill().await?;
        let agent = env
            .sidecar("agent-restarted")
            .managed_from_state(&cp, &spiffe_id, &state_dir(&env))
            .route_to("tool:8080", &tool)
            .spawn()
            .await?;
        *load.target.lock().unwrap() = agent.outbound();
        load.resume();
        run_for(&load, Duration::from_secs(3)).await?;
        cp.restart().await?;
        run_for(&load, Duration::from_secs(3)).await?;
        let answers = load.finish().await?;
        audit_matches(&cp, &answers.ids).await?;
        anyhow::ensure!(
            agent
                .logs()
                .contains("delivering the records an earlier run left"),
            "the restarted sidecar replayed its spool:\n{}",
            agent.logs()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_full_spool_refuses_calls_until_the_control_plane_takes_the_backlog() {
    let env = TestEnv::new("spool-full");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, _tool) = setup(&env, &cp, &app, &["--spool-max-bytes", "4KiB"]).await?;
        let metrics = agent.metrics().await?;
        ensure_eq!(
            metrics.sum("mandate_decision_spool_limit_bytes", &[]),
            4096.0,
            "the limit is exported"
        );
        cp.kill().await?;

        let mut ids = Vec::new();
        let mut refused = None;
        for n in 0..200 {
            let resp = proxy_get(
                agent.outbound(),
                &format!("http://tool:8080/allowed/{n}"),
                &[],
            )
            .await?;
            if resp.status == 503 {
                refused = Some(resp);
                break;
            }
            ensure_eq!(resp.status, 200, "allowed while the spool has room");
            ids.push(resp.header("x-mandate-decision-id"));
        }
        let refused =
            refused.ok_or_else(|| anyhow::anyhow!("200 calls and the 4 KiB spool never filled"))?;
        let body = refused.json()?;
        ensure_eq!(body["error"], "spool_full", "refusal body: {body}");
        anyhow::ensure!(
            body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("decision spool is full")),
            "refusal reason: {body}"
        );
        anyhow::ensure!(
            ids.len() >= 2,
            "a few calls fit before the spool filled ({})",
            ids.len()
        );
        // Refused calls are not forwarded: the app saw only the recorded ones.
        let seen = app.request_count();
        for n in 0..5 {
            let resp = proxy_get(
                agent.outbound(),
                &format!("http://tool:8080/allowed/more-{n}"),
                &[],
            )
            .await?;
            ensure_eq!(resp.status, 503, "refused while full");
        }
        ensure_eq!(
            app.request_count(),
            seen,
            "refused calls never reached the app"
        );
        ensure_eq!(seen, ids.len(), "the app saw exactly the recorded calls");
        let metrics = agent.metrics().await?;
        anyhow::ensure!(
            metrics.sum("mandate_spool_full_refusals_total", &[]) >= 6.0,
            "refusals counted"
        );
        ensure_eq!(
            metrics.sum("mandate_decisions_dropped_total", &[]),
            0.0,
            "nothing dropped"
        );

        cp.restart().await?;
        let deadline = tokio::time::Instant::now() + DELIVERY;
        loop {
            let resp = proxy_get(agent.outbound(), "http://tool:8080/allowed/after", &[]).await?;
            if resp.status == 200 {
                ids.push(resp.header("x-mandate-decision-id"));
                break;
            }
            ensure_eq!(resp.status, 503, "refused until the backlog is taken");
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "calls still refused {DELIVERY:?} after the control plane returned"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        audit_matches(&cp, &ids).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn with_spool_full_drop_calls_go_ahead_and_every_dropped_record_is_counted() {
    let env = TestEnv::new("spool-full-drop");
    env.run(LIMIT, async {
        let mut cp = env.control_plane("cp").spawn().await?;
        let app = App::start().await?;
        let (agent, _tool) = setup(
            &env,
            &cp,
            &app,
            &["--spool-max-bytes", "4KiB", "--spool-full", "drop"],
        )
        .await?;
        cp.kill().await?;
        let calls = 40;
        for n in 0..calls {
            let resp = proxy_get(
                agent.outbound(),
                &format!("http://tool:8080/allowed/{n}"),
                &[],
            )
            .await?;
            ensure_eq!(resp.status, 200, "forwarded whatever the spool holds");
        }
        // The last records reach the writer within moments of their calls.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let (spooled, dropped) = loop {
            let m = agent.metrics().await?;
            let counted = (
                m.sum("mandate_decisions_spooled_total", &[]),
                m.sum("mandate_decisions_dropped_total", &[]),
            );
            if counted.0 + counted.1 == f64::from(calls) {
                break counted;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{calls} calls, but {} records spooled and {} dropped",
                counted.0,
                counted.1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        anyhow::ensure!(dropped > 0.0, "records past the limit dropped");
        let m = agent.metrics().await?;
        ensure_eq!(
            m.sum("mandate_spool_full_refusals_total", &[]),
            0.0,
            "nothing refused"
        );
        cp.restart().await?;
        eventually(DELIVERY, "the spooled records delivered", || async {
            Ok(outbound_audit(&cp).await?.len() == spooled as usize)
        })
        .await?;
        Ok(())
    })
    .await;
}
