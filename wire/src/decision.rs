//! Decision records: one per call, written by the sidecar, ingested by the control plane
//! (idempotently, by `decision_id`) and queried with `mandate audit query`. Close to OPA's
//! decision-log event where the meaning is the same.

use serde::{Deserialize, Serialize};

/// Which way the call went through the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The sidecar's own workload calling out.
    Outbound,
    /// A peer calling the sidecar's workload.
    Inbound,
}

impl Direction {
    /// The lowercase word used in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// UUIDv7, also sent as `x-mandate-decision-id`.
    pub decision_id: String,
    /// RFC 3339, when the decision was taken.
    pub timestamp: String,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The caller's SPIFFE ID.
    pub source: String,
    /// Where the call went.
    pub destination: DestinationRecord,
    /// HTTP method (absent for TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path (absent for TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The MCP call decided, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpRecord>,
    /// On whose behalf, when the call carried a verified delegation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DelegationRecord>,
    /// The person's approval the call was allowed under, when the policy required one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRecord>,
    /// The policy's verdict.
    pub allow: bool,
    /// False in dry-run: the verdict was logged, not applied.
    pub enforced: bool,
    /// Why.
    pub reason: String,
    /// The policy version that decided (absent when none was loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// Policy evaluation time, microseconds.
    pub eval_us: u64,
    /// Trace id from `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Which sidecar decided.
    pub sidecar: String,
    /// Status of the response, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// Destination of a recorded call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationRecord {
    /// Host as addressed.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The identity it proved, when meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// MCP part of a recorded call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpRecord {
    /// JSON-RPC method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Tool, prompt or resource named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Delegation part of a recorded call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationRecord {
    /// The person on whose behalf the agent acted.
    pub subject: String,
    /// The grant the delegation came from.
    pub grant_id: String,
    /// The chain of agents, oldest first.
    #[serde(default)]
    pub actors: Vec<String>,
}

/// Approval part of a recorded call: which approval was redeemed, and who gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRecord {
    /// The approval id (as in `x-mandate-approval`).
    pub id: String,
    /// Who approved.
    pub approved_by: String,
}
