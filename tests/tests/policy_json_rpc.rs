//! MCP's JSON-RPC under policy, with raw requests: `Mcp-Method` / `Mcp-Name` headers must agree with
//! the body, and a batch is authorised element by element and refused whole if any element is denied.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{Collected, Http1, full, proxy_request};
use mandate_e2e::policy::{is_uuid_v7, reference_policy, registry};
use mandate_e2e::{Sidecar, TestEnv, ensure_eq};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

const DELETE_REASON: &str =
    r#"research may not call tool "delete_repo" on tool: outside its ceiling"#;

/// POSTs `body` to http://tool:8080/mcp through the agent's sidecar, with extra `headers`.
async fn post_mcp(
    agent: &Sidecar,
    body: &Value,
    headers: &[(&str, &str)],
) -> anyhow::Result<Collected> {
    let mut req = proxy_request("POST", "http://tool:8080/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Http1::connect(agent.outbound())
        .await?
        .fetch(req.body(full(body.to_string()))?)
        .await
}

fn tools_call(id: Value, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": {"query": "x"}}})
}

async fn start(env: &TestEnv, app: &App) -> anyhow::Result<(Sidecar, Sidecar)> {
    let data = env.data_file(
        "registry",
        &registry("research", json!([{"host": "tool", "tool": "search"}])),
    )?;
    env.policy_pair(
        app.addr(),
        "tool:8080",
        "research",
        "tool",
        &reference_policy(),
        Some(&data),
    )
    .await
}

/// A `tools/call` of `tool` with id `id`, sent with `Mcp-Method: method_header` and
/// `Mcp-Name: name_header`, one of which (`disagreeing`) disagrees with the body.
struct Mismatch {
    case: &'static str,
    id: Value,
    tool: &'static str,
    method_header: &'static str,
    name_header: &'static str,
    disagreeing: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_headers_disagreeing_with_the_body_get_400_with_json_rpc_error_32020_and_the_same_id() {
    let env = TestEnv::new("mcp_header_mismatch");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app).await?;

        // Headers that agree with the body pass (the control: the refusals below are about the headers).
        let ok = post_mcp(
            &agent,
            &tools_call(json!(1), "search"),
            &[("mcp-method", "tools/call"), ("mcp-name", "search")],
        )
        .await?;
        ensure_eq!(ok.status, 200, "agreeing headers: {}", ok.text());
        ensure_eq!(app.request_count(), 1, "the agreeing call reaches the app");

        let cases = [
            Mismatch {
                case: "Mcp-Name names another tool than the body",
                id: json!(41),
                tool: "search",
                method_header: "tools/call",
                name_header: "delete_repo",
                disagreeing: "delete_repo",
            },
            Mismatch {
                case: "Mcp-Name names an allowed tool, the body a denied one",
                id: json!("req-7"),
                tool: "delete_repo",
                method_header: "tools/call",
                name_header: "search",
                disagreeing: "search",
            },
            Mismatch {
                case: "Mcp-Method names another method than the body",
                id: json!(42),
                tool: "search",
                method_header: "tools/list",
                name_header: "search",
                disagreeing: "tools/list",
            },
        ];
        for Mismatch {
            case,
            id,
            tool,
            method_header,
            name_header,
            disagreeing,
        } in cases
        {
            let headers = [("mcp-method", method_header), ("mcp-name", name_header)];
            let resp = post_mcp(&agent, &tools_call(id.clone(), tool), &headers).await?;
            ensure_eq!(resp.status, 400, "{case}: {}", resp.text());
            anyhow::ensure!(
                resp.header("content-type").starts_with("application/json"),
                "{case}: content-type {:?}",
                resp.header("content-type")
            );
            let body = resp.json()?;
            ensure_eq!(body["jsonrpc"], "2.0", "{case}: {body}");
            ensure_eq!(
                body["id"],
                id,
                "{case}: the error carries the request's id: {body}"
            );
            ensure_eq!(body["error"]["code"], -32020, "{case}: {body}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            anyhow::ensure!(
                message.contains("disagrees") && message.contains(disagreeing),
                "{case}: the message says which header disagrees: {body}"
            );
            let decision_id = body["error"]["data"]["decision_id"]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(is_uuid_v7(decision_id), "{case}: data.decision_id: {body}");
            ensure_eq!(
                resp.header("x-mandate-decision-id"),
                decision_id,
                "{case}: header and body name the same decision"
            );
            let record = agent.decision(decision_id).await?;
            ensure_eq!(record["allow"], false, "{case}: {record}");
            ensure_eq!(record["status"], 400, "{case}: {record}");
        }
        ensure_eq!(
            app.request_count(),
            1,
            "no call with disagreeing headers reaches the app"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_with_one_denied_element_is_refused_whole_with_one_error_per_request_and_forwards_nothing()
 {
    let env = TestEnv::new("mcp_batch");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = start(&env, &app).await?;

        let batch = json!([
            tools_call(json!(1), "search"),
            tools_call(json!(2), "delete_repo"),
            {"jsonrpc": "2.0", "method": "notifications/progress",
             "params": {"progressToken": "t", "progress": 1}},
            {"jsonrpc": "2.0", "id": "three", "method": "tools/list"},
        ]);
        let resp = post_mcp(&agent, &batch, &[]).await?;
        ensure_eq!(resp.status, 200, "{}", resp.text());
        let body = resp.json()?;
        let errors = body.as_array().cloned().unwrap_or_default();
        let ids: Vec<Value> = errors.iter().map(|e| e["id"].clone()).collect();
        ensure_eq!(
            ids,
            vec![json!(1), json!(2), json!("three")],
            "one error per element with an id, in order: {body}"
        );
        for e in &errors {
            ensure_eq!(e["jsonrpc"], "2.0", "{e}");
            ensure_eq!(e["error"]["code"], -32001, "{e}");
        }
        ensure_eq!(
            errors[1]["error"]["message"],
            format!("denied by policy: {DELETE_REASON}"),
            "the denied element's own reason: {body}"
        );
        for allowed in [&errors[0], &errors[2]] {
            let message = allowed["error"]["message"].as_str().unwrap_or_default();
            anyhow::ensure!(
                message.starts_with("batch refused: element ") && message.contains(DELETE_REASON),
                "an allowed element is refused because of the denied one, saying so: {allowed}"
            );
        }
        ensure_eq!(
            app.request_count(),
            0,
            "nothing of a refused batch reaches the app"
        );

        // Each element was decided and recorded.
        let denied_id = errors[1]["error"]["data"]["decision_id"]
            .as_str()
            .unwrap_or_default();
        let denied = agent.decision(denied_id).await?;
        ensure_eq!(denied["allow"], false, "{denied}");
        ensure_eq!(denied["mcp"]["name"], "delete_repo", "{denied}");
        let search = agent
            .decision_where("the batch's search element", |r| {
                r["mcp"]["name"] == "search"
            })
            .await?;
        ensure_eq!(search["allow"], true, "{search}");
        agent
            .decision_where("the batch's notification element", |r| {
                r["mcp"]["method"] == "notifications/progress"
            })
            .await?;
        agent
            .decision_where("the batch's tools/list element", |r| {
                r["mcp"]["method"] == "tools/list"
            })
            .await?;
        anyhow::ensure!(
            tool.decisions()?.is_empty(),
            "the tool's sidecar never saw the refused batch"
        );

        // A batch whose elements are all allowed is forwarded as one request.
        let fine = json!([
            tools_call(json!(10), "search"),
            {"jsonrpc": "2.0", "id": 11, "method": "tools/list"},
        ]);
        let resp = post_mcp(&agent, &fine, &[]).await?;
        ensure_eq!(resp.status, 200, "{}", resp.text());
        let echoed: Value = serde_json::from_str(resp.json()?["body"].as_str().unwrap_or(""))?;
        ensure_eq!(echoed, fine, "the app receives the batch as sent");
        ensure_eq!(
            app.request_count(),
            1,
            "the allowed batch reaches the app once"
        );
        Ok(())
    })
    .await;
}
