//! The audit trail: one JSON line per request, hash-chained, written by a dedicated thread.
//!
//! Requests hand finished records to the writer through a bounded queue and never wait for it;
//! a full queue or a failing sink loses records, and every lost record is counted
//! (`cloudcasa_gateway_audit_records_failed_total`) and logged. The exception is fail-closed mode
//! (the audit-intent layer): a write is forwarded only once its intent record is on disk (written and
//! fsynced); otherwise the client gets 503 and the upstream sees nothing.
//!
//! Records are written straight into a staging buffer shared with the writer (one short lock,
//! no allocation, no message per record). The writer takes the whole buffer at a time (letting
//! outcome records gather for ten milliseconds first) and seals and writes it in one go, so each
//! record is written within about ten milliseconds of the response ending; a failed batch is
//! truncated away when the sink is a regular file, so the chain on disk stays whole.

pub mod chain;
pub mod record;

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::{AuditConfig, AuditSink};
use crate::context::LogIds;
use crate::observability::metrics::AuditMetrics;
use chain::{ChainHash, ChainTag, GENESIS};
use record::{OpenRecord, Record};

/// Records waiting for the writer; past this, records are dropped (and counted), never waited on.
const QUEUE_CAPACITY: usize = 64 * 1024;
/// How long the writer lets outcome records gather before writing them. Waking a thread per
/// record costs a context switch each; at tens of thousands of requests a second on one core,
/// that alone halved throughput. Each batch still costs the writer a wake-up and a write:
/// measured on one core (hit, audit on against off, `bench/run.sh`'s (g), alternating runs),
/// 1 ms of gathering gave 0.77×, 5 ms 0.83×, 10 ms 0.92×, 25 ms no better. Ten milliseconds
/// is what a record may wait in memory; nginx's buffered access log waits up to its `flush`.
/// Intent records (fail-closed writes wait on them), flushes and reopens are never delayed.
const GATHER: Duration = Duration::from_millis(10);
/// How long a write waits for its intent record to be durable before it is refused.
const INTENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a flush (at shutdown) waits for the sink: a hung sink (a stdout pipe nobody reads, a
/// stuck network file system) must not hang the process.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// A staging buffer that grew past this in a burst is given back to the allocator once written.
const KEEP_CAPACITY: usize = 4 * 1024 * 1024;
/// The most the writer seals before it writes: a backlog goes out in pieces, so one failed
/// write loses at most this much, and an intent's fsync does not wait for a whole backlog.
const WRITE_CHUNK: usize = 4 * 1024 * 1024;
/// A thread's serializing buffer that grew past this (a record with a very long target) is
/// given back.
const SCRATCH_KEEP: usize = 64 * 1024;

/// The audit sink could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
#[error("audit.path: cannot open {path}: {source}")]
pub struct AuditOpenError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// What the writer is asked to do, in order; a record's bytes are in [`Staged::bytes`], up to
/// its `end`.
enum Job {
    Record {
        end: usize,
    },
    Intent {
        end: usize,
        done: oneshot::Sender<Result<(), String>>,
    },
    Reopen,
    Flush(oneshot::Sender<ChainHash>),
}

/// The staging buffer: what requests have handed the writer since it last took it.
#[derive(Default)]
struct Staged {
    bytes: Vec<u8>,
    jobs: Vec<Job>,
}

#[derive(Default)]
struct Queue {
    staged: Staged,
    /// Records in `staged` (the queue's bound).
    records: usize,
    /// Something in `staged` must not wait for the gathering delay (an intent, a flush, a reopen).
    urgent: bool,
    /// What the writer is doing, so that a producer wakes it only when it waits.
    writer: WriterIs,
    /// The bytes of the records the writer took and is still writing: with `staged`, what
    /// `audit.max_queued` bounds.
    writer_holds: usize,
    /// Every handle is gone (the writer writes what is left and stops), or the writer stopped.
    closed: bool,
    stopped: bool,
}

impl Queue {
    /// Hands everything staged to the writer (into `taken`, which must be empty, and whose
    /// buffers staging reuses); returns how many records. Their bytes still count against
    /// the bound until the writer next looks.
    fn take(&mut self, taken: &mut Staged) -> usize {
        std::mem::swap(&mut self.staged, taken);
        self.writer_holds = taken.bytes.len();
        self.urgent = false;
        std::mem::take(&mut self.records)
    }
}

/// What the writer is doing: a record wakes an idle writer; only an urgent job cuts a
/// gathering short; a busy writer sees what was queued when it next looks.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum WriterIs {
    #[default]
    Busy,
    Idle,
    Gathering,
}

