//! The demo's second half: the agent acts for a person. alice grants it less than its ceiling, the
//! agent fetches a delegation token from its own sidecar, the tool is told on whose behalf each call
//! is made, calls outside the grant and a tampered token are refused, a call the grant holds for a
//! person's approval is approved with `mandate approve` and allowed once, and the audit log names
//! who approved it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::client::{self, Response};
use super::operator::ControlPlane;
use super::sample_tool::SampleTool;
use super::{
    AGENT, DemoError, Expected, TOOL_AUTHORITY, Transcript, World, audit_records, call,
    expect_decision_header, operator_ok, tool_saw,
};

/// The person the agent acts for (also its owner).
pub const ALICE: &str = "alice@example.com";
/// The person who approves the held call.
const APPROVER: &str = "bob@example.com";
/// What alice lets the agent do for her: read two reports, narrower than its ceiling (`GET /v1/*`).
const GRANT_SCOPES: [&str; 2] = [
    r#"{"host": "tool", "method": "GET", "path": "/v1/reports"}"#,
    r#"{"host": "tool", "method": "GET", "path": "/v1/payroll"}"#,
];
/// …and the payroll only with a person's approval, call by call.
const GRANT_CONSTRAINTS: &str =
    r#"{"require_approval": [{"host": "tool", "path": "/v1/payroll"}]}"#;
const PURPOSE: &str = "prepare the quarterly report";

/// What the delegation steps share.
#[derive(Default)]
pub struct Delegation {
    grant_id: Option<String>,
    token: Option<String>,
}

impl Delegation {
    /// The token the agent's sidecar fetched, or `None` after a failed check when it has none.
    fn token(&self, t: &mut Transcript) -> Option<&str> {
        if self.token.is_none() {
            t.check(false, "no token to present");
        }
        self.token.as_deref()
    }
}

/// A GET of `target` from the tool through the agent's sidecar, with `headers`; `None` when no
/// answer came (a failed check says why).
async fn agent_get(
    t: &mut Transcript,
    w: &World,
    target: &str,
    headers: &[(&str, &str)],
) -> Option<Response> {
    let sent = client::get(w.agent_outbound, target, TOOL_AUTHORITY, headers);
    call(t, target, sent).await
}

/// alice grants the agent a scope narrower than its ceiling, holding one path for approval.
pub async fn grant(
    t: &mut Transcript,
    cp: &ControlPlane,
    d: &mut Delegation,
) -> Result<(), DemoError> {
    t.step(format!(
        "{ALICE} lets the agent act for her, for 15 minutes: less than its ceiling, payroll only if approved"
    ));
    let mut args = vec!["grant", "create", "--agent", AGENT, "--subject", ALICE];
    for scope in GRANT_SCOPES {
        args.extend(["--scope", scope]);
    }
    args.extend([
        "--constraints",
        GRANT_CONSTRAINTS,
        "--purpose",
        PURPOSE,
        "--approved-by",
        ALICE,
        "--ttl",
        "15m",
    ]);
    let out = operator_ok(t, cp, &args).await?;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        t.info(format!("   {line}"));
    }
    let id = uuid_in(&out);
    t.check(
        id.is_some(),
        format!(
            "the grant's id: {}",
            id.as_deref().unwrap_or("none printed")
        ),
    );
    t.info(
        "the control plane checked each scope lies within the agent's ceiling before storing it",
    );
    d.grant_id = id;
    Ok(())
}

