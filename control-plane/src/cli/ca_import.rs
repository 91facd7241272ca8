//! `mandate ca import`: puts an existing CA into the control plane's store, its key sealed with
//! the store key — straight into the database, no server needed (like `vault operator`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use mandate_control_plane::ca::StoreKey;
use mandate_control_plane::config::{
    DATABASE_FILE, STORE_KEY_ENV, StoreKeySource, store_key_source,
};
use mandate_control_plane::store::{Store, StoreError, StoreLocation, StoredSecret};
use mandate_identity::ca::CertificateAuthority;
use mandate_identity::{SpiffeId, TrustDomain};
use rustls::client::danger::ServerCertVerifier as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::tls::CaBundle;

/// Arguments of `mandate ca import` (the store options mean what they mean to `mandate serve`).
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The CA certificate, PEM (a CA with a spiffe://<trust domain> URI SAN).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The CA private key, PEM.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The control plane's data directory (SQLite store, store.key).
    #[arg(
        long,
        value_name = "DIR",
        env = "MANDATE_DATA_DIR",
        default_value = "./mandate-data"
    )]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (postgres://…) instead of the SQLite store in the data directory.
    #[arg(
        long,
        value_name = "URL",
        env = "MANDATE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// File holding the store key (base64 of 32 bytes) [env: MANDATE_STORE_KEY; default with SQLite: <data-dir>/store.key].
    #[arg(long, value_name = "FILE", env = "MANDATE_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
    /// Replace a CA already in the store (every SVID it issued stops being trusted).
    #[arg(long)]
    pub force: bool,
}

/// Where the store is, as `mandate serve` would open it.
pub fn location(args: &ImportArgs) -> StoreLocation {
    match &args.database_url {
        Some(url) => StoreLocation::Postgres(url.clone()),
        None => StoreLocation::Sqlite(args.data_dir.join(DATABASE_FILE)),
    }
}

fn describe(location: &StoreLocation) -> String {
    match location {
        StoreLocation::Sqlite(path) => path.display().to_string(),
        // Never print the URL: it may carry a password.
        StoreLocation::Postgres(_) => "the PostgreSQL database of --database-url".to_owned(),
    }
}

/// The store key exactly as `mandate serve` resolves it: `--store-key-file`, then
/// `MANDATE_STORE_KEY` (`env`), then (SQLite only) `<data-dir>/store.key`, generated if missing.
pub fn store_key(args: &ImportArgs, env: Option<String>) -> anyhow::Result<StoreKey> {
    let source = store_key_source(
        args.store_key_file.as_deref(),
        env.filter(|t| !t.trim().is_empty()),
        &location(args),
        &args.data_dir,
    )?;
    match source {
        StoreKeySource::Given(key) => Ok(key),
        StoreKeySource::DataDir(path) => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
            Ok(StoreKey::load_or_generate(&path)?)
        }
    }
}

/// Loads the CA from PEM and proves it usable: its key signs certificates its certificate
/// verifies (so the two belong together), and it is valid now.
pub fn load_ca(cert_pem: &str, key_pem: &str) -> anyhow::Result<CertificateAuthority> {
    let ca = CertificateAuthority::from_pem(cert_pem, key_pem)?;
    let bundle = CaBundle::from_pem(cert_pem.as_bytes(), Path::new("--cert"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let probe_id: SpiffeId = bundle
        .control_plane_id()
        .parse()
        .context("the CA's trust domain makes no control-plane ID")?;
    let probe = ca.issue(&probe_id, Duration::from_secs(60))?;
    let der = CertificateDer::from_pem_slice(probe.cert_pem.as_bytes())
        .context("the CA produced an unreadable certificate")?;
    bundle
        .verifier()
        .verify_server_cert(
            &der,
            &[],
            &ServerName::try_from("localhost").expect("a valid DNS name"),
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the key does not go with the certificate, or the CA is not valid now ({e}); check --cert and --key"
            )
        })?;
    Ok(ca)
}

