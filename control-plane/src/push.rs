//! The push hub: the active bundle, the registry, the delegation state (verifying keys and
//! revoked grants) and the trust bundle as pre-serialised NDJSON, refreshed from the store on
//! every change, and one stream per connected sidecar.
//!
//! Each stream remembers what it has sent (bundle version and digest, registry and delegation
//! revisions) and, on
//! every change notice — or after falling behind — sends whatever differs from the current
//! snapshot. A lagging stream therefore resyncs instead of dying, and never gets a line twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::Stream;
use mandate_wire::{
    DelegationState, HEARTBEAT_SECS, Registry, SignedBundle, StreamMessage, StreamQuery,
    WorkloadStatus,
};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::delegation::{KeyPolicy, now_ms};
use crate::metrics::metrics;
use crate::store::{Change, Store, StoreError};

/// How often the hub re-reads the store even without a change notice (a missed NOTIFY heals).
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How long after a failed refresh the hub tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Backlog of change notices before a stream counts as lagging.
const NOTICE_BACKLOG: usize = 64;

/// What every stream is brought up to: one consistent view, pre-serialised.
pub struct Snapshot {
    bundle: Option<Arc<SignedBundle>>,
    registry: Arc<Registry>,
    statuses: HashMap<String, WorkloadStatus>,
    trust_bundle: String,
    /// `{"type":"update","bundle":…}\n`, when there is a bundle.
    bundle_line: Option<Bytes>,
    /// `{"type":"update","registry":…}\n`.
    registry_line: Bytes,
    delegation: Arc<DelegationState>,
    /// `{"type":"update","delegation":…}\n`.
    delegation_line: Bytes,
    /// What decides which signing keys are published (kept for refreshes).
    key_policy: KeyPolicy,
    /// When the store change this snapshot reflects was heard.
    changed_at: Instant,
}

impl Snapshot {
    /// Builds a snapshot (serialising its lines once for every stream), with an empty
    /// delegation state at revision 0 until [`Snapshot::with_delegation`].
    pub fn new(bundle: Option<SignedBundle>, registry: Registry, trust_bundle: String) -> Self {
        let bundle_line = bundle.as_ref().map(|b| {
            line(&StreamMessage::Update {
                bundle: Some(b.clone()),
                registry: None,
                trust_bundle: None,
                delegation: None,
            })
        });
        let registry_line = line(&StreamMessage::Update {
            bundle: None,
            registry: Some(registry.clone()),
            trust_bundle: None,
            delegation: None,
        });
        let delegation = DelegationState::default();
        let statuses = registry
            .agents
            .values()
            .chain(registry.services.values())
            .map(|e| (e.spiffe_id.clone(), e.status))
            .collect();
        Self {
            bundle: bundle.map(Arc::new),
            registry: Arc::new(registry),
            statuses,
            trust_bundle,
            bundle_line,
            registry_line,
            delegation_line: delegation_line(&delegation),
            delegation: Arc::new(delegation),
            key_policy: KeyPolicy::default(),
            changed_at: Instant::now(),
        }
    }

    /// The same snapshot with `delegation`, whose keys `key_policy` selected.
    pub fn with_delegation(mut self, delegation: DelegationState, key_policy: KeyPolicy) -> Self {
        self.delegation_line = delegation_line(&delegation);
        self.delegation = Arc::new(delegation);
        self.key_policy = key_policy;
        self
    }

    /// The delegation state: verifying keys and revoked grants.
    pub fn delegation(&self) -> &DelegationState {
        &self.delegation
    }

    /// The status of a SPIFFE ID in the registry (None: not registered).
    pub fn status_of(&self, spiffe_id: &str) -> Option<WorkloadStatus> {
        self.statuses.get(spiffe_id).copied()
    }

    /// The active bundle's version.
    pub fn policy_version(&self) -> Option<u64> {
        self.bundle.as_ref().map(|b| b.version)
    }

    /// The registry revision.
    pub fn registry_revision(&self) -> u64 {
        self.registry.revision
    }

