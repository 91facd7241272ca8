//! A throwaway PostgreSQL server: initdb into a scratch directory, listen on a free loopback port.
//!
//! initdb and postgres refuse to run as root; as root they run as the `postgres` OS user (the scratch
//! directory is handed to that user first).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::ports;

/// A running PostgreSQL server; stopped when dropped.
pub struct Postgres {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where PostgreSQL's server binaries are: PATH first, then the newest /usr/lib/postgresql/*/bin.
pub fn find_pg_bin(name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join(name).is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().map(|d| d.join(name))
}

/// The uid/gid to run the server as: the `postgres` user when we are root, else ourselves.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: getpwnam with a valid C string; the result is read immediately, before any other
    // getpw* call could overwrite the static buffer (tests only call this here).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root and there is no `postgres` OS user to run initdb/postgres as");
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn command(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut cmd = std::process::Command::new(program);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
    // Not kill_on_drop: SIGKILL would orphan the server's backends; Drop sends SIGQUIT instead.
    Command::from(cmd)
}

impl Postgres {
    /// Starts a server, or returns `Ok(Err(reason))` when PostgreSQL is not installed (the caller skips).
    pub async fn start() -> anyhow::Result<Result<Self, String>> {
        let (Some(initdb), Some(postgres)) = (find_pg_bin("initdb"), find_pg_bin("postgres"))
        else {
            return Ok(Err(
                "PostgreSQL server binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql/*/bin"
                    .to_owned(),
            ));
        };
        let user = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("mandate-e2e-pg-")
            .tempdir()?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock)?;
        if let Some((uid, gid)) = user {
            chown_tree(dir.path(), uid, gid)?;
        }
        let log = dir.path().join("postgres.log");
        let init_log = std::fs::File::create(dir.path().join("initdb.log"))?;
        let out = command(&initdb, user)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(init_log.try_clone()?)
            .stderr(init_log)
            .status()
            .await
            .context("run initdb")?;
        if !out.success() {
            let text = std::fs::read_to_string(dir.path().join("initdb.log")).unwrap_or_default();
            bail!("initdb failed ({out}):\n{text}");
        }

        for attempt in 1..=3 {
            let addr = ports::free_addr();
            let log_file = std::fs::File::create(&log)?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
            }
            let mut child = command(&postgres, user)
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock)
                .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
                .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("start postgres")?;
            // Ready when it accepts TCP connections on its port (or gone when it exits).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("in use") && attempt < 3 {
                        break;
                    }
                    bail!("postgres exited with {status}:\n{text}");
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() && pg_ready(addr).await {
                    return Ok(Ok(Self {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    }));
                }
                if tokio::time::Instant::now() >= deadline {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    bail!("postgres did not accept connections on {addr} within 30s:\n{text}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        bail!("postgres could not find a free port")
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `pg_isready` when installed (it tells "starting up" from "accepting"), else the open port suffices.
async fn pg_ready(addr: SocketAddr) -> bool {
    let Some(isready) = find_pg_bin("pg_isready") else {
        return true;
    };
    Command::new(isready)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            "postgres",
            "-t",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SIGQUIT: immediate shutdown, no checkpoint; the data directory is thrown away anyway.
            // SAFETY: kill(2) on the server process we spawned and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
        }
    }
}
