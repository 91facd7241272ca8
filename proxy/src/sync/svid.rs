//! Our SVID in managed mode: enrolment with the one-time join token (or a restart from the state
//! directory), then renewal at half-life with jitter, keeping the current SVID while renewals fail.

use std::sync::Arc;
use std::time::Duration;

use mandate_identity::csr::{self, CsrError};
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::{
    ENROLL_PATH, EnrollRequest, IssuedIdentity, JoinToken, RENEW_PATH, RenewRequest,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use super::backoff::{Backoff, random_fraction};
use super::client::{ClientError, ControlPlaneClient, Trust};
use super::state::{StateDir, StateError};
use super::{ControlPlane, Timing, rfc3339, unix_now};
use crate::identity::{IdentityError, IdentityPem, IdentityStore};
use crate::metrics::Metrics;
use crate::revocation::Revocations;

/// Why the sidecar has no identity from the control plane.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// Talking to the control plane failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The control plane refused the join token.
    #[error("--join-token: the control plane refused it: {error}{hint}")]
    Refused {
        /// The control plane's words.
        error: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// No token, and no usable identity in the state directory.
    #[error(
        "--join-token: required, because {0} holds no usable identity from an earlier run \
         (`mandate agent token NAME` prints a fresh token)"
    )]
    NoToken(String),
    /// The token's identity is not a SPIFFE ID this sidecar can use.
    #[error("--join-token: its identity {0:?} is not a usable SPIFFE ID")]
    TokenIdentity(String),
    /// Key or CSR generation failed.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The control plane certified another identity than asked.
    #[error("the control plane issued an SVID for {issued}, but this sidecar is {expected}")]
    WrongIdentity {
        /// What was issued.
        issued: String,
        /// What was asked for.
        expected: String,
    },
    /// The trust bundle issued does not contain the CA the join token pins.
    #[error("the trust bundle from the control plane does not contain the CA the join token pins")]
    BundleNotPinned,
    /// The SVID issued does not validate.
    #[error("the SVID issued is unusable: {0}")]
    Identity(#[from] IdentityError),
    /// The state directory cannot be written.
    #[error(transparent)]
    State(#[from] StateError),
}

const HINT_USED_STATELESS: &str = " — the token was already used (a join token works once): \
    without --state-dir a restart needs a fresh token (`mandate agent token NAME`); give \
    --state-dir DIR to keep the identity across restarts";
const HINT_USED_STATE: &str = " — the token was already used (a join token works once) and the \
    state directory held no usable identity: issue a fresh token (`mandate agent token NAME`)";
const HINT_FRESH: &str = " — `mandate agent token NAME` issues a fresh one";

/// Obtains our first identity: from the state directory while it is valid (the caller renews it
/// right away: returns `true`), else by enrolling with the join token. Retries while the control
/// plane is unreachable; a refusal is final.
pub async fn obtain(
    client: &ControlPlaneClient,
    token: Option<&JoinToken>,
    state: Option<&StateDir>,
    trust_domain: &TrustDomain,
    metrics: Arc<Metrics>,
    revocations: Arc<Revocations>,
    timing: &Timing,
) -> Result<(Arc<IdentityStore>, bool), SvidError> {
    if let Some(state) = state
        && let Some(pem) = state.load()
    {
        match IdentityStore::validate(pem.clone(), trust_domain) {
            Ok(svid) if token.is_none_or(|t| t.spiffe_id() == svid.id.as_str()) => {
                let store =
                    IdentityStore::from_pem(pem, trust_domain.clone(), metrics, revocations)?;
                tracing::info!(
                    spiffe_id = %svid.id,
                    state_dir = %state.path().display(),
                    "restored identity {} from the state directory (valid until {}); renewing it now instead of using a join token",
                    svid.id,
                    rfc3339(svid.not_after)
                );
                return Ok((Arc::new(store), true));
            }
            Ok(svid) => tracing::warn!(
                state_dir = %state.path().display(),
                "the state directory holds {}, but the join token is for another identity; enrolling with the token",
                svid.id
            ),
            Err(e) => tracing::warn!(
                state_dir = %state.path().display(),
                error = %e,
                "the identity in the state directory is unusable; enrolling with the join token"
            ),
        }
    }
    let Some(token) = token else {
        let dir = state.map_or_else(
            || "no state directory".to_owned(),
            |s| s.path().display().to_string(),
        );
        return Err(SvidError::NoToken(dir));
    };
    let mut backoff = Backoff::new(timing.enrol_retry.0, timing.enrol_retry.1);
    let pem = loop {
        tracing::info!(
            control_plane = %client.url(),
            spiffe_id = token.spiffe_id(),
            "enrolling with the control plane"
        );
        match enrol(client, token).await {
            Ok(pem) => break pem,
            Err(SvidError::Client(ClientError::Api { status, error }))
                if status.is_client_error() =>
            {
                let lower = error.to_ascii_lowercase();
                let hint = if lower.contains("used") {
                    if state.is_some() {
                        HINT_USED_STATE
                    } else {
                        HINT_USED_STATELESS
                    }
                } else if lower.contains("expired") || lower.contains("unknown") {
                    HINT_FRESH
                } else {
                    ""
                };
                return Err(SvidError::Refused { error, hint });
            }
            Err(SvidError::Client(e)) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "enrolment failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    };
    let store = IdentityStore::from_pem(pem.clone(), trust_domain.clone(), metrics, revocations)?;
    if let Some(state) = state {
        state.save(&pem)?;
    }
    let svid = &store.current().svid;
    tracing::info!(
        spiffe_id = %svid.id,
        not_after = svid.not_after,
        "enrolled with the control plane as {}; SVID valid until {}",
        svid.id,
        rfc3339(svid.not_after)
    );
    Ok((Arc::new(store), false))
}

/// One enrolment: key and CSR, then the token and CSR to a server that proves the token's CA.
async fn enrol(client: &ControlPlaneClient, token: &JoinToken) -> Result<IdentityPem, SvidError> {
    let id: SpiffeId = token
        .spiffe_id()
        .parse()
        .map_err(|_| SvidError::TokenIdentity(token.spiffe_id().to_owned()))?;
    let request = csr::request(&id)?;
    let mut conn = client.connect(Trust::Pin(token)).await?;
    let issued: IssuedIdentity = conn
        .post_json(
            ENROLL_PATH,
            &EnrollRequest {
                join_token: token.expose(),
                csr: request.csr_pem,
            },
        )
        .await?;
    check_issued(&issued, &id)?;
    let pinned = CertificateDer::pem_slice_iter(issued.trust_bundle.as_bytes())
        .filter_map(Result::ok)
        .any(|ca| token.pins(&ca));
    if !pinned {
        return Err(SvidError::BundleNotPinned);
    }
    Ok(IdentityPem {
        cert: issued.certificate,
        key: request.key_pem,
        bundle: issued.trust_bundle,
    })
}

fn check_issued(issued: &IssuedIdentity, id: &SpiffeId) -> Result<(), SvidError> {
    if issued.spiffe_id != id.as_str() {
        return Err(SvidError::WrongIdentity {
            issued: issued.spiffe_id.clone(),
            expected: id.to_string(),
        });
    }
    Ok(())
}

/// One renewal: a new key and CSR, authenticated by the current SVID; installed and persisted.
pub async fn renew(cp: &ControlPlane) -> Result<(), SvidError> {
    let current = cp.identity.current();
    let id = current.svid.id.clone();
    let request = csr::request(&id)?;
    let mut conn = cp.client.connect(Trust::Identity(&current)).await?;
    let issued: IssuedIdentity = conn
        .post_json(
            RENEW_PATH,
            &RenewRequest {
                csr: request.csr_pem,
            },
        )
        .await?;
    check_issued(&issued, &id)?;
    let pem = IdentityPem {
        cert: issued.certificate,
        key: request.key_pem,
        bundle: issued.trust_bundle,
    };
    cp.identity.install(pem.clone())?;
    if let Some(state) = &cp.state {
        state.save(&pem)?;
    }
    Ok(())
}

/// How long until the SVID valid `not_before..not_after` should be renewed: at half-life, minus
/// up to a tenth of the lifetime at random, so sidecars enrolled together renew apart.
pub fn renewal_delay(not_before: i64, not_after: i64, now: i64) -> Duration {
    let lifetime = (not_after - not_before).max(1) as f64;
    let at = not_before as f64 + lifetime / 2.0 - lifetime / 10.0 * random_fraction();
    Duration::from_secs_f64((at - now as f64).max(0.0))
}

/// Renews at half-life (at once when `now`), forever, until `cancel`.
pub async fn renew_loop(cp: Arc<ControlPlane>, mut now: bool, cancel: CancellationToken) {
    loop {
        if !now {
            let svid = cp.identity.current().svid.clone();
            let delay = renewal_delay(svid.not_before, svid.not_after, unix_now());
            tracing::debug!(in_secs = delay.as_secs(), "next SVID renewal scheduled");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return,
            }
        }
        now = false;
        let mut backoff = Backoff::new(cp.timing.renew_retry.0, cp.timing.renew_retry.1);
        loop {
            match renew(&cp).await {
                Ok(()) => {
                    let svid = &cp.identity.current().svid;
                    tracing::info!(
                        spiffe_id = %svid.id,
                        not_after = svid.not_after,
                        "renewed the SVID; valid until {}",
                        rfc3339(svid.not_after)
                    );
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let svid = cp.identity.current().svid.clone();
                    if svid.is_valid_at(unix_now()) {
                        tracing::warn!(
                            error = %e,
                            retry_in = ?delay,
                            "SVID renewal failed; keeping the current SVID (valid until {})",
                            rfc3339(svid.not_after)
                        );
                    } else {
                        tracing::error!(
                            error = %e,
                            retry_in = ?delay,
                            "SVID renewal failed and the SVID expired at {}: every handshake fails until a renewal succeeds",
                            rfc3339(svid.not_after)
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_life_with_some_jitter_before_it() {
        for _ in 0..50 {
            let d = renewal_delay(1000, 4600, 1000);
            assert!(d <= Duration::from_secs(1800), "{d:?}");
            assert!(d >= Duration::from_secs(1800 - 360), "{d:?}");
        }
        assert_eq!(renewal_delay(1000, 4600, 9999), Duration::ZERO);
    }
}
