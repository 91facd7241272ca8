//! MCP through the mesh with the official MCP Python SDK on both ends: a client using the agent's
//! sidecar as its HTTP proxy, a server (streamable HTTP, stateful) behind the tool's sidecar, both
//! sidecars enforcing the reference policy. The agent `research` may call `search` but not
//! `delete_repo`; the refusal reaches the client as a JSON-RPC error its model can read, the server
//! never sees the refused call, and both decisions are recorded.

use std::time::Duration;

use mandate_e2e::policy::{is_policy_version, is_uuid_v7, reference_policy, registry};
use mandate_e2e::python::{self, McpServer, run_client};
use mandate_e2e::{TestEnv, ensure_eq};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(150);

const DELETE_REASON: &str =
    r#"research may not call tool "delete_repo" on tool: outside its ceiling"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_sdk_client_may_call_search_and_is_told_by_policy_why_delete_repo_is_refused() {
    let name = "mcp_sdk_client_may_call_search_and_is_told_by_policy_why_delete_repo_is_refused";
    let python = match python::interpreter().await {
        Ok(python) => python,
        Err(why) => {
            eprintln!("SKIP: {name}: {why}");
            return;
        }
    };
    let env = TestEnv::new("mcp_sdk_policy");
    env.run(LIMIT, async {
        let server = McpServer::start(&env, &python).await?;
        let data = env.data_file(
            "registry",
            &registry("research", json!([{"host": "tool", "tool": "search"}])),
        )?;
        let (agent, tool) = env
            .policy_pair(
                server.addr(),
                "tool:8080",
                "research",
                "tool",
                &reference_policy(),
                Some(&data),
            )
            .await?;

        let run = run_client(
            &env,
            &python,
            agent.outbound(),
            "http://tool:8080/mcp",
            Duration::from_secs(90),
        )
        .await?;
        let report = run.report()?;

        // The session is set up through both sidecars: discovery is not action.
        ensure_eq!(
            report["initialize"]["result"]["serverInfo"]["name"],
            "mandate-e2e-tool",
            "initialize\n{run}"
        );
        ensure_eq!(
            report["list_tools"]["result"],
            json!(["delete_repo", "search"]),
            "tools/list\n{run}"
        );

        // search is within the ceiling: the tool's own answer comes back.
        let search = &report["search"]["result"];
        ensure_eq!(search["isError"], false, "search\n{run}");
        ensure_eq!(
            search["content"][0]["text"],
            "3 results for 'mandate'",
            "search\n{run}"
        );

        // delete_repo is not: a JSON-RPC error carrying the policy's reason and the decision.
        let error = &report["delete_repo"]["error"];
        let message = error["message"].as_str().unwrap_or_default();
        anyhow::ensure!(
            message.contains(DELETE_REASON),
            "delete_repo must fail with a JSON-RPC error naming the reason {DELETE_REASON:?}\n{run}"
        );
        ensure_eq!(error["code"], -32001, "delete_repo error code\n{run}");
        ensure_eq!(error["data"]["reason"], DELETE_REASON, "error.data\n{run}");
        let denied_id = error["data"]["decision_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(is_uuid_v7(&denied_id), "error.data.decision_id\n{run}");
        let version = error["data"]["policy_version"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(
            is_policy_version(&version),
            "error.data.policy_version\n{run}"
        );

        // The server saw search, never delete_repo; every request came through the tool's sidecar.
        let messages = server.messages()?;
        anyhow::ensure!(
            messages.contains(&("tools/call".to_owned(), Some("search".to_owned()))),
            "the MCP server never received tools/call search: {messages:?}"
        );
        anyhow::ensure!(
            !messages
                .iter()
                .any(|(_, n)| n.as_deref() == Some("delete_repo")),
            "a refused call reached the MCP server: {messages:?}"
        );
        for request in server.requests()? {
            ensure_eq!(request["peer"], agent.id(), "x-mandate-peer on {request}");
            ensure_eq!(request["host"], "tool:8080", "Host on {request}");
        }

        // The agent's sidecar recorded the allowed search and the denied delete_repo.
        let allowed = agent
            .decision_where("the allowed tools/call search", |r| {
                r["mcp"]["name"] == "search" && r["mcp"]["method"] == "tools/call"
            })
            .await?;
        ensure_eq!(allowed["allow"], true, "{allowed}");
        ensure_eq!(allowed["enforced"], true, "{allowed}");
        ensure_eq!(allowed["direction"], "outbound", "{allowed}");
        ensure_eq!(allowed["source"], agent.id(), "{allowed}");
        ensure_eq!(
            allowed["reason"],
            r#"research may call tool "search" on tool"#,
            "{allowed}"
        );
        ensure_eq!(allowed["policy_version"], version.as_str(), "{allowed}");
        ensure_eq!(allowed["destination"]["host"], "tool", "{allowed}");
        ensure_eq!(allowed["destination"]["spiffe_id"], tool.id(), "{allowed}");
        ensure_eq!(allowed["status"], 200, "{allowed}");

        let denied = agent.decision(&denied_id).await?;
        ensure_eq!(denied["allow"], false, "{denied}");
        ensure_eq!(denied["enforced"], true, "{denied}");
        ensure_eq!(denied["direction"], "outbound", "{denied}");
        ensure_eq!(
            denied["mcp"],
            json!({"method": "tools/call", "name": "delete_repo"}),
            "{denied}"
        );
        ensure_eq!(denied["reason"], DELETE_REASON, "{denied}");
        ensure_eq!(denied["policy_version"], version.as_str(), "{denied}");

        // Nothing else was refused: the session plumbing (initialize, notifications, tools/list,
        // the GET stream and the closing DELETE) passed.
        let refused: Vec<Value> = agent
            .decisions()?
            .into_iter()
            .filter(|r| r["allow"] != true)
            .collect();
        ensure_eq!(refused.len(), 1, "only delete_repo is refused: {refused:?}");

        // The tool's sidecar decided the same search inbound, and never saw delete_repo.
        let inbound = tool
            .decision_where("the inbound tools/call search", |r| {
                r["mcp"]["name"] == "search"
            })
            .await?;
        ensure_eq!(inbound["direction"], "inbound", "{inbound}");
        ensure_eq!(inbound["allow"], true, "{inbound}");
        ensure_eq!(inbound["source"], agent.id(), "{inbound}");
        ensure_eq!(inbound["policy_version"], version.as_str(), "{inbound}");
        let tool_records = tool.decisions()?;
        anyhow::ensure!(
            !tool_records
                .iter()
                .any(|r| r["mcp"]["name"] == "delete_repo"),
            "the tool's sidecar must never have been asked about delete_repo: {tool_records:?}"
        );
        Ok(())
    })
    .await;
}
