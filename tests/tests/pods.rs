//! Two pods on one node, wired as Kubernetes wires them: each pod a network namespace with its own
//! address on the node's bridge, its iptables installed by `mandate-proxy init-iptables` (what the
//! injected init container runs), a managed sidecar enrolled by join token, and an app that knows
//! nothing of Mandate. The agent pod's curl calls the tool pod's address directly; the tool is
//! found in the registry by that address, reached over mTLS with its identity checked, and the
//! reference policy decides. Bypassing the sidecar from the agent pod, and plaintext into the
//! tool pod, get nowhere.
//!
//! Needs root, `ip`, `iptables`, `curl`, `setpriv` and `python3`; prints `SKIP:` otherwise.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mandate_e2e::pod::{self, NODE_IP, Node, Pod};
use mandate_e2e::policy::workspace_root;
use mandate_e2e::{TestEnv, within};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Child;

const TEST: &str = "an_unaware_agent_pod_reaches_the_tool_pod_only_through_both_sidecars";
const DONE: &str = "pod scenario passed";
const LIMIT: Duration = Duration::from_secs(120);
/// The uid the apps run as: anything but the sidecar's (root here), so their traffic is redirected.
const APP_UID: &str = "65534";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unaware_agent_pod_reaches_the_tool_pod_only_through_both_sidecars() {
    if let Some(pods) = Node::pods_inside() {
        scenario(pods).await;
        return;
    }
    let tools = [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
        ("curl", "--version", "curl"),
        ("setpriv", "--version", "util-linux"),
        ("python3", "--version", "python3"),
    ];
    if let Some(why) = pod::missing_prerequisites(&tools).await {
        eprintln!("SKIP: {TEST}: {why}");
        return;
    }
    let node = Node::create(&["agent", "tool"])
        .await
        .expect("pods created");
    node.run_inside(TEST, DONE, LIMIT).await.unwrap();
}

/// The plain app in the tool pod: `tests/python/echo_app.py` on 0.0.0.0:8080, so only the
/// redirect keeps plaintext callers away from it. It only answers, so its uid does not matter.
struct EchoApp {
    _child: Child,
    seen: tokio::sync::watch::Receiver<Vec<serde_json::Value>>,
}

impl EchoApp {
    async fn start(pod: &Pod) -> anyhow::Result<Self> {
        let script = workspace_root().join("tests/python/echo_app.py");
        let mut child = pod
            .command("python3")
            .arg("-u")
            .arg(script)
            .args(["0.0.0.0", "8080"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the echo app")?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let first = within(
            Duration::from_secs(20),
            "the echo app to listen",
            lines.next_line(),
        )
        .await??;
        if first.as_deref() != Some("listening") {
            bail!("echo app said {first:?}");
        }
        let (tx, seen) = tokio::sync::watch::channel(Vec::new());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&line) {
                    tx.send_modify(|all| all.push(v));
                }
            }
        });
        Ok(Self {
            _child: child,
            seen,
        })
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        self.seen.borrow().clone()
    }
}

