//! Delegation tokens: the control plane's signing keys (ES256, sealed in the store with the store
//! key, rotated), the keys it publishes (JWKS and push), and the tokens it issues to agents'
//! sidecars from grants, or in exchange for a token another agent passed on.
//!
//! Keys: the newest key signs — once it is [`SIGNING_GRACE`] old, so sidecars have heard of it
//! through the push stream before they see a token it signed (until then its predecessor keeps
//! signing). A new key is generated when the newest is older than the rotation period; whichever
//! replica gets there first stores it, the others load it. A key stays published while a token
//! it signed may still be valid.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mandate_identity::{SpiffeId, TrustDomain};
use mandate_wire::delegation::{MAX_CHAIN, MAX_TOKEN_BYTES, verify};
use mandate_wire::{
    Actor, CONTROL_PLANE_PATH, Confirmation, DelegationClaims, DelegationError, ExchangeRequest,
    Expectations, IssuedToken, Jwk, Jwks, KeySet, SigningKey, TokenRequest, WorkloadStatus,
};
use ring::digest::{SHA256, digest};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::api::error::HttpError;
use crate::ca::{CaSetupError, StoreKey};
use crate::store::{
    Change, Grant, GrantStatus, Store, StoreError, StoredDelegationKey, WorkloadKind, ms_rfc3339,
};

/// Associated data of a sealed delegation key: it never opens as the CA key, nor the reverse.
const DELEGATION_KEY_AAD: &[u8] = b"mandate-delegation-key-v1";
/// How old the newest key must be before it signs (its predecessor signs meanwhile).
pub const SIGNING_GRACE: Duration = Duration::from_secs(5);
/// Extra time a retired key stays published, for sidecars' clock skew and leeway.
const PUBLISH_MARGIN: Duration = Duration::from_secs(60);
/// Clock skew tolerated on a subject token's `exp` and `nbf` at exchange.
pub const EXCHANGE_LEEWAY_SECS: u64 = 30;
/// Most audiences one token may name.
pub const MAX_AUDIENCES: usize = 16;
/// How often, at most, the rotation check runs.
const MAX_CHECK_EVERY: Duration = Duration::from_secs(60);

/// How keys rotate and how long tokens live: what decides which keys are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    /// `--delegation-key-rotation`: a new key when the newest is this old.
    pub rotation: Duration,
    /// `--delegation-token-ttl`: the longest a token lives.
    pub token_ttl: Duration,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            rotation: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(300),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl KeyPolicy {
    /// Which of the keys created at `created` (oldest first) are published at `now_ms`: the
    /// newest, and every older one while a token it signed may be valid — until its rotation
    /// period plus a token lifetime has passed, and at least until its successor has taken over
    /// signing plus a token lifetime (rotation may have run late).
    pub fn published_indices(&self, created: &[i64], now_ms: i64) -> Vec<usize> {
        let (rotation, ttl) = (ms(self.rotation), ms(self.token_ttl));
        let tail = ttl.saturating_add(ms(PUBLISH_MARGIN));
        (0..created.len())
            .filter(|&i| match created.get(i + 1) {
                None => true,
                Some(&next) => {
                    let signed_until = created[i]
                        .saturating_add(rotation)
                        .max(next.saturating_add(ms(SIGNING_GRACE)));
                    now_ms < signed_until.saturating_add(tail)
                }
            })
            .collect()
    }

    /// The published public keys at `now_ms`.
    pub fn published(&self, keys: &[StoredDelegationKey], now_ms: i64) -> Vec<Jwk> {
        let created: Vec<i64> = keys.iter().map(|k| k.created_at).collect();
        self.published_indices(&created, now_ms)
            .into_iter()
            .map(|i| keys[i].public_jwk.clone())
            .collect()
    }

    /// Which key signs at `now_ms`: the newest that is at least [`SIGNING_GRACE`] old, or the
    /// newest if none is (the very first key).
    pub fn signing_index(created: &[i64], now_ms: i64) -> Option<usize> {
        let ripe = now_ms.saturating_sub(ms(SIGNING_GRACE));
        created
            .iter()
            .rposition(|&c| c <= ripe)
            .or_else(|| created.len().checked_sub(1))
    }

    /// Whether a new key is due, the newest having been created at `newest` (None: no key yet).
    pub fn due(&self, newest: Option<i64>, now_ms: i64) -> bool {
        newest.is_none_or(|n| n.saturating_add(ms(self.rotation)) <= now_ms)
    }
}

