//! `mandate-proxy init-iptables` and `clean-iptables` against the real iptables and ip6tables,
//! each test in its own private network namespace so no rule touches the host: init installs the
//! chains and rules it promises, a second init leaves exactly one set, clean removes all of it
//! (and succeeds when nothing is installed), `--dry-run` changes nothing and prints exactly what
//! a real run does, and without privileges or tools the error says what to do.
//!
//! Needs root, `ip`, `iptables` (with ip6tables) and `setpriv`; prints `SKIP:` otherwise.

use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mandate_e2e::netns::Netns;
use mandate_e2e::{ensure_eq, pod, within};

const LIMIT: Duration = Duration::from_secs(60);

/// The flags of every init here: each kind of exclusion, a gid, both families.
const INIT: &[&str] = &[
    "init-iptables",
    "--ipv6",
    "--proxy-gid",
    "1337",
    "--exclude-inbound-ports",
    "15000",
    "--exclude-outbound-ports",
    "443",
    "--exclude-outbound-cidrs",
    "10.0.0.0/8,fd00::/8",
];

/// What `iptables-save -t nat` shows of ours after [`INIT`], both families but for the block.
fn ours(block: &str) -> Vec<String> {
    [
        ":MANDATE_INBOUND -",
        ":MANDATE_OUTPUT -",
        "-A PREROUTING -p tcp -j MANDATE_INBOUND",
        "-A OUTPUT -p tcp -j MANDATE_OUTPUT",
        "-A MANDATE_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A MANDATE_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
        "-A MANDATE_INBOUND -p tcp -j REDIRECT --to-ports 15006",
        "-A MANDATE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MANDATE_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A MANDATE_OUTPUT -o lo -j RETURN",
        "-A MANDATE_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
        &format!("-A MANDATE_OUTPUT -d {block} -j RETURN"),
        "-A MANDATE_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test]
async fn init_twice_leaves_one_set_of_rules_and_clean_removes_them_all() {
    let Some(ns) = namespace(
        "init_twice_leaves_one_set_of_rules_and_clean_removes_them_all",
        "iptables-init",
    )
    .await
    else {
        return;
    };
    within(LIMIT, "the scenario", async {
        let pristine = State::of(&ns).await?;
        ensure_eq!((pristine.v4_ours(), pristine.v6_ours()), (vec![], vec![]), "a fresh namespace has none of ours");

        let out = succeed(mandate(&ns, INIT).await?)?;
        ensure_eq!(out.trim(), "installed nat chains MANDATE_INBOUND (from PREROUTING, TCP to port 15006) and MANDATE_OUTPUT (from OUTPUT, TCP to port 15001) for IPv4 and IPv6", "init's report");
        let installed = State::of(&ns).await?;
        ensure_eq!(installed.v4_ours(), ours("10.0.0.0/8"), "IPv4 rules");
        ensure_eq!(installed.v6_ours(), ours("fd00::/8"), "IPv6 rules");

        succeed(mandate(&ns, INIT).await?)?;
        ensure_eq!(State::of(&ns).await?, installed, "a second init changes nothing");

        // A jump added twice by hand (an older, non-idempotent setup) goes too.
        run(&ns, "iptables", &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MANDATE_OUTPUT"]).await?;
        let out = succeed(mandate(&ns, &["clean-iptables", "--ipv6"]).await?)?;
        ensure_eq!(out.trim(), "removed nat chains MANDATE_INBOUND and MANDATE_OUTPUT and their jumps for IPv4 and IPv6", "clean's report");
        ensure_eq!(State::of(&ns).await?, pristine, "clean leaves the nat tables as they were");

        succeed(mandate(&ns, &["clean-iptables", "--ipv6"]).await?)
            .context("clean with nothing installed")?;
        ensure_eq!(State::of(&ns).await?, pristine, "a second clean changes nothing");
        Ok(())
    })
    .await
    .and_then(|r| r)
    .unwrap();
}

#[tokio::test]
async fn dry_run_changes_nothing_and_prints_exactly_what_a_real_run_does() {
    let Some(ns) = namespace(
        "dry_run_changes_nothing_and_prints_exactly_what_a_real_run_does",
        "iptables-dry-run",
    )
    .await
    else {
        return;
    };
    within(LIMIT, "the scenario", async {
        let pristine = State::of(&ns).await?;
        let init_args: Vec<&str> = INIT.iter().copied().chain(["--dry-run"]).collect();
        let script = succeed(mandate(&ns, &init_args).await?)?;
        ensure_eq!(
            State::of(&ns).await?,
            pristine,
            "init --dry-run changes nothing"
        );
        // The chains' rules verbatim (the jumps are shown as the -C || -I that adds them).
        for rule in ours("10.0.0.0/8").iter().skip(4) {
            if !script.contains(rule.as_str()) {
                bail!("init --dry-run does not show {rule:?}:\n{script}");
            }
        }

        // Its output, run by sh, installs what init installs.
        run(&ns, "sh", &["-c", &script]).await?;
        let by_script = State::of(&ns).await?;
        succeed(mandate(&ns, &["clean-iptables", "--ipv6"]).await?)?;
        succeed(mandate(&ns, INIT).await?)?;
        let by_init = State::of(&ns).await?;
        ensure_eq!(
            by_script,
            by_init,
            "the dry-run script and init install the same"
        );

        let script = succeed(mandate(&ns, &["clean-iptables", "--ipv6", "--dry-run"]).await?)?;
        ensure_eq!(
            State::of(&ns).await?,
            by_init,
            "clean --dry-run changes nothing"
        );
        run(&ns, "sh", &["-c", &script]).await?;
        ensure_eq!(
            State::of(&ns).await?,
            pristine,
            "the clean dry-run script removes everything"
        );
        Ok(())
    })
    .await
    .and_then(|r| r)
    .unwrap();
}

#[tokio::test]
async fn failures_name_the_command_or_flag_and_what_to_do_and_change_nothing() {
    let Some(ns) = namespace(
        "failures_name_the_command_or_flag_and_what_to_do_and_change_nothing",
        "iptables-failures",
    )
    .await
    else {
        return;
    };
    within(LIMIT, "the scenario", async {
        let pristine = State::of(&ns).await?;
        let bin = mandate_e2e::bin("mandate-proxy")?;

        let unprivileged = ns
            .command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .arg("init-iptables")
            .output()
            .await?;
        let err = fail(unprivileged)?;
        for want in ["`iptables-restore --noflush` failed", "Permission denied", "NET_ADMIN"] {
            if !err.contains(want) {
                bail!("as nobody, the error does not say {want:?}: {err}");
            }
        }

        // `env` sets the PATH for mandate-proxy only: `ip netns exec` needs the real one.
        let no_tools = ns
            .command("env")
            .arg("PATH=/nonexistent")
            .arg(&bin)
            .arg("init-iptables")
            .output()
            .await?;
        let err = fail(no_tools)?;
        ensure_eq!(
            err.trim(),
            "mandate-proxy: cannot run `iptables-restore --noflush`: No such file or directory (os error 2) (is iptables installed? apt-get install iptables)",
            "without iptables"
        );

        let err = fail(mandate(&ns, &["init-iptables", "--exclude-outbound-cidrs", "fd00::/8"]).await?)?;
        ensure_eq!(
            err.trim(),
            "mandate-proxy: --exclude-outbound-cidrs: fd00::/8 is an IPv6 block: add --ipv6 to install the IPv6 rules it belongs to",
            "an IPv6 block without --ipv6"
        );
        let err = fail(mandate(&ns, &["init-iptables", "--outbound-port", "15006"]).await?)?;
        if !err.contains("--outbound-port: 15006 is also --inbound-port") {
            bail!("same ports: {err}");
        }

        ensure_eq!(State::of(&ns).await?, pristine, "no failure changed anything");
        Ok(())
    })
    .await
    .and_then(|r| r)
    .unwrap();
}

/// A fresh namespace for test `test`, or `None` after printing why this machine cannot run it.
async fn namespace(test: &str, tag: &str) -> Option<Netns> {
    let tools = [
        ("ip", "-V", "iproute2"),
        ("iptables", "--version", "iptables"),
        ("ip6tables", "--version", "iptables"),
        ("setpriv", "--version", "util-linux"),
    ];
    if let Some(why) = pod::missing_prerequisites(&tools).await {
        eprintln!("SKIP: {test}: {why}");
        return None;
    }
    Some(Netns::create(tag).await.expect("network namespace created"))
}

/// Runs `mandate-proxy ARGS` inside the namespace.
async fn mandate(ns: &Netns, args: &[&str]) -> anyhow::Result<Output> {
    Ok(ns
        .command(mandate_e2e::bin("mandate-proxy")?)
        .args(args)
        .output()
        .await?)
}

/// Its stdout, or an error with its stderr unless it exited 0.
fn succeed(out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Its stderr, or an error unless it exited non-zero.
fn fail(out: Output) -> anyhow::Result<String> {
    if out.status.success() {
        bail!("succeeded: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8(out.stderr)?)
}

async fn run(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    succeed(ns.command(program).args(args).output().await?)
        .with_context(|| format!("{program} {args:?}"))
}

/// Both nat tables as `iptables-save` shows them, without its dated comments and counters.
#[derive(Debug, PartialEq, Eq)]
struct State {
    v4: Vec<String>,
    v6: Vec<String>,
}

impl State {
    async fn of(ns: &Netns) -> anyhow::Result<Self> {
        let save = |program| async move {
            let text = run(ns, program, &["-t", "nat"]).await?;
            anyhow::Ok(
                text.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| match l.rsplit_once(" [") {
                        Some((chain, _counters)) if l.starts_with(':') => chain.to_owned(),
                        _ => l.to_owned(),
                    })
                    .collect(),
            )
        };
        Ok(Self {
            v4: save("iptables-save").await?,
            v6: save("ip6tables-save").await?,
        })
    }

    fn v4_ours(&self) -> Vec<String> {
        mentioning_ours(&self.v4)
    }

    fn v6_ours(&self) -> Vec<String> {
        mentioning_ours(&self.v6)
    }
}

fn mentioning_ours(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("MANDATE_"))
        .cloned()
        .collect()
}
