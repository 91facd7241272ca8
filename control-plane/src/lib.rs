//! `mandate-control-plane`: what `mandate serve` runs — the store, registry, CA, policy bundles,
//! the push stream to sidecars, decision ingest and the HTTP API — for the `mandate` binary.

pub mod api;
pub mod audit;
pub mod bundles;
pub mod ca;
pub mod config;
pub mod delegation;
pub mod enroll;
pub mod grants;
pub mod inject;
pub mod metrics;
pub mod push;
pub mod registry;
pub mod serve;
pub mod server;
pub mod store;
