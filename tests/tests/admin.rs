//! The admin listener: liveness, readiness, effective config without secrets, Prometheus metrics.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::pki::normalize_serial;
use mandate_e2e::{Sidecar, TestEnv};

const LIMIT: Duration = Duration::from_secs(60);

async fn check_endpoints(sidecar: &Sidecar) -> anyhow::Result<()> {
    let name = sidecar.name();
    let healthz = sidecar.admin_get("/healthz").await?;
    assert_eq!(healthz.status, 200, "{name} /healthz");
    assert_eq!(healthz.text().trim(), "ok", "{name} /healthz body");
    let readyz = sidecar.admin_get("/readyz").await?;
    assert_eq!(readyz.status, 200, "{name} /readyz: {}", readyz.text());

    let config = sidecar.admin_get("/config").await?;
    assert_eq!(config.status, 200, "{name} /config");
    assert!(
        config
            .header("content-type")
            .starts_with("application/json"),
        "{name} /config content-type {:?}",
        config.header("content-type")
    );
    let text = config.text();
    let json = config.json()?;
    assert_eq!(
        json.pointer("/identity/spiffe_id").and_then(|v| v.as_str()),
        Some(sidecar.id()),
        "{json}"
    );
    let serial = json
        .pointer("/identity/serial")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    assert_eq!(
        normalize_serial(serial),
        sidecar.svid().serial(),
        "{name} serial: {json}"
    );
    assert!(
        json.pointer("/identity/not_after").is_some(),
        "{name} not_after: {json}"
    );
    assert!(
        !text.contains("PRIVATE KEY"),
        "{name} /config shows a private key: {text}"
    );
    let material = sidecar.svid().key_material();
    for window in [&material[..32], &material[material.len() - 32..]] {
        assert!(
            !text.contains(window),
            "{name} /config shows key material: {text}"
        );
    }
    let logs = sidecar.logs();
    assert!(
        !logs.contains("PRIVATE KEY") && !logs.contains(&material[..32]),
        "{name} logs key material"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_config_and_metrics() {
    let env = TestEnv::new("admin");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = env.pair(app.addr(), "tool:8080").await?;
        let resp = proxy_get(agent.outbound(), "http://tool:8080/counted", &[]).await?;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let resp = proxy_get(agent.outbound(), "http://nowhere:80/", &[]).await?;
        assert_eq!(resp.status, 403, "{}", resp.text());

        check_endpoints(&agent).await?;
        check_endpoints(&tool).await?;

        let requests = "mandate_requests_total";
        let m = agent.metrics().await?;
        assert!(
            m.sum(requests, &[("direction", "outbound"), ("status", "200")]) >= 1.0,
            "{}",
            m.0
        );
        assert!(
            m.sum(requests, &[("direction", "outbound"), ("status", "403")]) >= 1.0,
            "{}",
            m.0
        );
        assert!(
            m.has("mandate_request_duration_seconds_count"),
            "duration histogram: {}",
            m.0
        );
        assert!(m.has("mandate_open_connections"), "{}", m.0);
        assert_eq!(
            m.sum("mandate_certificate_expiry_timestamp_seconds", &[]) as i64,
            agent.svid().not_after(),
            "{}",
            m.0
        );
        let m = tool.metrics().await?;
        assert!(
            m.sum(requests, &[("direction", "inbound"), ("status", "200")]) >= 1.0,
            "{}",
            m.0
        );
        Ok(())
    })
    .await;
}