    /// The first line for a stream that has `query`: everything that differs, and the trust bundle.
    pub fn first_line(&self, query: &StreamQuery) -> Bytes {
        let bundle = self
            .bundle
            .as_ref()
            .filter(|b| query.policy_version != Some(b.version))
            .map(|b| (**b).clone());
        let registry = (query.registry_revision != Some(self.registry.revision))
            .then(|| (*self.registry).clone());
        let delegation = (query.delegation_revision != Some(self.delegation.revision))
            .then(|| (*self.delegation).clone());
        line(&StreamMessage::Update {
            bundle,
            registry,
            trust_bundle: Some(self.trust_bundle.clone()),
            delegation,
        })
    }
}

fn delegation_line(state: &DelegationState) -> Bytes {
    line(&StreamMessage::Update {
        bundle: None,
        registry: None,
        trust_bundle: None,
        delegation: Some(state.clone()),
    })
}

fn line(message: &StreamMessage) -> Bytes {
    let mut text = serde_json::to_vec(message).expect("stream messages serialise");
    text.push(b'\n');
    Bytes::from(text)
}

/// What a stream has sent so far.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    bundle: Option<(u64, String)>,
    registry_revision: Option<u64>,
    delegation_revision: Option<u64>,
}

/// A sidecar connected to this replica.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectedSidecar {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// When its stream opened, RFC 3339.
    pub connected_at: String,
    /// The bundle version last sent to it.
    pub policy_version: Option<u64>,
    /// The registry revision last sent to it.
    pub registry_revision: Option<u64>,
    /// The delegation revision last sent to it.
    pub delegation_revision: Option<u64>,
}

/// The hub shared by every stream of this replica.
pub struct Hub {
    current: ArcSwap<Snapshot>,
    notices: broadcast::Sender<()>,
    connected: std::sync::Mutex<BTreeMap<u64, ConnectedSidecar>>,
    next_id: AtomicU64,
    healthy: AtomicBool,
    cancel: CancellationToken,
    /// Serialises refreshes, so snapshots are published in the order they were read.
    refresh_lock: tokio::sync::Mutex<()>,
}