/// The key id of a public key: the first 16 hex characters of the SHA-256 of its uncompressed
/// point (`04 ‖ x ‖ y`).
pub fn kid_of(jwk: &Jwk) -> Option<String> {
    let mut point = vec![4u8];
    for coordinate in [&jwk.x, &jwk.y] {
        let bytes = URL_SAFE_NO_PAD.decode(coordinate).ok()?;
        if bytes.len() != 32 {
            return None;
        }
        point.extend_from_slice(&bytes);
    }
    let hash = digest(&SHA256, &point);
    Some(
        hash.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Why the signing keys could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored key does not decrypt with this store key.
    #[error(
        "delegation signing key {kid} in the store does not decrypt with this store key: start \
         with the store key the store was created with (every replica must share it)"
    )]
    WrongStoreKey {
        /// The key.
        kid: String,
    },
    /// A stored key is unusable.
    #[error(
        "delegation signing key {kid} in the store is unusable: {why} (was the database edited by hand?)"
    )]
    Corrupt {
        /// The key.
        kid: String,
        /// What is wrong.
        why: String,
    },
    /// Sealing a new key failed.
    #[error("sealing a new delegation signing key failed: {0}")]
    Seal(CaSetupError),
}

/// A key loaded from the store.
struct LoadedKey {
    created_at: i64,
    jwk: Jwk,
    signing: Arc<SigningKey>,
}

/// The keys of this replica, oldest first.
#[derive(Default)]
struct Keyring {
    keys: Vec<Arc<LoadedKey>>,
}

impl Keyring {
    fn created(&self) -> Vec<i64> {
        self.keys.iter().map(|k| k.created_at).collect()
    }
}

/// `--delegation-token-ttl`, `--delegation-key-rotation` and `--grant-ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelegationConfig {
    /// Key rotation and token lifetime.
    pub keys: KeyPolicy,
    /// How long a grant lasts when its creation names no TTL.
    pub grant_ttl: Duration,
}

