//! `mandate-control-plane`: what `mandate serve` runs — the store, registry, CA, policy bundles,
//! the push stream to sidecars, decision ingest and the HTTP API — for the `mandate` binary.

pub mod store;
