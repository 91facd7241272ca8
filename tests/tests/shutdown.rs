//! SIGTERM drains: the sidecar stops accepting, lets in-flight requests finish, and exits 0.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{probe_inbound, proxy_get};
use mandate_e2e::{TestEnv, within};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_connections_and_exits_0() {
    let env = TestEnv::new("sigterm_drain");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, mut tool) = env.pair(app.addr(), "tool:8080").await?;

        // A request the app holds until released: in flight through both sidecars.
        let outbound = agent.outbound();
        let in_flight = tokio::spawn(async move { proxy_get(outbound, "http://tool:8080/hold", &[]).await });
        within(Duration::from_secs(10), "held request at the app", app.wait_for_requests(1)).await?;

        tool.sigterm()?;

        // New connections are refused from now on (looked at until the kernel or the sidecar says so).
        let caller = env.pki().issue("agent/late");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last;
        loop {
            match tokio::net::TcpStream::connect(tool.inbound()).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    eprintln!("after SIGTERM: new TCP connection refused");
                    break;
                }
                Err(e) => last = format!("connect: {e}"),
                Ok(_) => {
                    // Accepted by the kernel: it must not be served.
                    match tokio::time::timeout(Duration::from_secs(2), probe_inbound(tool.inbound(), Some(&caller))).await {
                        Ok(Ok(p)) if p.got_http_response() => last = format!("served: {:?}", p.response),
                        outcome => {
                            eprintln!("after SIGTERM: connection accepted by the kernel, not served: {outcome:?}");
                            break;
                        }
                    }
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "new connections still accepted 10s after SIGTERM: {last}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            tool.try_exit()?.is_none(),
            "the sidecar must wait for the in-flight request, not exit at once"
        );
        assert_eq!(app.request_count(), 1, "nothing new reached the app after SIGTERM");

        app.release();
        let resp = within(Duration::from_secs(10), "in-flight response", in_flight).await???;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), "released");

        let status = within(Duration::from_secs(20), "exit after drain", tool.wait_exit()).await??;
        assert_eq!(status.code(), Some(0), "exit status {status}");
        Ok(())
    })
    .await;
}
