//! Managed mode: everything the sidecar exchanges with the control plane (`mandate serve`) —
//! enrolment and renewal of its SVID, the push stream of policy bundles, registry and trust
//! bundle, and batches of decision records. The wire contract is `mandate_wire`.

pub mod apply;
pub mod backoff;
pub mod client;
pub mod report;
pub mod spool;
pub mod state;
pub mod stream;
pub mod svid;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mandate_wire::{
    APPROVALS_PATH, ApprovalRequest, ApprovalTicket, DELEGATION_EXCHANGE_PATH,
    DELEGATION_TOKEN_PATH, ExchangeRequest, HEARTBEAT_SECS, IssuedToken, RedeemRequest, Redeemed,
    TokenRequest, redeem_path,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::delegation::{ControlPlaneCalls, CpFuture};
use crate::identity::IdentityStore;
use crate::metrics::Metrics;
use client::{ClientError, ControlPlaneClient, Trust};
use state::StateDir;

/// Longest a call on the request path (a token, an exchange, an approval) waits for the control
/// plane, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How patient the sidecar is with the control plane. Tests shorten these.
#[derive(Debug, Clone)]
pub struct Timing {
    /// A stream that brings no line for this long is considered dead and re-opened.
    pub stream_idle: Duration,
    /// Backoff between stream reconnections (first step, cap).
    pub reconnect: (Duration, Duration),
    /// Backoff between enrolment attempts while the control plane is unreachable.
    pub enrol_retry: (Duration, Duration),
    /// Backoff between failed renewals.
    pub renew_retry: (Duration, Duration),
    /// Backoff between failed decision uploads.
    pub upload_retry: (Duration, Duration),
    /// Most records in one batch.
    pub batch_max: usize,
    /// Longest a record waits for its batch to fill.
    pub batch_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            stream_idle: Duration::from_secs(3 * HEARTBEAT_SECS),
            reconnect: (Duration::from_millis(250), Duration::from_secs(10)),
            enrol_retry: (Duration::from_millis(500), Duration::from_secs(15)),
            renew_retry: (Duration::from_secs(1), Duration::from_secs(60)),
            upload_retry: (Duration::from_millis(250), Duration::from_secs(10)),
            batch_max: 500,
            batch_wait: Duration::from_millis(200),
        }
    }
}

/// What the managed-mode tasks share.
pub struct ControlPlane {
    /// Connections to the control plane.
    pub client: ControlPlaneClient,
    /// Our identity (its SVID authenticates us; its bundle verifies the control plane).
    pub identity: Arc<IdentityStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Where identity is persisted, if anywhere.
    pub state: Option<StateDir>,
    /// Retry and batching parameters.
    pub timing: Timing,
}

impl ControlPlane {
    /// POSTs `body` to `path` over a fresh connection authenticated by our SVID, within
    /// [`CALL_TIMEOUT`].
    pub async fn call<B: Serialize + Sync, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let attempt = async {
            let current = self.identity.current();
            let mut conn = self.client.connect(Trust::Identity(&current)).await?;
            drop(current);
            conn.post_json(path, body).await
        };
        tokio::time::timeout(CALL_TIMEOUT, attempt)
            .await
            .map_err(|_| ClientError::Timeout(self.client.url().authority()))?
    }
}

impl ControlPlaneCalls for ControlPlane {
    fn issue_token(&self, req: TokenRequest) -> CpFuture<'_, IssuedToken> {
        Box::pin(async move { self.call(DELEGATION_TOKEN_PATH, &req).await })
    }

    fn exchange(&self, req: ExchangeRequest) -> CpFuture<'_, IssuedToken> {
        Box::pin(async move { self.call(DELEGATION_EXCHANGE_PATH, &req).await })
    }

    fn request_approval(&self, req: ApprovalRequest) -> CpFuture<'_, ApprovalTicket> {
        Box::pin(async move { self.call(APPROVALS_PATH, &req).await })
    }

    fn redeem(&self, id: String, req: RedeemRequest) -> CpFuture<'_, Redeemed> {
        Box::pin(async move { self.call(&redeem_path(&id), &req).await })
    }
}

/// Unix seconds as RFC 3339, for log lines.
pub fn rfc3339(unix: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
