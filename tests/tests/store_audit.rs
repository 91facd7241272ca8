//! The audit hash chain in the store: one suite, run against embedded SQLite and against a
//! throwaway PostgreSQL server (skipped, with a SKIP line, when PostgreSQL is not installed). Every
//! case gets a fresh database.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use mandate_control_plane::api::audit::verify_store;
use mandate_control_plane::audit::{Breakage, GENESIS, TrustKeys, checkpoint_if_due};
use mandate_control_plane::store::{Store, StoreLocation};
use mandate_identity::TrustDomain;
use mandate_identity::ca::CertificateAuthority;
use mandate_wire::{DecisionRecord, DestinationRecord, Direction};
use sqlx::Connection as _;

/// The whole suite on one backend.
const SUITE_LIMIT: Duration = Duration::from_secs(180);

const SIDECAR: &str = "spiffe://mandate.local/agent/research";

mod store_backend;

use store_backend::{Backend, run_cases};

async fn suite(backend: Backend) -> anyhow::Result<()> {
    run_cases!(
        "store_audit",
        backend,
        the_chain_stays_contiguous_under_concurrent_ingest,
        decisions_from_before_the_chain_are_chained_once,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_chain_on_sqlite() -> anyhow::Result<()> {
    store_backend::on_sqlite(
        "mandate-e2e-audit-",
        SUITE_LIMIT,
        "audit chain suite on sqlite",
        suite,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_chain_on_postgres() -> anyhow::Result<()> {
    store_backend::on_postgres(
        "audit_chain_on_postgres",
        SUITE_LIMIT,
        "audit chain suite on postgres",
        suite,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn decision(n: u32) -> DecisionRecord {
    DecisionRecord {
        decision_id: format!("0198a1b2-0000-7000-8000-{n:012}"),
        timestamp: format!("2026-01-01T00:00:{:02}.{:03}Z", n / 1000 % 60, n % 1000),
        direction: Direction::Outbound,
        source: SIDECAR.into(),
        destination: DestinationRecord {
            host: "tools.internal".into(),
            port: 443,
            spiffe_id: None,
        },
        method: Some("GET".into()),
        path: Some(format!("/items/{n}")),
        mcp: None,
        delegation: None,
        approval: None,
        allow: n.is_multiple_of(2),
        enforced: true,
        reason: "test".into(),
        policy_version: Some("1".into()),
        eval_us: 7,
        trace_id: None,
        sidecar: "sidecar-research".into(),
        status: None,
    }
}

fn test_ca() -> CertificateAuthority {
    let td: TrustDomain = "mandate.local".parse().unwrap();
    CertificateAuthority::generate(td, Duration::from_secs(3600)).unwrap()
}

/// Runs `sql` on the store's database directly, as someone with access to it could.
async fn exec(location: &StoreLocation, sql: &str) -> anyhow::Result<()> {
    match location {
        StoreLocation::Sqlite(path) => {
            let mut c =
                sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await?;
            sqlx::raw_sql(sql).execute(&mut c).await?;
            c.close().await?;
        }
        StoreLocation::Postgres(url) => {
            let mut c = sqlx::PgConnection::connect(url).await?;
            sqlx::raw_sql(sql).execute(&mut c).await?;
            c.close().await?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Eight writers (on PostgreSQL: split over two replicas) ingest overlapping batches at once; the
/// chain holds every distinct decision once, with seq 1..N and no gap, and verifies.
async fn the_chain_stays_contiguous_under_concurrent_ingest(
    a: Store,
    location: &StoreLocation,
) -> anyhow::Result<()> {
    let b = match location {
        StoreLocation::Postgres(_) => Store::open(location).await?,
        StoreLocation::Sqlite(_) => a.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..8u32 {
        let store = if writer % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        tasks.spawn(async move {
            let mut accepted = 0;
            for round in 0..10u32 {
                // Writers w and w+1 share half their ids: duplicates race across writers.
                let batch: Vec<_> = (0..40)
                    .map(|i| decision(writer * 200 + round * 20 + i))
                    .collect();
                accepted += store.insert_decisions(SIDECAR, &batch).await?.accepted;
            }
            anyhow::Ok(accepted)
        });
    }
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        accepted += r??;
    }
    let distinct: BTreeSet<u32> = (0..8u32)
        .flat_map(|w| (0..10u32).flat_map(move |r| (0..40).map(move |i| w * 200 + r * 20 + i)))
        .collect();
    anyhow::ensure!(
        accepted == distinct.len() as u64,
        "accepted {accepted}, distinct ids {}",
        distinct.len()
    );
    let records = a.audit_records(1, 100_000).await?;
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (1..=distinct.len() as u64).collect();
    anyhow::ensure!(seqs == expected, "seqs are not 1..={}", distinct.len());
    let ids: BTreeSet<&str> = records.iter().map(|r| r.decision_id.as_str()).collect();
    anyhow::ensure!(
        ids.len() == records.len(),
        "a decision entered the chain twice"
    );
    anyhow::ensure!(
        records[0].prev_hash == GENESIS,
        "seq 1 links to the genesis hash"
    );
    let head = a.audit_head().await?;
    anyhow::ensure!(head.seq == distinct.len() as u64 && head.hash == records.last().unwrap().hash);

    // A checkpoint of the head, then the whole chain verifies against the CA.
    let ca = test_ca();
    let checkpoint = checkpoint_if_due(&a, &ca, Duration::ZERO)
        .await?
        .context("a checkpoint was due")?;
    anyhow::ensure!(checkpoint.seq == head.seq);
    anyhow::ensure!(checkpoint_if_due(&a, &ca, Duration::ZERO).await?.is_none());
    let keys = TrustKeys::from_pem(ca.cert_pem()).map_err(anyhow::Error::msg)?;
    let report = verify_store(&b, keys.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    anyhow::ensure!(report.ok, "{}", report.summary);
    anyhow::ensure!(
        report
            .summary
            .starts_with(&format!("{} records, 1 checkpoint verified", head.seq)),
        "{}",
        report.summary
    );
    // A checkpoint signed by another CA does not verify.
    let other = TrustKeys::from_pem(test_ca().cert_pem()).map_err(anyhow::Error::msg)?;
    let report = verify_store(&a, other)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    anyhow::ensure!(
        !report.ok && report.failure.as_ref().map(|f| f.kind) == Some(Breakage::Checkpoint),
        "{}",
        report.summary
    );
    Ok(())
}

/// Decisions stored before migration 0005 have no seq: opening the store chains them once, in
/// time order. A row put in by hand later is never taken into the chain: verify names it.
async fn decisions_from_before_the_chain_are_chained_once(
    store: Store,
    location: &StoreLocation,
) -> anyhow::Result<()> {
    let batch: Vec<_> = (0..30).rev().map(decision).collect();
    store.insert_decisions(SIDECAR, &batch).await?;
    drop(store);
    // As the database looked right after the migration.
    exec(
        location,
        &format!(
            "UPDATE decisions SET seq = NULL, prev_hash = NULL, hash = NULL; \
             UPDATE audit_head SET seq = 0, hash = '{GENESIS}', backfilled = 0;"
        ),
    )
    .await?;
    let store = Store::open(location).await?;
    let records = store.audit_records(1, 1000).await?;
    anyhow::ensure!(records.len() == 30, "{} records chained", records.len());
    // In time order: decision(0) first, although it was ingested last.
    anyhow::ensure!(records[0].decision_id == decision(0).decision_id);
    let keys = TrustKeys::from_pem(test_ca().cert_pem()).map_err(anyhow::Error::msg)?;
    let report = verify_store(&store, keys.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    anyhow::ensure!(report.ok && report.records == 30, "{}", report.summary);

    // A hand-inserted row without a seq stays outside the chain, also after a restart.
    drop(store);
    exec(
        location,
        "INSERT INTO decisions (decision_id, ts, ts_ms, source, allow, reported_by, record) \
         VALUES ('forged', '2026-01-01T00:00:00Z', 1767225600000, 'x', 1, 'x', '{}')",
    )
    .await?;
    let store = Store::open(location).await?;
    let report = verify_store(&store, keys)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let failure = report.failure.context("the forged row was not noticed")?;
    anyhow::ensure!(
        failure.kind == Breakage::Inserted && failure.decision_id.as_deref() == Some("forged"),
        "{failure:?}"
    );
    Ok(())
}
