//! What the Mandate sidecar and control plane must agree on about identity: SPIFFE IDs, the
//! X.509-SVID rules, (feature `csr`) asking for SVIDs, and (feature `ca`) issuing them.

#[cfg(feature = "ca")]
pub mod ca;
#[cfg(feature = "csr")]
pub mod csr;
mod spiffe;
pub mod svid;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WorkloadKind};
