//! Streaming protocols through the sidecar pair: server-sent events, chunked bodies in both directions,
//! WebSocket upgrades and gRPC trailers.
//!
//! The streaming checks are deterministic: the app sends a first piece and then waits until the test
//! has *received* it before sending the rest. A proxy that buffers whole bodies therefore never delivers
//! the first piece, and the bounded wait fails the test.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use http::Version;
use mandate_e2e::apps::{App, WsApp};
use mandate_e2e::client::{
    Http1, Http2, channel_body, collect, empty, full, next_data, proxy_request,
};
use mandate_e2e::{TestEnv, within};
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(60);
/// How long the first piece of a stream may take to arrive; far above any honest latency.
const FIRST_PIECE: Duration = Duration::from_secs(10);

/// Reads data frames until the accumulated text contains `needle`; returns what was read.
async fn read_until<B>(body: &mut B, acc: &mut String, needle: &str) -> anyhow::Result<()>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    while !acc.contains(needle) {
        match next_data(body).await? {
            Some(chunk) => acc.push_str(&String::from_utf8_lossy(&chunk)),
            None => anyhow::bail!("stream ended before {needle:?}; got {acc:?}"),
        }
    }
    Ok(())
}

async fn read_to_end<B>(body: &mut B, acc: &mut String) -> anyhow::Result<()>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    while let Some(chunk) = next_data(body).await? {
        acc.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_first_event_arrives_before_the_stream_ends() {
    let env = TestEnv::new("sse");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let mut conn = Http1::connect(agent.outbound()).await?;
        let req = proxy_request("GET", "http://tool:8080/sse")
            .header("accept", "text/event-stream")
            .body(empty())?;
        let resp = within(FIRST_PIECE, "SSE response head", conn.send(req)).await??;
        assert_eq!(resp.status(), 200);
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        assert_eq!(ct.as_deref(), Some("text/event-stream"));

        let mut body = resp.into_body();
        let mut text = String::new();
        within(
            FIRST_PIECE,
            "first SSE event while the app holds the rest (buffering?)",
            read_until(&mut body, &mut text, "data: one\n\n"),
        )
        .await??;
        assert!(
            !text.contains("two"),
            "the app has not sent event two yet: {text:?}"
        );
        app.release();
        within(
            FIRST_PIECE,
            "rest of the SSE stream",
            read_to_end(&mut body, &mut text),
        )
        .await??;
        assert_eq!(text, "data: one\n\ndata: two\n\ndata: three\n\n");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_body_streams_without_being_buffered_whole() {
    let env = TestEnv::new("chunked_response");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let mut conn = Http1::connect(agent.outbound()).await?;
        let req = proxy_request("GET", "http://tool:8080/stream/response").body(empty())?;
        let resp = within(FIRST_PIECE, "response head", conn.send(req)).await??;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut text = String::new();
        within(
            FIRST_PIECE,
            "first chunk while the app holds the second (buffering?)",
            read_until(&mut body, &mut text, "first-chunk"),
        )
        .await??;
        app.release();
        within(
            FIRST_PIECE,
            "rest of the body",
            read_to_end(&mut body, &mut text),
        )
        .await??;
        assert_eq!(text, "first-chunk".to_owned() + "second-chunk");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_streams_without_being_buffered_whole() {
    let env = TestEnv::new("chunked_request");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let mut chunks = app.request_chunks();
        let (agent, _tool) = env.pair(app.addr(), "tool:8080").await?;
        let mut conn = Http1::connect(agent.outbound()).await?;
        let (tx, body) = channel_body();
        let req = proxy_request("POST", "http://tool:8080/stream/request")
            .header("content-type", "application/octet-stream")
            .body(body)?;
        // The response comes only after the whole body, so send the request from its own task.
        let call = tokio::spawn(async move { conn.fetch(req).await });

        tx.send("part-one;").await?;
        let mut got = String::new();
        within(FIRST_PIECE, "first request chunk at the app (buffering?)", async {
            while !got.contains("part-one;") {
                match chunks.recv().await {
                    Some(c) => got.push_str(&String::from_utf8_lossy(&c)),
                    None => anyhow::bail!("app stopped receiving"),
                }
            }
            Ok(())
        })
        .await??;
        tx.send("part-two;").await?;
        drop(tx);

        let resp = within(FIRST_PIECE, "response after the body ended", call).await???;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.json()?["received"], "part-one;part-two;".len());
        while let Ok(c) = chunks.try_recv() {
            got.push_str(&String::from_utf8_lossy(&c));
        }
        assert_eq!(got, "part-one;part-two;");
        let seen = app.seen();
        assert_eq!(
            seen[0].header_all("transfer-encoding"),
            vec!["chunked".to_owned()],
            "a streamed request keeps chunked framing (no content-length invented by buffering): {:?}",
            seen[0].headers
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_works_through_the_pair() {
    let env = TestEnv::new("websocket");
    env.run(LIMIT, async {
        let ws_app = WsApp::start().await?;
        let (agent, _tool) = env.pair(ws_app.addr(), "tool:8080").await?;
        // Host-routed: origin-form upgrade request with Host: tool:8080 straight to the outbound port.
        let tcp = tokio::net::TcpStream::connect(agent.outbound()).await?;
        let (mut ws, resp) = within(
            FIRST_PIECE,
            "WebSocket handshake",
            tokio_tungstenite::client_async("ws://tool:8080/ws", tcp),
        )
        .await??;
        assert_eq!(resp.status(), 101);

        for text in ["hello mandate", "second message"] {
            ws.send(Message::text(text)).await?;
            let echo = within(FIRST_PIECE, "echo", ws.next()).await?;
            let echo = echo.ok_or_else(|| anyhow::anyhow!("socket closed"))??;
            assert_eq!(echo, Message::text(text));
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255])).await?;
        let echo = within(FIRST_PIECE, "binary echo", ws.next()).await?;
        assert_eq!(
            echo.ok_or_else(|| anyhow::anyhow!("socket closed"))??,
            Message::binary(vec![0u8, 1, 2, 255])
        );
        ws.close(None).await?;

        let handshakes = ws_app.handshakes();
        assert_eq!(handshakes.len(), 1);
        let peer: Vec<_> = handshakes[0].get_all("x-mandate-peer").iter().collect();
        assert_eq!(peer.len(), 1, "{:?}", handshakes[0]);
        assert_eq!(peer[0].to_str()?, agent.id());
        Ok(())
    })
    .await;
}

/// A gRPC length-prefixed message: flag 0, 4-byte big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_call_gets_its_body_and_trailers_through_the_pair() {
    let env = TestEnv::new("grpc_trailers");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = env.pair(app.addr(), "tool:50051").await?;
        let mut conn = Http2::connect(agent.outbound()).await?;
        let message = grpc_frame(b"ping from the agent");
        let req = http::Request::post("http://tool:50051/mandate.test.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(message.clone()))?;
        let resp = within(FIRST_PIECE, "gRPC response", conn.send(req)).await??;
        let resp = collect(resp).await?;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("content-type"), "application/grpc");
        assert_eq!(resp.body, message, "the echoed message");
        let trailers = resp.trailers.clone().unwrap_or_default();
        let get = |k: &str| {
            trailers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            get("grpc-status").as_deref(),
            Some("0"),
            "trailers: {trailers:?}"
        );
        assert_eq!(
            get("grpc-message").as_deref(),
            Some("ok"),
            "trailers: {trailers:?}"
        );
        assert_eq!(
            get("x-echo-trailer").as_deref(),
            Some("kept"),
            "trailers: {trailers:?}"
        );

        let seen = app.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].version, Version::HTTP_2, "HTTP/2 end to end");
        assert_eq!(seen[0].header_all("te"), vec!["trailers".to_owned()]);
        assert_eq!(
            seen[0].header_all("x-mandate-peer"),
            vec![agent.id().to_owned()]
        );
        Ok(())
    })
    .await;
}
