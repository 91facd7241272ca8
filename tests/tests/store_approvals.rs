//! The control plane's per-action approvals and the audit columns they feed, in the store: one
//! suite, run against embedded SQLite and against a throwaway PostgreSQL server (skipped, with a
//! SKIP line, when PostgreSQL is not installed). Every case gets a fresh database.

use std::time::Duration;

use anyhow::Context as _;
use mandate_control_plane::store::{
    ApprovalRefusal, ApprovalStatus, DecisionQuery, NewApproval, Store, StoreError, StoreLocation,
    Verdict,
};
use mandate_wire::{
    ApprovalRecord, DecisionRecord, DelegationRecord, DestinationRecord, Direction,
};

/// The whole suite on one backend.
const SUITE_LIMIT: Duration = Duration::from_secs(120);

const RESEARCH: &str = "spiffe://mandate.local/agent/research";
const WRITER: &str = "spiffe://mandate.local/agent/writer";
/// Ten minutes, the default --approval-ttl.
const TTL_MS: i64 = 600_000;
/// A fixed "now" (2026-01-01T00:00:00Z): the store is given the time, never reads the clock.
const T0: i64 = 1_767_225_600_000;

mod store_backend;

use store_backend::{Backend, run_cases};

async fn suite(backend: Backend) -> anyhow::Result<()> {
    run_cases!(
        "store_approvals",
        backend,
        an_approval_is_redeemed_once,
        concurrent_redeems_have_one_winner,
        concurrent_decisions_have_one_winner,
        expired_approvals_cannot_be_decided_or_redeemed,
        rejected_approvals_name_who_rejected,
        only_the_asking_agent_and_the_same_call_redeem,
        approvals_list_by_status,
        decisions_keep_grant_and_approver,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_on_sqlite() -> anyhow::Result<()> {
    store_backend::on_sqlite(
        "mandate-e2e-approvals-",
        SUITE_LIMIT,
        "approvals suite on sqlite",
        suite,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_on_postgres() -> anyhow::Result<()> {
    store_backend::on_postgres(
        "approvals_on_postgres",
        SUITE_LIMIT,
        "approvals suite on postgres",
        suite,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn fingerprint(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn new_approval(agent: &str, n: u8) -> NewApproval {
    NewApproval {
        agent: agent.into(),
        decision_id: format!("0198a1b2-0000-7000-8000-{n:012}"),
        fingerprint: fingerprint(n),
        action: format!("mcp tools/call delete_file #{n} on tool:8080"),
        reason: "deleting needs a person's approval".into(),
        subject: Some("alice@example.com".into()),
        grant_id: Some("01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b".into()),
        policy_version: Some("4".into()),
    }
}

/// An approval asked for by research at T0 and approved by bob a second later.
async fn approved(store: &Store, n: u8) -> anyhow::Result<String> {
    let a = store
        .insert_approval(&new_approval(RESEARCH, n), T0, TTL_MS)
        .await?;
    store
        .decide_approval(&a.id, Verdict::Approve, "bob@example.com", T0 + 1_000)
        .await?;
    Ok(a.id)
}

fn conflict_why(e: StoreError) -> String {
    match e {
        StoreError::Conflict { why, .. } => why,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn an_approval_is_redeemed_once(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let asked = store
        .insert_approval(&new_approval(RESEARCH, 1), T0, TTL_MS)
        .await?;
    assert_eq!(asked.status, ApprovalStatus::Pending);
    assert_eq!(asked.expires_at, T0 + TTL_MS);
    assert_eq!(uuid_version(&asked.id), Some(7), "{}", asked.id);
    assert_eq!(store.approval(&asked.id, T0).await?, asked, "round-trips");

    assert_eq!(
        store
            .redeem_approval(&asked.id, RESEARCH, &fingerprint(1), T0 + 500)
            .await?,
        Err(ApprovalRefusal::Pending)
    );
    let decided = store
        .decide_approval(&asked.id, Verdict::Approve, "bob@example.com", T0 + 1_000)
        .await?;
    assert_eq!(decided.status, ApprovalStatus::Approved);
    assert_eq!(decided.decided_by.as_deref(), Some("bob@example.com"));
    assert_eq!(decided.decided_at, Some(T0 + 1_000));

    let used = store
        .redeem_approval(&asked.id, RESEARCH, &fingerprint(1), T0 + 2_000)
        .await?
        .expect("the first redeem wins");
    assert_eq!(used.status, ApprovalStatus::Used);
    assert_eq!(used.used_at, Some(T0 + 2_000));
    assert_eq!(used.decided_by.as_deref(), Some("bob@example.com"));

    assert_eq!(
        store
            .redeem_approval(&asked.id, RESEARCH, &fingerprint(1), T0 + 3_000)
            .await?,
        Err(ApprovalRefusal::AlreadyUsed),
        "the second redeem is refused: already used"
    );
    // Used stays used, also after the approval's time is up.
    assert_eq!(
        store.approval(&asked.id, T0 + TTL_MS * 2).await?.status,
        ApprovalStatus::Used
    );
    let why = conflict_why(
        store
            .decide_approval(&asked.id, Verdict::Reject, "carol", T0 + 4_000)
            .await
            .unwrap_err(),
    );
    assert!(
        why.contains("already approved by bob@example.com and used"),
        "{why}"
    );

    let missing = "01980f3a-7c2e-7b61-9a4e-3f0c1d2e5a6b";
    assert!(matches!(
        store
            .redeem_approval(missing, RESEARCH, &fingerprint(1), T0)
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store
            .decide_approval(missing, Verdict::Approve, "bob", T0)
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.approval(missing, T0).await,
        Err(StoreError::NotFound { .. })
    ));
    Ok(())
}

fn uuid_version(id: &str) -> Option<u32> {
    // xxxxxxxx-xxxx-Vxxx-…
    id.chars().nth(14)?.to_digit(16)
}

async fn concurrent_redeems_have_one_winner(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    for round in 0..5u8 {
        let id = approved(&store, round).await?;
        let redeems = (0..8).map(|_| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .redeem_approval(&id, RESEARCH, &fingerprint(round), T0 + 2_000)
                    .await
            })
        });
        let mut won = 0;
        for handle in redeems.collect::<Vec<_>>() {
            match handle.await?? {
                Ok(_) => won += 1,
                Err(ApprovalRefusal::AlreadyUsed) => {}
                Err(other) => panic!("a losing redeem says already used, not {other:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one redeem wins");
    }
    Ok(())
}

async fn concurrent_decisions_have_one_winner(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let a = store
        .insert_approval(&new_approval(RESEARCH, 1), T0, TTL_MS)
        .await?;
    let deciders = (0..6).map(|i| {
        let store = store.clone();
        let id = a.id.clone();
        tokio::spawn(async move {
            let (verdict, by) = if i % 2 == 0 {
                (Verdict::Approve, format!("approver-{i}"))
            } else {
                (Verdict::Reject, format!("rejecter-{i}"))
            };
            store.decide_approval(&id, verdict, &by, T0 + 1_000).await
        })
    });
    let mut winners = Vec::new();
    for handle in deciders.collect::<Vec<_>>() {
        match handle.await? {
            Ok(decided) => winners.push(decided),
            Err(StoreError::Conflict { why, .. }) => {
                assert!(why.contains("already"), "{why}");
            }
            Err(other) => return Err(other.into()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one decision stands");
    let stored = store.approval(&a.id, T0 + 2_000).await?;
    assert_eq!(stored.status, winners[0].status);
    assert_eq!(stored.decided_by, winners[0].decided_by);
    Ok(())
}

async fn expired_approvals_cannot_be_decided_or_redeemed(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let pending = store
        .insert_approval(&new_approval(RESEARCH, 1), T0, TTL_MS)
        .await?;
    let late = T0 + TTL_MS;
    assert_eq!(
        store.approval(&pending.id, late).await?.status,
        ApprovalStatus::Expired
    );
    let why = conflict_why(
        store
            .decide_approval(&pending.id, Verdict::Approve, "bob", late)
            .await
            .unwrap_err(),
    );
    assert!(why.contains("expired at 2026-01-01T00:10:00Z"), "{why}");
    assert_eq!(
        store.approval(&pending.id, late).await?.decided_by,
        None,
        "nothing was written"
    );

    // Approved in time, redeemed too late.
    let id = approved(&store, 2).await?;
    assert_eq!(
        store
            .redeem_approval(&id, RESEARCH, &fingerprint(2), late)
            .await?,
        Err(ApprovalRefusal::Expired { at: late })
    );
    // A millisecond earlier it still works.
    let id = approved(&store, 3).await?;
    assert!(
        store
            .redeem_approval(&id, RESEARCH, &fingerprint(3), late - 1)
            .await?
            .is_ok()
    );
    Ok(())
}

async fn rejected_approvals_name_who_rejected(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let a = store
        .insert_approval(&new_approval(RESEARCH, 1), T0, TTL_MS)
        .await?;
    let rejected = store
        .decide_approval(&a.id, Verdict::Reject, "carol@example.com", T0 + 1_000)
        .await?;
    assert_eq!(rejected.status, ApprovalStatus::Rejected);
    let refusal = store
        .redeem_approval(&a.id, RESEARCH, &fingerprint(1), T0 + 2_000)
        .await?
        .unwrap_err();
    assert_eq!(
        refusal,
        ApprovalRefusal::Rejected {
            by: "carol@example.com".into()
        }
    );
    assert!(
        refusal
            .message(&a.id)
            .contains("rejected by carol@example.com")
    );
    let why = conflict_why(
        store
            .decide_approval(&a.id, Verdict::Approve, "bob", T0 + 2_000)
            .await
            .unwrap_err(),
    );
    assert!(
        why.contains("already rejected by carol@example.com"),
        "{why}"
    );
    Ok(())
}

async fn only_the_asking_agent_and_the_same_call_redeem(
    store: Store,
    _: &StoreLocation,
) -> anyhow::Result<()> {
    let id = approved(&store, 1).await?;
    assert!(matches!(
        store
            .redeem_approval(&id, WRITER, &fingerprint(1), T0 + 2_000)
            .await?,
        Err(ApprovalRefusal::NotYours { .. })
    ));
    assert_eq!(
        store
            .redeem_approval(&id, RESEARCH, &fingerprint(9), T0 + 2_000)
            .await?,
        Err(ApprovalRefusal::Mismatch)
    );
    // Neither attempt used it up.
    assert_eq!(
        store.approval(&id, T0 + 2_000).await?.status,
        ApprovalStatus::Approved
    );
    assert!(
        store
            .redeem_approval(&id, RESEARCH, &fingerprint(1), T0 + 2_000)
            .await?
            .is_ok()
    );
    Ok(())
}

async fn approvals_list_by_status(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    // 1 pending, 2 approved, 3 rejected, 4 used, 5 pending but asked long ago (expired).
    let mut ids = Vec::new();
    for n in 1..=4u8 {
        ids.push(
            store
                .insert_approval(&new_approval(RESEARCH, n), T0 + i64::from(n), TTL_MS)
                .await?
                .id,
        );
    }
    store
        .decide_approval(&ids[1], Verdict::Approve, "bob", T0 + 10)
        .await?;
    store
        .decide_approval(&ids[2], Verdict::Reject, "carol", T0 + 10)
        .await?;
    store
        .decide_approval(&ids[3], Verdict::Approve, "bob", T0 + 10)
        .await?;
    store
        .redeem_approval(&ids[3], RESEARCH, &fingerprint(4), T0 + 20)
        .await?
        .expect("redeemed");
    ids.push(
        store
            .insert_approval(&new_approval(WRITER, 5), T0 - TTL_MS, TTL_MS)
            .await?
            .id,
    );

    let now = T0 + 30;
    let listed = |status: Option<ApprovalStatus>, limit: u32| {
        let store = store.clone();
        let ids = ids.clone();
        async move {
            Ok::<_, StoreError>(
                store
                    .approvals(status, limit, now)
                    .await?
                    .into_iter()
                    .map(|a| ids.iter().position(|id| *id == a.id).unwrap() + 1)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(listed(None, 100).await?, [4, 3, 2, 1, 5], "newest first");
    assert_eq!(listed(None, 2).await?, [4, 3]);
    assert_eq!(listed(Some(ApprovalStatus::Pending), 100).await?, [1]);
    assert_eq!(listed(Some(ApprovalStatus::Approved), 100).await?, [2]);
    assert_eq!(listed(Some(ApprovalStatus::Rejected), 100).await?, [3]);
    assert_eq!(listed(Some(ApprovalStatus::Used), 100).await?, [4]);
    assert_eq!(listed(Some(ApprovalStatus::Expired), 100).await?, [5]);
    // Later, the approved one expires too.
    let later = store
        .approvals(Some(ApprovalStatus::Expired), 100, T0 + TTL_MS + 5)
        .await?;
    assert_eq!(later.len(), 3, "the pending, the approved and the old one");
    Ok(())
}

fn decision(n: u32, grant: Option<&str>, approver: Option<&str>) -> DecisionRecord {
    DecisionRecord {
        decision_id: format!("0198a1b2-0000-7000-8000-{n:012}"),
        timestamp: format!("2026-01-01T00:00:0{n}Z"),
        direction: Direction::Outbound,
        source: RESEARCH.into(),
        destination: DestinationRecord {
            host: "tool".into(),
            port: 8080,
            spiffe_id: None,
        },
        method: Some("POST".into()),
        path: Some("/mcp".into()),
        mcp: None,
        delegation: grant.map(|g| DelegationRecord {
            subject: "alice@example.com".into(),
            grant_id: g.into(),
            actors: vec![RESEARCH.into()],
        }),
        approval: approver.map(|by| ApprovalRecord {
            id: format!("approval-{n}"),
            approved_by: by.into(),
        }),
        allow: true,
        enforced: true,
        reason: "approved".into(),
        policy_version: Some("4".into()),
        eval_us: 7,
        trace_id: None,
        sidecar: "s".into(),
        status: Some(200),
    }
}

async fn decisions_keep_grant_and_approver(store: Store, _: &StoreLocation) -> anyhow::Result<()> {
    let records = vec![
        decision(1, Some("g1"), Some("bob")),
        decision(2, Some("g1"), None),
        decision(3, Some("g2"), Some("carol")),
        decision(4, None, Some("bob")),
        decision(5, None, None),
    ];
    assert_eq!(
        store.insert_decisions(RESEARCH, &records).await?.accepted,
        5
    );
    let ids = |grant: Option<&str>, approver: Option<&str>| {
        let store = store.clone();
        let q = DecisionQuery {
            grant: grant.map(Into::into),
            approver: approver.map(Into::into),
            limit: 100,
            ..Default::default()
        };
        async move {
            Ok::<_, StoreError>(
                store
                    .decisions(&q)
                    .await?
                    .into_iter()
                    .map(|d| d.decision_id[d.decision_id.len() - 1..].to_owned())
                    .collect::<String>(),
            )
        }
    };
    assert_eq!(ids(Some("g1"), None).await?, "21");
    assert_eq!(ids(None, Some("bob")).await?, "41");
    assert_eq!(ids(Some("g1"), Some("bob")).await?, "1");
    assert_eq!(ids(Some("g2"), Some("bob")).await?, "");
    let all = store
        .decisions(&DecisionQuery {
            limit: 100,
            ..Default::default()
        })
        .await?;
    assert_eq!(
        all.iter().find(|d| d.decision_id == records[0].decision_id),
        Some(&records[0]),
        "the approval round-trips in the record"
    );
    Ok(())
}