/// The agent asks its own sidecar for the token; the sidecar asks the control plane over mTLS.
pub async fn token(t: &mut Transcript, w: &World, d: &mut Delegation) {
    t.step("The agent asks its own sidecar for alice's token (the sidecar asks the control plane over mTLS)");
    let Some(grant) = d.grant_id.clone() else {
        t.check(false, "no grant to ask a token for");
        return;
    };
    let body = json!({"grant_id": grant});
    let target = format!("http://{}/delegation/token", w.agent_admin);
    t.info(format!("POST {target}  {body}"));
    let host = w.agent_admin.to_string();
    let sent = client::post_json(w.agent_admin, "/delegation/token", &host, &body);
    let Some(response) = call(t, &target, sent).await else {
        return;
    };
    t.check(response.status == 200, expected_200(&response));
    let Some(token) = response
        .json()
        .and_then(|b| b["token"].as_str().map(str::to_owned))
    else {
        t.check(
            false,
            format!("a token in the answer: {}", response.text().trim()),
        );
        return;
    };
    t.info(format!(
        "   token: {}…({} bytes, an ES256-signed JWS)",
        &token[..token.len().min(24)],
        token.len()
    ));
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .unwrap_or(Value::Null);
    for claim in ["sub", "act", "grant_id", "purpose", "scope", "cnf"] {
        t.info(format!("   {claim:<9} {}", claims[claim]));
    }
    if let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) {
        t.info(format!(
            "   {:<9} {}s after it was issued",
            "exp",
            exp - iat
        ));
    }
    t.check(
        claims["sub"] == ALICE
            && claims["act"]["sub"] == w.agent_id.as_str()
            && claims["grant_id"] == grant.as_str(),
        format!("the token names {ALICE} as the person, the agent as the actor, and the grant"),
    );
    t.check(
        claims["cnf"]["x5t#S256"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "bound (cnf) to the agent's certificate: useless to anyone without its private key",
    );
    d.token = Some(token);
}

/// A call inside the grant, with forged on-behalf-of: allowed, and the tool is told who for.
pub async fn delegated_call(t: &mut Transcript, w: &mut World, d: &Delegation, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/reports");
    t.step("For alice, the agent reads /v1/reports, presenting the token: inside her grant, so allowed");
    let Some(token) = d.token(t) else {
        return;
    };
    let forged = "mallory@example.com";
    t.info(format!("GET {target}"));
    t.info("    x-mandate-delegation: <the token>");
    t.info(format!("    x-mandate-on-behalf-of: {forged}   (forged)"));
    let headers = [
        ("x-mandate-delegation", token),
        ("x-mandate-on-behalf-of", forged),
    ];
    let before = tool.requests();
    let Some(response) = agent_get(t, w, &target, &headers).await else {
        return;
    };
    t.check(response.status == 200, expected_200(&response));
    expect_decision_header(t, w, &response, "GET /v1/reports for alice", true);
    let Some(seen) = tool_saw(t, &response) else {
        return;
    };
    let headers = &seen["headers"];
    t.check(
        headers["x-mandate-on-behalf-of"] == ALICE,
        format!(
            "the tool is told the call is on behalf of {ALICE} (verified from the token; the forged value was dropped)"
        ),
    );
    t.check(
        headers["x-mandate-delegation-chain"] == w.agent_id.as_str(),
        format!("the tool is told the chain of agents: {}", w.agent_id),
    );
    t.check(
        d.grant_id
            .as_deref()
            .is_some_and(|g| headers["x-mandate-grant"] == g),
        "the tool is told under which grant",
    );
    t.check(
        headers.get("x-mandate-delegation").is_none(),
        "the tool never received the token itself",
    );
    t.check(
        tool.requests() == before + 1,
        "the tool received exactly one request",
    );
}

/// A call within the ceiling (and the agent's autonomous scopes) but outside alice's grant.
pub async fn outside_grant(t: &mut Transcript, w: &mut World, d: &Delegation, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/items");
    t.step("For alice, the agent reads /v1/items: within its ceiling, but not what she granted, so denied");
    let Some(token) = d.token(t) else {
        return;
    };
    t.info(format!("GET {target}   x-mandate-delegation: <the token>"));
    let before = tool.requests();
    let delegated = [("x-mandate-delegation", token)];
    let Some(response) = agent_get(t, w, &target, &delegated).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    let reason = refusal(t, w, &response, "denied", "GET /v1/items for alice");
    t.check(
        reason.contains(&format!("not granted by the delegation from {ALICE}")),
        format!("acting for alice it may do only what she granted: {reason}"),
    );
    t.check(tool.requests() == before, "the tool never saw it");
}

/// The token with one character of its claims changed: the signature no longer verifies.
pub async fn tampered(t: &mut Transcript, w: &mut World, d: &Delegation, tool: &SampleTool) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/reports");
    t.step("The same call with one character of the token's claims changed: refused");
    let Some(token) = d.token(t) else {
        return;
    };
    let forged = change_one_claims_byte(token);
    t.info(format!(
        "GET {target}   x-mandate-delegation: <the token, one byte of its claims changed>"
    ));
    let before = tool.requests();
    let delegated = [("x-mandate-delegation", forged.as_str())];
    let Some(response) = agent_get(t, w, &target, &delegated).await else {
        return;
    };
    t.info(format!("   {}", response.text().trim()));
    let reason = refusal(
        t,
        w,
        &response,
        "delegation_refused",
        "GET /v1/reports, tampered token",
    );
    t.check(
        reason.contains("signature"),
        format!("the reason names the check that failed: {reason}"),
    );
    t.check(tool.requests() == before, "the tool never saw it");
}

