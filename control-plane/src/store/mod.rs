//! The control plane store: registry, CA, join tokens, policy bundles and decisions, in embedded
//! SQLite (one replica, nothing to set up) or PostgreSQL (several replicas sharing one database).
//!
//! Both backends run the same SQL (TEXT and BIGINT columns, `$n` placeholders) through typed sqlx
//! pools; `on_pool!` expands each method body once per backend. Every registry or policy change
//! is announced on [`Store::subscribe`]: directly for this replica's own writes and, with
//! PostgreSQL, through `NOTIFY mandate_changes` (sent in the writing transaction) for the others'.

mod approvals;
mod audit;
mod backend;
mod bundles;
mod decisions;
mod grants;
mod registry;
mod select;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use mandate_wire::{
    DecisionRecord, IngestResult, Reach, Registry, RegistryEntry, SignedBundle, WorkloadStatus,
};

pub use approvals::{
    Approval, ApprovalRefusal, ApprovalStatus, NewApproval, Verdict, ms_to_rfc3339,
};
pub use audit::ChainHead;
use backend::Pool;
pub use grants::{Grant, GrantQuery, GrantStatus, NewGrant, StoredDelegationKey, ms_rfc3339};

/// Where the store lives.
#[derive(Clone)]
pub enum StoreLocation {
    /// An SQLite database file (created, with its directory, when missing).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host/db`).
    Postgres(String),
}

impl fmt::Debug for StoreLocation {
    // The URL may carry a password: show only where the database is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(url) => {
                let shown = match (url.find("://"), url.rfind('@')) {
                    (Some(scheme), Some(at)) if at > scheme => {
                        format!("{}://…@{}", &url[..scheme], &url[at + 1..])
                    }
                    _ => url.clone(),
                };
                f.debug_tuple("Postgres").field(&shown).finish()
            }
        }
    }
}

/// Everything that can go wrong in the store; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing asked for does not exist ("agent research", "bundle 7").
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The change contradicts what is stored (already exists; revoked is terminal).
    #[error("{what} {why}")]
    Conflict {
        /// What the change was about.
        what: String,
        /// Why it was refused, and what to do instead.
        why: String,
    },
    /// A join token could not be redeemed.
    #[error("join token {0}: ask the operator for a fresh one (`mandate agent token NAME`)")]
    JoinToken(JoinTokenRefusal),
    /// An argument the store cannot use (a time that is not RFC 3339, a bundle signed for other contents).
    #[error("{what}: {why}")]
    Invalid {
        /// The argument at fault.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// Signing a new policy bundle failed; nothing was stored.
    #[error("signing the policy bundle failed, nothing was stored: {0}")]
    Sign(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database refused or could not be reached.
    #[error("database error: {0} (check that the database is reachable and writable)")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error(
        "could not migrate the store's schema: {0} (was the database written by a newer mandate?)"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row does not decode (bad JSON, unknown status): the database was changed outside mandate.
    #[error("stored data does not decode: {0} (was the database edited by hand?)")]
    Corrupt(String),
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTokenRefusal {
    /// No such token was ever issued.
    Unknown,
    /// The token was redeemed already (tokens are single use).
    Used,
    /// The token's time ran out.
    Expired,
}

impl fmt::Display for JoinTokenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "is unknown",
            Self::Used => "was already used",
            Self::Expired => "has expired",
        })
    }
}

/// Whether a workload is an agent or a service (the first segment of its SPIFFE ID path).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// `spiffe://<td>/agent/<name>`
    Agent,
    /// `spiffe://<td>/service/<name>`
    Service,
}

impl WorkloadKind {
    /// The lowercase word used in the API, the store and SPIFFE IDs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Service => "service",
        }
    }

    /// Parses the lowercase word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Self::Agent),
            "service" => Some(Self::Service),
            _ => None,
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workload to register (it starts active).
#[derive(Debug, Clone)]
pub struct NewWorkload {
    /// Its name, unique per kind.
    pub name: String,
    /// Agent or service.
    pub kind: WorkloadKind,
    /// Its SPIFFE ID, unique across all workloads.
    pub spiffe_id: String,
    /// Who answers for it.
    pub owner: String,
    /// What it is for.
    pub description: String,
    /// The most it may ever do: scope objects.
    pub ceiling: Vec<serde_json::Value>,
    /// What it may do on its own, with no delegation: scope objects (policy intersects them
    /// with the ceiling).
    pub autonomous: Vec<serde_json::Value>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh.
    pub reach: Reach,
}