impl Default for DelegationConfig {
    fn default() -> Self {
        Self {
            keys: KeyPolicy::default(),
            grant_ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// Signing keys, JWKS, token issue and exchange.
pub struct Delegation {
    store: Store,
    store_key: StoreKey,
    trust_domain: TrustDomain,
    /// `spiffe://<td>/control-plane`.
    issuer: String,
    /// `spiffe://<td>`: the default audience (anywhere in the trust domain).
    domain_audience: String,
    config: DelegationConfig,
    keyring: ArcSwap<Keyring>,
    /// Serialises reloads and rotations.
    lock: tokio::sync::Mutex<()>,
}

/// Now, unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Delegation {
    /// Loads the signing keys and creates the first (or an overdue) one.
    pub async fn start(
        store: Store,
        store_key: StoreKey,
        trust_domain: TrustDomain,
        config: DelegationConfig,
    ) -> Result<Arc<Self>, KeyError> {
        let this = Arc::new(Self {
            issuer: format!("spiffe://{trust_domain}{CONTROL_PLANE_PATH}"),
            domain_audience: format!("spiffe://{trust_domain}"),
            store,
            store_key,
            trust_domain,
            config,
            keyring: ArcSwap::from_pointee(Keyring::default()),
            lock: tokio::sync::Mutex::new(()),
        });
        this.reload().await?;
        this.rotate_if_due(now_ms()).await?;
        Ok(this)
    }

    /// The configuration.
    pub fn config(&self) -> DelegationConfig {
        self.config
    }

    /// The issuer of every token: `spiffe://<td>/control-plane`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Re-reads the keys from the store (another replica may have rotated).
    pub async fn reload(&self) -> Result<(), KeyError> {
        let _serialised = self.lock.lock().await;
        self.reload_locked().await
    }

    async fn reload_locked(&self) -> Result<(), KeyError> {
        let stored = self.store.delegation_keys().await?;
        let current = self.keyring.load();
        let mut keys = Vec::with_capacity(stored.len());
        for key in stored {
            if let Some(known) = current.keys.iter().find(|k| k.jwk.kid == key.kid) {
                keys.push(known.clone());
                continue;
            }
            keys.push(Arc::new(self.open(&key)?));
        }
        self.keyring.store(Arc::new(Keyring { keys }));
        Ok(())
    }

    fn open(&self, key: &StoredDelegationKey) -> Result<LoadedKey, KeyError> {
        let corrupt = |why: String| KeyError::Corrupt {
            kid: key.kid.clone(),
            why,
        };
        let der = self
            .store_key
            .unseal_for(DELEGATION_KEY_AAD, &key.key_sealed)
            .map_err(|e| match e {
                CaSetupError::WrongStoreKey => KeyError::WrongStoreKey {
                    kid: key.kid.clone(),
                },
                other => corrupt(other.to_string()),
            })?;
        let signing =
            SigningKey::from_pkcs8(key.kid.clone(), &der).map_err(|e| corrupt(e.to_string()))?;
        if signing.public_jwk() != key.public_jwk
            || kid_of(&key.public_jwk) != Some(key.kid.clone())
        {
            return Err(corrupt(
                "its public key does not match its private key or kid".into(),
            ));
        }
        Ok(LoadedKey {
            created_at: key.created_at,
            jwk: key.public_jwk.clone(),
            signing: Arc::new(signing),
        })
    }

    /// Creates a key if none exists or the newest is older than the rotation period. Returns
    /// whether this replica stored one (another may have beaten it to it).
    pub async fn rotate_if_due(&self, now_ms: i64) -> Result<bool, KeyError> {
        let _serialised = self.lock.lock().await;
        let newest = self.keyring.load().keys.last().map(|k| k.created_at);
        if !self.config.keys.due(newest, now_ms) {
            return Ok(false);
        }
        let (draft, der) = SigningKey::generate(String::new());
        let public = draft.public_jwk();
        let kid = kid_of(&public).expect("a generated key has 32-byte coordinates");
        let signing = SigningKey::from_pkcs8(kid.clone(), &der).map_err(|e| KeyError::Corrupt {
            kid: kid.clone(),
            why: e.to_string(),
        })?;
        let stored = StoredDelegationKey {
            kid: kid.clone(),
            public_jwk: signing.public_jwk(),
            key_sealed: self
                .store_key
                .seal_for(DELEGATION_KEY_AAD, &der)
                .map_err(KeyError::Seal)?,
            created_at: now_ms,
        };
        // Another replica may have rotated since we looked: then its key stands.
        let fresh_since = now_ms.saturating_sub(ms(self.config.keys.rotation));
        let inserted = self
            .store
            .insert_delegation_key(&stored, Some(fresh_since.saturating_add(1)))
            .await?;
        if inserted {
            tracing::info!(kid = %kid, "created a delegation signing key");
        }
        self.reload_locked().await?;
        Ok(inserted)
    }

    /// Keeps the keys current until `cancel` fires: reloads on another replica's change and
    /// rotates when due.
    pub async fn maintain(self: Arc<Self>, cancel: CancellationToken) {
        let mut changes = self.store.subscribe();
        let every = (self.config.keys.rotation / 10).clamp(Duration::from_secs(1), MAX_CHECK_EVERY);
        let mut check = tokio::time::interval(every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                change = changes.recv() => match change {
                    Ok(Change::Delegation) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.reload().await
                    }
                    Ok(_) => Ok(()),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = check.tick() => self.rotate_if_due(now_ms()).await.map(|_| ()),
            };
            if let Err(e) = result {
                crate::metrics::store_error();
                tracing::warn!(error = %e, "delegation signing keys: refresh failed; retrying");
            }
        }
    }

    /// The published keys at `now_ms`.
    pub fn jwks(&self, now_ms: i64) -> Jwks {
        let ring = self.keyring.load();
        Jwks {
            keys: self
                .config
                .keys
                .published_indices(&ring.created(), now_ms)
                .into_iter()
                .map(|i| ring.keys[i].jwk.clone())
                .collect(),
        }
    }

    fn signing_key(&self, now_ms: i64) -> Result<Arc<SigningKey>, HttpError> {
        let ring = self.keyring.load();
        KeyPolicy::signing_index(&ring.created(), now_ms)
            .map(|i| ring.keys[i].signing.clone())
            .ok_or_else(|| {
                HttpError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "the control plane has no delegation signing key yet; retry shortly",
                )
            })
    }

