//! Routes: which destinations are in the mesh, where their sidecar listens, and who it must be.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use mandate_identity::SpiffeId;
use serde::Serialize;

/// Why a `--route` value does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No `=` between destination and address.
    #[error(
        "route {0:?} must look like HOST[:PORT]=ADDR,id=SPIFFE_ID[,protocol=tcp][,listen=ADDR]"
    )]
    Shape(String),
    /// Destination host or port unusable.
    #[error("route {route:?}: bad destination {dest:?}: {why}")]
    Destination {
        /// The whole route value.
        route: String,
        /// The destination part.
        dest: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// ADDR or listen= is not an IP:PORT socket address.
    #[error("route {route:?}: {field} {value:?} is not an IP:PORT address")]
    Addr {
        /// The whole route value.
        route: String,
        /// Which field.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// `id=` is missing or not a SPIFFE ID.
    #[error("route {route:?}: id= must name the SPIFFE ID the peer presents: {why}")]
    Id {
        /// The whole route value.
        route: String,
        /// What is wrong.
        why: String,
    },
    /// An option this version does not know.
    #[error("route {route:?}: unknown option {option:?} (known: id, protocol, listen)")]
    UnknownOption {
        /// The whole route value.
        route: String,
        /// The option.
        option: String,
    },
    /// `protocol=` other than http or tcp, or `listen=` on an HTTP route.
    #[error("route {route:?}: {why}")]
    Protocol {
        /// The whole route value.
        route: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Two routes for one destination, or one peer address claimed by two identities.
    #[error("{0}")]
    Conflict(String),
}

pub use mandate_wire::reach::{RouteProtocol, split_host_port};

/// One meshed destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Destination host as the agent addresses it (lowercase).
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// The peer sidecar's inbound listener.
    pub addr: SocketAddr,
    /// The identity the peer must present.
    #[serde(serialize_with = "crate::routes::serialize_display")]
    pub id: SpiffeId,
    /// HTTP or opaque TCP.
    pub protocol: RouteProtocol,
    /// TCP routes only: a local plain listener that tunnels to this route.
    pub listen: Option<SocketAddr>,
    /// `host:port` as a URI authority, built once: it keys the upstream connection pool.
    #[serde(skip)]
    pub authority: http::uri::Authority,
}

pub(crate) fn serialize_display<S: serde::Serializer, T: fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Route {
    /// A route to `id`'s sidecar at `addr` for calls to `host:port` (host lowercase, as
    /// [`split_host_port`] gives it).
    pub fn new(
        host: String,
        port: u16,
        addr: SocketAddr,
        id: SpiffeId,
        protocol: RouteProtocol,
    ) -> Result<Self, &'static str> {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
        .parse()
        .map_err(|_| "not a valid host name")?;
        Ok(Route {
            authority,
            host,
            port,
            addr,
            id,
            protocol,
            listen: None,
        })
    }

    /// `host:port`, the key the route is found by.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The route as a policy destination.
    pub fn destination(&self) -> crate::input::Destination<'_> {
        crate::input::Destination {
            host: &self.host,
            port: self.port,
            id: Some(&self.id),
        }
    }
}

impl FromStr for Route {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (dest, rest) = s
            .split_once('=')
            .ok_or_else(|| RouteError::Shape(s.to_owned()))?;
        let (host, port) = split_host_port(dest, 80).map_err(|why| RouteError::Destination {
            route: s.to_owned(),
            dest: dest.to_owned(),
            why,
        })?;
        let mut parts = rest.split(',');
        let addr_str = parts.next().unwrap_or_default();
        let addr = parse_addr(s, "ADDR", addr_str)?;
        let (mut id, mut protocol, mut listen) = (None, RouteProtocol::Http, None);
        for opt in parts {
            match opt.split_once('=') {
                Some(("id", v)) => {
                    id = Some(v.parse::<SpiffeId>().map_err(|e| RouteError::Id {
                        route: s.to_owned(),
                        why: e.to_string(),
                    })?)
                }
                Some(("protocol", "tcp")) => protocol = RouteProtocol::Tcp,
                Some(("protocol", "http")) => protocol = RouteProtocol::Http,
                Some(("protocol", _)) => {
                    return Err(RouteError::Protocol {
                        route: s.to_owned(),
                        why: "protocol= must be http or tcp",
                    });
                }
                Some(("listen", v)) => listen = Some(parse_addr(s, "listen", v)?),
                _ => {
                    return Err(RouteError::UnknownOption {
                        route: s.to_owned(),
                        option: opt.to_owned(),
                    });
                }
            }
        }
        let id = id.ok_or_else(|| RouteError::Id {
            route: s.to_owned(),
            why: "missing".to_owned(),
        })?;
        if listen.is_some() && protocol != RouteProtocol::Tcp {
            return Err(RouteError::Protocol {
                route: s.to_owned(),
                why: "listen= needs protocol=tcp (HTTP routes are reached through the outbound listener)",
            });
        }
        let route =
            Route::new(host, port, addr, id, protocol).map_err(|why| RouteError::Destination {
                route: s.to_owned(),
                dest: dest.to_owned(),
                why,
            })?;
        Ok(Route { listen, ..route })
    }
}

fn parse_addr(route: &str, field: &'static str, value: &str) -> Result<SocketAddr, RouteError> {
    value.parse().map_err(|_| RouteError::Addr {
        route: route.to_owned(),
        field,
        value: value.to_owned(),
    })
}

