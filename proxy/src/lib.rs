//! `mandate-proxy`: the Mandate sidecar. It terminates and originates mTLS with SPIFFE identities,
//! stamps the caller's verified identity for the app, and refuses destinations outside the mesh.

pub mod admin;
pub mod config;
pub mod headers;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod relay;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::Config;
use crate::identity::IdentityStore;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::routes::RouteProtocol;
use crate::server::{accept_loop, bind};

/// Runs the sidecar until SIGTERM or SIGINT, then drains within the configured grace period.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let identity = Arc::new(
        IdentityStore::load(
            config.identity_files.clone(),
            config.trust_domain.clone(),
            metrics.clone(),
        )
        .context("loading identity")?,
    );
    identity.watch().context("watching the identity files")?;

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

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(Admin::new(
        &config,
        metrics.clone(),
        identity.clone(),
        ready.clone(),
    ));
    tokio::spawn(admin.serve(admin_listener));

    let Config {
        routes,
        trust_domain,
        app,
        drain_timeout,
        ..
    } = config;
    let outbound = Arc::new(Outbound::new(
        Arc::new(routes),
        identity.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let inbound = Arc::new(Inbound::new(
        trust_domain,
        identity.clone(),
        metrics.clone(),
        app,
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
        "mandate-proxy ready"
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
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
