//! Opaque TCP routes: a local plain listener on the agent side tunnels every connection over mTLS to
//! the peer sidecar, which copies the bytes to its app — here a real PostgreSQL server reached by psql.

use std::process::Stdio;
use std::time::Duration;

use mandate_e2e::postgres::{Postgres, find_pg_bin};
use mandate_e2e::{TestEnv, within};

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_postgres_through_a_tcp_route() {
    let Some(psql) = find_pg_bin("psql") else {
        eprintln!(
            "SKIP: psql_reaches_postgres_through_a_tcp_route: psql not found (install postgresql-client)"
        );
        return;
    };
    let env = TestEnv::new("psql_tcp_route");
    env.run(LIMIT, async {
        let pg = match Postgres::start().await? {
            Ok(pg) => pg,
            Err(reason) => {
                eprintln!("SKIP: psql_reaches_postgres_through_a_tcp_route: {reason}");
                return Ok(());
            }
        };
        let db = env
            .sidecar("db")
            .identity("service/db")
            .app(pg.addr())
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .tcp_route_to("db:5432", &db)
            .spawn()
            .await?;
        let listen = agent.tcp_listen(0);

        let out = within(
            Duration::from_secs(30),
            "psql",
            tokio::process::Command::new(&psql)
                .args(["-h", "127.0.0.1", "-p", &listen.port().to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-X", "-t", "-A"])
                .args(["-c", "select 41+1"])
                .env("PGSSLMODE", "disable")
                .env("PGCONNECT_TIMEOUT", "10")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "psql failed ({}): stdout {stdout:?} stderr {stderr:?}\npostgres log:\n{}",
            out.status,
            pg.logs()
        );
        assert_eq!(stdout.trim(), "42", "stderr: {stderr}");
        Ok(())
    })
    .await;
}

/// A raw TCP echo server; returns its address and a counter of the bytes it received.
async fn tcp_echo() -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf).await {
                    count.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, accepted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_carries_raw_bytes_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new("tcp_route_echo");
    env.run(LIMIT, async {
        let (echo, _) = tcp_echo().await?;
        let svc = env
            .sidecar("svc")
            .identity("service/echo")
            .app(echo)
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .tcp_route_to("echo:7", &svc)
            .spawn()
            .await?;
        let mut tcp = tokio::net::TcpStream::connect(agent.tcp_listen(0)).await?;
        // Not HTTP at all: binary bytes, in several round trips on one connection.
        for round in 0u8..3 {
            let msg = [0u8, 255, 13, 10, round, 0x16, 0x03, 0x01];
            tcp.write_all(&msg).await?;
            let mut back = [0u8; 8];
            within(Duration::from_secs(10), "echo", tcp.read_exact(&mut back)).await??;
            assert_eq!(back, msg);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_to_a_peer_with_another_identity_carries_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new("tcp_route_mismatch");
    env.run(LIMIT, async {
        let (echo, received) = tcp_echo().await?;
        let svc = env
            .sidecar("svc")
            .identity("service/echo")
            .app(echo)
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .tcp_route("echo:7", svc.inbound(), &env.pki().id("service/db"))
            .spawn()
            .await?;
        let mut tcp = tokio::net::TcpStream::connect(agent.tcp_listen(0)).await?;
        let _ = tcp.write_all(b"hello?").await;
        let mut buf = Vec::new();
        let read = within(
            Duration::from_secs(10),
            "tunnel closed",
            tcp.read_to_end(&mut buf),
        )
        .await?;
        assert!(
            buf.is_empty(),
            "no byte may come back from an unverified peer: {read:?} {buf:?}"
        );
        assert_eq!(
            received.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no byte may be sent to the app behind an unverified peer"
        );
        Ok(())
    })
    .await;
}
