//! Delegation tokens: what lets an agent act on a person's behalf.
//!
//! The control plane turns a grant into a compact JWS (ES256, `typ` [`TOKEN_TYPE`]) whose claims
//! name the person (`sub`), the chain of agents acting for them (`act`, RFC 8693, current actor
//! outermost), the grant's scopes and constraints, the audiences it may be presented to, and a
//! confirmation (`cnf`, RFC 8705 `x5t#S256`) binding it to the presenting agent's certificate, so
//! a stolen token is useless without that agent's key.
//!
//! Sidecars verify tokens with [`verify`] on the request path, against the keys pushed by the
//! control plane ([`KeySet`]); policy only ever sees claims that passed every check. The checks
//! run in a fixed order and the first failure is reported ([`DelegationError::check`]), so the
//! refusal and the metric name one reason.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::decision::DelegationRecord;

/// Request header carrying the delegation token (agent → its sidecar, sidecar → meshed peer).
pub const DELEGATION_HEADER: &str = "x-mandate-delegation";
/// Stamped by a sidecar after verification: the person (`sub`) the call is made for.
pub const ON_BEHALF_OF_HEADER: &str = "x-mandate-on-behalf-of";
/// Stamped by a sidecar after verification: the actors, oldest first, comma-separated SPIFFE IDs
/// (see [`format_chain`] and [`parse_chain`]).
pub const CHAIN_HEADER: &str = "x-mandate-delegation-chain";
/// Stamped by a sidecar after verification: the grant id.
pub const GRANT_HEADER: &str = "x-mandate-grant";
/// Sent by an agent retrying a call that needed approval: the approval id.
pub const APPROVAL_HEADER: &str = "x-mandate-approval";
/// On a refusal that asks for approval: the approval id to have approved and retry with.
pub const APPROVAL_ID_HEADER: &str = "x-mandate-approval-id";
/// The JWS `typ` of a delegation token; anything else is refused, so no other JWT signed by the
/// same key could pass as one.
pub const TOKEN_TYPE: &str = "mandate-delegation+jwt";
/// Most actors one chain may hold: bounds multi-hop delegation and the work to verify it.
pub const MAX_CHAIN: usize = 5;
/// Tokens longer than this are refused before any parsing (headers are attacker-controlled).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The JWS algorithm, the only one accepted.
const ALG: &str = "ES256";
/// Longest header part accepted; ours is about 100 characters. Keeps header decoding on the stack.
const MAX_HEADER_B64: usize = 512;
/// Longest string copied out of an unverified header into an error, so logs stay bounded.
const MAX_ECHO: usize = 64;

/// An actor in a delegation chain (RFC 8693 `act`): the agent acting, and whoever it acts for.
/// The outermost actor is the current one; `act` nests the previous actors, oldest innermost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: String,
    /// The actor this one took over from (absent for the first agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain as SPIFFE IDs, oldest first (the current actor last).
    pub fn chain(&self) -> Vec<String> {
        let mut chain = Vec::with_capacity(self.depth());
        let mut next = Some(self);
        while let Some(actor) = next {
            chain.push(actor.sub.clone());
            next = actor.act.as_deref();
        }
        chain.reverse();
        chain
    }

    /// Builds the nested actor from a chain, oldest first. An empty chain gives an actor with
    /// an empty `sub`, which no presenter can match.
    pub fn from_chain(oldest_first: &[String]) -> Actor {
        let mut iter = oldest_first.iter();
        let mut actor = Actor {
            sub: iter.next().cloned().unwrap_or_default(),
            act: None,
        };
        for sub in iter {
            actor = Actor {
                sub: sub.clone(),
                act: Some(Box::new(actor)),
            };
        }
        actor
    }

    /// The current actor: the agent that must present the token.
    pub fn current(&self) -> &str {
        &self.sub
    }

    /// How many actors the chain holds (at least 1).
    pub fn depth(&self) -> usize {
        let mut depth = 1;
        let mut next = self.act.as_deref();
        while let Some(actor) = next {
            depth += 1;
            next = actor.act.as_deref();
        }
        depth
    }
}

