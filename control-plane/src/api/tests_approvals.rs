//! Per-action approvals through the API (SQLite): a sidecar asks, a person decides, the retried
//! call redeems once; and the audit query by grant and approver.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use mandate_wire::{APPROVALS_PATH, DECISIONS_PATH, redeem_path};
use serde_json::{Value, json};

use super::tests::{AGENT, As, Fixture, fixture};
use crate::store::NewApproval;

const OTHER: &str = "spiffe://mandate.local/agent/other";

fn fingerprint(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn ask(n: u8) -> Value {
    json!({
        "decision_id": format!("0198a1b2-0000-7000-8000-00000000000{n}"),
        "fingerprint": fingerprint(n),
        "action": "mcp tools/call delete_file on tool:8080",
        "reason": "deleting files needs a person's approval",
        "subject": "alice@example.com",
        "grant_id": "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b",
        "policy_version": "4"
    })
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

impl Fixture {
    /// Asks for approval `n` as the research agent; its id.
    async fn ask(&self, n: u8) -> String {
        let (status, ticket) = self
            .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(ask(n)))
            .await;
        assert_eq!(status, 201, "{ticket}");
        ticket["id"].as_str().unwrap().to_owned()
    }

    async fn redeem(&self, id: &str, who: &'static str, n: u8) -> (StatusCode, Value) {
        self.call(
            "POST",
            &redeem_path(id),
            As::Peer(who),
            Some(json!({"fingerprint": fingerprint(n)})),
        )
        .await
    }

    async fn decide(&self, id: &str, verb: &str, by: &str) -> (StatusCode, Value) {
        let field = if verb == "approve" {
            "approved_by"
        } else {
            "rejected_by"
        };
        self.call(
            "POST",
            &format!("/v1/approvals/{id}/{verb}"),
            As::Admin,
            Some(json!({ field: by })),
        )
        .await
    }
}

#[tokio::test]
async fn an_approved_call_redeems_once() {
    let f = fixture().await;
    f.register("research").await;
    f.register("other").await;

    let (status, _) = f
        .call("POST", APPROVALS_PATH, As::Anonymous, Some(ask(1)))
        .await;
    assert_eq!(status, 401, "sidecar routes need the SVID");
    let (status, ticket) = f
        .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(ask(1)))
        .await;
    assert_eq!(status, 201, "{ticket}");
    let id = ticket["id"].as_str().unwrap().to_owned();
    let expires = ticket["expires_at"].as_i64().unwrap();
    assert!(
        (now_secs() + 590..=now_secs() + 600).contains(&expires),
        "expires after --approval-ttl: {ticket}"
    );

    // Listed as pending, with what the approver needs to decide.
    let (status, list) = f
        .call("GET", "/v1/approvals?status=pending", As::Admin, None)
        .await;
    assert_eq!(status, 200);
    let pending = &list["approvals"][0];
    assert_eq!(pending["id"], id.as_str());
    assert_eq!(pending["agent"], AGENT);
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["subject"], "alice@example.com");
    assert_eq!(pending["action"], "mcp tools/call delete_file on tool:8080");

    let (status, body) = f.redeem(&id, AGENT, 1).await;
    assert_eq!(status, 409);
    assert!(error(&body).contains("pending"), "{body}");
    assert_eq!(body["messages"], json!(["pending"]));

    let (status, approved) = f.decide(&id, "approve", "bob@example.com").await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["decided_by"], "bob@example.com");
    let (status, body) = f.decide(&id, "reject", "carol@example.com").await;
    assert_eq!(status, 409, "only pending approvals can be decided");
    assert!(
        error(&body).contains("already approved by bob@example.com"),
        "{body}"
    );

    // Another agent may not use it, and learns nothing about it.
    let (status, body) = f.redeem(&id, OTHER, 1).await;
    assert_eq!(status, 403, "{body}");
    assert!(!error(&body).contains("research"), "{body}");
    // Another call may not use it.
    let (status, body) = f.redeem(&id, AGENT, 2).await;
    assert_eq!(status, 409);
    assert!(error(&body).contains("does not match this call"), "{body}");

    let (status, redeemed) = f.redeem(&id, AGENT, 1).await;
    assert_eq!(status, 200, "{redeemed}");
    assert_eq!(redeemed["approved_by"], "bob@example.com");
    assert!((now_secs() - 5..=now_secs()).contains(&redeemed["approved_at"].as_i64().unwrap()));

    let (status, body) = f.redeem(&id, AGENT, 1).await;
    assert_eq!(status, 409);
    assert!(error(&body).contains("already used"), "{body}");
    let (_, shown) = f
        .call("GET", &format!("/v1/approvals/{id}"), As::Admin, None)
        .await;
    assert_eq!(shown["status"], "used");
    assert!(shown["used_at"].is_string(), "{shown}");
}