/// The call alice's grant holds for approval: refused with an approval id, approved by bob through
/// the CLI, allowed once on retry, refused the second time.
pub async fn approval(
    t: &mut Transcript,
    w: &mut World,
    d: &Delegation,
    tool: &SampleTool,
    cp: &ControlPlane,
) {
    let target = format!("http://{TOOL_AUTHORITY}/v1/payroll");
    t.step("For alice, the agent reads /v1/payroll: her grant holds it for a person's approval");
    let Some(token) = d.token(t) else {
        return;
    };
    t.info(format!("GET {target}   x-mandate-delegation: <the token>"));
    let before = tool.requests();
    let delegated = [("x-mandate-delegation", token)];
    let Some(held) = agent_get(t, w, &target, &delegated).await else {
        return;
    };
    t.info(format!("   {}", held.text().trim()));
    let reason = refusal(t, w, &held, "approval_required", "GET /v1/payroll, held");
    t.check(
        reason.contains("needs approval"),
        "held: the reason says the call needs a person's approval",
    );
    let body = held.json().unwrap_or(Value::Null);
    let Some(approval_id) = body["approval_id"].as_str().map(str::to_owned) else {
        t.check(false, "the refusal carries an approval_id");
        return;
    };
    t.check(
        held.header("x-mandate-approval-id") == Some(approval_id.as_str()),
        format!("an approval id, in the body and the x-mandate-approval-id header: {approval_id}"),
    );
    t.check(tool.requests() == before, "the tool never saw it");

    t.step(format!(
        "{APPROVER} approves that one call with the CLI; the agent retries it with the approval id"
    ));
    match operator_ok(t, cp, &["approve", &approval_id, "--by", APPROVER]).await {
        Ok(out) => {
            for line in out.lines().filter(|l| !l.trim().is_empty()) {
                t.info(format!("   {line}"));
            }
        }
        Err(e) => {
            t.check(false, e.to_string());
            return;
        }
    }
    let with_approval = [
        ("x-mandate-delegation", token),
        ("x-mandate-approval", approval_id.as_str()),
    ];
    t.info(format!(
        "GET {target}   x-mandate-delegation: <the token>   x-mandate-approval: {approval_id}"
    ));
    let Some(approved) = agent_get(t, w, &target, &with_approval).await else {
        return;
    };
    t.check(approved.status == 200, expected_200(&approved));
    expect_decision_header(t, w, &approved, "GET /v1/payroll, approved", true);
    if let Some(seen) = tool_saw(t, &approved) {
        t.check(
            seen["path"] == "/v1/payroll" && seen["headers"]["x-mandate-on-behalf-of"] == ALICE,
            format!("the tool received the approved call, on behalf of {ALICE}"),
        );
    }
    t.info("the same call, the same approval id, once more:");
    let Some(again) = agent_get(t, w, &target, &with_approval).await else {
        return;
    };
    t.info(format!("   {}", again.text().trim()));
    let reason = refusal(t, w, &again, "denied", "GET /v1/payroll, approval reused");
    t.check(
        reason.contains("already used"),
        format!("an approval allows one call: {reason}"),
    );
    t.check(
        tool.requests() == before + 1,
        "the tool received the payroll call exactly once",
    );
}

