//! Managed mode against an in-process fake control plane: enrolment (and refusing an impostor
//! before the secret leaves), restart from the state directory, decision batches and their
//! resending, revoked certificates refused by both verifiers, and a managed sidecar pair that
//! serves with the issued SVIDs, enforces pushed bundles (refusing a badly signed one), and denies
//! its own calls once revoked.

// Shared with the other test files: what one does not use is not dead.
#[allow(dead_code)]
mod fake_cp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fake_cp::{FakeControlPlane, eventually, registry, sign_bundle, spawn_sidecar, td};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mandate_identity::ca::CertificateAuthority;
use mandate_proxy::config::ControlPlaneUrl;
use mandate_proxy::identity::IdentityStore;
use mandate_proxy::metrics::Metrics;
use mandate_proxy::revocation::Revocations;
use mandate_proxy::sync::client::{ClientError, ControlPlaneClient};
use mandate_proxy::sync::report::DecisionQueue;
use mandate_proxy::sync::state::StateDir;
use mandate_proxy::sync::svid::{SvidError, obtain};
use mandate_proxy::sync::{ControlPlane, Timing};
use mandate_proxy::tls;
use mandate_wire::{
    DecisionRecord, DestinationRecord, Direction, Registry, StreamMessage, WorkloadStatus,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const AGENT: &str = "spiffe://mandate.local/agent/a";
const TOOL: &str = "spiffe://mandate.local/service/tool";

fn fast() -> Timing {
    Timing {
        stream_idle: Duration::from_secs(5),
        reconnect: (Duration::from_millis(20), Duration::from_millis(200)),
        enrol_retry: (Duration::from_millis(20), Duration::from_millis(200)),
        renew_retry: (Duration::from_millis(20), Duration::from_millis(200)),
        upload_retry: (Duration::from_millis(20), Duration::from_millis(100)),
        batch_max: 500,
        batch_wait: Duration::from_millis(20),
    }
}

fn client(cp: &FakeControlPlane) -> ControlPlaneClient {
    ControlPlaneClient::new(ControlPlaneUrl::parse(&cp.url()).unwrap(), td()).unwrap()
}

async fn enrol(
    cp: &FakeControlPlane,
    id: &str,
    state: Option<&StateDir>,
) -> Result<(Arc<IdentityStore>, bool), SvidError> {
    let token = cp.token(id);
    obtain(
        &client(cp),
        Some(&token),
        state,
        &td(),
        Arc::new(Metrics::new()),
        Arc::new(Revocations::new()),
        &fast(),
    )
    .await
}

#[tokio::test]
async fn enrolment_issues_an_svid_for_the_token_identity_chained_to_the_pinned_ca() {
    let cp = FakeControlPlane::start().await;
    let (identity, renew_now) = enrol(&cp, AGENT, None).await.unwrap();
    assert!(!renew_now);
    let current = identity.current();
    assert_eq!(current.svid.id.as_str(), AGENT);
    assert_eq!(current.bundle_pem(), cp.state.ca.cert_pem());
    assert!(identity.is_valid_now());
    assert_eq!(cp.count("/v1/sidecar/enroll"), 1);
}

#[tokio::test]
async fn a_token_whose_pin_does_not_match_the_server_ca_is_refused_before_the_secret_is_sent() {
    let cp = FakeControlPlane::start().await;
    let impostor_ca = CertificateAuthority::generate(td(), Duration::from_secs(3600)).unwrap();
    // A genuine token — but pinning another CA than the one this server presents.
    let token = mandate_wire::JoinToken::generate(AGENT, &fake_cp::ca_der(&impostor_ca));
    let err = obtain(
        &client(&cp),
        Some(&token),
        None,
        &td(),
        Arc::new(Metrics::new()),
        Arc::new(Revocations::new()),
        &fast(),
    )
    .await
    .err()
    .expect("refused");
    assert!(
        matches!(err, SvidError::Client(ClientError::PinMismatch(_))),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was sent"), "{err}");
    assert!(
        cp.state.requests.lock().unwrap().is_empty(),
        "no request reached the server"
    );
}

#[tokio::test]
async fn a_used_token_says_a_restart_needs_a_fresh_one_and_the_state_dir_avoids_that() {
    let cp = FakeControlPlane::start().await;
    let token = cp.token(AGENT);
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let attempt = |state: Option<StateDir>| {
        let (client, token) = (client(&cp), token.clone());
        async move {
            obtain(
                &client,
                Some(&token),
                state.as_ref(),
                &td(),
                Arc::new(Metrics::new()),
                Arc::new(Revocations::new()),
                &fast(),
            )
            .await
        }
    };
    let (first, renew_now) = attempt(Some(state.clone())).await.unwrap();
    assert!(!renew_now);

    // Without a state directory the used token is all there is.
    let err = attempt(None).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.starts_with("--join-token"), "{text}");
    assert!(text.contains("already used"), "{text}");
    assert!(text.contains("--state-dir"), "{text}");

    // With it, the restart reuses the stored identity and renews it at once.
    let (restored, renew_now) = attempt(Some(state)).await.unwrap();
    assert!(renew_now);
    assert_eq!(restored.current().svid.serial, first.current().svid.serial);
    assert_eq!(cp.count("/v1/sidecar/enroll"), 2, "no third enrolment");
}

#[tokio::test]
async fn renewal_installs_a_new_svid_authenticated_by_the_current_one() {
    let cp = FakeControlPlane::start().await;
    let (identity, _) = enrol(&cp, AGENT, None).await.unwrap();
    let before = identity.current().svid.serial.clone();
    let control = ControlPlane {
        client: client(&cp),
        identity: identity.clone(),
        metrics: Arc::new(Metrics::new()),
        state: None,
        timing: fast(),
    };
    mandate_proxy::sync::svid::renew(&control).await.unwrap();
    assert_ne!(identity.current().svid.serial, before);
    assert_eq!(identity.current().svid.id.as_str(), AGENT);
}

fn record(id: usize) -> DecisionRecord {
    DecisionRecord {
        decision_id: format!("d-{id}"),
        timestamp: "2026-01-01T00:00:00Z".into(),
        direction: Direction::Outbound,
        source: AGENT.into(),
        destination: DestinationRecord {
            host: "tool".into(),
            port: 80,
            spiffe_id: Some(TOOL.into()),
        },
        method: Some("GET".into()),
        path: Some("/".into()),
        mcp: None,
        delegation: None,
        approval: None,
        allow: true,
        enforced: true,
        reason: "ok".into(),
        policy_version: Some("1".into()),
        eval_us: 1,
        trace_id: None,
        sidecar: "test".into(),
        status: Some(200),
    }
}

#[tokio::test]
async fn decision_batches_arrive_and_are_resent_after_a_failure() {
    let cp = FakeControlPlane::start().await;
    let (identity, _) = enrol(&cp, AGENT, None).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let control = Arc::new(ControlPlane {
        client: client(&cp),
        identity,
        metrics: metrics.clone(),
        state: None,
        timing: Timing {
            batch_max: 4,
            ..fast()
        },
    });
    let queue = DecisionQueue::start(control);
    cp.state
        .fail_decisions
        .store(2, std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        queue.record(record(i));
    }
    assert!(queue.flush(Duration::from_secs(10)).await, "flushed");
    let ids: Vec<String> = cp.decisions().into_iter().map(|r| r.decision_id).collect();
    assert_eq!(ids, (0..10).map(|i| format!("d-{i}")).collect::<Vec<_>>());
    // 10 records in batches of at most 4 is 3 batches, plus the 2 refused attempts.
    let posts = cp
        .state
        .decision_posts
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(posts >= 5, "{posts} POSTs");
    assert_eq!(metrics.decisions_sent.get(), 10);
    assert_eq!(metrics.decisions_dropped.get(), 0);
}

/// Handshakes `client` (presenting its SVID) with a server presenting `server`'s; returns the
/// failure reason label of each side.
async fn handshake(
    server: &IdentityStore,
    client: &IdentityStore,
) -> (Option<&'static str>, Option<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.current().server.clone());
    let accept = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                // Say so, so the client's read below ends cleanly.
                let _ = tls.write_all(b"k").await;
                let _ = tls.shutdown().await;
                None
            }
            Err(e) => Some(tls::failure_reason(&e)),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(client.current().client_http1.clone());
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let client_side = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            // TLS 1.3: the server judges the client certificate after the client finished.
            use tokio::io::AsyncReadExt;
            let mut byte = [0u8; 1];
            match tls.read(&mut byte).await {
                Err(e) => Some(tls::failure_reason(&e)).filter(|r| *r != "io"),
                Ok(_) => None,
            }
        }
        Err(e) => Some(tls::failure_reason(&e)),
    };
    (accept.await.unwrap(), client_side)
}

