//! `make demo` is the README's first command: `mandate demo` runs it end to end with the real
//! sidecars and the reference policy, and exits non-zero when any of its own checks fails.

use std::process::Stdio;
use std::time::Duration;

use mandate_e2e::{bin, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandate_demo_passes_all_its_checks() {
    // The checkout's policies/ (the demo runs its reference/ policy), wherever the binaries were built.
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let out = within(
        Duration::from_secs(120),
        "mandate demo",
        tokio::process::Command::new(bin("mandate").expect("mandate is built"))
            .args(["demo", "--policies", policies])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finished in time")
    .expect("the demo started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Demo finished: all"),
        "mandate demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The second half acts for a person: the tool is told on whose behalf, and a held call is
    // approved through the CLI and found in the audit log by its approver.
    for shown in [
        "x-mandate-on-behalf-of: alice@example.com",
        "$ mandate approve ",
        "$ mandate audit query --approver bob@example.com",
        "signature does not verify",
        "already used",
    ] {
        assert!(
            stdout.contains(shown),
            "the demo shows {shown:?}:\n{stdout}"
        );
    }
}
