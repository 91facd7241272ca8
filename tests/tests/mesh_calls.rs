//! An agent's calls through its sidecar, over mTLS, to a tool's sidecar and app: what is allowed, what
//! the app is told about the caller, and how routing and peer-identity failures are answered.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Version;
use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, Http2, empty, proxy_get, proxy_request, tls_connect};
use mandate_e2e::{Pki, TestEnv, ports, within};

const LIMIT: Duration = Duration::from_secs(60);

/// Splits an Envoy-format x-forwarded-client-cert element (`K=V;K=V`) into its fields.
fn xfcc_fields(value: &str) -> BTreeMap<String, String> {
    value
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_call_reaches_the_app_with_the_verified_caller_identity() {
    let env = TestEnv::new("allowed_call");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = env.pair(app.addr(), "tool:8080").await?;

        let resp = proxy_get(agent.outbound(), "http://tool:8080/hello?x=1", &[]).await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());
        let echoed = resp.json()?;
        assert_eq!(echoed["path"], "/hello");
        assert!(
            echoed["uri"]
                .as_str()
                .unwrap_or_default()
                .ends_with("/hello?x=1"),
            "the query string must reach the app: {echoed}"
        );

        let seen = app.seen();
        assert_eq!(seen.len(), 1, "exactly one request reaches the app");
        assert_eq!(
            seen[0].header_all("x-mandate-peer"),
            vec![agent.id().to_owned()]
        );
        let xfcc = seen[0].header_all("x-forwarded-client-cert");
        assert_eq!(xfcc.len(), 1, "one x-forwarded-client-cert: {xfcc:?}");
        let fields = xfcc_fields(&xfcc[0]);
        assert_eq!(
            fields.get("By").map(String::as_str),
            Some(tool.id()),
            "{xfcc:?}"
        );
        assert_eq!(
            fields.get("URI").map(String::as_str),
            Some(agent.id()),
            "{xfcc:?}"
        );
        assert_eq!(
            fields.get("Hash").map(|h| h.to_ascii_lowercase()),
            Some(agent.svid().sha256_hex()),
            "Hash= is the SHA-256 of the agent's leaf certificate DER: {xfcc:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_sent_by_the_agent_never_reach_the_app() {
    let env = TestEnv::new("spoofed_headers");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, tool) = env.pair(app.addr(), "tool:8080").await?;
        let admin_id = env.pki().id("agent/admin");
        let forged_xfcc = format!("By={};Hash=00;URI={admin_id}", tool.id());

        let resp = proxy_get(
            agent.outbound(),
            "http://tool:8080/spoof",
            &[
                ("x-mandate-peer", &admin_id),
                ("X-Mandate-Peer", "spiffe://mandate.local/agent/root"),
                ("x-forwarded-client-cert", &forged_xfcc),
                ("x-mandate-on-behalf-of", "ceo@example.com"),
                ("x-mandate-decision-id", "forged-decision"),
            ],
        )
        .await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());

        let seen = app.seen();
        assert_eq!(seen.len(), 1);
        let s = &seen[0];
        assert_eq!(s.header_all("x-mandate-peer"), vec![agent.id().to_owned()]);
        let xfcc = s.header_all("x-forwarded-client-cert");
        assert_eq!(xfcc.len(), 1, "only the sidecar's own XFCC: {xfcc:?}");
        assert!(!xfcc[0].contains(&admin_id), "forged XFCC leaked: {xfcc:?}");
        assert_eq!(
            xfcc_fields(&xfcc[0]).get("URI").map(String::as_str),
            Some(agent.id())
        );
        assert!(
            s.header_all("x-mandate-on-behalf-of").is_empty(),
            "no delegation was verified, so no on-behalf-of may reach the app: {:?}",
            s.headers
        );
        assert!(
            !s.header_all("x-mandate-decision-id")
                .iter()
                .any(|v| v == "forged-decision"),
            "forged decision id leaked: {:?}",
            s.headers
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_sent_by_a_direct_mtls_caller_are_replaced_by_the_inbound_sidecar() {
    let env = TestEnv::new("spoofed_headers_inbound");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let caller = env.pki().issue("agent/bob");

        let tls = tls_connect(tool.inbound(), Some(&caller), &["http/1.1"]).await?;
        let mut conn = Http1::handshake(tls).await?;
        let req = http::Request::get("/direct")
            .header("host", "tool:8080")
            .header("x-mandate-peer", "spiffe://mandate.local/agent/admin")
            .header(
                "x-forwarded-client-cert",
                "By=x;Hash=00;URI=spiffe://mandate.local/agent/admin",
            )
            .body(empty())?;
        let resp = conn.fetch(req).await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());

        let seen = app.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].header_all("x-mandate-peer"),
            vec![caller.id.clone()]
        );
        let xfcc = seen[0].header_all("x-forwarded-client-cert");
        assert_eq!(xfcc.len(), 1, "{xfcc:?}");
        let fields = xfcc_fields(&xfcc[0]);
        assert_eq!(fields.get("URI"), Some(&caller.id));
        assert_eq!(fields.get("By").map(String::as_str), Some(tool.id()));
        assert_eq!(
            fields.get("Hash").map(|h| h.to_ascii_lowercase()),
            Some(caller.sha256_hex())
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_destination_is_denied_with_403_json() {
    let env = TestEnv::new("unrouted");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;

        for url in [
            "http://unrouted.example:8080/x",
            // A route matches its port, not just its host.
            "http://tool:9090/x",
        ] {
            let resp = proxy_get(agent.outbound(), url, &[]).await?;
            assert_eq!(resp.status, 403, "{url}: body {}", resp.text());
            assert!(
                resp.header("content-type").starts_with("application/json"),
                "{url}: content-type {:?}",
                resp.header("content-type")
            );
            let body = resp.json()?;
            assert_eq!(body["error"], "denied", "{url}: {body}");
            let dest = url
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            assert_eq!(body["destination"], dest, "{url}: {body}");
            let reason = body["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains(dest),
                "{url}: the reason names the destination: {body}"
            );
        }
        assert_eq!(
            app.request_count(),
            0,
            "a denied call must not reach any app"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_port_defaults_to_80() {
    let env = TestEnv::new("route_port_80");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool").await?;
        let resp = proxy_get(agent.outbound(), "http://tool/default-port", &[]).await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());
        let resp = proxy_get(agent.outbound(), "http://tool:80/explicit-80", &[]).await?;
        assert_eq!(resp.status, 200, "body: {}", resp.text());
        assert_eq!(app.request_count(), 2);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_presenting_another_identity_than_the_route_expects_gets_502_naming_both() {
    let env = TestEnv::new("identity_mismatch");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let expected = env.pki().id("service/billing");
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route(format!("tool:8080={},id={expected}", tool.inbound()))
            .spawn()
            .await?;

        let resp = proxy_get(agent.outbound(), "http://tool:8080/x", &[]).await?;
        assert_eq!(resp.status, 502, "body: {}", resp.text());
        assert!(resp.header("content-type").starts_with("application/json"));
        let body = resp.json()?;
        assert_eq!(body["error"], "peer_identity_mismatch", "{body}");
        assert_eq!(body["expected"], expected.as_str(), "{body}");
        assert_eq!(body["presented"], tool.id(), "{body}");
        assert_eq!(
            app.request_count(),
            0,
            "nothing may be sent to an unverified peer"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_whose_certificate_is_not_from_our_bundle_is_refused_with_502() {
    let env = TestEnv::new("peer_other_ca");
    env.run(LIMIT, async {
        let app = App::start().await?;
        // The impostor holds a well-formed SVID for service/tool from a CA the agent does not trust; it
        // trusts our CA itself, so only the agent's verification can stop the call.
        let rogue = Pki::with_trust_domain(env.dir(), "mandate.local", "rogue-ca.pem")?;
        let both = env.dir().join("both-cas.pem");
        std::fs::write(&both, format!("{}{}", env.pki().ca_pem(), rogue.ca_pem()))?;
        let tool = env
            .sidecar("tool")
            .svid(rogue.issue("service/tool"))
            .bundle(&both)
            .app(app.addr())
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route_to("tool:8080", &tool)
            .spawn()
            .await?;

        let resp = proxy_get(agent.outbound(), "http://tool:8080/x", &[]).await?;
        assert_eq!(resp.status, 502, "body: {}", resp.text());
        let body = resp.json()?;
        assert_eq!(body["error"], "upstream_unavailable", "{body}");
        assert_eq!(app.request_count(), 0);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_gets_502_upstream_unavailable() {
    let env = TestEnv::new("peer_unreachable");
    env.run(LIMIT, async {
        let nobody = ports::free_addr();
        let agent = env
            .sidecar("agent")
            .identity("agent/alice")
            .route(format!(
                "tool:8080={nobody},id={}",
                env.pki().id("service/tool")
            ))
            .spawn()
            .await?;
        let resp = proxy_get(agent.outbound(), "http://tool:8080/x", &[]).await?;
        assert_eq!(resp.status, 502, "body: {}", resp.text());
        assert!(resp.header("content-type").starts_with("application/json"));
        assert_eq!(resp.json()?["error"], "upstream_unavailable");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_serves_several_requests_on_one_agent_connection() {
    let env = TestEnv::new("keep_alive");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let mut conn = Http1::connect(agent.outbound()).await?;
        for i in 0..5 {
            let req =
                proxy_request("GET", &format!("http://tool:8080/keepalive/{i}")).body(empty())?;
            let resp = conn.fetch(req).await?;
            assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
            assert_eq!(resp.json()?["path"], format!("/keepalive/{i}"));
        }
        assert_eq!(app.request_count(), 5);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_routed_by_authority_reach_the_app_as_http2() {
    let env = TestEnv::new("h2c_outbound");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let conn = Http2::connect(agent.outbound()).await?;
        // Several concurrent streams on the one connection.
        let mut pending = Vec::new();
        for i in 0..4 {
            let req = http::Request::get(format!("http://tool:8080/h2/{i}")).body(empty())?;
            let mut conn = conn.clone();
            pending.push(async move { conn.send(req).await });
        }
        let responses = futures_util::future::try_join_all(pending).await?;
        for resp in responses {
            let resp = mandate_e2e::client::collect(resp).await?;
            assert_eq!(resp.status, 200, "{}", resp.text());
        }
        let seen = app.seen();
        assert_eq!(seen.len(), 4);
        for s in &seen {
            assert_eq!(
                s.version,
                Version::HTTP_2,
                "the app is spoken to in the caller's protocol"
            );
            assert_eq!(s.header_all("x-mandate-peer"), vec![agent.id().to_owned()]);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_negotiates_h2_and_http1_by_alpn() {
    let env = TestEnv::new("inbound_alpn");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let tool = env
            .sidecar("tool")
            .identity("service/tool")
            .app(app.addr())
            .spawn()
            .await?;
        let caller = env.pki().issue("agent/alice");

        let tls = tls_connect(tool.inbound(), Some(&caller), &["h2", "http/1.1"]).await?;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "h2 preferred"
        );
        let mut h2 = Http2::handshake(tls).await?;
        let resp = h2
            .fetch(http::Request::get("http://tool:8080/over-h2").body(empty())?)
            .await?;
        assert_eq!(resp.status, 200, "{}", resp.text());

        let tls = tls_connect(tool.inbound(), Some(&caller), &["http/1.1"]).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut h1 = Http1::handshake(tls).await?;
        let resp = h1
            .fetch(
                http::Request::get("/over-h1")
                    .header("host", "tool:8080")
                    .body(empty())?,
            )
            .await?;
        assert_eq!(resp.status, 200, "{}", resp.text());

        let seen = app.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].version, Version::HTTP_2);
        assert_eq!(seen[1].version, Version::HTTP_11);
        for s in &seen {
            assert_eq!(s.header_all("x-mandate-peer"), vec![caller.id.clone()]);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_to_a_route_reaches_the_app_over_mtls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new("connect_tunnel");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let mut tcp = tokio::net::TcpStream::connect(agent.outbound()).await?;
        let head = mandate_e2e::client::connect_tunnel(&mut tcp, "tool:8080").await?;
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT answer: {head:?}");

        // Inside the tunnel: plain HTTP/1.1 to the app, carried opaquely.
        tcp.write_all(b"GET /tunnelled HTTP/1.1\r\nhost: tool:8080\r\nconnection: close\r\n\r\n")
            .await?;
        let mut resp = Vec::new();
        within(
            Duration::from_secs(10),
            "tunnelled response",
            tcp.read_to_end(&mut resp),
        )
        .await??;
        let resp = String::from_utf8_lossy(&resp);
        assert!(
            resp.starts_with("HTTP/1.1 200"),
            "tunnelled response: {resp:?}"
        );
        assert!(
            resp.contains("/tunnelled"),
            "echo of the tunnelled request: {resp:?}"
        );
        assert_eq!(app.request_count(), 1);
        Ok(())
    })
    .await;
}