impl Hub {
    /// A hub starting from `snapshot`; streams end when `cancel` fires.
    pub fn new(snapshot: Snapshot, cancel: CancellationToken) -> Arc<Self> {
        let (notices, _) = broadcast::channel(NOTICE_BACKLOG);
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            notices,
            connected: Default::default(),
            next_id: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            cancel,
            refresh_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the store into a first snapshot; `key_policy` selects the published signing keys.
    pub async fn load(
        store: &Store,
        trust_bundle: String,
        key_policy: KeyPolicy,
    ) -> Result<Snapshot, StoreError> {
        let registry = store.registry().await?;
        let bundle = store.active_bundle().await?;
        let delegation = read_delegation(store, key_policy).await?;
        Ok(Snapshot::new(bundle, registry, trust_bundle).with_delegation(delegation, key_policy))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Whether the last refresh from the store succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Installs a new snapshot and tells every stream.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        let _ = self.notices.send(());
    }

    /// The sidecars streaming from this replica, by connection order.
    pub fn connected(&self) -> Vec<ConnectedSidecar> {
        self.connected
            .lock()
            .expect("connected lock")
            .values()
            .cloned()
            .collect()
    }

    /// Follows the store's changes until cancelled: each change (or a lag, or the periodic
    /// resync) re-reads what changed and publishes a new snapshot if anything differs.
    pub async fn follow(self: Arc<Self>, store: Store) {
        let mut changes = store.subscribe();
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.tick().await;
        let mut pending: Option<Pending> = None;
        loop {
            let retry = pending.is_some();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                change = changes.recv() => {
                    let heard = Instant::now();
                    let what = match change {
                        Ok(Change::Registry) => Pending::registry(heard),
                        Ok(Change::Policy) => Pending::policy(heard),
                        Ok(Change::Delegation) => Pending::delegation(heard),
                        Err(broadcast::error::RecvError::Lagged(_)) => Pending::everything(heard),
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    pending = Some(Pending::merge(pending, what));
                }
                _ = resync.tick() => {
                    pending = Some(Pending::merge(pending, Pending::everything(Instant::now())));
                }
                _ = tokio::time::sleep(RETRY_AFTER), if retry => {}
            }
            if let Some(what) = pending {
                match self.refresh(&store, what).await {
                    Ok(()) => {
                        pending = None;
                        self.healthy.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        crate::metrics::store_error();
                        self.healthy.store(false, Ordering::Relaxed);
                        tracing::warn!(error = %e, "refreshing the push snapshot from the store failed; retrying");
                    }
                }
            }
        }
    }

    /// Re-reads everything now (a request saw the store ahead of the snapshot).
    pub async fn refresh_now(&self, store: &Store) -> Result<(), StoreError> {
        self.refresh(store, Pending::everything(Instant::now()))
            .await
    }

    async fn refresh(&self, store: &Store, what: Pending) -> Result<(), StoreError> {
        let _serialised = self.refresh_lock.lock().await;
        let old = self.snapshot();
        let new_registry = if what.registry {
            Some(store.registry().await?)
        } else {
            None
        };
        let new_bundle = if what.policy {
            Some(store.active_bundle().await?)
        } else {
            None
        };
        let new_delegation = if what.delegation {
            Some(read_delegation(store, old.key_policy).await?)
        } else {
            None
        };
        let registry_changed = new_registry
            .as_ref()
            .is_some_and(|r| r.revision != old.registry.revision);
        let bundle_changed = new_bundle.as_ref().is_some_and(|b| {
            b.as_ref().map(|b| (b.version, &b.digest))
                != old.bundle.as_ref().map(|b| (b.version, &b.digest))
        });
        let delegation_changed = new_delegation
            .as_ref()
            .is_some_and(|d| d.revision != old.delegation.revision);
        if !registry_changed && !bundle_changed && !delegation_changed {
            return Ok(());
        }
        let registry = match new_registry {
            Some(r) if registry_changed => r,
            _ => (*old.registry).clone(),
        };
        let bundle = match new_bundle {
            Some(b) if bundle_changed => b,
            _ => old.bundle.as_deref().cloned(),
        };
        let delegation = match new_delegation {
            Some(d) if delegation_changed => d,
            _ => (*old.delegation).clone(),
        };
        let mut snapshot = Snapshot::new(bundle, registry, old.trust_bundle.clone())
            .with_delegation(delegation, old.key_policy);
        snapshot.changed_at = what.heard;
        tracing::debug!(
            registry_revision = snapshot.registry.revision,
            policy_version = ?snapshot.policy_version(),
            delegation_revision = snapshot.delegation.revision,
            "publishing a new push snapshot"
        );
        self.publish(snapshot);
        Ok(())
    }

    /// Opens the push stream of `peer`, which has applied `query`.
    pub fn stream(
        self: &Arc<Self>,
        peer: String,
        query: StreamQuery,
    ) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let snapshot = self.snapshot();
        let first = snapshot.first_line(&query);
        let sent = Sent {
            bundle: snapshot
                .bundle
                .as_ref()
                .map(|b| (b.version, b.digest.clone())),
            registry_revision: Some(snapshot.registry.revision),
            delegation_revision: Some(snapshot.delegation.revision),
        };
        self.connected.lock().expect("connected lock").insert(
            id,
            ConnectedSidecar {
                spiffe_id: peer.clone(),
                connected_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                policy_version: sent.bundle.as_ref().map(|b| b.0),
                registry_revision: sent.registry_revision,
                delegation_revision: sent.delegation_revision,
            },
        );
        metrics().connected_sidecars.inc();
        tracing::info!(spiffe_id = %peer, "sidecar stream opened");
        let mut heartbeat = tokio::time::interval(Duration::from_secs(HEARTBEAT_SECS));
        heartbeat.reset();
        let state = StreamState {
            hub: self.clone(),
            id,
            peer,
            notices: self.notices.subscribe(),
            heartbeat,
            sent,
            queue: vec![first],
            ending: false,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            state.next_line().await.map(|line| (Ok(line), state))
        })
    }
}

