//! Grants, tasks, the JWKS and delegation tokens through the API (SQLite): what operators may
//! grant, how sidecars turn grants into tokens bound to their certificate, exchange them along a
//! chain of agents, and how revocation reaches the push snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use mandate_wire::delegation::{MAX_CHAIN, thumbprint, verify};
use mandate_wire::{
    DELEGATION_EXCHANGE_PATH, DELEGATION_TOKEN_PATH, DelegationClaims, Expectations, JWKS_PATH,
    Jwks, KeySet,
};
use serde_json::{Value, json};
use tower_service::Service as _;

use super::extract::{PeerCertificate, PeerIdentity};
use super::tests::{As, Fixture, fixture};
use crate::delegation::now_ms;

const TD: &str = "spiffe://mandate.local";
const ISSUER: &str = "spiffe://mandate.local/control-plane";
const RESEARCH: &str = "spiffe://mandate.local/agent/research";
const WRITER: &str = "spiffe://mandate.local/agent/writer";
/// Stand-ins for the DER of each agent's leaf certificate: tokens bind to their hash.
const RESEARCH_CERT: &[u8] = b"research leaf certificate";
const WRITER_CERT: &[u8] = b"writer leaf certificate";

const CEILING: &str = r#"[{"host": "tool", "tool": "read_*"}, {"host": "db", "method": "GET"}]"#;

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

