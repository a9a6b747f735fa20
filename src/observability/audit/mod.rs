//! The audit trail: one JSON line per request, hash-chained, written by a dedicated thread.
//!
//! Requests hand finished records to the writer through a bounded queue and never wait for it;
//! a full queue or a failing sink loses records, and every lost record is counted
//! (`cloudcasa_gateway_audit_records_failed_total`) and logged. The exception is fail-closed mode
//! (the audit-intent layer): a write is forwarded only once its intent record is on disk (written and
//! fsynced); otherwise the client gets 503 and the upstream sees nothing.
//!
//! The writer batches whatever is queued into one write (letting outcome records gather for a
//! millisecond), so each record is flushed within about a millisecond of the response ending; a failed batch is truncated away when the sink is a regular file, so the
//! chain on disk stays whole.

pub mod chain;
pub mod record;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::{AuditConfig, AuditSink};
use crate::context::LogIds;
use crate::observability::metrics::AuditMetrics;
use chain::{ChainHash, ChainTag, GENESIS};
use record::OpenRecord;

/// Records waiting for the writer; past this, records are dropped (and counted), never waited on.
const QUEUE_CAPACITY: usize = 64 * 1024;
/// Records written in one go at most.
const BATCH: usize = 1024;
/// How long the writer lets outcome records gather before writing them. Waking a thread per
/// record costs a context switch each; at tens of thousands of requests a second on one core,
/// that alone halved throughput. A millisecond's delay turns them into one write per batch.
/// Intent records (fail-closed writes wait on them), flushes and reopens are never delayed.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// How long a write waits for its intent record to be durable before it is refused.
const INTENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The audit sink could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
#[error("audit.path: cannot open {path}: {source}")]
pub struct AuditOpenError {
    path: String,
    #[source]
    source: std::io::Error,
}

enum Job {
    Record(OpenRecord),
    Intent(OpenRecord, oneshot::Sender<Result<(), String>>),
    Reopen,
    Flush(oneshot::Sender<ChainHash>),
}

/// A handle on the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Job>,
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
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let tag = ChainTag::new(replica, &chain.unwrap_or_else(ChainTag::new_chain_id));
        tracing::info!(head = %head, chain = tag.chain(), replica, sink = ?config.sink, "audit trail open");
        let writer = Writer {
            sink,
            head,
            tag,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditOpenError {
                path: "(writer thread)".into(),
                source,
            })?;
        Ok(Self {
            tx,
            metrics,
            fail_closed: config.fail_closed,
        })
    }

    /// Queues a finished record without waiting. A full queue loses it (counted, and logged
    /// with the request's ids from `ids`).
    pub fn record(&self, open_json: OpenRecord, ids: impl FnOnce() -> LogIds) {
        let why = match self.tx.try_send(Job::Record(open_json)) {
            Ok(()) => {
                self.metrics.queued.inc();
                return;
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.failed("queue_full", 1);
                "the writer's queue is full"
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.failed("write", 1);
                "the writer has stopped"
            }
        };
        let ids = ids();
        tracing::error!(
            request_id = ids.request_id(),
            trace_id = %ids.trace_id,
            "audit record lost: {why}"
        );
    }

    /// Writes an intent record durably (write and fsync) and waits for it.
    pub async fn intent(&self, open_json: OpenRecord) -> Result<(), String> {
        let (done, written) = oneshot::channel();
        if self.tx.try_send(Job::Intent(open_json, done)).is_err() {
            self.metrics.failed("queue_full", 1);
            return Err("the audit writer's queue is full".into());
        }
        self.metrics.queued.inc();
        match tokio::time::timeout(INTENT_TIMEOUT, written).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the audit writer has stopped".into()),
            Err(_) => Err(format!(
                "the audit sink did not confirm within {}s",
                INTENT_TIMEOUT.as_secs()
            )),
        }
    }

    /// Reopens the file (after logrotate moved it), before the next write.
    pub fn reopen(&self) {
        if self.tx.try_send(Job::Reopen).is_err() {
            tracing::error!("audit: could not ask the writer to reopen the file (queue full)");
        }
    }

    /// Waits until everything queued so far is written; returns the chain head.
    pub async fn flush(&self) -> Option<ChainHash> {
        let (done, flushed) = oneshot::channel();
        // Blocking send: at shutdown, waiting for room is right.
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(Job::Flush(done)).ok())
            .await
            .ok()??;
        flushed.await.ok()
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
    fn write(&mut self, buf: &[u8], durable: bool) -> std::io::Result<()> {
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
        if let Sink::File { path, file, .. } = self {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
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

struct Writer {
    sink: Sink,
    head: ChainHash,
    /// The replica and chain every record names.
    tag: ChainTag,
    metrics: AuditMetrics,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut buf = Vec::with_capacity(256 * 1024);
        let mut jobs = Vec::with_capacity(BATCH);
        while let Ok(first) = rx.recv() {
            if matches!(first, Job::Record(_)) {
                std::thread::sleep(GATHER);
            }
            jobs.push(first);
            while jobs.len() < BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let records = jobs
                .iter()
                .filter(|j| matches!(j, Job::Record(_) | Job::Intent(..)))
                .count();
            self.metrics.queued.dec_by(records as i64);
            self.process(&mut jobs, &mut buf);
        }
        tracing::debug!(head = %self.head, "audit writer stopped");
    }

    fn process(&mut self, jobs: &mut Vec<Job>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut start = self.head;
        let (mut outcomes, mut intents, mut flushes) = (0u64, Vec::new(), Vec::new());
        for job in jobs.drain(..) {
            match job {
                Job::Record(open) => {
                    self.head = chain::seal(open.as_bytes(), &self.tag, self.head, buf);
                    outcomes += 1;
                }
                Job::Intent(open, done) => {
                    self.head = chain::seal(open.as_bytes(), &self.tag, self.head, buf);
                    intents.push(done);
                }
                Job::Reopen => {
                    // Records before the reopen go to the old file.
                    self.write(buf, start, outcomes, &mut intents);
                    buf.clear();
                    outcomes = 0;
                    start = self.head;
                    self.sink.reopen();
                    tracing::info!(head = %self.head, "audit chain head at reopen");
                }
                Job::Flush(done) => flushes.push(done),
            }
        }
        self.write(buf, start, outcomes, &mut intents);
        for done in flushes {
            let _ = done.send(self.head);
        }
    }

    /// Writes `buf` (`outcomes` outcome records and one record per intent); on failure the chain
    /// head goes back to `start`, as the records are not in the file.
    fn write(
        &mut self,
        buf: &[u8],
        start: ChainHash,
        outcomes: u64,
        intents: &mut Vec<oneshot::Sender<Result<(), String>>>,
    ) {
        if buf.is_empty() {
            return;
        }
        let n_intents = intents.len() as u64;
        match self.sink.write(buf, n_intents > 0) {
            Ok(()) => {
                self.metrics.written("outcome", outcomes);
                self.metrics.written("intent", n_intents);
                for done in intents.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                self.head = start;
                let lost = outcomes + n_intents;
                self.metrics.failed("write", lost);
                tracing::error!(error = %e, records = lost, "audit write failed: records lost");
                for done in intents.drain(..) {
                    let _ = done.send(Err(format!("audit write failed: {e}")));
                }
            }
        }
    }
}
