//! Delegation with consent, end to end: `mandate serve`, the operator CLI, managed sidecars and the
//! reference policy. A person's grant lets an agent act for them within its ceiling; the token the
//! control plane issues from it is bound to the agent's certificate, checked by every sidecar it
//! passes, exchanged for a nested one when an agent hands the work on, and refused — naming the
//! check — whenever it is stolen, stale, forged, aimed elsewhere or revoked. Per-action approval:
//! a call the policy holds for a person is refused with an approval id, approved with
//! `mandate approve`, and allowed exactly once.

use std::time::Duration;

use http::Request;
use mandate_e2e::apps::{App, Seen};
use mandate_e2e::client::{Collected, Http1, empty, full, proxy_get, proxy_request};
use mandate_e2e::control_plane::{CliOutput, join_token_in};
use mandate_e2e::policy::reference_policy;
use mandate_e2e::{ControlPlane, Sidecar, SidecarBuilder, TestEnv, ensure_eq, eventually};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(120);
/// How long a pushed change may take to reach a sidecar here (the target is 1 s).
const PUSH: Duration = Duration::from_secs(10);

const ALICE: &str = "alice@example.com";
const RESEARCH: &str = "spiffe://mandate.local/agent/research";
const PLANNER: &str = "spiffe://mandate.local/agent/planner";

/// A control plane with the reference policy in force, the tool `tool` (a service in front of
/// `app`) and agents, each behind its own managed sidecar.
struct Mesh {
    cp: ControlPlane,
    tool: Sidecar,
}

impl Mesh {
    async fn start(env: &TestEnv, app: &App) -> anyhow::Result<Self> {
        let cp = env.control_plane("cp").spawn().await?;
        cp.cli_ok(&["policy", "push", &reference_policy().display().to_string()])
            .await?;
        let token = join_token_in(
            &cp.cli_ok(&[
                "service",
                "register",
                "tool",
                "--owner",
                "tools@example.com",
            ])
            .await?,
        )?;
        let tool = env
            .sidecar("tool")
            .managed(&cp, &token)
            .app(app.addr())
            .spawn()
            .await?;
        Ok(Self { cp, tool })
    }

    /// Registers agent `name` with `ceiling` and no autonomous scopes (every call it makes needs a
    /// delegation), and starts its sidecar routing `tool:8080` to the tool.
    async fn agent(&self, env: &TestEnv, name: &str, ceiling: Value) -> anyhow::Result<Sidecar> {
        self.agent_with(env, name, ceiling, |b| b).await
    }

