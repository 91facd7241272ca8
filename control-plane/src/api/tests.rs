//! The API in process, on a real SQLite store: authentication, validation, the sidecar flows and
//! the OpenAPI document's agreement with the router.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use mandate_identity::csr;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use super::*;
use crate::ca::StoreKey;
use crate::store::StoreLocation;

pub(super) const TOKEN: &str = "test-admin-token-0123456789";

pub(super) struct Fixture {
    pub(super) router: Router,
    pub(super) state: AppState,
    _dir: tempfile::TempDir,
}

pub(super) async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreLocation::Sqlite(dir.path().join("m.db")))
        .await
        .unwrap();
    let td: TrustDomain = "mandate.local".parse().unwrap();
    let store_key = StoreKey::generate().unwrap();
    let ca = Arc::new(
        crate::ca::load_or_create(&store, &store_key, &td)
            .await
            .unwrap(),
    );
    let ca_der = crate::ca::ca_der(&ca).unwrap();
    let delegation = crate::delegation::Delegation::start(
        store.clone(),
        store_key,
        td.clone(),
        crate::delegation::DelegationConfig::default(),
    )
    .await
    .unwrap();
    let hub = Hub::new(
        Hub::load(&store, ca.cert_pem().to_owned(), delegation.config().keys)
            .await
            .unwrap(),
        CancellationToken::new(),
    );
    tokio::spawn(hub.clone().follow(store.clone()));
    let state = AppState {
        store: store.clone(),
        ca: ca.clone(),
        trust_domain: td.clone(),
        admin_token: Arc::new(AdminToken::new(TOKEN, "test").unwrap()),
        registrar: Registrar::new(store.clone(), td, ca_der.clone(), Duration::from_secs(60)),
        enroller: Enroller::new(store, ca, ca_der, Duration::from_secs(600)),
        hub,
        delegation,
        approval_ttl: Duration::from_secs(600),
    };
    Fixture {
        router: router(state.clone()),
        state,
        _dir: dir,
    }
}

