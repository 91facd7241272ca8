//! JSON bodies are read for policy up to `--body-limit`; a larger JSON body is refused with 413
//! before anything is forwarded, whether its size is declared (Content-Length) or only streamed
//! (chunked). Bodies that are not JSON are not read for policy and stream through whatever their size.

use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::{Http1, channel_body, full, proxy_request};
use mandate_e2e::policy::{Denial, rego};
use mandate_e2e::{Sidecar, TestEnv, ensure_eq};

const LIMIT: Duration = Duration::from_secs(60);

/// The limit the agent's sidecar runs with.
const BODY_LIMIT: usize = 1024;

/// A JSON document of exactly `len` bytes.
fn json_of_len(len: usize) -> String {
    let overhead = r#"{"data":""}"#.len();
    format!(r#"{{"data":"{}"}}"#, "x".repeat(len - overhead))
}

/// Returns `(agent, tool)`; only the agent's sidecar has a policy (and so the limit).
async fn start(env: &TestEnv, app: &App) -> anyhow::Result<(Sidecar, Sidecar)> {
    let policy = env.policy_dir(
        "allow-all",
        &rego(r#"decision := {"allow": true, "reason": "everything is allowed here"}"#),
    )?;
    env.agent_with_policy(app, policy.path(), &["--body-limit", "1KiB"])
        .await
}

fn check_too_large(resp: &mandate_e2e::client::Collected, how: &str) -> anyhow::Result<Denial> {
    let denial = Denial::parse_as(resp, 413, "body_too_large").map_err(|e| {
        e.context(format!(
            "{how}: an oversized JSON body gets 413 body_too_large"
        ))
    })?;
    anyhow::ensure!(
        denial.reason.contains("1024"),
        "{how}: the reason names the limit: {:?}",
        denial.reason
    );
    ensure_eq!(
        denial.policy_version,
        None,
        "{how}: refused before policy, so no policy version"
    );
    Ok(denial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_body_over_the_limit_with_content_length_gets_413_and_never_reaches_the_app() {
    let env = TestEnv::new("body_limit_declared");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app).await?;

        // At the limit: read, decided, forwarded.
        let body = json_of_len(BODY_LIMIT);
        let req = proxy_request("POST", "http://tool:8080/api")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(full(body.clone()))?;
        let ok = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        ensure_eq!(ok.status, 200, "a body at the limit passes: {}", ok.text());
        ensure_eq!(
            ok.json()?["body"],
            body.as_str(),
            "the app gets the body intact"
        );

        let body = json_of_len(BODY_LIMIT + 1);
        let req = proxy_request("POST", "http://tool:8080/api")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(full(body))?;
        let resp = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        let denial = check_too_large(&resp, "Content-Length")?;
        ensure_eq!(
            app.request_count(),
            1,
            "the oversized body never reaches the app"
        );

        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["status"], 413, "{record}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_json_body_over_the_limit_gets_413_and_never_reaches_the_app() {
    let env = TestEnv::new("body_limit_streamed");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app).await?;

        let body = json_of_len(4 * BODY_LIMIT);
        let (tx, stream) = channel_body();
        let req = proxy_request("POST", "http://tool:8080/api")
            .header("content-type", "application/json")
            .body(stream)?;
        anyhow::ensure!(
            req.headers().get("content-length").is_none(),
            "the streamed body declares no length"
        );
        let chunks: Vec<String> = body
            .as_bytes()
            .chunks(256)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let sender = tokio::spawn(async move {
            for chunk in chunks {
                // The sidecar may answer and stop reading before the last chunk.
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut conn = Http1::connect(agent.outbound()).await?;
        let resp = conn.fetch(req).await?;
        sender.abort();
        let denial = check_too_large(&resp, "chunked")?;
        ensure_eq!(
            app.request_count(),
            0,
            "the oversized body never reaches the app"
        );
        let record = agent.decision(&denial.decision_id).await?;
        ensure_eq!(record["allow"], false, "{record}");
        ensure_eq!(record["status"], 413, "{record}");

        // A streamed JSON body within the limit passes.
        let small = json_of_len(BODY_LIMIT / 2);
        let (tx, stream) = channel_body();
        let req = proxy_request("POST", "http://tool:8080/api")
            .header("content-type", "application/json")
            .body(stream)?;
        let chunks: Vec<String> = small
            .as_bytes()
            .chunks(100)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        tokio::spawn(async move {
            for chunk in chunks {
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let ok = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        ensure_eq!(
            ok.status,
            200,
            "a streamed body within the limit: {}",
            ok.text()
        );
        ensure_eq!(
            ok.json()?["body"],
            small.as_str(),
            "the app gets the body intact"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json_is_not_limited_and_streams_through() {
    let env = TestEnv::new("body_limit_not_json");
    env.run(LIMIT, async {
        let app = App::start().await?;
        let (agent, _tool) = start(&env, &app).await?;
        let body = "y".repeat(64 * BODY_LIMIT);
        let req = proxy_request("POST", "http://tool:8080/upload")
            .header("content-type", "application/octet-stream")
            .body(full(body.clone()))?;
        let resp = Http1::connect(agent.outbound()).await?.fetch(req).await?;
        ensure_eq!(resp.status, 200, "{}", resp.text());
        ensure_eq!(
            resp.json()?["body"].as_str().map(str::len),
            Some(body.len()),
            "the app gets the whole body"
        );
        Ok(())
    })
    .await;
}