impl Fixture {
    /// Registers agent `name` with `ceiling` (a JSON array).
    async fn agent(&self, name: &str, ceiling: &str) {
        let ceiling: Value = serde_json::from_str(ceiling).unwrap();
        let (status, body) = self
            .call(
                "POST",
                "/v1/agents",
                As::Admin,
                Some(json!({"name": name, "owner": "ops", "ceiling": ceiling})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Creates a grant from `body` (defaults filled in), asserting 201; the grant.
    async fn grant(&self, extra: Value) -> Value {
        let mut body = json!({
            "agent": "research",
            "subject": "alice@example.com",
            "scopes": [{"host": "tool", "tool": "read_file"}],
            "purpose": "summarise the quarterly report",
            "approved_by": "bob@example.com",
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, grant) = self.call("POST", "/v1/grants", As::Admin, Some(body)).await;
        assert_eq!(status, 201, "{grant}");
        grant
    }

    /// A sidecar call: the peer's SVID identity and its leaf certificate (DER).
    async fn presenting(
        &self,
        uri: &str,
        peer: Option<(&str, &[u8])>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        if let Some((id, cert)) = peer {
            req.extensions_mut()
                .insert(PeerIdentity(id.parse().unwrap()));
            req.extensions_mut()
                .insert(PeerCertificate(Arc::from(cert)));
        }
        let resp = self.router.clone().call(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A token for `grant` as agent `id` presenting `cert`.
    async fn token(&self, grant: &str, id: &str, cert: &[u8]) -> (StatusCode, Value) {
        self.presenting(
            DELEGATION_TOKEN_PATH,
            Some((id, cert)),
            json!({"grant_id": grant}),
        )
        .await
    }

    async fn exchange(&self, token: &str, id: &str, cert: &[u8]) -> (StatusCode, Value) {
        self.presenting(
            DELEGATION_EXCHANGE_PATH,
            Some((id, cert)),
            json!({"subject_token": token}),
        )
        .await
    }

    async fn jwks(&self) -> KeySet {
        let (status, body) = self.call("GET", JWKS_PATH, As::Anonymous, None).await;
        assert_eq!(status, 200, "{body}");
        let jwks: Jwks = serde_json::from_value(body).unwrap();
        KeySet::from_jwks(&jwks.keys).unwrap()
    }

    /// Verifies `token` as presented by `id` with `cert`, against the published keys.
    async fn verified(&self, token: &str, id: &str, cert: &[u8]) -> DelegationClaims {
        let keys = self.jwks().await;
        let thumb = thumbprint(cert);
        verify(
            token,
            &keys,
            &Expectations {
                issuer: ISSUER,
                audiences: &[TD],
                presenter_id: id,
                presenter_thumbprint: &thumb,
                now: now_ms() / 1000,
                leeway_secs: 0,
            },
        )
        .unwrap()
    }
}

impl Fixture {
    /// The ids `GET /v1/grants{query}` lists.
    async fn list_ids(&self, query: &str) -> Vec<String> {
        let (status, body) = self
            .call("GET", &format!("/v1/grants{query}"), As::Admin, None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn with_agents() -> Fixture {
    let f = fixture().await;
    f.agent("research", CEILING).await;
    f.agent("writer", r#"[{"host": "tool"}]"#).await;
    f
}

// --- Creating grants ------------------------------------------------------------------------

#[tokio::test]
async fn grant_creation_validates_and_names_the_field() {
    let f = with_agents().await;
    let base = json!({
        "agent": "research",
        "subject": "alice@example.com",
        "scopes": [{"host": "tool", "tool": "read_file"}],
        "purpose": "p",
        "approved_by": "bob",
    });
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        if v.is_null() {
            b.as_object_mut().unwrap().remove(k);
        } else {
            b[k] = v;
        }
        b
    };
    for (body, field) in [
        (with("subject", Value::Null), "subject"),
        (with("subject", json!("  ")), "subject"),
        (with("purpose", Value::Null), "purpose"),
        (with("approved_by", json!("")), "approved_by"),
        (with("scopes", json!([])), "scopes"),
        (with("scopes", json!({"host": "tool"})), "scopes"),
        (with("scopes", json!(["tool"])), "scopes[0]"),
        (
            with("scopes", json!([{"host": "tool", "tool": 3}])),
            "scopes[0].tool",
        ),
        (
            with("scopes", json!([{"tool": "read_["}])),
            "scopes[0].tool",
        ),
        (with("constraints", json!(["x"])), "constraints"),
        (
            with("constraints", json!({"arguments": 1})),
            "constraints.arguments",
        ),
        (with("ttl_seconds", json!(0)), "ttl_seconds"),
        (with("ttl_seconds", json!(86_401)), "ttl_seconds"),
        (with("task", json!("a/b")), "task"),
        (with("agent", json!("nobody")), "agent"),
        (with("agent", json!("Bad Name")), "agent"),
        (with("colour", json!("red")), "colour"),
    ] {
        let (status, err) = f
            .call("POST", "/v1/grants", As::Admin, Some(body.clone()))
            .await;
        assert_eq!(
            (status.as_u16(), err["field"].as_str()),
            (400, Some(field)),
            "{body} -> {err}"
        );
    }
}

#[tokio::test]
async fn a_scope_beyond_the_ceiling_is_refused_naming_the_excess() {
    let f = with_agents().await;
    let (status, err) = f
        .call(
            "POST",
            "/v1/grants",
            As::Admin,
            Some(json!({
                "agent": "research",
                "subject": "alice",
                "scopes": [{"host": "tool", "tool": "read_a"}, {"host": "tool", "tool": "delete_*"}],
                "purpose": "p",
                "approved_by": "bob",
            })),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["field"], "scopes[1]");
    assert_eq!(
        error(&err),
        "scopes[1]: \"tool\": \"delete_*\" is not within the ceiling \
         (closest: {\"host\":\"tool\",\"tool\":\"read_*\"}); it would allow \"tool\" \"delete_\""
    );
}

#[tokio::test]
async fn only_active_agents_receive_grants() {
    let f = with_agents().await;
    let (status, _) = f
        .call("POST", "/v1/agents/research/suspend", As::Admin, None)
        .await;
    assert_eq!(status, 200);
    let (status, err) = f
        .call(
            "POST",
            "/v1/grants",
            As::Admin,
            Some(
                json!({"agent": "research", "subject": "a", "purpose": "p", "approved_by": "b",
                "scopes": [{"host": "tool", "tool": "read_x"}]}),
            ),
        )
        .await;
    assert_eq!(
        (status.as_u16(), err["field"].as_str()),
        (400, Some("agent"))
    );
    assert!(error(&err).contains("suspended, not active"), "{err}");
}

#[tokio::test]
async fn a_grant_records_consent_and_expires_after_its_ttl() {
    let f = with_agents().await;
    let before = now_ms();
    let grant = f
        .grant(json!({
            "constraints": {"arguments": {"path": "/reports/*"}},
            "task": "Q3-report",
        }))
        .await;
    assert_eq!(grant["status"], "active");
    assert_eq!(grant["agent"], "research");
    assert_eq!(grant["agent_id"], RESEARCH);
    assert_eq!(grant["subject"], "alice@example.com");
    assert_eq!(grant["approved_by"], "bob@example.com");
    assert_eq!(grant["task"], "Q3-report");
    assert_eq!(grant["constraints"]["arguments"]["path"], "/reports/*");
    let id = grant["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    // The default lifetime is --grant-ttl (15 minutes).
    let expires = time::OffsetDateTime::parse(
        grant["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ttl_ms = (expires.unix_timestamp_nanos() / 1_000_000) as i64 - before;
    assert!(
        (15 * 60_000..15 * 60_000 + 5_000).contains(&ttl_ms),
        "{ttl_ms}"
    );

    let (status, shown) = f
        .call("GET", &format!("/v1/grants/{id}"), As::Admin, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown, grant);

    let short = f.grant(json!({"ttl_seconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (_, shown) = f
        .call(
            "GET",
            &format!("/v1/grants/{}", short["id"].as_str().unwrap()),
            As::Admin,
            None,
        )
        .await;
    assert_eq!(shown["status"], "expired");
}

#[tokio::test]
async fn grants_are_listed_newest_first_by_agent_subject_status_and_task() {
    let f = with_agents().await;
    let a = f.grant(json!({"task": "t1"})).await;
    let b = f
        .grant(json!({"agent": "writer", "subject": "carol", "scopes": [{"host": "tool"}], "task": "t1"}))
        .await;
    let c = f.grant(json!({"subject": "carol"})).await;
    let id = |g: &Value| g["id"].as_str().unwrap().to_owned();
    assert_eq!(f.list_ids("").await, vec![id(&c), id(&b), id(&a)]);
    assert_eq!(f.list_ids("?agent=research").await, vec![id(&c), id(&a)]);
    assert_eq!(f.list_ids("?subject=carol").await, vec![id(&c), id(&b)]);
    assert_eq!(f.list_ids("?task=t1").await, vec![id(&b), id(&a)]);
    assert_eq!(f.list_ids("?limit=1").await, vec![id(&c)]);
    f.call(
        "POST",
        &format!("/v1/grants/{}/revoke", id(&a)),
        As::Admin,
        None,
    )
    .await;
    assert_eq!(f.list_ids("?status=revoked").await, vec![id(&a)]);
    assert_eq!(f.list_ids("?status=active").await, vec![id(&c), id(&b)]);
    assert!(f.list_ids("?status=expired").await.is_empty());
    for (q, field) in [
        ("?status=gone", "status"),
        ("?limit=0", "limit"),
        ("?agent=Bad%20Name", "agent"),
        ("?owner=x", "owner"),
    ] {
        let (status, err) = f
            .call("GET", &format!("/v1/grants{q}"), As::Admin, None)
            .await;
        assert_eq!(
            (status.as_u16(), err["field"].as_str()),
            (400, Some(field)),
            "{q}"
        );
    }
}

#[tokio::test]
async fn grant_routes_need_the_admin_token() {
    let f = with_agents().await;
    let id = "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b";
    for (method, uri) in [
        ("POST", "/v1/grants".to_owned()),
        ("GET", "/v1/grants".to_owned()),
        ("GET", format!("/v1/grants/{id}")),
        ("POST", format!("/v1/grants/{id}/revoke")),
        ("POST", "/v1/tasks/t1/close".to_owned()),
    ] {
        for who in [As::Anonymous, As::Peer(RESEARCH)] {
            let (status, _) = f.call(method, &uri, who, None).await;
            assert_eq!(status, 401, "{method} {uri}");
        }
    }
}

// --- Revoking and closing -------------------------------------------------------------------------

#[tokio::test]
async fn revoking_is_final_and_idempotent() {
    let f = with_agents().await;
    let grant = f.grant(json!({})).await;
    let id = grant["id"].as_str().unwrap();
    let uri = format!("/v1/grants/{id}/revoke");
    let (status, revoked) = f
        .call(
            "POST",
            &uri,
            As::Admin,
            Some(json!({"revoked_by": "carol"})),
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["revoked_by"], "carol");
    assert!(revoked["revoked_at"].is_string());
    // Again: nothing changes (the first revoker stays on record).
    let (status, again) = f.call("POST", &uri, As::Admin, None).await;
    assert_eq!(status, 200);
    assert_eq!(again, revoked);

    let (status, err) = f
        .call("POST", "/v1/grants/nope/revoke", As::Admin, None)
        .await;
    assert_eq!((status.as_u16(), err["field"].as_str()), (400, Some("id")));
    let (status, err) = f
        .call(
            "POST",
            "/v1/grants/01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b/revoke",
            As::Admin,
            None,
        )
        .await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = f
        .call("POST", &uri, As::Admin, Some(json!({"revoked_by": 3})))
        .await;
    assert_eq!(
        (status.as_u16(), err["field"].as_str()),
        (400, Some("revoked_by"))
    );
}

#[tokio::test]
async fn closing_a_task_closes_its_active_grants_once() {
    let f = with_agents().await;
    let a = f.grant(json!({"task": "ticket #5"})).await;
    let b = f.grant(json!({"task": "ticket #5"})).await;
    let other = f.grant(json!({"task": "other"})).await;
    let revoked = f.grant(json!({"task": "ticket #5"})).await;
    f.call(
        "POST",
        &format!("/v1/grants/{}/revoke", revoked["id"].as_str().unwrap()),
        As::Admin,
        None,
    )
    .await;

    let (status, closed) = f
        .call(
            "POST",
            "/v1/tasks/ticket%20%235/close",
            As::Admin,
            Some(json!({"closed_by": "alice"})),
        )
        .await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(closed["task"], "ticket #5");
    let closed_ids: Vec<&str> = closed["closed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["status"], "closed");
            assert_eq!(g["revoked_by"], "alice");
            g["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        closed_ids,
        vec![a["id"].as_str().unwrap(), b["id"].as_str().unwrap()]
    );
    let (_, still) = f
        .call(
            "GET",
            &format!("/v1/grants/{}", other["id"].as_str().unwrap()),
            As::Admin,
            None,
        )
        .await;
    assert_eq!(still["status"], "active");

    let (status, again) = f
        .call("POST", "/v1/tasks/ticket%20%235/close", As::Admin, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["closed"], json!([]));
    let (status, _) = f
        .call("POST", "/v1/tasks/nothing/close", As::Admin, None)
        .await;
    assert_eq!(status, 404);
    // A closed grant cannot be revoked after the fact.
    let (status, err) = f
        .call(
            "POST",
            &format!("/v1/grants/{}/revoke", a["id"].as_str().unwrap()),
            As::Admin,
            None,
        )
        .await;
    assert_eq!(status, 409, "{err}");
}

#[tokio::test]
async fn revocations_reach_the_push_snapshot_with_a_new_revision() {
    let f = with_agents().await;
    let before = f.state.hub.snapshot().delegation().clone();
    assert_eq!(before.keys.len(), 1, "the first key is published");
    assert!(before.revoked_grants.is_empty());
    let grant = f.grant(json!({"task": "t"})).await;
    let id = grant["id"].as_str().unwrap().to_owned();
    f.call("POST", &format!("/v1/grants/{id}/revoke"), As::Admin, None)
        .await;
    let started = Instant::now();
    loop {
        let state = f.state.hub.snapshot().delegation().clone();
        if state.revision > before.revision {
            assert_eq!(state.revoked_grants.len(), 1);
            assert_eq!(state.revoked_grants[0].id, id);
            assert!(state.revoked_grants[0].expires_at > now_ms() / 1000);
            assert_eq!(state.keys, before.keys);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the revocation did not reach the push snapshot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// --- Keys -----------------------------------------------------------------------------------------

#[tokio::test]
async fn the_jwks_is_public_and_rotation_publishes_the_new_key_beside_the_old() {
    let f = with_agents().await;
    let (status, body) = f.call("GET", JWKS_PATH, As::Anonymous, None).await;
    assert_eq!(status, 200);
    let jwks: Jwks = serde_json::from_value(body).unwrap();
    assert_eq!(jwks.keys.len(), 1);
    let first = jwks.keys[0].clone();
    assert_eq!(first.kid.len(), 16);
    assert_eq!(
        (first.kty.as_str(), first.crv.as_str(), first.alg.as_str()),
        ("EC", "P-256", "ES256")
    );
    let revision = f.state.store.delegation_revision().await.unwrap();

    // A day and an hour later the key is due; another rotation right after is not.
    let later = now_ms() + 25 * 3_600_000;
    assert!(f.state.delegation.rotate_if_due(later).await.unwrap());
    assert!(!f.state.delegation.rotate_if_due(later + 1).await.unwrap());
    assert_eq!(
        f.state.store.delegation_revision().await.unwrap(),
        revision + 1
    );
    let (_, body) = f.call("GET", JWKS_PATH, As::Anonymous, None).await;
    let jwks: Jwks = serde_json::from_value(body).unwrap();
    assert_eq!(jwks.keys.len(), 2);
    assert_eq!(jwks.keys[0], first);
}

// --- Tokens -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_carries_the_grant_and_is_bound_to_the_callers_certificate() {
    let f = with_agents().await;
    let grant = f
        .grant(json!({"constraints": {"require_approval": [{"tool": "read_secret*"}]}}))
        .await;
    let id = grant["id"].as_str().unwrap();
    let (status, issued) = f.token(id, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 200, "{issued}");
    let token = issued["token"].as_str().unwrap();
    let claims = f.verified(token, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.sub, "alice@example.com");
    assert_eq!(claims.act.chain(), vec![RESEARCH.to_owned()]);
    assert_eq!(claims.grant_id, id);
    assert_eq!(claims.aud, vec![TD.to_owned()]);
    assert_eq!(
        claims.scope,
        vec![json!({"host": "tool", "tool": "read_file"})]
    );
    assert_eq!(
        claims.constraints.unwrap()["require_approval"],
        json!([{"tool": "read_secret*"}])
    );
    assert_eq!(claims.approved_by, "bob@example.com");
    assert_eq!(claims.purpose, "summarise the quarterly report");
    assert_eq!(claims.cnf.x5t_s256, thumbprint(RESEARCH_CERT));
    assert_eq!(
        uuid::Uuid::parse_str(&claims.jti)
            .unwrap()
            .get_version_num(),
        7
    );
    let now = now_ms() / 1000;
    assert!(
        claims.exp > now && claims.exp <= now + 300,
        "exp = now + --delegation-token-ttl"
    );
    assert_eq!(issued["expires_at"], claims.exp);

    // The token is useless on another certificate.
    let keys = f.jwks().await;
    let stolen = verify(
        token,
        &keys,
        &Expectations {
            issuer: ISSUER,
            audiences: &[TD],
            presenter_id: RESEARCH,
            presenter_thumbprint: &thumbprint(WRITER_CERT),
            now,
            leeway_secs: 0,
        },
    );
    assert_eq!(stolen.unwrap_err().check(), "binding");
}

#[tokio::test]
async fn a_token_never_outlives_its_grant() {
    let f = with_agents().await;
    let grant = f.grant(json!({"ttl_seconds": 60})).await;
    let (status, issued) = f
        .token(grant["id"].as_str().unwrap(), RESEARCH, RESEARCH_CERT)
        .await;
    assert_eq!(status, 200, "{issued}");
    let exp = issued["expires_at"].as_i64().unwrap();
    assert!(exp <= now_ms() / 1000 + 60, "{exp}");
}

#[tokio::test]
async fn audiences_are_spiffe_ids_in_the_trust_domain() {
    let f = with_agents().await;
    let grant = f.grant(json!({})).await;
    let id = grant["id"].as_str().unwrap();
    let (status, issued) = f
        .presenting(
            DELEGATION_TOKEN_PATH,
            Some((RESEARCH, RESEARCH_CERT)),
            json!({"grant_id": id, "audience": ["spiffe://mandate.local/service/tool", TD]}),
        )
        .await;
    assert_eq!(status, 200, "{issued}");
    let keys = f.jwks().await;
    let claims = verify(
        issued["token"].as_str().unwrap(),
        &keys,
        &Expectations {
            issuer: ISSUER,
            audiences: &["spiffe://mandate.local/service/tool"],
            presenter_id: RESEARCH,
            presenter_thumbprint: &thumbprint(RESEARCH_CERT),
            now: now_ms() / 1000,
            leeway_secs: 0,
        },
    )
    .unwrap();
    assert_eq!(
        claims.aud,
        vec![
            "spiffe://mandate.local/service/tool".to_owned(),
            TD.to_owned()
        ]
    );
    for (audience, field) in [
        (json!(["https://tool.example.com"]), "audience[0]"),
        (
            json!([TD, "spiffe://other.domain/service/tool"]),
            "audience[1]",
        ),
        (
            json!(["spiffe://mandate.local/service/tool/"]),
            "audience[0]",
        ),
    ] {
        let (status, err) = f
            .presenting(
                DELEGATION_TOKEN_PATH,
                Some((RESEARCH, RESEARCH_CERT)),
                json!({"grant_id": id, "audience": audience}),
            )
            .await;
        assert_eq!(
            (status.as_u16(), err["field"].as_str()),
            (400, Some(field)),
            "{err}"
        );
    }
}

#[tokio::test]
async fn tokens_are_refused_saying_why() {
    let f = with_agents().await;
    let grant = f.grant(json!({"task": "t"})).await;
    let id = grant["id"].as_str().unwrap().to_owned();

    // No client certificate.
    let (status, _) = f
        .presenting(DELEGATION_TOKEN_PATH, None, json!({"grant_id": id}))
        .await;
    assert_eq!(status, 401);
    // Someone else's grant.
    let (status, err) = f.token(&id, WRITER, WRITER_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("not your grant"), "{err}");
    // No such grant; not a grant id.
    let (status, _) = f
        .token(
            "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b",
            RESEARCH,
            RESEARCH_CERT,
        )
        .await;
    assert_eq!(status, 404);
    let (status, err) = f.token("g1", RESEARCH, RESEARCH_CERT).await;
    assert_eq!(
        (status.as_u16(), err["field"].as_str()),
        (400, Some("grant_id"))
    );

    // The agent suspended.
    f.call("POST", "/v1/agents/research/suspend", As::Admin, None)
        .await;
    let (status, err) = f.token(&id, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("agent not active"), "{err}");
    f.call("POST", "/v1/agents/research/activate", As::Admin, None)
        .await;

    // Expired.
    let short = f.grant(json!({"ttl_seconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, err) = f
        .token(short["id"].as_str().unwrap(), RESEARCH, RESEARCH_CERT)
        .await;
    assert_eq!(status, 403);
    assert!(error(&err).contains("expired at"), "{err}");

    // Closed with its task, and revoked.
    let (status, _) = f.token(&id, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 200);
    f.call("POST", "/v1/tasks/t/close", As::Admin, None).await;
    let (status, err) = f.token(&id, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).contains("is closed"), "{err}");
    let other = f.grant(json!({})).await;
    let other = other["id"].as_str().unwrap();
    f.call(
        "POST",
        &format!("/v1/grants/{other}/revoke"),
        As::Admin,
        None,
    )
    .await;
    let (status, err) = f.token(other, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).contains("is revoked (by admin)"), "{err}");
}

// --- Exchange -----------------------------------------------------------------------------------------

#[tokio::test]
async fn an_exchange_adds_the_caller_to_the_chain_and_binds_to_its_certificate() {
    let f = with_agents().await;
    let grant = f.grant(json!({})).await;
    let (_, issued) = f
        .token(grant["id"].as_str().unwrap(), RESEARCH, RESEARCH_CERT)
        .await;
    let subject = issued["token"].as_str().unwrap();
    let original = f.verified(subject, RESEARCH, RESEARCH_CERT).await;

    let (status, exchanged) = f.exchange(subject, WRITER, WRITER_CERT).await;
    assert_eq!(status, 200, "{exchanged}");
    let claims = f
        .verified(exchanged["token"].as_str().unwrap(), WRITER, WRITER_CERT)
        .await;
    assert_eq!(
        claims.act.chain(),
        vec![RESEARCH.to_owned(), WRITER.to_owned()]
    );
    assert_eq!(claims.act.current(), WRITER);
    assert_eq!(claims.sub, original.sub);
    assert_eq!(claims.grant_id, original.grant_id);
    assert_eq!(claims.scope, original.scope);
    assert_eq!(claims.cnf.x5t_s256, thumbprint(WRITER_CERT));
    assert_ne!(claims.jti, original.jti);
    assert!(
        claims.exp <= original.exp,
        "never outlives the token it replaces"
    );
}

#[tokio::test]
async fn exchanges_are_refused_saying_why() {
    let f = with_agents().await;
    f.agent("svc-like", r#"[{"host": "tool"}]"#).await;
    let (status, _) = f
        .call(
            "POST",
            "/v1/services",
            As::Admin,
            Some(json!({"name": "tool", "owner": "ops"})),
        )
        .await;
    assert_eq!(status, 201);
    let grant = f.grant(json!({})).await;
    let gid = grant["id"].as_str().unwrap().to_owned();
    let (_, issued) = f.token(&gid, RESEARCH, RESEARCH_CERT).await;
    let subject = issued["token"].as_str().unwrap().to_owned();

    // The caller already acts in the chain.
    let (status, err) = f.exchange(&subject, RESEARCH, RESEARCH_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("caller already in chain"), "{err}");

    // A tampered token.
    let mut tampered = subject.clone().into_bytes();
    let at = tampered.len() - 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let (status, err) = f
        .exchange(&String::from_utf8(tampered).unwrap(), WRITER, WRITER_CERT)
        .await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("subject token invalid: "), "{err}");
    let (status, err) = f.exchange("not-a-token", WRITER, WRITER_CERT).await;
    assert_eq!(status, 403);
    assert!(
        error(&err).starts_with("subject token invalid: malformed"),
        "{err}"
    );

    // A token meant for one service only cannot be exchanged by an agent.
    let (_, narrow) = f
        .presenting(
            DELEGATION_TOKEN_PATH,
            Some((RESEARCH, RESEARCH_CERT)),
            json!({"grant_id": gid, "audience": ["spiffe://mandate.local/service/tool"]}),
        )
        .await;
    let (status, err) = f
        .exchange(narrow["token"].as_str().unwrap(), WRITER, WRITER_CERT)
        .await;
    assert_eq!(status, 403);
    assert!(
        error(&err).starts_with("subject token invalid: audience"),
        "{err}"
    );

    // Services do not act for people.
    let (status, err) = f
        .exchange(
            &subject,
            "spiffe://mandate.local/service/tool",
            b"tool cert",
        )
        .await;
    assert_eq!(status, 403, "{err}");
    assert!(error(&err).contains("only agents act"), "{err}");

    // A suspended caller.
    f.call("POST", "/v1/agents/writer/suspend", As::Admin, None)
        .await;
    let (status, err) = f.exchange(&subject, WRITER, WRITER_CERT).await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("agent not active"), "{err}");

    // The grant revoked after the token was issued.
    f.call("POST", &format!("/v1/grants/{gid}/revoke"), As::Admin, None)
        .await;
    let (status, err) = f
        .exchange(&subject, "spiffe://mandate.local/agent/svc-like", b"c")
        .await;
    assert_eq!(status, 403);
    assert!(error(&err).contains("is revoked"), "{err}");
}

#[tokio::test]
async fn a_chain_holds_at_most_max_chain_actors() {
    let f = fixture().await;
    let names: Vec<String> = (0..=MAX_CHAIN).map(|i| format!("a{i}")).collect();
    for name in &names {
        f.agent(name, r#"[{"host": "tool"}]"#).await;
    }
    let id = |name: &str| format!("spiffe://mandate.local/agent/{name}");
    let grant = f
        .grant(json!({"agent": "a0", "scopes": [{"host": "tool"}]}))
        .await;
    let (status, issued) = f
        .token(grant["id"].as_str().unwrap(), &id("a0"), b"a0")
        .await;
    assert_eq!(status, 200, "{issued}");
    let mut token = issued["token"].as_str().unwrap().to_owned();
    for name in &names[1..MAX_CHAIN] {
        let (status, next) = f.exchange(&token, &id(name), name.as_bytes()).await;
        assert_eq!(status, 200, "{name}: {next}");
        token = next["token"].as_str().unwrap().to_owned();
    }
    let last = &names[MAX_CHAIN];
    let (status, err) = f.exchange(&token, &id(last), last.as_bytes()).await;
    assert_eq!(status, 403);
    assert!(error(&err).starts_with("chain too long"), "{err}");
}
