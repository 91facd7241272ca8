//! `mandate serve`'s configuration: flags (and `MANDATE_*` environment variables), validated into a
//! [`ServeConfig`] whose errors name the flag at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Args;
use mandate_identity::TrustDomain;

use crate::ca::StoreKey;
use crate::store::StoreLocation;

/// Environment variable carrying the store key (base64 of 32 bytes); `--store-key-file` wins.
pub const STORE_KEY_ENV: &str = "MANDATE_STORE_KEY";
/// Environment variable carrying the admin token; `--admin-token-file` wins.
pub const ADMIN_TOKEN_ENV: &str = "MANDATE_ADMIN_TOKEN";
/// The SQLite database inside the data directory.
pub const DATABASE_FILE: &str = "mandate.db";
/// The generated store key inside the data directory (SQLite only).
pub const STORE_KEY_FILE: &str = "store.key";
/// The generated admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The trust bundle written into the data directory.
pub const CA_FILE: &str = "ca.pem";
/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// Shortest SVID lifetime: renewal at half-life must leave the sidecar time to act.
const MIN_SVID_TTL: Duration = Duration::from_secs(60);
/// Longest SVID lifetime: short-lived certificates are the point (the CA lives ten years).
const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest approval lifetime: a person must have time to read and decide.
const MIN_APPROVAL_TTL: Duration = Duration::from_secs(10);
/// Longest approval lifetime: an approval is for a call being made now, not a standing permit.
const MAX_APPROVAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Shortest delegation token lifetime: an agent must have time to use its token.
const MIN_DELEGATION_TOKEN_TTL: Duration = Duration::from_secs(10);
/// Longest delegation token lifetime: tokens are short-lived, the grant is what lasts.
const MAX_DELEGATION_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Shortest signing key rotation period.
const MIN_DELEGATION_KEY_ROTATION: Duration = Duration::from_secs(60);
/// Longest signing key rotation period.
const MAX_DELEGATION_KEY_ROTATION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Shortest default grant lifetime.
const MIN_GRANT_TTL: Duration = Duration::from_secs(10);