#[tokio::test]
async fn a_registry_update_marking_a_peer_revoked_makes_both_verifiers_refuse_it() {
    let cp = FakeControlPlane::start().await;
    let (agent, _) = enrol(&cp, AGENT, None).await.unwrap();
    let (tool, _) = enrol(&cp, TOOL, None).await.unwrap();
    assert_eq!(handshake(&tool, &agent).await, (None, None), "both active");

    let revoked = registry(&[
        ("agent", "a", WorkloadStatus::Revoked),
        ("service", "tool", WorkloadStatus::Active),
    ]);
    // The tool's sidecar learns the agent is revoked: its inbound verifier refuses the agent.
    tool.apply_registry(&revoked);
    let (server_side, _) = handshake(&tool, &agent).await;
    assert_eq!(server_side, Some("revoked"));

    // The agent's sidecar learns a service it calls is suspended: its outbound verifier refuses it.
    let suspended = registry(&[("service", "tool", WorkloadStatus::Suspended)]);
    agent.apply_registry(&suspended);
    tool.apply_registry(&Registry::default());
    let (_, client_side) = handshake(&tool, &agent).await;
    assert_eq!(client_side, Some("revoked"));
}

// ---- A managed sidecar pair, end to end in process ----

const POLICY: &str = r#"package mandate.authz