    async fn agent_with(
        &self,
        env: &TestEnv,
        name: &str,
        ceiling: Value,
        extra: impl FnOnce(SidecarBuilder<'_>) -> SidecarBuilder<'_>,
    ) -> anyhow::Result<Sidecar> {
        let mut args = vec![
            "agent".to_owned(),
            "register".to_owned(),
            name.to_owned(),
            "--owner".to_owned(),
            ALICE.to_owned(),
        ];
        for scope in ceiling.as_array().into_iter().flatten() {
            args.extend(["--ceiling".to_owned(), scope.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let token = join_token_in(&self.cp.cli_ok(&args).await?)?;
        let builder = env
            .sidecar(name)
            .managed(&self.cp, &token)
            .route_to("tool:8080", &self.tool);
        extra(builder).spawn().await
    }

    /// `mandate grant create` for `agent`, on behalf of alice, approved by her; returns the grant id.
    async fn grant(&self, agent: &str, scopes: &[Value], extra: &[&str]) -> anyhow::Result<String> {
        let out = grant_create(&self.cp, agent, scopes, extra).await?;
        anyhow::ensure!(out.success, "grant create failed:\n{}", out.stderr);
        uuid_in(&out.stdout)
    }
}

/// `mandate grant create` for `agent` on behalf of alice, approved by her, with `extra` flags.
async fn grant_create(
    cp: &ControlPlane,
    agent: &str,
    scopes: &[Value],
    extra: &[&str],
) -> anyhow::Result<CliOutput> {
    let scopes: Vec<String> = scopes.iter().map(Value::to_string).collect();
    let mut args = vec![
        "grant",
        "create",
        "--agent",
        agent,
        "--subject",
        ALICE,
        "--purpose",
        "prepare the quarterly report",
        "--approved-by",
        ALICE,
    ];
    for scope in &scopes {
        args.extend(["--scope", scope.as_str()]);
    }
    args.extend_from_slice(extra);
    cp.cli(&args).await
}

/// The first UUID in `out`.
fn uuid_in(out: &str) -> anyhow::Result<String> {
    out.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no id in:\n{out}"))
}

/// The delegation token for `grant`, fetched the way an agent does: from its own sidecar's admin
/// listener, which asks the control plane over mTLS with the agent's SVID.
async fn token(agent: &Sidecar, grant: &str, audience: &[&str]) -> anyhow::Result<String> {
    let body = json!({"grant_id": grant, "audience": audience}).to_string();
    let req = Request::post("/delegation/token")
        .header("host", agent.admin().to_string())
        .header("content-type", "application/json")
        .body(full(body))?;
    let resp = Http1::connect(agent.admin()).await?.fetch(req).await?;
    ensure_eq!(resp.status, 200, "token for {grant}: {}", resp.text());
    Ok(resp.json()?["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no token in {}", resp.text()))?
        .to_owned())
}

/// `METHOD http://tool:8080{path}` through `agent`'s outbound listener with `headers`.
async fn call(
    agent: &Sidecar,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Collected> {
    let mut req = proxy_request(method, &format!("http://tool:8080{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Http1::connect(agent.outbound())
        .await?
        .fetch(req.body(empty())?)
        .await
}

/// The `reason` of a refusal, checking its status and `error`.
fn refusal(resp: &Collected, status: u16, error: &str) -> anyhow::Result<String> {
    ensure_eq!(resp.status, status, "{}", resp.text());
    let body = resp.json()?;
    ensure_eq!(body["error"], error, "{body}");
    Ok(body["reason"].as_str().unwrap_or_default().to_owned())
}

fn ensure_mentions(reason: &str, words: &[&str]) -> anyhow::Result<()> {
    for w in words {
        anyhow::ensure!(reason.contains(w), "reason {reason:?} should mention {w:?}");
    }
    Ok(())
}

/// What a sidecar stamped for its app: on alice's behalf, through `actors` (oldest first).
fn ensure_stamped(seen: &Seen, actors: &[&str]) -> anyhow::Result<()> {
    ensure_eq!(
        seen.header_all("x-mandate-on-behalf-of"),
        vec![ALICE.to_owned()],
        "on whose behalf, as verified"
    );
    ensure_eq!(
        seen.header_all("x-mandate-delegation-chain"),
        vec![actors.join(",")],
        "the chain of actors, oldest first"
    );
    Ok(())
}

async fn ready(sidecars: &[&Sidecar]) -> anyhow::Result<()> {
    for s in sidecars {
        eventually(PUSH, &format!("{} ready", s.name()), || async {
            Ok(s.is_ready().await)
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_granted_call_is_allowed_and_the_tool_sees_on_whose_behalf_within_the_grant_only() {
    let env = TestEnv::new("deleg-granted");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let mesh = Mesh::start(&env, &app).await?;
        let research = mesh
            .agent(&env, "research", json!([{"host": "tool"}]))
            .await?;
        ready(&[&research, &mesh.tool]).await?;

        // No delegation and no autonomous scopes: the agent may not act on its own.
        let alone = call(&research, "GET", "/docs/q3", &[]).await?;
        ensure_mentions(&refusal(&alone, 403, "denied")?, &["on its own"])?;

        let grant = mesh
            .grant(
                "research",
                &[json!({"host": "tool", "path": "/docs/*"})],
                &[],
            )
            .await?;
        let token = token(&research, &grant, &[]).await?;
        let resp = call(
            &research,
            "GET",
            "/docs/q3",
            &[
                ("x-mandate-delegation", &token),
                // Whatever the agent claims itself is replaced by what was verified.
                ("x-mandate-on-behalf-of", "mallory@example.com"),
            ],
        )
        .await?;
        ensure_eq!(resp.status, 200, "granted call: {}", resp.text());
        let seen = app.seen();
        let at_tool = seen.last().expect("the tool saw the call");
        ensure_stamped(at_tool, &[RESEARCH])?;
        ensure_eq!(
            at_tool.header_all("x-mandate-grant"),
            vec![grant.clone()],
            "the grant"
        );
        ensure_eq!(
            at_tool.header_all("x-mandate-delegation"),
            Vec::<String>::new(),
            "a tool never receives the token itself"
        );

        // Within the ceiling but outside the grant: denied, naming the person.
        let outside = call(
            &research,
            "GET",
            "/admin",
            &[("x-mandate-delegation", &token)],
        )
        .await?;
        ensure_mentions(
            &refusal(&outside, 403, "denied")?,
            &["not granted by the delegation from", ALICE],
        )?;

        // The audit log says which agent acted, for whom, under which grant and policy version.
        eventually(PUSH, "the delegated call in the audit log", || async {
            let records = mesh
                .cp
                .audit(&["--grant", &grant, "--result", "allow"])
                .await?;
            Ok(records.iter().any(|r| {
                r["source"] == RESEARCH
                    && r["delegation"]["subject"] == ALICE
                    && r["delegation"]["grant_id"] == grant.as_str()
                    && r["policy_version"] == "1"
            }))
        })
        .await
    })
    .await;
}

#[tokio::test]
async fn a_token_presented_by_another_agent_is_refused_for_its_binding() {
    let env = TestEnv::new("deleg-binding");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let mesh = Mesh::start(&env, &app).await?;
        let research = mesh
            .agent(&env, "research", json!([{"host": "tool"}]))
            .await?;
        let thief = mesh.agent(&env, "thief", json!([{"host": "tool"}])).await?;
        ready(&[&research, &thief, &mesh.tool]).await?;
        let grant = mesh
            .grant("research", &[json!({"host": "tool"})], &[])
            .await?;
        let stolen = token(&research, &grant, &[]).await?;

        let resp = call(
            &thief,
            "GET",
            "/docs/q3",
            &[("x-mandate-delegation", &stolen)],
        )
        .await?;
        ensure_mentions(
            &refusal(&resp, 403, "delegation_refused")?,
            &["certificate"],
        )?;
        ensure_eq!(app.request_count(), 0, "nothing reached the tool");

        // The thief cannot fetch a token for someone else's grant either.
        let body = json!({"grant_id": grant}).to_string();
        let req = Request::post("/delegation/token")
            .header("host", thief.admin().to_string())
            .header("content-type", "application/json")
            .body(full(body))?;
        let resp = Http1::connect(thief.admin()).await?.fetch(req).await?;
        ensure_eq!(resp.status, 403, "another agent's grant: {}", resp.text());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn expired_tampered_misaddressed_and_revoked_tokens_are_each_refused_naming_the_check() {
    let env = TestEnv::new("deleg-refusals");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let mesh = Mesh::start(&env, &app).await?;
        // No clock leeway here, so that a token one second past its expiry is expired.
        let research = mesh
            .agent_with(&env, "research", json!([{"host": "tool"}]), |b| {
                b.arg("--delegation-leeway").arg("0s")
            })
            .await?;
        ready(&[&research, &mesh.tool]).await?;
        let scope = [json!({"host": "tool"})];
        let refused = |resp: Collected, words: &'static [&'static str]| async move {
            ensure_mentions(&refusal(&resp, 403, "delegation_refused")?, words)
        };

        // Expired: a grant of one second bounds the token's lifetime.
        let brief = mesh.grant("research", &scope, &["--ttl", "1s"]).await?;
        let expired = token(&research, &brief, &[]).await?;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        refused(
            call(
                &research,
                "GET",
                "/x",
                &[("x-mandate-delegation", &expired)],
            )
            .await?,
            &["expired"],
        )
        .await?;

        // Tampered: the claims changed after signing (a wider scope), so the signature fails.
        let grant = mesh.grant("research", &scope, &[]).await?;
        let good = token(&research, &grant, &[]).await?;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let last = parts[1].pop().expect("a payload");
        parts[1].push(if last == 'A' { 'B' } else { 'A' });
        refused(
            call(
                &research,
                "GET",
                "/x",
                &[("x-mandate-delegation", &parts.join("."))],
            )
            .await?,
            &["signature"],
        )
        .await?;

        // Wrong audience: a token for another service is no use at this one.
        let elsewhere = token(
            &research,
            &grant,
            &["spiffe://mandate.local/service/billing"],
        )
        .await?;
        refused(
            call(
                &research,
                "GET",
                "/x",
                &[("x-mandate-delegation", &elsewhere)],
            )
            .await?,
            &["audience"],
        )
        .await?;

        // Revoked: the revocation reaches the sidecar and the same token stops working.
        let resp = call(&research, "GET", "/x", &[("x-mandate-delegation", &good)]).await?;
        ensure_eq!(resp.status, 200, "before revocation: {}", resp.text());
        mesh.cp.cli_ok(&["grant", "revoke", &grant]).await?;
        eventually(PUSH, "the revoked grant refused", || async {
            let resp = call(&research, "GET", "/x", &[("x-mandate-delegation", &good)]).await?;
            Ok(resp.status == 403 && resp.text().contains("revoked"))
        })
        .await?;
        // From then on nothing more reaches the tool with that token.
        let arrived = app.request_count();
        let after = call(&research, "GET", "/x", &[("x-mandate-delegation", &good)]).await?;
        ensure_mentions(&refusal(&after, 403, "delegation_refused")?, &["revoked"])?;
        ensure_eq!(app.request_count(), arrived, "nothing after revocation");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_grant_beyond_the_agents_ceiling_is_refused_at_creation_naming_the_excess() {
    let env = TestEnv::new("deleg-ceiling");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").spawn().await?;
        cp.cli_ok(&[
            "agent",
            "register",
            "research",
            "--owner",
            ALICE,
            "--ceiling",
            r#"{"host": "tool", "tool": "read_*"}"#,
        ])
        .await?;
        let refused = grant_create(
            &cp,
            "research",
            &[
                json!({"host": "tool", "tool": "read_docs"}),
                json!({"host": "tool", "tool": "delete_*"}),
            ],
            &[],
        )
        .await?;
        anyhow::ensure!(!refused.success, "a grant beyond the ceiling was created");
        ensure_mentions(&refused.stderr, &["scopes[1]", "delete_*", "ceiling"])?;
        let listed = cp.cli_ok(&["grant", "list", "--agent", "research"]).await?;
        anyhow::ensure!(
            !listed.contains("delete_"),
            "nothing half-created: {listed}"
        );

        // Within the ceiling: created.
        let created = grant_create(
            &cp,
            "research",
            &[json!({"host": "tool", "tool": "read_docs"})],
            &[],
        )
        .await?;
        anyhow::ensure!(
            created.success,
            "a grant within the ceiling: {}",
            created.stderr
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_chain_from_planner_through_research_to_the_tool_is_verified_and_recorded() {
    let env = TestEnv::new("deleg-chain");
    env.run(LIMIT, async {
        let tool_app = App::start().await?;
        let research_app = App::start().await?;
        let mesh = Mesh::start(&env, &tool_app).await?;
        // research is an agent with its own app (it is called, and calls on); planner reaches it.
        let research = mesh
            .agent_with(&env, "research", json!([{"host": "tool"}]), |b| {
                b.app(research_app.addr())
            })
            .await?;
        let planner = mesh
            .agent_with(
                &env,
                "planner",
                json!([{"host": "research"}, {"host": "tool"}]),
                |b| b.route_to("research:8080", &research),
            )
            .await?;
        ready(&[&research, &planner, &mesh.tool]).await?;
        let grant = mesh
            .grant(
                "planner",
                &[
                    json!({"host": "research"}),
                    json!({"host": "tool", "path": "/docs/*"}),
                ],
                &[],
            )
            .await?;
        let planner_token = token(&planner, &grant, &[]).await?;

        // planner → research, for alice.
        let resp = proxy_get(
            planner.outbound(),
            "http://research:8080/summarise",
            &[("x-mandate-delegation", &planner_token)],
        )
        .await?;
        ensure_eq!(resp.status, 200, "planner → research: {}", resp.text());
        let seen = research_app.seen();
        let at_research = seen.last().expect("research's app saw the call");
        ensure_stamped(at_research, &[PLANNER])?;
        // research's sidecar exchanged planner's token for one naming research as the actor.
        let handed_on = at_research.header_all("x-mandate-delegation");
        let research_token = handed_on.first().ok_or_else(|| {
            anyhow::anyhow!("research's app got no token to pass on: {:?}", at_research)
        })?;
        anyhow::ensure!(
            *research_token != planner_token,
            "a new token, not planner's"
        );

        // planner's own token is bound to planner: research cannot use it directly.
        let direct = call(
            &research,
            "GET",
            "/docs/q3",
            &[("x-mandate-delegation", &planner_token)],
        )
        .await?;
        refusal(&direct, 403, "delegation_refused")?;

        // research → tool with the exchanged token, as research's app propagates it.
        let resp = call(
            &research,
            "GET",
            "/docs/q3",
            &[("x-mandate-delegation", research_token)],
        )
        .await?;
        ensure_eq!(resp.status, 200, "research → tool: {}", resp.text());
        let seen = tool_app.seen();
        let at_tool = seen.last().expect("the tool saw the call");
        ensure_stamped(at_tool, &[PLANNER, RESEARCH])?;

        // Outside alice's grant even with the chain: denied.
        let outside = call(
            &research,
            "GET",
            "/admin",
            &[("x-mandate-delegation", research_token)],
        )
        .await?;
        refusal(&outside, 403, "denied")?;

        // The tool's decision records the whole chain, oldest first.
        eventually(PUSH, "the chained call in the audit log", || async {
            let records = mesh
                .cp
                .audit(&["--grant", &grant, "--result", "allow"])
                .await?;
            Ok(records.iter().any(|r| {
                r["direction"] == "inbound"
                    && r["source"] == RESEARCH
                    && r["delegation"]["actors"] == json!([PLANNER, RESEARCH])
            }))
        })
        .await
    })
    .await;
}

#[tokio::test]
async fn a_held_call_is_allowed_once_after_a_person_approves_it_and_the_audit_names_them() {
    let env = TestEnv::new("deleg-approval");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let mesh = Mesh::start(&env, &app).await?;
        let research = mesh
            .agent(&env, "research", json!([{"host": "tool"}]))
            .await?;
        ready(&[&research, &mesh.tool]).await?;
        let constraints =
            json!({"require_approval": [{"host": "tool", "path": "/payments/*"}]}).to_string();
        let grant = mesh
            .grant(
                "research",
                &[json!({"host": "tool"})],
                &["--constraints", &constraints],
            )
            .await?;
        let token = token(&research, &grant, &[]).await?;
        let delegated = [("x-mandate-delegation", token.as_str())];

        let held = call(&research, "POST", "/payments/17", &delegated).await?;
        ensure_mentions(&refusal(&held, 403, "approval_required")?, &["approval"])?;
        let approval_id = held.json()?["approval_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ensure_eq!(
            held.header("x-mandate-approval-id"),
            approval_id,
            "the id in a header too"
        );
        ensure_eq!(app.request_count(), 0, "nothing reached the tool");

        // Listed for a person; retrying before approval is still refused.
        let pending = mesh.cp.cli_ok(&["approve", "--pending"]).await?;
        anyhow::ensure!(pending.contains(&approval_id), "pending list: {pending}");
        let with_approval = [
            ("x-mandate-delegation", token.as_str()),
            ("x-mandate-approval", approval_id.as_str()),
        ];
        let early = call(&research, "POST", "/payments/17", &with_approval).await?;
        ensure_mentions(&refusal(&early, 403, "denied")?, &["pending"])?;

        // An approval is for the call it was asked for, not another.
        mesh.cp
            .cli_ok(&["approve", &approval_id, "--by", "bob@example.com"])
            .await?;
        let other = call(&research, "POST", "/payments/18", &with_approval).await?;
        ensure_mentions(&refusal(&other, 403, "denied")?, &["does not match"])?;

        let approved = call(&research, "POST", "/payments/17", &with_approval).await?;
        ensure_eq!(approved.status, 200, "approved retry: {}", approved.text());
        ensure_eq!(app.request_count(), 1, "the approved call arrived");
        let again = call(&research, "POST", "/payments/17", &with_approval).await?;
        ensure_mentions(&refusal(&again, 403, "denied")?, &["already used"])?;
        ensure_eq!(app.request_count(), 1, "once only");

        // Who approved this call, which agent made it, for whom, under which grant and policy.
        eventually(PUSH, "the approved call in the audit log", || async {
            let records = mesh.cp.audit(&["--approver", "bob@example.com"]).await?;
            Ok(records.iter().any(|r| {
                r["allow"] == true
                    && r["source"] == RESEARCH
                    && r["approval"]["id"] == approval_id.as_str()
                    && r["approval"]["approved_by"] == "bob@example.com"
                    && r["delegation"]["subject"] == ALICE
                    && r["delegation"]["grant_id"] == grant.as_str()
                    && r["policy_version"] == "1"
            }))
        })
        .await
    })
    .await;
}
