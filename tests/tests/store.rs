//! The control plane's store: one suite, run against embedded SQLite and against a throwaway
//! PostgreSQL server (skipped, with a SKIP line, when PostgreSQL is not installed). Every case gets
//! a fresh database; cases that need to reopen the store, or a second replica, get its location.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mandate_control_plane::store::{
    BundleSummary, Change, DecisionQuery, GrantQuery, GrantStatus, JoinTokenRefusal, NewBundle,
    NewGrant, NewWorkload, Store, StoreError, StoreLocation, StoredDelegationKey, StoredSecret,
    WorkloadKind, WorkloadStatus,
};
use mandate_e2e::within;
use mandate_identity::TrustDomain;
use mandate_identity::ca::CertificateAuthority;
use mandate_wire::{
    DecisionRecord, DelegationRecord, DestinationRecord, Direction, McpRecord, Reach,
    RouteProtocol, SignedBundle,
};
use serde_json::json;
use sqlx::Connection as _;
use tokio::sync::broadcast;

/// The whole suite on one backend; generous because a 2-core CI machine runs other tests too.
const SUITE_LIMIT: Duration = Duration::from_secs(300);

/// How quickly a change must reach a subscriber (this replica's or another's).
const CHANGE_WITHIN: Duration = Duration::from_secs(1);

/// Decision ingest the store must sustain (release builds; debug builds only report).
const INGEST_TARGET_PER_SEC: f64 = 20_000.0;

mod store_backend;

use store_backend::{Backend, run_cases};