/// Flags of `mandate serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory for the SQLite database, ca.pem, a generated store.key and admin-token.
    #[arg(
        long,
        value_name = "DIR",
        env = "MANDATE_DATA_DIR",
        default_value = "./mandate-data"
    )]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (postgres://…) instead of SQLite; replicas sharing it see each other's changes.
    #[arg(
        long,
        value_name = "URL",
        env = "MANDATE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Trust domain of the identities issued (must match the CA's when one is already stored).
    #[arg(
        long,
        value_name = "TD",
        env = "MANDATE_TRUST_DOMAIN",
        default_value = "mandate.local"
    )]
    pub trust_domain: TrustDomain,
    /// Address of the API listener (TLS 1.3; client certificates optional).
    #[arg(
        long,
        value_name = "ADDR",
        env = "MANDATE_LISTEN",
        default_value = "0.0.0.0:15012"
    )]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP /metrics, /healthz and /readyz listener.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MANDATE_METRICS",
        default_value = "127.0.0.1:15014"
    )]
    pub metrics: SocketAddr,
    /// File holding the store key (base64 of 32 bytes) that encrypts the CA key [env: MANDATE_STORE_KEY].
    #[arg(long, value_name = "FILE", env = "MANDATE_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
    /// File holding the admin token for the admin API [env: MANDATE_ADMIN_TOKEN].
    #[arg(long, value_name = "FILE", env = "MANDATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Lifetime of the SVIDs issued to sidecars (and to this replica), e.g. 1h.
    #[arg(long, value_name = "DURATION", env = "MANDATE_SVID_TTL", default_value = "1h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// How long a join token stays redeemable, e.g. 1h.
    #[arg(long, value_name = "DURATION", env = "MANDATE_JOIN_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub join_token_ttl: Duration,
    /// How long a per-action approval can be approved and then redeemed by the retried call,
    /// counted from when the sidecar asked for it (10s to 24h), e.g. 10m.
    #[arg(long, value_name = "DURATION", env = "MANDATE_APPROVAL_TTL", default_value = "10m", value_parser = parse_duration)]
    pub approval_ttl: Duration,
    /// Lifetime of the delegation tokens issued to agents (10s to 1h; never beyond the grant's
    /// expiry), e.g. 5m.
    #[arg(long, value_name = "DURATION", env = "MANDATE_DELEGATION_TOKEN_TTL", default_value = "5m", value_parser = parse_duration)]
    pub delegation_token_ttl: Duration,
    /// How often a new delegation signing key replaces the current one (1m to 90d); older keys
    /// stay published while tokens they signed may be valid, e.g. 24h.
    #[arg(long, value_name = "DURATION", env = "MANDATE_DELEGATION_KEY_ROTATION", default_value = "24h", value_parser = parse_duration)]
    pub delegation_key_rotation: Duration,
    /// How long a grant lasts when `mandate grant create` gives no --ttl (10s to 24h), e.g. 15m.
    #[arg(long, value_name = "DURATION", env = "MANDATE_GRANT_TTL", default_value = "15m", value_parser = parse_duration)]
    pub grant_ttl: Duration,
    /// How often, at most, the audit chain's head is signed as a checkpoint when new decisions
    /// arrived (1s to 1h); a checkpoint is also made once 1000 records arrived since the last.
    #[arg(long, value_name = "DURATION", env = "MANDATE_AUDIT_CHECKPOINT_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub audit_checkpoint_interval: Duration,
    /// Address of the Kubernetes sidecar injector (mutating admission webhook, HTTPS, POST
    /// /inject), e.g. 0.0.0.0:15017; off unless given. Needs --webhook-cert, --webhook-key and
    /// --inject-config.
    #[arg(long, value_name = "ADDR", env = "MANDATE_WEBHOOK")]
    pub webhook: Option<SocketAddr>,
    /// The webhook's certificate chain (PEM, leaf first; its SAN must be the webhook Service's DNS
    /// name); re-read when it changes.
    #[arg(long, value_name = "FILE", env = "MANDATE_WEBHOOK_CERT")]
    pub webhook_cert: Option<PathBuf>,
    /// The webhook certificate's private key (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE", env = "MANDATE_WEBHOOK_KEY")]
    pub webhook_key: Option<PathBuf>,
    /// The injector's YAML configuration: sidecar image, control plane URL as pods see it, and
    /// defaults (see deploy/kubernetes/).
    #[arg(long, value_name = "FILE", env = "MANDATE_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
}