    /// The audiences of a new token: the trust domain when none are asked for; otherwise each
    /// must be a SPIFFE ID of this trust domain (or the trust domain itself).
    fn audiences(&self, requested: &[String]) -> Result<Vec<String>, HttpError> {
        if requested.is_empty() {
            return Ok(vec![self.domain_audience.clone()]);
        }
        if requested.len() > MAX_AUDIENCES {
            return Err(HttpError::invalid(
                "audience",
                format!("at most {MAX_AUDIENCES} audiences"),
            ));
        }
        let mut out: Vec<String> = Vec::with_capacity(requested.len());
        for (i, aud) in requested.iter().enumerate() {
            let accepted = aud
                .parse::<SpiffeId>()
                .ok()
                .filter(|id| id.is_member_of(&self.trust_domain) && id.as_str() == aud);
            if accepted.is_none() {
                return Err(HttpError::invalid(
                    format!("audience[{i}]"),
                    format!(
                        "audience {:?} is not a SPIFFE ID in trust domain {} (e.g. {} or \
                         spiffe://{}/service/NAME)",
                        aud.chars().take(128).collect::<String>(),
                        self.trust_domain,
                        self.domain_audience,
                        self.trust_domain
                    ),
                ));
            }
            if !out.contains(aud) {
                out.push(aud.clone());
            }
        }
        Ok(out)
    }

    /// The caller must be a registered, active agent.
    async fn require_active_agent(&self, caller: &SpiffeId) -> Result<(), HttpError> {
        match self.store.workload_by_spiffe_id(caller.as_str()).await? {
            Some(w) if w.kind != WorkloadKind::Agent => Err(HttpError::forbidden(format!(
                "{caller} is a service; only agents act on a person's behalf"
            ))),
            Some(w) if w.status != WorkloadStatus::Active => Err(HttpError::forbidden(format!(
                "agent not active: {} is {}",
                w.name, w.status
            ))),
            Some(_) => Ok(()),
            None => Err(HttpError::forbidden(format!(
                "agent not active: {caller} is not registered"
            ))),
        }
    }

    /// Signs a token for `caller`, acting as `act`, from `grant`, expiring no later than
    /// `not_after` (unix seconds).
    fn sign(
        &self,
        grant: &Grant,
        act: Actor,
        audience: Vec<String>,
        thumbprint: &str,
        not_after: i64,
    ) -> Result<IssuedToken, HttpError> {
        let now = now_ms();
        let now_secs = now.div_euclid(1000);
        let token_ttl = i64::try_from(self.config.keys.token_ttl.as_secs()).unwrap_or(i64::MAX);
        let exp = grant
            .expires_at
            .div_euclid(1000)
            .min(now_secs.saturating_add(token_ttl))
            .min(not_after);
        if exp <= now_secs {
            return Err(HttpError::forbidden(format!(
                "grant {} expired at {}",
                grant.id,
                ms_rfc3339(grant.expires_at)
            )));
        }
        let claims = DelegationClaims {
            iss: self.issuer.clone(),
            sub: grant.subject.clone(),
            act,
            scope: grant.scopes.clone(),
            constraints: grant.constraints.clone(),
            grant_id: grant.id.clone(),
            aud: audience,
            iat: now_secs,
            nbf: now_secs,
            exp,
            jti: uuid::Uuid::now_v7().to_string(),
            cnf: Confirmation {
                x5t_s256: thumbprint.to_owned(),
            },
            approved_by: grant.approved_by.clone(),
            purpose: grant.purpose.clone(),
        };
        let key = self.signing_key(now)?;
        let token = key.sign(&claims);
        tracing::info!(
            grant = %grant.id,
            subject = %claims.sub,
            actors = %claims.act.chain().join(","),
            jti = %claims.jti,
            kid = %key.kid(),
            exp,
            "issued a delegation token"
        );
        Ok(IssuedToken {
            token,
            expires_at: exp,
        })
    }

    /// `POST /v1/sidecar/delegation/token`: a token from one of the caller's grants, bound to the
    /// certificate (`thumbprint`) the caller presented on this connection.
    pub async fn issue(
        &self,
        caller: &SpiffeId,
        thumbprint: &str,
        req: TokenRequest,
    ) -> Result<IssuedToken, HttpError> {
        let id = crate::grants::parse_grant_id("grant_id", &req.grant_id)?;
        let grant = self.store.grant(&id, now_ms()).await?;
        if grant.agent_id != caller.as_str() {
            return Err(HttpError::forbidden(format!(
                "not your grant: grant {} was given to agent {}, not to {caller}",
                grant.id, grant.agent
            )));
        }
        self.require_active_agent(caller).await?;
        require_in_force(&grant)?;
        let audience = self.audiences(&req.audience)?;
        let act = Actor {
            sub: caller.as_str().to_owned(),
            act: None,
        };
        self.sign(&grant, act, audience, thumbprint, i64::MAX)
    }

