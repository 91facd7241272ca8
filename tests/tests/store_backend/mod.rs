//! Where the store suites (`store.rs`, `store_approvals.rs`) get their stores: embedded SQLite in a
//! scratch directory, or a throwaway PostgreSQL server (skipped, with a SKIP line, when PostgreSQL
//! is not installed), with a fresh database for every case.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use mandate_control_plane::store::{Store, StoreLocation};
use mandate_e2e::postgres::Postgres;
use mandate_e2e::within;
use sqlx::Connection as _;

/// Where each case's fresh store comes from.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(Box<Postgres>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// A location no other case uses.
    pub async fn location(&self, case: &str) -> anyhow::Result<StoreLocation> {
        match self {
            // A directory that does not exist yet: opening must create it.
            Self::Sqlite(dir) => Ok(StoreLocation::Sqlite(
                dir.path().join(case).join("data").join("mandate.db"),
            )),
            Self::Postgres(pg) => {
                let base = format!("postgres://postgres@{}", pg.addr());
                let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
                    .await
                    .context("connect to the test server's postgres database")?;
                sqlx::query(&format!("CREATE DATABASE \"{case}\""))
                    .execute(&mut admin)
                    .await
                    .with_context(|| format!("create database {case}"))?;
                admin.close().await?;
                Ok(StoreLocation::Postgres(format!("{base}/{case}")))
            }
        }
    }

    /// Case `case` of suite `suite`: says which one runs (so a failure can be placed), then opens
    /// a fresh store at a location no other case uses.
    pub async fn open(&self, suite: &str, case: &str) -> anyhow::Result<(Store, StoreLocation)> {
        eprintln!("{suite}/{}: {case}", self.name());
        let location = self.location(case).await?;
        let store = Store::open(&location)
            .await
            .with_context(|| format!("open {location:?}"))?;
        Ok((store, location))
    }
}

/// Runs each named case (`async fn case(Store, &StoreLocation) -> anyhow::Result<()>`) of suite
/// `$suite` against a fresh store of `$backend`; an error names the suite, backend and case.
macro_rules! run_cases {
    ($suite:literal, $backend:expr, $($case:ident),+ $(,)?) => {{
        let backend = &$backend;
        $(
            let (store, location) = backend.open($suite, stringify!($case)).await?;
            $case(store, &location)
                .await
                .with_context(|| format!("{}/{}: {}", $suite, backend.name(), stringify!($case)))?;
        )+
    }};
}
pub(crate) use run_cases;

/// Runs `suite` on SQLite in a fresh scratch directory named `prefix…`, within `limit`.
pub async fn on_sqlite<F: Future<Output = anyhow::Result<()>>>(
    prefix: &str,
    limit: Duration,
    what: &str,
    suite: impl FnOnce(Backend) -> F,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    within(limit, what, suite(Backend::Sqlite(dir))).await?
}

/// Runs `suite` on a throwaway PostgreSQL server, within `limit`; when PostgreSQL is not installed,
/// prints `SKIP: test: why` and passes.
pub async fn on_postgres<F: Future<Output = anyhow::Result<()>>>(
    test: &str,
    limit: Duration,
    what: &str,
    suite: impl FnOnce(Backend) -> F,
) -> anyhow::Result<()> {
    let pg = match Postgres::start().await? {
        Ok(pg) => pg,
        Err(reason) => {
            eprintln!("SKIP: {test}: {reason}");
            return Ok(());
        }
    };
    within(limit, what, suite(Backend::Postgres(Box::new(pg)))).await?
}
