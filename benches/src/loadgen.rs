//! The load generator: open-loop (fixed rate, coordinated-omission corrected) and closed-loop
//! (saturation) HTTP/1.1 load over keep-alive connections.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

/// Longest a single request may take before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest latency the histograms hold, in microseconds.
const HIST_MAX_US: u64 = 120_000_000;

/// Where the load goes and what each request looks like.
#[derive(Debug, Clone)]
pub struct Target {
    /// The TCP address the client connects to (the app, sidecar A's outbound listener, nginx A).
    pub connect: SocketAddr,
    /// Request target: origin-form (`/`) or absolute-form (`http://tool:8080/`, explicit proxy).
    pub uri: Uri,
    /// `Host` header value.
    pub host: HeaderValue,
    /// Body length every 200 response must carry, when known.
    pub expect_body: Option<usize>,
    /// Further headers every request carries (e.g. a delegation token).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Why one request failed; each kind is counted separately.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The response status was not 200.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status received.
        status: StatusCode,
        /// The start of the response body, which names the proxy's reason.
        body: String,
    },
    /// Connecting, writing or reading failed, or the body had the wrong length.
    #[error("transport: {0}")]
    Transport(String),
    /// No complete response within the time limit.
    #[error("timed out")]
    Timeout,
}

/// Error counts of one phase, with the first message of each kind for the report.
#[derive(Debug, Default, Clone)]
pub struct Errors {
    /// Non-200 responses.
    pub status: u64,
    /// Transport failures.
    pub transport: u64,
    /// Timeouts (including requests never sent because the phase's time ran out).
    pub timeout: u64,
    /// First error messages seen, at most one per kind.
    pub samples: Vec<String>,
}

impl Errors {
    /// Total failed requests.
    pub fn total(&self) -> u64 {
        self.status + self.transport + self.timeout
    }

    fn count(&mut self, e: &RequestError) {
        let (counter, kind) = match e {
            RequestError::Status { .. } => (&mut self.status, "HTTP"),
            RequestError::Transport(_) => (&mut self.transport, "transport"),
            RequestError::Timeout => (&mut self.timeout, "timed out"),
        };
        *counter += 1;
        if *counter == 1 && !self.samples.iter().any(|s| s.starts_with(kind)) {
            self.samples.push(e.to_string());
        }
    }
}

/// What a phase measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Latency of successful requests in µs (open loop: from the intended send time).
    pub latency: Histogram<u64>,
    /// Latency of successful requests in µs from when each was actually sent (service time): the
    /// same as `latency` in the closed loop; in the open loop it leaves out the generator's own
    /// dispatch delay and any queueing behind busy connections.
    pub service: Histogram<u64>,
    /// How late the generator itself sent each request after its intended time, µs (open loop only).
    pub send_lag: Histogram<u64>,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: Errors,
    /// Wall time from the first scheduled request to the last completion.
    pub elapsed: Duration,
    /// When the last request of this outcome completed.
    last_done: Option<Instant>,
}

impl Outcome {
    fn empty() -> Self {
        Self {
            latency: histogram(),
            service: histogram(),
            send_lag: histogram(),
            ok: 0,
            errors: Errors::default(),
            elapsed: Duration::ZERO,
            last_done: None,
        }
    }

    /// Adds another round of the same phase: counts and histograms add up, and so do durations.
    pub fn absorb(&mut self, other: Outcome) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        let _ = self.send_lag.add(&other.send_lag);
        self.ok += other.ok;
        self.errors.status += other.errors.status;
        self.errors.transport += other.errors.transport;
        self.errors.timeout += other.errors.timeout;
        for e in other.errors.samples {
            if self.errors.samples.len() < 3 && !self.errors.samples.contains(&e) {
                self.errors.samples.push(e);
            }
        }
        self.elapsed += other.elapsed;
    }

    /// Records one request, its latency measured from `from` and its service time from `sent`.
    fn done(&mut self, result: Result<(), RequestError>, from: Instant, sent: Instant) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(micros(from.elapsed()));
                self.service.saturating_record(micros(sent.elapsed()));
            }
            Err(e) => self.errors.count(&e),
        }
        self.last_done = Some(Instant::now());
    }

    /// Successful requests per second over the phase.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q`, in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Service time at quantile `q`, in milliseconds.
    pub fn service_ms(&self, q: f64) -> f64 {
        self.service.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One keep-alive HTTP/1.1 connection, reopened after a failure.
struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            sender: None,
        }
    }

    async fn connect(&mut self) -> Result<(), RequestError> {
        let stream = TcpStream::connect(self.target.connect).await.map_err(|e| {
            RequestError::Transport(format!("connect {}: {e}", self.target.connect))
        })?;
        // Nagle would hold small requests back behind the previous response's ACK.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| RequestError::Transport(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one GET and reads the whole response; any failure drops the connection.
    async fn request(&mut self, limit: Duration) -> Result<(), RequestError> {
        let result = tokio::time::timeout(limit, self.request_inner()).await;
        let result = result.unwrap_or(Err(RequestError::Timeout));
        if result.is_err() {
            // The connection may hold a half-read response; never reuse it.
            self.sender = None;
        }
        result
    }

    async fn request_inner(&mut self) -> Result<(), RequestError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender
            .ready()
            .await
            .map_err(|e| RequestError::Transport(format!("connection not ready: {e}")))?;
        let mut req = Request::get(self.target.uri.clone())
            .header(header::HOST, self.target.host.clone())
            .body(Empty::<Bytes>::new())
            .expect("request parts are valid");
        for (name, value) in &self.target.headers {
            req.headers_mut().append(name.clone(), value.clone());
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RequestError::Transport(format!("request: {e}")))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut read = Vec::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RequestError::Transport(format!("body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                len += data.len();
                if status != StatusCode::OK && read.len() < 300 {
                    read.extend_from_slice(data);
                }
            }
        }
        if status != StatusCode::OK {
            return Err(RequestError::Status {
                status,
                body: String::from_utf8_lossy(&read).chars().take(300).collect(),
            });
        }
        if let Some(want) = self.target.expect_body
            && len != want
        {
            return Err(RequestError::Transport(format!(
                "body of {len} bytes, expected {want}"
            )));
        }
        Ok(())
    }
}

