//! Delegation and approval through managed sidecars, in process, against the fake control plane:
//! an agent obtains a token from its sidecar's admin listener, presents it, and the tool's app sees
//! the verified subject, chain and grant (never the token); a tampered token is refused before
//! policy; an agent called on someone's behalf gets an exchanged token for its onward calls, and
//! the chain grows; a call the policy wants approved is refused with an approval id, refused again
//! while pending, allowed once approved (both sidecars record the approver), and refused once used;
//! a revoked grant's tokens are refused.

#[allow(dead_code)]
mod fake_cp;

use std::net::SocketAddr;

use bytes::Bytes;
use fake_cp::{FakeControlPlane, eventually, registry, spawn_sidecar};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mandate_wire::{Direction, StreamMessage, WorkloadStatus};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const A: &str = "spiffe://mandate.local/agent/a";
const B: &str = "spiffe://mandate.local/agent/b";
const TOOL: &str = "spiffe://mandate.local/service/tool";

const POLICY: &str = r#"package mandate.authz

decision := {"allow": false, "require_approval": true, "reason": "deleting needs a person"} if {
	input.request.path == "/approve-me"
} else := {"allow": true, "reason": sprintf("on behalf of %s", [input.delegation.subject])} if {
	input.delegation.subject
} else := {"allow": false, "reason": "only on someone's behalf"} if {
	input.request.path == "/delegated-only"
} else := {"allow": true, "reason": "on its own"}
"#;

/// An app answering with the `x-mandate-*` headers it received, as JSON.
async fn echo_app() -> SocketAddr {
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
                        let mut seen = serde_json::Map::new();
                        for (name, value) in req.headers() {
                            if name.as_str().starts_with("x-mandate-") {
                                seen.insert(
                                    name.as_str().to_owned(),
                                    json!(value.to_str().unwrap_or("?")),
                                );
                            }
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(Value::Object(seen).to_string()),
                        )))
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

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
}

impl Answer {
    /// The refusal's `reason`; panics (showing the body) when there is none.
    fn reason(&self) -> &str {
        self.body["reason"]
            .as_str()
            .unwrap_or_else(|| panic!("no reason in {}", self.body))
    }
}

