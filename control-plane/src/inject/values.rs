//! Value syntaxes the injector's configuration file and the pod annotations share: TCP ports,
//! CIDRs and Kubernetes resource quantities. Errors say what was expected; the caller names the
//! key or annotation.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A TCP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// The sidecar's admin listener (`/metrics`, `/healthz`, `/readyz`): never redirected inbound,
    /// so kubelet probes and Prometheus reach it.
    pub const ADMIN: Port = Port(15000);
    /// The sidecar's outbound listener, the REDIRECT target of the pod's outbound TCP.
    pub const OUTBOUND: Port = Port(15001);
    /// The sidecar's inbound mTLS listener, the REDIRECT target of the pod's inbound TCP.
    pub const INBOUND: Port = Port(15006);
    /// The ports the sidecar listens on; an application may not use them.
    pub const SIDECAR: [Port; 3] = [Port::ADMIN, Port::OUTBOUND, Port::INBOUND];

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }

    /// A port from a number Kubernetes gave (`containerPort`), refusing 0 and above 65535.
    pub fn from_i64(n: i64) -> Option<Self> {
        u16::try_from(n).ok().filter(|&p| p != 0).map(Port)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Port {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .map(Port)
            .ok_or_else(|| format!("{s:?} is not a port (1 to 65535)"))
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        i64::try_from(n)
            .ok()
            .and_then(Port::from_i64)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a port (1 to 65535)")))
    }
}

/// An IPv4 or IPv6 network, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether it is an IPv6 network.
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// Whether it covers every address of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{s:?}: the prefix length must be at most {max}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated list (`8080,9090`; spaces around items ignored; empty items refused).
pub fn parse_list<T: FromStr<Err = String>>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(|item| {
            if item.trim().is_empty() {
                Err(format!(
                    "{s:?} has an empty item (separate items with single commas)"
                ))
            } else {
                item.parse()
            }
        })
        .collect()
}

/// Joins items with commas, the form `mandate-proxy init-iptables` takes lists in.
pub fn join_list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A Kubernetes resource quantity (`100m`, `128Mi`, `1.5`, `2e3`), kept as written and as a number
/// for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    value: f64,
}

impl Quantity {
    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its value in base units (cores, bytes).
    pub fn value(&self) -> f64 {
        self.value
    }
}

impl FromStr for Quantity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)");
        let digits_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(digits_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let number: f64 = number.parse().map_err(|_| bad())?;
        let scale = match suffix {
            "" => 1.0,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            exp if exp.starts_with(['e', 'E']) => {
                let e: i32 = exp[1..].parse().map_err(|_| bad())?;
                10f64.powi(e)
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            text: s.to_owned(),
            value: number * scale,
        })
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// YAML gives `1` as a number and `100m` as a string; both are quantities.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!("8080".parse::<Port>().unwrap().get(), 8080);
        assert_eq!(" 443 ".parse::<Port>().unwrap().get(), 443);
        for bad in ["0", "65536", "-1", "http", ""] {
            assert!(bad.parse::<Port>().is_err(), "{bad:?}");
        }
        assert_eq!(Port::from_i64(0), None);
        assert_eq!(Port::from_i64(70000), None);
    }

    #[test]
    fn lists_refuse_empty_items_and_name_the_bad_one() {
        assert_eq!(
            parse_list::<Port>("8080, 9090").unwrap(),
            vec![Port(8080), Port(9090)]
        );
        assert!(
            parse_list::<Port>("8080,,9090")
                .unwrap_err()
                .contains("empty item")
        );
        assert!(parse_list::<Port>("").unwrap_err().contains("empty item"));
        assert!(parse_list::<Port>("8080,x").unwrap_err().contains("\"x\""));
        assert_eq!(join_list(&[Port(1), Port(2)]), "1,2");
    }

    #[test]
    fn cidrs_of_both_families() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().is_everything());
        assert!("fd00::/8".parse::<Cidr>().unwrap().is_ipv6());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "example.com/8",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quantities_in_kubernetes_notation() {
        let q = |s: &str| s.parse::<Quantity>().unwrap().value();
        assert_eq!(q("100m"), 0.1);
        assert_eq!(q("2"), 2.0);
        assert_eq!(q("0.5"), 0.5);
        assert_eq!(q("128Mi"), 128.0 * 1024.0 * 1024.0);
        assert_eq!(q("1G"), 1e9);
        assert_eq!(q("2e3"), 2000.0);
        for bad in ["", "m", "1.2.3", "12 Mi", "1MB", "-1", "1e"] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad:?}");
        }
    }
}