/// Proof-of-possession confirmation (RFC 8705): the certificate the token is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// [`thumbprint`] of the presenting agent's leaf certificate.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// The claims of a delegation token. Unknown claims are ignored so the control plane can add
/// some without breaking older sidecars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegationClaims {
    /// Issuer: the control plane, `spiffe://<td>/control-plane`.
    pub iss: String,
    /// The person on whose behalf the agents act.
    pub sub: String,
    /// The chain of agents, current actor outermost.
    pub act: Actor,
    /// The grant's scopes (objects of glob patterns, as in the policy's ceilings).
    pub scope: Vec<Value>,
    /// The grant's constraints, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Map<String, Value>>,
    /// The grant the token was issued from.
    pub grant_id: String,
    /// Where it may be presented: the trust domain (`spiffe://<td>`) or specific services.
    #[serde(deserialize_with = "string_or_seq")]
    pub aud: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not valid before, Unix seconds.
    pub nbf: i64,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Token id (UUIDv7).
    pub jti: String,
    /// The certificate the token is bound to.
    pub cnf: Confirmation,
    /// Who approved the grant.
    pub approved_by: String,
    /// The grant's purpose.
    pub purpose: String,
}

impl DelegationClaims {
    /// The delegation part of a decision record: subject, grant and actors oldest first.
    pub fn record(&self) -> DelegationRecord {
        DelegationRecord {
            subject: self.sub.clone(),
            grant_id: self.grant_id.clone(),
            actors: self.act.chain(),
        }
    }
}

/// RFC 7519 allows a single string for `aud`; we issue arrays but accept both.
fn string_or_seq<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// The `x5t#S256` of a certificate: unpadded base64url of the SHA-256 of its DER.
pub fn thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, cert_der))
}

/// A public signing key as published in the JWKS and the push stream (RFC 7517, EC P-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC`.
    pub kty: String,
    /// Curve: `P-256`.
    pub crv: String,
    /// Algorithm: `ES256`.
    pub alg: String,
    /// Use: `sig`.
    #[serde(rename = "use")]
    pub key_use: String,
    /// Key id, as in the token header.
    pub kid: String,
    /// X coordinate, unpadded base64url of 32 bytes.
    pub x: String,
    /// Y coordinate, unpadded base64url of 32 bytes.
    pub y: String,
}

/// A JWK set: the body of [`crate::JWKS_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys that may have signed a token still valid.
    pub keys: Vec<Jwk>,
}

/// The control plane's private signing key (ES256, P-256) and its key id.
pub struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
    /// The encoded header, the same for every token this key signs.
    header: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key, and its PKCS#8 DER to store (secret: seal it).
    ///
    /// # Panics
    /// If the system random number generator fails.
    pub fn generate(kid: String) -> (SigningKey, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("system random number generator failed");
        let key = SigningKey::from_pkcs8(kid, pkcs8.as_ref())
            .expect("a key ring just generated is valid");
        (key, pkcs8.as_ref().to_vec())
    }

    /// Loads a stored key from its PKCS#8 DER.
    pub fn from_pkcs8(kid: String, der: &[u8]) -> Result<Self, DelegationError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| DelegationError::Key(format!("not a P-256 PKCS#8 key: {e}")))?;
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            alg: ALG.into(),
            key_use: "sig".into(),
            kid: kid.clone(),
            x: URL_SAFE_NO_PAD.encode(&point[1..33]),
            y: URL_SAFE_NO_PAD.encode(&point[33..65]),
        };
        #[derive(Serialize)]
        struct Header<'a> {
            alg: &'a str,
            typ: &'a str,
            kid: &'a str,
        }
        let header = serde_json::to_vec(&Header {
            alg: ALG,
            typ: TOKEN_TYPE,
            kid: &kid,
        })
        .expect("a header of strings serializes");
        Ok(SigningKey {
            header: URL_SAFE_NO_PAD.encode(header),
            key: EncodingKey::from_ec_der(der),
            jwk,
            kid,
        })
    }

    /// The key id, as in the token header and the JWK.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, to publish.
    pub fn public_jwk(&self) -> Jwk {
        self.jwk.clone()
    }

    /// Signs the claims into a compact JWS.
    ///
    /// # Panics
    /// If the system random number generator fails (ECDSA needs a nonce).
    pub fn sign(&self, claims: &DelegationClaims) -> String {
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let mut token = String::with_capacity(self.header.len() + payload.len() * 4 / 3 + 92);
        token.push_str(&self.header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = jsonwebtoken::crypto::sign(token.as_bytes(), &self.key, Algorithm::ES256)
            .expect("ES256 signing with a validated key only fails if the RNG does");
        token.push('.');
        token.push_str(&signature);
        token
    }
}