/// The queue between requests and the writer.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// `audit.max_queued`: the bytes of records staged and being written, together (a record
    /// is about 800 bytes, but its path and query can be long).
    max_bytes: usize,
    /// Records the writer has taken and not yet accounted for (written, or counted as failed):
    /// what a writer that dies mid-batch must still count as lost.
    in_flight: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (pushes are single steps).
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes the queue when the last [`AuditLog`] handle is dropped.
struct Handles(Arc<Shared>);

impl Drop for Handles {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// Marks the queue stopped when the writer thread ends. If it ends by a panic, what it had taken
/// and what is still queued are counted as lost and logged, and every waiter is answered (an
/// intent with an error, a flush with `None`) instead of waiting for ever.
struct Stopped {
    shared: Arc<Shared>,
    metrics: AuditMetrics,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let (left, queued) = {
            let mut q = self.shared.lock();
            q.stopped = true;
            (
                std::mem::take(&mut q.staged),
                std::mem::take(&mut q.records),
            )
        };
        let lost = queued + self.shared.in_flight.swap(0, Ordering::Relaxed);
        self.metrics.queued.dec_by(queued as i64);
        if lost > 0 {
            self.metrics.failed("write", lost as u64);
            tracing::error!(records = lost, "audit writer stopped: records lost");
        }
        // Dropping the jobs closes their channels: intents and flushes learn it now.
        drop(left);
    }
}

thread_local! {
    /// Where a request's thread serializes its record before copying it into the queue under
    /// the lock (kept short so other workers do not wait on the serializing).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// A handle on the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    _handles: Arc<Handles>,
    metrics: AuditMetrics,
    fail_closed: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("fail_closed", &self.fail_closed)
            .finish_non_exhaustive()
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy)]
enum Refused {
    Full,
    Stopped,
}

impl Refused {
    /// The `reason` of `audit_records_failed_total` for a record refused so.
    fn as_str(self) -> &'static str {
        match self {
            Self::Full => "queue_full",
            Self::Stopped => "write",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Full => "the audit writer's queue is full",
            Self::Stopped => STOPPED,
        }
    }
}

const STOPPED: &str = "the audit writer has stopped";

