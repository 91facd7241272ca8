//! A throwaway PostgreSQL cluster for the control plane's ingest benchmark: initdb into the run's
//! scratch directory, `postgres` on a free loopback port, trust authentication, fsync off. As root,
//! both run as the `postgres` OS user (they refuse root). The same recipe as the e2e harness's
//! `tests/src/postgres.rs`, synchronous and pinned like the harness's other children.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::procs;

/// A running PostgreSQL server; stopped (SIGQUIT, then SIGKILL) when dropped.
pub struct Postgres {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// `postgres --version`.
    pub version: String,
    /// How the server was started, for the report.
    pub command_line: String,
}

/// A PostgreSQL server binary: PATH first, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    if let Some(p) = procs::which(name) {
        return Some(p);
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join(name).is_file().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d.join(name))
}

/// The uid/gid to run as: the `postgres` OS user when we are root, else ourselves.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: a valid C string; the static result is copied out at once, and the harness calls
    // no other getpw* function concurrently.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root and there is no `postgres` OS user to run initdb/postgres as");
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
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

fn command(program: &Path, user: Option<(u32, u32)>, cpus: &[usize]) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
    let cpus = cpus.to_vec();
    // SAFETY: only async-signal-safe calls between fork and exec. These closures run after the
    // uid change, so the death signal survives it.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd
}

impl Postgres {
    /// Starts a cluster in `dir`, pinned to `cpus`; `Ok(Err(reason))` when PostgreSQL is not
    /// The store a benchmarked `mandate serve` uses: a throwaway cluster in `dir` on `cpus` when
    /// `pg` (unavailable when PostgreSQL is not installed), else none (SQLite); with the report's
    /// lines saying which.
    pub fn store(
        dir: &Path,
        cpus: &[usize],
        pg: bool,
    ) -> Result<(Option<Self>, Vec<String>), crate::topology::SetupError> {
        if !pg {
            let sqlite = "SQLite at `<data-dir>/mandate.db` (the default store)".to_owned();
            return Ok((None, vec![sqlite]));
        }
        let db = Self::start(dir, cpus)?.map_err(crate::topology::SetupError::Unavailable)?;
        let facts = vec![
            format!("{} (`{}`)", db.version, db.command_line),
            format!(
                "`--database-url {}` (a throwaway cluster, fsync off)",
                db.url()
            ),
        ];
        Ok((Some(db), facts))
    }

    /// installed (the caller skips it).
    pub fn start(dir: &Path, cpus: &[usize]) -> anyhow::Result<Result<Self, String>> {
        let (Some(initdb), Some(postgres)) = (find_bin("initdb"), find_bin("postgres")) else {
            return Ok(Err(
                "PostgreSQL server binaries (initdb, postgres) not found in PATH or \
                 /usr/lib/postgresql/*/bin"
                    .to_owned(),
            ));
        };
        let user = run_as()?;
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let sock = dir.join("sock");
        std::fs::create_dir_all(&sock)?;
        if let Some((uid, gid)) = user {
            chown_tree(dir, uid, gid)?;
        }
        let init_log = dir.join("initdb.log");
        let out = std::fs::File::create(&init_log)?;
        let status = command(&initdb, user, cpus)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .context("running initdb")?;
        if !status.success() {
            bail!(
                "initdb failed ({status}):\n{}",
                std::fs::read_to_string(&init_log).unwrap_or_default()
            );
        }
        let version = Command::new(&postgres)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let log = dir.join("postgres.log");
        for attempt in 1..=3 {
            let addr = procs::free_ports(1)?[0];
            let out = std::fs::File::create(&log)?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
            }
            let port = addr.port().to_string();
            let args = [
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ];
            let mut child = command(&postgres, user, cpus)
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock)
                .args(args)
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .context("starting postgres")?;
            let command_line = format!(
                "{} -D <tmp>/postgres/data -k <tmp>/postgres/sock {}",
                postgres.display(),
                args.join(" ")
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("in use") && attempt < 3 {
                        break;
                    }
                    bail!("postgres exited with {status}:\n{text}");
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && ready(addr)
                {
                    return Ok(Ok(Self {
                        child,
                        addr,
                        log,
                        version,
                        command_line,
                    }));
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "postgres did not accept connections on {addr} within 30 s:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        bail!("postgres found no free port in three attempts")
    }

    /// The URL `mandate serve --database-url` gets.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    /// The server's process ID (the postmaster; its backends are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text[text.len().saturating_sub(2000)..].to_owned()
    }
}

/// `pg_isready` when installed (it tells "starting up" from "accepting"); else the open port does.
fn ready(addr: SocketAddr) -> bool {
    let Some(isready) = find_bin("pg_isready") else {
        return true;
    };
    Command::new(isready)
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-U", "postgres", "-t", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SIGQUIT: immediate shutdown; the cluster is thrown away with the scratch directory.
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