/// `curl` in the agent pod as the app's uid, with no proxy settings: `(status, body)`, or the
/// curl error when no HTTP answer came.
async fn curl(
    agent: &Pod,
    url: &str,
    headers: &[&str],
) -> anyhow::Result<Result<(u16, String), String>> {
    let mut args = vec![
        "--reuid",
        APP_UID,
        "--regid",
        APP_UID,
        "--clear-groups",
        "curl",
        "-sS",
        "-m",
        "10",
        "--noproxy",
        "*",
        "-w",
        "\n%{http_code}",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = agent
        .command("setpriv")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok(Ok((status.trim().parse()?, body.to_owned())))
}

async fn init_iptables(pod: &Pod) -> anyhow::Result<()> {
    let bin = mandate_e2e::bin("mandate-proxy")?;
    // The sidecars run as root here (uid 0), the apps as APP_UID; in Kubernetes it is 1337.
    pod.run(
        &bin,
        &[
            "init-iptables",
            "--proxy-uid",
            "0",
            "--exclude-inbound-ports",
            "15000",
        ],
    )
    .await?;
    Ok(())
}

async fn scenario(pods: Vec<(String, Pod)>) {
    let pod = |name: &str| {
        pods.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .expect("pod")
    };
    let (agent_pod, tool_pod) = (pod("agent"), pod("tool"));
    let env = TestEnv::new("pods");
    env.run(LIMIT, async {
        let cp = env.control_plane("cp").listen_ip(NODE_IP).spawn().await?;
        let tool_address = format!("{}:8080", tool_pod.ip);
        let out = cp
            .cli_ok(&[
                "service",
                "register",
                "tool",
                "--owner",
                "tools@example.com",
                "--address",
                &tool_address,
            ])
            .await?;
        let tool_token = mandate_e2e::control_plane::join_token_in(&out)?;
        let agent_token = cp
            .register_agent(
                "research",
                r#"[{"host": "tool", "method": "GET", "path": "/hello*"}]"#,
            )
            .await?;
        let reference = workspace_root().join("policies/reference");
        cp.cli_ok(&["policy", "push", &reference.display().to_string()])
            .await?;

        for pod in [&agent_pod, &tool_pod] {
            init_iptables(pod).await?;
        }
        let app = EchoApp::start(&tool_pod).await?;
        let tool = env
            .sidecar("tool")
            .in_pod(&tool_pod)
            .managed(&cp, &tool_token)
            .app(SocketAddr::from(([127, 0, 0, 1], 8080)))
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .in_pod(&agent_pod)
            .managed(&cp, &agent_token)
            .spawn()
            .await?;

        // The agent calls the tool pod's address as if nothing stood between them, and forges an
        // identity header for good measure.
        let url = format!("http://{tool_address}/hello?via=iptables");
        let (status, body) = curl(
            &agent_pod,
            &url,
            &["x-mandate-peer: spiffe://mandate.local/agent/admin"],
        )
        .await?
        .map_err(anyhow::Error::msg)?;
        assert_eq!(status, 200, "body: {body}");
        let seen: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(seen["path"], "/hello?via=iptables");
        assert_eq!(
            seen["headers"]["x-mandate-peer"],
            agent.id(),
            "the tool saw the verified caller"
        );
        assert!(
            seen["headers"]["x-forwarded-client-cert"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("URI={}", agent.id())),
            "{seen}"
        );

        // Outside the agent's scopes: the reference policy refuses it at the agent's sidecar.
        let (status, body) = curl(&agent_pod, &format!("http://{tool_address}/admin"), &[])
            .await?
            .map_err(anyhow::Error::msg)?;
        assert_eq!(status, 403, "body: {body}");
        assert!(body.contains("research may not GET /admin on"), "{body}");
        assert_eq!(
            app.requests().len(),
            1,
            "the refused call never reached the app"
        );

        // Bypass: straight to the tool sidecar's port. The agent pod's own rules redirect it to
        // the agent's sidecar, which has no such destination: refused, nothing reaches the tool.
        let bypass = curl(
            &agent_pod,
            &format!("http://{}:15006/hello", tool_pod.ip),
            &[],
        )
        .await?;
        assert!(
            !matches!(bypass, Ok((200, _))),
            "a call around the sidecar got through: {bypass:?}"
        );
        assert_eq!(app.requests().len(), 1, "the bypass never reached the app");

        // Plaintext into the tool pod from the node: redirected to the tool's mTLS listener, which
        // refuses it; the app, though it listens on every interface, never sees it.
        let mut plain = tokio::net::TcpStream::connect(SocketAddr::new(tool_pod.ip, 8080)).await?;
        let _ = plain
            .write_all(b"GET /hello HTTP/1.1\r\nhost: tool\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = within(
            Duration::from_secs(10),
            "the plaintext connection to close",
            plain.read_to_end(&mut answer),
        )
        .await?;
        assert!(
            !String::from_utf8_lossy(&answer).contains("HTTP/1."),
            "plaintext got an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert_eq!(app.requests().len(), 1, "plaintext never reached the app");

        let metrics = tool.metrics().await?;
        assert!(
            metrics.sum(
                "mandate_tls_handshake_failures_total",
                &[("direction", "inbound")]
            ) >= 1.0,
            "the tool's sidecar counted the refused plaintext handshake"
        );
        println!("{DONE}");
        Ok(())
    })
    .await;
}
