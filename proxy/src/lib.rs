//! `mandate-proxy`: the Mandate sidecar. It terminates and originates mTLS with SPIFFE identities,
//! evaluates Rego policy on every call, stamps the caller's verified identity for the app, and
//! refuses destinations outside the mesh. Standalone it takes identity and policy from files;
//! managed (`--control-plane`) it takes identity, policy and registry from `mandate serve`.

pub mod admin;
pub mod approval;
pub mod authz;
pub mod config;
pub mod decisions;
pub mod delegation;
pub mod discovery;
pub mod headers;
pub mod identity;
pub mod inbound;
pub mod input;
pub mod iptables;
pub mod mcp;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod relay;
pub mod revocation;
pub mod routes;
pub mod server;
pub mod sync;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::authz::{Authorizer, Recorders};
use crate::config::{Config, ManagedConfig, Mode, PolicyConfig, SpoolConfig};
use crate::decisions::DecisionLog;
use crate::delegation::{ControlPlaneCalls, Verifier};
use crate::discovery::Routes;
use crate::identity::IdentityStore;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::policy::PolicyStore;
use crate::revocation::Revocations;
use crate::routes::RouteProtocol;
use crate::server::{accept_loop, bind};
use crate::sync::apply::Applier;
use crate::sync::client::ControlPlaneClient;
use crate::sync::report::{DecisionQueue, Reporter};
use crate::sync::spool::Spool;
use crate::sync::state::StateDir;
use crate::sync::{ControlPlane, Timing};

/// How long shutdown waits for the control plane to take the last decision records.
const DECISION_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the sidecar until SIGTERM or SIGINT, then drains within the configured grace period.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let revocations = Arc::new(Revocations::new());
    let delegation = Arc::new(
        Verifier::new(
            &config.trust_domain,
            matches!(config.mode, Mode::Managed(_)),
            metrics.clone(),
        )
        .with_leeway(config.delegation_leeway),
    );

    // Bind everything before serving anything, so a taken port fails start-up cleanly.
    let outbound_listener = bind(config.outbound, "--outbound").await?;
    let inbound_listener = bind(config.inbound, "--inbound").await?;
    let admin_listener = bind(config.admin, "--admin").await?;
    let mut tcp_listeners = Vec::new();
    for route in config
        .routes
        .iter()
        .filter(|r| r.protocol == RouteProtocol::Tcp)
    {
        if let Some(listen) = route.listen {
            tcp_listeners.push((bind(listen, "--route listen=").await?, route.clone()));
        }
    }

    let (identity, managed) = match &config.mode {
        Mode::Standalone(files) => {
            let identity = Arc::new(
                IdentityStore::load(
                    files.clone(),
                    config.trust_domain.clone(),
                    metrics.clone(),
                    revocations,
                )
                .context("loading identity")?,
            );
            identity.watch().context("watching the identity files")?;
            (identity, None)
        }
        Mode::Managed(managed) => {
            let started = tokio::select! {
                started = start_managed(managed, &config, &metrics, revocations) => started?,
                () = shutdown_signal() => return Ok(()),
            };
            (started.0.identity.clone(), Some(started))
        }
    };
    let authz = match &config.policy {
        Some(policy) => Some(Arc::new(authorizer(
            policy,
            &metrics,
            managed.as_ref().map(|(cp, _)| cp),
            match &config.mode {
                Mode::Managed(m) => Some(&m.spool),
                Mode::Standalone(_) => None,
            },
        )?)),
        None => {
            tracing::warn!(
                "no --policy: routes alone decide; give --policy to evaluate Rego on every call"
            );
            None
        }
    };
    let sync_cancel = CancellationToken::new();
    let routes = Arc::new(Routes::new(&config.routes));
    if let (Some((cp, renew_now)), Some(authz)) = (&managed, &authz) {
        let applier = Arc::new(
            Applier::new(
                identity.clone(),
                authz.policy().clone(),
                delegation.clone(),
                metrics.clone(),
                cp.state.clone(),
            )
            .with_routes(routes.clone()),
        );
        tokio::spawn(routes.clone().keep_resolved(sync_cancel.clone()));
        // The last applied bundle and registry, before the stream resumes from them.
        applier.restore();
        tokio::spawn(sync::svid::renew_loop(
            cp.clone(),
            *renew_now,
            sync_cancel.clone(),
        ));
        tokio::spawn(sync::stream::run(cp.clone(), applier, sync_cancel.clone()));
    }

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));
    let control_plane: Option<Arc<dyn ControlPlaneCalls>> = managed
        .as_ref()
        .map(|(cp, _)| cp.clone() as Arc<dyn ControlPlaneCalls>);
    let admin = Arc::new(Admin::new(
        &config,
        metrics.clone(),
        identity.clone(),
        authz.clone(),
        control_plane.clone(),
        ready.clone(),
    ));
    tokio::spawn(admin.serve(admin_listener));

    let Config {
        trust_domain,
        app,
        drain_timeout,
        ..
    } = config;
    let outbound = Arc::new(Outbound::new(
        routes,
        identity.clone(),
        metrics.clone(),
        authz.clone(),
        delegation.clone(),
        cancel.clone(),
    ));
    let inbound = Arc::new(Inbound::new(
        trust_domain,
        identity.clone(),
        metrics.clone(),
        app,
        authz.clone(),
        delegation,
        control_plane,
        cancel.clone(),
    ));

    let o = outbound.clone();
    tracker.spawn(accept_loop(
        outbound_listener,
        cancel.clone(),
        tracker.clone(),
        move |s, p| o.clone().serve_connection(s, p),
    ));
    let i = inbound.clone();
    tracker.spawn(accept_loop(
        inbound_listener,
        cancel.clone(),
        tracker.clone(),
        move |s, p| i.clone().serve_connection(s, p),
    ));
    for (listener, route) in tcp_listeners {
        let o = outbound.clone();
        tracker.spawn(accept_loop(
            listener,
            cancel.clone(),
            tracker.clone(),
            move |s, _| o.clone().serve_route_listener(s, route.clone()),
        ));
    }

    ready.store(true, Ordering::Release);
    tracing::info!(
        spiffe_id = %identity.current().svid.id,
        outbound = %config.outbound,
        inbound = %config.inbound,
        admin = %config.admin,
        policy_loaded = authz.as_ref().map(|a| a.has_policy()),
        "mandate-proxy serving (/readyz says when it is ready)"
    );

    shutdown_signal().await;
    ready.store(false, Ordering::Release);
    tracing::info!(grace = ?drain_timeout, "draining: no new connections; in-flight requests may finish");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing the remaining connections");
    } else {
        tracing::info!("drained");
    }
    if let Some(authz) = &authz {
        authz.flush(DECISION_FLUSH_TIMEOUT).await;
    }
    sync_cancel.cancel();
    Ok(())
}