/// A registered workload, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Its name, unique per kind.
    pub name: String,
    /// Agent or service.
    pub kind: WorkloadKind,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Who answers for it.
    pub owner: String,
    /// What it is for.
    pub description: String,
    /// The most it may ever do: scope objects.
    pub ceiling: Vec<serde_json::Value>,
    /// What it may do on its own, with no delegation: scope objects (policy intersects them
    /// with the ceiling).
    pub autonomous: Vec<serde_json::Value>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// How callers reach it through the mesh.
    #[serde(default, skip_serializing_if = "Reach::is_empty")]
    pub reach: Reach,
    /// Active, suspended or revoked.
    pub status: WorkloadStatus,
    /// When it was registered (RFC 3339).
    pub created_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
}

impl Workload {
    /// The entry sidecars and policy see for this workload.
    pub fn registry_entry(&self) -> RegistryEntry {
        RegistryEntry {
            spiffe_id: self.spiffe_id.clone(),
            status: self.status,
            owner: self.owner.clone(),
            description: self.description.clone(),
            ceiling: self.ceiling.clone(),
            autonomous: self.autonomous.clone(),
            labels: self.labels.clone(),
            reach: self.reach.clone(),
        }
    }
}

/// The CA as stored: the certificate and the sealed (encrypted) private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSecret {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The private key, sealed with the store key; opaque to the store.
    pub key_sealed: String,
}

impl fmt::Debug for StoredSecret {
    // Even sealed, the key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSecret")
            .field("cert_pem", &self.cert_pem)
            .field("key_sealed", &"<redacted>")
            .finish()
    }
}

/// A validated policy bundle to store; the store assigns its version and has it signed.
#[derive(Debug, Clone)]
pub struct NewBundle {
    /// Rego modules by file name.
    pub modules: BTreeMap<String, String>,
    /// JSON data (an object) as text.
    pub data: String,
    /// The operator's message.
    pub message: String,
    /// How many Rego tests passed when it was validated.
    pub tests_passed: u64,
}

/// A stored bundle, as `GET /v1/policies` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSummary {
    /// Its version (1, 2, …).
    pub version: u64,
    /// `sha256:<hex>` of the signed contents.
    pub digest: String,
    /// When it was stored (RFC 3339).
    pub created_at: String,
    /// The operator's message.
    pub message: String,
    /// Module file names.
    pub modules: Vec<String>,
    /// How many Rego tests passed when it was validated.
    pub tests_passed: u64,
    /// Whether sidecars are told to enforce it.
    pub active: bool,
}

/// Filters for [`Store::decisions`]; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    /// The caller's exact SPIFFE ID.
    pub source: Option<String>,
    /// The person on whose behalf the call was made.
    pub subject: Option<String>,
    /// The MCP tool called (`tools/call` only).
    pub tool: Option<String>,
    /// The grant the call's delegation came from.
    pub grant: Option<String>,
    /// Who approved the call (per-action approval).
    pub approver: Option<String>,
    /// Only allowed (true) or only denied (false) calls.
    pub allow: Option<bool>,
    /// Decisions at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Decisions before this time (RFC 3339).
    pub until: Option<String>,
    /// At most this many, newest first (0 returns none).
    pub limit: u32,
}

/// What changed; replicas learn of each other's changes through PostgreSQL LISTEN/NOTIFY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The registry (a workload was added or changed status); re-read [`Store::registry`].
    Registry,
    /// The active policy bundle; re-read [`Store::active_bundle`].
    Policy,
    /// Delegation: a signing key was created or a grant revoked or closed; re-read
    /// [`Store::delegation_state`] (and the signing keys).
    Delegation,
}

impl Change {
    /// The NOTIFY payload.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Policy => "policy",
            Self::Delegation => "delegation",
        }
    }

    /// Parses a NOTIFY payload.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "registry" => Some(Self::Registry),
            "policy" => Some(Self::Policy),
            "delegation" => Some(Self::Delegation),
            _ => None,
        }
    }
}

