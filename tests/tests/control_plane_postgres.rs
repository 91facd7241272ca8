//! Two `mandate serve` replicas on one PostgreSQL database serve sidecars together: a change made
//! through either replica reaches sidecars streaming from the other.

use std::time::{Duration, Instant};

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::policy::rego;
use mandate_e2e::postgres::Postgres;
use mandate_e2e::{TestEnv, ensure_eq, eventually};

const LIMIT: Duration = Duration::from_secs(150);

const POLICY: &str = r#"default decision := {"allow": false, "reason": "not active"}

decision := {"allow": true, "reason": "active"} if input.registry.status == "active""#;

#[tokio::test]
async fn two_replicas_on_postgresql_share_registry_policy_revocations_and_decisions() {
    let pg = match Postgres::start().await {
        Ok(Ok(pg)) => pg,
        Ok(Err(why)) => {
            println!("SKIP: {why}");
            return;
        }
        Err(e) => panic!("starting PostgreSQL: {e:#}"),
    };
    let url = format!("postgres://postgres@{}/postgres", pg.addr());
    let env = TestEnv::new("cp-postgres");
    env.run(LIMIT, async {
        // One after the other: the first creates the CA, the second finds it in the database.
        let one = env.control_plane("cp1").database_url(&url).spawn().await?;
        let two = env.control_plane("cp2").database_url(&url).spawn().await?;
        ensure_eq!(
            std::fs::read_to_string(one.ca_pem())?,
            std::fs::read_to_string(two.ca_pem())?,
            "both replicas serve the same CA"
        );

        // Registered through different replicas; each sidecar enrols with a different one.
        let tool_token = two.register_service("tool").await?;
        let agent_token = one.register_agent("research", "[]").await?;
        let listed = two.cli_ok(&["agent", "list"]).await?;
        anyhow::ensure!(
            listed.contains("research"),
            "replica 2 lists replica 1's agent:\n{listed}"
        );

        let app = App::start().await?;
        let tool = env
            .sidecar("tool")
            .managed(&two, &tool_token)
            .app(app.addr())
            .spawn_live()
            .await?;
        let agent = env
            .sidecar("agent")
            .managed(&one, &agent_token)
            .route_to("tool:8080", &tool)
            .spawn_live()
            .await?;

        // A bundle pushed through replica 2 reaches the agent streaming from replica 1.
        let dir = env.dir().join("bundle");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("authz.rego"), rego(POLICY))?;
        two.cli_ok(&["policy", "push", &dir.display().to_string()])
            .await?;
        eventually(
            Duration::from_secs(10),
            "agent ready with replica 2's bundle",
            || async { Ok(agent.is_ready().await) },
        )
        .await?;
        let resp = proxy_get(agent.outbound(), "http://tool:8080/x", &[]).await?;
        ensure_eq!(resp.status, 200, "allowed call: {}", resp.text());

        // Revoked through replica 2; the agent's sidecar hears it through replica 1 within a second.
        two.cli_ok(&["agent", "revoke", "research"]).await?;
        let revoked_at = Instant::now();
        eventually(
            Duration::from_secs(5),
            "the revocation crosses replicas",
            || async {
                Ok(proxy_get(agent.outbound(), "http://tool:8080/x", &[])
                    .await?
                    .status
                    == 403)
            },
        )
        .await?;
        let took = revoked_at.elapsed();
        anyhow::ensure!(
            took <= Duration::from_millis(1500),
            "revocation took {took:?} to cross replicas (target 1 s)"
        );

        // Decisions sent to replica 1 are queryable through replica 2.
        eventually(
            Duration::from_secs(10),
            "decisions visible on the other replica",
            || async {
                let records = two.audit(&["--agent", "research"]).await?;
                Ok(records.iter().any(|r| r["allow"] == true)
                    && records.iter().any(|r| r["allow"] == false))
            },
        )
        .await?;
        drop(pg);
        Ok(())
    })
    .await;
}
