//! The machine's own scheduling jitter: how late a sleeping thread wakes up on each benchmark CPU.
//!
//! Every latency the harness reports includes wake-ups like these (load generator, proxies, app),
//! so this is the floor below which latency differences cannot be resolved on this machine.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Wake-up lateness of 1 ms sleeps on one CPU, in µs.
#[derive(Debug, Clone, Copy)]
pub struct Jitter {
    /// The CPU measured.
    pub cpu: usize,
    /// Median lateness.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Worst.
    pub max_us: u64,
}

/// Measures every CPU in `cpus` at once for `duration`, one pinned thread each.
pub fn measure(cpus: &[usize], duration: Duration) -> Vec<Jitter> {
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| std::thread::spawn(move || one_cpu(cpu, duration)))
        .collect();
    threads.into_iter().filter_map(|t| t.join().ok()?).collect()
}

fn one_cpu(cpu: usize, duration: Duration) -> Option<Jitter> {
    crate::procs::pin_current_thread(&[cpu]).ok()?;
    // SAFETY: PR_SET_TIMERSLACK changes only this thread's timer slack; plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
    let period = Duration::from_millis(1);
    let start = Instant::now();
    let mut due = start + period;
    while due < start + duration {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let late = Instant::now().saturating_duration_since(due);
        hist.saturating_record(u64::try_from(late.as_micros()).unwrap_or(u64::MAX).max(1));
        due += period;
    }
    Some(Jitter {
        cpu,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
    })
}
