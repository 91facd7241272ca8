//! The tamper-evident audit log end to end, with the real binaries: a managed pair reports its
//! decisions to `mandate serve` (SQLite), which chains and checkpoints them; `mandate audit
//! verify` passes on the untouched log and fails, naming the record, after a row was edited,
//! deleted or inserted directly in the SQLite file (with the `sqlite3` CLI); `mandate audit
//! export` verifies offline with the CA certificate, and `mandate audit tail` prints the records.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use mandate_e2e::apps::App;
use mandate_e2e::client::proxy_get;
use mandate_e2e::{ControlPlane, TestEnv, eventually};

const LIMIT: Duration = Duration::from_secs(180);
const WITHIN: Duration = Duration::from_secs(20);

/// Allowed under /allowed, denied elsewhere.
const POLICY: &str = r#"default decision := {"allow": false, "reason": "denied: outside /allowed"}

decision := {"allow": true, "reason": "allowed prefix"} if {
	input.registry.status == "active"
	startswith(input.request.path, "/allowed")
}"#;

/// `sqlite3 DB SQL`: its standard output.
fn sqlite3(db: &Path, sql: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .context("run the sqlite3 CLI (apt-get install sqlite3)")?;
    anyhow::ensure!(
        out.status.success(),
        "sqlite3 {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Puts the pristine copy back as the control plane's database (no WAL left over).
fn restore(pristine: &Path, db: &Path) -> anyhow::Result<()> {
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", db.display()));
        if side.exists() {
            std::fs::remove_file(&side)?;
        }
    }
    std::fs::copy(pristine, db)?;
    Ok(())
}

/// Export lines (records and checkpoints) of the running control plane.
async fn export(cp: &ControlPlane) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = cp.cli_ok(&["audit", "export"]).await?;
    out.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("export line {l:?}")))
        .collect()
}

/// `mandate audit verify` must fail, naming `what` (every part of it) on stderr.
async fn verify_fails(cp: &ControlPlane, case: &str, what: &[&str]) -> anyhow::Result<()> {
    let out = cp.cli(&["audit", "verify"]).await?;
    anyhow::ensure!(
        !out.success,
        "{case}: verify passed: {}{}",
        out.stdout,
        out.stderr
    );
    for part in what {
        anyhow::ensure!(
            out.stderr.contains(part),
            "{case}: verify does not name {part:?}: {}",
            out.stderr
        );
    }
    eprintln!("{case}: {}", out.stderr.trim());
    Ok(())
}

