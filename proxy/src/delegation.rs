//! Delegation on the sidecar: what it knows to verify `x-mandate-delegation` tokens (the control
//! plane's signing keys and the grants revoked since, pushed on the stream and persisted in the state
//! directory), the verified-token cache, and the exchanged-token cache of an agent's inbound side.
//!
//! Readers take lock-free snapshots: the keys and revoked grants sit in an `ArcSwap`, the caches are
//! sharded. A cached verification is not a free pass: expiry is checked against the clock, the
//! audience and the presenter against the call, and the grant against the revoked set, on every hit.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue};
use mandate_identity::TrustDomain;
use mandate_rego::Value;
use mandate_wire::delegation::{
    self, APPROVAL_HEADER, CHAIN_HEADER, DELEGATION_HEADER, DelegationClaims, DelegationError,
    Expectations, GRANT_HEADER, KeySet, MAX_TOKEN_BYTES as MAX_TOKEN, ON_BEHALF_OF_HEADER,
};
use mandate_wire::{
    ApprovalRequest, ApprovalTicket, CONTROL_PLANE_PATH, DelegationRecord, DelegationState,
    ExchangeRequest, IssuedToken, RedeemRequest, Redeemed, TokenRequest,
};
use quick_cache::sync::Cache;

use crate::metrics::{Direction, Metrics};
use crate::sync::client::ClientError;
use crate::sync::{rfc3339, unix_now};

/// Clock skew tolerated on `exp` and `nbf` unless `--delegation-leeway` says otherwise, seconds.
pub const LEEWAY_SECS: u64 = 30;
/// Verified tokens kept (per token and presenter).
const VERIFIED_ENTRIES: usize = 16 * 1024;
/// Exchanged tokens kept (per incoming token).
const EXCHANGED_ENTRIES: usize = 4 * 1024;
/// An exchanged token is used until this long before it expires.
const EXCHANGE_MARGIN_SECS: i64 = 30;

/// `x-mandate-delegation`: the token.
pub static DELEGATION: HeaderName = HeaderName::from_static(DELEGATION_HEADER);
/// `x-mandate-on-behalf-of`: the verified subject.
pub static ON_BEHALF_OF: HeaderName = HeaderName::from_static(ON_BEHALF_OF_HEADER);
/// `x-mandate-delegation-chain`: the verified actors, oldest first.
pub static CHAIN: HeaderName = HeaderName::from_static(CHAIN_HEADER);
/// `x-mandate-grant`: the verified grant id.
pub static GRANT: HeaderName = HeaderName::from_static(GRANT_HEADER);
/// `x-mandate-approval`: an approval id.
pub static APPROVAL: HeaderName = HeaderName::from_static(APPROVAL_HEADER);

/// Who presents a token: the workload whose certificate the token must be bound to.
#[derive(Debug, Clone, Copy)]
pub struct Presenter<'a> {
    /// Its SPIFFE ID (must be the token's current actor).
    pub id: &'a str,
    /// `x5t#S256` of its leaf certificate (must be the token's `cnf`).
    pub thumbprint: &'a str,
}

/// A token that verified, with everything the call path needs from it, computed once.
#[derive(Debug)]
pub struct Verified {
    /// The verified claims.
    pub claims: DelegationClaims,
    /// The chain of agents, oldest first (the last is the presenter).
    pub actors: Vec<String>,
    /// What policy sees as `input.delegation`.
    pub input: Value,
    /// `x-mandate-on-behalf-of`: the subject.
    pub on_behalf_of: HeaderValue,
    /// `x-mandate-delegation-chain`: the actors, oldest first, comma-separated.
    pub chain: HeaderValue,
    /// `x-mandate-grant`: the grant id.
    pub grant: HeaderValue,
    /// The token itself (forwarded to meshed destinations only).
    pub token: HeaderValue,
    /// SHA-256 of the token (the exchange cache's key).
    pub token_hash: [u8; 32],
}

impl Verified {
    /// The person on whose behalf the call is made.
    pub fn subject(&self) -> &str {
        &self.claims.sub
    }

    /// What the decision record keeps of it.
    pub fn record(&self) -> DelegationRecord {
        DelegationRecord {
            subject: self.claims.sub.clone(),
            grant_id: self.claims.grant_id.clone(),
            actors: self.actors.clone(),
        }
    }
}

