//! The `mandate.dev/*` pod annotations: opting in, the per-pod settings, and the marker the
//! injector leaves. Any other `mandate.dev/` annotation is refused, so a typo never silently
//! drops a setting.

use std::collections::BTreeMap;

use super::values::{Cidr, Port, parse_list};

/// `"true"` asks for injection; `"false"` or absence leaves the pod alone.
pub const INJECT: &str = "mandate.dev/inject";
/// Set by the injector on every pod it injected (value [`INJECTED`]); such a pod is left alone.
pub const STATUS: &str = "mandate.dev/status";
/// The value of [`STATUS`].
pub const INJECTED: &str = "injected";
/// The application port inbound calls are forwarded to (default: the first declared TCP port).
pub const APP_PORT: &str = "mandate.dev/app-port";
/// The Secret holding the join token under key [`JOIN_TOKEN_KEY`] (default:
/// `mandate-join-<service account>`).
pub const JOIN_TOKEN_SECRET: &str = "mandate.dev/join-token-secret";
/// Inbound ports not redirected to the sidecar (plaintext, no policy).
pub const EXCLUDE_INBOUND_PORTS: &str = "mandate.dev/exclude-inbound-ports";
/// Outbound destination ports not redirected to the sidecar.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "mandate.dev/exclude-outbound-ports";
/// Outbound destination networks not redirected to the sidecar.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "mandate.dev/exclude-outbound-cidrs";
/// The key of the join token in its Secret.
pub const JOIN_TOKEN_KEY: &str = "join-token";

/// Every annotation under `mandate.dev/` the injector knows.
const KNOWN: [&str; 7] = [
    INJECT,
    STATUS,
    APP_PORT,
    JOIN_TOKEN_SECRET,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
];

/// An annotation with a value the injector cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {why}")]
pub struct AnnotationError {
    /// The annotation at fault.
    pub annotation: String,
    /// What is wrong and what to do.
    pub why: String,
}

impl AnnotationError {
    fn new(annotation: &str, why: impl Into<String>) -> Self {
        Self {
            annotation: annotation.to_owned(),
            why: why.into(),
        }
    }
}

/// Whether the pod asks for injection: `"true"` yes, `"false"` or absent no, anything else is an
/// error (a pod meant to be protected must not start unprotected because of a typo).
pub fn wants_injection(annotations: &BTreeMap<String, String>) -> Result<bool, AnnotationError> {
    match annotations.get(INJECT).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(AnnotationError::new(
            INJECT,
            format!("{other:?} must be \"true\" or \"false\""),
        )),
    }
}

/// The per-pod settings, from the annotations of a pod that asked for injection.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodOptions {
    /// [`APP_PORT`].
    pub app_port: Option<Port>,
    /// [`JOIN_TOKEN_SECRET`].
    pub join_token_secret: Option<String>,
    /// [`EXCLUDE_INBOUND_PORTS`].
    pub exclude_inbound_ports: Vec<Port>,
    /// [`EXCLUDE_OUTBOUND_PORTS`].
    pub exclude_outbound_ports: Vec<Port>,
    /// [`EXCLUDE_OUTBOUND_CIDRS`].
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl PodOptions {
    /// Reads and checks every `mandate.dev/` annotation; the error names the first bad one.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Self, AnnotationError> {
        if let Some(unknown) = annotations
            .keys()
            .find(|k| k.starts_with("mandate.dev/") && !KNOWN.contains(&k.as_str()))
        {
            return Err(AnnotationError::new(
                unknown,
                format!(
                    "unknown annotation; the injector reads {}",
                    KNOWN.join(", ")
                ),
            ));
        }
        let get = |name: &str| annotations.get(name).map(String::as_str);
        let app_port = get(APP_PORT)
            .map(|v| v.parse::<Port>())
            .transpose()
            .map_err(|why| AnnotationError::new(APP_PORT, why))?;
        let join_token_secret = get(JOIN_TOKEN_SECRET)
            .map(|v| check_secret_name(v).map(|()| v.to_owned()))
            .transpose()
            .map_err(|why| AnnotationError::new(JOIN_TOKEN_SECRET, why))?;
        Ok(Self {
            app_port,
            join_token_secret,
            exclude_inbound_ports: parse_annotation_list(
                get(EXCLUDE_INBOUND_PORTS),
                EXCLUDE_INBOUND_PORTS,
            )?,
            exclude_outbound_ports: parse_annotation_list(
                get(EXCLUDE_OUTBOUND_PORTS),
                EXCLUDE_OUTBOUND_PORTS,
            )?,
            exclude_outbound_cidrs: parse_annotation_list(
                get(EXCLUDE_OUTBOUND_CIDRS),
                EXCLUDE_OUTBOUND_CIDRS,
            )?,
        })
    }
}

