//! Destinations outside the mesh follow the policy: a `CONNECT` tunnel (what `HTTPS_PROXY` sends)
//! to an allowed external host carries bytes both ways; one the policy does not allow gets a 403
//! with the reason and never connects; plain HTTP to an external host is refused, so nothing
//! leaves the pod in clear text.

use std::time::Duration;

use mandate_e2e::apps::TcpEcho;
use mandate_e2e::client::connect_tunnel;
use mandate_e2e::policy::{reference_policy, registry};
use mandate_e2e::{TestEnv, ensure_eq, within};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_external_host_is_tunnelled_and_others_are_refused() {
    let env = TestEnv::new("external");
    env.run(LIMIT, async {
        let allowed = TcpEcho::start().await?;
        let other = TcpEcho::start().await?;
        let data = env.data_file(
            "registry",
            &registry(
                "research",
                json!([{"host": "127.0.0.1", "protocol": "tcp", "port": allowed.addr().port()}]),
            ),
        )?;
        let agent = env
            .sidecar("agent")
            .identity("agent/research")
            .policy(&reference_policy())
            .data(&data)
            .decision_log()
            .spawn()
            .await?;

        let mut tunnel = TcpStream::connect(agent.outbound()).await?;
        let head = connect_tunnel(&mut tunnel, &allowed.addr().to_string()).await?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        tunnel.write_all(b"hello, outside").await?;
        let mut back = [0u8; 14];
        within(
            Duration::from_secs(10),
            "the echo",
            tunnel.read_exact(&mut back),
        )
        .await??;
        ensure_eq!(&back, b"hello, outside", "bytes cross the tunnel both ways");
        let record = agent
            .decision_where("the allowed tunnel", |r| {
                r["destination"]["port"] == allowed.addr().port()
            })
            .await?;
        ensure_eq!(record["allow"], true, "{record}");

        let mut refused = TcpStream::connect(agent.outbound()).await?;
        let head = connect_tunnel(&mut refused, &other.addr().to_string()).await?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 403"), "{head}");
        ensure_eq!(other.connections(), 0, "a refused tunnel never connects");
        let record = agent
            .decision_where("the refused tunnel", |r| {
                r["destination"]["port"] == other.addr().port()
            })
            .await?;
        ensure_eq!(record["allow"], false, "{record}");

        let mut plain = TcpStream::connect(agent.outbound()).await?;
        let target = allowed.addr();
        plain
            .write_all(
                format!("GET http://{target}/ HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut answer = vec![0u8; 4096];
        let n = within(
            Duration::from_secs(10),
            "the plain HTTP answer",
            plain.read(&mut answer),
        )
        .await??;
        let answer = String::from_utf8_lossy(&answer[..n]);
        anyhow::ensure!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        anyhow::ensure!(
            answer.contains("plain HTTP to a destination outside the mesh"),
            "{answer}"
        );
        ensure_eq!(
            allowed.connections(),
            1,
            "only the tunnel reached the allowed host"
        );
        Ok(())
    })
    .await;
}
