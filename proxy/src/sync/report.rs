//! Decision records to the control plane: a bounded in-memory queue the request path never waits
//! on, drained in batches (up to `batch_max` records or `batch_wait`) by one task that POSTs them
//! over mTLS and retries with backoff while the control plane is away. Ingest is idempotent by
//! `decision_id`, so a batch resent after a lost answer is harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use mandate_wire::{DECISIONS_PATH, DecisionRecord, IngestResult};
use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::ControlPlane;
use super::backoff::Backoff;
use super::client::{ClientError, Connection, Trust};
use super::spool::{Spool, SpoolFull};
use super::unix_now;

/// Where a managed sidecar's decision records wait for the control plane: the on-disk spool, or
/// (no `--spool-dir` nor `--state-dir`) memory only, lost on restart.
pub enum Reporter {
    /// The on-disk spool.
    Spool(Spool),
    /// The in-memory queue.
    Memory {
        /// The queue.
        queue: DecisionQueue,
        /// What a full queue does to calls.
        mode: SpoolFull,
    },
}

impl Reporter {
    /// Why calls must be refused before being forwarded, if they must: the records cannot be
    /// kept and `--spool-full` is `refuse`.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Self::Spool(spool) if spool.mode() == SpoolFull::Refuse => spool.full(),
            Self::Memory {
                queue,
                mode: SpoolFull::Refuse,
            } => queue.full(),
            _ => None,
        }
    }

    /// Hands a record over without waiting.
    pub fn record(&self, record: DecisionRecord) {
        match self {
            Self::Spool(spool) => spool.record(&record),
            Self::Memory { queue, .. } => queue.record(record),
        }
    }

    /// Shutdown: waits (within `timeout`) until the control plane has every record.
    pub async fn flush(&self, timeout: Duration) -> bool {
        match self {
            Self::Spool(spool) => spool.flush(timeout).await,
            Self::Memory { queue, .. } => queue.flush(timeout).await,
        }
    }
}

/// Records waiting for delivery before new ones are dropped (and counted).
const QUEUE: usize = 65_536;
/// One batch's POST may take this long before it is retried.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

enum Message {
    Record(Box<DecisionRecord>),
    /// Deliver everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// The request path's end of the queue.
pub struct DecisionQueue {
    tx: mpsc::Sender<Message>,
    dropped: IntCounter,
    /// Unix second of the last "queue full" log line, so a flood of drops logs once a second.
    last_drop_log: AtomicI64,
}

impl DecisionQueue {
    /// Starts the uploader task and returns the queue feeding it.
    pub fn start(cp: Arc<ControlPlane>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = cp.metrics.decisions_dropped.clone();
        tokio::spawn(upload_loop(cp, rx));
        Self {
            tx,
            dropped,
            last_drop_log: AtomicI64::new(0),
        }
    }

    /// Queues a record without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, record: DecisionRecord) {
        if self.tx.try_send(Message::Record(Box::new(record))).is_err() {
            self.dropped.inc();
            let now = unix_now();
            if self.last_drop_log.swap(now, Ordering::Relaxed) != now {
                tracing::error!(
                    "decision queue to the control plane is full: decision records are being dropped (mandate_decisions_dropped_total)"
                );
            }
        }
    }

    /// Why no more records fit, if they do not.
    pub fn full(&self) -> Option<String> {
        (self.tx.capacity() == 0).then(|| {
            format!("in-memory decision queue is full ({QUEUE} records not yet taken by the control plane)")
        })
    }

    /// Waits (up to `timeout`) until the control plane has every record queued so far.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = oneshot::channel();
        let flushed = tokio::time::timeout(timeout, async {
            self.tx.send(Message::Flush(ack)).await.ok()?;
            done.await.ok()
        })
        .await;
        let flushed = matches!(flushed, Ok(Some(())));
        if flushed {
            tracing::info!("decision records delivered to the control plane");
        } else {
            tracing::warn!(
                ?timeout,
                "the control plane did not take every decision record before shutdown"
            );
        }
        flushed
    }
}

/// The body of `POST /v1/sidecar/decisions`, borrowing the batch so a retry does not copy it.
#[derive(Serialize)]
struct BatchRef<'a> {
    decisions: &'a [DecisionRecord],
}

async fn upload_loop(cp: Arc<ControlPlane>, mut rx: mpsc::Receiver<Message>) {
    let max = cp.timing.batch_max.max(1);
    let mut delivery = Delivery::new(cp.clone());
    let mut batch: Vec<DecisionRecord> = Vec::with_capacity(max);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut closed = false;
    let take = |m: Message, batch: &mut Vec<_>, acks: &mut Vec<_>| match m {
        Message::Record(r) => batch.push(*r),
        Message::Flush(ack) => acks.push(ack),
    };
    while !closed {
        match rx.recv().await {
            Some(m) => take(m, &mut batch, &mut acks),
            None => break,
        }
        let deadline = Instant::now() + cp.timing.batch_wait;
        while batch.len() < max && acks.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => take(m, &mut batch, &mut acks),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        delivery.deliver(&batch, "keeping them").await;
        batch.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// Delivers decision batches to the control plane over one reused mTLS connection, retrying
/// each batch with backoff until it is taken (ingest is idempotent, so a resend is harmless).
pub(super) struct Delivery {
    cp: Arc<ControlPlane>,
    conn: Option<Connection>,
}

impl Delivery {
    /// A delivery with no connection yet.
    pub(super) fn new(cp: Arc<ControlPlane>) -> Self {
        Self { cp, conn: None }
    }

    /// Returns once the control plane has taken `batch`; `kept` says, for the retry log line,
    /// where the records wait meanwhile.
    pub(super) async fn deliver(&mut self, batch: &[DecisionRecord], kept: &str) {
        if batch.is_empty() {
            return;
        }
        let timing = &self.cp.timing;
        let mut backoff = Backoff::new(timing.upload_retry.0, timing.upload_retry.1);
        loop {
            match self.send(batch).await {
                Ok(result) => {
                    self.cp.metrics.decisions_sent.inc_by(batch.len() as u64);
                    tracing::debug!(
                        accepted = result.accepted,
                        duplicates = result.duplicates,
                        "decision batch delivered"
                    );
                    return;
                }
                Err(e) => {
                    self.conn = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        records = batch.len(),
                        retry_in = ?delay,
                        "cannot deliver decision records to the control plane; {kept}, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn send(&mut self, batch: &[DecisionRecord]) -> Result<IngestResult, ClientError> {
        let cp = &self.cp;
        let conn = &mut self.conn;
        let attempt = async {
            let open = match conn.take() {
                Some(c) if !c.is_closed() => c,
                _ => {
                    let identity = cp.identity.current();
                    cp.client.connect(Trust::Identity(&identity)).await?
                }
            };
            let c = conn.insert(open);
            c.post_json(DECISIONS_PATH, &BatchRef { decisions: batch })
                .await
        };
        tokio::time::timeout(POST_TIMEOUT, attempt)
            .await
            .map_err(|_| ClientError::Timeout(cp.client.url().authority()))?
    }
}
