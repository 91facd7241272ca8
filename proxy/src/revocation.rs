//! Workloads the registry marks suspended or revoked, and the live connections that must close when
//! one of them becomes so. Standalone sidecars never receive a registry, so their set stays empty.
//!
//! Readers (TLS verifiers, the request path) take a lock-free snapshot of the set. Connections are
//! tracked by peer SPIFFE ID in sharded maps: registering one takes one shard's lock once per
//! connection, never per request.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mandate_wire::{Registry, WorkloadStatus};
use tokio_util::sync::CancellationToken;

const SHARDS: usize = 16;

/// A certificate or call refused because the registry marks its workload inactive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{id} is {status}")]
pub struct Inactive {
    /// The workload's SPIFFE ID.
    pub id: String,
    /// `suspended` or `revoked`.
    pub status: WorkloadStatus,
}

type Tracked = (Arc<str>, CancellationToken);

/// Live connections by id; each shard is locked only to add, remove or sweep.
struct Connections {
    shards: [Mutex<HashMap<u64, Tracked>>; SHARDS],
    next: AtomicU64,
}

/// The inactive workloads in force and the connections to cut when the set grows.
pub struct Revocations {
    inactive: ArcSwap<HashMap<String, WorkloadStatus>>,
    connections: Arc<Connections>,
    hasher: RandomState,
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new()
    }
}

impl Revocations {
    /// An empty set: nobody is inactive.
    pub fn new() -> Self {
        Self {
            inactive: ArcSwap::from_pointee(HashMap::new()),
            connections: Arc::new(Connections {
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                next: AtomicU64::new(0),
            }),
            hasher: RandomState::new(),
        }
    }

    /// Why `id` may not act, if the registry marks it suspended or revoked.
    pub fn check(&self, id: &str) -> Result<(), Inactive> {
        match self.inactive.load().get(id) {
            None => Ok(()),
            Some(status) => Err(Inactive {
                id: id.to_owned(),
                status: *status,
            }),
        }
    }

    /// Applies a registry: its inactive workloads are refused from now on, and every tracked
    /// connection of one of them is closed. Returns the IDs that became inactive with it.
    pub fn apply(&self, registry: &Registry) -> Vec<String> {
        let next: HashMap<String, WorkloadStatus> = registry
            .inactive()
            .map(|e| (e.spiffe_id.clone(), e.status))
            .collect();
        let previous = self.inactive.swap(Arc::new(next.clone()));
        let newly: Vec<String> = next
            .keys()
            .filter(|id| !previous.contains_key(*id))
            .cloned()
            .collect();
        // Sweep after the swap: a connection tracked from now on sees the new set itself (`track`
        // checks it), so none slips between the two.
        if !next.is_empty() {
            self.sweep(&next);
        }
        newly
    }

    fn sweep(&self, inactive: &HashMap<String, WorkloadStatus>) {
        for shard in &self.connections.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (id, token) in shard.values() {
                if inactive.contains_key(&**id) {
                    token.cancel();
                }
            }
        }
    }

    /// Tracks a live connection with `peer`: the token is cancelled when `peer` becomes inactive
    /// (at once, if it already is). Untracked when the guard drops.
    pub fn track(&self, peer: Arc<str>) -> ConnectionGuard {
        let guard = self.track_changes(peer.clone());
        if self.check(&peer).is_err() {
            guard.token.cancel();
        }
        guard
    }

    /// Tracks a connection whose requests are each refused while `peer` is inactive (our own
    /// agent's): only a change to inactive while it is open cancels it, so a connection opened
    /// afterwards still gets answers saying why.
    pub fn track_changes(&self, peer: Arc<str>) -> ConnectionGuard {
        let token = CancellationToken::new();
        let key = self.connections.next.fetch_add(1, Ordering::Relaxed);
        // Spread keys over shards by a hash, so consecutive connections do not share a lock.
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.connections.shards[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (peer, token.clone()));
        ConnectionGuard {
            token,
            connections: self.connections.clone(),
            shard,
            key,
        }
    }

    /// How many connections are tracked now (tests and debugging).
    pub fn tracked(&self) -> usize {
        self.connections
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// One tracked connection; dropping it stops the tracking.
pub struct ConnectionGuard {
    token: CancellationToken,
    connections: Arc<Connections>,
    shard: usize,
    key: u64,
}

impl ConnectionGuard {
    /// Cancelled when the connection's peer becomes inactive.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.connections.shards[self.shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_wire::RegistryEntry;
    use std::collections::BTreeMap;

    fn registry(statuses: &[(&str, WorkloadStatus)]) -> Registry {
        let mut registry = Registry::default();
        for (name, status) in statuses {
            registry.agents.insert(
                (*name).to_owned(),
                RegistryEntry {
                    spiffe_id: format!("spiffe://td/agent/{name}"),
                    status: *status,
                    owner: "o".into(),
                    description: String::new(),
                    ceiling: vec![],
                    autonomous: vec![],
                    labels: BTreeMap::new(),
                    reach: Default::default(),
                },
            );
        }
        registry
    }

    #[test]
    fn inactive_workloads_are_refused_and_their_connections_cut() {
        let r = Revocations::new();
        let a: Arc<str> = Arc::from("spiffe://td/agent/a");
        let b: Arc<str> = Arc::from("spiffe://td/agent/b");
        let conn_a = r.track(a.clone());
        let conn_b = r.track(b.clone());
        assert!(r.check(&a).is_ok());
        assert_eq!(r.tracked(), 2);

        let newly = r.apply(&registry(&[
            ("a", WorkloadStatus::Suspended),
            ("b", WorkloadStatus::Active),
        ]));
        assert_eq!(newly, ["spiffe://td/agent/a"]);
        assert!(conn_a.token().is_cancelled());
        assert!(!conn_b.token().is_cancelled());
        let err = r.check(&a).unwrap_err();
        assert_eq!(err.to_string(), "spiffe://td/agent/a is suspended");

        // A connection from an inactive peer is cancelled as it is tracked, unless it is one
        // whose every request is refused anyway.
        assert!(r.track(a.clone()).token().is_cancelled());
        assert!(!r.track_changes(a.clone()).token().is_cancelled());
        // The same set again changes nothing new; reactivation lifts the refusal.
        assert!(
            r.apply(&registry(&[("a", WorkloadStatus::Suspended)]))
                .is_empty()
        );
        r.apply(&registry(&[("a", WorkloadStatus::Active)]));
        assert!(r.check(&a).is_ok());

        drop(conn_a);
        drop(conn_b);
        assert_eq!(r.tracked(), 0);
    }
}