/// Why a presented token was refused: the failed check's short name (a metric label) and the
/// reason sent to the caller and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `malformed`, `signature`, `expired`, `audience`, `binding`, `revoked`, `no_keys`, ...
    pub check: &'static str,
    /// `delegation refused: <what failed>`.
    pub reason: String,
}

impl Refusal {
    fn new(check: &'static str, why: impl std::fmt::Display) -> Self {
        Self {
            check,
            reason: format!("delegation refused: {why}"),
        }
    }

    fn from_error(e: &DelegationError) -> Self {
        Self::new(e.check(), e)
    }
}

/// What a call presented: no token, a verified one, or one that was refused.
#[derive(Debug, Clone, Default)]
pub enum Presented {
    /// No `x-mandate-delegation` header: the agent acts on its own.
    #[default]
    None,
    /// A token that verified.
    Verified(Arc<Verified>),
    /// A token that did not (the call is refused before policy).
    Refused(Refusal),
}

impl Presented {
    /// The verified delegation, if any.
    pub fn verified(&self) -> Option<&Arc<Verified>> {
        match self {
            Self::Verified(v) => Some(v),
            _ => None,
        }
    }
}

/// Reads and verifies the token a call carries (before caller-sent identity headers are
/// stripped): none, verified, or refused (more than one token is refused too).
pub fn presented(
    headers: &HeaderMap,
    verifier: &Verifier,
    direction: Direction,
    presenter: Presenter<'_>,
    audiences: &[&str],
) -> Presented {
    let mut tokens = headers.get_all(&DELEGATION).iter();
    match (tokens.next(), tokens.next()) {
        (None, _) => Presented::None,
        (Some(token), None) => match verifier.verify(direction, token, presenter, audiences) {
            Ok(v) => Presented::Verified(v),
            Err(refusal) => Presented::Refused(refusal),
        },
        (Some(_), Some(_)) => {
            let refusal = Refusal::new("malformed", "more than one x-mandate-delegation header");
            verifier
                .metrics
                .delegation_verification(direction, refusal.check);
            Presented::Refused(refusal)
        }
    }
}

/// Stamps the verified delegation on a call going ahead: on-behalf-of, chain and grant, and the
/// token itself only when `with_token` (a meshed destination, whose sidecar verifies it again).
pub fn stamp(headers: &mut HeaderMap, verified: &Verified, with_token: bool) {
    headers.insert(ON_BEHALF_OF.clone(), verified.on_behalf_of.clone());
    headers.insert(CHAIN.clone(), verified.chain.clone());
    headers.insert(GRANT.clone(), verified.grant.clone());
    if with_token {
        headers.insert(DELEGATION.clone(), verified.token.clone());
    } else {
        headers.remove(&DELEGATION);
    }
}

/// The control plane's keys and revoked grants in force.
struct Trusted {
    /// The pushed revision (none yet: standalone, or nothing pushed or restored).
    revision: Option<u64>,
    keys: KeySet,
    /// The JWKS as pushed, to tell a key change from a revocation-only update.
    jwks: String,
    /// Revoked or closed grants not yet expired: id → expiry (Unix seconds).
    revoked: HashMap<String, i64>,
}

/// Verifies delegation tokens against the keys in force; caches what verified.
pub struct Verifier {
    /// `spiffe://<td>`: the audience meaning any destination in the trust domain.
    domain: String,
    /// `spiffe://<td>/control-plane`.
    issuer: String,
    managed: bool,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    leeway: u64,
    trusted: ArcSwap<Trusted>,
    verified: Cache<[u8; 32], Arc<Verified>>,
    metrics: Arc<Metrics>,
}

impl Verifier {
    /// A verifier for `trust_domain` with no keys yet, tolerating [`LEEWAY_SECS`] of clock skew.
    /// `managed`: keys will come from the control plane (standalone sidecars refuse every token).
    pub fn new(trust_domain: &TrustDomain, managed: bool, metrics: Arc<Metrics>) -> Self {
        let domain = format!("spiffe://{trust_domain}");
        Self {
            issuer: format!("{domain}{CONTROL_PLANE_PATH}"),
            domain,
            managed,
            leeway: LEEWAY_SECS,
            trusted: ArcSwap::from_pointee(Trusted {
                revision: None,
                keys: KeySet::default(),
                jwks: String::new(),
                revoked: HashMap::new(),
            }),
            verified: Cache::new(VERIFIED_ENTRIES),
            metrics,
        }
    }