#[tokio::test]
async fn tampering_with_the_sqlite_file_is_named_by_audit_verify() {
    let env = TestEnv::new("audit-chain");
    env.run(LIMIT, async {
        let mut cp = env
            .control_plane("cp")
            .arg("--audit-checkpoint-interval")
            .arg("1s")
            .spawn()
            .await?;
        let app = App::start().await?;
        let (agent, tool) = cp.managed_pair(&env, app.addr(), POLICY, &[]).await?;

        // Tail from the start while the calls are made.
        let tail_out = env.dir().join("tail.jsonl");
        let mut tail = tokio::process::Command::new(mandate_e2e::bin("mandate")?)
            .args(["audit", "tail", "--json", "--from-seq", "1"])
            .env("MANDATE_SERVER", cp.url())
            .env("MANDATE_CACERT", cp.ca_pem())
            .env("MANDATE_ADMIN_TOKEN", cp.admin_token())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&tail_out)?)
            .kill_on_drop(true)
            .spawn()?;

        // 6 allowed calls (recorded by both sidecars) and 4 denied (by the agent's only).
        for n in 0..10 {
            let path = if n % 5 < 3 { "/allowed/x" } else { "/secret" };
            proxy_get(agent.outbound(), &format!("http://tool:8080{path}"), &[]).await?;
        }
        let expected = 6 * 2 + 4;
        eventually(WITHIN, "every decision chained and a checkpoint at the head", || async {
            let lines = export(&cp).await?;
            let records = lines.iter().filter(|l| l["kind"] == "record").count();
            let checkpointed = lines
                .iter()
                .any(|l| l["kind"] == "checkpoint" && l["seq"] == expected);
            Ok(records == expected && checkpointed)
        })
        .await?;
        drop(agent);
        drop(tool);

        let summary = cp.cli_ok(&["audit", "verify"]).await?;
        anyhow::ensure!(
            summary.starts_with(&format!("{expected} records, ")) && summary.contains(" verified"),
            "verify: {summary}"
        );

        // Tail printed every record, in order.
        eventually(WITHIN, "tail printed every record", || async {
            let text = std::fs::read_to_string(&tail_out)?;
            Ok(text.lines().count() == expected)
        })
        .await?;
        tail.kill().await?;
        let tailed = std::fs::read_to_string(&tail_out)?;
        for (i, line) in tailed.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            anyhow::ensure!(v["seq"] == i + 1, "tail line {i}: {line}");
        }

        // Export, verified offline with only the CA certificate; an edited export fails.
        let export_file = env.dir().join("audit.jsonl");
        std::fs::write(&export_file, cp.cli_ok(&["audit", "export"]).await?)?;
        let offline = cp
            .cli_ok(&["audit", "verify", "--file", &export_file.display().to_string()])
            .await?;
        anyhow::ensure!(
            offline.starts_with(&format!("{expected} records, ")),
            "offline verify: {offline}"
        );
        let text = std::fs::read_to_string(&export_file)?;
        let edited = text.replacen("\"allow\":false", "\"allow\":true", 1);
        anyhow::ensure!(edited != text, "the export has a denial to edit");
        let edited_file = env.dir().join("edited.jsonl");
        std::fs::write(&edited_file, edited)?;
        let out = cp
            .cli(&["audit", "verify", "--file", &edited_file.display().to_string()])
            .await?;
        anyhow::ensure!(
            !out.success && out.stderr.contains("altered"),
            "an edited export verified: {}{}",
            out.stdout,
            out.stderr
        );

        // Tampering with the database file itself. A pristine copy first.
        cp.kill().await?;
        let db = cp.data_dir().join("mandate.db");
        let pristine = env.dir().join("pristine.db");
        sqlite3(&db, &format!(".backup '{}'", pristine.display()))?;
        restore(&pristine, &db)?;
        let id_of = |seq: u64| sqlite3(&db, &format!("SELECT decision_id FROM decisions WHERE seq = {seq}"));

        // Edit: record 5 says something else.
        let id5 = id_of(5)?;
        sqlite3(
            &db,
            "UPDATE decisions SET record = json_set(record, '$.reason', 'nothing to see') WHERE seq = 5",
        )?;
        cp.restart().await?;
        verify_fails(&cp, "edited row", &["seq 5", &id5, "altered"]).await?;

        // Edit: only the allow column `mandate audit query --result` filters on, not the record.
        cp.kill().await?;
        restore(&pristine, &db)?;
        let id6 = id_of(6)?;
        sqlite3(&db, "UPDATE decisions SET allow = 1 - allow WHERE seq = 6")?;
        cp.restart().await?;
        verify_fails(&cp, "edited column", &["seq 6", &id6, "allow column", "altered"]).await?;

        // Delete: record 4 is gone.
        cp.kill().await?;
        restore(&pristine, &db)?;
        let id5 = id_of(5)?;
        sqlite3(&db, "DELETE FROM decisions WHERE seq = 4")?;
        cp.restart().await?;
        verify_fails(&cp, "deleted row", &["seq 4", &id5, "removed"]).await?;

        // Insert: a copy of the last record under a new id, appended after it.
        cp.kill().await?;
        restore(&pristine, &db)?;
        sqlite3(
            &db,
            "INSERT INTO decisions (decision_id, ts, ts_ms, source, subject, grant_id, tool, allow, \
             approval_id, approved_by, reported_by, record, seq, prev_hash, hash) \
             SELECT 'forged-decision', ts, ts_ms, source, subject, grant_id, tool, allow, \
             approval_id, approved_by, reported_by, record, seq + 1, hash, hash \
             FROM decisions WHERE seq = (SELECT MAX(seq) FROM decisions)",
        )?;
        cp.restart().await?;
        verify_fails(
            &cp,
            "inserted row",
            &[&format!("seq {}", expected + 1), "forged-decision", "inserted"],
        )
        .await?;

        // Insert: a row without a place in the chain.
        cp.kill().await?;
        restore(&pristine, &db)?;
        sqlite3(
            &db,
            "INSERT INTO decisions (decision_id, ts, ts_ms, source, subject, grant_id, tool, allow, \
             approval_id, approved_by, reported_by, record) \
             SELECT 'unchained-decision', ts, ts_ms, source, subject, grant_id, tool, allow, \
             approval_id, approved_by, reported_by, record FROM decisions WHERE seq = 2",
        )?;
        cp.restart().await?;
        verify_fails(&cp, "unchained row", &["unchained-decision", "inserted"]).await?;

        // The untouched copy verifies.
        cp.kill().await?;
        restore(&pristine, &db)?;
        cp.restart().await?;
        let summary = cp.cli_ok(&["audit", "verify"]).await?;
        anyhow::ensure!(
            summary.starts_with(&format!("{expected} records, ")),
            "the untouched copy: {summary}"
        );
        Ok(())
    })
    .await;
}
