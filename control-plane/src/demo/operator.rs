//! The demo's control plane and the operator commands run against it: `mandate serve` as a child
//! process, and `mandate agent|service|policy|audit …` as the separate commands a person would type.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ring::rand::{SecureRandom, SystemRandom};

use super::process::{Process, ProcessError, without_user_settings};

/// An operator command that did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The command could not be started.
    #[error("cannot run `mandate {command}`: {source}")]
    Spawn {
        /// The command line after `mandate`.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The command exited non-zero.
    #[error("`mandate {command}` failed:\n{output}")]
    Failed {
        /// The command line after `mandate`.
        command: String,
        /// What it printed.
        output: String,
    },
    /// `register` printed no join token.
    #[error("no join token (mjt1.…) in what `register` printed:\n{0}")]
    NoJoinToken(String),
}

/// The demo's control plane: where it keeps its data, where it listens, and its admin token.
pub struct ControlPlane {
    mandate: PathBuf,
    data_dir: PathBuf,
    api: SocketAddr,
    /// Random per demo; handed to `mandate serve` and the CLI through the environment only.
    admin_token: String,
}

impl ControlPlane {
    /// A control plane to run from the `mandate` binary, keeping its data in `data_dir`.
    pub fn new(mandate: &Path, data_dir: PathBuf, api: SocketAddr) -> Self {
        let mut secret = [0u8; 24];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the system RNG is available");
        Self {
            mandate: mandate.to_owned(),
            data_dir,
            api,
            admin_token: secret.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// Starts `mandate serve` (SQLite in the data directory; it generates its CA and store key).
    pub fn spawn(&self, metrics: SocketAddr, log_dir: &Path) -> Result<Process, ProcessError> {
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
            "--trust-domain".into(),
            "mandate.local".into(),
            "--listen".into(),
            self.api.to_string().into(),
            "--metrics".into(),
            metrics.to_string().into(),
        ];
        Process::spawn(
            &self.mandate,
            "control plane",
            metrics,
            args,
            &[("MANDATE_ADMIN_TOKEN", &self.admin_token)],
            log_dir,
        )
    }

    /// The API's URL, for sidecars and the CLI.
    pub fn url(&self) -> String {
        format!("https://{}", self.api)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The trust bundle `mandate serve` writes for the CLI (`MANDATE_CACERT`).
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }

    /// Runs `mandate ARGS…` against this control plane and returns what it printed on stdout.
    pub async fn run(&self, args: &[&str]) -> Result<String, OperatorError> {
        let command_line = args.join(" ");
        let mut command = Command::new(&self.mandate);
        command.args(args);
        without_user_settings(&mut command);
        command
            .env("MANDATE_SERVER", self.url())
            .env("MANDATE_CACERT", self.ca_pem())
            .env("MANDATE_ADMIN_TOKEN", &self.admin_token)
            .stdin(Stdio::null());
        // A short-lived child; waiting for it off the async workers keeps the sample tool answering.
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|e| OperatorError::Spawn {
                command: command_line.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| OperatorError::Spawn {
                command: command_line.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(OperatorError::Failed {
                command: command_line,
                output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
            })
        }
    }
}

/// The join token (`mjt1.…`) in what `register` printed.
pub fn join_token_in(out: &str) -> Result<String, OperatorError> {
    out.split_whitespace()
        .find(|w| w.starts_with("mjt1."))
        .map(str::to_owned)
        .ok_or_else(|| OperatorError::NoJoinToken(out.to_owned()))
}
