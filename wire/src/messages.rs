//! Sidecar API paths and bodies. Sidecar endpoints are served over mTLS on the control plane's
//! API listener; only enrolment is reached without an SVID (it carries a join token instead).

use serde::{Deserialize, Serialize};

use crate::{DecisionRecord, Registry, SignedBundle};

/// `POST`: join token + CSR → first SVID. No client certificate needed.
pub const ENROLL_PATH: &str = "/v1/sidecar/enroll";
/// `POST`: CSR → renewed SVID, authenticated by the current SVID.
pub const RENEW_PATH: &str = "/v1/sidecar/renew";
/// `GET`: the push stream, NDJSON of [`StreamMessage`]; query [`StreamQuery`].
pub const STREAM_PATH: &str = "/v1/sidecar/stream";
/// `POST`: a [`DecisionBatch`] → [`IngestResult`].
pub const DECISIONS_PATH: &str = "/v1/sidecar/decisions";
/// Content type of the push stream.
pub const NDJSON: &str = "application/x-ndjson";
/// The SPIFFE ID path every control plane replica serves as.
pub const CONTROL_PLANE_PATH: &str = "/control-plane";

/// First contact: a one-time join token and a CSR for the registered identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token as printed by `mandate agent register` (secret: never log it).
    pub join_token: String,
    /// PEM CSR asking for exactly the registered SPIFFE ID.
    pub csr: String,
}

/// Renewal: a CSR for the same identity as the client certificate presented.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM CSR asking for the caller's own SPIFFE ID.
    pub csr: String,
}

/// An SVID issued by enrolment or renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedIdentity {
    /// The identity certified.
    pub spiffe_id: String,
    /// Leaf certificate, PEM.
    pub certificate: String,
    /// The CA certificates to trust, PEM.
    pub trust_bundle: String,
    /// notAfter of the certificate, Unix seconds.
    pub expires_at: i64,
}

/// Where a sidecar's stream resumes: what it has already applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// The bundle version in force (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// The registry revision applied (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_revision: Option<u64>,
}

/// One line of the push stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamMessage {
    /// State to apply atomically: every part present replaces the sidecar's copy.
    Update {
        /// The policy bundle now active (also sent when an older one is re-activated).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bundle: Option<SignedBundle>,
        /// The whole registry at a new revision (statuses carry suspensions and revocations).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registry: Option<Registry>,
        /// The CA certificates to trust, PEM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trust_bundle: Option<String>,
    },
    /// Nothing changed; the stream is alive. Sent every [`HEARTBEAT_SECS`].
    Heartbeat,
}

/// How often the control plane sends a heartbeat; a sidecar that hears nothing for three
/// intervals reconnects.
pub const HEARTBEAT_SECS: u64 = 10;

/// Decisions sent by a sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBatch {
    /// The records, any order; ids already stored are skipped.
    pub decisions: Vec<DecisionRecord>,
}

/// What ingest did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestResult {
    /// Newly stored.
    pub accepted: u64,
    /// Already stored (a resend).
    pub duplicates: u64,
}

/// The body of every error the control plane returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Further detail (compiler messages, failing tests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages_are_tagged_lines() {
        let line = serde_json::to_string(&StreamMessage::Heartbeat).unwrap();
        assert_eq!(line, r#"{"type":"heartbeat"}"#);
        let update: StreamMessage =
            serde_json::from_str(r#"{"type":"update","trust_bundle":"PEM"}"#).unwrap();
        assert_eq!(
            update,
            StreamMessage::Update {
                bundle: None,
                registry: None,
                trust_bundle: Some("PEM".into())
            }
        );
        assert!(serde_json::from_str::<StreamMessage>(r#"{"type":"reboot"}"#).is_err());
    }
}
