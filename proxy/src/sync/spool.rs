//! The decision spool: decision records on their way to the control plane, kept on disk so that
//! neither an unreachable control plane nor a restart of the sidecar (clean, or `kill -9`) loses
//! one.
//!
//! Records are appended to segment files (`<seq>.seg`, up to [`SEGMENT_BYTES`] each) in the spool
//! directory, each framed as `len: u32 LE | crc32: u32 LE | JSON`, so a torn tail after a crash is
//! recognised (a short frame, a length past the end, a CRC that does not match) and cut off at
//! start-up, never mis-read. One writer thread appends in group commits: everything queued when it
//! wakes goes out in one `write`, at once (the page cache outlives the process, so `kill -9` loses
//! nothing written), and the file is `fdatasync`ed at most every [`FSYNC_EVERY`] and whenever a
//! segment is sealed (so a power loss loses at most that much). The request path only serialises
//! the record and hands it to the writer's channel: no disk I/O, no global lock.
//!
//! One uploader task reads the segments in order, POSTs batches (up to `batch_max`) to the control
//! plane, retrying with backoff while it is away, and deletes a segment once every record in it is
//! acknowledged. At start-up what the spool holds is delivered first, before newer records. A
//! partly acknowledged segment is sent again after a restart; ingest is idempotent by
//! `decision_id`, so that is harmless.
//!
//! The spool holds at most `limit` bytes (records not yet acknowledged, including those still on
//! their way to disk): [`Spool::full`] says when it is over, and the authorizer then refuses calls
//! (or, with `--spool-full=drop`, forwards them and drops their records, counted).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use mandate_wire::DecisionRecord;
use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::ControlPlane;
use super::backoff::Backoff;
use super::report::Delivery;
use super::unix_now;

/// A segment is sealed and a new one started once it would grow past this.
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// Longest written data waits for `fdatasync`.
pub const FSYNC_EVERY: Duration = Duration::from_millis(100);
/// Bytes of a frame's header (length, CRC32).
pub const FRAME_HEADER: u64 = 8;
/// A frame declaring a longer record is corrupt (records are a few hundred bytes).
const MAX_RECORD: u32 = 16 << 20;
/// Most records written in one group commit.
const GROUP_MAX: usize = 4096;

/// What happens to a call when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolFull {
    /// Refuse the call (503 `spool_full`) before it is forwarded: nothing acts unrecorded.
    Refuse,
    /// Forward the call and drop its record, counted in `mandate_decisions_dropped_total`.
    Drop,
}

/// The segment file of sequence number `seq`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.seg"))
}

/// The sequence numbers of the segments in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Appends `payload` framed (length, CRC32, payload) to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Frames read from one segment.
#[derive(Debug, Default)]
pub struct Frames {
    /// The payloads, in order.
    pub payloads: Vec<Vec<u8>>,
    /// Offset just past the last frame read.
    pub end: u64,
    /// Bytes of the frames read, headers included.
    pub bytes: u64,
    /// Reading stopped at a frame that is short, too long or fails its CRC.
    pub torn: bool,
}

