//! The sidecar injector as the kube-apiserver meets it: the real `mandate serve --webhook`, with a
//! certificate made by `deploy/kubernetes/webhook-cert.sh`, answers AdmissionReviews POSTed over
//! HTTPS (the client verifies the certificate for mandate.mandate-system.svc against the script's
//! CA, as the API server does with the caBundle). Every golden request gets the answer the
//! injector library gives (whose answers the golden files pin), over HTTP/1.1 and HTTP/2; wrong
//! requests get clear errors; the reviews are counted; a renewed certificate is served without a
//! restart; a key that does not fit its certificate stops start-up.
//!
//! Needs bash and openssl (for the script): without them the test prints SKIP, except in CI.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, StatusCode};
use mandate_control_plane::inject::Injector;
use mandate_control_plane::inject::config::InjectorConfig;
use mandate_e2e::client::{BoxBody, Collected, Http1, Http2, empty, full};
use mandate_e2e::policy::workspace_root;
use mandate_e2e::{ControlPlane, TestEnv, ensure_eq, eventually, ports};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const LIMIT: Duration = Duration::from_secs(120);
/// The name the API server calls the webhook by (Service mandate in mandate-system).
const SERVICE_DNS: &str = "mandate.mandate-system.svc";
/// Within the certificate reload interval (10 s), with room for a slow machine.
const RELOAD: Duration = Duration::from_secs(30);
const INJECT_CONFIG: &str = "image: registry.example.com/mandate-proxy:e2e\n\
    control-plane: https://mandate.mandate-system.svc:15012\n\
    exclude-outbound-cidrs: [169.254.169.254/32]\n";

/// Runs `deploy/kubernetes/webhook-cert.sh OUT`.
async fn webhook_cert(out: &Path) -> anyhow::Result<()> {
    let script = workspace_root().join("deploy/kubernetes/webhook-cert.sh");
    let result = Command::new("bash")
        .arg(&script)
        .arg(out)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("run bash")?;
    anyhow::ensure!(
        result.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        result.status,
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(())
}

/// Why the test cannot run here, if it cannot.
async fn prerequisites() -> Result<(), String> {
    for (tool, arg) in [("bash", "--version"), ("openssl", "version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!(
                "{tool} not found (deploy/kubernetes/webhook-cert.sh needs it)"
            ));
        }
    }
    Ok(())
}

/// A TLS client trusting only the CA in `ca_pem`, offering `alpn`.
fn client_config(ca_pem: &Path, alpn: &str) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(cert?)?;
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    Ok(config)
}

/// Connects to the webhook as the API server would: verifying its certificate for `SERVICE_DNS`.
async fn connect(
    addr: SocketAddr,
    ca_pem: &Path,
    alpn: &str,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(client_config(ca_pem, alpn)?));
    let tcp = TcpStream::connect(addr).await?;
    Ok(connector
        .connect(ServerName::try_from(SERVICE_DNS)?, tcp)
        .await?)
}

fn post(path: &str, content_type: &str, body: BoxBody) -> anyhow::Result<Request<BoxBody>> {
    Ok(Request::post(path)
        .header("host", format!("{SERVICE_DNS}:443"))
        .header("content-type", content_type)
        .body(body)?)
}

/// The golden AdmissionReview requests, by case name.
fn golden_requests() -> Vec<(String, Vec<u8>)> {
    let dir = workspace_root().join("control-plane/tests/golden/inject");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".request.json")?
                .to_owned();
            Some((name, std::fs::read(&path).unwrap()))
        })
        .collect();
    out.sort();
    out
}

/// Starts `mandate serve` with the webhook on `webhook`, serving `cert` and `key`.
async fn serve_with_webhook(
    env: &TestEnv,
    name: &str,
    webhook: SocketAddr,
    cert: &Path,
    key: &Path,
    inject_config: &Path,
) -> anyhow::Result<ControlPlane> {
    env.control_plane(name)
        .arg(format!("--webhook={webhook}"))
        .arg(format!("--webhook-cert={}", cert.display()))
        .arg(format!("--webhook-key={}", key.display()))
        .arg(format!("--inject-config={}", inject_config.display()))
        .spawn()
        .await
}

