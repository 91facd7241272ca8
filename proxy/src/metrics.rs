//! Prometheus metrics of the sidecar (prefix `mandate_`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Which side of the sidecar a metric (or a decision record) describes: one type shared with the
/// control plane's records.
pub use mandate_wire::Direction;

/// Per-direction handles resolved once, so the hot path does no label lookup for them.
#[derive(Clone)]
pub struct DirectionMetrics {
    /// Request duration until response headers.
    pub duration: Histogram,
    /// Connections open now.
    pub open_connections: IntGauge,
}

/// All sidecar metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    handshake_failures: IntCounterVec,
    /// Outbound handles.
    pub outbound: DirectionMetrics,
    /// Inbound handles.
    pub inbound: DirectionMetrics,
    /// notAfter of our SVID, Unix seconds.
    pub cert_expiry: IntGauge,
    identity_reloads: IntCounterVec,
    decisions: IntCounterVec,
    /// Time spent evaluating policy, per decision.
    pub policy_eval: Histogram,
    policy_info: IntGaugeVec,
    policy_load_errors: IntCounter,
    policy_engine_divergences: IntCounter,
    /// Decision records that could not be queued for the decision log or the control plane (must stay 0).
    pub decisions_dropped: IntCounter,
    /// Decision records the control plane acknowledged.
    pub decisions_sent: IntCounter,
    /// Decision records written to the spool (managed mode).
    pub decisions_spooled: IntCounter,
    /// Bytes of decision records spooled and not yet acknowledged by the control plane.
    pub decision_spool_bytes: IntGauge,
    /// `--spool-max-bytes`.
    pub decision_spool_limit_bytes: IntGauge,
    /// Calls refused because the decision spool was full.
    pub spool_full_refusals: IntCounter,
    /// 1 while the push stream from the control plane is open.
    pub control_plane_connected: IntGauge,
    /// Push streams re-opened after breaking or falling silent.
    pub stream_reconnects: IntCounter,
    /// Pushed policy bundles refused (bad signature or digest, unusable data, compile error).
    pub bundle_rejects: IntCounter,
    delegation_verifications: IntCounterVec,
    delegation_exchanges: IntCounterVec,
    approvals: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "mandate_requests_total",
                "Requests handled, by direction and HTTP status.",
            ),
            &["direction", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mandate_request_duration_seconds",
                "Time from receiving a request to sending its response headers.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
            &["direction"],
        )
        .expect("valid metric");
        let open = IntGaugeVec::new(
            Opts::new(
                "mandate_open_connections",
                "Connections open now, by direction.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "mandate_tls_handshake_failures_total",
                "TLS handshakes that failed, by direction and reason.",
            ),
            &["direction", "reason"],
        )
        .expect("valid metric");
        let cert_expiry = IntGauge::new(
            "mandate_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the sidecar's current SVID, Unix seconds.",
        )
        .expect("valid metric");
        let identity_reloads = IntCounterVec::new(
            Opts::new(
                "mandate_identity_reloads_total",
                "Identity file reloads, by result (applied or rejected).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let decisions = IntCounterVec::new(
            Opts::new(
                "mandate_decisions_total",
                "Policy decisions, by direction, result (allow or deny) and whether they were enforced.",
            ),
            &["direction", "result", "enforced"],
        )
        .expect("valid metric");
        let policy_eval = Histogram::with_opts(
            HistogramOpts::new(
                "mandate_policy_eval_duration_seconds",
                "Time to evaluate the policy for one decision.",
            )
            .buckets(vec![
                0.000_001,
                0.000_002_5,
                0.000_005,
                0.000_01,
                0.000_025,
                0.000_05,
                0.000_1,
                0.000_25,
                0.000_5,
                0.001,
                0.005,
                0.01,
                0.05,
            ]),
        )
        .expect("valid metric");
        let policy_info = IntGaugeVec::new(
            Opts::new(
                "mandate_policy_info",
                "The policy version in force and the engine evaluating it (value 1).",
            ),
            &["version", "engine"],
        )
        .expect("valid metric");
        let policy_load_errors = IntCounter::new(
            "mandate_policy_load_errors_total",
            "Policy loads or reloads rejected (compile error, bad data, no entry point).",
        )
        .expect("valid metric");
        let policy_engine_divergences = IntCounter::new(
            "mandate_policy_engine_divergences_total",
            "Sampled decisions on which the policy VM and the interpreter disagreed (the policy then runs on the interpreter).",
        )
        .expect("valid metric");
        let decisions_dropped = IntCounter::new(
            "mandate_decisions_dropped_total",
            "Decision records that could not be queued for the decision log or the control plane.",
        )
        .expect("valid metric");
        let decisions_sent = IntCounter::new(
            "mandate_decisions_sent_total",
            "Decision records delivered to the control plane (managed mode).",
        )
        .expect("valid metric");
        let decisions_spooled = IntCounter::new(
            "mandate_decisions_spooled_total",
            "Decision records written to the on-disk spool on their way to the control plane (managed mode).",
        )
        .expect("valid metric");
        let decision_spool_bytes = IntGauge::new(
            "mandate_decision_spool_bytes",
            "Bytes of decision records spooled and not yet acknowledged by the control plane (managed mode).",
        )
        .expect("valid metric");
        let decision_spool_limit_bytes = IntGauge::new(
            "mandate_decision_spool_limit_bytes",
            "Most bytes the decision spool holds (--spool-max-bytes) before calls are refused or records dropped (managed mode).",
        )
        .expect("valid metric");
        let spool_full_refusals = IntCounter::new(
            "mandate_spool_full_refusals_total",
            "Calls refused before being forwarded because the decision spool was full (managed mode).",
        )
        .expect("valid metric");
        let control_plane_connected = IntGauge::new(
            "mandate_control_plane_connected",
            "1 while the push stream from the control plane is open, else 0 (managed mode).",
        )
        .expect("valid metric");
        let stream_reconnects = IntCounter::new(
            "mandate_control_plane_stream_reconnects_total",
            "Push streams re-opened after breaking or hearing nothing for 30 s (managed mode).",
        )
        .expect("valid metric");
        let bundle_rejects = IntCounter::new(
            "mandate_policy_bundle_rejects_total",
            "Pushed policy bundles refused: bad signature or digest, unusable data, or a compile error.",
        )
        .expect("valid metric");
        let delegation_verifications = IntCounterVec::new(
            Opts::new(
                "mandate_delegation_verifications_total",
                "Delegation tokens presented, by direction and result (ok, or the check that failed).",
            ),
            &["direction", "result"],
        )
        .expect("valid metric");
        let delegation_exchanges = IntCounterVec::new(
            Opts::new(
                "mandate_delegation_exchanges_total",
                "Incoming delegation tokens exchanged for the app (an agent's inbound side), by result (ok, cached, failed).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let approvals = IntCounterVec::new(
            Opts::new(
                "mandate_approvals_total",
                "Calls the policy put up for a person's approval, by result (requested, redeemed, refused).",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(open.clone()),
            Box::new(handshake_failures.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(identity_reloads.clone()),
            Box::new(decisions.clone()),
            Box::new(policy_eval.clone()),
            Box::new(policy_info.clone()),
            Box::new(policy_load_errors.clone()),
            Box::new(policy_engine_divergences.clone()),
            Box::new(decisions_dropped.clone()),
            Box::new(decisions_sent.clone()),
            Box::new(decisions_spooled.clone()),
            Box::new(decision_spool_bytes.clone()),
            Box::new(decision_spool_limit_bytes.clone()),
            Box::new(spool_full_refusals.clone()),
            Box::new(control_plane_connected.clone()),
            Box::new(stream_reconnects.clone()),
            Box::new(bundle_rejects.clone()),
            Box::new(delegation_verifications.clone()),
            Box::new(delegation_exchanges.clone()),
            Box::new(approvals.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let per_direction = |d: Direction| DirectionMetrics {
            duration: duration.with_label_values(&[d.as_str()]),
            open_connections: open.with_label_values(&[d.as_str()]),
        };
        // Make the reload counters visible at 0 before the first reload.
        for result in ["applied", "rejected"] {
            identity_reloads.with_label_values(&[result]);
        }
        Metrics {
            outbound: per_direction(Direction::Outbound),
            inbound: per_direction(Direction::Inbound),
            registry,
            requests,
            handshake_failures,
            cert_expiry,
            identity_reloads,
            decisions,
            policy_eval,
            policy_info,
            policy_load_errors,
            policy_engine_divergences,
            decisions_dropped,
            decisions_sent,
            decisions_spooled,
            decision_spool_bytes,
            decision_spool_limit_bytes,
            spool_full_refusals,
            control_plane_connected,
            stream_reconnects,
            bundle_rejects,
            delegation_verifications,
            delegation_exchanges,
            approvals,
        }
    }

    /// The handles of one direction.
    pub fn direction(&self, d: Direction) -> &DirectionMetrics {
        match d {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    /// Counts a finished request.
    pub fn request(&self, d: Direction, status: http::StatusCode, elapsed: std::time::Duration) {
        self.requests
            .with_label_values(&[d.as_str(), status.as_str()])
            .inc();
        self.direction(d).duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed TLS handshake.
    pub fn handshake_failure(&self, d: Direction, reason: &str) {
        self.handshake_failures
            .with_label_values(&[d.as_str(), reason])
            .inc();
    }

    /// Counts an identity reload.
    pub fn identity_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.identity_reloads.with_label_values(&[result]).inc();
    }

    /// Counts a policy decision.
    pub fn decision(&self, d: Direction, allow: bool, enforced: bool) {
        let result = if allow { "allow" } else { "deny" };
        let enforced = if enforced { "true" } else { "false" };
        self.decisions
            .with_label_values(&[d.as_str(), result, enforced])
            .inc();
    }

    /// Marks `version` as the policy in force, evaluated by `engine`.
    pub fn policy_loaded(&self, version: &str, engine: &str) {
        self.policy_info.reset();
        self.policy_info
            .with_label_values(&[version, engine])
            .set(1);
    }

    /// Counts a VM/interpreter disagreement; the policy now runs on the interpreter.
    pub fn policy_engine_divergence(&self, version: &str) {
        self.policy_engine_divergences.inc();
        self.policy_loaded(version, "interpreter");
    }

    /// Counts a rejected policy load.
    pub fn policy_load_error(&self) {
        self.policy_load_errors.inc();
    }

    /// Counts a presented delegation token: `ok`, or the check that failed.
    pub fn delegation_verification(&self, d: Direction, result: &str) {
        self.delegation_verifications
            .with_label_values(&[d.as_str(), result])
            .inc();
    }

    /// Counts an exchange of an incoming token for the app: `ok`, `cached` or `failed`.
    pub fn delegation_exchange(&self, result: &str) {
        self.delegation_exchanges.with_label_values(&[result]).inc();
    }

    /// Counts an approval step: `requested`, `redeemed` or `refused`.
    pub fn approval(&self, result: &str) {
        self.approvals.with_label_values(&[result]).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `mandate_open_connections` up while alive.
pub struct ConnectionGuard(IntGauge);

impl ConnectionGuard {
    /// Counts one open connection until dropped.
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