/// Reads up to `max` frames of segment `path` from `offset`, not past `limit` (the end the writer
/// has published; `None`: the whole file). A missing file reads as empty.
pub fn read_frames(path: &Path, offset: u64, limit: Option<u64>, max: usize) -> io::Result<Frames> {
    let mut frames = Frames {
        end: offset,
        ..Frames::default()
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(frames),
        Err(e) => return Err(e),
    };
    let limit = match limit {
        Some(l) => l,
        None => file.metadata()?.len(),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::with_capacity(256 << 10, file);
    while frames.payloads.len() < max && frames.end < limit {
        let left = limit - frames.end;
        let mut header = [0u8; FRAME_HEADER as usize];
        if left < FRAME_HEADER {
            frames.torn = true;
            break;
        }
        r.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD || u64::from(len) > left - FRAME_HEADER {
            frames.torn = true;
            break;
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            frames.torn = true;
            break;
        }
        frames.end += FRAME_HEADER + u64::from(len);
        frames.bytes += FRAME_HEADER + u64::from(len);
        frames.payloads.push(payload);
    }
    Ok(frames)
}

/// Checks segment `path` after a restart: cuts off a torn tail (a write the crash interrupted)
/// and returns the length and number of the intact frames.
pub fn recover(path: &Path) -> io::Result<(u64, usize)> {
    let mut len = 0;
    let mut count = 0;
    loop {
        let frames = read_frames(path, len, None, 4096)?;
        len = frames.end;
        count += frames.payloads.len();
        if frames.torn {
            let file = OpenOptions::new().write(true).open(path)?;
            let was = file.metadata()?.len();
            file.set_len(len)?;
            file.sync_all()?;
            tracing::warn!(
                segment = %path.display(),
                kept = len,
                cut = was - len,
                "decision spool: cut off a torn record at the end of a segment (a write interrupted by a crash)"
            );
            return Ok((len, count));
        }
        if frames.payloads.is_empty() {
            return Ok((len, count));
        }
    }
}

enum Message {
    Record(Vec<u8>),
    /// Write and sync everything sent before this, then answer.
    Sync(oneshot::Sender<()>),
}

/// Metric handles of the spool.
#[derive(Clone)]
struct Counters {
    bytes: IntGauge,
    spooled: IntCounter,
    dropped: IntCounter,
}

/// The request path's end of the spool.
pub struct Spool {
    tx: std_mpsc::Sender<Message>,
    limit: i64,
    mode: SpoolFull,
    counters: Counters,
    /// The last write failed: nothing can be recorded until one succeeds.
    failing: Arc<AtomicBool>,
    /// Unix second of the last "spool full" log line, so a flood logs once a second.
    last_log: AtomicI64,
}

impl Spool {
    /// Opens (creating, mode 0700) the spool in `dir`, recovers what an earlier run left, and
    /// starts the writer thread and the uploader task (which delivers the old records first).
    pub fn open(
        dir: &Path,
        limit: u64,
        mode: SpoolFull,
        cp: Arc<ControlPlane>,
    ) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let counters = Counters {
            bytes: cp.metrics.decision_spool_bytes.clone(),
            spooled: cp.metrics.decisions_spooled.clone(),
            dropped: cp.metrics.decisions_dropped.clone(),
        };
        cp.metrics
            .decision_spool_limit_bytes
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        let (first, next, bytes, records) = recover_dir(dir)?;
        counters.bytes.set(bytes as i64);
        if records > 0 {
            tracing::info!(
                spool = %dir.display(),
                records,
                bytes,
                "decision spool: delivering the records an earlier run left, before new ones"
            );
        }
        let (tx, rx) = std_mpsc::channel();
        let (committed_tx, committed_rx) = watch::channel((next, 0u64));
        let failing = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            dir: dir.to_owned(),
            seq: next,
            file: None,
            len: 0,
            dirty: false,
            last_sync: Instant::now(),
            committed: committed_tx,
            counters: counters.clone(),
            failing: failing.clone(),
        };
        std::thread::Builder::new()
            .name("decision-spool".into())
            .spawn(move || writer.run(rx))?;
        tokio::spawn(upload_loop(
            cp,
            dir.to_owned(),
            first.unwrap_or(next),
            committed_rx,
            counters.bytes.clone(),
        ));
        Ok(Self {
            tx,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            mode,
            counters,
            failing,
            last_log: AtomicI64::new(0),
        })
    }

    /// What happens to calls when the spool is full.
    pub fn mode(&self) -> SpoolFull {
        self.mode
    }

    /// Why no more records fit, if they do not: the spool is at its limit, or cannot write.
    pub fn full(&self) -> Option<String> {
        let bytes = self.counters.bytes.get();
        if bytes >= self.limit {
            Some(format!(
                "decision spool is full ({bytes} of {} bytes not yet taken by the control plane)",
                self.limit
            ))
        } else if self.failing.load(Ordering::Relaxed) {
            Some("decision spool cannot write to disk (see the sidecar's log)".into())
        } else {
            None
        }
    }

    /// Hands a record to the writer without waiting. In `drop` mode a full spool drops it
    /// (counted); in `refuse` mode the call was admitted while there was room, so it is kept.
    pub fn record(&self, record: &DecisionRecord) {
        let payload = match serde_json::to_vec(record) {
            Ok(p) => p,
            Err(e) => {
                self.drop_one(&format!("record does not serialise: {e}"));
                return;
            }
        };
        if self.mode == SpoolFull::Drop
            && let Some(why) = self.full()
        {
            self.drop_one(&why);
            return;
        }
        let size = FRAME_HEADER as i64 + payload.len() as i64;
        self.counters.bytes.add(size);
        if self.tx.send(Message::Record(payload)).is_err() {
            self.counters.bytes.sub(size);
            self.drop_one("the spool writer has stopped");
        }
    }

    fn drop_one(&self, why: &str) {
        self.counters.dropped.inc();
        let now = unix_now();
        if self.last_log.swap(now, Ordering::Relaxed) != now {
            tracing::error!(
                "{why}: decision records are being dropped (mandate_decisions_dropped_total)"
            );
        }
    }

    /// Writes and syncs everything recorded so far, then waits (within `timeout`) until the
    /// control plane has it all. What it does not take stays spooled for the next start.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let (ack, done) = oneshot::channel();
        let written = self.tx.send(Message::Sync(ack)).is_ok()
            && tokio::time::timeout_at(deadline, done).await.is_ok();
        if !written {
            tracing::error!("decision spool: could not write every record to disk before shutdown");
            return false;
        }
        while self.counters.bytes.get() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    ?timeout,
                    bytes = self.counters.bytes.get(),
                    "the control plane did not take every decision record before shutdown; they stay spooled and are delivered after the next start"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("decision records delivered to the control plane");
        true
    }
}