#[tokio::test]
async fn rejected_and_expired_approvals_cannot_be_redeemed() {
    let f = fixture().await;
    f.register("research").await;
    let rejected = f.ask(1).await;
    let (status, body) = f.decide(&rejected, "reject", "carol@example.com").await;
    assert_eq!(
        (status.as_u16(), &body["status"]),
        (200, &json!("rejected"))
    );
    let (status, body) = f.redeem(&rejected, AGENT, 1).await;
    assert_eq!(status, 409);
    assert!(
        error(&body).contains("rejected by carol@example.com"),
        "{body}"
    );
    let (status, _) = f.decide(&rejected, "approve", "bob").await;
    assert_eq!(status, 409, "a rejection is final");

    // Asked for eleven minutes ago, with a ten-minute lifetime.
    let now_ms = now_secs() * 1000;
    let old = f
        .state
        .store
        .insert_approval(
            &NewApproval {
                agent: AGENT.into(),
                decision_id: "d-old".into(),
                fingerprint: fingerprint(3),
                action: "a".into(),
                reason: "r".into(),
                subject: None,
                grant_id: None,
                policy_version: None,
            },
            now_ms - 660_000,
            600_000,
        )
        .await
        .unwrap();
    let (status, body) = f.decide(&old.id, "approve", "bob").await;
    assert_eq!(status, 409);
    assert!(error(&body).contains("expired"), "{body}");
    let (status, body) = f.redeem(&old.id, AGENT, 3).await;
    assert_eq!(status, 409);
    assert!(error(&body).contains("expired"), "{body}");
    assert_eq!(body["messages"], json!(["expired"]));

    let (_, list) = f
        .call("GET", "/v1/approvals?status=expired", As::Admin, None)
        .await;
    let ids: Vec<&str> = list["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [old.id.as_str()]);
    let (_, list) = f
        .call("GET", "/v1/approvals?status=pending", As::Admin, None)
        .await;
    assert_eq!(list["approvals"], json!([]), "expired ones are not pending");
    let (_, list) = f.call("GET", "/v1/approvals", As::Admin, None).await;
    assert_eq!(list["approvals"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn approval_requests_and_parameters_are_checked() {
    let f = fixture().await;
    let (status, body) = f
        .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(ask(1)))
        .await;
    assert_eq!(status, 403, "an unregistered workload cannot ask: {body}");
    f.register("research").await;
    let mut bad = ask(1);
    bad["fingerprint"] = json!("not-hex");
    let (status, body) = f
        .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(bad))
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("fingerprint"))
    );
    let mut bad = ask(1);
    bad["colour"] = json!("red");
    let (status, body) = f
        .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(bad))
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("colour"))
    );
    f.call("POST", "/v1/agents/research/suspend", As::Admin, None)
        .await;
    let (status, body) = f
        .call("POST", APPROVALS_PATH, As::Peer(AGENT), Some(ask(1)))
        .await;
    assert_eq!(status, 403);
    assert!(error(&body).contains("suspended"), "{body}");
    f.call("POST", "/v1/agents/research/activate", As::Admin, None)
        .await;
    let id = f.ask(1).await;

    for (method, uri, field) in [
        ("GET", "/v1/approvals?status=maybe".to_owned(), "status"),
        ("GET", "/v1/approvals?limit=0".to_owned(), "limit"),
        ("GET", "/v1/approvals?colour=red".to_owned(), "colour"),
        ("GET", "/v1/approvals/nope".to_owned(), "id"),
    ] {
        let (status, body) = f.call(method, &uri, As::Admin, None).await;
        assert_eq!(
            (status.as_u16(), body["field"].as_str()),
            (400, Some(field)),
            "{uri}: {body}"
        );
    }
    let (status, body) = f
        .call(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            As::Admin,
            Some(json!({"approved_by": "  "})),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("approved_by"))
    );
    let (status, body) = f
        .call(
            "POST",
            &format!("/v1/approvals/{id}/approve"),
            As::Admin,
            Some(json!({"rejected_by": "bob"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = f
        .call(
            "GET",
            "/v1/approvals/01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b",
            As::Admin,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = f
        .redeem("01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b", AGENT, 1)
        .await;
    assert_eq!(status, 404);
    for (method, uri) in [
        ("GET", "/v1/approvals".to_owned()),
        ("GET", format!("/v1/approvals/{id}")),
        ("POST", format!("/v1/approvals/{id}/approve")),
        ("POST", format!("/v1/approvals/{id}/reject")),
    ] {
        let (status, _) = f
            .call(
                method,
                &uri,
                As::Peer(AGENT),
                Some(json!({"approved_by": "research", "rejected_by": "research"})),
            )
            .await;
        assert_eq!(status, 401, "{method} {uri} is for admins only");
    }
    let (_, shown) = f
        .call("GET", &format!("/v1/approvals/{id}"), As::Admin, None)
        .await;
    assert_eq!(shown["status"], "pending", "an agent cannot approve itself");
}

fn decision(id: &str, grant: Option<&str>, approver: Option<&str>) -> Value {
    let mut d = json!({"decision_id": id, "timestamp": "2026-01-01T00:00:00Z", "direction": "outbound",
        "source": AGENT, "destination": {"host": "tool", "port": 8080}, "method": "POST", "path": "/mcp",
        "allow": true, "enforced": true, "reason": "r", "policy_version": "4", "eval_us": 5, "sidecar": "s"});
    if let Some(grant) = grant {
        d["delegation"] =
            json!({"subject": "alice@example.com", "grant_id": grant, "actors": [AGENT]});
    }
    if let Some(by) = approver {
        d["approval"] = json!({"id": "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b", "approved_by": by});
    }
    d
}

#[tokio::test]
async fn decisions_are_found_by_grant_and_by_approver() {
    let f = fixture().await;
    f.register("research").await;
    let batch = json!({"decisions": [
        decision("d1", Some("g1"), Some("bob@example.com")),
        decision("d2", Some("g1"), None),
        decision("d3", Some("g2"), Some("carol@example.com")),
        decision("d4", None, None),
    ]});
    let (status, result) = f
        .call("POST", DECISIONS_PATH, As::Peer(AGENT), Some(batch))
        .await;
    assert_eq!(status, 200, "{result}");
    let ids = |body: Value| -> Vec<String> {
        body["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["decision_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, body) = f
        .call("GET", "/v1/decisions?grant=g1", As::Admin, None)
        .await;
    assert_eq!(ids(body), ["d2", "d1"]);
    let (_, body) = f
        .call(
            "GET",
            "/v1/decisions?approver=bob%40example.com",
            As::Admin,
            None,
        )
        .await;
    assert_eq!(ids(body.clone()), ["d1"]);
    assert_eq!(
        body["decisions"][0]["approval"]["approved_by"],
        "bob@example.com"
    );
    let (_, body) = f
        .call(
            "GET",
            "/v1/decisions?grant=g2&approver=bob%40example.com",
            As::Admin,
            None,
        )
        .await;
    assert_eq!(ids(body), Vec::<String>::new());
}