/// Replaces `to` with `from` in one rename, as Kubernetes swaps a Secret volume's files.
fn replace(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_admission_reviews_over_https_like_the_injector() {
    if let Err(why) = prerequisites().await {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("CI must run this test: {why}");
        }
        println!("SKIP: {why}");
        return;
    }
    let env = TestEnv::new("k8s-injector");
    env.run(LIMIT, async {
        let first = env.dir().join("tls-first");
        let renewed = env.dir().join("tls-renewed");
        webhook_cert(&first).await?;
        webhook_cert(&renewed).await?;
        let served = env.dir().join("webhook");
        std::fs::create_dir_all(&served)?;
        let (cert, key) = (served.join("tls.crt"), served.join("tls.key"));
        std::fs::copy(first.join("tls.crt"), &cert)?;
        std::fs::copy(first.join("tls.key"), &key)?;
        let inject_config = env.dir().join("inject.yaml");
        std::fs::write(&inject_config, INJECT_CONFIG)?;

        let webhook = ports::free_addr();
        let cp = serve_with_webhook(&env, "cp", webhook, &cert, &key, &inject_config).await?;
        let injector = Injector::new(
            InjectorConfig::load(&inject_config)?,
            mandate_e2e::pki::TRUST_DOMAIN.parse()?,
        );

        // Every golden review, over HTTP/1.1 and HTTP/2, at the path the API server calls
        // (with its ?timeout=): the library's answer.
        let ca = first.join("ca.crt");
        let mut h1 = Http1::handshake(connect(webhook, &ca, "http/1.1").await?).await?;
        let mut h2 = Http2::handshake(connect(webhook, &ca, "h2").await?).await?;
        let cases = golden_requests();
        anyhow::ensure!(cases.len() >= 7, "golden requests: {}", cases.len());
        for (case, body) in &cases {
            let (expected, _) = injector
                .review(body)
                .map_err(|e| anyhow::anyhow!("{case}: {e:?}"))?;
            let expected = serde_json::to_value(expected)?;
            for (protocol, answer) in [
                (
                    "HTTP/1.1",
                    h1.fetch(post(
                        "/inject?timeout=10s",
                        "application/json",
                        full(body.clone()),
                    )?)
                    .await?,
                ),
                (
                    "HTTP/2",
                    h2.fetch(post(
                        "/inject?timeout=10s",
                        "application/json",
                        full(body.clone()),
                    )?)
                    .await?,
                ),
            ] {
                ensure_eq!(
                    answer.status,
                    StatusCode::OK,
                    "{case} over {protocol}: {}",
                    answer.text()
                );
                ensure_eq!(
                    answer.header("content-type"),
                    "application/json",
                    "{case} over {protocol}"
                );
                ensure_eq!(answer.json()?, expected, "{case} over {protocol}");
            }
        }

        // Wrong requests: clear errors, nothing admitted.
        let expect = |answer: Collected, status: StatusCode, says: &str| -> anyhow::Result<()> {
            ensure_eq!(answer.status, status, "{}", answer.text());
            anyhow::ensure!(
                answer.text().contains(says),
                "expected {says:?} in {}",
                answer.text()
            );
            Ok(())
        };
        let get = Request::get("/inject")
            .header("host", SERVICE_DNS)
            .body(empty())?;
        expect(
            h1.fetch(get).await?,
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /inject",
        )?;
        expect(
            h1.fetch(post("/mutate", "application/json", full("{}"))?)
                .await?,
            StatusCode::NOT_FOUND,
            "POST /inject",
        )?;
        expect(
            h1.fetch(post("/inject", "text/plain", full("{}"))?).await?,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        )?;
        expect(
            h1.fetch(post(
                "/inject",
                "application/json",
                full("{\"apiVersion\": 1"),
            )?)
            .await?,
            StatusCode::BAD_REQUEST,
            "not an AdmissionReview",
        )?;
        let huge = vec![b' '; 5 << 20];
        expect(
            h2.fetch(post("/inject", "application/json", full(huge))?)
                .await?,
            StatusCode::PAYLOAD_TOO_LARGE,
            "cannot read the review",
        )?;

        let metrics = cp.metrics().await?;
        let reviews = |outcome: &str| {
            metrics.sum("mandate_cp_injector_reviews_total", &[("outcome", outcome)])
        };
        // Per protocol: 3 injected (tool, agent, bare pod), 2 skipped, 2 refused in the golden set.
        ensure_eq!(reviews("injected"), 6.0, "injected reviews");
        ensure_eq!(reviews("skipped"), 4.0, "skipped reviews");
        ensure_eq!(reviews("refused"), 4.0, "refused reviews");
        ensure_eq!(
            reviews("malformed"),
            3.0,
            "415, 400 and 413 (405 and 404 never reach the handler)"
        );

        // A renewed certificate (new CA, as when the script is run again) is served without a
        // restart; the old CA no longer verifies it.
        replace(&renewed.join("tls.key"), &key)?;
        replace(&renewed.join("tls.crt"), &cert)?;
        let renewed_ca = renewed.join("ca.crt");
        eventually(RELOAD, "the renewed webhook certificate served", || async {
            Ok(connect(webhook, &renewed_ca, "http/1.1").await.is_ok())
        })
        .await?;
        anyhow::ensure!(
            connect(webhook, &ca, "http/1.1").await.is_err(),
            "the old CA must no longer verify the served certificate"
        );
        let logs = cp.logs();
        anyhow::ensure!(logs.contains("webhook certificate reloaded"), "{logs}");

        // A key that does not fit its certificate stops start-up, naming the flag.
        let err = match serve_with_webhook(
            &env,
            "cp-mismatched",
            ports::free_addr(),
            &first.join("tls.crt"),
            &renewed.join("tls.key"),
            &inject_config,
        )
        .await
        {
            Ok(_) => {
                anyhow::bail!("mandate serve started with a key that does not fit --webhook-cert")
            }
            Err(e) => format!("{e:#}"),
        };
        anyhow::ensure!(
            err.contains("--webhook-key") && err.contains("does not fit --webhook-cert"),
            "{err}"
        );
        Ok(())
    })
    .await;
}