/// An HTTP/1.1 request to `to` with `host`, headers and an optional JSON body.
async fn call(
    to: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let tcp = TcpStream::connect(to).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

/// A GET of `path` from `host` through `to`, presenting delegation token `token`.
async fn get_delegated(to: SocketAddr, host: &str, path: &str, token: &str) -> Answer {
    call(
        to,
        "GET",
        host,
        path,
        &[("x-mandate-delegation", token)],
        None,
    )
    .await
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_exchange_and_approval_through_managed_sidecars() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("mandate_proxy=debug")
        .try_init();
    let cp = FakeControlPlane::start().await;
    let tool_app = echo_app().await;
    let b_app = echo_app().await;
    let tool = spawn_sidecar(&cp, TOOL, &["--app".into(), tool_app.to_string()]);
    let b = spawn_sidecar(
        &cp,
        B,
        &[
            "--app".into(),
            b_app.to_string(),
            "--route".into(),
            format!("tool={},id={TOOL}", tool.inbound),
        ],
    );
    let a = spawn_sidecar(
        &cp,
        A,
        &[
            "--route".into(),
            format!("tool={},id={TOOL}", tool.inbound),
            "--route".into(),
            format!("b={},id={B}", b.inbound),
        ],
    );
    eventually("three sidecars streaming", async || cp.streams() == 3).await;
    cp.push(&StreamMessage::Update {
        bundle: Some(cp.bundle(1, POLICY, "{}")),
        registry: Some(registry(&[
            ("agent", "a", WorkloadStatus::Active),
            ("agent", "b", WorkloadStatus::Active),
            ("service", "tool", WorkloadStatus::Active),
        ])),
        trust_bundle: Some(cp.state.ca.cert_pem().to_owned()),
        delegation: Some(cp.delegation_state(1, &[])),
    });
    eventually("a's own call allowed", async || {
        call(a.outbound, "GET", "tool", "/x", &[], None)
            .await
            .status
            == 200
    })
    .await;

    // On its own, the agent may not call what needs someone's behalf.
    let own = call(a.outbound, "GET", "tool", "/delegated-only", &[], None).await;
    assert_eq!(own.status, 403, "{}", own.body);
    assert_eq!(own.body["reason"], "only on someone's behalf");

    // The agent obtains its token from its sidecar's admin listener.
    cp.grant("g1", A, "alice@example.com");
    let issued = call(
        a.admin,
        "POST",
        "admin",
        "/delegation/token",
        &[],
        Some(json!({"grant_id": "g1"})),
    )
    .await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    let token = issued.body["token"].as_str().unwrap().to_owned();
    let refused = call(
        a.admin,
        "POST",
        "admin",
        "/delegation/token",
        &[],
        Some(json!({"grant_id": "nope"})),
    )
    .await;
    assert_eq!(refused.status, 404, "{}", refused.body);
    assert_eq!(refused.body["reason"], "no such grant");

    // Delegated: allowed, and the tool's app sees the verified subject, chain and grant, not the
    // token; whatever the agent claims itself is stripped.
    let delegated = call(
        a.outbound,
        "GET",
        "tool",
        "/delegated-only",
        &[
            ("x-mandate-delegation", &token),
            ("x-mandate-on-behalf-of", "mallory@example.com"),
        ],
        None,
    )
    .await;
    assert_eq!(delegated.status, 200, "{}", delegated.body);
    assert_eq!(
        delegated.body,
        json!({
            "x-mandate-on-behalf-of": "alice@example.com",
            "x-mandate-delegation-chain": A,
            "x-mandate-grant": "g1",
            "x-mandate-peer": A,
            "x-mandate-decision-id": delegated.body["x-mandate-decision-id"],
        })
    );

    // A tampered token is refused before policy, naming the check.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let bad = get_delegated(a.outbound, "tool", "/x", &tampered).await;
    assert_eq!(bad.status, 403, "{}", bad.body);
    assert_eq!(bad.body["error"], "delegation_refused");
    assert!(
        bad.reason().starts_with("delegation refused: "),
        "{}",
        bad.body
    );
    assert!(bad.body["decision_id"].is_string());
    assert!(bad.body["policy_version"].is_null());

    // An MCP call with a bad token gets a JSON-RPC error with its id.
    let rpc = call(
        a.outbound,
        "POST",
        "tool",
        "/mcp",
        &[("x-mandate-delegation", "not.a.token")],
        Some(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "search"}})),
    )
    .await;
    assert_eq!(rpc.body["id"], 7, "{}", rpc.body);
    assert!(
        rpc.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("delegation refused: "),
        "{}",
        rpc.body
    );

    // Agent b, called on alice's behalf, gets its own (exchanged) token; with it, its onward call
    // carries the chain a → b.
    let at_b = get_delegated(a.outbound, "b", "/work", &token).await;
    assert_eq!(at_b.status, 200, "{}", at_b.body);
    assert_eq!(at_b.body["x-mandate-delegation-chain"], A);
    let exchanged = at_b.body["x-mandate-delegation"]
        .as_str()
        .expect("b's app got a token")
        .to_owned();
    assert_ne!(exchanged, token);
    let onward = get_delegated(b.outbound, "tool", "/delegated-only", &exchanged).await;
    assert_eq!(onward.status, 200, "{}", onward.body);
    assert_eq!(
        onward.body["x-mandate-delegation-chain"],
        format!("{A},{B}")
    );
    assert_eq!(onward.body["x-mandate-on-behalf-of"], "alice@example.com");
    // The original token is a's, bound to a's certificate: useless in b's hands.
    let stolen = get_delegated(b.outbound, "tool", "/delegated-only", &token).await;
    assert_eq!(stolen.status, 403);
    assert!(
        stolen.reason().contains("bound to another certificate"),
        "{}",
        stolen.body
    );
    // The exchange is cached: a second call on the same token does not ask again.
    get_delegated(a.outbound, "b", "/work", &token).await;
    assert_eq!(cp.count("/v1/sidecar/delegation/exchange"), 1);

    // Approval: asked for, refused while pending, allowed once approved, refused once used.
    let with_token = [("x-mandate-delegation", token.as_str())];
    let asked = call(a.outbound, "POST", "tool", "/approve-me", &with_token, None).await;
    assert_eq!(asked.status, 403, "{}", asked.body);
    assert_eq!(asked.body["error"], "approval_required");
    let approval = asked.body["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(asked.headers["x-mandate-approval-id"], approval.as_str());
    assert!(
        asked.reason().contains("deleting needs a person"),
        "{}",
        asked.body
    );
    let stored = cp.state.approvals.lock().unwrap()[&approval].clone();
    assert_eq!(stored.request.subject.as_deref(), Some("alice@example.com"));
    assert_eq!(stored.request.grant_id.as_deref(), Some("g1"));
    assert_eq!(stored.request.fingerprint.len(), 64);

    let retry = [
        ("x-mandate-delegation", token.as_str()),
        ("x-mandate-approval", approval.as_str()),
    ];
    let pending = call(a.outbound, "POST", "tool", "/approve-me", &retry, None).await;
    assert_eq!(pending.status, 403);
    assert_eq!(pending.body["error"], "denied");
    assert!(
        pending.reason().ends_with("refused: pending"),
        "{}",
        pending.body
    );
    // Approved for this call, not another.
    cp.approve(&approval, "carol@example.com");
    let other = call(a.outbound, "POST", "tool", "/approve-me?x=1", &retry, None).await;
    assert_eq!(other.status, 403);
    assert!(
        other.reason().contains("does not match this call"),
        "{}",
        other.body
    );
    let approved = call(a.outbound, "POST", "tool", "/approve-me", &retry, None).await;
    assert_eq!(approved.status, 200, "{}", approved.body);
    let used = call(a.outbound, "POST", "tool", "/approve-me", &retry, None).await;
    assert_eq!(used.status, 403);
    assert!(used.reason().contains("already used"), "{}", used.body);
    let approved_id = approved.headers["x-mandate-decision-id"]
        .to_str()
        .unwrap()
        .to_owned();
    eventually("both sidecars recorded the approver", async || {
        let records = cp.decisions();
        let with_approval: Vec<_> = records
            .iter()
            .filter(|r| {
                r.approval
                    .as_ref()
                    .is_some_and(|a| a.id == approval && a.approved_by == "carol@example.com")
            })
            .collect();
        with_approval
            .iter()
            .any(|r| r.direction == Direction::Outbound && r.decision_id == approved_id && r.allow)
            && with_approval
                .iter()
                .any(|r| r.direction == Direction::Inbound && r.allow)
    })
    .await;
    let records = cp.decisions();
    let outbound = records
        .iter()
        .find(|r| r.decision_id == approved_id)
        .unwrap();
    assert_eq!(
        outbound.reason,
        format!("approved by carol@example.com (approval {approval})")
    );
    let delegation = outbound.delegation.as_ref().unwrap();
    assert_eq!(delegation.subject, "alice@example.com");
    assert_eq!(delegation.grant_id, "g1");
    assert_eq!(delegation.actors, vec![A.to_owned()]);

    // Revoking the grant refuses its tokens at once, cached or not.
    cp.push(&StreamMessage::Update {
        bundle: None,
        registry: None,
        trust_bundle: None,
        delegation: Some(cp.delegation_state(2, &["g1"])),
    });
    // Refused by the agent's own sidecar (the tool's may hear of the revocation first).
    eventually(
        "the agent's sidecar refuses the revoked grant's token",
        async || {
            call(a.outbound, "GET", "tool", "/x", &with_token, None).await;
            let metrics = call(a.admin, "GET", "admin", "/metrics", &[], None).await;
            metric(
                metrics.body.as_str().unwrap_or_default(),
                r#"mandate_delegation_verifications_total{direction="outbound",result="revoked"}"#,
            ) >= 1.0
        },
    )
    .await;
    let revoked = call(a.outbound, "GET", "tool", "/x", &with_token, None).await;
    assert_eq!(
        revoked.body["reason"],
        "delegation refused: grant g1 has been revoked or closed"
    );

    let metrics = call(a.admin, "GET", "admin", "/metrics", &[], None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        metric(
            text,
            r#"mandate_delegation_verifications_total{direction="outbound",result="ok"}"#
        ) >= 8.0,
        "{text}"
    );
    // Every call after the wait is refused here; calls during it may have been refused by the
    // tool's sidecar instead.
    assert!(
        metric(
            text,
            r#"mandate_delegation_verifications_total{direction="outbound",result="revoked"}"#
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(text, r#"mandate_approvals_total{result="requested"}"#),
        1.0
    );
    assert_eq!(
        metric(text, r#"mandate_approvals_total{result="redeemed"}"#),
        1.0
    );
    assert_eq!(
        metric(text, r#"mandate_approvals_total{result="refused"}"#),
        3.0
    );
    let metrics = call(b.admin, "GET", "admin", "/metrics", &[], None).await;
    let text = metrics.body.as_str().unwrap();
    assert_eq!(
        metric(text, r#"mandate_delegation_exchanges_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        metric(
            text,
            r#"mandate_delegation_exchanges_total{result="cached"}"#
        ),
        1.0
    );
}
