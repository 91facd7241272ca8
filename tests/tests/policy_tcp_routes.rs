//! Policy on opaque TCP routes (`listen=`): decided once per connection on identity and destination.
//! An allowed route carries bytes both ways; a denied one is closed before anything reaches the app.

use std::time::Duration;

use mandate_e2e::apps::TcpEcho;
use mandate_e2e::policy::{reference_policy, registry};
use mandate_e2e::{TestEnv, ensure_eq, within};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_within_the_ceiling_carries_bytes_and_one_outside_is_closed_before_reaching_the_app()
 {
    let env = TestEnv::new("tcp_policy");
    env.run(LIMIT, async {
        let db_app = TcpEcho::start().await?;
        let cache_app = TcpEcho::start().await?;
        let db = env
            .sidecar("db")
            .identity("service/db")
            .app(db_app.addr())
            .spawn()
            .await?;
        let cache = env
            .sidecar("cache")
            .identity("service/cache")
            .app(cache_app.addr())
            .spawn()
            .await?;
        let data = env.data_file(
            "registry",
            &registry(
                "research",
                json!([{"host": "db", "protocol": "tcp", "port": 5432}]),
            ),
        )?;
        let agent = env
            .sidecar("agent")
            .identity("agent/research")
            .tcp_route_to("db:5432", &db)
            .tcp_route_to("cache:6379", &cache)
            .policy(&reference_policy())
            .data(&data)
            .decision_log()
            .spawn()
            .await?;

        // Outside the ceiling: the connection is closed and no byte reaches the cache.
        let mut denied = tokio::net::TcpStream::connect(agent.tcp_listen(1)).await?;
        let _ = denied.write_all(b"SET k v\r\n").await;
        let mut back = Vec::new();
        let read = within(
            Duration::from_secs(10),
            "the denied connection to be closed",
            denied.read_to_end(&mut back),
        )
        .await?;
        anyhow::ensure!(
            back.is_empty(),
            "nothing may come back on a denied TCP route: {read:?} {back:?}"
        );
        ensure_eq!(
            (cache_app.connections(), cache_app.bytes_received()),
            (0, 0),
            "the app behind a denied TCP route must see no connection and no byte"
        );
        let record = agent
            .decision_where("the denied TCP connection to cache", |r| {
                r["destination"]["host"] == "cache"
            })
            .await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["enforced"], true, "{record}");
        ensure_eq!(record["direction"], "outbound", "{record}");
        ensure_eq!(record["destination"]["port"], 6379, "{record}");
        ensure_eq!(
            record["reason"],
            "research may not open TCP to cache:6379: outside its ceiling",
            "{record}"
        );
        anyhow::ensure!(
            record.get("method").is_none() && record.get("path").is_none(),
            "a TCP decision has no HTTP method or path: {record}"
        );

        // Within the ceiling: bytes flow both ways.
        let mut allowed = tokio::net::TcpStream::connect(agent.tcp_listen(0)).await?;
        for round in 0u8..3 {
            let msg = [0u8, 255, 13, 10, round];
            allowed.write_all(&msg).await?;
            let mut echo = [0u8; 5];
            within(
                Duration::from_secs(10),
                "the echo",
                allowed.read_exact(&mut echo),
            )
            .await??;
            ensure_eq!(echo, msg, "round {round}");
        }
        ensure_eq!(db_app.connections(), 1, "one connection reached the db app");
        let record = agent
            .decision_where("the allowed TCP connection to db", |r| {
                r["destination"]["host"] == "db"
            })
            .await?;
        ensure_eq!(record["allow"], true, "{record}");
        ensure_eq!(record["destination"]["port"], 5432, "{record}");
        ensure_eq!(record["destination"]["spiffe_id"], db.id(), "{record}");
        ensure_eq!(
            record["reason"],
            "research may open TCP to db:5432",
            "{record}"
        );
        Ok(())
    })
    .await;
}