/// `mandate audit query --approver`: who approved, which agent, for whom, which grant and policy.
pub async fn audit_approver(t: &mut Transcript, w: &World, d: &Delegation, cp: &ControlPlane) {
    t.step(format!(
        "Who approved what: mandate audit query --approver {APPROVER}"
    ));
    // Both sidecars record the approved call: the agent's outbound and the tool's inbound.
    let Some(records) = audit_records(t, cp, &["--approver", APPROVER], |r| {
        ["outbound", "inbound"]
            .iter()
            .all(|dir| r.iter().any(|d| d["direction"] == *dir))
    })
    .await
    else {
        return;
    };
    let grant = d.grant_id.as_deref().unwrap_or("?");
    let agent_record = records.iter().find(|r| r["direction"] == "outbound");
    t.check(
        agent_record.is_some_and(|r| {
            r["allow"] == true
                && r["approval"]["approved_by"] == APPROVER
                && r["source"] == w.agent_id.as_str()
                && r["delegation"]["subject"] == ALICE
                && r["delegation"]["grant_id"] == grant
                && r["policy_version"].is_string()
        }),
        format!(
            "the agent's sidecar recorded it: approved by {APPROVER}, made by {AGENT}, on behalf of {ALICE}, under grant {grant}, policy version {}",
            agent_record
                .and_then(|r| r["policy_version"].as_str())
                .unwrap_or("?")
        ),
    );
    t.check(
        records.iter().any(|r| {
            r["direction"] == "inbound"
                && r["allow"] == true
                && r["approval"]["approved_by"] == APPROVER
                && r["delegation"]["subject"] == ALICE
        }),
        "the tool's sidecar recorded the same approval, told by the agent's sidecar over mTLS",
    );
    t.check(
        records.iter().all(|r| r["path"] == "/v1/payroll"),
        format!("{APPROVER} approved nothing else"),
    );
}

/// Checks a refusal's status (403) and `error`, remembers its decision id, and returns its reason.
fn refusal(
    t: &mut Transcript,
    w: &mut World,
    response: &Response,
    error: &str,
    what: &'static str,
) -> String {
    let body = response.json().unwrap_or(Value::Null);
    t.check(
        response.status == 403 && body["error"] == error,
        format!(
            "status {} and error {} (expected 403 and {error})",
            response.status, body["error"]
        ),
    );
    let header = response.header("x-mandate-decision-id");
    t.check(
        header.is_some() && header == body["decision_id"].as_str(),
        "the refusal's decision_id is the x-mandate-decision-id header",
    );
    if let Some(id) = header {
        w.expected.push(Expected {
            what,
            decision_id: id.to_owned(),
            allow: false,
        });
    }
    body["reason"].as_str().unwrap_or("").to_owned()
}

/// The token with one character in the middle of its claims (the JWS payload) replaced by another
/// base64url character: still well-formed, but no longer what the control plane signed.
fn change_one_claims_byte(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    if let Some(payload) = parts.get_mut(1).filter(|p| !p.is_empty()) {
        let i = payload.len() / 2;
        let replacement = if payload.as_bytes()[i] == b'A' {
            "B"
        } else {
            "A"
        };
        payload.replace_range(i..=i, replacement);
    }
    parts.join(".")
}

/// The first UUID in `out`.
fn uuid_in(out: &str) -> Option<String> {
    out.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_owned)
}

/// `status 200 OK (expected 200)`, with the body when it is not.
fn expected_200(response: &Response) -> String {
    if response.status == 200 {
        return format!("status {} (expected 200)", response.status);
    }
    format!(
        "status {} (expected 200): {}",
        response.status,
        response.text().trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_of_the_claims_is_changed_and_nothing_else() {
        let token = "aGVhZGVy.cGF5bG9hZA.c2ln";
        let forged = change_one_claims_byte(token);
        assert_eq!(forged.len(), token.len());
        let (a, b): (Vec<_>, Vec<_>) = (token.split('.').collect(), forged.split('.').collect());
        assert_eq!(a[0], b[0]);
        assert_eq!(a[2], b[2]);
        let differing = a[1]
            .bytes()
            .zip(b[1].bytes())
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(differing, 1);
    }

    #[test]
    fn the_grant_id_is_found_in_what_create_printed() {
        let printed = "created grant 0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b for research\n";
        assert_eq!(
            uuid_in(printed).as_deref(),
            Some("0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b")
        );
        assert_eq!(uuid_in("no id"), None);
    }

    #[test]
    fn the_grant_is_within_the_ceiling_and_holds_its_one_sensitive_path() {
        let ceiling: Value = serde_json::from_str(super::super::CEILING).unwrap();
        for scope in GRANT_SCOPES {
            let scope: Value = serde_json::from_str(scope).unwrap();
            assert_eq!(scope["method"], "GET");
            assert!(scope["path"].as_str().unwrap().starts_with("/v1/"));
            assert_eq!(ceiling[1]["path"], "/v1/*");
        }
        let constraints: Value = serde_json::from_str(GRANT_CONSTRAINTS).unwrap();
        assert_eq!(
            constraints["require_approval"],
            json!([{"host": "tool", "path": "/v1/payroll"}])
        );
    }
}