/// The delegation state sidecars need now: revision, published keys, revoked grants.
async fn read_delegation(
    store: &Store,
    key_policy: KeyPolicy,
) -> Result<DelegationState, StoreError> {
    store
        .delegation_state(now_ms(), |keys, now| key_policy.published(keys, now))
        .await
}

/// What to re-read from the store, and when the first change asking for it was heard.
#[derive(Debug, Clone, Copy)]
struct Pending {
    registry: bool,
    policy: bool,
    delegation: bool,
    heard: Instant,
}

impl Pending {
    fn registry(heard: Instant) -> Self {
        Self {
            registry: true,
            policy: false,
            delegation: false,
            heard,
        }
    }

    fn policy(heard: Instant) -> Self {
        Self {
            registry: false,
            policy: true,
            delegation: false,
            heard,
        }
    }

    fn delegation(heard: Instant) -> Self {
        Self {
            registry: false,
            policy: false,
            delegation: true,
            heard,
        }
    }

    fn everything(heard: Instant) -> Self {
        Self {
            registry: true,
            policy: true,
            delegation: true,
            heard,
        }
    }

    /// Both sets of work, timed from the earlier change.
    fn merge(pending: Option<Pending>, new: Pending) -> Pending {
        match pending {
            Some(p) => Pending {
                registry: p.registry || new.registry,
                policy: p.policy || new.policy,
                delegation: p.delegation || new.delegation,
                heard: p.heard,
            },
            None => new,
        }
    }
}

/// One sidecar's stream.
struct StreamState {
    hub: Arc<Hub>,
    id: u64,
    peer: String,
    notices: broadcast::Receiver<()>,
    heartbeat: tokio::time::Interval,
    sent: Sent,
    /// Lines to write before waiting again (newest last).
    queue: Vec<Bytes>,
    /// The workload is no longer active: end after the queued lines.
    ending: bool,
}

