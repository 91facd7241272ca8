//! `mandate serve`: opens the store, loads or creates the CA, and runs the API, the push hub and
//! the metrics listener until SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::ca::{self, CaSetupError, OwnSvid, StoreKey};
use crate::config::{
    AdminToken, AdminTokenSource, CA_FILE, ConfigError, ServeArgs, ServeConfig, StoreKeySource,
};
use crate::delegation::Delegation;
use crate::enroll::Enroller;
use crate::inject::tls::{self, WebhookCert};
use crate::inject::{self, Injector};
use crate::push::Hub;
use crate::registry::Registrar;
use crate::server::{self, Health, ServerError};
use crate::store::{Store, StoreError};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why `mandate serve` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad flags or secrets.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("the store failed at start-up")]
    Store(#[from] StoreError),
    /// The CA or store key is unusable.
    #[error(transparent)]
    Ca(#[from] CaSetupError),
    /// A listener could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The delegation signing keys are unusable.
    #[error(transparent)]
    DelegationKeys(#[from] crate::delegation::KeyError),
    /// The sidecar injector's certificate or key is unusable.
    #[error(transparent)]
    WebhookCert(#[from] crate::inject::tls::CertError),
    /// The data directory is unusable.
    #[error("--data-dir {path}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs `mandate serve` until SIGTERM or SIGINT; logs go to stderr (filter: `MANDATE_LOG`).
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    init_logging();
    let config = ServeConfig::from_args(args, |k| std::env::var(k).ok())?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?
        .block_on(serve(
            config,
            CancellationToken::new(),
            server::shutdown_signal(),
        ))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MANDATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Serves `config` until `shutdown` resolves or `cancel` fires, then drains.
pub async fn serve(
    config: ServeConfig,
    cancel: CancellationToken,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let store_key = match config.store_key {
        StoreKeySource::Given(key) => key,
        StoreKeySource::DataDir(path) => StoreKey::load_or_generate(&path)?,
    };
    let admin_token = match config.admin_token {
        AdminTokenSource::Given(token) => token,
        AdminTokenSource::DataDir(path) => load_or_generate_admin_token(&path)?,
    };
    let store = Store::open(&config.store).await?;
    tracing::info!(backend = store.backend(), "store open");
    let ca = Arc::new(ca::load_or_create(&store, &store_key, &config.trust_domain).await?);
    let ca_path = config.data_dir.join(CA_FILE);
    std::fs::write(&ca_path, ca.cert_pem()).map_err(|source| ServeError::DataDir {
        path: ca_path.display().to_string(),
        source,
    })?;
    let ca_der = ca::ca_der(&ca)?;
    let own = Arc::new(OwnSvid::issue(&ca, config.svid_ttl)?);

    let delegation = Delegation::start(
        store.clone(),
        store_key.clone(),
        config.trust_domain.clone(),
        config.delegation,
    )
    .await?;
    let hub = Hub::new(
        Hub::load(&store, ca.cert_pem().to_owned(), config.delegation.keys).await?,
        cancel.child_token(),
    );
    let state = AppState {
        store: store.clone(),
        ca: ca.clone(),
        trust_domain: config.trust_domain.clone(),
        admin_token: Arc::new(admin_token),
        registrar: Registrar::new(
            store.clone(),
            config.trust_domain.clone(),
            ca_der.clone(),
            config.join_token_ttl,
        ),
        enroller: Enroller::new(store.clone(), ca.clone(), ca_der, config.svid_ttl),
        hub: hub.clone(),
        delegation: delegation.clone(),
        approval_ttl: config.approval_ttl,
    };
    let tls = Arc::new(server::tls_config(
        &config.trust_domain,
        ca.cert_pem(),
        own.clone(),
    )?);
    let api_listener = server::bind("--listen", config.listen).await?;
    let metrics_listener = server::bind("--metrics", config.metrics).await?;
    let webhook = match config.webhook {
        Some(webhook) => {
            let cert = Arc::new(WebhookCert::load(&webhook.cert, &webhook.key)?);
            let listener = server::bind("--webhook", webhook.listen).await?;
            let injector = Injector::new(webhook.injector, config.trust_domain.clone());
            Some((listener, cert, injector, webhook.listen))
        }
        None => None,
    };

    let background = TaskTracker::new();
    background.spawn(hub.clone().follow(store.clone()));
    background.spawn(delegation.clone().maintain(cancel.child_token()));
    background.spawn(crate::audit::maintain_checkpoints(
        store.clone(),
        ca.clone(),
        config.audit_checkpoint_interval,
        cancel.child_token(),
    ));
    background.spawn(own.clone().renew_at_half_life(
        ca.clone(),
        config.svid_ttl,
        cancel.child_token(),
    ));

    let connections = TaskTracker::new();
    let api_cancel = CancellationToken::new();
    let api_task = tokio::spawn(server::serve_api(
        api_listener,
        tls,
        config.trust_domain.clone(),
        api::router(state),
        api_cancel.clone(),
        connections.clone(),
    ));
    // The webhook shares the API's TLS accept loop, cancellation and connection draining.
    let webhook_addr = webhook.as_ref().map(|(_, _, _, addr)| *addr);
    let webhook_task = webhook.map(|(listener, cert, injector, _)| {
        background.spawn(
            cert.clone()
                .reload_on_change(tls::RELOAD_INTERVAL, cancel.child_token()),
        );
        tokio::spawn(server::serve_api(
            listener,
            Arc::new(cert.server_config()),
            config.trust_domain.clone(),
            inject::router(injector),
            api_cancel.clone(),
            connections.clone(),
        ))
    });
    let started = Arc::new(AtomicBool::new(false));
    let metrics_cancel = CancellationToken::new();
    let metrics_task = tokio::spawn(server::serve_plain(
        metrics_listener,
        server::metrics_router(Health {
            started: started.clone(),
            hub: hub.clone(),
        }),
        metrics_cancel.clone(),
    ));
    started.store(true, Ordering::Relaxed);
    tracing::info!(
        listen = %config.listen,
        metrics = %config.metrics,
        webhook = ?webhook_addr,
        trust_domain = %config.trust_domain,
        ca = %ca_path.display(),
        "mandate serve ready"
    );

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: finishing in-flight requests"),
        _ = cancel.cancelled() => {}
    }
    started.store(false, Ordering::Relaxed);
    // Stop accepting, end push streams (sidecars reconnect elsewhere), let requests finish.
    api_cancel.cancel();
    cancel.cancel();
    let _ = api_task.await;
    if let Some(task) = webhook_task {
        let _ = task.await;
    }
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some requests did not finish within {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    metrics_cancel.cancel();
    let _ = metrics_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Reads `<data-dir>/admin-token`, or generates one there (mode 0600). Only its path is logged.
fn load_or_generate_admin_token(path: &Path) -> Result<AdminToken, CaSetupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            AdminToken::new(&text, &path.display().to_string()).map_err(|e| CaSetupError::File {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| CaSetupError::Random)?;
            let text = URL_SAFE_NO_PAD.encode(bytes);
            ca::write_private(path, format!("{text}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "generated an admin token (mode 0600); the CLI reads it with --admin-token-file");
            AdminToken::new(&text, "generated admin token").map_err(|e| CaSetupError::File {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
        }
        Err(source) => Err(CaSetupError::File {
            path: path.display().to_string(),
            source,
        }),
    }
}