/// Parses `90s`, `15m`, `1h`, … refusing zero.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 90s, 15m or 1h)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// Why the configuration is unusable; each names the flag or variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--database-url` is not a PostgreSQL URL.
    #[error("--database-url must be a postgres:// or postgresql:// URL")]
    DatabaseUrl,
    /// PostgreSQL without a store key.
    #[error(
        "--database-url needs a store key shared by every replica: set {STORE_KEY_ENV} or --store-key-file"
    )]
    StoreKeyRequired,
    /// The store key is not base64 of 32 bytes.
    #[error(
        "{source_name}: the store key must be base64 of exactly 32 bytes (e.g. `openssl rand -base64 32`)"
    )]
    StoreKey {
        /// The flag or variable it came from.
        source_name: String,
    },
    /// The admin token is too short or empty.
    #[error("{source_name}: the admin token must be at least {MIN_ADMIN_TOKEN_LEN} characters")]
    AdminToken {
        /// The flag or variable it came from.
        source_name: String,
    },
    /// A file named by a flag cannot be read.
    #[error("{flag} {path}")]
    Read {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--svid-ttl` out of range.
    #[error("--svid-ttl must be between 1m and 30d")]
    SvidTtl,
    /// `--delegation-token-ttl` out of range.
    #[error("--delegation-token-ttl must be between 10s and 1h")]
    DelegationTokenTtl,
    /// `--delegation-key-rotation` out of range.
    #[error("--delegation-key-rotation must be between 1m and 90d")]
    DelegationKeyRotation,
    /// `--grant-ttl` out of range.
    #[error("--grant-ttl must be between 10s and 24h")]
    GrantTtl,
    /// `--approval-ttl` out of range.
    #[error("--approval-ttl must be between 10s and 24h")]
    ApprovalTtl,
    /// `--audit-checkpoint-interval` out of range.
    #[error("--audit-checkpoint-interval must be between 1s and 1h")]
    AuditCheckpointInterval,
    /// `--listen` and `--metrics` are the same address.
    #[error("--listen and --metrics must be different addresses")]
    SameAddress,
    /// `--webhook` is the address of another listener.
    #[error("--webhook must differ from --listen and --metrics")]
    WebhookAddress,
    /// `--webhook` without one of the files it needs.
    #[error(
        "--webhook needs {missing} (the webhook serves HTTPS with the sidecar injector's configuration)"
    )]
    WebhookIncomplete {
        /// The missing flag.
        missing: &'static str,
    },
    /// A webhook flag without `--webhook`.
    #[error("{flag} only means something with --webhook")]
    WebhookFlagAlone {
        /// The flag given alone.
        flag: &'static str,
    },
    /// The injector configuration is unusable.
    #[error(transparent)]
    Inject(#[from] crate::inject::config::InjectConfigError),
}

/// Where the store key comes from.
#[derive(Debug)]
pub enum StoreKeySource {
    /// Given by flag or environment.
    Given(StoreKey),
    /// Read from `<data-dir>/store.key`, generated there when absent (SQLite only).
    DataDir(PathBuf),
}

/// Where the admin token comes from.
#[derive(Debug)]
pub enum AdminTokenSource {
    /// Given by flag or environment.
    Given(AdminToken),
    /// Read from `<data-dir>/admin-token`, generated there when absent.
    DataDir(PathBuf),
}

/// The admin token. `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Wraps a token read from a flag, a variable or a file (surrounding whitespace ignored).
    pub fn new(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let token = text.trim();
        if token.len() < MIN_ADMIN_TOKEN_LEN || token.chars().any(|c| c.is_control()) {
            return Err(ConfigError::AdminToken {
                source_name: source_name.to_owned(),
            });
        }
        Ok(Self(token.to_owned()))
    }

    /// The token's text. Secret: compare it, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The validated configuration of `mandate serve`.
#[derive(Debug)]
pub struct ServeConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The store.
    pub store: StoreLocation,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// API listener.
    pub listen: SocketAddr,
    /// Metrics listener.
    pub metrics: SocketAddr,
    /// Store key source.
    pub store_key: StoreKeySource,
    /// Admin token source.
    pub admin_token: AdminTokenSource,
    /// SVID lifetime.
    pub svid_ttl: Duration,
    /// Join token lifetime.
    pub join_token_ttl: Duration,
    /// Per-action approval lifetime.
    pub approval_ttl: Duration,
    /// Delegation token lifetime, key rotation and default grant lifetime.
    pub delegation: crate::delegation::DelegationConfig,
    /// Longest time between audit checkpoints while decisions arrive.
    pub audit_checkpoint_interval: Duration,
    /// The sidecar injector's webhook, when enabled.
    pub webhook: Option<WebhookConfig>,
}

/// The sidecar injector's listener, certificate files and configuration.
#[derive(Debug)]
pub struct WebhookConfig {
    /// Its address.
    pub listen: SocketAddr,
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// What injected pods get.
    pub injector: crate::inject::config::InjectorConfig,
}

