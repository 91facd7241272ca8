//! Sidecar API paths and bodies. Sidecar endpoints are served over mTLS on the control plane's
//! API listener; only enrolment is reached without an SVID (it carries a join token instead).

use serde::{Deserialize, Serialize};

use crate::delegation::Jwk;
use crate::{DecisionRecord, Registry, SignedBundle};

/// `POST`: join token + CSR → first SVID. No client certificate needed.
pub const ENROLL_PATH: &str = "/v1/sidecar/enroll";
/// `POST`: CSR → renewed SVID, authenticated by the current SVID.
pub const RENEW_PATH: &str = "/v1/sidecar/renew";
/// `GET`: the push stream, NDJSON of [`StreamMessage`]; query [`StreamQuery`].
pub const STREAM_PATH: &str = "/v1/sidecar/stream";
/// `POST`: a [`DecisionBatch`] → [`IngestResult`].
pub const DECISIONS_PATH: &str = "/v1/sidecar/decisions";
/// `POST`: a [`TokenRequest`] → [`IssuedToken`]: a delegation token from one of the caller's
/// grants, bound to the certificate of this connection. SVID auth.
pub const DELEGATION_TOKEN_PATH: &str = "/v1/sidecar/delegation/token";
/// `POST`: an [`ExchangeRequest`] → [`IssuedToken`]: a token the caller was handed by another
/// agent, exchanged for one naming the caller as current actor (RFC 8693). SVID auth.
pub const DELEGATION_EXCHANGE_PATH: &str = "/v1/sidecar/delegation/exchange";
/// `POST`: an [`ApprovalRequest`] → [`ApprovalTicket`]: ask a person to approve one call. SVID auth.
pub const APPROVALS_PATH: &str = "/v1/sidecar/approvals";
/// `GET`: the delegation verifying keys, a [`crate::Jwks`]. No authentication: they are public.
pub const JWKS_PATH: &str = "/v1/delegation/jwks";
/// Content type of the push stream.
pub const NDJSON: &str = "application/x-ndjson";
/// The SPIFFE ID path every control plane replica serves as.
pub const CONTROL_PLANE_PATH: &str = "/control-plane";

/// `POST`: a [`RedeemRequest`] → [`Redeemed`]: use an approval, once, for the call it was given
/// for. SVID auth.
pub fn redeem_path(id: &str) -> String {
    format!("{APPROVALS_PATH}/{id}/redeem")
}

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
    /// The delegation state revision applied (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_revision: Option<u64>,
}

/// One line of the push stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
// A message is built, sent and dropped, never stored in bulk: boxing the update buys nothing.
#[allow(clippy::large_enum_variant)]
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
        /// Delegation verifying keys and revoked grants at a new revision.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delegation: Option<DelegationState>,
    },
    /// Nothing changed; the stream is alive. Sent every [`HEARTBEAT_SECS`].
    Heartbeat,
}

/// What a sidecar needs to verify delegation tokens, replaced whole at each revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationState {
    /// Bumped on key creation and on grant revocation or closing.
    pub revision: u64,
    /// The keys that may have signed a token still valid.
    pub keys: Vec<Jwk>,
    /// Grants revoked or closed that tokens may still name (not yet expired): tokens from them
    /// are refused though their signature verifies.
    pub revoked_grants: Vec<RevokedGrant>,
}

/// A grant no longer in force, until its tokens have all expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedGrant {
    /// The grant id.
    pub id: String,
    /// When the grant would have expired, Unix seconds: after that its tokens are dead anyway.
    pub expires_at: i64,
}

/// Asks for a delegation token from a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The grant; the caller must be its agent.
    pub grant_id: String,
    /// Where the token may be presented; empty means anywhere in the trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
}

/// Exchanges a token received from another agent for one naming the caller as current actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeRequest {
    /// The token received (secret: never log it).
    pub subject_token: String,
    /// Where the new token may be presented; empty means anywhere in the trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
}

/// A delegation token issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedToken {
    /// The compact JWS (secret: never log it).
    pub token: String,
    /// Its `exp`, Unix seconds.
    pub expires_at: i64,
}

/// Asks a person to approve one call the policy said needs approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// The decision that asked for approval.
    pub decision_id: String,
    /// Hex SHA-256 identifying the call; the retry must match it to redeem.
    pub fingerprint: String,
    /// The call, described for the approver.
    pub action: String,
    /// The policy's reason.
    pub reason: String,
    /// On whose behalf, when delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The grant, when delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The policy version that asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
}

/// An approval asked for: the id to have approved and retry with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalTicket {
    /// The approval id.
    pub id: String,
    /// Unix seconds after which it can no longer be approved or redeemed.
    pub expires_at: i64,
}

/// Redeems an approval for the call being retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemRequest {
    /// Fingerprint of the retried call; must be the one approved.
    pub fingerprint: String,
}

/// An approval redeemed: the call may go ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redeemed {
    /// Who approved.
    pub approved_by: String,
    /// When, Unix seconds.
    pub approved_at: i64,
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
                trust_bundle: Some("PEM".into()),
                delegation: None,
            }
        );
        assert!(serde_json::from_str::<StreamMessage>(r#"{"type":"reboot"}"#).is_err());
    }

    #[test]
    fn delegation_state_rides_in_updates_and_resumes_by_revision() {
        let update: StreamMessage = serde_json::from_str(
            r#"{"type":"update","delegation":{"revision":3,"keys":[],"revoked_grants":[{"id":"g","expires_at":5}]}}"#,
        )
        .unwrap();
        let StreamMessage::Update {
            delegation: Some(state),
            ..
        } = update
        else {
            panic!("no delegation state");
        };
        assert_eq!(state.revision, 3);
        assert_eq!(state.revoked_grants[0].id, "g");
        let query = StreamQuery {
            delegation_revision: Some(3),
            ..StreamQuery::default()
        };
        assert_eq!(
            serde_json::to_string(&query).unwrap(),
            r#"{"delegation_revision":3}"#
        );
    }

    #[test]
    fn token_requests_default_to_the_trust_domain_audience() {
        let req: TokenRequest = serde_json::from_str(r#"{"grant_id":"g"}"#).unwrap();
        assert!(req.audience.is_empty());
        assert!(serde_json::from_str::<TokenRequest>(r#"{"grant_id":"g","grant":"x"}"#).is_err());
        assert_eq!(redeem_path("a1"), "/v1/sidecar/approvals/a1/redeem");
    }
}