    /// `POST /v1/sidecar/delegation/exchange`: the token another agent passed to the caller,
    /// exchanged for one that names the caller as the current actor (RFC 8693 `act`), bound to
    /// the caller's certificate, expiring no later than the one given.
    pub async fn exchange(
        &self,
        caller: &SpiffeId,
        thumbprint: &str,
        req: ExchangeRequest,
    ) -> Result<IssuedToken, HttpError> {
        let claims = self.verify_subject_token(caller, &req.subject_token)?;
        // Within the verification leeway, but past its own expiry: nothing left to exchange.
        if claims.exp <= now_ms().div_euclid(1000) {
            return Err(HttpError::forbidden(format!(
                "subject token invalid: expired: {}",
                DelegationError::Expired { exp: claims.exp }
            )));
        }
        self.require_active_agent(caller).await?;
        let chain = claims.act.chain();
        if chain.iter().any(|actor| actor == caller.as_str()) {
            return Err(HttpError::forbidden(format!(
                "caller already in chain: {caller} already acts in this delegation ({})",
                chain.join(" -> ")
            )));
        }
        if chain.len() >= MAX_CHAIN {
            return Err(HttpError::forbidden(format!(
                "chain too long: the delegation already has {} actors, and at most {MAX_CHAIN} \
                 may act in one chain",
                chain.len()
            )));
        }
        let grant = match self.store.grant(&claims.grant_id, now_ms()).await {
            Err(StoreError::NotFound { .. }) => {
                return Err(HttpError::forbidden(format!(
                    "the subject token names grant {}, which this control plane does not know",
                    claims.grant_id
                )));
            }
            other => other?,
        };
        require_in_force(&grant)?;
        let audience = self.audiences(&req.audience)?;
        let act = Actor {
            sub: caller.as_str().to_owned(),
            act: Some(Box::new(claims.act)),
        };
        self.sign(&grant, act, audience, thumbprint, claims.exp)
    }

    /// Verifies a token passed on to `caller`: signed by this control plane, unexpired, meant for
    /// the trust domain or the caller. Its binding is checked against what it claims (the
    /// previous actor presented it to the caller's sidecar, which checked that certificate).
    fn verify_subject_token(
        &self,
        caller: &SpiffeId,
        token: &str,
    ) -> Result<DelegationClaims, HttpError> {
        let now = now_ms();
        let ring = self.keyring.load();
        let published: Vec<Jwk> = self
            .config
            .keys
            .published_indices(&ring.created(), now)
            .into_iter()
            .map(|i| ring.keys[i].jwk.clone())
            .collect();
        let keys = KeySet::from_jwks(&published).map_err(|e| {
            tracing::error!(error = %e, "the control plane's own delegation keys do not load");
            HttpError::unavailable()
        })?;
        let (presenter, bound_to) = claimed_presenter(token).unwrap_or_default();
        let audiences = [self.domain_audience.as_str(), caller.as_str()];
        verify(
            token,
            &keys,
            &Expectations {
                issuer: &self.issuer,
                audiences: &audiences,
                presenter_id: &presenter,
                presenter_thumbprint: &bound_to,
                now: now.div_euclid(1000),
                leeway_secs: EXCHANGE_LEEWAY_SECS,
            },
        )
        .map_err(|e: DelegationError| {
            HttpError::forbidden(format!("subject token invalid: {}: {e}", e.check()))
        })
    }
}

/// The current actor and certificate binding a token claims, read before verification only to
/// be checked by it ([`verify`] checks the signature over them).
fn claimed_presenter(token: &str) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Claimed {
        act: Actor,
        cnf: Confirmation,
    }
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claimed: Claimed = serde_json::from_slice(&bytes).ok()?;
    Some((claimed.act.current().to_owned(), claimed.cnf.x5t_s256))
}

