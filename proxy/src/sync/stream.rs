//! The push stream: one long-lived `GET /v1/sidecar/stream` over mTLS, NDJSON lines of
//! `StreamMessage`, each `update` applied as it arrives. A broken or silent stream is re-opened
//! with backoff and jitter, resuming from what was applied; meanwhile the last good state stays
//! in force.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mandate_wire::{NDJSON, STREAM_PATH, StreamMessage, StreamQuery};
use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use super::apply::Applier;
use super::backoff::Backoff;
use super::client::{ClientError, Trust, api_error, read_body};

/// Longest line accepted (a bundle with its data, or the whole registry).
const MAX_LINE: usize = 64 << 20;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Opening it failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Reading it failed.
    #[error("stream broke: {0}")]
    Read(#[from] hyper::Error),
    /// Nothing arrived in time.
    #[error("no line (not even a heartbeat) for {0:?}")]
    Silent(Duration),
    /// The control plane closed it.
    #[error("the control plane closed the stream")]
    Closed,
    /// A line grew beyond the limit.
    #[error("a stream line exceeds {MAX_LINE} bytes")]
    LineTooLong,
}

/// Holds the stream until `cancel`, reconnecting whenever it breaks.
pub async fn run(cp: Arc<ControlPlane>, applier: Arc<Applier>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(cp.timing.reconnect.0, cp.timing.reconnect.1);
    loop {
        let result = tokio::select! {
            result = stream_once(&cp, &applier, &mut backoff) => result,
            () = cancel.cancelled() => break,
        };
        cp.metrics.control_plane_connected.set(0);
        let delay = backoff.next_delay();
        match result {
            Err(StreamError::Client(e)) => tracing::warn!(
                error = %e,
                retry_in = ?delay,
                "cannot open the stream from the control plane; enforcing the last good policy meanwhile"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                retry_in = ?delay,
                "stream from the control plane lost; enforcing the last good policy meanwhile"
            ),
            Ok(()) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => break,
        }
        cp.metrics.stream_reconnects.inc();
    }
    cp.metrics.control_plane_connected.set(0);
}

/// The query resuming from what has been applied.
pub fn resume_path(applier: &Applier) -> String {
    let (policy_version, registry_revision) = applier.resume_point();
    let query = StreamQuery {
        policy_version,
        registry_revision,
        delegation_revision: applier.delegation_revision(),
    };
    let mut path = String::from(STREAM_PATH);
    let mut sep = '?';
    for (key, value) in [
        ("policy_version", query.policy_version),
        ("registry_revision", query.registry_revision),
        ("delegation_revision", query.delegation_revision),
    ] {
        if let Some(value) = value {
            path.push(sep);
            path.push_str(key);
            path.push('=');
            path.push_str(&value.to_string());
            sep = '&';
        }
    }
    path
}

async fn stream_once(
    cp: &ControlPlane,
    applier: &Applier,
    backoff: &mut Backoff,
) -> Result<(), StreamError> {
    let current = cp.identity.current();
    let mut conn = cp.client.connect(Trust::Identity(&current)).await?;
    drop(current);
    let path = resume_path(applier);
    let resp = conn.send(Method::GET, &path, None).await?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = read_body(resp.into_body()).await?;
        return Err(api_error(status, &body).into());
    }
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with(NDJSON) {
        tracing::debug!(
            content_type,
            "stream answered with an unexpected content type"
        );
    }
    cp.metrics.control_plane_connected.set(1);
    tracing::info!(control_plane = %cp.client.url(), resume = %path, "stream from the control plane connected");
    read_lines(resp.into_body(), cp.timing.stream_idle, |line| {
        // Something arrived: the control plane is back, so the next failure starts afresh.
        backoff.reset();
        handle_line(applier, line);
    })
    .await
}

fn handle_line(applier: &Applier, line: &[u8]) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match serde_json::from_slice::<StreamMessage>(line) {
        Ok(StreamMessage::Heartbeat) => tracing::trace!("heartbeat"),
        Ok(StreamMessage::Update {
            bundle,
            registry,
            trust_bundle,
            delegation,
        }) => {
            applier.apply(bundle, registry, trust_bundle);
            if let Some(delegation) = delegation {
                applier.apply_delegation(delegation);
            }
        }
        Err(e) => tracing::error!(error = %e, "unreadable stream line skipped"),
    }
}

/// Feeds each complete line of `body` to `on_line`; fails when no data comes for `idle`.
async fn read_lines(
    mut body: Incoming,
    idle: Duration,
    mut on_line: impl FnMut(&[u8]),
) -> Result<(), StreamError> {
    let mut buf = BytesMut::new();
    // Bytes already searched for a newline: a long line arriving in many frames is scanned once.
    let mut scanned = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(StreamError::Silent(idle)),
            Ok(None) => return Err(StreamError::Closed),
            Ok(Some(frame)) => frame?,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        buf.extend_from_slice(&data);
        while let Some(at) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let end = scanned + at;
            on_line(&buf[..end]);
            buf.advance(end + 1);
            scanned = 0;
        }
        scanned = buf.len();
        if buf.len() > MAX_LINE {
            return Err(StreamError::LineTooLong);
        }
    }
}
