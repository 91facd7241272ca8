//! The two backends behind one store: opening and migrating each, the write-transaction and
//! notification differences between them, and PostgreSQL's LISTEN loop.

use std::borrow::Cow;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};
use tokio::sync::broadcast;

use super::{Change, StoreError};

/// The PostgreSQL channel every replica's writes NOTIFY on.
pub(super) const CHANNEL: &str = "mandate_changes";

/// One pool per backend; [`on_pool!`] runs the same body against either.
pub(super) enum Pool {
    /// Embedded SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL, possibly shared with other replicas.
    Postgres(PgPool),
}

/// Expands `$body` once for each backend with `$pool` bound to that backend's typed pool, so a
/// method is written once and compiled for both (the SQL text is the same).
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.pool {
            $crate::store::backend::Pool::Sqlite($pool) => $body,
            $crate::store::backend::Pool::Postgres($pool) => $body,
        }
    };
}
pub(super) use on_pool;

/// How write transactions start on each backend.
pub(super) trait BeginWrite {
    /// The backend's database type.
    type Db: sqlx::Database;
    /// Starts a transaction that will write.
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;
}

impl BeginWrite for SqlitePool {
    type Db = Sqlite;
    // IMMEDIATE takes the write lock up front (waiting up to busy_timeout). A deferred transaction
    // that reads and then writes fails at once with SQLITE_BUSY if another writer got in between.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Db = Postgres;
    // Row locks (UPDATE of the state row or of the workload) order concurrent writers.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// Telling the other replicas, inside the writing transaction.
pub(super) trait Notify {
    /// Queues the notification; PostgreSQL delivers it only if the transaction commits.
    async fn notify(&mut self, change: Change) -> Result<(), sqlx::Error>;
}

impl Notify for Transaction<'_, Sqlite> {
    // One process owns an SQLite file: local subscribers are told directly after commit.
    async fn notify(&mut self, _change: Change) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

impl Notify for Transaction<'_, Postgres> {
    async fn notify(&mut self, change: Change) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change.as_str())
            .execute(&mut **self)
            .await?;
        Ok(())
    }
}

/// The migrations, compiled into the binary so a deployed `mandate` needs no files beside it.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/0001_schema.sql"),
    ),
    (
        2,
        "autonomous",
        include_str!("../../migrations/0002_autonomous.sql"),
    ),
    (
        3,
        "delegation",
        include_str!("../../migrations/0003_delegation.sql"),
    ),
    (
        4,
        "approvals",
        include_str!("../../migrations/0004_approvals.sql"),
    ),
    (
        5,
        "audit chain",
        include_str!("../../migrations/0005_audit_chain.sql"),
    ),
    (6, "reach", include_str!("../../migrations/0006_reach.sql")),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

async fn migrator() -> Result<Migrator, StoreError> {
    Ok(Migrator::new(Embedded).await?)
}

/// How long a writer waits for SQLite's write lock before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens (creating if missing) and migrates an SQLite store.
pub(super) async fn open_sqlite(path: &Path) -> Result<Pool, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| StoreError::Invalid {
                what: format!("store directory {}", dir.display()),
                why: format!("cannot be created: {e}"),
            })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // With WAL, NORMAL loses at most the last transactions on power loss, never consistency.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?;
    migrator().await?.run(&pool).await?;
    Ok(Pool::Sqlite(pool))
}

/// Connects to and migrates a PostgreSQL store, and starts forwarding the other replicas' changes
/// to `changes`. LISTEN is in place before this returns, so no change made after it is missed.
pub(super) async fn open_postgres(
    url: &str,
    changes: broadcast::Sender<Change>,
) -> Result<(Pool, tokio::task::JoinHandle<()>), StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await?;
    // The migrator takes an advisory lock: replicas starting together migrate one at a time.
    migrator().await?.run(&pool).await?;

    // Its own pool of one connection, so the listener never takes one the queries need.
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options);
    let listener = listen(&listen_pool).await?;
    let task = tokio::spawn(forward(listen_pool, listener, changes));
    Ok((Pool::Postgres(pool), task))
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Forwards notifications until the store is dropped (which aborts this task).
async fn forward(pool: PgPool, listener: PgListener, changes: broadcast::Sender<Change>) {
    let mut listener = Some(listener);
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(current) = listener.as_mut() else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match listen(&pool).await {
                Ok(fresh) => {
                    tracing::info!("store: listening for other replicas' changes again");
                    listener = Some(fresh);
                    announce_everything(&changes);
                }
                Err(e) => tracing::warn!(
                    "store: cannot LISTEN on {CHANNEL}: {e}; retrying in {}ms",
                    backoff.as_millis()
                ),
            }
            continue;
        };
        match current.try_recv().await {
            Ok(Some(notification)) => {
                backoff = BACKOFF_MIN;
                match Change::parse(notification.payload()) {
                    Some(change) => {
                        let _ = changes.send(change);
                    }
                    None => tracing::warn!(
                        "store: ignoring unknown change {:?} on {CHANNEL} (a newer replica?)",
                        notification.payload()
                    ),
                }
            }
            // The connection dropped and the listener re-established it: whatever was notified
            // in between is lost, so everyone re-reads.
            Ok(None) => {
                tracing::warn!("store: LISTEN connection was lost and re-established");
                announce_everything(&changes);
            }
            // Start over with a fresh listener: an error can leave the old connection unusable.
            // Dropping it first returns its connection to the one-connection pool.
            Err(e) => {
                tracing::warn!(
                    "store: LISTEN on {CHANNEL} failed: {e}; reconnecting in {}ms",
                    backoff.as_millis()
                );
                listener = None;
            }
        }
    }
}

fn announce_everything(changes: &broadcast::Sender<Change>) {
    let _ = changes.send(Change::Registry);
    let _ = changes.send(Change::Policy);
    let _ = changes.send(Change::Delegation);
}