/// Recovers every segment in `dir` (removing empty ones): the oldest left, the next sequence
/// number, and the bytes and records spooled.
fn recover_dir(dir: &Path) -> io::Result<(Option<u64>, u64, u64, usize)> {
    let mut first = None;
    let mut last = 0;
    let mut bytes = 0;
    let mut records = 0;
    for seq in list_segments(dir)? {
        let path = segment_path(dir, seq);
        let (len, count) = recover(&path)?;
        last = seq;
        if len == 0 {
            std::fs::remove_file(&path)?;
            continue;
        }
        first.get_or_insert(seq);
        bytes += len;
        records += count;
    }
    Ok((first, last + 1, bytes, records))
}

/// The writer thread's state: the open segment.
struct Writer {
    dir: PathBuf,
    seq: u64,
    file: Option<File>,
    len: u64,
    dirty: bool,
    last_sync: Instant,
    /// (segment, length) written so far: the uploader reads no further.
    committed: watch::Sender<(u64, u64)>,
    counters: Counters,
    failing: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Message>) {
        loop {
            let first = if self.dirty {
                let wait = FSYNC_EVERY.saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            };
            let mut group = Vec::new();
            let mut syncs = Vec::new();
            if let Some(m) = first {
                let mut n = 0;
                let mut next = Some(m);
                while let Some(m) = next {
                    match m {
                        Message::Record(payload) => {
                            n += 1;
                            self.append(&mut group, &payload);
                        }
                        Message::Sync(ack) => syncs.push(ack),
                    }
                    next = if n < GROUP_MAX {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
            }
            self.write_group(&mut group);
            if self.dirty && (!syncs.is_empty() || self.last_sync.elapsed() >= FSYNC_EVERY) {
                self.sync();
            }
            for ack in syncs {
                let _ = ack.send(());
            }
        }
        self.write_group(&mut Vec::new());
        self.sync();
    }

    /// Adds a frame to the group, first writing the group and sealing the segment if the frame
    /// would take it past [`SEGMENT_BYTES`].
    fn append(&mut self, group: &mut Vec<u8>, payload: &[u8]) {
        let size = FRAME_HEADER + payload.len() as u64;
        let pending = self.len + group.len() as u64;
        if pending > 0 && pending + size > SEGMENT_BYTES {
            self.write_group(group);
            self.seal();
        }
        encode(payload, group);
    }

    fn write_group(&mut self, group: &mut Vec<u8>) {
        if group.is_empty() {
            return;
        }
        let records = count_frames(group);
        let result = (|| {
            if self.file.is_none() {
                let path = segment_path(&self.dir, self.seq);
                self.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
            }
            self.file.as_mut().expect("opened").write_all(group)
        })();
        match result {
            Ok(()) => {
                self.len += group.len() as u64;
                self.dirty = true;
                self.counters.spooled.inc_by(records);
                self.failing.store(false, Ordering::Relaxed);
                self.committed.send_replace((self.seq, self.len));
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    records,
                    segment = %segment_path(&self.dir, self.seq).display(),
                    "decision spool: cannot write; these records are lost (mandate_decisions_dropped_total) and calls are refused until a write succeeds"
                );
                self.failing.store(true, Ordering::Relaxed);
                self.counters.dropped.inc_by(records);
                self.counters.bytes.sub(group.len() as i64);
                // A partial write may have left a torn frame: continue in a fresh segment.
                if self.len > 0 || self.file.is_some() {
                    self.seal();
                }
            }
        }
        group.clear();
    }

    fn sync(&mut self) {
        if let Some(f) = &self.file
            && let Err(e) = f.sync_data()
        {
            tracing::error!(error = %e, "decision spool: fdatasync failed");
        }
        self.dirty = false;
        self.last_sync = Instant::now();
    }

    /// Syncs and closes the current segment; the next write starts the next one.
    fn seal(&mut self) {
        self.sync();
        self.file = None;
        self.seq += 1;
        self.len = 0;
        self.committed.send_replace((self.seq, 0));
    }
}

