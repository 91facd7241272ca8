//! The standalone JSON-lines decision log. Records (`mandate_wire::DecisionRecord`, the type the
//! control plane ingests too) are queued to a writer thread, so the request path never waits on the
//! disk.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use mandate_wire::DecisionRecord;
use prometheus::IntCounter;

/// Records that may wait for the writer before new ones are dropped (and counted).
const QUEUE: usize = 65_536;

enum Message {
    Record(Box<DecisionRecord>),
    Flush(mpsc::Sender<()>),
}

/// The JSON-lines decision log of standalone mode.
pub struct DecisionLog {
    tx: SyncSender<Message>,
    dropped: IntCounter,
    _writer: JoinHandle<()>,
}

impl DecisionLog {
    /// Opens (appending) `path` and starts the writer thread.
    pub fn open(path: &Path, dropped: IntCounter) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(rx, BufWriter::new(file)))?;
        Ok(Self {
            tx,
            dropped,
            _writer: writer,
        })
    }

    /// Queues a record without blocking; a full queue drops it and counts the drop.
    pub fn record(&self, record: DecisionRecord) {
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                tracing::error!("decision log queue full or closed: a decision record was dropped");
            }
        }
    }

    /// Waits (up to `timeout`) until everything queued so far is written and flushed.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = mpsc::channel();
        self.tx.send(Message::Flush(ack)).is_ok() && done.recv_timeout(timeout).is_ok()
    }
}

fn write_loop(rx: Receiver<Message>, mut out: BufWriter<std::fs::File>) {
    let write = |out: &mut BufWriter<_>, record: &DecisionRecord| -> io::Result<()> {
        serde_json::to_writer(&mut *out, record)?;
        out.write_all(b"\n")
    };
    while let Ok(first) = rx.recv() {
        // Write everything already queued, then flush once: one syscall per burst, not per record.
        let mut pending = Some(first);
        while let Some(message) = pending.take().or_else(|| rx.try_recv().ok()) {
            match message {
                Message::Record(record) => {
                    if let Err(e) = write(&mut out, &record) {
                        tracing::error!(error = %e, "cannot write the decision log");
                    }
                }
                Message::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "cannot flush the decision log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_wire::{DestinationRecord, Direction};

    fn record(id: &str) -> DecisionRecord {
        DecisionRecord {
            decision_id: id.into(),
            timestamp: "2026-01-01T00:00:00Z".into(),
            direction: Direction::Outbound,
            source: "spiffe://td/agent/a".into(),
            destination: DestinationRecord {
                host: "tool".into(),
                port: 80,
                spiffe_id: None,
            },
            method: Some("GET".into()),
            path: Some("/".into()),
            mcp: None,
            delegation: None,
            approval: None,
            allow: true,
            enforced: true,
            reason: "ok".into(),
            policy_version: Some("abc".into()),
            eval_us: 3,
            trace_id: None,
            sidecar: "s".into(),
            status: Some(200),
        }
    }

    #[test]
    fn records_are_written_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = DecisionLog::open(&path, IntCounter::new("d", "d").unwrap()).unwrap();
        for i in 0..100 {
            log.record(record(&i.to_string()));
        }
        assert!(log.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[99]["decision_id"], "99");
        assert_eq!(lines[0]["destination"]["host"], "tool");
        assert!(lines[0].get("mcp").is_none());
    }
}
