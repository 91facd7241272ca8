//! What the Mandate sidecar and control plane must agree on about identity: SPIFFE IDs, the
//! X.509-SVID rules, and (feature `ca`) issuing SVIDs.

#[cfg(feature = "ca")]
pub mod ca;
mod spiffe;
pub mod svid;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, WorkloadKind};