/// Opens `n` connections up front so connection set-up is not part of the measurement.
async fn open_conns(target: &Arc<Target>, n: usize) -> Vec<Conn> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = Conn::new(target.clone());
        // A failure here shows up as errors on the first requests, where it belongs.
        let _ = c.connect().await;
        conns.push(c);
    }
    conns
}

/// Sends single requests until one succeeds or `deadline` passes; returns the last error.
pub async fn probe(target: &Target, deadline: Instant) -> Result<(), RequestError> {
    let mut conn = Conn::new(Arc::new(target.clone()));
    loop {
        match conn.request(REQUEST_TIMEOUT).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Open loop: `rate` requests per second for `duration`, spread over `connections` connections.
///
/// Request `i` is due at `t0 + i/rate`; its latency is measured from that intended time, so a stall
/// that delays later sends is charged to them (coordinated-omission correction, as in wrk2).
/// Requests are released by a timerfd because tokio's own timer only has millisecond resolution.
pub async fn open_loop(
    target: &Target,
    rate: u64,
    duration: Duration,
    connections: usize,
) -> Outcome {
    let target = Arc::new(target.clone());
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let conns = open_conns(&target, connections.max(1)).await;
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let timer = match PreciseTimer::new() {
        Ok(t) => t,
        Err(e) => {
            let mut out = Outcome::empty();
            out.errors
                .count(&RequestError::Transport(format!("timerfd: {e}")));
            return out;
        }
    };
    let t0 = Instant::now() + Duration::from_millis(5);
    // Requests still queued this long after the schedule ends are counted as timeouts, not sent,
    // so a stuck proxy cannot stretch the phase without bound.
    let hard_end = t0 + duration + REQUEST_TIMEOUT;
    let pacer = tokio::spawn(async move {
        let nanos_per_req = 1_000_000_000f64 / rate.max(1) as f64;
        for i in 0..total {
            let intended = t0 + Duration::from_nanos((i as f64 * nanos_per_req) as u64);
            if timer.sleep_until(intended).await.is_err() || tx.send(intended).is_err() {
                return;
            }
        }
    });

    // One outcome shared by all workers (they run on one thread, so the lock is never contended):
    // per-worker histograms would mean megabytes of fresh pages faulted in during the first requests.
    let shared = Arc::new(StdMutex::new(Outcome::empty()));
    let mut workers = Vec::new();
    for mut conn in conns {
        let rx = rx.clone();
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let intended = { rx.lock().await.recv().await };
                let Some(intended) = intended else { break };
                let sent = Instant::now();
                if sent >= hard_end {
                    lock(&shared).errors.count(&RequestError::Timeout);
                    continue;
                }
                lock(&shared)
                    .send_lag
                    .saturating_record(micros(sent.saturating_duration_since(intended)));
                let result = conn.request(REQUEST_TIMEOUT.min(hard_end - sent)).await;
                lock(&shared).done(result, intended, sent);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let _ = pacer.await;
    finish(&shared, t0)
}

fn lock(m: &StdMutex<Outcome>) -> std::sync::MutexGuard<'_, Outcome> {
    // A panicking worker aborts the process (panic = "abort"), so poisoning cannot hide a bug here.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes the shared outcome; the phase lasted from `start` to its last response.
fn finish(shared: &StdMutex<Outcome>, start: Instant) -> Outcome {
    let mut out = std::mem::replace(&mut *lock(shared), Outcome::empty());
    out.elapsed = out
        .last_done
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(start);
    out
}

/// Closed loop: each of `connections` connections sends its next request as soon as the last one
/// completes, for `duration`; latency is measured from each actual send.
pub async fn closed_loop(target: &Target, connections: usize, duration: Duration) -> Outcome {
    let target = Arc::new(target.clone());
    let conns = open_conns(&target, connections.max(1)).await;
    let shared = Arc::new(StdMutex::new(Outcome::empty()));
    let start = Instant::now();
    let end = start + duration;
    let mut workers = Vec::new();
    for mut conn in conns {
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = conn.request(REQUEST_TIMEOUT).await;
                let failed = result.is_err();
                lock(&shared).done(result, sent, sent);
                if failed {
                    // Do not turn a refusing endpoint into a busy loop of errors.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    finish(&shared, start)
}

/// A one-shot absolute `CLOCK_MONOTONIC` timer (timerfd) on tokio's reactor: microsecond-precise
/// wake-ups without a second thread to hand each request over from.
struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
    /// `Instant` and `CLOCK_MONOTONIC` read together, to convert one into the other.
    base: Instant,
    base_ns: u128,
}

impl PreciseTimer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is owned by the OwnedFd below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: timespec is plain data written by clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        // std's Instant reads CLOCK_MONOTONIC on Linux, so this pairing converts exactly.
        let base = Instant::now();
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open until it deregisters it.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Self {
            fd,
            base,
            base_ns: ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128,
        })
    }

    async fn sleep_until(&self, at: Instant) -> std::io::Result<()> {
        if at <= Instant::now() {
            return Ok(());
        }
        let ns = self.base_ns + at.duration_since(self.base).as_nanos();
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid descriptor and itimerspec; the old value is not requested.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}