async fn suite(backend: Backend) -> anyhow::Result<()> {
    run_cases!(
        "store",
        backend,
        migrations_are_idempotent,
        the_ca_is_one_row,
        workloads_insert_conflict_list_lookup,
        status_changes_bump_the_revision,
        registry_snapshot_shape,
        join_tokens_are_single_use,
        bundles_are_versioned_and_activated,
        decisions_are_idempotent,
        decision_queries_filter,
        decision_ingest_rate,
        grants_insert_list_revoke_close,
        delegation_keys_and_revision,
    );
    if let Backend::Postgres(_) = backend {
        run_cases!("store", backend, replicas_see_each_others_changes);
        run_cases!(
            "store",
            backend,
            replicas_see_each_others_delegation_changes
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_sqlite() -> anyhow::Result<()> {
    store_backend::on_sqlite(
        "mandate-e2e-store-",
        SUITE_LIMIT,
        "store suite on sqlite",
        suite,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_postgres() -> anyhow::Result<()> {
    store_backend::on_postgres(
        "store_on_postgres",
        SUITE_LIMIT,
        "store suite on postgres",
        suite,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn agent(name: &str) -> NewWorkload {
    NewWorkload {
        name: name.into(),
        kind: WorkloadKind::Agent,
        spiffe_id: format!("spiffe://mandate.local/agent/{name}"),
        owner: "alice@example.com".into(),
        description: format!("the {name} agent"),
        ceiling: vec![json!({"tool": "search", "methods": ["GET"]})],
        autonomous: vec![json!({"tool": "search"})],
        labels: BTreeMap::from([("team".into(), "research".into())]),
        reach: Reach::default(),
    }
}

fn service(name: &str) -> NewWorkload {
    NewWorkload {
        kind: WorkloadKind::Service,
        spiffe_id: format!("spiffe://mandate.local/service/{name}"),
        ceiling: vec![],
        autonomous: vec![],
        labels: BTreeMap::new(),
        reach: Reach {
            addresses: vec![format!("{name}:8080"), "10.0.0.3:8080".into()],
            inbound: Some(format!("{name}:15006")),
            protocol: RouteProtocol::Http,
        },
        ..agent(name)
    }
}

async fn revision(store: &Store) -> anyhow::Result<u64> {
    Ok(store.registry().await?.revision)
}

/// The next change on `rx`, or an error when none comes within [`CHANGE_WITHIN`].
async fn next_change(rx: &mut broadcast::Receiver<Change>, what: &str) -> anyhow::Result<Change> {
    Ok(within(CHANGE_WITHIN, what, rx.recv()).await??)
}

/// Waits for `wanted` on `rx` (other changes may come first, e.g. echoes), for at most [`CHANGE_WITHIN`].
async fn expect_change(
    rx: &mut broadcast::Receiver<Change>,
    wanted: Change,
    what: &str,
) -> anyhow::Result<()> {
    within(CHANGE_WITHIN, what, async {
        loop {
            match rx.recv().await {
                Ok(change) if change == wanted => return Ok(()),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => return Err(anyhow::anyhow!("{what}: {e}")),
            }
        }
    })
    .await?
}

/// Lets this replica's own echoes arrive, then drops everything queued, so the next change on
/// `rx` can only come from what the test does next.
async fn settle(rx: &mut broadcast::Receiver<Change>) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    *rx = rx.resubscribe();
}

fn test_ca() -> CertificateAuthority {
    let td: TrustDomain = "mandate.local".parse().expect("trust domain");
    CertificateAuthority::generate(td, Duration::from_secs(3600)).expect("CA")
}

fn new_bundle(rule: &str) -> NewBundle {
    NewBundle {
        modules: BTreeMap::from([(
            "authz.rego".to_owned(),
            format!("package mandate.authz\n\ndefault allow := {rule}\n"),
        )]),
        data: r#"{"limits":{"max":3}}"#.into(),
        message: format!("allow := {rule}"),
        tests_passed: 4,
    }
}

async fn store_bundle(
    store: &Store,
    ca: &CertificateAuthority,
    rule: &str,
) -> Result<BundleSummary, StoreError> {
    let bundle = new_bundle(rule);
    let (modules, data) = (bundle.modules.clone(), bundle.data.clone());
    store
        .insert_bundle(bundle, |version| {
            SignedBundle::sign(version, modules, data, |input| ca.sign_bytes(input))
        })
        .await
}

fn decision(
    n: u32,
    timestamp: &str,
    source: &str,
    subject: Option<&str>,
    mcp: Option<(&str, &str)>,
    allow: bool,
) -> DecisionRecord {
    DecisionRecord {
        decision_id: format!("0198a1b2-0000-7000-8000-{n:012}"),
        timestamp: timestamp.into(),
        direction: Direction::Outbound,
        source: source.into(),
        destination: DestinationRecord {
            host: "tools.internal".into(),
            port: 443,
            spiffe_id: Some("spiffe://mandate.local/service/tools".into()),
        },
        method: Some("POST".into()),
        path: Some("/mcp".into()),
        mcp: mcp.map(|(method, name)| McpRecord {
            method: Some(method.into()),
            name: Some(name.into()),
        }),
        delegation: subject.map(|s| DelegationRecord {
            subject: s.into(),
            grant_id: "grant-1".into(),
            actors: vec![source.into()],
        }),
        approval: None,
        allow,
        enforced: true,
        reason: if allow {
            "allowed by ceiling".into()
        } else {
            "tool not in ceiling".into()
        },
        policy_version: Some("3".into()),
        eval_us: 41,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        sidecar: "sidecar-research".into(),
        status: Some(200),
    }
}

const RESEARCH: &str = "spiffe://mandate.local/agent/research";
const WRITER: &str = "spiffe://mandate.local/agent/writer";
const SIDECAR: &str = "spiffe://mandate.local/agent/research";

// ---------------------------------------------------------------------------------------------
// Cases

async fn migrations_are_idempotent(store: Store, location: &StoreLocation) -> anyhow::Result<()> {
    if let StoreLocation::Sqlite(path) = location {
        assert!(
            path.is_file(),
            "the database file and its directory were created"
        );
    }
    let expected = match location {
        StoreLocation::Sqlite(_) => "sqlite",
        StoreLocation::Postgres(_) => "postgres",
    };
    assert_eq!(store.backend(), expected);
    store.insert_workload(&agent("research")).await?;
    drop(store);

    // Reopening runs the migrator again: nothing re-applied, nothing lost.
    for _ in 0..2 {
        let store = Store::open(location).await?;
        let registry = store.registry().await?;
        assert_eq!(registry.revision, 1);
        assert_eq!(registry.agents.len(), 1);
    }
    Ok(())
}

async fn the_ca_is_one_row(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    assert_eq!(store.ca().await?, None);
    let first = StoredSecret {
        cert_pem: "-----BEGIN CERTIFICATE-----\nfirst\n-----END CERTIFICATE-----\n".into(),
        key_sealed: "sealed-first".into(),
    };
    store.put_ca(&first, false).await?;
    assert_eq!(store.ca().await?, Some(first.clone()));

    let second = StoredSecret {
        cert_pem: "second".into(),
        key_sealed: "sealed-second".into(),
    };
    let err = store.put_ca(&second, false).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(store.ca().await?, Some(first));

    store.put_ca(&second, true).await?;
    assert_eq!(store.ca().await?, Some(second));
    Ok(())
}

async fn workloads_insert_conflict_list_lookup(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let research = store.insert_workload(&agent("research")).await?;
    assert_eq!(research.status, WorkloadStatus::Active);
    assert_eq!(research.created_at, research.updated_at);
    time::OffsetDateTime::parse(
        &research.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .context("created_at is RFC 3339")?;
    store.insert_workload(&agent("writer")).await?;
    // The same name as a different kind is a different workload.
    store.insert_workload(&service("research")).await?;

    let err = store.insert_workload(&agent("research")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { what, .. } if what == "agent research"),
        "{err:?}"
    );
    let mut stolen_id = agent("impostor");
    stolen_id.spiffe_id = research.spiffe_id.clone();
    let err = store.insert_workload(&stolen_id).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { what, .. } if what.contains(&research.spiffe_id)),
        "{err:?}"
    );
    assert_eq!(revision(&store).await?, 3, "refused inserts bump nothing");

    let fetched = store.workload(WorkloadKind::Agent, "research").await?;
    assert_eq!(
        fetched, research,
        "ceiling, autonomous scopes, labels and times round-trip"
    );
    let err = store
        .workload(WorkloadKind::Agent, "nobody")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { what } if what == "agent nobody"),
        "{err:?}"
    );

    let by_id = store.workload_by_spiffe_id(&research.spiffe_id).await?;
    assert_eq!(by_id.as_ref(), Some(&research));
    assert_eq!(
        store
            .workload_by_spiffe_id("spiffe://mandate.local/agent/nobody")
            .await?,
        None
    );

    let names = |ws: Vec<mandate_control_plane::store::Workload>| {
        ws.into_iter()
            .map(|w| format!("{} {}", w.kind, w.name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.workloads(Some(WorkloadKind::Agent)).await?),
        ["agent research", "agent writer"]
    );
    assert_eq!(
        names(store.workloads(Some(WorkloadKind::Service)).await?),
        ["service research"]
    );
    assert_eq!(
        names(store.workloads(None).await?),
        ["agent research", "agent writer", "service research"]
    );
    Ok(())
}

async fn status_changes_bump_the_revision(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let mut changes = store.subscribe();
    store.insert_workload(&agent("research")).await?;
    assert_eq!(
        next_change(&mut changes, "insert announced").await?,
        Change::Registry
    );
    assert_eq!(revision(&store).await?, 1);

    let suspended = store
        .set_status(WorkloadKind::Agent, "research", WorkloadStatus::Suspended)
        .await?;
    assert_eq!(suspended.status, WorkloadStatus::Suspended);
    assert_eq!(revision(&store).await?, 2);
    expect_change(&mut changes, Change::Registry, "suspend announced").await?;

    // The same status again is a no-op: no bump.
    store
        .set_status(WorkloadKind::Agent, "research", WorkloadStatus::Suspended)
        .await?;
    assert_eq!(revision(&store).await?, 2);

    store
        .set_status(WorkloadKind::Agent, "research", WorkloadStatus::Active)
        .await?;
    assert_eq!(revision(&store).await?, 3);
    let revoked = store
        .set_status(WorkloadKind::Agent, "research", WorkloadStatus::Revoked)
        .await?;
    assert_eq!(revoked.status, WorkloadStatus::Revoked);
    assert_eq!(revision(&store).await?, 4);

    // Revoked is terminal.
    for status in [WorkloadStatus::Active, WorkloadStatus::Suspended] {
        let err = store
            .set_status(WorkloadKind::Agent, "research", status)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict { what, .. } if what == "agent research"),
            "{err:?}"
        );
        assert!(err.to_string().contains("final"), "{err}");
    }
    store
        .set_status(WorkloadKind::Agent, "research", WorkloadStatus::Revoked)
        .await?;
    assert_eq!(revision(&store).await?, 4);
    assert_eq!(
        store
            .workload(WorkloadKind::Agent, "research")
            .await?
            .status,
        WorkloadStatus::Revoked
    );

    let err = store
        .set_status(WorkloadKind::Service, "research", WorkloadStatus::Suspended)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    Ok(())
}

async fn registry_snapshot_shape(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let empty = store.registry().await?;
    assert_eq!(empty.revision, 0);
    assert!(empty.agents.is_empty() && empty.services.is_empty());

    store.insert_workload(&agent("research")).await?;
    store.insert_workload(&agent("writer")).await?;
    store.insert_workload(&service("tools")).await?;
    store
        .set_status(WorkloadKind::Agent, "writer", WorkloadStatus::Suspended)
        .await?;

    let registry = store.registry().await?;
    assert_eq!(registry.revision, 4);
    assert_eq!(
        registry.agents.keys().collect::<Vec<_>>(),
        ["research", "writer"]
    );
    assert_eq!(registry.services.keys().collect::<Vec<_>>(), ["tools"]);
    let research = &registry.agents["research"];
    assert_eq!(
        research,
        &store
            .workload(WorkloadKind::Agent, "research")
            .await?
            .registry_entry()
    );
    assert_eq!(
        registry.inactive_ids().collect::<Vec<_>>(),
        ["spiffe://mandate.local/agent/writer"]
    );
    let data = registry.policy_data();
    assert_eq!(data["agents"]["research"]["ceiling"][0]["tool"], "search");
    assert_eq!(
        data["agents"]["research"]["autonomous"][0]["tool"],
        "search"
    );
    assert_eq!(data["services"]["tools"]["autonomous"], json!([]));
    assert_eq!(
        data["services"]["tools"]["reach"],
        json!({"addresses": ["tools:8080", "10.0.0.3:8080"], "inbound": "tools:15006", "protocol": "http"}),
        "how a service is reached round-trips"
    );
    assert!(data["agents"]["research"].get("reach").is_none());
    assert_eq!(data["agents"]["research"]["labels"]["team"], "research");
    assert_eq!(data["agents"]["writer"]["status"], "suspended");
    assert_eq!(data["services"]["tools"]["owner"], "alice@example.com");
    Ok(())
}

async fn join_tokens_are_single_use(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    store.insert_workload(&agent("research")).await?;
    let now = 1_750_000_000;

    store
        .insert_join_token("hash-1", RESEARCH, now + 3600)
        .await?;
    assert_eq!(store.redeem_join_token("hash-1", now).await?, RESEARCH);
    let err = store.redeem_join_token("hash-1", now).await.unwrap_err();
    assert!(
        matches!(err, StoreError::JoinToken(JoinTokenRefusal::Used)),
        "{err:?}"
    );

    let err = store
        .redeem_join_token("hash-never", now)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::JoinToken(JoinTokenRefusal::Unknown)),
        "{err:?}"
    );

    store
        .insert_join_token("hash-2", RESEARCH, now + 60)
        .await?;
    let err = store
        .redeem_join_token("hash-2", now + 60)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::JoinToken(JoinTokenRefusal::Expired)),
        "{err:?}"
    );
    assert!(err.to_string().contains("mandate agent token"), "{err}");

    let err = store
        .insert_join_token("hash-3", "spiffe://mandate.local/agent/nobody", now + 60)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = store
        .insert_join_token("hash-1", RESEARCH, now + 60)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");

    // Racing redeems: for each token exactly one wins, every other one is told it was used.
    for round in 0..5 {
        let hash = format!("race-{round}");
        store.insert_join_token(&hash, RESEARCH, now + 3600).await?;
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let hash = hash.clone();
                tokio::spawn(async move { store.redeem_join_token(&hash, now).await })
            })
            .collect();
        let mut won = 0;
        for racer in racers {
            match racer.await? {
                Ok(id) => {
                    assert_eq!(id, RESEARCH);
                    won += 1;
                }
                Err(StoreError::JoinToken(JoinTokenRefusal::Used)) => {}
                Err(e) => return Err(e).context("a racing redeem failed otherwise"),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one redeem wins");
    }
    Ok(())
}

