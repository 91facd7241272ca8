//! SPIFFE IDs and trust domains, parsed and validated per the SPIFFE ID specification.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID the specification allows, in bytes.
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or has characters outside `[a-z0-9._-]`.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// A path segment is empty, `.`/`..`, or has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "invalid SPIFFE ID path {0:?}: segments must be non-empty and use letters, digits, '.', '-' and '_'"
    )]
    Path(String),
    /// Longer than the 2048 bytes the specification allows.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A SPIFFE trust domain such as `mandate.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain as a string, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID (`spiffe://<td>`), used as the CA certificate's URI SAN.
    pub fn id_uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(SpiffeIdError::TrustDomain(s.to_owned()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a workload is, read from the first path segment of its SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `spiffe://<td>/agent/<name>`
    Agent,
    /// `spiffe://<td>/service/<name>`
    Service,
    /// `spiffe://<td>/control-plane`
    ControlPlane,
    /// Any other path: valid SPIFFE, but not one of Mandate's conventions.
    Other,
}

impl WorkloadKind {
    /// The lowercase word used in policy input and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Service => "service",
            Self::ControlPlane => "control-plane",
            Self::Other => "other",
        }
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path (leading `/`) starts in `uri`; equals `uri.len()` for a bare trust domain.
    path_start: usize,
}

impl SpiffeId {
    /// `spiffe://<td>/agent/<name>`.
    pub fn agent(td: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{td}/agent/{name}").parse()
    }

    /// `spiffe://<td>/service/<name>`.
    pub fn service(td: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{td}/service/{name}").parse()
    }

    /// Parses `agent/NAME`, `service/NAME` or a full `spiffe://` URI, in the given trust domain.
    pub fn from_shorthand(td: &TrustDomain, s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with("spiffe://") {
            return s.parse();
        }
        format!("spiffe://{td}/{}", s.trim_start_matches('/')).parse()
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain part (no scheme).
    pub fn trust_domain_str(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_start]
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, with its leading `/` (empty for a bare trust domain ID).
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The workload kind by Mandate's path conventions.
    pub fn kind(&self) -> WorkloadKind {
        let mut segments = self.path().trim_start_matches('/').split('/');
        match (segments.next(), segments.next(), segments.next()) {
            (Some("agent"), Some(_), None) => WorkloadKind::Agent,
            (Some("service"), Some(_), None) => WorkloadKind::Service,
            (Some("control-plane"), None, None) => WorkloadKind::ControlPlane,
            _ => WorkloadKind::Other,
        }
    }

    /// The workload name: the last path segment for agents and services, the whole path otherwise.
    pub fn name(&self) -> &str {
        match self.kind() {
            WorkloadKind::Agent | WorkloadKind::Service => {
                self.path().rsplit('/').next().unwrap_or_default()
            }
            _ => self.path().trim_start_matches('/'),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // Rejects userinfo, ports, query and fragment too: none of '@', ':', '?', '#' pass.
        td.parse::<TrustDomain>()?;
        if !path.is_empty() {
            let valid = path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if !valid {
                return Err(SpiffeIdError::Path(path.to_owned()));
            }
        }
        Ok(Self {
            uri: s.to_owned(),
            path_start: "spiffe://".len() + td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        "mandate.local".parse().unwrap()
    }

    #[test]
    fn agent_and_service_ids_round_trip_with_kind_and_name() {
        let a = SpiffeId::agent(&td(), "research").unwrap();
        assert_eq!(a.as_str(), "spiffe://mandate.local/agent/research");
        assert_eq!(a.kind(), WorkloadKind::Agent);
        assert_eq!(a.name(), "research");
        assert_eq!(a.trust_domain_str(), "mandate.local");
        assert!(a.is_member_of(&td()));
        let s: SpiffeId = "spiffe://mandate.local/service/github".parse().unwrap();
        assert_eq!((s.kind(), s.name()), (WorkloadKind::Service, "github"));
        let cp: SpiffeId = "spiffe://mandate.local/control-plane".parse().unwrap();
        assert_eq!(cp.kind(), WorkloadKind::ControlPlane);
    }

    #[test]
    fn shorthand_fills_in_the_trust_domain() {
        let id = SpiffeId::from_shorthand(&td(), "service/db").unwrap();
        assert_eq!(id.as_str(), "spiffe://mandate.local/service/db");
        let full = SpiffeId::from_shorthand(&td(), "spiffe://other.org/agent/x").unwrap();
        assert_eq!(full.trust_domain_str(), "other.org");
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_reason() {
        for (input, want) in [
            ("https://mandate.local/agent/a", "must start with spiffe://"),
            ("spiffe://Mandate.local/agent/a", "invalid trust domain"),
            ("spiffe:///agent/a", "invalid trust domain"),
            ("spiffe://td:443/agent/a", "invalid trust domain"),
            ("spiffe://user@td/agent/a", "invalid trust domain"),
            ("spiffe://td/agent//a", "invalid SPIFFE ID path"),
            ("spiffe://td/agent/../a", "invalid SPIFFE ID path"),
            ("spiffe://td/agent/a?x=1", "invalid SPIFFE ID path"),
            ("spiffe://td/agent/a/", "invalid SPIFFE ID path"),
        ] {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }
}
