//! Identity files are watched and hot-reloaded: rotating both sidecars' certificates under a steady
//! stream of requests loses none of them, and a broken replacement is rejected while the old identity
//! keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, empty, proxy_get, proxy_request};
use mandate_e2e::pki::{normalize_serial, replace_file};
use mandate_e2e::{Sidecar, TestEnv, eventually, within};

const LIMIT: Duration = Duration::from_secs(150);
const RELOADS: &str = "mandate_identity_reloads_total";
/// How long a watcher may take to notice and apply a replaced file.
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// Replaces a sidecar's identity files with something it must refuse.
type WriteFiles<'a> = dyn Fn() -> anyhow::Result<()> + 'a;

async fn config_serial(sidecar: &Sidecar) -> anyhow::Result<String> {
    let config = sidecar.config().await?;
    let serial = config
        .pointer("/identity/serial")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow::anyhow!("/config has no identity.serial: {config}"))?;
    Ok(normalize_serial(serial))
}

async fn reloads(sidecar: &Sidecar, result: &str) -> anyhow::Result<f64> {
    Ok(sidecar.metrics().await?.sum(RELOADS, &[("result", result)]))
}

async fn wait_for_serial(sidecar: &Sidecar, serial: &str) -> anyhow::Result<()> {
    let last = std::sync::Mutex::new(String::new());
    let waited = eventually(RELOAD_WAIT, "new certificate applied", || {
        let last = &last;
        async move {
            let now = config_serial(sidecar).await?;
            let done = now == serial;
            *last.lock().expect("lock") = now;
            Ok(done)
        }
    })
    .await;
    waited.map_err(|e| {
        e.context(format!(
            "{}: /config serial {}, expected {serial}",
            sidecar.name(),
            last.lock().expect("lock")
        ))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_steady_traffic_without_a_failed_request() {
    let env = TestEnv::new("rotation");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = env.pair(app.addr(), "tool:8080").await?;
        let applied_before = (
            reloads(&agent, "applied").await?,
            reloads(&tool, "applied").await?,
        );

        // The steady stream: sequential requests until told to stop, alternating between one keep-alive
        // connection opened before any rotation (it must survive them) and a fresh connection each time.
        let stop = Arc::new(AtomicBool::new(false));
        let mut kept = Http1::connect(agent.outbound()).await?;
        let traffic = {
            let stop = stop.clone();
            let outbound = agent.outbound();
            tokio::spawn(async move {
                let mut done = 0usize;
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) || done < 200 {
                    let url = format!("http://tool:8080/steady/{done}");
                    let call = async {
                        if done.is_multiple_of(2) {
                            kept.fetch(proxy_request("GET", &url).body(empty())?).await
                        } else {
                            proxy_get(outbound, &url, &[]).await
                        }
                    };
                    let how = if done.is_multiple_of(2) {
                        "kept-alive"
                    } else {
                        "fresh"
                    };
                    match tokio::time::timeout(Duration::from_secs(10), call).await {
                        Ok(Ok(r)) if r.status == 200 => {}
                        Ok(Ok(r)) => {
                            failures.push(format!("#{done} ({how}): {} {}", r.status, r.text()))
                        }
                        Ok(Err(e)) => failures.push(format!("#{done} ({how}): {e:#}")),
                        Err(_) => failures.push(format!("#{done} ({how}): no answer within 10s")),
                    }
                    done += 1;
                }
                (done, failures)
            })
        };

        let mut last_agent = agent.svid().clone();
        let mut last_tool = tool.svid().clone();
        for round in 1..=3 {
            // Let traffic flow on the current identities first (a signal from the app, not a sleep).
            let target = app.request_count() + 60;
            within(
                Duration::from_secs(30),
                "traffic before rotation",
                app.wait_for_requests(target),
            )
            .await?;

            last_agent = env.pki().issue("agent/alice");
            last_tool = env.pki().issue("service/tool");
            last_agent.write_atomically(agent.cert_path(), agent.key_path())?;
            last_tool.write_atomically(tool.cert_path(), tool.key_path())?;
            wait_for_serial(&agent, &last_agent.serial())
                .await
                .map_err(|e| e.context(format!("rotation {round}")))?;
            wait_for_serial(&tool, &last_tool.serial())
                .await
                .map_err(|e| e.context(format!("rotation {round}")))?;
        }
        // And traffic keeps flowing on the final identities.
        let target = app.request_count() + 60;
        within(
            Duration::from_secs(30),
            "traffic after rotation",
            app.wait_for_requests(target),
        )
        .await?;
        stop.store(true, Ordering::SeqCst);
        let (done, failures) = within(Duration::from_secs(60), "traffic loop", traffic).await??;
        assert!(done >= 200, "only {done} requests were made");
        assert!(
            failures.is_empty(),
            "{} of {done} requests failed during rotation:\n{}",
            failures.len(),
            failures.join("\n")
        );

        let applied_after = (
            reloads(&agent, "applied").await?,
            reloads(&tool, "applied").await?,
        );
        assert!(
            applied_after.0 >= applied_before.0 + 3.0,
            "agent applied reloads {applied_before:?} -> {applied_after:?}"
        );
        assert!(
            applied_after.1 >= applied_before.1 + 3.0,
            "tool applied reloads {applied_before:?} -> {applied_after:?}"
        );
        let expiry = agent
            .metrics()
            .await?
            .sum("mandate_certificate_expiry_timestamp_seconds", &[]);
        assert_eq!(
            expiry as i64,
            last_agent.not_after(),
            "the expiry gauge follows the rotated certificate"
        );

        // New handshakes with the tool present its newest certificate.
        let caller = env.pki().issue("agent/probe");
        let tls =
            mandate_e2e::client::tls_connect(tool.inbound(), Some(&caller), &["http/1.1"]).await?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default();
        assert_eq!(
            presented,
            last_tool.leaf_der().as_ref().to_vec(),
            "the tool's inbound listener serves the rotated certificate"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_certificate_file_is_rejected_and_the_old_identity_keeps_serving() {
    let env = TestEnv::new("reload_rejected");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let serial = config_serial(&agent).await?;
        assert_eq!(serial, agent.svid().serial());

        let cases: [(&str, Box<WriteFiles>); 2] = [
            (
                "garbage certificate file",
                Box::new(|| {
                    replace_file(
                        agent.cert_path(),
                        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
                    )
                }),
            ),
            (
                "expired certificate with its own key",
                Box::new(|| {
                    env.pki()
                        .broken(mandate_e2e::Broken::Expired, "agent/alice")
                        .write_atomically(agent.cert_path(), agent.key_path())
                }),
            ),
        ];
        for (what, write) in cases {
            let rejected = reloads(&agent, "rejected").await?;
            let applied = reloads(&agent, "applied").await?;
            let log_len = agent.logs().len();
            write()?;
            eventually(RELOAD_WAIT, &format!("{what}: reload rejected"), || async {
                Ok(reloads(&agent, "rejected").await? > rejected)
            })
            .await?;
            eventually(Duration::from_secs(5), &format!("{what}: WARN logged"), || {
                let fresh = agent.logs().get(log_len..).unwrap_or_default().to_owned();
                async move { Ok(fresh.lines().any(|l| l.contains("WARN"))) }
            })
            .await?;
            assert_eq!(reloads(&agent, "applied").await?, applied, "{what}: nothing applied");
            assert_eq!(config_serial(&agent).await?, serial, "{what}: old identity kept");
            for i in 0..10 {
                let resp = proxy_get(agent.outbound(), &format!("http://tool:8080/after/{i}"), &[]).await?;
                assert_eq!(resp.status, 200, "{what}: request {i}: {}", resp.text());
            }
        }
        Ok(())
    })
    .await;
}