fn count_frames(mut group: &[u8]) -> u64 {
    let mut n = 0;
    while group.len() >= FRAME_HEADER as usize {
        let len = u32::from_le_bytes(group[..4].try_into().expect("4 bytes")) as usize;
        group = &group[(FRAME_HEADER as usize + len).min(group.len())..];
        n += 1;
    }
    n
}

/// The uploader's place in the spool: the segment and offset of the first record not yet
/// acknowledged.
#[derive(Debug)]
struct Cursor {
    dir: PathBuf,
    seq: u64,
    offset: u64,
}

impl Cursor {
    /// The next records to deliver (up to `max`), not past what the writer has published
    /// (`writing`: its segment, `written`: that segment's length). A sealed segment read to its end
    /// — every record in it acknowledged, as the offset only moves on acknowledgement — is deleted
    /// and the next one opened. `None`: nothing to deliver now.
    fn next(&mut self, (writing, written): (u64, u64), max: usize) -> io::Result<Option<Frames>> {
        loop {
            let sealed = self.seq < writing;
            let path = segment_path(&self.dir, self.seq);
            let frames = read_frames(&path, self.offset, (!sealed).then_some(written), max)?;
            if !frames.payloads.is_empty() {
                return Ok(Some(frames));
            }
            if frames.torn {
                // Start-up cut torn tails off, so this is a write that failed in this run (the
                // writer counted its records as dropped and moved to a new segment), or damage.
                tracing::error!(segment = %path.display(), offset = self.offset, "decision spool: an unreadable record; skipping the rest of the segment");
                self.offset = std::fs::metadata(&path).map_or(self.offset, |m| m.len());
            }
            if !sealed {
                return Ok(None);
            }
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                // Its records would be sent again after a restart: harmless, but say so.
                tracing::error!(error = %e, segment = %path.display(), "decision spool: cannot delete a delivered segment");
            }
            self.seq = list_segments(&self.dir)?
                .into_iter()
                .find(|&s| s > self.seq)
                .unwrap_or(writing);
            self.offset = 0;
        }
    }

    /// The records of `frames` are acknowledged.
    fn ack(&mut self, frames: &Frames) {
        self.offset = frames.end;
    }
}