impl ServeConfig {
    /// Validates `args`, reading secrets from the files they name or from `env` (the process
    /// environment in production; a map in tests).
    pub fn from_args(
        args: ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let store = match &args.database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                StoreLocation::Postgres(url.clone())
            }
            Some(_) => return Err(ConfigError::DatabaseUrl),
            None => StoreLocation::Sqlite(args.data_dir.join(DATABASE_FILE)),
        };
        let store_key = store_key_source(
            args.store_key_file.as_deref(),
            env(STORE_KEY_ENV),
            &store,
            &args.data_dir,
        )?;
        let admin_token = match (&args.admin_token_file, env(ADMIN_TOKEN_ENV)) {
            (Some(path), _) => {
                let text = read_secret("--admin-token-file", path)?;
                AdminTokenSource::Given(AdminToken::new(&text, "--admin-token-file")?)
            }
            (None, Some(text)) => AdminTokenSource::Given(AdminToken::new(&text, ADMIN_TOKEN_ENV)?),
            (None, None) => AdminTokenSource::DataDir(args.data_dir.join(ADMIN_TOKEN_FILE)),
        };
        if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&args.svid_ttl) {
            return Err(ConfigError::SvidTtl);
        }
        if !(MIN_APPROVAL_TTL..=MAX_APPROVAL_TTL).contains(&args.approval_ttl) {
            return Err(ConfigError::ApprovalTtl);
        }
        if !(MIN_DELEGATION_TOKEN_TTL..=MAX_DELEGATION_TOKEN_TTL)
            .contains(&args.delegation_token_ttl)
        {
            return Err(ConfigError::DelegationTokenTtl);
        }
        if !(MIN_DELEGATION_KEY_ROTATION..=MAX_DELEGATION_KEY_ROTATION)
            .contains(&args.delegation_key_rotation)
        {
            return Err(ConfigError::DelegationKeyRotation);
        }
        if !(MIN_GRANT_TTL..=crate::grants::MAX_GRANT_TTL).contains(&args.grant_ttl) {
            return Err(ConfigError::GrantTtl);
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&args.audit_checkpoint_interval)
        {
            return Err(ConfigError::AuditCheckpointInterval);
        }
        if args.listen == args.metrics {
            return Err(ConfigError::SameAddress);
        }
        let webhook = webhook_config(&args)?;
        Ok(Self {
            data_dir: args.data_dir,
            store,
            trust_domain: args.trust_domain,
            listen: args.listen,
            metrics: args.metrics,
            store_key,
            admin_token,
            svid_ttl: args.svid_ttl,
            join_token_ttl: args.join_token_ttl,
            approval_ttl: args.approval_ttl,
            delegation: crate::delegation::DelegationConfig {
                keys: crate::delegation::KeyPolicy {
                    rotation: args.delegation_key_rotation,
                    token_ttl: args.delegation_token_ttl,
                },
                grant_ttl: args.grant_ttl,
            },
            audit_checkpoint_interval: args.audit_checkpoint_interval,
            webhook,
        })
    }
}

