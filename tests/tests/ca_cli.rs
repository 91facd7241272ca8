//! The standalone path a user follows: `mandate ca init`, `mandate ca issue`, then a sidecar pair on
//! those files.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::{Svid, TestEnv, bin, within};

const LIMIT: Duration = Duration::from_secs(60);

async fn mandate(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let out = tokio::process::Command::new(bin("mandate")?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    within(Duration::from_secs(20), "mandate", out)
        .await?
        .map_err(Into::into)
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

fn svid_from_files(id: &str, cert: &Path, key: &Path) -> anyhow::Result<Svid> {
    Ok(Svid {
        id: id.to_owned(),
        cert_pem: std::fs::read_to_string(cert)?,
        key_pem: std::fs::read_to_string(key)?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_pair_runs_on_certificates_issued_by_mandate_ca() {
    let env = TestEnv::new("mandate_ca");
    env.run(LIMIT, async {
        let ca_dir = env.dir().join("ca");
        let ca = ca_dir.to_str().expect("UTF-8 temp path");
        let out = mandate(&["ca", "init", "--dir", ca]).await?;
        assert!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            mode(&ca_dir.join("ca-key.pem"))?,
            0o600,
            "the CA key is private"
        );
        let bundle = std::fs::read(ca_dir.join("ca.pem"))?;

        let again = mandate(&["ca", "init", "--dir", ca]).await?;
        assert!(
            !again.status.success(),
            "ca init must refuse to overwrite without --force"
        );
        assert_eq!(
            std::fs::read(ca_dir.join("ca.pem"))?,
            bundle,
            "the CA is left untouched"
        );

        for id in ["agent/alice", "service/tool"] {
            let out = mandate(&["ca", "issue", id, "--dir", ca]).await?;
            assert!(
                out.status.success(),
                "ca issue {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(mode(&ca_dir.join("alice-key.pem"))?, 0o600);
        assert_eq!(mode(&ca_dir.join("tool-key.pem"))?, 0o600);

        let app = App::start().await?;
        let tool_svid = svid_from_files(
            "spiffe://mandate.local/service/tool",
            &ca_dir.join("tool.pem"),
            &ca_dir.join("tool-key.pem"),
        )?;
        let agent_svid = svid_from_files(
            "spiffe://mandate.local/agent/alice",
            &ca_dir.join("alice.pem"),
            &ca_dir.join("alice-key.pem"),
        )?;
        let tool = env
            .sidecar("tool")
            .svid(tool_svid)
            .bundle(&ca_dir.join("ca.pem"))
            .app(app.addr())
            .spawn()
            .await?;
        let agent = env
            .sidecar("agent")
            .svid(agent_svid)
            .bundle(&ca_dir.join("ca.pem"))
            .route_to("tool:8080", &tool)
            .spawn()
            .await?;

        let resp = proxy_get(agent.outbound(), "http://tool:8080/from-cli-certs", &[]).await?;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let seen = app.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].header_all("x-mandate-peer"),
            vec![agent.id().to_owned()]
        );
        Ok(())
    })
    .await;
}