/// Managed mode start-up: our identity (restored, or by enrolment) and the shared state of the
/// control plane tasks. Returns whether the identity should be renewed at once (it was restored).
async fn start_managed(
    managed: &ManagedConfig,
    config: &Config,
    metrics: &Arc<Metrics>,
    revocations: Arc<Revocations>,
) -> anyhow::Result<(Arc<ControlPlane>, bool)> {
    let client =
        ControlPlaneClient::new(managed.control_plane.clone(), config.trust_domain.clone())?;
    let state = managed.state_dir.clone().map(StateDir::new);
    let timing = Timing::default();
    let (identity, renew_now) = sync::svid::obtain(
        &client,
        managed.join_token.as_ref(),
        state.as_ref(),
        &config.trust_domain,
        metrics.clone(),
        revocations,
        &timing,
    )
    .await?;
    let cp = Arc::new(ControlPlane {
        client,
        identity,
        metrics: metrics.clone(),
        state,
        timing,
    });
    Ok((cp, renew_now))
}

/// Managed mode: the spool of decision records to the control plane, on disk, or in memory when
/// there is no directory for it.
fn reporter(cp: &Arc<ControlPlane>, spool: &SpoolConfig) -> anyhow::Result<Reporter> {
    match &spool.dir {
        Some(dir) => Ok(Reporter::Spool(
            Spool::open(dir, spool.max_bytes, spool.full, cp.clone())
                .with_context(|| format!("decision spool {}", dir.display()))?,
        )),
        None => {
            tracing::warn!(
                "no --spool-dir nor --state-dir: decision records wait for the control plane in memory only, and are lost if the sidecar stops before delivering them"
            );
            Ok(Reporter::Memory {
                queue: DecisionQueue::start(cp.clone()),
                mode: spool.full,
            })
        }
    }
}

/// Loads the policy (a broken one leaves the sidecar running, denying and not ready), watches it,
/// and opens the decision log and (managed) the spool to the control plane.
fn authorizer(
    policy: &PolicyConfig,
    metrics: &Arc<Metrics>,
    control_plane: Option<&Arc<ControlPlane>>,
    spool: Option<&SpoolConfig>,
) -> anyhow::Result<Authorizer> {
    let store = Arc::new(PolicyStore::load(
        policy.source.clone(),
        policy.settings,
        metrics.clone(),
    ));
    store.watch().context("watching the policy files")?;
    let log = match &policy.decision_log {
        Some(path) => Some(
            DecisionLog::open(path, metrics.decisions_dropped.clone())
                .with_context(|| format!("--decision-log {}", path.display()))?,
        ),
        None => None,
    };
    let queue = match control_plane {
        Some(cp) => Some(reporter(
            cp,
            spool.expect("managed mode has a spool config"),
        )?),
        None => None,
    };
    let authorizer = Authorizer::new(
        store,
        Recorders {
            log,
            control_plane: queue,
        },
        metrics.clone(),
        policy.enforcement,
    );
    Ok(match control_plane {
        Some(cp) => authorizer.with_control_plane(cp.clone() as Arc<dyn ControlPlaneCalls>),
        None => authorizer,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