impl AuditLog {
    /// Opens the sink, finds the chain head in an existing file, and starts the writer thread.
    /// Records name `replica` and this writer's chain.
    pub fn open(
        config: &AuditConfig,
        replica: &str,
        metrics: AuditMetrics,
    ) -> Result<Self, AuditOpenError> {
        // The chain continues from the last record of an existing file (under its id); stdout
        // starts a new chain.
        let mut head = GENESIS;
        let mut chain = None;
        let sink = match &config.sink {
            AuditSink::Stdout => Sink::Stdout,
            AuditSink::File(path) => {
                let error = |source| AuditOpenError {
                    path: path.display().to_string(),
                    source,
                };
                let file = open_append(path).map_err(error)?;
                if let Some(found) = chain::read_head(path).map_err(error)? {
                    head = found.hash;
                    chain = found.chain;
                }
                let torn = ends_without_newline(path);
                Sink::File {
                    path: path.clone(),
                    file,
                    torn,
                }
            }
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            max_bytes: usize::try_from(config.max_queued).unwrap_or(usize::MAX),
            in_flight: AtomicUsize::new(0),
        });
        let tag = ChainTag::new(replica, &chain.unwrap_or_else(ChainTag::new_chain_id));
        tracing::info!(head = %head, chain = tag.chain(), replica, sink = ?config.sink, "audit trail open");
        let writer = Writer {
            shared: shared.clone(),
            sink,
            head,
            tag,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| AuditOpenError {
                path: "(writer thread)".into(),
                source,
            })?;
        Ok(Self {
            _handles: Arc::new(Handles(shared.clone())),
            shared,
            metrics,
            fail_closed: config.fail_closed,
        })
    }

    /// Queues `job`, after the record bytes it carries (if any); wakes the writer when it
    /// waits for work, or, for an urgent job, when it is gathering. A refused record is counted.
    fn push(
        &self,
        record: Option<&[u8]>,
        job: impl FnOnce(usize) -> Job,
        urgent: bool,
    ) -> Result<(), Refused> {
        let refused = |why: Refused| {
            if record.is_some() {
                self.metrics.failed(why.as_str(), 1);
            }
            Err(why)
        };
        let mut q = self.shared.lock();
        if q.stopped || q.closed {
            return refused(Refused::Stopped);
        }
        if let Some(bytes) = record {
            let held = q.staged.bytes.len() + q.writer_holds;
            if q.records >= QUEUE_CAPACITY || held + bytes.len() > self.shared.max_bytes {
                return refused(Refused::Full);
            }
            q.staged.bytes.extend_from_slice(bytes);
            q.records += 1;
            self.metrics.queued.inc();
        }
        let end = q.staged.bytes.len();
        q.staged.jobs.push(job(end));
        q.urgent |= urgent;
        let wake = match q.writer {
            WriterIs::Idle => {
                q.writer = WriterIs::Busy;
                true
            }
            WriterIs::Gathering => urgent,
            WriterIs::Busy => false,
        };
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Queues a finished record without waiting. A full queue loses it (counted, and logged
    /// with the request's ids from `ids`).
    pub fn record(&self, record: &Record<'_>, ids: impl FnOnce() -> LogIds) {
        let push = |scratch: &mut Vec<u8>| {
            scratch.clear();
            record.write_open_json(scratch);
            let pushed = self.push(Some(scratch), |end| Job::Record { end }, false);
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::with_capacity(1024);
            }
            pushed
        };
        // A thread's own buffer, or a fresh one while its thread-locals are being torn down.
        let pushed = SCRATCH
            .try_with(|scratch| push(&mut scratch.borrow_mut()))
            .unwrap_or_else(|_| push(&mut Vec::new()));
        if let Err(why) = pushed {
            let ids = ids();
            tracing::error!(
                request_id = ids.request_id(),
                trace_id = %ids.trace_id,
                "audit record lost: {}",
                why.message()
            );
        }
    }

    /// Writes an intent record durably (write and fsync) and waits for it.
    pub async fn intent(&self, open_json: OpenRecord) -> Result<(), String> {
        let (done, written) = oneshot::channel();
        self.push(
            Some(open_json.as_bytes()),
            |end| Job::Intent { end, done },
            true,
        )
        .map_err(|why| why.message().to_string())?;
        match tokio::time::timeout(INTENT_TIMEOUT, written).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(STOPPED.into()),
            Err(_) => Err(format!(
                "the audit sink did not confirm within {}s",
                INTENT_TIMEOUT.as_secs()
            )),
        }
    }

    /// Reopens the file (after logrotate moved it), before the next write.
    pub fn reopen(&self) {
        if self.push(None, |_| Job::Reopen, true).is_err() {
            tracing::error!("audit: could not ask the writer to reopen the file (it has stopped)");
        }
    }

    /// Waits until everything queued so far is written (at most [`FLUSH_TIMEOUT`]); returns the
    /// chain head, or why not.
    pub async fn flush(&self) -> Result<ChainHash, &'static str> {
        let (done, flushed) = oneshot::channel();
        // A flush is never refused for a full queue (it adds no record).
        self.push(None, |_| Job::Flush(done), true)
            .map_err(Refused::message)?;
        match tokio::time::timeout(FLUSH_TIMEOUT, flushed).await {
            Ok(Ok(head)) => Ok(head),
            Ok(Err(_)) => Err(STOPPED),
            Err(_) => Err("the audit sink did not finish writing in time"),
        }
    }

    /// Whether writes wait for a durable intent record.
    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

