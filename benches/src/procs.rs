//! Child processes (pinned with taskset, killed with the harness), CPU lists, ports and the temp dir.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

/// Parses a taskset-style CPU list (`0`, `0-3`, `1,3`) into CPU numbers.
pub fn parse_cpu_list(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{s:?} is not a CPU list: use e.g. 0, 0-1 or 0,2");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
                if a > b {
                    bail!(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().with_context(bad)?),
        }
    }
    if cpus.is_empty() {
        bail!("empty CPU list");
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Number of online CPUs of the machine (not of this process's affinity mask).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins the calling thread (and every thread it starts afterwards) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it for cpu < CPU_SETSIZE (checked);
    // sched_setaffinity(0, ..) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                bail!("CPU {c} is out of range");
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpus:?}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Finds an executable by name in PATH, then in the sbin directories PATH often lacks.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `n` distinct free loopback ports. All are bound at once before any is released: the kernel
/// may hand a just-released port out again, so picking them one by one can repeat a port. (The
/// race with other programs between release and the child's bind is accepted here.)
pub fn free_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding a loopback port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?)).collect()
}

/// How child processes get pinned to CPUs.
#[derive(Debug, Clone)]
pub struct Pinner {
    taskset: Option<PathBuf>,
}

impl Pinner {
    /// Uses taskset when installed; otherwise children are pinned with sched_setaffinity before exec.
    pub fn new() -> Self {
        Self {
            taskset: which("taskset"),
        }
    }

    /// How pinning is done, for the report.
    pub fn describe(&self) -> &'static str {
        if self.taskset.is_some() {
            "taskset -c"
        } else {
            "sched_setaffinity before exec (taskset not installed)"
        }
    }
}

/// A process started by the harness: pinned, logging to a file, stopped when dropped.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    /// The command line, as the report shows it.
    pub command_line: String,
}

/// What to start.
pub struct Spawn<'a> {
    /// Name in messages and the log file name.
    pub name: &'a str,
    /// Program to run.
    pub program: &'a Path,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// CPUs to pin it to.
    pub cpus: &'a [usize],
    /// Extra environment.
    pub env: Vec<(&'a str, &'a str)>,
    /// Directory for the log file.
    pub log_dir: &'a Path,
}

impl Child {
    /// Starts the process pinned to `cpus`, with stdout and stderr in `<log_dir>/<name>.log`.
    pub fn spawn(pinner: &Pinner, s: Spawn<'_>) -> anyhow::Result<Self> {
        let log = s.log_dir.join(format!("{}.log", s.name));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let cpu_list = s
            .cpus
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = match &pinner.taskset {
            // taskset execs the program, so the child's PID is the program's PID.
            Some(taskset) => {
                let mut c = Command::new(taskset);
                c.arg("-c").arg(&cpu_list).arg(s.program);
                c
            }
            None => {
                let cpus = s.cpus.to_vec();
                let mut c = Command::new(s.program);
                // SAFETY: only async-signal-safe syscalls run between fork and exec.
                unsafe {
                    c.pre_exec(move || {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        for &cpu in &cpus {
                            libc::CPU_SET(cpu, &mut set);
                        }
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                        Ok(())
                    });
                }
                c
            }
        };
        cmd.args(&s.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // Inherited MANDATE_* variables would silently change the sidecars' configuration.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MANDATE_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe. The child dies with the harness (even on abort or
        // SIGKILL), so no proxy is left holding ports after an interrupted run.
        unsafe {
            cmd.pre_exec(|| {
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
        let command_line = std::iter::once(format!("taskset -c {cpu_list}"))
            .chain(std::iter::once(s.program.display().to_string()))
            .chain(s.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", s.name, s.program.display()))?;
        Ok(Self {
            name: s.name.to_owned(),
            child,
            log,
            command_line,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of its log:\n{}",
                self.name,
                self.log_tail(2000)
            );
        }
        Ok(())
    }

    /// The last `max` bytes of the process's log.
    pub fn log_tail(&self, max: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until `addr` accepts TCP connections, failing early if the process exits.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {addr} within {timeout:?}; end of its log:\n{}",
                    self.name,
                    self.log_tail(2000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill with a PID we own (our unreaped child, so it cannot have been recycled).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
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

impl Drop for Child {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A scratch directory for certificates, configs and logs, removed when dropped unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(keep: bool) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("mandate-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("3,1,1").unwrap(), vec![1, 3]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