fn parse_annotation_list<T: std::str::FromStr<Err = String>>(
    value: Option<&str>,
    annotation: &str,
) -> Result<Vec<T>, AnnotationError> {
    value
        .map(parse_list)
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|why| AnnotationError::new(annotation, why))
}

/// A Secret name: a DNS subdomain (RFC 1123: lowercase alphanumerics, `-` and `.`, at most 253).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a Secret name (lowercase letters, digits, '-' and '.', at most 253)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_true_asks_for_injection_and_a_typo_is_an_error() {
        assert!(!wants_injection(&annotations(&[])).unwrap());
        assert!(!wants_injection(&annotations(&[(INJECT, "false")])).unwrap());
        assert!(wants_injection(&annotations(&[(INJECT, "true")])).unwrap());
        let err = wants_injection(&annotations(&[(INJECT, "yes")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation mandate.dev/inject: \"yes\" must be \"true\" or \"false\""
        );
    }

    #[test]
    fn every_setting_is_read() {
        let options = PodOptions::parse(&annotations(&[
            (INJECT, "true"),
            (APP_PORT, "8080"),
            (JOIN_TOKEN_SECRET, "research-join"),
            (EXCLUDE_INBOUND_PORTS, "9100, 9101"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
            (EXCLUDE_OUTBOUND_CIDRS, "169.254.169.254/32,fd00::/8"),
            ("prometheus.io/port", "9090"),
        ]))
        .unwrap();
        assert_eq!(options.app_port, "8080".parse().ok());
        assert_eq!(options.join_token_secret.as_deref(), Some("research-join"));
        assert_eq!(options.exclude_inbound_ports.len(), 2);
        assert_eq!(options.exclude_outbound_ports.len(), 1);
        assert_eq!(options.exclude_outbound_cidrs.len(), 2);
        assert_eq!(
            PodOptions::parse(&annotations(&[(INJECT, "true")])).unwrap(),
            PodOptions::default()
        );
    }

    #[test]
    fn errors_name_the_annotation() {
        let err = |pairs: &[(&str, &str)]| PodOptions::parse(&annotations(pairs)).unwrap_err();
        assert_eq!(err(&[(APP_PORT, "http")]).annotation, APP_PORT);
        assert_eq!(err(&[(APP_PORT, "0")]).annotation, APP_PORT);
        assert_eq!(
            err(&[(JOIN_TOKEN_SECRET, "Bad_Name")]).annotation,
            JOIN_TOKEN_SECRET
        );
        assert_eq!(
            err(&[(EXCLUDE_INBOUND_PORTS, "9100,")]).annotation,
            EXCLUDE_INBOUND_PORTS
        );
        assert_eq!(
            err(&[(EXCLUDE_OUTBOUND_PORTS, "99999")]).annotation,
            EXCLUDE_OUTBOUND_PORTS
        );
        assert_eq!(
            err(&[(EXCLUDE_OUTBOUND_CIDRS, "10.0.0.1")]).annotation,
            EXCLUDE_OUTBOUND_CIDRS
        );
        let typo = err(&[("mandate.dev/exclude-inbound-port", "9100")]);
        assert_eq!(typo.annotation, "mandate.dev/exclude-inbound-port");
        assert!(typo.why.contains(EXCLUDE_INBOUND_PORTS));
    }

    #[test]
    fn secret_names_follow_rfc_1123() {
        assert!(check_secret_name("mandate-join-research").is_ok());
        assert!(check_secret_name("a.b-c").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a..b", &"a".repeat(254)] {
            assert!(check_secret_name(bad).is_err(), "{bad:?}");
        }
    }
}
