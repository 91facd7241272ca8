//! What the Mandate sidecar and control plane must agree on about identity: SPIFFE IDs, the
//! X.509-SVID rules, (feature `csr`) asking for SVIDs, (feature `ca`) issuing them, and (feature `tls`) the
//! rustls verifiers that enforce all of it in handshakes.

#[cfg(feature = "ca")]
pub mod ca;
#[cfg(feature = "csr")]
pub mod csr;
mod spiffe;
pub mod svid;
#[cfg(feature = "tls")]
pub mod tls;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WorkloadKind};
