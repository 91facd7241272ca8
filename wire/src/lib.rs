//! `mandate-wire`: the contract between the Mandate sidecar and its control plane — API paths,
//! request and response bodies, the push stream's messages, join tokens, the registry as sidecars
//! see it, decision records, signed policy bundles and delegation tokens. Both binaries depend on
//! this crate so that neither can drift from the other.

pub mod bundle;
pub mod decision;
pub mod delegation;
pub mod join;
pub mod messages;
pub mod reach;
pub mod registry;

pub use bundle::{BundleError, SignedBundle};
pub use decision::{
    ApprovalRecord, DecisionRecord, DelegationRecord, DestinationRecord, Direction, McpRecord,
};
pub use delegation::{
    Actor, Confirmation, DelegationClaims, DelegationError, Expectations, Jwk, Jwks, KeySet,
    SigningKey,
};
pub use join::{JoinToken, JoinTokenError};
pub use messages::*;
pub use reach::{Reach, RouteProtocol};
pub use registry::{Registry, RegistryEntry, WorkloadStatus};
