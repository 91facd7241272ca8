//! The reference policy (policies/reference) gives the same decision on the register VM as on the
//! interpreter for every branch it has: `mandate policy test` runs its Rego tests on the
//! interpreter only (the VM cannot evaluate `with`), and sidecars run it on the VM.

use std::path::Path;
use std::time::Duration;

use mandate_rego::{EngineChoice, EngineKind, Policy, Value, read_modules};
use serde_json::{Value as Json, json};

fn policy(choice: EngineChoice) -> Policy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/reference");
    let modules: Vec<_> = read_modules(&dir)
        .unwrap()
        .into_iter()
        .filter(|m| !m.path.ends_with("_test.rego"))
        .collect();
    Policy::compile_with(
        &modules,
        Value::new_object(),
        Duration::from_secs(1),
        choice,
        None,
    )
    .unwrap()
}

fn entry() -> Json {
    json!({
        "status": "active",
        "owner": "alice@example.com",
        "ceiling": [
            {"host": "tool", "tool": "search"},
            {"host": "tool", "tool": "read_*"},
            {"host": "tool", "tool": "create_issue"},
            {"host": "api", "method": "GET", "path": "/v1/*"},
            {"host": "db", "protocol": "tcp", "port": 5432}
        ],
        "autonomous": [
            {"host": "tool", "tool": "search"},
            {"host": "tool", "tool": "read_*"},
            {"host": "api", "method": "GET", "path": "/v1/*"},
            {"host": "db", "protocol": "tcp", "port": 5432}
        ]
    })
}

fn base() -> Json {
    json!({
        "direction": "outbound",
        "source": {"spiffe_id": "spiffe://mandate.local/agent/research", "trust_domain": "mandate.local",
                   "kind": "agent", "name": "research"},
        "destination": {"host": "tool", "port": 8080, "external": false},
        "registry": entry(),
    })
}

fn tool(name: &str, arguments: Json) -> Json {
    let mut input = base();
    input["request"] = json!({"method": "POST", "path": "/mcp", "headers": {}});
    input["mcp"] = json!({"method": "tools/call", "id": 1, "tool": name, "arguments": arguments});
    input
}

fn delegated(mut input: Json, scopes: Json, constraints: Json) -> Json {
    input["delegation"] = json!({
        "subject": "alice@example.com", "grant_id": "g-1", "scopes": scopes,
        "constraints": constraints, "actors": ["spiffe://mandate.local/agent/research"],
        "approved_by": "alice@example.com", "expires_at": "2026-11-21T23:00:00Z", "purpose": "p"
    });
    input
}