/// The store: cheap to clone, all clones share one pool and one change feed.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    changes: broadcast::Sender<Change>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    // The listener holds no reference to the store; it must not outlive the last clone.
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// How many changes a slow subscriber may fall behind before it sees `Lagged` (and should re-read everything).
const CHANGE_BACKLOG: usize = 256;

impl Store {
    /// Connects (creating an SQLite file and its directory if missing), runs the migrations and,
    /// with PostgreSQL, starts listening for the other replicas' changes.
    pub async fn open(location: &StoreLocation) -> Result<Store, StoreError> {
        let (changes, _) = broadcast::channel(CHANGE_BACKLOG);
        let (pool, listener) = match location {
            StoreLocation::Sqlite(path) => (backend::open_sqlite(path).await?, None),
            StoreLocation::Postgres(url) => {
                let (pool, listener) = backend::open_postgres(url, changes.clone()).await?;
                (pool, Some(listener))
            }
        };
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                changes,
                listener,
            }),
        };
        let chained = store.backfill_audit_chain().await?;
        if chained > 0 {
            tracing::info!(
                decisions = chained,
                "chained the decisions stored before the audit chain existed"
            );
        }
        Ok(store)
    }

    /// Changes from this replica's writes and (PostgreSQL) the other replicas'. A change may be
    /// announced more than once, and after a lost connection every kind is announced because
    /// notifications may have been missed: subscribers re-read, they do not count.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self.inner.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// Tells this replica's subscribers; called after the writing transaction committed.
    fn announce(&self, change: Change) {
        // No subscribers is fine: nobody needs telling.
        let _ = self.inner.changes.send(change);
    }
}

/// Now as RFC 3339 UTC with millisecond precision, for created_at/updated_at.
fn now_rfc3339() -> String {
    use time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_millisecond(now.millisecond()).unwrap_or(now);
    now.format(&Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postgres_password_stays_out_of_debug() {
        let shown = format!(
            "{:?}",
            StoreLocation::Postgres("postgres://mandate:hunter2@db:5432/mandate".into())
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db:5432/mandate"), "{shown}");
    }

    #[test]
    fn the_sealed_key_stays_out_of_debug() {
        let secret = StoredSecret {
            cert_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_sealed: "c2VhbGVk".into(),
        };
        assert!(!format!("{secret:?}").contains("c2VhbGVk"));
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_millisecond() {
        let now = now_rfc3339();
        let parsed =
            time::OffsetDateTime::parse(&now, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert_eq!(parsed.nanosecond() % 1_000_000, 0, "{now}");
    }

    /// Compiles only if every store future is Send, as HTTP handlers and spawned tasks need.
    #[allow(dead_code)]
    fn store_futures_are_send(store: &Store, query: &DecisionQuery) {
        fn send<T: Send>(_: T) {}
        send(Store::open(&StoreLocation::Sqlite("x".into())));
        send(store.ca());
        send(store.put_ca(
            &StoredSecret {
                cert_pem: String::new(),
                key_sealed: String::new(),
            },
            false,
        ));
        send(store.insert_workload(&NewWorkload {
            name: String::new(),
            kind: WorkloadKind::Agent,
            spiffe_id: String::new(),
            owner: String::new(),
            description: String::new(),
            ceiling: Vec::new(),
            autonomous: Vec::new(),
            labels: BTreeMap::new(),
            reach: Reach::default(),
        }));
        send(store.workload(WorkloadKind::Agent, ""));
        send(store.workload_by_spiffe_id(""));
        send(store.workloads(None));
        send(store.set_status(WorkloadKind::Agent, "", WorkloadStatus::Active));
        send(store.registry());
        send(store.insert_join_token("", "", 0));
        send(store.redeem_join_token("", 0));
        let bundle = NewBundle {
            modules: BTreeMap::new(),
            data: String::new(),
            message: String::new(),
            tests_passed: 0,
        };
        send(store.insert_bundle(bundle, |_| Err(std::fmt::Error)));
        send(store.bundles());
        send(store.active_bundle());
        send(store.activate_bundle(1));
        send(store.insert_decisions("", &[]));
        send(store.decisions(query));
    }

    #[test]
    fn change_payloads_round_trip() {
        for change in [Change::Registry, Change::Policy, Change::Delegation] {
            assert_eq!(Change::parse(change.as_str()), Some(change));
        }
        assert_eq!(Change::parse("grants"), None);
    }
}
