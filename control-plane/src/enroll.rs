//! Issuing SVIDs to sidecars: enrolment with a one-time join token, renewal with the current SVID.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mandate_identity::SpiffeId;
use mandate_identity::ca::{CaError, CertificateAuthority};
use mandate_identity::csr::requested_id;
use mandate_identity::svid::check_svid;
use mandate_wire::{EnrollRequest, IssuedIdentity, JoinToken, RenewRequest, WorkloadStatus};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::api::error::HttpError;
use crate::store::Store;

/// Issues SVIDs for CSRs after checking who may have which identity.
#[derive(Clone)]
pub struct Enroller {
    store: Store,
    ca: Arc<CertificateAuthority>,
    ca_der: Arc<[u8]>,
    svid_ttl: Duration,
}

impl Enroller {
    /// An enroller issuing SVIDs valid for `svid_ttl`.
    pub fn new(
        store: Store,
        ca: Arc<CertificateAuthority>,
        ca_der: Vec<u8>,
        svid_ttl: Duration,
    ) -> Self {
        Self {
            store,
            ca,
            ca_der: ca_der.into(),
            svid_ttl,
        }
    }

    /// First contact: the join token must be valid, unused and unexpired, the CSR must ask for
    /// the identity the token was issued for, and that workload must be active.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<IssuedIdentity, HttpError> {
        let token = JoinToken::parse(req.join_token.trim())
            .map_err(|e| HttpError::invalid("join_token", e.to_string()))?;
        if !token.pins(&self.ca_der) {
            return Err(HttpError::forbidden(
                "join token was issued by another control plane (its CA pin does not match this CA)",
            ));
        }
        let requested = csr_identity(&req.csr)?;
        if requested != token.spiffe_id() {
            return Err(HttpError::forbidden(format!(
                "the CSR asks for {requested}, but the join token was issued for {}",
                token.spiffe_id()
            )));
        }
        // Checked before redeeming, so a suspended workload's token is not used up.
        self.require_active(&requested).await?;
        let now = unix_now();
        let registered = self
            .store
            .redeem_join_token(&token.secret_hash(), now)
            .await?;
        if registered != requested {
            return Err(HttpError::forbidden(format!(
                "the CSR asks for {requested}, but the join token was registered for {registered}"
            )));
        }
        let issued = self.issue(&req.csr, &requested)?;
        tracing::info!(spiffe_id = %requested, "enrolled a sidecar with a join token");
        Ok(issued)
    }

    /// Renewal: the caller's verified SVID must be for the identity the CSR asks for, and active.
    pub async fn renew(
        &self,
        peer: &SpiffeId,
        req: RenewRequest,
    ) -> Result<IssuedIdentity, HttpError> {
        let requested = csr_identity(&req.csr)?;
        if requested != peer.as_str() {
            return Err(HttpError::forbidden(format!(
                "the CSR asks for {requested}, but the client certificate is {peer}"
            )));
        }
        self.require_active(&requested).await?;
        let issued = self.issue(&req.csr, &requested)?;
        tracing::debug!(spiffe_id = %requested, "renewed a sidecar's SVID");
        Ok(issued)
    }

    async fn require_active(&self, id: &str) -> Result<(), HttpError> {
        match self.store.workload_by_spiffe_id(id).await? {
            None => Err(HttpError::forbidden(format!("{id} is not registered"))),
            Some(w) if w.status != WorkloadStatus::Active => Err(HttpError::forbidden(format!(
                "{id} is {}, not active",
                w.status
            ))),
            Some(_) => Ok(()),
        }
    }

    fn issue(&self, csr: &str, id: &str) -> Result<IssuedIdentity, HttpError> {
        let id: SpiffeId = id.parse().map_err(|e: mandate_identity::SpiffeIdError| {
            HttpError::invalid("csr", e.to_string())
        })?;
        let cert = self
            .ca
            .issue_for_csr(csr, &id, self.svid_ttl)
            .map_err(|e| match e {
                CaError::BadCsr(why) => {
                    HttpError::invalid("csr", format!("CSR is unusable: {why}"))
                }
                CaError::ForeignIdentity { .. } => HttpError::forbidden(e.to_string()),
                other => {
                    tracing::error!(error = %other, "issuing an SVID failed");
                    HttpError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "issuing the certificate failed",
                    )
                }
            })?;
        let expires_at = CertificateDer::from_pem_slice(cert.as_bytes())
            .ok()
            .and_then(|der| check_svid(&der, self.ca.trust_domain()).ok())
            .map(|svid| svid.not_after)
            .unwrap_or_else(|| unix_now() + self.svid_ttl.as_secs() as i64);
        Ok(IssuedIdentity {
            spiffe_id: id.as_str().to_owned(),
            certificate: cert,
            trust_bundle: self.ca.cert_pem().to_owned(),
            expires_at,
        })
    }
}

/// The SPIFFE ID a PEM CSR asks for; a bad CSR is a 400 naming `csr`.
fn csr_identity(csr: &str) -> Result<String, HttpError> {
    requested_id(csr).map_err(|e| HttpError::invalid("csr", e.to_string()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