fn ends_without_newline(path: &std::path::Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// The file ends in a partial line (a failed write that could not be undone): the next
        /// write starts on a new line so that the records after it stay parseable.
        torn: bool,
    },
}

impl Sink {
    /// Writes `buf` (fsynced if `durable`); `head` is the chain head before `buf`'s records.
    /// A file that lost its name while open (removed by hand, or compressed away by a rotation
    /// before the reopen) takes writes and keeps them nowhere: then the path is created afresh
    /// and `buf` written there, so an intent confirmed durable is in the trail and no record
    /// after the removal goes unseen. Checked before the write (removed since the last one:
    /// nothing more goes into the old file) and after it (removed meanwhile, or the write
    /// failed for a full disk whose space the removal frees only once the file is closed).
    fn write(&mut self, buf: &[u8], durable: bool, head: ChainHash) -> std::io::Result<()> {
        if self.unlinked() {
            self.replace_removed(head)?;
        }
        let written = self.write_once(buf, durable);
        if !self.unlinked() {
            return written;
        }
        self.replace_removed(head)?;
        self.write_once(buf, durable)
    }

    /// Creates the removed file again at its path (logging where the chain stands, so that the
    /// new file can be anchored), with its name made durable: an intent written there next is
    /// confirmed only if the file it is in survives a crash.
    fn replace_removed(&mut self, head: ChainHash) -> std::io::Result<()> {
        tracing::warn!(
            file = %self.path().map(|p| p.display().to_string()).unwrap_or_default(),
            head = %head,
            "the audit file was removed while open: writing to a new one at its path; its \
             chain goes on from this head"
        );
        self.reopen();
        if self.unlinked() {
            return Err(std::io::Error::other(
                "the audit file was removed and could not be created again",
            ));
        }
        let dir = self
            .path()
            .and_then(std::path::Path::parent)
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        File::open(dir)?.sync_all()
    }

    fn path(&self) -> Option<&std::path::Path> {
        match self {
            Sink::Stdout => None,
            Sink::File { path, .. } => Some(path),
        }
    }

    /// The open file has no name left (its last link is gone).
    fn unlinked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match self {
            Sink::Stdout => false,
            Sink::File { file, .. } => file.metadata().is_ok_and(|m| m.is_file() && m.nlink() == 0),
        }
    }

    fn write_once(&mut self, buf: &[u8], durable: bool) -> std::io::Result<()> {
        match self {
            // A pipe cannot be fsynced; flushed is as durable as stdout gets.
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Sink::File { file, torn, .. } => {
                let before = file
                    .metadata()
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len());
                let result = (|| {
                    if *torn {
                        file.write_all(b"\n")?;
                    }
                    file.write_all(buf)?;
                    if durable {
                        file.sync_data()?;
                    }
                    Ok(())
                })();
                match &result {
                    Ok(()) => *torn = false,
                    Err(_) => {
                        // Undo a partial write so the file holds whole records only.
                        let undone = before.is_some_and(|len| file.set_len(len).is_ok());
                        *torn = *torn || !undone;
                    }
                }
                result
            }
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, file, torn } = self {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    // The old file's torn last line is the old file's: a new file starts clean.
                    *torn = ends_without_newline(path);
                    tracing::info!(file = %path.display(), "audit file reopened");
                }
                Err(e) => tracing::error!(
                    file = %path.display(), error = %e,
                    "audit file could not be reopened; still writing to the old one"
                ),
            }
        }
    }
}

/// Sealed records not yet written: where the chain stood before them, and who waits on them.
struct Piece {
    start: ChainHash,
    outcomes: u64,
    intents: Vec<oneshot::Sender<Result<(), String>>>,
}

struct Writer {
    shared: Arc<Shared>,
    sink: Sink,
    head: ChainHash,
    /// The replica and chain every record names.
    tag: ChainTag,
    metrics: AuditMetrics,
}

