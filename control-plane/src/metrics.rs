//! The control plane's Prometheus metrics (prefix `mandate_cp_`), served on the `--metrics` listener.

use std::sync::LazyLock;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The control plane's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// Sidecars holding a push stream to this replica.
    pub connected_sidecars: IntGauge,
    /// Decisions newly stored by ingest (duplicates excluded).
    pub decisions_ingested: IntCounter,
    /// Time from a store change to each stream write carrying it.
    pub push_latency: Histogram,
    /// Store operations that failed.
    pub store_errors: IntCounter,
    /// Admission reviews the sidecar injector answered, by outcome (injected, skipped, refused,
    /// malformed).
    pub injector_reviews: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let connected_sidecars = IntGauge::new(
        "mandate_cp_connected_sidecars",
        "Sidecars holding a push stream to this replica",
    )
    .expect("valid metric");
    let decisions_ingested = IntCounter::new(
        "mandate_cp_decisions_ingested_total",
        "Decisions newly stored (resent duplicates excluded)",
    )
    .expect("valid metric");
    let push_latency = Histogram::with_opts(
        HistogramOpts::new(
            "mandate_cp_push_latency_seconds",
            "Time from a store change to each push-stream write carrying it",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]),
    )
    .expect("valid metric");
    let store_errors = IntCounter::new(
        "mandate_cp_store_errors_total",
        "Store operations that failed",
    )
    .expect("valid metric");
    let injector_reviews = IntCounterVec::new(
        Opts::new(
            "mandate_cp_injector_reviews_total",
            "Admission reviews the sidecar injector answered, by outcome",
        ),
        &["outcome"],
    )
    .expect("valid metric");
    for outcome in ["injected", "skipped", "refused", "malformed"] {
        injector_reviews.with_label_values(&[outcome]);
    }
    for m in [
        Box::new(connected_sidecars.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(decisions_ingested.clone()),
        Box::new(push_latency.clone()),
        Box::new(store_errors.clone()),
        Box::new(injector_reviews.clone()),
    ] {
        registry.register(m).expect("metric registered once");
    }
    Metrics {
        registry,
        connected_sidecars,
        decisions_ingested,
        push_latency,
        store_errors,
        injector_reviews,
    }
});

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Counts one failed store operation.
pub fn store_error() {
    METRICS.store_errors.inc();
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_is_exposed() {
        super::store_error();
        super::metrics().push_latency.observe(0.002);
        let text = super::render();
        for name in [
            "mandate_cp_connected_sidecars",
            "mandate_cp_decisions_ingested_total",
            "mandate_cp_push_latency_seconds_bucket",
            "mandate_cp_store_errors_total",
            "mandate_cp_injector_reviews_total{outcome=\"refused\"}",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