async fn bundles_are_versioned_and_activated(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let ca = test_ca();
    assert_eq!(store.active_bundle().await?, None);
    assert!(store.bundles().await?.is_empty());
    let mut changes = store.subscribe();

    let first = store_bundle(&store, &ca, "false").await?;
    assert_eq!(first.version, 1);
    assert!(first.active);
    assert_eq!(first.modules, ["authz.rego"]);
    assert_eq!(first.tests_passed, 4);
    assert_eq!(first.message, "allow := false");
    expect_change(&mut changes, Change::Policy, "insert announced").await?;

    let second = store_bundle(&store, &ca, "true").await?;
    assert_eq!(second.version, 2);
    let listed = store.bundles().await?;
    assert_eq!(
        listed
            .iter()
            .map(|b| (b.version, b.active))
            .collect::<Vec<_>>(),
        [(2, true), (1, false)],
        "newest first, only the latest active"
    );
    assert_eq!(listed[0], second);

    let active = store.active_bundle().await?.context("an active bundle")?;
    assert_eq!(active.version, 2);
    assert_eq!(active.digest, second.digest);
    let data = active
        .verify(ca.cert_pem())
        .context("stored bundle verifies")?;
    assert_eq!(data["limits"]["max"], 3);

    // Rollback to version 1.
    let rolled_back = store.activate_bundle(1).await?;
    assert_eq!(rolled_back.version, 1);
    assert!(rolled_back.active);
    expect_change(&mut changes, Change::Policy, "rollback announced").await?;
    let active = store.active_bundle().await?.context("an active bundle")?;
    assert_eq!(active.version, 1);
    active.verify(ca.cert_pem())?;
    assert!(active.modules["authz.rego"].contains("allow := false"));
    assert_eq!(
        store
            .bundles()
            .await?
            .iter()
            .map(|b| (b.version, b.active))
            .collect::<Vec<_>>(),
        [(2, false), (1, true)]
    );
    // Activating the active one changes nothing.
    assert!(store.activate_bundle(1).await?.active);

    let err = store.activate_bundle(9).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { what } if what == "bundle 9"),
        "{err:?}"
    );

    // A failed signature stores nothing, and the next bundle still gets the next version.
    let err = store
        .insert_bundle(new_bundle("true"), |_| {
            Err(std::io::Error::other("no randomness"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Sign(_)), "{err:?}");
    // A bundle signed for other contents is refused.
    let err = store
        .insert_bundle(new_bundle("true"), |version| {
            SignedBundle::sign(version, BTreeMap::new(), "{}".into(), |i| ca.sign_bytes(i))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err:?}");
    assert_eq!(store.bundles().await?.len(), 2);
    assert_eq!(store.active_bundle().await?.map(|b| b.version), Some(1));
    assert_eq!(store_bundle(&store, &ca, "true").await?.version, 3);
    Ok(())
}

async fn decisions_are_idempotent(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let ts = "2025-06-01T12:00:00Z";
    let batch: Vec<_> = (0..3)
        .map(|n| decision(n, ts, RESEARCH, None, None, true))
        .collect();
    let first = store.insert_decisions(SIDECAR, &batch).await?;
    assert_eq!((first.accepted, first.duplicates), (3, 0));

    // A resend after a lost acknowledgement, with one new record.
    let mut resend = batch.clone();
    resend.push(decision(3, ts, RESEARCH, None, None, true));
    let second = store.insert_decisions(SIDECAR, &resend).await?;
    assert_eq!((second.accepted, second.duplicates), (1, 3));

    // A repeat inside one batch is a duplicate too.
    let repeated = vec![
        decision(4, ts, RESEARCH, None, None, true),
        decision(4, ts, RESEARCH, None, None, true),
    ];
    let third = store.insert_decisions(SIDECAR, &repeated).await?;
    assert_eq!((third.accepted, third.duplicates), (1, 1));

    let empty = store.insert_decisions(SIDECAR, &[]).await?;
    assert_eq!((empty.accepted, empty.duplicates), (0, 0));

    // More than one INSERT statement's worth, half of them already stored.
    let big: Vec<_> = (0..2_500)
        .map(|n| decision(n, ts, RESEARCH, None, None, n % 2 == 0))
        .collect();
    let fourth = store.insert_decisions(SIDECAR, &big).await?;
    assert_eq!((fourth.accepted, fourth.duplicates), (2_495, 5));

    let all = store
        .decisions(&DecisionQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await?;
    assert_eq!(all.len(), 2_500);
    assert_eq!(
        all.iter().find(|d| d.decision_id == batch[1].decision_id),
        Some(&batch[1]),
        "the full record round-trips"
    );
    Ok(())
}

async fn decision_queries_filter(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let records = vec![
        decision(
            1,
            "2025-06-01T10:00:00Z",
            RESEARCH,
            Some("bob"),
            Some(("tools/call", "search")),
            true,
        ),
        decision(
            2,
            "2025-06-01T11:00:00Z",
            RESEARCH,
            Some("carol"),
            Some(("tools/call", "delete")),
            false,
        ),
        // The same instant written with an offset: ordering is by time, not by text.
        decision(
            3,
            "2025-06-01T13:30:00+01:00",
            WRITER,
            Some("bob"),
            Some(("tools/call", "search")),
            true,
        ),
        // Not a tool call: the prompt name is no tool.
        decision(
            4,
            "2025-06-01T13:00:00Z",
            WRITER,
            None,
            Some(("prompts/get", "search")),
            false,
        ),
        decision(5, "2025-06-01T14:00:00.250Z", RESEARCH, None, None, true),
    ];
    let result = store.insert_decisions(SIDECAR, &records).await?;
    assert_eq!(result.accepted, 5);

    let ids = |q: DecisionQuery| {
        let store = store.clone();
        async move {
            Ok::<_, StoreError>(
                store
                    .decisions(&q)
                    .await?
                    .into_iter()
                    .map(|d| d.decision_id[d.decision_id.len() - 1..].to_owned())
                    .collect::<Vec<_>>()
                    .join(""),
            )
        }
    };
    let q = |f: fn(&mut DecisionQuery)| {
        let mut q = DecisionQuery {
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        q
    };

    assert_eq!(ids(q(|_| {})).await?, "54321", "newest first");
    assert_eq!(ids(q(|q| q.source = Some(RESEARCH.into()))).await?, "521");
    assert_eq!(ids(q(|q| q.subject = Some("bob".into()))).await?, "31");
    assert_eq!(ids(q(|q| q.tool = Some("search".into()))).await?, "31");
    assert_eq!(ids(q(|q| q.tool = Some("delete".into()))).await?, "2");
    assert_eq!(ids(q(|q| q.allow = Some(false))).await?, "42");
    assert_eq!(ids(q(|q| q.allow = Some(true))).await?, "531");
    assert_eq!(
        ids(q(|q| q.since = Some("2025-06-01T11:00:00Z".into()))).await?,
        "5432",
        "since is inclusive"
    );
    assert_eq!(
        ids(q(|q| q.until = Some("2025-06-01T12:30:00Z".into()))).await?,
        "21",
        "until is exclusive"
    );
    assert_eq!(
        ids(q(|q| {
            q.since = Some("2025-06-01T10:30:00Z".into());
            q.until = Some("2025-06-01T14:00:00.250Z".into());
        }))
        .await?,
        "432"
    );
    assert_eq!(
        ids(q(|q| {
            q.source = Some(RESEARCH.into());
            q.allow = Some(true);
            q.since = Some("2025-06-01T09:00:00+02:00".into());
        }))
        .await?,
        "51"
    );
    assert_eq!(ids(q(|q| q.limit = 2)).await?, "54");
    assert_eq!(ids(q(|q| q.limit = 0)).await?, "");
    assert_eq!(ids(q(|q| q.subject = Some("mallory".into()))).await?, "");

    let err = store
        .decisions(&q(|q| q.since = Some("last tuesday".into())))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { what, .. } if what == "since"),
        "{err:?}"
    );
    Ok(())
}

async fn decision_ingest_rate(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    const TOTAL: u32 = 40_000;
    const BATCH: usize = 1_000;
    let records: Vec<_> = (0..TOTAL)
        .map(|n| {
            let mut d = decision(
                n,
                "2025-06-01T12:00:00.123Z",
                RESEARCH,
                Some("bob"),
                Some(("tools/call", "search")),
                n % 3 != 0,
            );
            d.decision_id = format!("0198a1b2-0000-7000-9000-{n:012}");
            d
        })
        .collect();
    let started = Instant::now();
    let mut accepted = 0;
    for batch in records.chunks(BATCH) {
        accepted += store.insert_decisions(SIDECAR, batch).await?.accepted;
    }
    let elapsed = started.elapsed();
    assert_eq!(accepted, u64::from(TOTAL));
    let rate = f64::from(TOTAL) / elapsed.as_secs_f64();
    eprintln!(
        "store/{}: ingested {TOTAL} decisions in batches of {BATCH} in {elapsed:.2?}: {rate:.0}/s",
        store.backend()
    );
    if !cfg!(debug_assertions) {
        assert!(
            rate >= INGEST_TARGET_PER_SEC,
            "ingest on {} is {rate:.0}/s, below {INGEST_TARGET_PER_SEC}/s",
            store.backend()
        );
    }
    Ok(())
}

async fn replicas_see_each_others_changes(
    a: Store,
    location: &StoreLocation,
) -> anyhow::Result<()> {
    let b = Store::open(location).await?;
    let ca = test_ca();
    let mut on_a = a.subscribe();
    let mut on_b = b.subscribe();

    let started = Instant::now();
    a.insert_workload(&agent("research")).await?;
    expect_change(&mut on_b, Change::Registry, "A's insert seen by B").await?;
    eprintln!(
        "store/postgres: B saw A's registry change after {:?}",
        started.elapsed()
    );
    assert_eq!(b.registry().await?.agents.len(), 1);

    settle(&mut on_a).await;
    let started = Instant::now();
    store_bundle(&b, &ca, "true").await?;
    expect_change(&mut on_a, Change::Policy, "B's bundle seen by A").await?;
    eprintln!(
        "store/postgres: A saw B's policy change after {:?}",
        started.elapsed()
    );
    assert_eq!(
        a.active_bundle().await?.map(|bundle| bundle.version),
        Some(1)
    );

    settle(&mut on_a).await;
    b.set_status(WorkloadKind::Agent, "research", WorkloadStatus::Suspended)
        .await?;
    expect_change(&mut on_a, Change::Registry, "B's suspend seen by A").await?;
    assert_eq!(
        a.workload(WorkloadKind::Agent, "research").await?.status,
        WorkloadStatus::Suspended
    );

    // Versions are assigned one after the other even when the replicas insert at once.
    let (x, y) = tokio::join!(
        store_bundle(&a, &ca, "false"),
        store_bundle(&b, &ca, "false")
    );
    let mut versions = [x?.version, y?.version];
    versions.sort();
    assert_eq!(versions, [2, 3]);

    // Cut every LISTEN connection: the listeners reconnect, tell their subscribers to re-read
    // (whatever was notified meanwhile is lost), and carry on.
    let StoreLocation::Postgres(url) = location else {
        unreachable!("this case runs on PostgreSQL only")
    };
    settle(&mut on_b).await;
    let mut admin = sqlx::PgConnection::connect(url).await?;
    let (cut,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await?;
    assert_eq!(cut, 2, "one LISTEN connection per replica");
    admin.close().await?;
    within(
        Duration::from_secs(5),
        "B re-listens and asks for a re-read",
        async { expect_change(&mut on_b, Change::Policy, "resync after reconnect").await },
    )
    .await??;
    settle(&mut on_b).await;
    a.set_status(WorkloadKind::Agent, "research", WorkloadStatus::Active)
        .await?;
    expect_change(
        &mut on_b,
        Change::Registry,
        "A's change after B reconnected",
    )
    .await?;

    // A replica whose store is dropped stops listening; the other carries on.
    drop(b);
    a.activate_bundle(1).await?;
    expect_change(&mut on_a, Change::Policy, "A's own rollback").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Grants and delegation keys

/// A grant of `agent`'s for alice, created at `created` (unix ms), lasting `ttl_ms`.
fn new_grant(n: u32, agent: &str, task: Option<&str>, created: i64, ttl_ms: i64) -> NewGrant {
    NewGrant {
        id: format!("0198a1b2-0000-7000-8000-{n:012}"),
        agent: agent.into(),
        agent_id: format!("spiffe://mandate.local/agent/{agent}"),
        subject: "alice@example.com".into(),
        scopes: vec![json!({"tool": "search"})],
        constraints: json!({"arguments": {"q": "mandate*"}}).as_object().cloned(),
        purpose: "research".into(),
        task: task.map(str::to_owned),
        approved_by: "bob@example.com".into(),
        approved_at: created,
        created_at: created,
        expires_at: created + ttl_ms,
    }
}

fn grant_query(f: impl FnOnce(&mut GrantQuery)) -> GrantQuery {
    let mut q = GrantQuery {
        limit: 100,
        ..GrantQuery::default()
    };
    f(&mut q);
    q
}

async fn grants_insert_list_revoke_close(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    const NOW: i64 = 1_800_000_000_000;
    store.insert_workload(&agent("research")).await?;
    store.insert_workload(&agent("writer")).await?;
    let a = store
        .insert_grant(&new_grant(1, "research", Some("t1"), NOW, 60_000))
        .await?;
    store
        .insert_grant(&new_grant(2, "writer", Some("t1"), NOW + 1, 60_000))
        .await?;
    store
        .insert_grant(&new_grant(3, "research", None, NOW + 2, 1_000))
        .await?;
    assert!(matches!(
        store
            .insert_grant(&new_grant(4, "nobody", None, NOW, 1_000))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store
            .insert_grant(&new_grant(1, "research", None, NOW, 1_000))
            .await,
        Err(StoreError::Conflict { .. })
    ));

    assert_eq!(store.grant(&a.id, NOW).await?, a, "everything round-trips");
    let ids = |grants: Vec<mandate_control_plane::store::Grant>| -> Vec<String> {
        grants.into_iter().map(|g| g.id[24..].to_owned()).collect()
    };
    let at = NOW + 5_000;
    assert_eq!(
        ids(store.grants(&grant_query(|_| {}), at).await?),
        ["000000000003", "000000000002", "000000000001"]
    );
    assert_eq!(
        ids(store
            .grants(&grant_query(|q| q.agent = Some("research".into())), at)
            .await?),
        ["000000000003", "000000000001"]
    );
    assert_eq!(
        ids(store
            .grants(&grant_query(|q| q.task = Some("t1".into())), at)
            .await?),
        ["000000000002", "000000000001"]
    );
    assert_eq!(
        ids(store
            .grants(&grant_query(|q| q.status = Some(GrantStatus::Expired)), at)
            .await?),
        ["000000000003"],
        "an active grant past its expiry shows as expired"
    );
    assert_eq!(
        store
            .grant(&new_grant(3, "x", None, 0, 0).id, at)
            .await?
            .status,
        GrantStatus::Expired
    );
    assert_eq!(
        ids(store
            .grants(
                &grant_query(|q| {
                    q.status = Some(GrantStatus::Active);
                    q.limit = 1;
                }),
                at
            )
            .await?),
        ["000000000002"]
    );

    // Revoking bumps the delegation revision once; the revoked grant is listed until it expires.
    let before = store.delegation_revision().await?;
    let revoked = store.revoke_grant(&a.id, "carol", at).await?;
    assert_eq!(revoked.status, GrantStatus::Revoked);
    assert_eq!(revoked.revoked_by.as_deref(), Some("carol"));
    assert_eq!(revoked.revoked_at, Some(at));
    assert_eq!(store.revoke_grant(&a.id, "dave", at + 1).await?, revoked);
    assert_eq!(store.delegation_revision().await?, before + 1);
    let listed = store.revoked_grants(at).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, a.id);
    assert_eq!(listed[0].expires_at, (NOW + 60_000) / 1000);
    assert!(store.revoked_grants(NOW + 60_000).await?.is_empty());
    assert!(matches!(
        store
            .revoke_grant("0198a1b2-0000-7000-8000-999999999999", "x", at)
            .await,
        Err(StoreError::NotFound { .. })
    ));

    // Closing a task closes its active grants (not the revoked one), once.
    let closed = store.close_task("t1", "alice", at).await?;
    assert_eq!(ids(closed.clone()), ["000000000002"]);
    assert_eq!(closed[0].status, GrantStatus::Closed);
    assert_eq!(store.delegation_revision().await?, before + 2);
    assert!(store.close_task("t1", "alice", at).await?.is_empty());
    assert_eq!(store.delegation_revision().await?, before + 2);
    assert!(matches!(
        store.close_task("t9", "alice", at).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.revoke_grant(&closed[0].id, "x", at).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store.revoked_grants(at).await?.len(), 2);
    Ok(())
}

fn stored_key(kid: &str, created_at: i64) -> StoredDelegationKey {
    StoredDelegationKey {
        kid: kid.into(),
        public_jwk: mandate_wire::Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            alg: "ES256".into(),
            key_use: "sig".into(),
            kid: kid.into(),
            x: "x".into(),
            y: "y".into(),
        },
        key_sealed: format!("sealed-{kid}"),
        created_at,
    }
}

async fn delegation_keys_and_revision(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let mut rx = store.subscribe();
    assert_eq!(store.delegation_revision().await?, 0);
    assert!(store.delegation_keys().await?.is_empty());
    assert!(
        store
            .insert_delegation_key(&stored_key("k1", 1_000), None)
            .await?
    );
    next_change(&mut rx, "key created").await?;
    // Another replica rotated meanwhile: a key created at or after the threshold stands.
    assert!(
        !store
            .insert_delegation_key(&stored_key("k2", 2_000), Some(1_000))
            .await?
    );
    assert!(
        store
            .insert_delegation_key(&stored_key("k2", 2_000), Some(1_001))
            .await?
    );
    assert!(matches!(
        store
            .insert_delegation_key(&stored_key("k2", 3_000), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    let keys = store.delegation_keys().await?;
    assert_eq!(keys, vec![stored_key("k1", 1_000), stored_key("k2", 2_000)]);
    assert_eq!(store.delegation_revision().await?, 2);
    let state = store
        .delegation_state(5_000, |keys, now| {
            assert_eq!(now, 5_000);
            keys.iter().skip(1).map(|k| k.public_jwk.clone()).collect()
        })
        .await?;
    assert_eq!(state.revision, 2);
    assert_eq!(state.keys.len(), 1);
    assert_eq!(state.keys[0].kid, "k2");
    assert!(state.revoked_grants.is_empty());
    Ok(())
}

async fn replicas_see_each_others_delegation_changes(
    a: Store,
    location: &StoreLocation,
) -> anyhow::Result<()> {
    let b = Store::open(location).await?;
    let mut on_b = b.subscribe();
    a.insert_workload(&agent("research")).await?;
    let grant = a
        .insert_grant(&new_grant(
            1,
            "research",
            Some("t"),
            1_800_000_000_000,
            60_000,
        ))
        .await?;
    settle(&mut on_b).await;
    let started = Instant::now();
    a.revoke_grant(&grant.id, "carol", 1_800_000_001_000)
        .await?;
    expect_change(&mut on_b, Change::Delegation, "A's revocation seen by B").await?;
    eprintln!(
        "store/postgres: B saw A's revocation after {:?}",
        started.elapsed()
    );
    assert_eq!(b.delegation_revision().await?, 1);
    settle(&mut on_b).await;
    a.insert_delegation_key(&stored_key("k1", 1_000), None)
        .await?;
    expect_change(&mut on_b, Change::Delegation, "A's new key seen by B").await?;
    assert_eq!(b.delegation_keys().await?.len(), 1);
    Ok(())
}