impl Writer {
    fn run(mut self) {
        let shared = self.shared.clone();
        let _stopped = Stopped {
            shared: shared.clone(),
            metrics: self.metrics.clone(),
        };
        let mut taken = Staged::default();
        let mut buf = Vec::with_capacity(256 * 1024);
        loop {
            let mut q = shared.lock();
            // What it took last time is written (or counted as lost) and cleared.
            q.writer_holds = 0;
            // Wait for work; then, unless something is urgent, let records gather.
            while q.staged.jobs.is_empty() && !q.closed {
                q.writer = WriterIs::Idle;
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if !q.urgent && !q.closed {
                q.writer = WriterIs::Gathering;
                q = shared
                    .wake
                    .wait_timeout_while(q, GATHER, |q| !q.urgent && !q.closed)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            q.writer = WriterIs::Busy;
            if q.staged.jobs.is_empty() && q.closed {
                break;
            }
            let records = q.take(&mut taken);
            shared.in_flight.store(records, Ordering::Relaxed);
            drop(q);
            self.metrics.queued.dec_by(records as i64);
            self.process(&mut taken, &mut buf);
            taken.bytes.clear();
            if taken.bytes.capacity() > KEEP_CAPACITY {
                taken.bytes.shrink_to(KEEP_CAPACITY / 4);
            }
            if buf.capacity() > KEEP_CAPACITY {
                buf.shrink_to(KEEP_CAPACITY / 4);
            }
        }
        tracing::debug!(head = %self.head, "audit writer stopped");
    }

    fn process(&mut self, staged: &mut Staged, buf: &mut Vec<u8>) {
        buf.clear();
        let mut piece = Piece {
            start: self.head,
            outcomes: 0,
            intents: Vec::new(),
        };
        let mut at = 0;
        let mut flushes = Vec::new();
        for job in staged.jobs.drain(..) {
            let end = match job {
                Job::Record { end } => {
                    piece.outcomes += 1;
                    end
                }
                Job::Intent { end, done } => {
                    piece.intents.push(done);
                    end
                }
                Job::Reopen => {
                    // Records before the reopen go to the old file.
                    self.write(buf, &mut piece);
                    self.sink.reopen();
                    tracing::info!(head = %self.head, "audit chain head at reopen");
                    continue;
                }
                Job::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
            };
            self.head = chain::seal(&staged.bytes[at..end], &self.tag, self.head, buf);
            at = end;
            if buf.len() >= WRITE_CHUNK {
                self.write(buf, &mut piece);
            }
        }
        self.write(buf, &mut piece);
        for done in flushes {
            let _ = done.send(self.head);
        }
    }

    /// Writes `buf`, the sealed records of `piece`, and starts the next piece at the chain
    /// head; on failure the head goes back to the piece's start, as its records are not in the
    /// file.
    fn write(&mut self, buf: &mut Vec<u8>, piece: &mut Piece) {
        if buf.is_empty() {
            return;
        }
        let (outcomes, n_intents) = (piece.outcomes, piece.intents.len() as u64);
        let intents = &mut piece.intents;
        // Accounted for below, whichever way the write goes.
        self.shared
            .in_flight
            .fetch_sub((outcomes + n_intents) as usize, Ordering::Relaxed);
        match self.sink.write(buf, n_intents > 0, piece.start) {
            Ok(()) => {
                self.metrics.written("outcome", outcomes);
                self.metrics.written("intent", n_intents);
                for done in intents.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                self.head = piece.start;
                let lost = outcomes + n_intents;
                self.metrics.failed("write", lost);
                tracing::error!(error = %e, records = lost, "audit write failed: records lost");
                for done in intents.drain(..) {
                    let _ = done.send(Err(format!("audit write failed: {e}")));
                }
            }
        }
        buf.clear();
        piece.outcomes = 0;
        piece.start = self.head;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditSink;
    use record::{Client, Record};

    fn record(path: &str) -> Record<'_> {
        Record {
            ts: record::rfc3339_millis(std::time::UNIX_EPOCH),
            phase: "outcome",
            request_id: "r",
            trace_id: [b'0'; 32],
            span_id: [b'1'; 16],
            client: Client {
                addr: None,
                id: Some("local"),
                auth: Some("local"),
            },
            rule: None,
            credential: None,
            method: "GET",
            wire_method: None,
            path,
            query: None,
            resource: None,
            status: Some(200),
            upstream_status: None,
            cache: Some("hit"),
            if_match: None,
            etag: None,
            bytes_in: Some(0),
            bytes_out: Some(1),
            duration_ms: Some(0.5),
            upstream_ms: None,
            error: None,
            complete: Some(true),
        }
    }

    fn open(dir: &tempfile::TempDir) -> (AuditLog, PathBuf) {
        let path = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            enabled: true,
            sink: AuditSink::File(path.clone()),
            fail_closed: false,
            max_queued: 64 * 1024 * 1024,
        };
        let log = AuditLog::open(&config, "test", AuditMetrics::default()).expect("opens");
        (log, path)
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    fn no_ids() -> LogIds {
        LogIds {
            request_id: http::HeaderValue::from_static("-"),
            trace_id: opentelemetry::trace::TraceId::INVALID,
        }
    }

    /// `audit.max_queued` of [`stalled`].
    const STALLED_MAX_BYTES: usize = 64 * 1024 * 1024;

    /// A handle on a queue no writer takes from: what requests see when the writer falls behind.
    fn stalled() -> AuditLog {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            max_bytes: STALLED_MAX_BYTES,
            in_flight: AtomicUsize::new(0),
        });
        AuditLog {
            _handles: Arc::new(Handles(shared.clone())),
            shared,
            metrics: AuditMetrics::default(),
            fail_closed: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_many_threads_form_one_chain_in_the_order_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open(&dir);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let path = format!("/api/v1/t{t}/{i}");
                        log.record(&record(&path), || unreachable!("nothing is lost"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let head = log.flush().await.expect("the writer answers");
        let verified = chain::verify_files(&[&path]).expect("one unbroken chain");
        assert_eq!(verified.records, 2000);
        let lines = lines(&path);
        assert_eq!(lines.last().unwrap()["hash"], head.to_hex());
        // Each thread's records are in the file in the order that thread queued them.
        for t in 0..4 {
            let prefix = format!("/api/v1/t{t}/");
            let order: Vec<u64> = lines
                .iter()
                .filter_map(|l| l["path"].as_str()?.strip_prefix(&prefix)?.parse().ok())
                .collect();
            assert_eq!(order, (0..500).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn a_backlog_larger_than_a_write_goes_out_in_pieces_on_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open(&dir);
        let long = "/x".repeat(32 * 1024); // 64 KiB a record: 200 of them span several writes
        for i in 0..200 {
            log.record(&record(&format!("{long}/{i}")), || unreachable!());
        }
        log.flush().await.expect("the writer answers");
        let verified = chain::verify_files(&[&path]).expect("one unbroken chain");
        assert_eq!(verified.records, 200);
        assert!(std::fs::metadata(&path).unwrap().len() > 2 * WRITE_CHUNK as u64);
    }

    #[tokio::test]
    async fn an_intent_is_written_after_the_records_queued_before_it_and_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open(&dir);
        log.record(&record("/before"), || unreachable!());
        let mut intent = record("/intent");
        intent.phase = "intent";
        log.intent(intent.to_open_json()).await.expect("durable");
        // Confirmed means on disk: no flush needed to see it.
        let lines = lines(&path);
        let paths: Vec<_> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/before", "/intent"]);
        chain::verify_files(&[&path]).expect("unbroken");
    }

    #[test]
    fn a_full_queue_loses_records_and_counts_them() {
        let log = stalled();
        for i in 0..QUEUE_CAPACITY {
            let path = format!("/{i}");
            log.record(&record(&path), || unreachable!("room for {i}"));
        }
        let mut lost = 0;
        log.record(&record("/one-too-many"), || {
            lost += 1;
            no_ids()
        });
        assert_eq!(lost, 1);
        assert_eq!(log.metrics.queued.get(), QUEUE_CAPACITY as i64);
        let q = log.shared.lock();
        assert_eq!(q.records, QUEUE_CAPACITY);
        assert_eq!(q.staged.jobs.len(), QUEUE_CAPACITY);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let log = stalled();
        let long = "/x".repeat(512 * 1024); // 1 MiB paths
        let mut lost = 0;
        for _ in 0..100 {
            log.record(&record(&long), || {
                lost += 1;
                no_ids()
            });
        }
        let mut q = log.shared.lock();
        assert!(q.staged.bytes.len() <= STALLED_MAX_BYTES);
        assert_eq!(q.records, 63, "64 MiB holds 63 records of just over 1 MiB");
        assert_eq!(lost, 37);
        // What the writer took and is still writing counts too: until it is done, nothing more
        // fits.
        let mut taken = Staged::default();
        assert_eq!(q.take(&mut taken), 63);
        drop(q);
        log.record(&record(&long), || {
            lost += 1;
            no_ids()
        });
        assert_eq!(lost, 38);
        log.shared.lock().writer_holds = 0;
        log.record(&record(&long), || unreachable!("room again"));
    }

    #[tokio::test]
    async fn a_writer_that_dies_counts_what_it_held_and_answers_every_waiter() {
        let log = stalled();
        for i in 0..3 {
            log.record(&record(&format!("/{i}")), || unreachable!());
        }
        let intent = {
            let log = log.clone();
            tokio::spawn(async move { log.intent(record("/w").to_open_json()).await })
        };
        let flush = {
            let log = log.clone();
            tokio::spawn(async move { log.flush().await })
        };
        for _ in 0..500 {
            if log.shared.lock().staged.jobs.len() == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.shared.lock().staged.jobs.len(), 5);
        // As if the writer had taken a batch of 7 and died (a panic) before writing it.
        log.shared.in_flight.store(7, Ordering::Relaxed);
        drop(Stopped {
            shared: log.shared.clone(),
            metrics: log.metrics.clone(),
        });
        let refused = intent.await.unwrap().expect_err("the intent is refused");
        assert!(refused.contains("stopped"), "{refused}");
        assert_eq!(
            flush.await.unwrap(),
            Err("the audit writer has stopped"),
            "the flush is answered"
        );
        assert_eq!(
            log.metrics.failed_so_far("write"),
            11,
            "3 records and 1 intent queued, 7 taken"
        );
        assert_eq!(log.metrics.queued.get(), 0);
        // Nothing more is queued once the writer is gone.
        let mut lost = 0;
        log.record(&record("/after"), || {
            lost += 1;
            no_ids()
        });
        assert_eq!(lost, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_gives_up_on_a_sink_that_never_finishes() {
        let log = stalled();
        log.record(&record("/stuck"), || unreachable!());
        let started = tokio::time::Instant::now();
        assert_eq!(
            log.flush().await,
            Err("the audit sink did not finish writing in time")
        );
        assert_eq!(started.elapsed(), FLUSH_TIMEOUT);
    }

    #[test]
    fn a_reopened_file_does_not_inherit_the_old_files_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"{\"torn").unwrap();
        let mut sink = Sink::File {
            path: path.clone(),
            file: open_append(&path).unwrap(),
            torn: ends_without_newline(&path),
        };
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.reopen();
        sink.write(b"{}\n", false, GENESIS).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
        // The old file, still torn, was left as it was.
        assert_eq!(
            std::fs::read(dir.path().join("audit.jsonl.1")).unwrap(),
            b"{\"torn"
        );
    }

    #[tokio::test]
    async fn the_last_handle_dropped_writes_what_is_queued_and_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open(&dir);
        for i in 0..10 {
            log.record(&record(&format!("/{i}")), || unreachable!());
        }
        let shared = log.shared.clone();
        drop(log);
        for _ in 0..500 {
            if shared.lock().stopped {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(shared.lock().stopped, "the writer stops");
        assert_eq!(lines(&path).len(), 10);
        chain::verify_files(&[&path]).expect("unbroken");
    }
}