/// How a test request authenticates.
pub(super) enum As {
    Admin,
    Anonymous,
    Token(&'static str),
    Peer(&'static str),
}

impl Fixture {
    pub(super) async fn call(
        &self,
        method: &str,
        uri: &str,
        who: As,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        match who {
            As::Admin => req = req.header("authorization", format!("Bearer {TOKEN}")),
            As::Token(t) => req = req.header("authorization", t),
            As::Anonymous | As::Peer(_) => {}
        }
        let mut req = req
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        if let As::Peer(id) = who {
            req.extensions_mut()
                .insert(extract::PeerIdentity(id.parse().unwrap()));
        }
        let resp = self.router.clone().call(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    pub(super) async fn register(&self, name: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/v1/agents",
                As::Admin,
                Some(json!({"name": name, "owner": "alice", "ceiling": [{"host": "tool"}]})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["join_token"].as_str().unwrap().to_owned()
    }
}

fn csr_for(id: &str) -> String {
    csr::request(&id.parse().unwrap()).unwrap().csr_pem
}

pub(super) const AGENT: &str = "spiffe://mandate.local/agent/research";

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let f = fixture().await;
    for who in [
        As::Anonymous,
        As::Token("Bearer wrong-token-000000000"),
        As::Token(TOKEN),
        As::Peer(AGENT),
    ] {
        let (status, body) = f.call("GET", "/v1/agents", who, None).await;
        assert_eq!(status, 401);
        assert!(body["error"].as_str().unwrap().contains("admin"), "{body}");
    }
    let (status, _) = f
        .call(
            "GET",
            "/v1/agents",
            As::Token("bearer test-admin-token-0123456789"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    // Authentication comes before the body is even looked at.
    let (status, _) = f
        .call("POST", "/v1/policies", As::Anonymous, Some(json!({"x": 1})))
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn registration_validates_and_names_the_field() {
    let f = fixture().await;
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(json!({"name": "research", "owner": "a", "colour": "red"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "colour");
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(json!({"name": "research"})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("owner"))
    );
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(json!({"name": "Research", "owner": "a"})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("name"))
    );
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(json!({"name": "r", "owner": "a", "ceiling": [{"tool": 1}]})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("ceiling[0].tool"))
    );

    let token = f.register("research").await;
    assert!(token.starts_with("mjt1."));
    let (status, _) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(json!({"name": "research", "owner": "b"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = f.call("GET", "/v1/agents/research", As::Admin, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["spiffe_id"], AGENT);
    assert_eq!(body["status"], "active");
    let (status, _) = f.call("GET", "/v1/agents/nobody", As::Admin, None).await;
    assert_eq!(status, 404);
    let (status, _) = f
        .call("GET", "/v1/services/research", As::Admin, None)
        .await;
    assert_eq!(status, 404);
    let (status, body) = f.call("GET", "/v1/agents", As::Admin, None).await;
    assert_eq!(
        (status.as_u16(), body["workloads"].as_array().unwrap().len()),
        (200, 1)
    );
}

#[tokio::test]
async fn autonomous_scopes_are_checked_like_the_ceiling_stored_and_shown() {
    let f = fixture().await;
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(
                json!({"name": "r", "owner": "a", "ceiling": [{"host": "tool"}],
                        "autonomous": [{"host": "tool"}, {"port": 70000}]}),
            ),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("autonomous[1].port"))
    );
    let scopes = json!([{"host": "tool", "tool": "search"}]);
    let (status, body) = f
        .call(
            "POST",
            "/v1/agents",
            As::Admin,
            Some(
                json!({"name": "r", "owner": "a", "ceiling": [{"host": "tool"}],
                        "autonomous": scopes}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["workload"]["autonomous"], scopes);
    let (_, body) = f.call("GET", "/v1/agents/r", As::Admin, None).await;
    assert_eq!(body["autonomous"], scopes);
    f.register("plain").await;
    let (_, body) = f.call("GET", "/v1/agents", As::Admin, None).await;
    let autonomous: Vec<&Value> = body["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| &w["autonomous"])
        .collect();
    assert_eq!(autonomous, [&json!([]), &scopes], "plain, then r");
}

#[tokio::test]
async fn enrolment_redeems_a_token_once_for_its_own_identity() {
    let f = fixture().await;
    let token = f.register("research").await;
    f.register("other").await;

    // A CSR for another identity is refused, and does not use the token up.
    let (status, body) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(
                json!({"join_token": token, "csr": csr_for("spiffe://mandate.local/agent/other")}),
            ),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("join token was issued for"),
        "{body}"
    );

    let (status, body) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(json!({"join_token": token, "csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spiffe_id"], AGENT);
    assert!(
        body["certificate"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert_eq!(body["trust_bundle"], f.state.ca.cert_pem());

    let (status, body) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(json!({"join_token": token, "csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already been used"),
        "{body}"
    );

    let (status, body) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(json!({"join_token": "nonsense", "csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("join_token"))
    );
}

#[tokio::test]
async fn a_suspended_workload_can_neither_enrol_nor_renew_nor_stream() {
    let f = fixture().await;
    let token = f.register("research").await;
    let (status, body) = f
        .call("POST", "/v1/agents/research/suspend", As::Admin, None)
        .await;
    assert_eq!(
        (status.as_u16(), body["status"].as_str()),
        (200, Some("suspended"))
    );
    let (status, body) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(json!({"join_token": token, "csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("suspended"),
        "{body}"
    );
    let (status, _) = f
        .call(
            "POST",
            RENEW_PATH,
            As::Peer(AGENT),
            Some(json!({"csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = f.call("GET", STREAM_PATH, As::Peer(AGENT), None).await;
    assert_eq!(status, 403);

    let (status, _) = f
        .call("POST", "/v1/agents/research/activate", As::Admin, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = f
        .call(
            "POST",
            ENROLL_PATH,
            As::Anonymous,
            Some(json!({"join_token": token, "csr": csr_for(AGENT)})),
        )
        .await;
    assert_eq!(status, 200, "the token was not used up while suspended");

    let (status, _) = f
        .call("POST", "/v1/agents/research/revoke", As::Admin, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = f
        .call("POST", "/v1/agents/research/activate", As::Admin, None)
        .await;
    assert_eq!(status, 409, "revoked is terminal");
    let (status, _) = f
        .call("POST", "/v1/agents/research/join-tokens", As::Admin, None)
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn renewal_needs_the_client_certificate_of_the_same_identity() {
    let f = fixture().await;
    f.register("research").await;
    f.register("other").await;
    let body = json!({"csr": csr_for(AGENT)});
    let (status, _) = f
        .call("POST", RENEW_PATH, As::Anonymous, Some(body.clone()))
        .await;
    assert_eq!(status, 401);
    let (status, err) = f
        .call(
            "POST",
            RENEW_PATH,
            As::Peer("spiffe://mandate.local/agent/other"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("client certificate is"),
        "{err}"
    );
    let (status, issued) = f
        .call("POST", RENEW_PATH, As::Peer(AGENT), Some(body))
        .await;
    assert_eq!(status, 200, "{issued}");
    assert!(issued["expires_at"].as_i64().unwrap() > 0);
}

fn decision(id: &str, allow: bool) -> Value {
    json!({"decision_id": id, "timestamp": "2026-01-01T00:00:00.000001Z", "direction": "outbound",
           "source": AGENT, "destination": {"host": "tool", "port": 8080}, "method": "GET", "path": "/x",
           "allow": allow, "enforced": true, "reason": "r", "eval_us": 5, "sidecar": "s"})
}

#[tokio::test]
async fn decisions_are_ingested_once_and_queried_by_agent_and_result() {
    let f = fixture().await;
    f.register("research").await;
    let batch = json!({"decisions": [decision("d1", true), decision("d2", false)]});
    let (status, _) = f
        .call("POST", DECISIONS_PATH, As::Anonymous, Some(batch.clone()))
        .await;
    assert_eq!(status, 401);
    let (status, result) = f
        .call("POST", DECISIONS_PATH, As::Peer(AGENT), Some(batch.clone()))
        .await;
    assert_eq!(
        (status.as_u16(), result),
        (200, json!({"accepted": 2, "duplicates": 0}))
    );
    let (_, result) = f
        .call("POST", DECISIONS_PATH, As::Peer(AGENT), Some(batch))
        .await;
    assert_eq!(result, json!({"accepted": 0, "duplicates": 2}));

    let mut bad = decision("d3", true);
    bad["timestamp"] = json!("yesterday");
    let (status, err) = f
        .call(
            "POST",
            DECISIONS_PATH,
            As::Peer(AGENT),
            Some(json!({"decisions": [decision("d4", true), bad]})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), err["field"].as_str()),
        (400, Some("decisions[1].timestamp"))
    );

    // A revoked workload's sidecar still reports: the denials after revocation are audit data.
    f.call("POST", "/v1/agents/research/revoke", As::Admin, None)
        .await;
    let late = json!({"decisions": [decision("d5", false)]});
    let (status, result) = f
        .call("POST", DECISIONS_PATH, As::Peer(AGENT), Some(late))
        .await;
    assert_eq!(
        (status.as_u16(), result["accepted"].as_u64()),
        (200, Some(1))
    );

    let (_, all) = f
        .call("GET", "/v1/decisions?agent=research", As::Admin, None)
        .await;
    assert_eq!(all["decisions"].as_array().unwrap().len(), 3, "{all}");
    let (_, denied) = f
        .call(
            "GET",
            &format!(
                "/v1/decisions?agent={}&result=deny",
                AGENT.replace(':', "%3A").replace('/', "%2F")
            ),
            As::Admin,
            None,
        )
        .await;
    let ids: Vec<&str> = denied["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["decision_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["d5", "d2"],
        "denials only, newest first (same time: by id)"
    );
    let (_, none) = f
        .call(
            "GET",
            "/v1/decisions?since=2026-01-02T00:00:00%2B01:00",
            As::Admin,
            None,
        )
        .await;
    assert_eq!(none["decisions"], json!([]));
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=x", "limit"),
        ("since=today", "since"),
        ("result=maybe", "result"),
        ("agent=Bad_Name", "agent"),
        ("colour=red", "colour"),
    ] {
        let (status, err) = f
            .call("GET", &format!("/v1/decisions?{query}"), As::Admin, None)
            .await;
        assert_eq!(
            (status.as_u16(), err["field"].as_str()),
            (400, Some(field)),
            "{query}: {err}"
        );
    }
}

const POLICY: &str = "package mandate.authz\n\ndefault allow := false\n\nallow if input.ok\n";

#[tokio::test]
async fn bundles_are_refused_with_messages_or_signed_activated_and_rolled_back() {
    let f = fixture().await;
    let (status, err) = f
        .call(
            "POST",
            "/v1/policies",
            As::Admin,
            Some(json!({"modules": {"authz.rego": "package mandate.authz\n\ndecision := {\n"}})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(err["messages"].to_string().contains("authz.rego"), "{err}");
    let failing = format!("{POLICY}\ntest_nope if {{\n\tfalse\n}}\n");
    let (status, err) = f
        .call(
            "POST",
            "/v1/policies",
            As::Admin,
            Some(json!({"modules": {"authz.rego": failing}})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        err["messages"],
        json!(["FAIL data.mandate.authz.test_nope"])
    );
    let (_, list) = f.call("GET", "/v1/policies", As::Admin, None).await;
    assert_eq!(
        list,
        json!({"active": null, "bundles": []}),
        "nothing stored"
    );

    for (n, prefix) in [(1, "a"), (2, "b")] {
        let (status, summary) = f
            .call("POST", "/v1/policies", As::Admin, Some(json!({"modules": {"authz.rego": POLICY}, "data": {"prefix": prefix}, "message": "m"})))
            .await;
        assert_eq!(status, 201, "{summary}");
        assert_eq!(summary["version"], n);
        assert_eq!(summary["active"], true);
    }
    let active = f.state.store.active_bundle().await.unwrap().unwrap();
    assert_eq!(active.version, 2);
    active.verify(f.state.ca.cert_pem()).unwrap();

    let (status, summary) = f
        .call("POST", "/v1/policies/1/activate", As::Admin, None)
        .await;
    assert_eq!(
        (status.as_u16(), summary["version"].as_u64()),
        (200, Some(1))
    );
    let (_, list) = f.call("GET", "/v1/policies", As::Admin, None).await;
    assert_eq!(list["active"], 1);
    let (status, _) = f
        .call("POST", "/v1/policies/9/activate", As::Admin, None)
        .await;
    assert_eq!(status, 404);
    let (status, err) = f
        .call("POST", "/v1/policies/zero/activate", As::Admin, None)
        .await;
    assert_eq!(
        (status.as_u16(), err["field"].as_str()),
        (400, Some("version"))
    );
}

#[tokio::test]
async fn the_stream_starts_with_an_update_and_follows_changes() {
    let f = fixture().await;
    f.register("research").await;
    let req = Request::builder()
        .uri(STREAM_PATH)
        .body(Body::empty())
        .map(|mut r| {
            r.extensions_mut()
                .insert(extract::PeerIdentity(AGENT.parse().unwrap()));
            r
        })
        .unwrap();
    let resp = f.router.clone().call(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], NDJSON);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(first["type"], "update");
    assert!(first["trust_bundle"].is_string());
    assert_eq!(first["registry"]["agents"]["research"]["spiffe_id"], AGENT);

    f.call(
        "POST",
        "/v1/policies",
        As::Admin,
        Some(json!({"modules": {"authz.rego": POLICY}})),
    )
    .await;
    let next = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let next: Value = serde_json::from_slice(&next).unwrap();
    assert_eq!(next["bundle"]["version"], 1, "{next}");
    let (_, sidecars) = f.call("GET", "/v1/sidecars", As::Admin, None).await;
    assert_eq!(sidecars["sidecars"][0]["spiffe_id"], AGENT);

    f.call("POST", "/v1/agents/research/revoke", As::Admin, None)
        .await;
    let mut ended = false;
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
        {
            None => {
                ended = true;
                break;
            }
            Some(frame) => {
                let line = frame.unwrap().into_data().unwrap();
                let v: Value = serde_json::from_slice(&line).unwrap();
                assert_eq!(
                    v["registry"]["agents"]["research"]["status"], "revoked",
                    "{v}"
                );
            }
        }
    }
    assert!(ended, "the revoked workload's stream ends");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_api_errors() {
    let f = fixture().await;
    let (status, body) = f.call("GET", "/v2/nothing", As::Admin, None).await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, body) = f.call("DELETE", "/v1/agents", As::Admin, None).await;
    assert_eq!(status, 405);
    assert!(body["error"].is_string());
}

#[test]
fn every_route_is_in_the_openapi_document_and_vice_versa() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = routes()
        .table
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    assert_eq!(routed, documented);

    // Every operation declares the ApiError responses it can return, and every $ref resolves.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            // Public documents take no input and need no credentials.
            if path != "/openapi.json" && path != mandate_wire::JWKS_PATH {
                assert!(
                    responses.contains_key("400") || responses.contains_key("401"),
                    "{method} {path}"
                );
            }
            let admin = op.get("security").is_some_and(|s| s != &json!([]));
            if admin {
                assert!(responses.contains_key("401"), "{method} {path} lacks 401");
            }
            if op.get("requestBody").is_some() {
                assert!(responses.contains_key("413"), "{method} {path} lacks 413");
            }
        }
    }
    let text = OPENAPI.to_owned();
    for (i, _) in text.match_indices("#/components/schemas/") {
        let name: String = text[i + 21..].chars().take_while(|c| *c != '"').collect();
        assert!(schemas.contains_key(&name), "dangling $ref {name}");
    }
}
