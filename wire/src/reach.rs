//! How callers reach a workload through the mesh: the addresses they call it by, where its sidecar
//! accepts mTLS, and how the bytes are carried. Registered with the workload; every managed sidecar
//! builds its routes from it.

use serde::{Deserialize, Serialize};

/// Most addresses one workload may be reached by.
pub const MAX_ADDRESSES: usize = 32;
/// Longest `HOST:PORT` address.
pub const MAX_ADDRESS_LEN: usize = 260;

/// How the bytes of a meshed destination are carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    /// HTTP/1.1 or HTTP/2, proxied request by request.
    #[default]
    Http,
    /// Opaque bytes, decided once per connection.
    Tcp,
}

impl RouteProtocol {
    /// The lowercase word used on the command line and the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// How callers reach a workload through the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reach {
    /// `HOST:PORT` addresses callers use for it (DNS names or IPs), e.g. `tool:8080`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `HOST:PORT` where its sidecar accepts mTLS, e.g. `tool:15006`. None: the called address
    /// itself, for workloads whose inbound TCP is redirected to their sidecar (init-iptables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<String>,
    /// HTTP (the default) or opaque TCP.
    #[serde(default)]
    pub protocol: RouteProtocol,
}

/// What is wrong with a [`Reach`]: the field at fault (`addresses[1]`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ReachError {
    /// The field at fault, relative to the reach object.
    pub field: String,
    /// What is wrong and what to give instead.
    pub message: String,
}

impl Reach {
    /// Whether it says nothing: the workload is not reachable through the mesh by address.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.inbound.is_none() && self.protocol == RouteProtocol::Http
    }

    /// Checks every address is `HOST:PORT` and none repeats; an inbound address needs addresses.
    pub fn validate(&self) -> Result<(), ReachError> {
        let err = |field: String, message: String| ReachError { field, message };
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(err(
                "addresses".into(),
                format!("at most {MAX_ADDRESSES} addresses"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, address) in self.addresses.iter().enumerate() {
            let parsed = host_port(address).map_err(|m| err(format!("addresses[{i}]"), m))?;
            if !seen.insert(parsed) {
                return Err(err(
                    format!("addresses[{i}]"),
                    format!("{address:?} is given twice"),
                ));
            }
        }
        if let Some(inbound) = &self.inbound {
            host_port(inbound).map_err(|m| err("inbound".into(), m))?;
            if self.addresses.is_empty() {
                return Err(err(
                    "inbound".into(),
                    "an inbound address needs at least one address callers use".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Parses a `HOST:PORT` address (IPv6 in brackets; host lowercased) that must name its port.
pub fn host_port(address: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("{address:?} is not HOST:PORT: {why}");
    if address.len() > MAX_ADDRESS_LEN {
        return Err(bad("too long"));
    }
    let (host, port) = split_host_port(address, 0).map_err(bad)?;
    if port == 0 {
        return Err(bad("the port is missing"));
    }
    let is_name = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if !is_name && host.parse::<std::net::IpAddr>().is_err() {
        return Err(bad("the host is neither a DNS name nor an IP address"));
    }
    Ok((host, port))
}

/// Splits `host[:port]` (IPv6 in brackets), lowercasing the host; `default_port` when none is
/// given (0: none was given and none is assumed).
pub fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err("unexpected text after ']'"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("empty host");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) => return Err("port 0"),
            Ok(p) => p,
            Err(_) => return Err("port is not a number 1-65535"),
        },
        None => default_port,
    };
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(addresses: &[&str], inbound: Option<&str>) -> Reach {
        Reach {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            inbound: inbound.map(str::to_owned),
            protocol: RouteProtocol::Http,
        }
    }

    #[test]
    fn names_and_ips_with_ports_are_addresses() {
        assert_eq!(host_port("Tool:8080"), Ok(("tool".into(), 8080)));
        assert_eq!(
            host_port("tool.tools.svc.cluster.local:80"),
            Ok(("tool.tools.svc.cluster.local".into(), 80))
        );
        assert_eq!(host_port("10.0.0.3:5432"), Ok(("10.0.0.3".into(), 5432)));
        assert_eq!(host_port("[fd00::3]:443"), Ok(("fd00::3".into(), 443)));
        reach(&["tool:8080", "10.0.0.3:8080"], Some("tool:15006"))
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_reach_names_the_field() {
        for (r, field, says) in [
            (reach(&["tool"], None), "addresses[0]", "port is missing"),
            (
                reach(&["tool:8080", "to_ol:1"], None),
                "addresses[1]",
                "neither",
            ),
            (reach(&["tool:99999"], None), "addresses[0]", "1-65535"),
            (reach(&["tool:1", "TOOL:1"], None), "addresses[1]", "twice"),
            (reach(&["tool:1"], Some("x")), "inbound", "port is missing"),
            (reach(&[], Some("x:1")), "inbound", "needs at least one"),
        ] {
            let e = r.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn splitting_keeps_the_default_port_only_when_none_is_given() {
        assert_eq!(split_host_port("[::1]:8080", 80), Ok(("::1".into(), 8080)));
        assert_eq!(split_host_port("[::1]", 443), Ok(("::1".into(), 443)));
        assert!(split_host_port(":80", 80).is_err());
        assert!(split_host_port("a:0", 80).is_err());
    }

    #[test]
    fn an_empty_reach_is_left_out_and_read_back_as_empty() {
        let r: Reach = serde_json::from_str("{}").unwrap();
        assert!(r.is_empty());
        let e = serde_json::from_str::<Reach>(r#"{"adresses":[]}"#).unwrap_err();
        assert!(e.to_string().contains("adresses"), "{e}");
    }
}