/// Delivers the segments in order from `seq`, deleting each once all its records are taken.
async fn upload_loop(
    cp: Arc<ControlPlane>,
    dir: PathBuf,
    seq: u64,
    mut committed: watch::Receiver<(u64, u64)>,
    bytes: IntGauge,
) {
    let max = cp.timing.batch_max.max(1);
    let retry = || Backoff::new(cp.timing.upload_retry.0, cp.timing.upload_retry.1);
    let mut delivery = Delivery::new(cp.clone());
    let mut cursor = Cursor {
        dir,
        seq,
        offset: 0,
    };
    let mut read_retry = retry();
    loop {
        let published = *committed.borrow_and_update();
        let (back, read) = match tokio::task::spawn_blocking(move || {
            let read = cursor.next(published, max);
            (cursor, read)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "decision spool: the reader failed; no more records are delivered until a restart");
                return;
            }
        };
        cursor = back;
        let frames = match read {
            Ok(Some(frames)) => frames,
            Ok(None) => {
                // Caught up: wait for more, then give the batch a moment to fill.
                if committed.changed().await.is_err() {
                    return;
                }
                tokio::time::sleep(cp.timing.batch_wait).await;
                continue;
            }
            Err(e) => {
                let delay = read_retry.next_delay();
                tracing::error!(error = %e, segment = cursor.seq, retry_in = ?delay, "decision spool: cannot read the spool");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        read_retry = retry();
        let mut batch = Vec::with_capacity(frames.payloads.len());
        for payload in &frames.payloads {
            match serde_json::from_slice::<DecisionRecord>(payload) {
                Ok(r) => batch.push(r),
                Err(e) => {
                    cp.metrics.decisions_dropped.inc();
                    tracing::error!(error = %e, segment = cursor.seq, "decision spool: a spooled record does not parse; skipped");
                }
            }
        }
        delivery.deliver(&batch, "they stay spooled").await;
        cursor.ack(&frames);
        bytes.sub(frames.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for p in payloads {
            encode(p, &mut buf);
        }
        std::fs::write(path, &buf).unwrap();
        buf
    }

    #[test]
    fn frames_round_trip_in_order_and_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let buf = write(&path, &[b"one", b"two", b"three"]);
        let all = read_frames(&path, 0, None, 100).unwrap();
        assert_eq!(
            all.payloads,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(all.end, buf.len() as u64);
        assert_eq!(all.bytes, buf.len() as u64);
        assert!(!all.torn);
        let first = read_frames(&path, 0, None, 2).unwrap();
        assert_eq!(first.payloads.len(), 2);
        let rest = read_frames(&path, first.end, None, 100).unwrap();
        assert_eq!(rest.payloads, vec![b"three".to_vec()]);
        // The writer's published end bounds what is read.
        let bounded = read_frames(&path, 0, Some(first.end), 100).unwrap();
        assert_eq!(bounded.payloads.len(), 2);
        assert!(!bounded.torn);
        // A missing segment reads as empty.
        let none = read_frames(&segment_path(dir.path(), 2), 0, None, 100).unwrap();
        assert!(none.payloads.is_empty() && !none.torn);
    }

    #[test]
    fn a_torn_tail_is_cut_off_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 7);
        let buf = write(&path, &[b"kept-1", b"kept-2", b"torn-record"]);
        let intact = buf.len() as u64 - (FRAME_HEADER + 11);
        // Every way a crash can cut the last frame: inside the header, inside the payload.
        for cut in [1, 4, 9, 12, 18] {
            std::fs::write(&path, &buf[..(intact + cut) as usize]).unwrap();
            let (len, count) = recover(&path).unwrap();
            assert_eq!((len, count), (intact, 2), "cut {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), intact);
            let f = read_frames(&path, 0, None, 100).unwrap();
            assert_eq!(f.payloads, vec![b"kept-1".to_vec(), b"kept-2".to_vec()]);
        }
        // A whole frame whose bytes are damaged fails its CRC.
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(recover(&path).unwrap(), (intact, 2));
        // A length past any sane record is not believed.
        let mut huge = buf[..intact as usize].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 20]);
        std::fs::write(&path, &huge).unwrap();
        assert_eq!(recover(&path).unwrap(), (intact, 2));
    }

    #[test]
    fn recovery_lists_segments_in_order_and_removes_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(&segment_path(dir.path(), 3), &[b"c"]);
        write(&segment_path(dir.path(), 2), &[b"a", b"b"]);
        std::fs::write(segment_path(dir.path(), 4), [1u8, 0]).unwrap(); // torn to nothing
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2, 3, 4]);
        let (first, next, bytes, records) = recover_dir(dir.path()).unwrap();
        assert_eq!(first, Some(2));
        assert_eq!(next, 5);
        assert_eq!(records, 3);
        assert_eq!(bytes, 3 * FRAME_HEADER + 3);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2, 3]);
        let (first, next, _, _) = recover_dir(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!((first, next), (None, 1));
    }

    #[test]
    fn the_writer_groups_rolls_segments_and_publishes_what_is_readable() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::new();
        let counters = Counters {
            bytes: metrics.decision_spool_bytes.clone(),
            spooled: metrics.decisions_spooled.clone(),
            dropped: metrics.decisions_dropped.clone(),
        };
        let (committed, mut seen) = watch::channel((1, 0));
        let writer = Writer {
            dir: dir.path().to_owned(),
            seq: 1,
            file: None,
            len: 0,
            dirty: false,
            last_sync: Instant::now(),
            committed,
            counters,
            failing: Arc::new(AtomicBool::new(false)),
        };
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(rx));
        // 1 MiB records: four fit in no segment with their headers, so the fourth rolls.
        let big = vec![b'x'; 1 << 20];
        for _ in 0..5 {
            tx.send(Message::Record(big.clone())).unwrap();
        }
        let (ack, done) = oneshot::channel();
        tx.send(Message::Sync(ack)).unwrap();
        done.blocking_recv().unwrap();
        let (seq, len) = *seen.borrow_and_update();
        assert_eq!(seq, 2);
        assert_eq!(len, 2 * (FRAME_HEADER + (1 << 20)));
        assert_eq!(list_segments(dir.path()).unwrap(), vec![1, 2]);
        assert_eq!(
            read_frames(&segment_path(dir.path(), 1), 0, None, 100)
                .unwrap()
                .payloads
                .len(),
            3
        );
        assert_eq!(
            read_frames(&segment_path(dir.path(), 2), 0, Some(len), 100)
                .unwrap()
                .payloads
                .len(),
            2
        );
        assert_eq!(metrics.decisions_spooled.get(), 5);
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn delivered_segments_are_deleted_only_once_every_record_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        write(&segment_path(dir.path(), 1), &[b"a", b"b", b"c"]);
        let open = write(&segment_path(dir.path(), 3), &[b"d", b"e"]);
        let mut cursor = Cursor {
            dir: dir.path().to_owned(),
            seq: 1,
            offset: 0,
        };
        // The writer is in segment 3 and has published its first frame only.
        let published = (3, (FRAME_HEADER + 1));
        let first = cursor.next(published, 2).unwrap().unwrap();
        assert_eq!(first.payloads, vec![b"a".to_vec(), b"b".to_vec()]);
        // Not acknowledged (the control plane was away): the same records again.
        let again = cursor.next(published, 2).unwrap().unwrap();
        assert_eq!(again.payloads, first.payloads);
        cursor.ack(&again);
        let rest = cursor.next(published, 2).unwrap().unwrap();
        assert_eq!(rest.payloads, vec![b"c".to_vec()]);
        assert!(
            segment_path(dir.path(), 1).exists(),
            "not deleted before its last ack"
        );
        cursor.ack(&rest);
        // Segment 1 is done: deleted, and the next one (3; there is no 2) is read, up to what
        // the writer published.
        let next = cursor.next(published, 2).unwrap().unwrap();
        assert!(!segment_path(dir.path(), 1).exists());
        assert_eq!(next.payloads, vec![b"d".to_vec()]);
        cursor.ack(&next);
        assert!(cursor.next(published, 2).unwrap().is_none());
        let all = (3, open.len() as u64);
        let last = cursor.next(all, 2).unwrap().unwrap();
        assert_eq!(last.payloads, vec![b"e".to_vec()]);
        cursor.ack(&last);
        // The segment being written is never deleted, however far it is read.
        assert!(cursor.next(all, 2).unwrap().is_none());
        assert!(segment_path(dir.path(), 3).exists());
        // Once the writer seals it, it goes too, and the cursor waits at the writer's next one.
        assert!(cursor.next((4, 0), 2).unwrap().is_none());
        assert!(!segment_path(dir.path(), 3).exists());
        assert_eq!((cursor.seq, cursor.offset), (4, 0));
    }
}