    /// Tolerates `leeway` of clock skew on `exp` and `nbf` instead.
    pub fn with_leeway(mut self, leeway: std::time::Duration) -> Self {
        self.leeway = leeway.as_secs();
        self
    }

    /// `spiffe://<td>`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The delegation revision applied (where the stream resumes from).
    pub fn revision(&self) -> Option<u64> {
        self.trusted.load().revision
    }

    /// Applies pushed (or restored) keys and revoked grants. Revocations always apply; keys that
    /// do not parse are refused (logged) and the current ones stay. A key change empties the
    /// verified-token cache. Returns an error naming what was refused.
    pub fn apply(&self, state: &DelegationState) -> Result<(), String> {
        let current = self.trusted.load();
        let jwks = serde_json::to_string(&state.keys).unwrap_or_default();
        let now = unix_now();
        let revoked: HashMap<String, i64> = state
            .revoked_grants
            .iter()
            .filter(|g| g.expires_at + LEEWAY_SECS as i64 >= now)
            .map(|g| (g.id.clone(), g.expires_at))
            .collect();
        let (keys, jwks, refused) = if jwks == current.jwks {
            (current.keys.clone(), jwks, None)
        } else {
            match KeySet::from_jwks(&state.keys) {
                Ok(keys) => (keys, jwks, None),
                Err(e) => (
                    current.keys.clone(),
                    current.jwks.clone(),
                    Some(format!(
                        "delegation signing keys of revision {} refused: {e}; keeping the current ones",
                        state.revision
                    )),
                ),
            }
        };
        let keys_changed = jwks != current.jwks;
        let newly_revoked = revoked
            .keys()
            .filter(|id| !current.revoked.contains_key(*id))
            .count();
        drop(current);
        self.trusted.store(Arc::new(Trusted {
            revision: Some(state.revision),
            keys,
            jwks,
            revoked,
        }));
        if keys_changed {
            // A key that is gone no longer vouches for what it signed.
            self.verified.clear();
        }
        tracing::info!(
            revision = state.revision,
            keys = state.keys.len(),
            revoked_grants = state.revoked_grants.len(),
            newly_revoked,
            "delegation state revision {} applied",
            state.revision
        );
        match refused {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Verifies a presented token for a call from `presenter` to a destination known by
    /// `audiences` (the token must name one of them), counting the result.
    pub fn verify(
        &self,
        direction: Direction,
        token: &HeaderValue,
        presenter: Presenter<'_>,
        audiences: &[&str],
    ) -> Result<Arc<Verified>, Refusal> {
        let result = self.check(token, presenter, audiences);
        let label = match &result {
            Ok(_) => "ok",
            Err(r) => r.check,
        };
        self.metrics.delegation_verification(direction, label);
        result
    }

    fn check(
        &self,
        token: &HeaderValue,
        presenter: Presenter<'_>,
        audiences: &[&str],
    ) -> Result<Arc<Verified>, Refusal> {
        let trusted = self.trusted.load();
        if trusted.keys.is_empty() {
            return Err(Refusal::new(
                "no_keys",
                if self.managed {
                    "no delegation signing keys from the control plane yet"
                } else {
                    "delegation tokens need managed mode (no signing keys known)"
                },
            ));
        }
        let bytes = token.as_bytes();
        if bytes.len() > MAX_TOKEN {
            return Err(Refusal::new(
                "malformed",
                format!(
                    "the token is {} bytes, over the {MAX_TOKEN}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let token_hash = sha256(bytes);
        let key = cache_key(&token_hash, presenter.thumbprint);
        let now = unix_now();
        let verified = match self.verified.get(&key) {
            Some(hit) => {
                recheck(&hit.claims, presenter, audiences, now, self.leeway)
                    .map_err(|e| Refusal::from_error(&e))?;
                hit
            }
            None => {
                let text = token
                    .to_str()
                    .map_err(|_| Refusal::new("malformed", "the token is not printable ASCII"))?;
                let claims = delegation::verify(
                    text,
                    &trusted.keys,
                    &Expectations {
                        issuer: &self.issuer,
                        audiences,
                        presenter_id: presenter.id,
                        presenter_thumbprint: presenter.thumbprint,
                        now,
                        leeway_secs: self.leeway,
                    },
                )
                .map_err(|e| Refusal::from_error(&e))?;
                let verified = Arc::new(prepare(claims, token.clone(), token_hash)?);
                self.verified.insert(key, verified.clone());
                verified
            }
        };
        if trusted.revoked.contains_key(&verified.claims.grant_id) {
            return Err(Refusal::new(
                "revoked",
                format!(
                    "grant {} has been revoked or closed",
                    verified.claims.grant_id
                ),
            ));
        }
        Ok(verified)
    }
}

/// What a cached verification must still satisfy for this call.
fn recheck(
    claims: &DelegationClaims,
    presenter: Presenter<'_>,
    audiences: &[&str],
    now: i64,
    leeway: u64,
) -> Result<(), DelegationError> {
    if now
        >= claims
            .exp
            .saturating_add(i64::try_from(leeway).unwrap_or(i64::MAX))
    {
        return Err(DelegationError::Expired { exp: claims.exp });
    }
    if !claims.aud.iter().any(|a| audiences.contains(&a.as_str())) {
        return Err(DelegationError::WrongAudience(claims.aud.clone()));
    }
    let actor = claims.act.current();
    if actor != presenter.id {
        return Err(DelegationError::ActorMismatch {
            actor: actor.to_owned(),
            presenter: presenter.id.to_owned(),
        });
    }
    Ok(())
}

/// The input document, header values and record of verified claims.
fn prepare(
    claims: DelegationClaims,
    token: HeaderValue,
    token_hash: [u8; 32],
) -> Result<Verified, Refusal> {
    let header = |what: &str, text: &str| {
        HeaderValue::from_str(text).map_err(|_| {
            Refusal::new(
                "malformed",
                format!("the token's {what} cannot be carried in a header"),
            )
        })
    };
    let actors = claims.act.chain();
    let on_behalf_of = header("subject", &claims.sub)?;
    let chain = header("actors", &delegation::format_chain(&actors))?;
    let grant = header("grant id", &claims.grant_id)?;
    let input = Value::from(serde_json::json!({
        "subject": claims.sub,
        "grant_id": claims.grant_id,
        "scopes": claims.scope,
        "constraints": claims.constraints.clone().unwrap_or_default(),
        "actors": actors,
        "approved_by": claims.approved_by,
        "expires_at": rfc3339(claims.exp),
        "purpose": claims.purpose,
    }));
    Ok(Verified {
        claims,
        actors,
        input,
        on_behalf_of,
        chain,
        grant,
        token,
        token_hash,
    })
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The verified cache's key: the token's hash and the presenter's thumbprint, hashed together.
fn cache_key(token_hash: &[u8; 32], thumbprint: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(token_hash);
    ctx.update(thumbprint.as_bytes());
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// A boxed future of a control plane call.
pub type CpFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 'a>>;

/// The control plane's delegation and approval endpoints, as the sidecar calls them with its SVID.
/// (A trait so the call path can be tested without a control plane.)
pub trait ControlPlaneCalls: Send + Sync {
    /// `POST DELEGATION_TOKEN_PATH`: a token for one of our agent's grants.
    fn issue_token(&self, req: TokenRequest) -> CpFuture<'_, IssuedToken>;
    /// `POST DELEGATION_EXCHANGE_PATH`: the caller's token for one naming us as the next actor.
    fn exchange(&self, req: ExchangeRequest) -> CpFuture<'_, IssuedToken>;
    /// `POST APPROVALS_PATH`: ask a person to approve a call.
    fn request_approval(&self, req: ApprovalRequest) -> CpFuture<'_, ApprovalTicket>;
    /// `POST redeem_path(id)`: use an approval for this call.
    fn redeem(&self, id: String, req: RedeemRequest) -> CpFuture<'_, Redeemed>;
}

/// Tokens the control plane exchanged for incoming ones, reused until shortly before they expire.
pub struct Exchanges {
    cache: Cache<[u8; 32], (HeaderValue, i64)>,
    metrics: Arc<Metrics>,
}

impl Exchanges {
    /// An empty cache.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            cache: Cache::new(EXCHANGED_ENTRIES),
            metrics,
        }
    }

    /// The token to hand our app for `incoming`: a cached exchange, or a new one from the control
    /// plane. `None` when the exchange failed (logged and counted): the app then gets no token,
    /// and its onward calls are undelegated.
    pub async fn token_for(
        &self,
        incoming: &Verified,
        cp: &dyn ControlPlaneCalls,
    ) -> Option<HeaderValue> {
        let now = unix_now();
        if let Some((token, exp)) = self.cache.get(&incoming.token_hash) {
            if now < exp - EXCHANGE_MARGIN_SECS {
                self.metrics.delegation_exchange("cached");
                return Some(token);
            }
            self.cache.remove(&incoming.token_hash);
        }
        let request = ExchangeRequest {
            subject_token: incoming.token.to_str().unwrap_or_default().to_owned(),
            audience: Vec::new(),
        };
        let issued = match cp.exchange(request).await {
            Ok(issued) => issued,
            Err(e) => {
                self.metrics.delegation_exchange("failed");
                tracing::warn!(
                    grant_id = %incoming.claims.grant_id,
                    subject = %incoming.claims.sub,
                    error = %e,
                    "delegation exchange failed: the app gets no token, so its onward calls are not delegated"
                );
                return None;
            }
        };
        let Ok(token) = HeaderValue::from_str(&issued.token) else {
            self.metrics.delegation_exchange("failed");
            tracing::warn!(
                "the control plane exchanged a token that cannot be carried in a header; the app gets no token"
            );
            return None;
        };
        self.metrics.delegation_exchange("ok");
        if issued.expires_at - EXCHANGE_MARGIN_SECS > now {
            self.cache
                .insert(incoming.token_hash, (token.clone(), issued.expires_at));
        }
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_wire::RevokedGrant;
    use mandate_wire::delegation::{Actor, Confirmation, SigningKey};

    const ID: &str = "spiffe://mandate.local/agent/a";
    const THUMB: &str = "thumb-of-a";

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    fn claims(exp_in: i64) -> DelegationClaims {
        let now = unix_now();
        DelegationClaims {
            iss: "spiffe://mandate.local/control-plane".into(),
            sub: "alice@example.com".into(),
            act: Actor::from_chain(&[ID.to_owned()]),
            scope: vec![serde_json::json!({"host": "tool", "tool": "read_*"})],
            constraints: None,
            grant_id: "g-1".into(),
            aud: vec!["spiffe://mandate.local".into()],
            iat: now,
            nbf: now,
            exp: now + exp_in,
            jti: "j-1".into(),
            cnf: Confirmation {
                x5t_s256: THUMB.into(),
            },
            approved_by: "bob".into(),
            purpose: "triage".into(),
        }
    }

    fn state(key: &SigningKey, revision: u64, revoked: &[&str]) -> DelegationState {
        DelegationState {
            revision,
            keys: vec![key.public_jwk()],
            revoked_grants: revoked
                .iter()
                .map(|id| RevokedGrant {
                    id: (*id).into(),
                    expires_at: unix_now() + 600,
                })
                .collect(),
        }
    }

    fn verifier() -> (Verifier, SigningKey, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let v = Verifier::new(&td(), true, metrics.clone());
        let (key, _) = SigningKey::generate("k1".into());
        v.apply(&state(&key, 1, &[])).unwrap();
        (v, key, metrics)
    }

    fn me() -> Presenter<'static> {
        Presenter {
            id: ID,
            thumbprint: THUMB,
        }
    }

    const AUD: &[&str] = &[
        "spiffe://mandate.local",
        "spiffe://mandate.local/service/tool",
    ];

    #[test]
    fn a_valid_token_verifies_once_and_is_then_served_from_the_cache() {
        let (v, key, metrics) = verifier();
        let token = HeaderValue::from_str(&key.sign(&claims(300))).unwrap();
        let first = v.verify(Direction::Outbound, &token, me(), AUD).unwrap();
        assert_eq!(v.verified.len(), 1);
        let second = v.verify(Direction::Outbound, &token, me(), AUD).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "a hit is the cached value");
        assert_eq!(first.on_behalf_of, "alice@example.com");
        assert_eq!(first.chain, ID);
        assert_eq!(first.grant, "g-1");
        assert_eq!(first.input["subject"], Value::from("alice@example.com"));
        assert_eq!(first.input["actors"][0], Value::from(ID));
        assert_eq!(first.input["constraints"], Value::new_object());
        assert!(
            first.input["expires_at"]
                .as_string()
                .unwrap()
                .ends_with('Z')
        );
        assert_eq!(
            first.record(),
            DelegationRecord {
                subject: "alice@example.com".into(),
                grant_id: "g-1".into(),
                actors: vec![ID.into()],
            }
        );
        assert!(metrics.render().contains(
            "mandate_delegation_verifications_total{direction=\"outbound\",result=\"ok\"} 2"
        ));
    }

    #[test]
    fn a_cached_token_is_rechecked_for_audience_presenter_expiry_and_revocation() {
        let (v, key, _) = verifier();
        let mut c = claims(300);
        c.aud = vec!["spiffe://mandate.local/service/tool".into()];
        let token = HeaderValue::from_str(&key.sign(&c)).unwrap();
        v.verify(Direction::Outbound, &token, me(), AUD).unwrap();

        // Another destination: the cached claims do not name it.
        let other = ["spiffe://mandate.local/service/other"];
        let err = v
            .verify(Direction::Outbound, &token, me(), &other)
            .unwrap_err();
        assert_eq!(err.check, "audience");

        // Another presenter with the same thumbprint claim cannot reuse it either.
        let err = v
            .verify(
                Direction::Outbound,
                &token,
                Presenter {
                    id: "spiffe://mandate.local/agent/b",
                    thumbprint: THUMB,
                },
                AUD,
            )
            .unwrap_err();
        assert_eq!(err.check, "actor");

        // A different thumbprint misses the cache and fails the binding.
        let err = v
            .verify(
                Direction::Outbound,
                &token,
                Presenter {
                    id: ID,
                    thumbprint: "another",
                },
                AUD,
            )
            .unwrap_err();
        assert_eq!(err.check, "binding");

        // Revoked after it was cached.
        v.apply(&state(&key, 2, &["g-1"])).unwrap();
        let err = v
            .verify(Direction::Outbound, &token, me(), AUD)
            .unwrap_err();
        assert_eq!(err.check, "revoked");
        assert!(
            err.reason.starts_with("delegation refused: grant g-1"),
            "{}",
            err.reason
        );
        // Un-revoked (the grant's entry expired from the list): accepted again.
        v.apply(&state(&key, 3, &[])).unwrap();
        v.verify(Direction::Outbound, &token, me(), AUD).unwrap();
    }

    #[test]
    fn a_cached_token_expires_by_the_clock() {
        let (v, key, _) = verifier();
        // Expired 10 s ago: within the leeway, so it verifies and is cached.
        let token = HeaderValue::from_str(&key.sign(&claims(-10))).unwrap();
        v.verify(Direction::Inbound, &token, me(), AUD).unwrap();
        // The cached entry is rechecked against now: pretend the clock moved past the leeway.
        let hit = v
            .verified
            .get(&cache_key(&sha256(token.as_bytes()), THUMB))
            .unwrap();
        let later = unix_now() + LEEWAY_SECS as i64;
        let err = recheck(&hit.claims, me(), AUD, later, LEEWAY_SECS).unwrap_err();
        assert_eq!(err.check(), "expired");
        // Long expired: refused at once.
        let old = HeaderValue::from_str(&key.sign(&claims(-120))).unwrap();
        let err = v.verify(Direction::Inbound, &old, me(), AUD).unwrap_err();
        assert_eq!(err.check, "expired");
    }

    #[test]
    fn a_key_change_empties_the_cache_and_unknown_keys_are_refused() {
        let (v, key, _) = verifier();
        let token = HeaderValue::from_str(&key.sign(&claims(300))).unwrap();
        v.verify(Direction::Outbound, &token, me(), AUD).unwrap();
        // Revocation-only update: the cache stays.
        v.apply(&state(&key, 2, &["other"])).unwrap();
        assert_eq!(v.verified.len(), 1);
        let (rotated, _) = SigningKey::generate("k2".into());
        v.apply(&state(&rotated, 3, &[])).unwrap();
        assert_eq!(v.verified.len(), 0);
        assert_eq!(v.revision(), Some(3));
        let err = v
            .verify(Direction::Outbound, &token, me(), AUD)
            .unwrap_err();
        assert_eq!(err.check, "key");
    }

    #[test]
    fn without_keys_every_token_is_refused_with_the_mode_in_the_reason() {
        let standalone = Verifier::new(&td(), false, Arc::new(Metrics::new()));
        let token = HeaderValue::from_static("a.b.c");
        let err = standalone
            .verify(Direction::Outbound, &token, me(), AUD)
            .unwrap_err();
        assert_eq!(
            err.reason,
            "delegation refused: delegation tokens need managed mode (no signing keys known)"
        );
        let managed = Verifier::new(&td(), true, Arc::new(Metrics::new()));
        let err = managed
            .verify(Direction::Outbound, &token, me(), AUD)
            .unwrap_err();
        assert!(
            err.reason.contains("from the control plane yet"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn garbage_and_oversized_tokens_are_malformed() {
        let (v, _, _) = verifier();
        for token in ["garbage", "a.b.c"] {
            let err = v
                .verify(
                    Direction::Outbound,
                    &HeaderValue::from_static(token),
                    me(),
                    AUD,
                )
                .unwrap_err();
            assert!(
                err.reason.starts_with("delegation refused: "),
                "{}",
                err.reason
            );
        }
        let big = HeaderValue::from_str(&"a".repeat(MAX_TOKEN + 1)).unwrap();
        let err = v.verify(Direction::Outbound, &big, me(), AUD).unwrap_err();
        assert_eq!(err.check, "malformed");
    }

    struct FakeCp {
        exchanges: std::sync::atomic::AtomicUsize,
        fail: bool,
        ttl: i64,
    }

    impl ControlPlaneCalls for FakeCp {
        fn issue_token(&self, _: TokenRequest) -> CpFuture<'_, IssuedToken> {
            unimplemented!()
        }
        fn exchange(&self, req: ExchangeRequest) -> CpFuture<'_, IssuedToken> {
            let n = self
                .exchanges
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (fail, ttl) = (self.fail, self.ttl);
            Box::pin(async move {
                if fail {
                    return Err(ClientError::Api {
                        status: http::StatusCode::FORBIDDEN,
                        error: "no".into(),
                    });
                }
                assert!(!req.subject_token.is_empty());
                Ok(IssuedToken {
                    token: format!("exchanged-{n}"),
                    expires_at: unix_now() + ttl,
                })
            })
        }
        fn request_approval(&self, _: ApprovalRequest) -> CpFuture<'_, ApprovalTicket> {
            unimplemented!()
        }
        fn redeem(&self, _: String, _: RedeemRequest) -> CpFuture<'_, Redeemed> {
            unimplemented!()
        }
    }

    #[tokio::test]
    async fn exchanged_tokens_are_reused_until_near_expiry_and_failures_give_none() {
        let (v, key, metrics) = verifier();
        let token = HeaderValue::from_str(&key.sign(&claims(300))).unwrap();
        let verified = v.verify(Direction::Inbound, &token, me(), AUD).unwrap();
        let exchanges = Exchanges::new(metrics.clone());
        let cp = FakeCp {
            exchanges: 0.into(),
            fail: false,
            ttl: 300,
        };
        assert_eq!(
            exchanges.token_for(&verified, &cp).await.unwrap(),
            "exchanged-0"
        );
        assert_eq!(
            exchanges.token_for(&verified, &cp).await.unwrap(),
            "exchanged-0"
        );
        assert_eq!(cp.exchanges.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A token that expires within the margin is not kept.
        let short = Exchanges::new(metrics.clone());
        let cp = FakeCp {
            exchanges: 0.into(),
            fail: false,
            ttl: 10,
        };
        short.token_for(&verified, &cp).await.unwrap();
        short.token_for(&verified, &cp).await.unwrap();
        assert_eq!(cp.exchanges.load(std::sync::atomic::Ordering::SeqCst), 2);

        let failing = FakeCp {
            exchanges: 0.into(),
            fail: true,
            ttl: 300,
        };
        assert!(
            Exchanges::new(metrics.clone())
                .token_for(&verified, &failing)
                .await
                .is_none()
        );
        let text = metrics.render();
        assert!(
            text.contains("mandate_delegation_exchanges_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mandate_delegation_exchanges_total{result=\"ok\"} 3"),
            "{text}"
        );
    }
}