/// Every branch of the verdict, with the reason the interpreter gives (checked here too, so a
/// change of wording shows in this table as well as in authz_test.rego).
fn cases() -> Vec<(&'static str, Json, Json)> {
    let mut unregistered = tool("search", json!({}));
    unregistered["registry"] = Json::Null;
    let mut suspended = tool("search", json!({}));
    suspended["registry"]["status"] = json!("suspended");
    let mut plumbing = base();
    plumbing["request"] = json!({"method": "POST", "path": "/mcp", "headers": {}});
    plumbing["mcp"] = json!({"method": "tools/list", "id": 0});
    let mut session = base();
    session["request"] =
        json!({"method": "GET", "path": "/mcp", "headers": {"mcp-session-id": "s"}});
    let mut tcp = base();
    tcp["destination"] = json!({"host": "db", "port": 5432, "external": false});
    tcp["tcp"] = json!({"port": 5432});
    let mut get = base();
    get["destination"] = json!({"host": "api", "port": 80, "external": false});
    get["request"] = json!({"method": "GET", "path": "/v1/items", "headers": {}});
    let mut no_autonomous = tool("search", json!({}));
    no_autonomous["registry"]
        .as_object_mut()
        .unwrap()
        .remove("autonomous");
    let approval = json!({"require_approval": [{"tool": "create_*"}]});
    vec![
        (
            "unregistered",
            unregistered,
            json!({"allow": false, "reason": "spiffe://mandate.local/agent/research is not registered"}),
        ),
        (
            "suspended",
            suspended,
            json!({"allow": false, "reason": "spiffe://mandate.local/agent/research is suspended, not active"}),
        ),
        (
            "outside the ceiling",
            tool("delete_repo", json!({})),
            json!({"allow": false, "reason": "research may not call tool \"delete_repo\" on tool: outside its ceiling"}),
        ),
        (
            "plumbing",
            plumbing,
            json!({"allow": true, "reason": "research may send MCP tools/list to tool"}),
        ),
        (
            "session plumbing",
            session,
            json!({"allow": true, "reason": "research may GET /mcp on tool"}),
        ),
        (
            "autonomous",
            tool("read_file", json!({})),
            json!({"allow": true, "reason": "research may call tool \"read_file\" on tool"}),
        ),
        (
            "autonomous tcp",
            tcp,
            json!({"allow": true, "reason": "research may open TCP to db:5432"}),
        ),
        (
            "autonomous http",
            get,
            json!({"allow": true, "reason": "research may GET /v1/items on api"}),
        ),
        (
            "on its own",
            tool("create_issue", json!({})),
            json!({"allow": false, "reason": "research may not call tool \"create_issue\" on tool on its own: no delegation, and outside its autonomous scopes"}),
        ),
        (
            "no autonomous scopes",
            no_autonomous,
            json!({"allow": false, "reason": "research may not call tool \"search\" on tool on its own: no delegation, and outside its autonomous scopes"}),
        ),
        (
            "not granted",
            delegated(
                tool("search", json!({})),
                json!([{"tool": "create_issue"}]),
                json!({}),
            ),
            json!({"allow": false, "reason": "research may not call tool \"search\" on tool: not granted by the delegation from alice@example.com"}),
        ),
        (
            "unknown constraint",
            delegated(
                tool("search", json!({})),
                json!([{"tool": "search"}]),
                json!({"max_calls": 1}),
            ),
            json!({"allow": false, "reason": "research may not call tool \"search\" on tool: the delegation from alice@example.com has constraint \"max_calls\", which this policy does not enforce"}),
        ),
        (
            "missing argument",
            delegated(
                tool("create_issue", json!({})),
                json!([{"tool": "create_issue"}]),
                json!({"arguments": {"repo": "acme/*"}}),
            ),
            json!({"allow": false, "reason": "research may not call tool \"create_issue\" on tool: argument \"repo\" is missing, and the delegation from alice@example.com requires it to match \"acme/*\""}),
        ),
        (
            "mismatched argument",
            delegated(
                tool("create_issue", json!({"repo": "acme/a/b"})),
                json!([{"tool": "create_issue"}]),
                json!({"arguments": {"repo": "acme/*"}}),
            ),
            json!({"allow": false, "reason": "research may not call tool \"create_issue\" on tool: argument \"repo\" does not match \"acme/*\", as the delegation from alice@example.com requires"}),
        ),
        (
            "matching argument",
            delegated(
                tool("create_issue", json!({"repo": "acme/a", "n": 3})),
                json!([{"tool": "create_issue"}]),
                json!({"arguments": {"repo": "acme/*", "n": 3}}),
            ),
            json!({"allow": true, "reason": "research may call tool \"create_issue\" on tool on behalf of alice@example.com"}),
        ),
        (
            "approval",
            delegated(
                tool("create_issue", json!({})),
                json!([{"host": "tool"}]),
                approval.clone(),
            ),
            json!({"allow": false, "require_approval": true, "reason": "research may not call tool \"create_issue\" on tool yet: the delegation from alice@example.com says this call needs approval from alice@example.com"}),
        ),
        (
            "no approval needed",
            delegated(
                tool("search", json!({})),
                json!([{"host": "tool"}]),
                approval,
            ),
            json!({"allow": true, "reason": "research may call tool \"search\" on tool on behalf of alice@example.com"}),
        ),
        (
            "delegated, no constraints",
            delegated(
                tool("create_issue", json!({})),
                json!([{"host": "tool", "tool": "create_*"}]),
                Json::Null,
            ),
            json!({"allow": true, "reason": "research may call tool \"create_issue\" on tool on behalf of alice@example.com"}),
        ),
    ]
}

#[test]
fn both_engines_give_the_documented_decision_for_every_branch() {
    let vm = policy(EngineChoice::Vm);
    assert_eq!(
        vm.engine(),
        EngineKind::Vm,
        "the VM compiles the reference policy"
    );
    let interpreter = policy(EngineChoice::Interpreter);
    for (what, input, expected) in cases() {
        let expected = Value::from_json_str(&expected.to_string()).unwrap();
        for (engine, policy) in [("vm", &vm), ("interpreter", &interpreter)] {
            let input = Value::from_json_str(&input.to_string()).unwrap();
            let verdict = policy
                .evaluate(input)
                .unwrap_or_else(|e| panic!("{engine}: {what}: {e}"));
            assert_eq!(verdict.document, expected, "{engine}: {what}");
        }
    }
}
