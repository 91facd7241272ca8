//! W3C Trace Context: every call leaves the sidecar with a `traceparent`, so the decisions of one agent
//! run can be followed across hops. A valid incoming one is passed on untouched; a missing or malformed
//! one starts a new trace (and any `tracestate`, meaningless without its parent, is dropped).

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use ring::rand::{SecureRandom, SystemRandom};

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Makes sure `headers` carry a valid `traceparent`, starting a new trace when they do not.
pub fn ensure_traceparent(headers: &mut HeaderMap) {
    if trace_id(headers).is_some() {
        return;
    }
    headers.remove(&TRACESTATE);
    headers.insert(TRACEPARENT.clone(), new_traceparent());
}

/// The trace id of a valid version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
/// neither id all zeros), as the decision record carries it.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(&TRACEPARENT)?.as_bytes();
    let [version, trace, parent, flags] = split4(value)?;
    let valid = version == b"00"
        && lower_hex(trace, 32)
        && lower_hex(parent, 16)
        && lower_hex(flags, 2)
        && trace.iter().any(|&b| b != b'0')
        && parent.iter().any(|&b| b != b'0');
    valid.then(|| String::from_utf8_lossy(trace).into_owned())
}

fn split4(value: &[u8]) -> Option<[&[u8]; 4]> {
    let mut parts = value.split(|&b| b == b'-');
    let fields = [parts.next()?, parts.next()?, parts.next()?, parts.next()?];
    parts.next().is_none().then_some(fields)
}

fn lower_hex(field: &[u8], len: usize) -> bool {
    field.len() == len && field.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `00-<random trace id>-<random parent id>-00`: not sampled, as the sidecar records no spans itself;
/// a tracer downstream decides.
fn new_traceparent() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut random = [0u8; 24];
    SystemRandom::new()
        .fill(&mut random)
        .expect("the system RNG is available");
    // An all-zero id is invalid; with 128 and 64 random bits this never happens in practice, but
    // setting one bit makes it impossible.
    random[15] |= 1;
    random[23] |= 1;
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, byte) in random.iter().enumerate() {
        let at = if i < 16 { 3 + 2 * i } else { 36 + 2 * (i - 16) };
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0x0f)];
    }
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with(traceparent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", traceparent.parse().unwrap());
        h.insert("tracestate", "vendor=abc".parse().unwrap());
        h
    }

    #[test]
    fn a_valid_traceparent_and_its_tracestate_pass_on_untouched() {
        let mut h = with(VALID);
        ensure_traceparent(&mut h);
        assert_eq!(h["traceparent"], VALID);
        assert_eq!(h["tracestate"], "vendor=abc");
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_new_trace() {
        let malformed = [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ];
        for bad in malformed {
            let mut h = with(bad);
            assert_eq!(trace_id(&h), None, "{bad} is not valid");
            ensure_traceparent(&mut h);
            let fresh = h["traceparent"].to_str().unwrap().to_owned();
            assert_ne!(fresh, bad);
            assert!(trace_id(&h).is_some(), "{fresh} is valid");
            assert!(
                fresh.starts_with("00-") && fresh.ends_with("-00"),
                "{fresh}"
            );
            assert!(
                h.get("tracestate").is_none(),
                "tracestate of a broken parent is dropped"
            );
        }
        let mut h = HeaderMap::new();
        ensure_traceparent(&mut h);
        assert!(trace_id(&h).is_some());
    }

    #[test]
    fn new_traces_are_distinct() {
        let ids: std::collections::HashSet<_> = (0..100).map(|_| new_traceparent()).collect();
        assert_eq!(ids.len(), 100);
    }
}
