//! One-time join tokens: `mjt1.<identity>.<secret>.<ca-pin>`, each part unpadded base64url.
//!
//! The identity is the SPIFFE ID the token was issued for, so the sidecar knows what to ask for in
//! its CSR (the control plane still checks the CSR against the registration). The secret
//! authenticates the sidecar's first CSR; the control plane stores only its SHA-256. The pin is the
//! SHA-256 of the control plane's CA certificate (DER), so a sidecar with no trust bundle yet can
//! still tell the real control plane from an impostor on first contact — the same idea as
//! kubeadm's `--discovery-token-ca-cert-hash`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};

const PREFIX: &str = "mjt1";
const SECRET_LEN: usize = 32;

/// Why a string is not a join token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JoinTokenError {
    /// Not four dot-separated parts starting with `mjt1`.
    #[error(
        "not a Mandate join token (expected mjt1.<identity>.<secret>.<ca-pin>, as printed by `mandate agent register`)"
    )]
    Format,
    /// The identity part is not a SPIFFE ID.
    #[error("join token identity is not a spiffe:// ID")]
    Identity,
    /// A part is not base64url of the right length.
    #[error("join token {part} is malformed: expected {len} bytes of unpadded base64url")]
    Part {
        /// `secret` or `ca pin`.
        part: &'static str,
        /// Expected decoded length.
        len: usize,
    },
}

/// A parsed join token. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    spiffe_id: String,
    secret: [u8; SECRET_LEN],
    ca_pin: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("spiffe_id", &self.spiffe_id)
            .field("secret", &"<redacted>")
            .field("ca_pin", &hex(&self.ca_pin))
            .finish()
    }
}

impl JoinToken {
    /// A fresh token for `spiffe_id` pinning the CA certificate `ca_der`, with a secret from the
    /// system RNG.
    pub fn generate(spiffe_id: &str, ca_der: &[u8]) -> Self {
        use ring::rand::{SecureRandom, SystemRandom};
        let mut secret = [0u8; SECRET_LEN];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the system RNG is available");
        Self {
            spiffe_id: spiffe_id.to_owned(),
            secret,
            ca_pin: ca_pin(ca_der),
        }
    }

    /// Parses the printed form.
    pub fn parse(s: &str) -> Result<Self, JoinTokenError> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(pin), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(JoinTokenError::Format);
        };
        let spiffe_id = URL_SAFE_NO_PAD
            .decode(id)
            .ok()
            .and_then(|id| String::from_utf8(id).ok())
            .filter(|id| id.starts_with("spiffe://"))
            .ok_or(JoinTokenError::Identity)?;
        Ok(Self {
            spiffe_id,
            secret: decode_exact(secret, "secret")?,
            ca_pin: decode_exact(pin, "ca pin")?,
        })
    }

    /// The printed form. Secret: show it once, to the operator who registered the workload.
    pub fn expose(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            URL_SAFE_NO_PAD.encode(&self.spiffe_id),
            URL_SAFE_NO_PAD.encode(self.secret),
            URL_SAFE_NO_PAD.encode(self.ca_pin)
        )
    }

    /// The SPIFFE ID the token was issued for.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// What the control plane stores and looks the token up by: hex SHA-256 of the secret.
    pub fn secret_hash(&self) -> String {
        hex(digest(&SHA256, &self.secret).as_ref())
    }

    /// Whether `ca_der` is the CA certificate this token pins.
    pub fn pins(&self, ca_der: &[u8]) -> bool {
        // The pin is public (a hash of a public certificate): no constant-time compare needed.
        ca_pin(ca_der) == self.ca_pin
    }
}

fn ca_pin(ca_der: &[u8]) -> [u8; 32] {
    digest(&SHA256, ca_der)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn decode_exact<const N: usize>(part: &str, name: &'static str) -> Result<[u8; N], JoinTokenError> {
    let error = JoinTokenError::Part { part: name, len: N };
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| error.clone())?
        .try_into()
        .map_err(|_| error)
}

/// Lowercase hex, as the store and logs show hashes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://td/agent/a";

    #[test]
    fn a_token_round_trips_through_its_printed_form_and_pins_its_ca() {
        let token = JoinToken::generate(ID, b"ca certificate");
        let printed = token.expose();
        assert!(printed.starts_with("mjt1."));
        let parsed = JoinToken::parse(&printed).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.spiffe_id(), ID);
        assert!(parsed.pins(b"ca certificate"));
        assert!(!parsed.pins(b"another ca"));
        assert_eq!(parsed.secret_hash().len(), 64);
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let token = JoinToken::generate(ID, b"ca");
        let secret = token.expose().split('.').nth(2).unwrap().to_owned();
        assert!(!format!("{token:?}").contains(&secret));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        assert_eq!(JoinToken::parse("hello"), Err(JoinTokenError::Format));
        assert_eq!(JoinToken::parse("mjt2.a.b.c"), Err(JoinTokenError::Format));
        assert_eq!(
            JoinToken::parse("mjt1.aGVsbG8.a.b"),
            Err(JoinTokenError::Identity)
        );
        let id = URL_SAFE_NO_PAD.encode(ID);
        assert_eq!(
            JoinToken::parse(&format!("mjt1.{id}.short.AAAA")),
            Err(JoinTokenError::Part {
                part: "secret",
                len: 32
            })
        );
        let good = JoinToken::generate(ID, b"ca").expose();
        assert_eq!(
            JoinToken::parse(&format!("{good}x")),
            Err(JoinTokenError::Part {
                part: "ca pin",
                len: 32
            })
        );
    }
}