/// Verifying keys by key id. Cloning is cheap (shared), so a sidecar can swap in a new set
/// while requests verify against the old one.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Arc<HashMap<String, DecodingKey>>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    /// Builds the set from published keys; refuses anything but ES256 P-256 signing keys, and
    /// duplicate key ids (which key would verify would be ambiguous).
    pub fn from_jwks(keys: &[Jwk]) -> Result<Self, DelegationError> {
        let mut map = HashMap::with_capacity(keys.len());
        for jwk in keys {
            let bad = |why: &str| DelegationError::Key(format!("key {:?}: {why}", jwk.kid));
            if jwk.kid.is_empty() {
                return Err(bad("empty kid"));
            }
            if jwk.kty != "EC" || jwk.crv != "P-256" || jwk.alg != ALG || jwk.key_use != "sig" {
                return Err(bad("not an EC P-256 ES256 signing key"));
            }
            for coord in [&jwk.x, &jwk.y] {
                match URL_SAFE_NO_PAD.decode(coord) {
                    Ok(bytes) if bytes.len() == 32 => {}
                    _ => return Err(bad("coordinates are not 32 bytes of unpadded base64url")),
                }
            }
            let key =
                DecodingKey::from_ec_components(&jwk.x, &jwk.y).map_err(|e| bad(&e.to_string()))?;
            if map.insert(jwk.kid.clone(), key).is_some() {
                return Err(bad("duplicate kid"));
            }
        }
        Ok(KeySet {
            keys: Arc::new(map),
        })
    }

    /// True when there is no key: every token would be refused.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether a key id is known.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }
}

/// What a token must satisfy for this presentation.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// The control plane's SPIFFE ID, `spiffe://<td>/control-plane`.
    pub issuer: &'a str,
    /// Accepted when the token's `aud` contains any of these.
    pub audiences: &'a [&'a str],
    /// SPIFFE ID of whoever presents the token: must be the current actor.
    pub presenter_id: &'a str,
    /// [`thumbprint`] of the presenter's leaf certificate: must be the token's `cnf`.
    pub presenter_thumbprint: &'a str,
    /// Now, Unix seconds.
    pub now: i64,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

/// Why a token was refused. `Display` names the failed check for a person; [`Self::check`]
/// gives a short stable name for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    /// Not a well-formed compact JWS or not well-formed claims.
    #[error("delegation token malformed: {0}")]
    Malformed(String),
    /// The header names an algorithm other than ES256.
    #[error("delegation token algorithm {0:?} is not accepted (only ES256)")]
    UnsupportedAlgorithm(String),
    /// The header's `typ` is not [`TOKEN_TYPE`].
    #[error("delegation token type is not {TOKEN_TYPE}")]
    WrongType,
    /// No key with the header's `kid`.
    #[error("delegation token signed with unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("delegation token signature does not verify")]
    BadSignature,
    /// Expired (beyond the leeway).
    #[error("delegation token expired at {}", rfc3339(*.exp))]
    Expired {
        /// The token's `exp`.
        exp: i64,
    },
    /// Not yet valid (beyond the leeway).
    #[error("delegation token not valid before {}", rfc3339(*.nbf))]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
    },
    /// Issued by someone else.
    #[error("delegation token issued by {0:?}, not this trust domain's control plane")]
    WrongIssuer(String),
    /// Not meant for this destination.
    #[error("delegation token audience {0:?} does not include this destination")]
    WrongAudience(Vec<String>),
    /// Bound to another certificate than the presenter's: stolen or replayed.
    #[error("delegation token is bound to another certificate than the presenter's")]
    BindingMismatch,
    /// The current actor is not the presenter.
    #[error("delegation token names {actor} as the acting agent, but {presenter} presented it")]
    ActorMismatch {
        /// The token's current actor.
        actor: String,
        /// Who presented it.
        presenter: String,
    },
    /// More actors than [`MAX_CHAIN`].
    #[error("delegation chain has {0} actors, more than the {MAX_CHAIN} allowed")]
    ChainTooLong(usize),
    /// A key could not be loaded.
    #[error("delegation key: {0}")]
    Key(String),
}

impl DelegationError {
    /// Short stable name of the failed check, for metric labels and logs.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedAlgorithm(_) => "algorithm",
            Self::WrongType => "type",
            Self::UnknownKey(_) | Self::Key(_) => "key",
            Self::BadSignature => "signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongIssuer(_) => "issuer",
            Self::WrongAudience(_) => "audience",
            Self::BindingMismatch => "binding",
            Self::ActorMismatch { .. } => "actor",
            Self::ChainTooLong(_) => "chain",
        }
    }
}