/// The webhook's settings: all of `--webhook`, `--webhook-cert`, `--webhook-key` and
/// `--inject-config`, or none of them. The injector configuration is validated here; the
/// certificate when the listener starts.
fn webhook_config(args: &ServeArgs) -> Result<Option<WebhookConfig>, ConfigError> {
    let Some(listen) = args.webhook else {
        return match [
            ("--webhook-cert", args.webhook_cert.is_some()),
            ("--webhook-key", args.webhook_key.is_some()),
            ("--inject-config", args.inject_config.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        {
            Some((flag, _)) => Err(ConfigError::WebhookFlagAlone { flag }),
            None => Ok(None),
        };
    };
    let require = |missing: &'static str, file: &Option<PathBuf>| {
        file.clone()
            .ok_or(ConfigError::WebhookIncomplete { missing })
    };
    let cert = require("--webhook-cert", &args.webhook_cert)?;
    let key = require("--webhook-key", &args.webhook_key)?;
    let inject_config = require("--inject-config", &args.inject_config)?;
    if listen == args.listen || listen == args.metrics {
        return Err(ConfigError::WebhookAddress);
    }
    Ok(Some(WebhookConfig {
        listen,
        cert,
        key,
        injector: crate::inject::config::InjectorConfig::load(&inject_config)?,
    }))
}

/// Where the store key comes from: `--store-key-file`, then `MANDATE_STORE_KEY` (`env_key`),
/// then (SQLite only) `<data-dir>/store.key`. `mandate serve` and `mandate ca import` share it so
/// both find the same key.
pub fn store_key_source(
    store_key_file: Option<&Path>,
    env_key: Option<String>,
    store: &StoreLocation,
    data_dir: &Path,
) -> Result<StoreKeySource, ConfigError> {
    match (store_key_file, env_key) {
        (Some(path), _) => {
            let text = read_secret("--store-key-file", path)?;
            Ok(StoreKeySource::Given(parse_store_key(
                &text,
                "--store-key-file",
            )?))
        }
        (None, Some(text)) => Ok(StoreKeySource::Given(parse_store_key(
            &text,
            STORE_KEY_ENV,
        )?)),
        (None, None) if matches!(store, StoreLocation::Postgres(_)) => {
            Err(ConfigError::StoreKeyRequired)
        }
        (None, None) => Ok(StoreKeySource::DataDir(data_dir.join(STORE_KEY_FILE))),
    }
}

fn read_secret(flag: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// Decodes a base64 store key (surrounding whitespace ignored); errors name `source_name`.
pub fn parse_store_key(text: &str, source_name: &str) -> Result<StoreKey, ConfigError> {
    let error = || ConfigError::StoreKey {
        source_name: source_name.to_owned(),
    };
    let bytes: [u8; 32] = STANDARD
        .decode(text.trim())
        .map_err(|_| error())?
        .try_into()
        .map_err(|_| error())?;
    Ok(StoreKey::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_sqlite_in_the_data_dir_with_generated_secrets() {
        let config = ServeConfig::from_args(args(&[]), no_env).unwrap();
        assert!(
            matches!(&config.store, StoreLocation::Sqlite(p) if p == Path::new("./mandate-data/mandate.db"))
        );
        assert!(matches!(config.store_key, StoreKeySource::DataDir(_)));
        assert!(matches!(config.admin_token, AdminTokenSource::DataDir(_)));
        assert_eq!(config.listen.port(), 15012);
        assert_eq!(config.metrics.port(), 15014);
        assert_eq!(config.svid_ttl, Duration::from_secs(3600));
        assert_eq!(config.approval_ttl, Duration::from_secs(600));
        assert_eq!(
            config.delegation.keys.token_ttl,
            Duration::from_secs(300),
            "--delegation-token-ttl"
        );
        assert_eq!(
            config.delegation.keys.rotation,
            Duration::from_secs(24 * 3600),
            "--delegation-key-rotation"
        );
        assert_eq!(
            config.delegation.grant_ttl,
            Duration::from_secs(900),
            "--grant-ttl"
        );
        assert_eq!(config.trust_domain.as_str(), "mandate.local");
    }

    #[test]
    fn errors_name_the_flag_or_variable() {
        let err = |argv: &[&str], env: &dyn Fn(&str) -> Option<String>| {
            ServeConfig::from_args(args(argv), env)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["--database-url", "mysql://x"], &no_env).contains("--database-url"));
        assert!(err(&["--database-url", "postgres://x"], &no_env).contains("MANDATE_STORE_KEY"));
        let short_key = |k: &str| (k == STORE_KEY_ENV).then(|| STANDARD.encode([1u8; 16]));
        assert!(err(&[], &short_key).contains("MANDATE_STORE_KEY: the store key must be"));
        let short_token = |k: &str| (k == ADMIN_TOKEN_ENV).then(|| "short".to_owned());
        assert!(err(&[], &short_token).contains("MANDATE_ADMIN_TOKEN"));
        assert!(err(&["--svid-ttl", "10s"], &no_env).contains("--svid-ttl"));
        assert!(err(&["--approval-ttl", "5s"], &no_env).contains("--approval-ttl"));
        assert!(err(&["--approval-ttl", "25h"], &no_env).contains("--approval-ttl"));
        assert!(
            err(&["--audit-checkpoint-interval", "2h"], &no_env)
                .contains("--audit-checkpoint-interval")
        );
        for (flag, value) in [
            ("--delegation-token-ttl", "5s"),
            ("--delegation-token-ttl", "2h"),
            ("--delegation-key-rotation", "30s"),
            ("--delegation-key-rotation", "91d"),
            ("--grant-ttl", "5s"),
            ("--grant-ttl", "25h"),
        ] {
            assert!(
                err(&[flag, value], &no_env).contains(flag),
                "{flag} {value}"
            );
        }
        assert!(
            err(&["--admin-token-file", "/nonexistent/x"], &no_env).contains("--admin-token-file")
        );
        assert!(
            err(
                &["--listen", "127.0.0.1:1", "--metrics", "127.0.0.1:1"],
                &no_env
            )
            .contains("--listen")
        );
    }

    #[test]
    fn the_webhook_needs_all_its_flags_and_a_valid_injector_configuration() {
        assert!(
            ServeConfig::from_args(args(&[]), no_env)
                .unwrap()
                .webhook
                .is_none()
        );
        let err = |argv: &[&str]| {
            ServeConfig::from_args(args(argv), no_env)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&["--webhook-cert", "c.pem"]),
            "--webhook-cert only means something with --webhook"
        );
        let webhook = ["--webhook", "127.0.0.1:15017"];
        assert!(err(&webhook).starts_with("--webhook needs --webhook-cert"));
        assert!(
            err(&[&webhook[..], &["--webhook-cert", "c", "--webhook-key", "k"]].concat())
                .starts_with("--webhook needs --inject-config")
        );
        let dir = tempfile::tempdir().unwrap();
        let inject = dir.path().join("inject.yaml");
        let inject = inject.to_str().unwrap();
        let files = [
            "--webhook-cert",
            "c",
            "--webhook-key",
            "k",
            "--inject-config",
            inject,
        ];
        std::fs::write(inject, "image: m\n").unwrap();
        assert!(err(&[&webhook[..], &files].concat()).contains("control-plane: required"));
        std::fs::write(inject, "image: m\ncontrol-plane: https://cp:15012\n").unwrap();
        let config = ServeConfig::from_args(args(&[&webhook[..], &files].concat()), no_env)
            .unwrap()
            .webhook
            .unwrap();
        assert_eq!(config.listen.port(), 15017);
        assert_eq!(config.injector.image, "m");
        assert_eq!(
            err(&[&["--webhook", "0.0.0.0:15012"][..], &files].concat()),
            "--webhook must differ from --listen and --metrics"
        );
    }

    #[test]
    fn secrets_come_from_files_before_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, format!("{}\n", STANDARD.encode([7u8; 32]))).unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let env = |k: &str| match k {
            STORE_KEY_ENV => Some("not base64!".to_owned()),
            ADMIN_TOKEN_ENV => Some("x".to_owned()),
            _ => None,
        };
        let config = ServeConfig::from_args(
            args(&[
                "--store-key-file",
                key.to_str().unwrap(),
                "--admin-token-file",
                token.to_str().unwrap(),
                "--database-url",
                "postgresql://db/mandate",
            ]),
            env,
        )
        .unwrap();
        assert!(matches!(config.store_key, StoreKeySource::Given(_)));
        let AdminTokenSource::Given(t) = config.admin_token else {
            panic!("token from file");
        };
        assert_eq!(t.expose(), "0123456789abcdef0123");
        assert!(!format!("{t:?}").contains("0123"));
    }
}