impl StreamState {
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if !self.queue.is_empty() {
                return Some(self.queue.remove(0));
            }
            if self.ending {
                return None;
            }
            tokio::select! {
                _ = self.hub.cancel.cancelled() => return None,
                notice = self.notices.recv() => match notice {
                    // Lagging is harmless: the diff against the current snapshot catches up.
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up(),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.heartbeat.tick() => {
                    return Some(line(&StreamMessage::Heartbeat));
                }
            }
        }
    }

    /// Queues whatever the current snapshot has that this stream has not sent yet.
    fn catch_up(&mut self) {
        let snapshot = self.hub.snapshot();
        let bundle = snapshot
            .bundle
            .as_ref()
            .map(|b| (b.version, b.digest.clone()));
        if bundle != self.sent.bundle
            && let Some(line) = &snapshot.bundle_line
        {
            self.queue.push(line.clone());
            self.sent.bundle = bundle;
        }
        if self.sent.registry_revision != Some(snapshot.registry.revision) {
            self.queue.push(snapshot.registry_line.clone());
            self.sent.registry_revision = Some(snapshot.registry.revision);
        }
        if self.sent.delegation_revision != Some(snapshot.delegation.revision) {
            self.queue.push(snapshot.delegation_line.clone());
            self.sent.delegation_revision = Some(snapshot.delegation.revision);
        }
        if !self.queue.is_empty() {
            let latency = snapshot.changed_at.elapsed().as_secs_f64();
            for _ in &self.queue {
                metrics().push_latency.observe(latency);
            }
            self.heartbeat.reset();
            if let Some(entry) = self
                .hub
                .connected
                .lock()
                .expect("connected lock")
                .get_mut(&self.id)
            {
                entry.policy_version = self.sent.bundle.as_ref().map(|b| b.0);
                entry.registry_revision = self.sent.registry_revision;
                entry.delegation_revision = self.sent.delegation_revision;
            }
        }
        // Only an explicit status ends the stream: a snapshot older than the workload's
        // registration (the store said it was active when the stream opened) does not.
        if snapshot
            .status_of(&self.peer)
            .is_some_and(|s| s != WorkloadStatus::Active)
        {
            tracing::info!(spiffe_id = %self.peer, "workload no longer active: ending its stream");
            self.ending = true;
        }
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        metrics().connected_sidecars.dec();
        self.hub
            .connected
            .lock()
            .expect("connected lock")
            .remove(&self.id);
        tracing::info!(spiffe_id = %self.peer, "sidecar stream closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use mandate_wire::RegistryEntry;

    const PEER: &str = "spiffe://td/agent/a";

    fn registry(revision: u64, status: WorkloadStatus) -> Registry {
        let mut r = Registry {
            revision,
            ..Default::default()
        };
        r.agents.insert(
            "a".into(),
            RegistryEntry {
                spiffe_id: PEER.into(),
                status,
                owner: "o".into(),
                description: String::new(),
                ceiling: vec![],
                autonomous: vec![],
                labels: Default::default(),
                reach: Default::default(),
            },
        );
        r
    }

    fn bundle(version: u64) -> SignedBundle {
        SignedBundle {
            version,
            digest: format!("sha256:{version}"),
            modules: BTreeMap::from([("a.rego".into(), "package a\n".into())]),
            data: "{}".into(),
            signature: "sig".into(),
        }
    }

    fn parse(line: &Bytes) -> StreamMessage {
        assert!(line.ends_with(b"\n"));
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn the_first_line_brings_only_what_differs_and_always_the_trust_bundle() {
        let snap = Snapshot::new(
            Some(bundle(3)),
            registry(7, WorkloadStatus::Active),
            "PEM".into(),
        );
        let everything = parse(&snap.first_line(&StreamQuery::default()));
        let StreamMessage::Update {
            bundle: b,
            registry: r,
            trust_bundle: t,
            ..
        } = everything
        else {
            panic!("not an update");
        };
        assert_eq!(b.unwrap().version, 3);
        assert_eq!(r.unwrap().revision, 7);
        assert_eq!(t.as_deref(), Some("PEM"));

        let up_to_date = StreamQuery {
            policy_version: Some(3),
            registry_revision: Some(7),
            delegation_revision: Some(0),
        };
        assert_eq!(
            parse(&snap.first_line(&up_to_date)),
            StreamMessage::Update {
                bundle: None,
                registry: None,
                trust_bundle: Some("PEM".into()),
                delegation: None,
            }
        );
        let old_registry = StreamQuery {
            policy_version: Some(3),
            registry_revision: Some(6),
            delegation_revision: None,
        };
        let StreamMessage::Update {
            bundle: b,
            registry: r,
            ..
        } = parse(&snap.first_line(&old_registry))
        else {
            panic!("not an update");
        };
        assert!(b.is_none() && r.is_some());
        // A rollback: the sidecar has 4, the active one is 3.
        let ahead = StreamQuery {
            policy_version: Some(4),
            registry_revision: Some(7),
            delegation_revision: None,
        };
        let StreamMessage::Update { bundle: b, .. } = parse(&snap.first_line(&ahead)) else {
            panic!("not an update");
        };
        assert_eq!(b.unwrap().version, 3);
    }

    fn delegation(revision: u64, revoked: &[&str]) -> DelegationState {
        DelegationState {
            revision,
            keys: vec![],
            revoked_grants: revoked
                .iter()
                .map(|id| mandate_wire::RevokedGrant {
                    id: (*id).to_owned(),
                    expires_at: 2_000_000_000,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn delegation_state_comes_first_unless_current_then_once_per_revision() {
        let snap = || {
            Snapshot::new(None, registry(1, WorkloadStatus::Active), "PEM".into())
                .with_delegation(delegation(2, &[]), KeyPolicy::default())
        };
        let first = |revision| {
            let query = StreamQuery {
                registry_revision: Some(1),
                delegation_revision: revision,
                ..StreamQuery::default()
            };
            let StreamMessage::Update { delegation, .. } = parse(&snap().first_line(&query)) else {
                panic!("not an update");
            };
            delegation
        };
        assert_eq!(first(None), Some(delegation(2, &[])));
        assert_eq!(first(Some(1)), Some(delegation(2, &[])));
        assert_eq!(
            first(Some(2)),
            None,
            "a sidecar at the current revision resumes"
        );

        let hub = Hub::new(snap(), CancellationToken::new());
        let mut stream = Box::pin(hub.stream(
            PEER.into(),
            StreamQuery {
                registry_revision: Some(1),
                delegation_revision: Some(2),
                ..StreamQuery::default()
            },
        ));
        let StreamMessage::Update { delegation: d, .. } =
            parse(&stream.next().await.unwrap().unwrap())
        else {
            panic!("not an update");
        };
        assert!(d.is_none());
        // A grant is revoked: only the delegation state is sent, once.
        hub.publish(
            Snapshot::new(None, registry(1, WorkloadStatus::Active), "PEM".into())
                .with_delegation(delegation(3, &["g1"]), KeyPolicy::default()),
        );
        assert_eq!(
            parse(&stream.next().await.unwrap().unwrap()),
            StreamMessage::Update {
                bundle: None,
                registry: None,
                trust_bundle: None,
                delegation: Some(delegation(3, &["g1"])),
            }
        );
        assert_eq!(hub.connected()[0].delegation_revision, Some(3));
    }

    #[tokio::test]
    async fn streams_get_each_change_once_and_end_when_their_workload_is_suspended() {
        let cancel = CancellationToken::new();
        let hub = Hub::new(
            Snapshot::new(None, registry(1, WorkloadStatus::Active), "PEM".into()),
            cancel.clone(),
        );
        let mut stream = Box::pin(hub.stream(PEER.into(), StreamQuery::default()));
        let first = parse(&stream.next().await.unwrap().unwrap());
        assert!(matches!(
            first,
            StreamMessage::Update {
                bundle: None,
                registry: Some(_),
                trust_bundle: Some(_),
                ..
            }
        ));
        assert_eq!(hub.connected().len(), 1);
        assert_eq!(hub.connected()[0].spiffe_id, PEER);

        hub.publish(Snapshot::new(
            Some(bundle(1)),
            registry(1, WorkloadStatus::Active),
            "PEM".into(),
        ));
        let StreamMessage::Update {
            bundle: b,
            registry: r,
            trust_bundle: t,
            ..
        } = parse(&stream.next().await.unwrap().unwrap())
        else {
            panic!("not an update");
        };
        assert_eq!(b.unwrap().version, 1);
        assert!(r.is_none() && t.is_none());

        // Many changes while the stream is not reading: it lags, then catches up with the latest.
        for v in 2..200 {
            hub.publish(Snapshot::new(
                Some(bundle(v)),
                registry(1, WorkloadStatus::Active),
                "PEM".into(),
            ));
        }
        let StreamMessage::Update { bundle: b, .. } = parse(&stream.next().await.unwrap().unwrap())
        else {
            panic!("not an update");
        };
        assert_eq!(b.unwrap().version, 199);

        hub.publish(Snapshot::new(
            Some(bundle(199)),
            registry(2, WorkloadStatus::Suspended),
            "PEM".into(),
        ));
        let StreamMessage::Update {
            registry: r,
            bundle: b,
            ..
        } = parse(&stream.next().await.unwrap().unwrap())
        else {
            panic!("not an update");
        };
        assert!(b.is_none());
        assert_eq!(r.unwrap().agents["a"].status, WorkloadStatus::Suspended);
        assert!(
            stream.next().await.is_none(),
            "the suspended workload's stream ends"
        );
        drop(stream);
        assert!(hub.connected().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_sends_heartbeats_and_ends_on_shutdown() {
        let cancel = CancellationToken::new();
        let hub = Hub::new(
            Snapshot::new(None, registry(1, WorkloadStatus::Active), "PEM".into()),
            cancel.clone(),
        );
        let mut stream = Box::pin(hub.stream(
            PEER.into(),
            StreamQuery {
                policy_version: None,
                registry_revision: Some(1),
                delegation_revision: None,
            },
        ));
        stream.next().await.unwrap().unwrap();
        let beat = stream.next().await.unwrap().unwrap();
        assert_eq!(parse(&beat), StreamMessage::Heartbeat);
        cancel.cancel();
        assert!(stream.next().await.is_none());
    }
}