fn malformed(why: &str) -> DelegationError {
    DelegationError::Malformed(why.to_owned())
}

/// Copies at most [`MAX_ECHO`] characters of an unverified value into an error.
fn echo(s: &str) -> String {
    s.chars().take(MAX_ECHO).collect()
}

/// The header fields we read. Borrowed strings: a header with escapes is not one we issued.
#[derive(Deserialize)]
struct RawHeader<'a> {
    alg: Option<&'a str>,
    typ: Option<&'a str>,
    kid: Option<&'a str>,
    /// Critical extensions we do not understand must make the token invalid (RFC 7515 4.1.11).
    crit: Option<serde::de::IgnoredAny>,
}

/// Verifies a delegation token and returns its claims. Checks, in order: size, shape, header
/// (algorithm, type, key id), signature, `exp`/`nbf` with leeway, issuer, audience, chain
/// length, certificate binding, current actor; the first failure is returned.
pub fn verify(
    token: &str,
    keys: &KeySet,
    expect: &Expectations<'_>,
) -> Result<DelegationClaims, DelegationError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(DelegationError::Malformed(format!(
            "{} bytes, over the {MAX_TOKEN_BYTES}-byte limit",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts"));
    };

    // Header: decoded on the stack, parsed borrowing from it.
    if header.len() > MAX_HEADER_B64 {
        return Err(malformed("header too long"));
    }
    let mut buf = [0u8; MAX_HEADER_B64];
    let n = URL_SAFE_NO_PAD
        .decode_slice(header, &mut buf)
        .map_err(|_| malformed("header is not base64url"))?;
    let head: RawHeader<'_> =
        serde_json::from_slice(&buf[..n]).map_err(|_| malformed("header is not a JSON object"))?;
    match head.alg {
        Some(ALG) => {}
        Some(other) => return Err(DelegationError::UnsupportedAlgorithm(echo(other))),
        None => return Err(malformed("header has no alg")),
    }
    if head.typ != Some(TOKEN_TYPE) {
        return Err(DelegationError::WrongType);
    }
    if head.crit.is_some() {
        return Err(malformed("header has critical extensions"));
    }
    let kid = head.kid.ok_or_else(|| malformed("header has no kid"))?;
    let key = keys
        .keys
        .get(kid)
        .ok_or_else(|| DelegationError::UnknownKey(echo(kid)))?;

    // Signature over the first two parts, as they appear in the token.
    let signed = &token[..header.len() + 1 + payload.len()];
    match jsonwebtoken::crypto::verify(signature, signed.as_bytes(), key, Algorithm::ES256) {
        Ok(true) => {}
        Ok(false) => return Err(DelegationError::BadSignature),
        Err(_) => return Err(malformed("signature is not base64url")),
    }

    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| malformed("payload is not base64url"))?;
    let claims: DelegationClaims = serde_json::from_slice(&payload)
        .map_err(|e| DelegationError::Malformed(format!("claims: {e}")))?;

    let leeway = i64::try_from(expect.leeway_secs).unwrap_or(i64::MAX);
    // RFC 7519: the token is valid strictly before exp.
    if expect.now >= claims.exp.saturating_add(leeway) {
        return Err(DelegationError::Expired { exp: claims.exp });
    }
    if expect.now.saturating_add(leeway) < claims.nbf {
        return Err(DelegationError::NotYetValid { nbf: claims.nbf });
    }
    if claims.iss != expect.issuer {
        return Err(DelegationError::WrongIssuer(claims.iss));
    }
    if !claims
        .aud
        .iter()
        .any(|aud| expect.audiences.contains(&aud.as_str()))
    {
        return Err(DelegationError::WrongAudience(claims.aud));
    }
    let depth = claims.act.depth();
    if depth > MAX_CHAIN {
        return Err(DelegationError::ChainTooLong(depth));
    }
    if claims.cnf.x5t_s256 != expect.presenter_thumbprint {
        return Err(DelegationError::BindingMismatch);
    }
    if claims.act.current() != expect.presenter_id {
        return Err(DelegationError::ActorMismatch {
            actor: claims.act.sub,
            presenter: expect.presenter_id.to_owned(),
        });
    }
    Ok(claims)
}

/// The value of [`CHAIN_HEADER`]: actors oldest first, comma-separated.
pub fn format_chain(actors: &[String]) -> String {
    actors.join(",")
}

