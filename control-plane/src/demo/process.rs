//! The demo's child processes: `mandate serve` and the `mandate-proxy` sidecars, each logging to a
//! file and stopped with SIGTERM.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a process gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The proxy binary is not where we looked.
    #[error("mandate-proxy not found at {}: build it with `cargo build --workspace --bins` (or run `make demo`), or pass --proxy-bin", .0.display())]
    BinaryMissing(PathBuf),
    /// The log file could not be created.
    #[error("cannot create the log file {}: {source}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start {}: {source}", bin.display())]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting on or signalling the process failed.
    #[error("cannot manage the {name} process (pid {pid}): {source}")]
    Wait {
        /// The process's name.
        name: String,
        /// Its process id.
        pid: u32,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A managed sidecar: where it listens, which control plane it enrols with, where it sends traffic.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// The control plane's URL.
    pub control_plane: String,
    /// Outbound (agent-facing) listener.
    pub outbound: SocketAddr,
    /// Inbound (mTLS) listener.
    pub inbound: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Local application inbound calls go to, if any.
    pub app: Option<SocketAddr>,
    /// `--route` values.
    pub routes: Vec<String>,
    /// `--decision-log`: where decisions are written, one JSON line each.
    pub decision_log: PathBuf,
}

impl SidecarSpec {
    /// The command-line arguments for `mandate-proxy` (the join token goes in the environment).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--trust-domain".into(),
            "mandate.local".into(),
            "--control-plane".into(),
            self.control_plane.clone().into(),
            "--outbound".into(),
            self.outbound.to_string().into(),
            "--inbound".into(),
            self.inbound.to_string().into(),
            "--admin".into(),
            self.admin.to_string().into(),
            "--decision-log".into(),
            self.decision_log.clone().into(),
        ];
        if let Some(app) = self.app {
            args.extend(["--app".into(), app.to_string().into()]);
        }
        for route in &self.routes {
            args.extend(["--route".into(), route.into()]);
        }
        args
    }
}

/// Removes the user's `MANDATE_*` settings (routes, config file, server, …) from a child's
/// environment: they would change what the demo shows. Only the log level is passed on, to debug
/// a demo that fails.
pub fn without_user_settings(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("MANDATE_") && key_str != "MANDATE_LOG" {
            command.env_remove(&key);
        }
    }
}

/// How a sidecar ended when asked to stop.
#[derive(Debug, Clone, Copy)]
pub enum Stopped {
    /// It had exited before the signal was sent.
    AlreadyExited(ExitStatus),
    /// It exited after SIGTERM.
    Terminated(ExitStatus),
    /// It ignored SIGTERM for the whole stop timeout and was killed.
    Killed(ExitStatus),
}

/// A child process that answers `/readyz` on `admin`. Dropping it stops the process, so no child
/// outlives a failed demo.
pub struct Process {
    name: &'static str,
    admin: SocketAddr,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Starts `bin ARGS` with `envs`, logging stdout and stderr to `log_dir/<name>.log`.
    pub fn spawn(
        bin: &Path,
        name: &'static str,
        admin: SocketAddr,
        args: Vec<OsString>,
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Self, ProcessError> {
        if !bin.is_file() {
            return Err(ProcessError::BinaryMissing(bin.to_owned()));
        }
        let log = log_dir.join(format!("{name}.log"));
        let log_err = |source| ProcessError::Log {
            path: log.clone(),
            source,
        };
        let stderr = File::create(&log).map_err(log_err)?;
        let stdout = stderr.try_clone().map_err(log_err)?;
        let mut command = Command::new(bin);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        without_user_settings(&mut command);
        command.envs(envs.iter().copied());
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        Ok(Self {
            name,
            admin,
            child,
            log,
            exit: None,
        })
    }

    /// Its name in the transcript ("control plane", "agent sidecar", …).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it answers `/readyz` and `/metrics`.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The exit status if the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Sends SIGTERM and waits for the exit; kills it if it has not exited within the stop timeout.
    pub fn stop(&mut self) -> Result<Stopped, ProcessError> {
        if let Some(status) = self.exited() {
            return Ok(Stopped::AlreadyExited(status));
        }
        let pid = self.child.id();
        let wait_err = |source| ProcessError::Wait {
            name: self.name.to_owned(),
            pid,
            source,
        };
        let pid_t = libc::pid_t::try_from(pid)
            .map_err(|_| wait_err(std::io::Error::other("pid out of range")))?;
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own unreaped child, so
        // the id cannot have been recycled for another process.
        if unsafe { libc::kill(pid_t, libc::SIGTERM) } != 0 {
            return Err(wait_err(std::io::Error::last_os_error()));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(wait_err)? {
                self.exit = Some(status);
                return Ok(Stopped::Terminated(status));
            }
            if Instant::now() >= deadline {
                self.child.kill().map_err(wait_err)?;
                let status = self.child.wait().map_err(wait_err)?;
                self.exit = Some(status);
                return Ok(Stopped::Killed(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Best effort on the error path: a process left running would hold its ports.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reserves `n` distinct free ports on 127.0.0.1.
///
/// The ports are released when this returns, so another process could take one before the child
/// binds it; on a developer machine that race is rare, and the demo then reports the bind error.
pub fn free_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    // Holding every listener until all are bound is what makes the ports distinct.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(TcpListener::local_addr).collect()
}
