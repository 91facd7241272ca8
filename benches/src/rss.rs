//! Memory and CPU of a process tree, read from /proc.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Memory of a process tree, summed over its processes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mem {
    /// Resident set size (VmRSS). Shared pages count once per process, so a multi-process
    /// server's sum overstates what it really uses; see `pss`.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM).
    pub hwm_kib: u64,
    /// Proportional set size: shared pages split between the processes that map them.
    pub pss_kib: u64,
    /// Number of processes summed.
    pub procs: usize,
}

impl Mem {
    /// RSS in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// Peak RSS in MiB.
    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }

    /// PSS in MiB.
    pub fn pss_mib(&self) -> f64 {
        self.pss_kib as f64 / 1024.0
    }
}

/// `pid` and its direct children (an nginx master and its workers; a sidecar alone).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
                == Some(pid)
            {
                pids.push(child);
            }
        }
    }
    pids
}

/// Fields of /proc/PID/stat after the command name (field 3, the state, comes first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Current memory of the tree rooted at `pid`.
pub fn sample(pid: u32) -> Mem {
    let mut mem = Mem::default();
    for p in tree(pid) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        mem.rss_kib += status_kib(&status, "VmRSS:");
        mem.hwm_kib += status_kib(&status, "VmHWM:");
        mem.pss_kib += std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .map(|s| status_kib(&s, "Pss:"))
            .unwrap_or(0);
        mem.procs += 1;
    }
    mem
}

/// CPU time (user + system) consumed so far by the tree rooted at `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&tree(pid))
}

/// CPU time (user + system, all threads) consumed so far by exactly these processes, in seconds.
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| {
            // utime and stime are fields 14 and 15 of stat, so 11 and 12 after the name.
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / ticks_per_sec
        })
        .sum()
}

/// The CPUs a process may run on (Cpus_allowed_list), to show that pinning took effect.
pub fn cpus_allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Samples the memory of several process trees on a background thread while a phase runs.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Vec<Mem>>>,
}

impl Sampler {
    /// Starts sampling every `every`; a thread keeps the /proc reads off the load generator's runtime.
    pub fn start(pids: Vec<u32>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = vec![Vec::new(); pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (i, &pid) in pids.iter().enumerate() {
                    samples[i].push(sample(pid));
                }
                std::thread::sleep(every);
            }
            samples
        });
        Self { stop, handle }
    }

    /// Stops and returns, per tree, the last sample and the largest RSS seen.
    pub fn finish(self) -> Vec<(Mem, Mem)> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.handle.join().unwrap_or_default();
        samples
            .into_iter()
            .map(|s| {
                let last = s.last().copied().unwrap_or_default();
                let max = s
                    .iter()
                    .copied()
                    .max_by_key(|m| m.rss_kib)
                    .unwrap_or_default();
                (last, max)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_cpu() {
        let me = std::process::id();
        let m = sample(me);
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib, "{m:?}");
        assert!(cpu_seconds(me) >= 0.0);
        assert_ne!(cpus_allowed(me), "?");
    }
}

/// CPU time of whole CPUs from /proc/stat, in seconds, to see load the harness did not cause.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq, summed over the CPUs asked for.
    pub busy_s: f64,
    /// Time the hypervisor gave these virtual CPUs' slots to someone else.
    pub steal_s: f64,
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;

    fn sub(self, o: CpuTimes) -> CpuTimes {
        CpuTimes {
            busy_s: self.busy_s - o.busy_s,
            steal_s: self.steal_s - o.steal_s,
        }
    }
}

/// Busy and steal time so far of `cpus`, from /proc/stat.
pub fn cpu_times(cpus: &[usize]) -> CpuTimes {
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut t = CpuTimes::default();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(cpu) = f
            .next()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        // user nice system idle iowait irq softirq steal ...
        let v: Vec<f64> = f.map(|x| x.parse().unwrap_or(0.0)).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        t.busy_s += (at(0) + at(1) + at(2) + at(5) + at(6)) / ticks_per_sec;
        t.steal_s += at(7) / ticks_per_sec;
    }
    t
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