/// Parses a [`CHAIN_HEADER`] value: 1 to [`MAX_CHAIN`] SPIFFE IDs, comma-separated (spaces
/// around commas tolerated, as in any HTTP list), oldest first.
pub fn parse_chain(header: &str) -> Result<Vec<String>, DelegationError> {
    if header.len() > MAX_TOKEN_BYTES {
        return Err(malformed("chain header too long"));
    }
    let count = header.split(',').count();
    if count > MAX_CHAIN {
        return Err(DelegationError::ChainTooLong(count));
    }
    header
        .split(',')
        .map(|id| {
            let id = id.trim_matches([' ', '\t']);
            let valid = id.len() > "spiffe://".len()
                && id.starts_with("spiffe://")
                && id.bytes().all(|b| b.is_ascii_graphic());
            if valid {
                Ok(id.to_owned())
            } else {
                Err(DelegationError::Malformed(format!(
                    "chain entry {:?} is not a SPIFFE ID",
                    echo(id)
                )))
            }
        })
        .collect()
}

/// RFC 3339 UTC of a Unix time, for messages (civil-from-days, H. Hinnant; no date crate needed).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TD: &str = "spiffe://example.org";
    const CP: &str = "spiffe://example.org/control-plane";
    const AGENT: &str = "spiffe://example.org/agent/planner";
    const NOW: i64 = 1_795_341_000;

    fn cert() -> String {
        thumbprint(b"the planner's leaf certificate")
    }

    fn claims() -> DelegationClaims {
        DelegationClaims {
            iss: CP.into(),
            sub: "alice@example.com".into(),
            act: Actor::from_chain(&[AGENT.into()]),
            scope: vec![json!({"host": "tool", "tool": "read_*"})],
            constraints: None,
            grant_id: "0199c8a0-0000-7000-8000-000000000001".into(),
            aud: vec![TD.into()],
            iat: NOW - 10,
            nbf: NOW - 10,
            exp: NOW + 300,
            jti: "0199c8a0-0000-7000-8000-000000000002".into(),
            cnf: Confirmation { x5t_s256: cert() },
            approved_by: "bob@example.com".into(),
            purpose: "read the quarterly report".into(),
        }
    }

    struct Fixture {
        key: SigningKey,
        pkcs8: Vec<u8>,
        keys: KeySet,
    }

    fn fixture() -> Fixture {
        let (key, pkcs8) = SigningKey::generate("k1".into());
        let keys = KeySet::from_jwks(&[key.public_jwk()]).unwrap();
        Fixture { key, pkcs8, keys }
    }

    fn expect<'a>(thumb: &'a str) -> Expectations<'a> {
        Expectations {
            issuer: CP,
            audiences: &[TD],
            presenter_id: AGENT,
            presenter_thumbprint: thumb,
            now: NOW,
            leeway_secs: 30,
        }
    }

    fn check(token: &str, keys: &KeySet) -> Result<DelegationClaims, DelegationError> {
        verify(token, keys, &expect(&cert()))
    }

    /// Signs arbitrary header and payload JSON with the fixture's key, for tokens our signer
    /// would never produce.
    fn sign_raw(pkcs8: &[u8], header: &Value, payload: &Value) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_ec_der(pkcs8),
            Algorithm::ES256,
        )
        .unwrap();
        format!("{message}.{sig}")
    }

    fn header(kid: &str) -> Value {
        json!({"alg": "ES256", "typ": TOKEN_TYPE, "kid": kid})
    }

    #[test]
    fn a_signed_token_verifies_and_gives_back_its_claims() {
        let f = fixture();
        let token = f.key.sign(&claims());
        assert_eq!(check(&token, &f.keys).unwrap(), claims());
    }

    #[test]
    fn the_header_names_es256_the_delegation_type_and_the_key() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let head = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(head.alg, Algorithm::ES256);
        assert_eq!(head.typ.as_deref(), Some(TOKEN_TYPE));
        assert_eq!(head.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn tokens_are_standard_jws_that_jsonwebtoken_itself_accepts() {
        let f = fixture();
        let jwk = f.key.public_jwk();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&[TD]);
        validation.set_issuer(&[CP]);
        // jsonwebtoken checks exp against the real clock: give it a token valid now.
        let mut fresh = claims();
        fresh.exp = i64::MAX / 2;
        let decoded = jsonwebtoken::decode::<DelegationClaims>(
            &f.key.sign(&fresh),
            &DecodingKey::from_ec_components(&jwk.x, &jwk.y).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims, fresh);
    }

    #[test]
    fn a_stored_key_signs_tokens_the_published_key_verifies() {
        let f = fixture();
        let reloaded = SigningKey::from_pkcs8("k1".into(), &f.pkcs8).unwrap();
        assert_eq!(reloaded.public_jwk(), f.key.public_jwk());
        assert!(check(&reloaded.sign(&claims()), &f.keys).is_ok());
        assert_eq!(
            SigningKey::from_pkcs8("k1".into(), b"not a key")
                .unwrap_err()
                .check(),
            "key"
        );
    }

    #[test]
    fn a_tampered_header_is_refused() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let rest = token.split_once('.').unwrap().1;
        let mut head = header("k1");
        head["extra"] = json!(1);
        let forged = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(head.to_string()));
        assert_eq!(check(&forged, &f.keys), Err(DelegationError::BadSignature));
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged_claims = claims();
        forged_claims.sub = "mallory@example.com".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(check(&forged, &f.keys), Err(DelegationError::BadSignature));
    }

    #[test]
    fn a_tampered_signature_is_refused() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
        bytes[10] ^= 1;
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(check(&forged, &f.keys), Err(DelegationError::BadSignature));
    }

    #[test]
    fn a_token_signed_by_another_key_under_a_known_kid_is_refused() {
        let f = fixture();
        let (_, other) = SigningKey::generate("k1".into());
        let impostor = SigningKey::from_pkcs8("k1".into(), &other).unwrap();
        let err = check(&impostor.sign(&claims()), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::BadSignature);
        assert_eq!(err.check(), "signature");
    }

    #[test]
    fn a_token_from_an_unknown_key_is_refused_by_kid() {
        let f = fixture();
        let (other, _) = SigningKey::generate("k2".into());
        let err = check(&other.sign(&claims()), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::UnknownKey("k2".into()));
        assert_eq!(
            err.to_string(),
            r#"delegation token signed with unknown key "k2""#
        );
        assert_eq!(err.check(), "key");
    }

    #[test]
    fn an_empty_key_set_refuses_everything() {
        let f = fixture();
        let none = KeySet::default();
        assert!(none.is_empty());
        assert_eq!(
            check(&f.key.sign(&claims()), &none).unwrap_err().check(),
            "key"
        );
    }

    #[test]
    fn expiry_beyond_the_leeway_is_refused_within_it_accepted() {
        let f = fixture();
        let mut c = claims();
        c.exp = NOW - 31;
        let err = check(&f.key.sign(&c), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::Expired { exp: NOW - 31 });
        assert_eq!(err.check(), "expired");
        c.exp = NOW - 29;
        assert!(check(&f.key.sign(&c), &f.keys).is_ok());
    }

    #[test]
    fn expiry_names_the_time_in_rfc3339() {
        let err = DelegationError::Expired { exp: 1_795_341_600 };
        assert_eq!(
            err.to_string(),
            "delegation token expired at 2026-11-22T10:00:00Z"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        // Absurd values from a token must not panic.
        let _ = rfc3339(i64::MAX);
        let _ = rfc3339(i64::MIN);
    }

    #[test]
    fn a_token_not_yet_valid_beyond_the_leeway_is_refused() {
        let f = fixture();
        let mut c = claims();
        c.nbf = NOW + 31;
        let err = check(&f.key.sign(&c), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::NotYetValid { nbf: NOW + 31 });
        assert_eq!(err.check(), "not_yet_valid");
        c.nbf = NOW + 29;
        assert!(check(&f.key.sign(&c), &f.keys).is_ok());
    }

    #[test]
    fn a_token_from_another_issuer_is_refused() {
        let f = fixture();
        let mut c = claims();
        c.iss = "spiffe://other.org/control-plane".into();
        let err = check(&f.key.sign(&c), &f.keys).unwrap_err();
        assert_eq!(err.check(), "issuer");
        assert!(err.to_string().contains("spiffe://other.org/control-plane"));
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let f = fixture();
        let mut c = claims();
        c.aud = vec!["spiffe://example.org/service/billing".into()];
        let err = check(&f.key.sign(&c), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::WrongAudience(c.aud.clone()));
        assert_eq!(err.check(), "audience");
    }

    #[test]
    fn any_one_matching_audience_is_enough() {
        let f = fixture();
        let mut c = claims();
        c.aud = vec![
            "spiffe://example.org/service/billing".into(),
            "spiffe://example.org/service/reports".into(),
        ];
        let token = f.key.sign(&c);
        let thumb = cert();
        let mut e = expect(&thumb);
        e.audiences = &[TD, "spiffe://example.org/service/reports"];
        assert!(verify(&token, &f.keys, &e).is_ok());
        e.audiences = &[TD, "spiffe://example.org/service/ledger"];
        assert_eq!(verify(&token, &f.keys, &e).unwrap_err().check(), "audience");
    }

    #[test]
    fn a_single_string_audience_is_accepted_as_rfc7519_allows() {
        let f = fixture();
        let mut payload = serde_json::to_value(claims()).unwrap();
        payload["aud"] = json!(TD);
        assert!(check(&sign_raw(&f.pkcs8, &header("k1"), &payload), &f.keys).is_ok());
    }

    #[test]
    fn a_token_bound_to_another_certificate_is_refused() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let other = thumbprint(b"a thief's certificate");
        let err = verify(&token, &f.keys, &expect(&other)).unwrap_err();
        assert_eq!(err, DelegationError::BindingMismatch);
        assert_eq!(err.check(), "binding");
    }

    #[test]
    fn a_token_presented_by_another_agent_than_the_current_actor_is_refused() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let thumb = cert();
        let mut e = expect(&thumb);
        e.presenter_id = "spiffe://example.org/agent/other";
        let err = verify(&token, &f.keys, &e).unwrap_err();
        assert_eq!(
            err,
            DelegationError::ActorMismatch {
                actor: AGENT.into(),
                presenter: "spiffe://example.org/agent/other".into()
            }
        );
        assert_eq!(err.check(), "actor");
    }

    #[test]
    fn a_chain_of_max_chain_actors_passes_one_more_is_refused() {
        let f = fixture();
        let mut chain: Vec<String> = (1..MAX_CHAIN)
            .map(|i| format!("spiffe://example.org/agent/a{i}"))
            .collect();
        chain.push(AGENT.into());
        let mut c = claims();
        c.act = Actor::from_chain(&chain);
        assert_eq!(check(&f.key.sign(&c), &f.keys).unwrap().act.chain(), chain);
        chain.insert(0, "spiffe://example.org/agent/a0".into());
        c.act = Actor::from_chain(&chain);
        let err = check(&f.key.sign(&c), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::ChainTooLong(MAX_CHAIN + 1));
        assert_eq!(err.check(), "chain");
    }

    #[test]
    fn alg_none_is_refused() {
        let f = fixture();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
        let head = json!({"alg": "none", "typ": TOKEN_TYPE, "kid": "k1"});
        let token = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(head.to_string()));
        let err = check(&token, &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::UnsupportedAlgorithm("none".into()));
        assert_eq!(err.check(), "algorithm");
    }

    #[test]
    fn hs256_keyed_with_the_public_key_is_refused() {
        // The classic confusion attack: HMAC with the public key as the secret.
        let f = fixture();
        let jwk = f.key.public_jwk();
        let head = json!({"alg": "HS256", "typ": TOKEN_TYPE, "kid": "k1"});
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(head.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap())
        );
        let secret = EncodingKey::from_secret(format!("{}{}", jwk.x, jwk.y).as_bytes());
        let sig =
            jsonwebtoken::crypto::sign(message.as_bytes(), &secret, Algorithm::HS256).unwrap();
        let err = check(&format!("{message}.{sig}"), &f.keys).unwrap_err();
        assert_eq!(err, DelegationError::UnsupportedAlgorithm("HS256".into()));
    }

    #[test]
    fn a_validly_signed_jwt_of_another_type_is_refused() {
        let f = fixture();
        let payload = serde_json::to_value(claims()).unwrap();
        for head in [
            json!({"alg": "ES256", "typ": "JWT", "kid": "k1"}),
            json!({"alg": "ES256", "kid": "k1"}),
        ] {
            let err = check(&sign_raw(&f.pkcs8, &head, &payload), &f.keys).unwrap_err();
            assert_eq!(err, DelegationError::WrongType);
            assert_eq!(err.check(), "type");
        }
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let f = fixture();
        let mut head = header("k1");
        head["crit"] = json!(["exp"]);
        let payload = serde_json::to_value(claims()).unwrap();
        assert_eq!(
            check(&sign_raw(&f.pkcs8, &head, &payload), &f.keys)
                .unwrap_err()
                .check(),
            "malformed"
        );
    }

    #[test]
    fn unknown_claims_are_ignored_for_forward_compatibility() {
        let f = fixture();
        let mut payload = serde_json::to_value(claims()).unwrap();
        payload["added_later"] = json!({"any": "thing"});
        assert_eq!(
            check(&sign_raw(&f.pkcs8, &header("k1"), &payload), &f.keys).unwrap(),
            claims()
        );
    }

    #[test]
    fn signed_claims_missing_a_field_are_malformed() {
        let f = fixture();
        let mut payload = serde_json::to_value(claims()).unwrap();
        payload.as_object_mut().unwrap().remove("cnf");
        let err = check(&sign_raw(&f.pkcs8, &header("k1"), &payload), &f.keys).unwrap_err();
        assert_eq!(err.check(), "malformed");
        assert!(err.to_string().contains("cnf"), "{err}");
    }

    #[test]
    fn oversized_and_misshapen_tokens_are_malformed() {
        let f = fixture();
        let token = f.key.sign(&claims());
        let huge = format!("{token}{}", "A".repeat(MAX_TOKEN_BYTES));
        let err = check(&huge, &f.keys).unwrap_err();
        assert_eq!(err.check(), "malformed");
        assert!(err.to_string().contains("8192"), "{err}");
        for bad in ["", ".", "..", "a.b", "a.b.c.d", &format!("{token}.")] {
            assert_eq!(
                check(bad, &f.keys).unwrap_err().check(),
                "malformed",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn actor_nesting_is_rfc8693_current_actor_outermost() {
        let chain = vec![
            "spiffe://td/agent/a".to_string(),
            "spiffe://td/agent/b".to_string(),
        ];
        let act = Actor::from_chain(&chain);
        assert_eq!(
            serde_json::to_value(&act).unwrap(),
            json!({"sub": "spiffe://td/agent/b", "act": {"sub": "spiffe://td/agent/a"}})
        );
        assert_eq!(act.current(), "spiffe://td/agent/b");
        assert_eq!(act.depth(), 2);
        assert_eq!(act.chain(), chain);
        assert_eq!(Actor::from_chain(&[]).current(), "");
    }

    #[test]
    fn claims_give_the_decision_record() {
        let record = claims().record();
        assert_eq!(record.subject, "alice@example.com");
        assert_eq!(record.actors, vec![AGENT.to_string()]);
    }

    #[test]
    fn the_thumbprint_is_unpadded_base64url_sha256() {
        assert_eq!(
            thumbprint(b""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn the_public_jwk_is_an_ec_p256_signing_key() {
        let f = fixture();
        let jwk = serde_json::to_value(f.key.public_jwk()).unwrap();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["kid"], "k1");
        assert_eq!(jwk["x"].as_str().unwrap().len(), 43);
        assert_eq!(jwk["y"].as_str().unwrap().len(), 43);
        assert!(format!("{:?}", f.key).contains("k1"));
    }

    #[test]
    fn key_sets_refuse_foreign_or_broken_keys() {
        let good = fixture().key.public_jwk();
        let mut wrong_curve = good.clone();
        wrong_curve.crv = "P-384".into();
        let mut short = good.clone();
        short.x = "AAAA".into();
        let mut anonymous = good.clone();
        anonymous.kid = String::new();
        for bad in [
            vec![wrong_curve],
            vec![short],
            vec![anonymous],
            vec![good.clone(), good.clone()],
        ] {
            assert_eq!(KeySet::from_jwks(&bad).unwrap_err().check(), "key");
        }
        let set = KeySet::from_jwks(&[good]).unwrap();
        assert!(set.contains("k1") && set.len() == 1);
    }

    #[test]
    fn chain_headers_round_trip_oldest_first() {
        let chain = vec![
            "spiffe://td/agent/a".to_string(),
            "spiffe://td/agent/b".to_string(),
        ];
        let header = format_chain(&chain);
        assert_eq!(header, "spiffe://td/agent/a,spiffe://td/agent/b");
        assert_eq!(parse_chain(&header).unwrap(), chain);
        assert_eq!(
            parse_chain("spiffe://td/agent/a , spiffe://td/agent/b").unwrap(),
            chain
        );
    }

    #[test]
    fn chain_headers_refuse_empty_entries_non_spiffe_ids_and_long_chains() {
        for bad in [
            "",
            ",",
            "spiffe://td/a,",
            "https://td/a",
            "spiffe://",
            "spiffe://td/a b",
        ] {
            assert_eq!(
                parse_chain(bad).unwrap_err().check(),
                "malformed",
                "{bad:?}"
            );
        }
        let long = format_chain(&vec!["spiffe://td/a".to_string(); MAX_CHAIN + 1]);
        assert_eq!(
            parse_chain(&long),
            Err(DelegationError::ChainTooLong(MAX_CHAIN + 1))
        );
    }
}
