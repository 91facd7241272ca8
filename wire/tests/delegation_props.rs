//! Properties of delegation token verification over inputs an attacker controls: whatever the
//! header value, `verify` returns (never panics), and no change to a valid token gets through.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mandate_wire::delegation::{
    self, Actor, Confirmation, DelegationClaims, Expectations, KeySet, MAX_CHAIN, SigningKey,
    format_chain, parse_chain, thumbprint,
};
use proptest::prelude::*;
use serde_json::json;

const TD: &str = "spiffe://example.org";
const CP: &str = "spiffe://example.org/control-plane";
const AGENT: &str = "spiffe://example.org/agent/planner";
const NOW: i64 = 1_800_000_000;

struct Fixture {
    keys: KeySet,
    pkcs8: Vec<u8>,
    token: String,
    thumb: String,
}

/// One key and one valid token for the whole suite: key generation is not what is tested.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (key, pkcs8) = SigningKey::generate("k1".into());
        let thumb = thumbprint(b"leaf");
        let claims = DelegationClaims {
            iss: CP.into(),
            sub: "alice@example.com".into(),
            act: Actor::from_chain(&[AGENT.into()]),
            scope: vec![json!({"host": "tool", "tool": "read_*"})],
            constraints: Some(
                json!({"arguments": {"path": "/reports/*"}})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            grant_id: "g1".into(),
            aud: vec![TD.into()],
            iat: NOW,
            nbf: NOW,
            exp: NOW + 300,
            jti: "j1".into(),
            cnf: Confirmation {
                x5t_s256: thumb.clone(),
            },
            approved_by: "bob@example.com".into(),
            purpose: "reports".into(),
        };
        let token = key.sign(&claims);
        let keys = KeySet::from_jwks(&[key.public_jwk()]).unwrap();
        Fixture {
            keys,
            pkcs8,
            token,
            thumb,
        }
    })
}

fn check(token: &str) -> Result<DelegationClaims, delegation::DelegationError> {
    let f = fixture();
    delegation::verify(
        token,
        &f.keys,
        &Expectations {
            issuer: CP,
            audiences: &[TD],
            presenter_id: AGENT,
            presenter_thumbprint: &f.thumb,
            now: NOW + 1,
            leeway_secs: 30,
        },
    )
}

#[test]
fn the_fixture_token_is_valid() {
    check(&fixture().token).unwrap();
}

proptest! {
    #[test]
    fn arbitrary_strings_are_refused_without_panicking(s in ".*") {
        prop_assert!(check(&s).is_err());
    }

    #[test]
    fn arbitrary_three_part_base64url_is_refused_without_panicking(
        a in "[A-Za-z0-9_-]{0,200}", b in "[A-Za-z0-9_-]{0,400}", c in "[A-Za-z0-9_-]{0,100}",
    ) {
        let token = format!("{a}.{b}.{c}");
        prop_assert!(check(&token).is_err());
    }

    #[test]
    fn any_changed_byte_is_refused(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let token = &fixture().token;
        let mut bytes = token.clone().into_bytes();
        let i = index.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        let mutated = String::from_utf8_lossy(&bytes);
        prop_assert!(check(&mutated).is_err());
    }

    #[test]
    fn any_inserted_or_removed_byte_is_refused(index in any::<prop::sample::Index>(), byte in 0x20u8..0x7f) {
        let token = &fixture().token;
        let i = index.index(token.len());
        let mut inserted = token.clone();
        inserted.insert(i, char::from(byte));
        prop_assert!(check(&inserted).is_err());
        let mut removed = token.clone();
        removed.remove(i);
        prop_assert!(check(&removed).is_err());
    }

    #[test]
    fn any_truncation_is_refused(index in any::<prop::sample::Index>()) {
        let token = &fixture().token;
        prop_assert!(check(&token[..index.index(token.len())]).is_err());
    }

    /// Correctly signed but arbitrary claims: the signature is no licence to panic.
    #[test]
    fn signed_garbage_claims_are_handled(
        payload in prop_oneof![
            any::<i64>().prop_map(|n| json!({"exp": n, "nbf": n, "iss": CP})),
            ".{0,50}".prop_map(|s| json!({"sub": s, "act": {"sub": s}})),
            Just(json!([])),
            Just(json!(null)),
        ],
    ) {
        let f = fixture();
        let header = URL_SAFE_NO_PAD.encode(
            json!({"alg": "ES256", "typ": delegation::TOKEN_TYPE, "kid": "k1"}).to_string(),
        );
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload.to_string()));
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &jsonwebtoken::EncodingKey::from_ec_der(&f.pkcs8),
            jsonwebtoken::Algorithm::ES256,
        )
        .unwrap();
        let token = format!("{message}.{sig}");
        prop_assert_eq!(check(&token).unwrap_err().check(), "malformed");
    }

    #[test]
    fn chain_header_parsing_never_panics(s in ".*") {
        if let Ok(chain) = parse_chain(&s) {
            prop_assert!(!chain.is_empty() && chain.len() <= MAX_CHAIN);
            prop_assert!(chain.iter().all(|id| id.starts_with("spiffe://")));
        }
    }

    #[test]
    fn chain_headers_round_trip(chain in prop::collection::vec("spiffe://[a-z.]{1,20}/[a-z/_-]{1,30}", 1..=MAX_CHAIN)) {
        prop_assert_eq!(parse_chain(&format_chain(&chain)).unwrap(), chain);
    }
}