/// All routes, found by destination host and port.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Keyed by lowercase host so lookups borrow the request's host instead of allocating a key.
    by_host: HashMap<String, Vec<Arc<Route>>>,
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table, refusing duplicate destinations and one peer address with two identities.
    pub fn new(routes: Vec<Route>) -> Result<Self, RouteError> {
        let mut table = RouteTable::default();
        let mut ids_by_addr: HashMap<SocketAddr, &SpiffeId> = HashMap::new();
        for r in &routes {
            if let Some(prev) = ids_by_addr.insert(r.addr, &r.id)
                && prev != &r.id
            {
                return Err(RouteError::Conflict(format!(
                    "peer {} is routed with two identities ({prev} and {}); one sidecar has one identity",
                    r.addr, r.id
                )));
            }
        }
        for r in routes {
            if table.find(&r.host, r.port).is_some() {
                return Err(RouteError::Conflict(format!(
                    "two routes for {}; give each destination one route",
                    r.authority()
                )));
            }
            table.push(r);
        }
        Ok(table)
    }

    /// This table plus `more` routes, each kept only if it claims no destination already routed
    /// (the given routes win; `--route` flags are given first). A skipped route is logged.
    pub fn extended(&self, more: Vec<Route>) -> RouteTable {
        let mut table = RouteTable {
            by_host: self.by_host.clone(),
            routes: self.routes.clone(),
        };
        for r in more {
            if let Some(taken) = table.find(&r.host, r.port) {
                if taken.id != r.id {
                    tracing::warn!(
                        destination = %r.authority(),
                        kept = %taken.id,
                        skipped = %r.id,
                        "two workloads claim one address; keeping the first"
                    );
                }
                continue;
            }
            table.push(r);
        }
        table
    }

    fn push(&mut self, route: Route) {
        let route = Arc::new(route);
        self.by_host
            .entry(route.host.clone())
            .or_default()
            .push(route.clone());
        self.routes.push(route);
    }

    /// The route for a destination the agent named (host is matched case-insensitively).
    pub fn find(&self, host: &str, port: u16) -> Option<&Arc<Route>> {
        let candidates = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        }?;
        candidates.iter().find(|r| r.port == port)
    }

    /// The route for a transparently redirected connection's original destination.
    pub fn find_by_ip(&self, dest: SocketAddr) -> Option<&Arc<Route>> {
        self.find(&dest.ip().to_string(), dest.port())
    }

    /// Every route, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_route_with_default_port() {
        let r: Route = "Tool=127.0.0.1:15006,id=spiffe://mandate.local/service/tool"
            .parse()
            .unwrap();
        assert_eq!((r.host.as_str(), r.port), ("tool", 80));
        assert_eq!(r.addr, "127.0.0.1:15006".parse().unwrap());
        assert_eq!(r.protocol, RouteProtocol::Http);
        assert_eq!(r.listen, None);
    }

    #[test]
    fn tcp_route_with_local_listener() {
        let r: Route =
            "db:5432=10.0.0.2:15006,id=spiffe://td/service/db,protocol=tcp,listen=127.0.0.1:15432"
                .parse()
                .unwrap();
        assert_eq!(r.protocol, RouteProtocol::Tcp);
        assert_eq!(r.listen, Some("127.0.0.1:15432".parse().unwrap()));
        assert_eq!(r.authority(), "db:5432");
    }

    #[test]
    fn bad_routes_name_what_is_wrong() {
        for (input, want) in [
            ("tool", "must look like"),
            (
                "tool:99999=127.0.0.1:1,id=spiffe://td/a",
                "port is not a number",
            ),
            ("tool=localhost:1,id=spiffe://td/a", "ADDR \"localhost:1\""),
            ("tool=127.0.0.1:1", "missing"),
            ("tool=127.0.0.1:1,id=http://x", "must start with spiffe://"),
            (
                "tool=127.0.0.1:1,id=spiffe://td/a,colour=red",
                "unknown option",
            ),
            (
                "tool=127.0.0.1:1,id=spiffe://td/a,protocol=udp",
                "http or tcp",
            ),
            (
                "tool=127.0.0.1:1,id=spiffe://td/a,listen=127.0.0.1:2",
                "needs protocol=tcp",
            ),
        ] {
            let err = input.parse::<Route>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn table_finds_by_authority_and_ip_and_refuses_conflicts() {
        let routes: Vec<Route> = [
            "tool:8080=127.0.0.1:1,id=spiffe://td/service/tool",
            "10.1.2.3:5432=127.0.0.1:2,id=spiffe://td/service/db,protocol=tcp",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let table = RouteTable::new(routes.clone()).unwrap();
        assert_eq!(table.find("TOOL", 8080).unwrap().host, "tool");
        assert!(table.find("tool", 80).is_none());
        assert_eq!(
            table
                .find_by_ip("10.1.2.3:5432".parse().unwrap())
                .unwrap()
                .port,
            5432
        );

        let mut dup = routes.clone();
        dup.push(
            "tool:8080=127.0.0.1:3,id=spiffe://td/service/x"
                .parse()
                .unwrap(),
        );
        assert!(
            RouteTable::new(dup)
                .unwrap_err()
                .to_string()
                .contains("two routes")
        );
        let mut two_ids = routes;
        two_ids.push(
            "other=127.0.0.1:1,id=spiffe://td/service/other"
                .parse()
                .unwrap(),
        );
        assert!(
            RouteTable::new(two_ids)
                .unwrap_err()
                .to_string()
                .contains("two identities")
        );
    }
}
