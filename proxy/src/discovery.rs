//! Service discovery: the routes in force are the `--route` flags plus, in managed mode, one per
//! address the registry gives a workload (`reach`), with DNS names resolved — and re-resolved
//! every [`REFRESH`], as Envoy's strict DNS does — so an agent calling `http://tool:8080/...`, or
//! `http://<tool-ip>:8080/...` under iptables, reaches the tool's sidecar with its identity checked.
//! The table is swapped whole and read without a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mandate_identity::SpiffeId;
use mandate_wire::reach::host_port;
use mandate_wire::{Registry, RegistryEntry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::routes::{Route, RouteTable};

/// How often names are resolved again while the registry does not change.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Longest wait for one name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The routes in force.
pub struct Routes {
    fixed: RouteTable,
    table: ArcSwap<RouteTable>,
    registry: Mutex<Option<Arc<Registry>>>,
    changed: Notify,
}

impl Routes {
    /// Routes from the `--route` flags alone, until a registry arrives.
    pub fn new(fixed: &RouteTable) -> Self {
        let table = ArcSwap::from_pointee(fixed.extended(Vec::new()));
        Self {
            fixed: fixed.extended(Vec::new()),
            table,
            registry: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Takes a new registry: its routes replace the previous registry's once resolved.
    pub fn set_registry(&self, registry: &Registry) {
        *self.registry.lock().expect("registry lock") = Some(Arc::new(registry.clone()));
        self.changed.notify_one();
    }

    /// Keeps the table current: rebuilt on every registry change and every [`REFRESH`].
    pub async fn keep_resolved(self: Arc<Self>, cancel: CancellationToken) {
        let mut resolver = Resolver::default();
        loop {
            let registry = self.registry.lock().expect("registry lock").clone();
            if let Some(registry) = registry {
                let routes = registry_routes(&registry, &mut resolver).await;
                let table = self.fixed.extended(routes);
                tracing::debug!(routes = table.iter().count(), "routes rebuilt");
                self.table.store(Arc::new(table));
            }
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(REFRESH) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// Resolves `HOST:PORT`, keeping each name's last good answer for when the resolver fails, so a
/// passing DNS outage does not drop routes.
#[derive(Default)]
struct Resolver {
    last_good: HashMap<(String, u16), Vec<SocketAddr>>,
}

impl Resolver {
    async fn resolve(&mut self, host: &str, port: u16) -> Vec<SocketAddr> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return vec![SocketAddr::new(ip, port)];
        }
        let key = (host.to_owned(), port);
        let answer = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match answer {
            Ok(addrs) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                // IPv4 first: one address is dialled, and it should be the common one.
                addrs.sort_by_key(|a| (a.is_ipv6(), *a));
                addrs.dedup();
                self.last_good.insert(key, addrs.clone());
                addrs
            }
            Err(why) => {
                let kept = self.last_good.get(&key).cloned().unwrap_or_default();
                tracing::warn!(host, port, error = %why, kept = kept.len(), "cannot resolve a registered address; keeping its last good answer");
                kept
            }
        }
    }
}

/// One route per registered address (and per address its name resolves to, so a redirected
/// connection is found by its original destination), to the workload's sidecar.
async fn registry_routes(registry: &Registry, resolver: &mut Resolver) -> Vec<Route> {
    let mut routes = Vec::new();
    for (name, entry) in registry.agents.iter().chain(&registry.services) {
        if entry.reach.addresses.is_empty() {
            continue;
        }
        match entry_routes(entry, resolver).await {
            Ok(mut r) => routes.append(&mut r),
            Err(why) => {
                tracing::warn!(workload = %name, error = %why, "registered addresses not routed")
            }
        }
    }
    routes
}

async fn entry_routes(
    entry: &RegistryEntry,
    resolver: &mut Resolver,
) -> Result<Vec<Route>, String> {
    let id: SpiffeId = entry.spiffe_id.parse().map_err(|e| format!("{e}"))?;
    let reach = &entry.reach;
    let inbound = match &reach.inbound {
        Some(address) => {
            let (host, port) = host_port(address)?;
            let addrs = resolver.resolve(&host, port).await;
            Some(
                *addrs
                    .first()
                    .ok_or(format!("inbound {address:?} does not resolve"))?,
            )
        }
        None => None,
    };
    let mut routes = Vec::new();
    for address in &reach.addresses {
        let (host, port) = host_port(address)?;
        let resolved = resolver.resolve(&host, port).await;
        // Without an inbound address the sidecar is reached at the called address itself: its
        // inbound TCP is redirected to it.
        let Some(sidecar) = inbound.or_else(|| resolved.first().copied()) else {
            tracing::warn!(
                address,
                "a registered address does not resolve; not routed for now"
            );
            continue;
        };
        let route = |host: String| {
            Route::new(host, port, sidecar, id.clone(), reach.protocol)
                .map_err(|why| format!("{address:?}: {why}"))
        };
        for ip in resolved.iter().filter(|a| a.ip().to_string() != host) {
            routes.push(route(ip.ip().to_string())?);
        }
        routes.push(route(host)?);
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use mandate_wire::{Reach, RouteProtocol, WorkloadStatus};

    use super::*;

    fn service(addresses: &[&str], inbound: Option<&str>) -> RegistryEntry {
        RegistryEntry {
            spiffe_id: "spiffe://td/service/tool".into(),
            status: WorkloadStatus::Active,
            owner: "o".into(),
            description: String::new(),
            ceiling: vec![],
            autonomous: vec![],
            labels: Default::default(),
            reach: Reach {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                inbound: inbound.map(str::to_owned),
                protocol: RouteProtocol::Http,
            },
        }
    }

    fn registry(entry: RegistryEntry) -> Registry {
        let mut r = Registry::default();
        r.services.insert("tool".into(), entry);
        r
    }

    #[tokio::test]
    async fn an_address_without_inbound_is_dialled_itself() {
        let routes = registry_routes(
            &registry(service(&["10.0.0.3:8080"], None)),
            &mut Resolver::default(),
        )
        .await;
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].authority(), "10.0.0.3:8080");
        assert_eq!(routes[0].addr, "10.0.0.3:8080".parse().unwrap());
        assert_eq!(routes[0].id.as_str(), "spiffe://td/service/tool");
    }

    #[tokio::test]
    async fn a_name_is_routed_by_name_and_by_every_address_it_resolves_to() {
        let routes = registry_routes(
            &registry(service(&["localhost:8080"], Some("127.0.0.9:15006"))),
            &mut Resolver::default(),
        )
        .await;
        let table = RouteTable::default().extended(routes);
        let by_name = table.find("localhost", 8080).expect("routed by name");
        assert_eq!(by_name.addr, "127.0.0.9:15006".parse().unwrap());
        let by_ip = table
            .find_by_ip("127.0.0.1:8080".parse().unwrap())
            .expect("routed by resolved address");
        assert_eq!(by_ip.addr, by_name.addr);
    }

    #[tokio::test]
    async fn flags_win_over_the_registry_and_tables_follow_the_registry() {
        let fixed = RouteTable::new(vec![
            "10.0.0.3:8080=127.0.0.1:1,id=spiffe://td/service/pinned"
                .parse()
                .unwrap(),
        ])
        .unwrap();
        let routes = Arc::new(Routes::new(&fixed));
        let cancel = CancellationToken::new();
        tokio::spawn(routes.clone().keep_resolved(cancel.clone()));
        routes.set_registry(&registry(service(&["10.0.0.3:8080", "10.0.0.4:80"], None)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while routes.current().find("10.0.0.4", 80).is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry routes never applied"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let table = routes.current();
        assert_eq!(
            table.find("10.0.0.3", 8080).unwrap().id.as_str(),
            "spiffe://td/service/pinned"
        );
        routes.set_registry(&Registry::default());
        while routes.current().find("10.0.0.4", 80).is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a dropped address stayed routed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
    }
}