default decision := {"allow": false, "reason": "caller is not active in the registry"}

decision := {"allow": true, "reason": "active caller"} if {
	input.registry.status == "active"
}
"#;

const DENY_ALL: &str = r#"package mandate.authz

decision := {"allow": false, "reason": "everything is denied"}
"#;

/// A plain HTTP GET of `path` with `host` sent to `to` (an outbound or admin listener). A
/// connection closed on us (as revocation does) is status 0.
async fn get(to: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let attempt = async {
        let tcp = TcpStream::connect(to).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    attempt.await.unwrap_or_else(|e| (0, e.to_string()))
}

async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let peer = req
                            .headers()
                            .get("x-mandate-peer")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(format!("hello {peer}"))),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_pair_enrols_serves_enforces_pushed_bundles_reports_and_obeys_revocation() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mandate_proxy=debug")
        .try_init();
    let cp = FakeControlPlane::start().await;
    let app = app().await;
    let tool = spawn_sidecar(&cp, TOOL, &["--app".into(), app.to_string()]);
    let agent = spawn_sidecar(
        &cp,
        AGENT,
        &["--route".into(), format!("tool={},id={TOOL}", tool.inbound)],
    );
    eventually("both sidecars enrolled and streaming", async || {
        cp.streams() == 2
    })
    .await;

    // Enrolled, no bundle yet: every call denied, not ready.
    let (status, body) = get(agent.outbound, "tool", "/x").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("no policy from the control plane yet"),
        "{body}"
    );
    let (ready, why) = get(agent.admin, "admin", "/readyz").await;
    assert_eq!(ready, 503);
    assert!(
        why.contains("no policy from the control plane yet"),
        "{why}"
    );

    // Trust bundle, registry and bundle 1 in one update.
    let active = registry(&[
        ("agent", "a", WorkloadStatus::Active),
        ("service", "tool", WorkloadStatus::Active),
    ]);
    cp.push(&StreamMessage::Update {
        bundle: Some(cp.bundle(1, POLICY, "{}")),
        registry: Some(active.clone()),
        trust_bundle: Some(cp.state.ca.cert_pem().to_owned()),
        delegation: None,
    });
    eventually("the agent's call allowed by bundle 1", async || {
        get(agent.outbound, "tool", "/x").await.0 == 200
    })
    .await;
    let (_, body) = get(agent.outbound, "tool", "/x").await;
    assert_eq!(
        body,
        format!("hello {AGENT}"),
        "the tool saw the agent's issued SVID"
    );
    assert_eq!(get(agent.admin, "admin", "/readyz").await.0, 200);

    // A deny-all bundle signed by another CA is refused: bundle 1 stays in force.
    let stranger = CertificateAuthority::generate(td(), Duration::from_secs(3600)).unwrap();
    cp.push(&StreamMessage::Update {
        bundle: Some(sign_bundle(&stranger, 2, DENY_ALL, "{}")),
        registry: None,
        trust_bundle: None,
        delegation: None,
    });
    eventually("the bad bundle counted as rejected", async || {
        let (_, metrics) = get(agent.admin, "admin", "/metrics").await;
        metric(&metrics, "mandate_policy_bundle_rejects_total") == 1.0
    })
    .await;
    assert_eq!(
        get(agent.outbound, "tool", "/x").await.0,
        200,
        "bundle 1 still decides"
    );
    let (_, metrics) = get(agent.admin, "admin", "/metrics").await;
    assert!(
        metrics.contains(r#"mandate_policy_info{engine="#) && metrics.contains(r#"version="1""#),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "mandate_control_plane_connected"), 1.0);

    // Decisions of both sidecars reach the control plane, with the bundle version.
    eventually("decision records delivered", async || {
        let records = cp.decisions();
        records
            .iter()
            .any(|r| r.direction == Direction::Outbound && r.allow)
            && records
                .iter()
                .any(|r| r.direction == Direction::Inbound && r.allow)
    })
    .await;
    assert!(
        cp.decisions()
            .iter()
            .filter(|r| r.allow)
            .all(|r| r.policy_version.as_deref() == Some("1"))
    );

    // The agent is revoked: its own sidecar denies its calls before policy, naming why.
    let mut revoked = active.clone();
    revoked.revision = 2;
    revoked.agents.get_mut("a").unwrap().status = WorkloadStatus::Revoked;
    cp.push(&StreamMessage::Update {
        bundle: None,
        registry: Some(revoked),
        trust_bundle: None,
        delegation: None,
    });
    eventually("the revoked agent's call denied", async || {
        get(agent.outbound, "tool", "/x").await.0 == 403
    })
    .await;
    let (_, body) = get(agent.outbound, "tool", "/x").await;
    assert!(body.contains(&format!("{AGENT} is revoked")), "{body}");
}