/// A grant tokens may come from: active and unexpired; otherwise 403 saying why.
fn require_in_force(grant: &Grant) -> Result<(), HttpError> {
    match grant.status {
        GrantStatus::Active => Ok(()),
        GrantStatus::Expired => Err(HttpError::forbidden(format!(
            "grant {} expired at {}",
            grant.id,
            ms_rfc3339(grant.expires_at)
        ))),
        GrantStatus::Revoked => Err(HttpError::forbidden(format!(
            "grant {} is revoked{}",
            grant.id,
            grant
                .revoked_by
                .as_deref()
                .map(|by| format!(" (by {by})"))
                .unwrap_or_default()
        ))),
        GrantStatus::Closed => Err(HttpError::forbidden(format!(
            "grant {} is closed: its task {} was closed",
            grant.id,
            grant.task.as_deref().unwrap_or("?")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;

    fn policy() -> KeyPolicy {
        KeyPolicy {
            rotation: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_newest_key_is_always_published_and_older_ones_while_their_tokens_may_live() {
        let p = policy();
        let day = 24 * HOUR;
        // One key: published forever (rotation may be late).
        assert_eq!(p.published_indices(&[0], 10 * day), vec![0]);
        // Rotated on time: the old key stays for a token lifetime (and the margin) after.
        let keys = [0, day];
        assert_eq!(p.published_indices(&keys, day + 1), vec![0, 1]);
        assert_eq!(
            p.published_indices(&keys, day + 5 * MIN + MIN - 1),
            vec![0, 1]
        );
        assert_eq!(
            p.published_indices(&keys, day + 5 * MIN + MIN + 5_000),
            vec![1]
        );
        // Rotated late: the old key signed until its successor took over.
        let late = [0, 3 * day];
        assert_eq!(p.published_indices(&late, 3 * day + 5 * MIN), vec![0, 1]);
        assert_eq!(p.published_indices(&late, 3 * day + 10 * MIN), vec![1]);
        assert!(p.published_indices(&[], 0).is_empty());
    }

    #[test]
    fn a_new_key_signs_only_after_the_grace_period() {
        let grace = ms(SIGNING_GRACE);
        assert_eq!(KeyPolicy::signing_index(&[], 0), None);
        // The very first key signs at once.
        assert_eq!(KeyPolicy::signing_index(&[1_000], 1_000), Some(0));
        // A fresh successor waits while its predecessor signs.
        assert_eq!(KeyPolicy::signing_index(&[0, 10_000], 10_000), Some(0));
        assert_eq!(
            KeyPolicy::signing_index(&[0, 10_000], 10_000 + grace),
            Some(1)
        );
        // With no key old enough, the newest signs.
        assert_eq!(KeyPolicy::signing_index(&[0, 1_000], 1_000), Some(1));
    }

    #[test]
    fn rotation_is_due_when_the_newest_key_is_a_rotation_period_old() {
        let p = policy();
        assert!(p.due(None, 0));
        assert!(!p.due(Some(0), 24 * HOUR - 1));
        assert!(p.due(Some(0), 24 * HOUR));
    }

    #[test]
    fn key_ids_are_16_hex_characters_of_the_public_key_hash() {
        let (key, _) = SigningKey::generate("x".into());
        let kid = kid_of(&key.public_jwk()).unwrap();
        assert_eq!(kid.len(), 16);
        assert!(
            kid.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let (other, _) = SigningKey::generate("x".into());
        assert_ne!(kid_of(&other.public_jwk()).unwrap(), kid);
        let mut broken = key.public_jwk();
        broken.x = "AAAA".into();
        assert_eq!(kid_of(&broken), None);
    }

    #[test]
    fn the_claimed_presenter_is_read_from_the_payload() {
        let (key, _) = SigningKey::generate("k".into());
        let claims = DelegationClaims {
            iss: "i".into(),
            sub: "alice".into(),
            act: Actor::from_chain(&["spiffe://td/agent/a".into(), "spiffe://td/agent/b".into()]),
            scope: vec![],
            constraints: None,
            grant_id: "g".into(),
            aud: vec!["spiffe://td".into()],
            iat: 0,
            nbf: 0,
            exp: 1,
            jti: "j".into(),
            cnf: Confirmation {
                x5t_s256: "thumb".into(),
            },
            approved_by: "bob".into(),
            purpose: "p".into(),
        };
        let token = key.sign(&claims);
        assert_eq!(
            claimed_presenter(&token),
            Some(("spiffe://td/agent/b".into(), "thumb".into()))
        );
        assert_eq!(claimed_presenter("not.a-token"), None);
        assert_eq!(claimed_presenter(""), None);
    }
}
