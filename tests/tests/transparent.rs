//! Transparent interception: an iptables REDIRECT sends an unaware client's connection to the
//! agent sidecar's outbound listener, which recovers the original destination with
//! `SO_ORIGINAL_DST` and picks the route by it — HTTP and opaque TCP alike; a redirected
//! connection to a destination with no route is refused.
//!
//! Needs root, `ip` and `iptables`. The test re-runs itself inside a private network namespace,
//! so its nat rules live and die with that namespace and never touch the host's.

use std::time::Duration;

use http::Request;
use mandate_e2e::apps::{App, TcpEcho};
use mandate_e2e::client::{Http1, empty};
use mandate_e2e::netns::{self, Netns};
use mandate_e2e::{TestEnv, pod, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const TEST: &str = "transparent_interception_picks_routes_by_original_destination";
/// Printed by the inner run when the whole scenario passed, so the outer run knows it really ran.
const DONE: &str = "transparent interception scenario passed";
const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_interception_picks_routes_by_original_destination() {
    if netns::inside() {
        scenario().await;
        return;
    }
    let tools = [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
    ];
    if let Some(why) = pod::missing_prerequisites(&tools).await {
        eprintln!("SKIP: {TEST}: {why}");
        return;
    }
    let ns = Netns::create("transparent")
        .await
        .expect("network namespace created");
    ns.rerun_inside(TEST, DONE, LIMIT).await.unwrap();
}

async fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs inside the namespace: loopback addresses 127.0.0.2-4 stand for other pods' IPs.
async fn scenario() {
    let env = TestEnv::new("transparent");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let echo = TcpEcho::start().await?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let db = env
            .sidecar("db")
            .identity("service/db")
            .app(echo.addr())
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route(format!(
                "127.0.0.2:8080={},id={}",
                tool.inbound(),
                tool.id()
            ))
            .route(format!(
                "127.0.0.3:5432={},id={},protocol=tcp",
                db.inbound(),
                db.id()
            ))
            .spawn()
            .await?;
        // What the Kubernetes init container does for a pod, narrowed to the test's addresses.
        let outbound = agent.outbound().port().to_string();
        run(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "127.0.0.2,127.0.0.3,127.0.0.4",
                "-j",
                "REDIRECT",
                "--to-ports",
                &outbound,
            ],
        )
        .await;

        // HTTP: the client talks to 127.0.0.2:8080 as if the tool were there, and sends a forged
        // identity header for good measure.
        let mut http = Http1::connect("127.0.0.2:8080".parse()?).await?;
        let req = Request::get("/hello?via=redirect")
            .header("host", "127.0.0.2:8080")
            .header("x-mandate-peer", "spiffe://mandate.local/agent/admin")
            .body(empty())?;
        let resp = http.fetch(req).await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());
        let seen = app.seen();
        let last = seen.last().expect("the app saw the request");
        assert_eq!(last.uri, "/hello?via=redirect");
        assert_eq!(
            last.header_all("x-mandate-peer"),
            vec![agent.id().to_owned()]
        );
        let xfcc = last.header_all("x-forwarded-client-cert").join(",");
        assert!(
            xfcc.contains(&format!("URI={}", agent.id())),
            "x-forwarded-client-cert: {xfcc}"
        );

        // Opaque TCP: bytes to 127.0.0.3:5432 come back from the echo app behind the db sidecar.
        let mut tcp = tokio::net::TcpStream::connect("127.0.0.3:5432").await?;
        let msg = b"\x00\x00\x00\x08\x04\xd2\x16\x2f not http";
        tcp.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        within(
            Duration::from_secs(10),
            "echo through the TCP route",
            tcp.read_exact(&mut back),
        )
        .await??;
        assert_eq!(back, msg);
        assert!(echo.connections() >= 1);

        // No route for 127.0.0.4: the redirected connection is closed without reaching anything.
        let mut stray = tokio::net::TcpStream::connect("127.0.0.4:9999").await?;
        let _ = stray.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let n = within(
            Duration::from_secs(10),
            "the refused connection to close",
            stray.read(&mut buf),
        )
        .await?
        .unwrap_or(0);
        assert_eq!(n, 0, "got {:?}", String::from_utf8_lossy(&buf[..n]));
        assert!(
            agent
                .logs()
                .contains("redirected connection to a destination outside the mesh refused"),
            "agent log:\n{}",
            agent.logs()
        );
        assert_eq!(
            app.request_count(),
            1,
            "only the routed request reached the app"
        );
        println!("{DONE}");
        Ok(())
    })
    .await;
}