/// Imports the CA named by `args`, with `env_key` as the `MANDATE_STORE_KEY` value; returns its
/// trust domain and where it went.
pub fn import(args: &ImportArgs, env_key: Option<String>) -> anyhow::Result<(TrustDomain, String)> {
    let read = |flag: &str, path: &Path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let cert_pem = read("--cert", &args.cert)?;
    let key_pem = read("--key", &args.key)?;
    let ca = load_ca(&cert_pem, &key_pem).with_context(|| {
        format!(
            "{} and {} are not a usable CA",
            args.cert.display(),
            args.key.display()
        )
    })?;
    let store_key = store_key(args, env_key)?;
    let secret = StoredSecret {
        cert_pem: ca.cert_pem().to_owned(),
        key_sealed: store_key.seal(ca.key_pem().as_bytes())?,
    };
    let location = location(args);
    let place = describe(&location);
    super::block_on(async {
        let store = Store::open(&location)
            .await
            .with_context(|| format!("cannot open the store at {place}"))?;
        match store.put_ca(&secret, args.force).await {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => bail!(
                "{place} already holds a CA: pass --force to replace it (every SVID the old CA issued stops being trusted; sidecars must enrol again with new join tokens)"
            ),
            Err(e) => Err(e).context("cannot store the CA"),
        }
    })?;
    Ok((ca.trust_domain().clone(), place))
}

/// Runs `mandate ca import`.
pub fn main(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let (td, place) = import(&args, std::env::var(STORE_KEY_ENV).ok())?;
    println!("imported the CA for trust domain {td} into {place} (key sealed with the store key)");
    println!(
        "start or restart `mandate serve --trust-domain {td}` with the same store and store key to use it"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn args(dir: &Path) -> ImportArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: ImportArgs,
        }
        P::try_parse_from([
            "x",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .unwrap()
        .a
    }

    #[test]
    fn a_matching_ca_loads_and_a_mismatched_key_is_refused() {
        let ca = CertificateAuthority::generate("corp.example".parse().unwrap(), DAY).unwrap();
        let loaded = load_ca(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.trust_domain().as_str(), "corp.example");

        let other = CertificateAuthority::generate("corp.example".parse().unwrap(), DAY).unwrap();
        let Err(err) = load_ca(ca.cert_pem(), &other.key_pem()) else {
            panic!("a foreign key was accepted");
        };
        assert!(err.to_string().contains("does not go with"), "{err}");
    }

    #[test]
    fn a_workload_certificate_is_not_a_ca() {
        let ca = CertificateAuthority::generate("corp.example".parse().unwrap(), DAY).unwrap();
        let leaf = ca
            .issue(&"spiffe://corp.example/agent/a".parse().unwrap(), DAY)
            .unwrap();
        assert!(load_ca(&leaf.cert_pem, &leaf.key_pem).is_err());
    }

    #[test]
    fn the_store_key_is_found_like_serve_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        assert!(
            matches!(location(&a), StoreLocation::Sqlite(p) if p == dir.path().join("mandate.db"))
        );

        // SQLite without a key: generated once into the data directory, then reused.
        let first = store_key(&a, None).unwrap();
        let sealed = first.seal(b"secret").unwrap();
        let again = store_key(&a, None).unwrap();
        assert_eq!(again.unseal(&sealed).unwrap(), b"secret");

        // The environment wins over the file in the data directory.
        let env_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned();
        let from_env = store_key(&a, Some(env_key)).unwrap();
        assert!(from_env.unseal(&sealed).is_err());

        // PostgreSQL needs a key given.
        let mut pg = args(dir.path());
        pg.database_url = Some("postgres://u:p@h/db".into());
        let err = store_key(&pg, None).unwrap_err();
        assert!(err.to_string().contains("MANDATE_STORE_KEY"), "{err}");
        assert!(!describe(&location(&pg)).contains("u:p"));
    }

    #[test]
    fn import_stores_the_sealed_ca_and_replaces_it_only_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("corp.example".parse().unwrap(), DAY).unwrap();
        let mut a = args(dir.path());
        a.cert = dir.path().join("ca.pem");
        a.key = dir.path().join("ca-key.pem");
        std::fs::write(&a.cert, ca.cert_pem()).unwrap();
        std::fs::write(&a.key, ca.key_pem()).unwrap();

        let (td, place) = import(&a, None).unwrap();
        assert_eq!(td.as_str(), "corp.example");
        assert_eq!(place, dir.path().join("mandate.db").display().to_string());

        let err = import(&a, None).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        a.force = true;
        import(&a, None).unwrap();

        let key = store_key(&a, None).unwrap();
        let stored = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { Store::open(&location(&a)).await.unwrap().ca().await })
            .unwrap()
            .unwrap();
        assert!(!stored.key_sealed.contains("PRIVATE KEY"));
        let opened = mandate_control_plane::ca::open_stored(&stored, &key, &td).unwrap();
        assert_eq!(opened.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = import(&args(dir.path()), None).unwrap_err();
        assert_eq!(
            err.to_string().lines().next().unwrap(),
            "cannot read --cert c.pem"
        );
    }
}
