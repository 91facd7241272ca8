//! Policy on plain HTTP API calls: what an allowed and a denied call look like to the agent, to the
//! app, and in the decision log; and a tool's sidecar enforcing its own policy inbound.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, full, proxy_get, proxy_request};
use mandate_e2e::policy::{
    Denial, is_policy_version, is_uuid_v7, reference_policy, registry, registry_with, rego,
};
use mandate_e2e::{TestEnv, ensure_eq};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// The research agent may GET under /v1/ on `api`, nothing else.
fn api_registry() -> serde_json::Value {
    registry(
        "research",
        json!([{"host": "api", "method": "GET", "path": "/v1/*"}]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_within_the_ceiling_is_forwarded_and_post_is_refused_with_403_json_naming_the_reason() {
    let env = TestEnv::new("http_allow_deny");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let data = env.data_file("registry", &api_registry())?;
        let (agent, tool) = env
            .policy_pair(
                app.addr(),
                "api:8080",
                "research",
                "api",
                &reference_policy(),
                Some(&data),
            )
            .await?;

        // Allowed: the app answers, and the answer names the decision.
        let ok = proxy_get(agent.outbound(), "http://api:8080/v1/items?page=2", &[]).await?;
        ensure_eq!(ok.status, 200, "GET /v1/items: {}", ok.text());
        ensure_eq!(ok.json()?["path"], "/v1/items", "the app's echo");
        let allowed_id = ok.header("x-mandate-decision-id");
        anyhow::ensure!(
            is_uuid_v7(&allowed_id),
            "an allowed response carries x-mandate-decision-id (a UUIDv7), got {allowed_id:?}"
        );
        ensure_eq!(app.request_count(), 1, "the allowed GET reaches the app");

        // Denied: 403 JSON with reason, decision id (body and header) and policy version.
        let req = proxy_request("POST", "http://api:8080/v1/items")
            .header("content-type", "application/json")
            .body(full(r#"{"name":"new item"}"#))?;
        let resp = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        let denial = Denial::parse(&resp)?;
        ensure_eq!(
            denial.reason,
            "research may not POST /v1/items on api: outside its ceiling",
            "the denial's reason"
        );
        let version = denial.policy_version.clone().unwrap_or_default();
        anyhow::ensure!(is_policy_version(&version), "policy_version {version:?}");
        ensure_eq!(
            app.request_count(),
            1,
            "the denied POST never reaches the app"
        );

        // A GET outside /v1/ is outside the ceiling too.
        let outside = proxy_get(agent.outbound(), "http://api:8080/admin", &[]).await?;
        let outside = Denial::parse(&outside)?;
        ensure_eq!(
            outside.reason,
            "research may not GET /admin on api: outside its ceiling",
            "GET /admin"
        );
        ensure_eq!(
            app.request_count(),
            1,
            "the denied GET never reaches the app"
        );

        // The decision log has both, with the fields of DESIGN.md's decision record.
        let allowed = agent.decision(&allowed_id).await?;
        ensure_eq!(allowed["allow"], true, "{allowed}");
        ensure_eq!(allowed["enforced"], true, "{allowed}");
        ensure_eq!(allowed["direction"], "outbound", "{allowed}");
        ensure_eq!(allowed["source"], agent.id(), "{allowed}");
        ensure_eq!(
            allowed["destination"],
            json!({"host": "api", "port": 8080, "spiffe_id": tool.id()}),
            "{allowed}"
        );
        ensure_eq!(allowed["method"], "GET", "{allowed}");
        ensure_eq!(allowed["path"], "/v1/items", "{allowed}");
        ensure_eq!(
            allowed["reason"],
            "research may GET /v1/items on api",
            "{allowed}"
        );
        ensure_eq!(allowed["policy_version"], version.as_str(), "{allowed}");
        ensure_eq!(allowed["status"], 200, "{allowed}");
        anyhow::ensure!(allowed["eval_us"].is_u64(), "eval_us: {allowed}");
        anyhow::ensure!(
            allowed["sidecar"].as_str().is_some_and(|s| !s.is_empty()),
            "sidecar: {allowed}"
        );
        let ts = allowed["timestamp"].as_str().unwrap_or_default();
        anyhow::ensure!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "timestamp is RFC 3339: {allowed}"
        );

        let denied = agent.decision(&denial.decision_id).await?;
        ensure_eq!(denied["allow"], false, "{denied}");
        ensure_eq!(denied["enforced"], true, "{denied}");
        ensure_eq!(denied["direction"], "outbound", "{denied}");
        ensure_eq!(denied["method"], "POST", "{denied}");
        ensure_eq!(denied["path"], "/v1/items", "{denied}");
        ensure_eq!(denied["reason"], denial.reason.as_str(), "{denied}");
        ensure_eq!(denied["policy_version"], version.as_str(), "{denied}");
        ensure_eq!(denied["status"], 403, "{denied}");

        // The tool's sidecar decided the allowed GET again, inbound, and never saw the POST.
        let inbound = tool
            .decision_where("the inbound GET /v1/items", |r| r["path"] == "/v1/items")
            .await?;
        ensure_eq!(inbound["direction"], "inbound", "{inbound}");
        ensure_eq!(inbound["allow"], true, "{inbound}");
        ensure_eq!(inbound["source"], agent.id(), "{inbound}");
        ensure_eq!(inbound["status"], 200, "{inbound}");
        let tool_records = tool.decisions()?;
        ensure_eq!(
            tool_records.len(),
            1,
            "only the allowed call reaches the tool's sidecar: {tool_records:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_ceiling_but_no_autonomous_scopes_may_not_act_without_a_delegation() {
    let env = TestEnv::new("http_no_autonomy");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let data = env.data_file(
            "registry",
            &registry_with(
                "research",
                json!([{"host": "api", "method": "GET", "path": "/v1/*"}]),
                json!([]),
            ),
        )?;
        let (agent, tool) = env
            .policy_pair(
                app.addr(),
                "api:8080",
                "research",
                "api",
                &reference_policy(),
                Some(&data),
            )
            .await?;

        // Within the ceiling, but nobody delegated it and it may do nothing on its own.
        let resp = proxy_get(agent.outbound(), "http://api:8080/v1/items", &[]).await?;
        let denial = Denial::parse(&resp)?;
        ensure_eq!(
            denial.reason,
            "research may not GET /v1/items on api on its own: no delegation, and outside its autonomous scopes",
            "the denial's reason"
        );
        ensure_eq!(app.request_count(), 0, "the call never reaches the app");
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["reason"], denial.reason.as_str(), "{record}");
        anyhow::ensure!(record["delegation"].is_null(), "no delegation: {record}");
        ensure_eq!(tool.decisions()?.len(), 0, "the tool's sidecar never saw it");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_sidecar_enforces_its_policy_inbound_when_the_agent_sidecar_has_none() {
    let env = TestEnv::new("inbound_enforcement");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let policy = env.policy_dir(
            "tool-only",
            &rego(
                r#"default decision := {"allow": false, "reason": "the tool refuses callers it does not know"}

decision := {"allow": true, "reason": "health checks are open"} if input.request.path == "/health""#,
            ),
        )?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .policy(policy.path())
            .decision_log()
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route_to("tool:8080", &tool)
            .spawn()
            .await?;

        let ok = proxy_get(agent.outbound(), "http://tool:8080/health", &[]).await?;
        ensure_eq!(ok.status, 200, "GET /health: {}", ok.text());
        let ok_id = ok.header("x-mandate-decision-id");
        anyhow::ensure!(
            is_uuid_v7(&ok_id),
            "the tool sidecar's decision id comes back on an allowed response: {ok_id:?}"
        );

        // The refusal is the tool sidecar's, relayed unchanged by the agent's sidecar.
        let resp = proxy_get(agent.outbound(), "http://tool:8080/secrets", &[]).await?;
        let denial = Denial::parse(&resp)?;
        ensure_eq!(
            denial.reason,
            "the tool refuses callers it does not know",
            "the reason"
        );
        ensure_eq!(app.request_count(), 1, "the refused call never reaches the app");

        let record = tool.decision(&denial.decision_id).await?;
        ensure_eq!(record["direction"], "inbound", "{record}");
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["enforced"], true, "{record}");
        ensure_eq!(record["source"], agent.id(), "{record}");
        ensure_eq!(record["path"], "/secrets", "{record}");
        ensure_eq!(record["status"], 403, "{record}");
        ensure_eq!(
            record["policy_version"],
            denial.policy_version.as_deref().unwrap_or_default(),
            "{record}"
        );
        let allowed = tool.decision(&ok_id).await?;
        ensure_eq!(allowed["direction"], "inbound", "{allowed}");
        ensure_eq!(allowed["allow"], true, "{allowed}");

        // A denied JSON-RPC call comes back as a JSON-RPC error with its id, from the tool's sidecar.
        let req = proxy_request("POST", "http://tool:8080/mcp")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(full(
                r#"{"jsonrpc":"2.0","id":"call-9","method":"tools/call","params":{"name":"search","arguments":{}}}"#,
            ))?;
        let rpc = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        ensure_eq!(rpc.status, 200, "a JSON-RPC refusal travels in a 200: {}", rpc.text());
        let body = rpc.json()?;
        ensure_eq!(body["id"], "call-9", "{body}");
        ensure_eq!(body["error"]["code"], -32001, "{body}");
        ensure_eq!(
            body["error"]["data"]["reason"],
            "the tool refuses callers it does not know",
            "{body}"
        );
        let rpc_id = body["error"]["data"]["decision_id"]
            .as_str()
            .unwrap_or_default();
        let record = tool.decision(rpc_id).await?;
        ensure_eq!(record["direction"], "inbound", "{record}");
        ensure_eq!(
            record["mcp"],
            json!({"method": "tools/call", "name": "search"}),
            "{record}"
        );
        ensure_eq!(app.request_count(), 1, "the refused JSON-RPC call never reaches the app");
        Ok(())
    })
    .await;
}
