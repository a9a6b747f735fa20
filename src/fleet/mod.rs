//! Fleet mode: what the replicas of one gateway share through Redis (`[fleet]`).
//!
//! - **The shared tier** (L2): stored responses, keyed by partition, path and variant, each
//!   stored with the sum of the versions of the scopes covering its path ([`keys`]).
//! - **Invalidations**: a write bumps the versions of what it invalidates and publishes the
//!   scopes in one script; every replica applies them to its memory ([`Listener`]). A fill stores
//!   into Redis only if the versions it read before asking the upstream are unchanged, so a fill
//!   racing a write on any replica never stores what the write changed.
//! - **Rate budgets**: one GCRA decision per request in Redis, on Redis's clock.
//! - **Degraded mode**: every call is bounded by `fleet.timeout`; one failure marks the link
//!   down (logged once, `fleet_link_up` 0) and later calls are skipped without waiting. While
//!   down, the memory cache serves nothing without revalidating (this replica cannot hear
//!   invalidations), rate limits fall back to a per-replica share, and writes remember their
//!   partitions. A supervisor probes every [`PROBE_INTERVAL`]; when Redis answers and the
//!   subscription is back, the partitions written while down get a new generation (every
//!   replica's shared entries of them are void), the memory cache is emptied (it may hold what
//!   another replica's write changed), and the link is up again.
//!
//! This module speaks Redis and knows nothing of HTTP: the cache layer encodes what it stores,
//! the policy layer decides what a budget is.

pub mod keys;
mod scripts;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::FleetConfig;
use crate::config::fleet::redacted_url;
use crate::observability::logging::LogEvery;
use crate::observability::metrics::FleetMetrics;
use crate::secrets::token::Fingerprint;

/// How often the supervisor probes Redis (and re-reads the password file).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a connection attempt may take (longer than a call: TLS and AUTH included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a replica's heartbeat counts it as alive.
const HEARTBEAT_WINDOW: Duration = Duration::from_secs(15);
/// How old the newest of this replica's own heartbeats the subscription has delivered may be
/// (one is sent every [`PROBE_INTERVAL`]) before the subscription is taken for dead or too far
/// behind: a node gone without a FIN or RST leaves a socket that says nothing, a listener slower
/// than the invalidations leaves a growing backlog, and a replica deaf to invalidations, or
/// hearing them late, must not count as up.
const SUBSCRIPTION_SILENCE: Duration = Duration::from_secs(3);
/// How long a version is kept after its last bump: longer than any entry lives
/// ([`MAX_ENTRY_TTL`]), so a version never restarts from zero under an entry that read it.
const VERSION_TTL: Duration = Duration::from_secs(2 * 24 * 3600);
/// The longest a shared entry is kept.
pub const MAX_ENTRY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Which Redis call failed, for `fleet_errors_total{op}` and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetOp {
    /// Reading a shared entry.
    Lookup,
    /// Writing a shared entry.
    Store,
    /// Publishing a write's invalidation.
    Invalidate,
    /// A rate decision.
    Rate,
    /// The supervisor's probe and heartbeat.
    Probe,
    /// The invalidation subscription.
    Subscribe,
}

impl FleetOp {
    /// Every op, for pre-registering series.
    pub const ALL: [Self; 6] = [
        Self::Lookup,
        Self::Store,
        Self::Invalidate,
        Self::Rate,
        Self::Probe,
        Self::Subscribe,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Store => "store",
            Self::Invalidate => "invalidate",
            Self::Rate => "rate",
            Self::Probe => "probe",
            Self::Subscribe => "subscribe",
        }
    }
}

/// What a replica does with the invalidations other replicas publish.
pub trait Listener: Send + Sync + 'static {
    /// Another replica's write invalidated these scopes of `partition`.
    fn invalidate(
        &self,
        partition: Fingerprint,
        exact: Vec<String>,
        roots: Vec<String>,
    ) -> BoxFuture<'static, ()>;
    /// Invalidations may have been missed (the link was down): forget everything kept.
    fn resync(&self) -> BoxFuture<'static, ()>;
}

/// The versions a fill read before it asked the upstream; it may store only if they still hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    token: Arc<str>,
    /// The link's generation when they were read: a fill across an outage stores nothing.
    link: u64,
}

/// What [`Fleet::lookup`] found.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The entry, when one is stored under the current versions.
    pub data: Option<Bytes>,
    /// The versions, for storing the fill that follows a miss.
    pub versions: Versions,
}

/// A rate decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the fleet-wide budget.
    Admitted,
    /// Over it: retry after this long.
    Refused(Duration),
    /// Redis could not decide: the caller applies its per-replica share.
    Unknown,
}

/// One published invalidation.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    /// The publishing instance (its own messages are skipped).
    from: String,
    /// The partition, [`Fingerprint::to_hex`] (empty in a heartbeat).
    #[serde(default)]
    p: String,
    /// Paths invalidated exactly.
    #[serde(default)]
    x: Vec<String>,
    /// Subtree roots invalidated.
    #[serde(default)]
    s: Vec<String>,
    /// The whole partition.
    #[serde(default)]
    all: bool,
    /// When it was published, µs since the epoch (for the propagation delay).
    at: u64,
    /// A replica's heartbeat, published so that it hears itself (a silent subscription is dead).
    #[serde(default)]
    hb: bool,
}

/// Error replies logged once a minute per kind of call: a Redis answering every request with
/// an error logs a line a minute, not one per request.
#[derive(Default)]
struct ErrorLogs([LogEvery; FleetOp::ALL.len()]);

impl ErrorLogs {
    /// Whether `op`'s error is to be logged now.
    fn due(&self, op: FleetOp) -> bool {
        self.0[op as usize].due(Duration::from_secs(60))
    }
}

/// The connection: a client (for the subscription) and its reconnecting manager (for calls).
struct Connection {
    client: redis::Client,
    manager: ConnectionManager,
}

/// Why the fleet could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetSetupError {
    /// A file `[fleet]` names cannot be read.
    #[error("cannot read {key} {}: {source}", path.display())]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `fleet.partition_key_file` holds too little to key partitions with: an empty one would
    /// silently give the published constant key.
    #[error(
        "fleet.partition_key_file: {} holds {len} bytes besides whitespace; use at least \
         {MIN_PARTITION_KEY} (e.g. `openssl rand -hex 32`): with a short key, whoever can read \
         Redis can test guesses of a token against its partition's name",
        path.display()
    )]
    WeakPartitionKey {
        /// The file.
        path: PathBuf,
        /// Its bytes besides whitespace.
        len: usize,
    },
    /// The Redis client could not be built.
    #[error("fleet.redis_url {url}: {source}")]
    Client {
        /// The URL without its password.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
}

/// The fleet link. See the module docs.
pub struct Fleet {
    config: FleetConfig,
    /// This process: the replica name and a random suffix (a restarted pod is a new instance).
    instance: String,
    connection: ArcSwap<Connection>,
    password: Mutex<Option<String>>,
    up: AtomicBool,
    subscribed: AtomicBool,
    /// Bumped each time a subscription is established.
    subscriptions: AtomicU64,
    /// `subscriptions` when the link last went down: if it moved by the time the link comes
    /// back, messages published in between may have been missed.
    subscription_at_down: AtomicU64,
    /// When the newest heartbeat of this replica's own that the subscription has delivered
    /// was sent ([`Fleet::clock_ms`]; when the subscription was made, before the first): how
    /// far behind the invalidations it applies are. A dead subscription delivers nothing, and a
    /// backlog delivers old heartbeats; either way heartbeats Redis took stay unheard.
    last_heard: AtomicU64,
    /// This process's clock for its own heartbeats (which only it reads): monotonic, so that
    /// a wall-clock step neither hides a dead subscription nor fakes one.
    started: std::time::Instant,
    /// Tells the subscriber to drop its subscription and make a new one.
    resubscribe: Notify,
    /// When an error reply was last logged, per kind of call.
    error_logs: ErrorLogs,
    /// Redis's `run_id`, as the last probe read it: part of every entry's token, so entries
    /// of a Redis that restarted or failed over (whose data may have rolled back) never match.
    run_id: ArcSwap<String>,
    /// Bumped whenever the link goes down.
    link_generation: AtomicU64,
    /// Replicas alive at the last heartbeat (at least 1).
    replicas: AtomicU64,
    /// Partitions written while the link was down.
    dirty: Mutex<HashSet<Fingerprint>>,
    listener: OnceLock<Arc<dyn Listener>>,
    wake: Notify,
    metrics: FleetMetrics,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("redis", &redacted_url(&self.config.redis_url))
            .field("instance", &self.instance)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The fewest bytes (besides whitespace) `fleet.partition_key_file` may hold: a guard against
/// an empty or truncated Secret, not a measure of its entropy (the README asks for 32 random
/// bytes).
pub const MIN_PARTITION_KEY: usize = 16;

/// Reads `fleet.partition_key_file`: its bytes as they are (every replica must hash the same
/// ones), refused if it holds fewer than [`MIN_PARTITION_KEY`] besides whitespace (at start, by
/// `--check`, and on a reload, which checks the files as `--check` does).
pub fn read_partition_key(path: &PathBuf) -> Result<Vec<u8>, FleetSetupError> {
    let bytes = std::fs::read(path).map_err(|source| FleetSetupError::File {
        key: "fleet.partition_key_file",
        path: path.clone(),
        source,
    })?;
    let len = bytes.iter().filter(|b| !b.is_ascii_whitespace()).count();
    if len < MIN_PARTITION_KEY {
        return Err(FleetSetupError::WeakPartitionKey {
            path: path.clone(),
            len,
        });
    }
    Ok(bytes)
}

fn read_secret(key: &'static str, path: &PathBuf) -> Result<String, FleetSetupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|source| FleetSetupError::File {
            key,
            path: path.clone(),
            source,
        })
}

fn connect(config: &FleetConfig, password: Option<&str>) -> Result<Connection, FleetSetupError> {
    let failed = |source| FleetSetupError::Client {
        url: redacted_url(&config.redis_url),
        source,
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(config.redis_url.as_str())
        .map_err(failed)?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    let client = match &config.ca_file {
        Some(ca) => {
            let root_cert = std::fs::read(ca).map_err(|source| FleetSetupError::File {
                key: "fleet.ca_file",
                path: ca.clone(),
                source,
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(failed)?
        }
        None => redis::Client::open(info).map_err(failed)?,
    };
    // The manager reconnects by itself; calls are bounded here and by the caller's timeout.
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    let manager =
        ConnectionManager::new_lazy_with_config(client.clone(), manager_config).map_err(failed)?;
    Ok(Connection { client, manager })
}

/// The `run_id` line of `INFO server`.
fn run_id_of(info: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_string())
}

/// An invocation of `script` on `keys`, in order.
fn with_keys(
    script: &'static redis::Script,
    keys: Vec<String>,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = script.prepare_invoke();
    for k in keys {
        invocation.key(k);
    }
    invocation
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Fleet {
    /// Builds the link (no connection yet: [`Fleet::start`] connects in the background, and the
    /// gateway serves, degraded, until Redis answers).
    pub fn new(config: FleetConfig, metrics: FleetMetrics) -> Result<Arc<Self>, FleetSetupError> {
        let password = match &config.password_file {
            Some(path) => Some(read_secret("fleet.password_file", path)?),
            None => None,
        };
        let connection = connect(&config, password.as_deref())?;
        let mut suffix = [0u8; 4];
        getrandom::fill(&mut suffix).expect("the operating system's random source is unavailable");
        metrics.set_up(false);
        // This replica, until a heartbeat counts the others (0 only without [fleet]).
        metrics.set_replicas(1);
        Ok(Arc::new(Self {
            instance: format!("{}-{}", config.replica, hex::encode(suffix)),
            config,
            connection: ArcSwap::from_pointee(connection),
            password: Mutex::new(password),
            up: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            subscriptions: AtomicU64::new(0),
            subscription_at_down: AtomicU64::new(0),
            last_heard: AtomicU64::new(0),
            started: std::time::Instant::now(),
            resubscribe: Notify::new(),
            error_logs: ErrorLogs::default(),
            run_id: ArcSwap::from_pointee(String::new()),
            link_generation: AtomicU64::new(0),
            replicas: AtomicU64::new(1),
            dirty: Mutex::default(),
            listener: OnceLock::new(),
            wake: Notify::new(),
            metrics,
        }))
    }

    /// The settings.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// Whether invalidations reach this replica and Redis answers: when not, nothing may be
    /// served from memory without revalidating.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Milliseconds on this process's monotonic clock, for its own heartbeats.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Replicas alive at the last heartbeat (at least 1).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Starts the subscription and the supervisor; `listener` gets other replicas'
    /// invalidations.
    pub fn start(self: &Arc<Self>, listener: Arc<dyn Listener>) {
        let _ = self.listener.set(listener);
        tokio::spawn(self.clone().subscribe());
        tokio::spawn(self.clone().supervise());
    }

    /// Runs `call` on the connection, bounded by `fleet.timeout`; a failure marks the link
    /// down. While down, `None` at once.
    async fn call<T, F>(&self, op: FleetOp, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> BoxFuture<'static, redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        let manager = self.connection.load().manager.clone();
        match tokio::time::timeout(self.config.timeout, call(manager)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error();
                // Redis answered with an error (out of memory under `noeviction`, a script
                // error): the call failed, the link did not, except for an invalidation, which
                // other replicas then never heard of.
                if unreachable || op == FleetOp::Invalidate {
                    self.failed(op, &e.to_string());
                } else {
                    self.metrics.error(op.as_str());
                    // Each one counted; logged at most once a minute per kind of call, since
                    // a Redis that answers errors answers them to every request.
                    if self.error_logs.due(op) {
                        tracing::warn!(
                            op = op.as_str(),
                            error = %e,
                            "a fleet call failed with an error from Redis (the link stays up; \
                             fleet_errors_total counts each, this is logged once a minute)"
                        );
                    }
                }
                None
            }
            Err(_) => {
                self.failed(op, &format!("no answer within {:?}", self.config.timeout));
                None
            }
        }
    }

    fn failed(&self, op: FleetOp, why: &str) {
        self.metrics.error(op.as_str());
        self.mark_down(op, why);
    }

    fn mark_down(&self, op: FleetOp, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            self.subscription_at_down.store(
                self.subscriptions.load(Ordering::Acquire),
                Ordering::Release,
            );
            self.link_generation.fetch_add(1, Ordering::AcqRel);
            self.metrics.set_up(false);
            tracing::warn!(
                op = op.as_str(),
                error = why,
                redis = %redacted_url(&self.config.redis_url),
                "fleet link down: serving without Redis (memory cache revalidates every read, \
                 rate limits per replica) until it answers again"
            );
            self.wake.notify_one();
        }
    }

    /// The shared entry for `variant` of `path`, and the versions a fill must store under.
    /// `None`: the link is down (nothing to store under either).
    pub async fn lookup(
        &self,
        partition: &Fingerprint,
        path: &str,
        variant: &[u8],
    ) -> Option<Lookup> {
        if !keys::shareable(path) {
            return None;
        }
        let link = self.link_generation.load(Ordering::Acquire);
        let run_id = self.run_id.load_full();
        let keys = keys::entry_and_versions(partition, path, variant);
        // `{token}` or `{token, data}`: a Lua table of one or two values.
        let found: Option<Vec<redis::Value>> = self
            .call(FleetOp::Lookup, move |mut c| {
                Box::pin(async move {
                    with_keys(&scripts::LOOKUP, keys)
                        .arg(run_id.as_str())
                        .invoke_async(&mut c)
                        .await
                })
            })
            .await;
        let text = |t: &[u8]| Arc::<str>::from(String::from_utf8_lossy(t));
        let (token, data) = match found?.as_slice() {
            [redis::Value::BulkString(token)] => (text(token), None),
            [
                redis::Value::BulkString(token),
                redis::Value::BulkString(data),
            ] => (text(token), Some(data.clone())),
            other => {
                self.failed(FleetOp::Lookup, &format!("unexpected answer {other:?}"));
                return None;
            }
        };
        self.metrics.lookup(data.is_some());
        Some(Lookup {
            data: data.map(Bytes::from),
            versions: Versions { token, link },
        })
    }

    /// Stores `data` for `variant` of `path` for `ttl`, unless a covering scope was invalidated
    /// since `versions` were read (or the link went down meanwhile). Returns whether it was
    /// stored; `None` when the link is down.
    pub async fn store(
        &self,
        partition: &Fingerprint,
        path: &str,
        variant: &[u8],
        versions: Versions,
        data: Vec<u8>,
        ttl: Duration,
    ) -> Option<bool> {
        if versions.link != self.link_generation.load(Ordering::Acquire) || !keys::shareable(path) {
            return Some(false);
        }
        let run_id = self.run_id.load_full();
        let keys = keys::entry_and_versions(partition, path, variant);
        let ttl_ms = u64::try_from(ttl.min(MAX_ENTRY_TTL).as_millis())
            .unwrap_or(1)
            .max(1);
        let stored: Option<i64> = self
            .call(FleetOp::Store, move |mut c| {
                Box::pin(async move {
                    with_keys(&scripts::STORE, keys)
                        .arg(&*versions.token)
                        .arg(data)
                        .arg(ttl_ms)
                        .arg(VERSION_TTL.as_millis() as u64)
                        .arg(run_id.as_str())
                        .invoke_async(&mut c)
                        .await
                })
            })
            .await;
        let stored = stored? == 1;
        self.metrics.stored(stored);
        Some(stored)
    }

    /// Publishes a write's invalidation to every replica and voids the shared entries it
    /// covers. While the link is down, the partition is remembered instead: when it comes
    /// back, the whole partition gets a new generation.
    pub async fn invalidate(
        &self,
        partition: &Fingerprint,
        exact: &[impl AsRef<str>],
        roots: &[impl AsRef<str>],
    ) {
        let message = Message {
            from: self.instance.clone(),
            p: partition.to_hex(),
            x: exact.iter().map(|p| p.as_ref().to_owned()).collect(),
            s: roots.iter().map(|r| r.as_ref().to_owned()).collect(),
            all: false,
            at: now_us(),
            hb: false,
        };
        let keys = keys::versions_bumped(partition, exact, roots);
        loop {
            if self
                .publish(FleetOp::Invalidate, keys.clone(), &message)
                .await
            {
                return;
            }
            // Recorded under the lock `recover` sets the link up under: either recovery sees
            // this partition, or this sees the link up and publishes again.
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            if !self.is_up() {
                dirty.insert(*partition);
                return;
            }
        }
    }

    async fn publish(&self, op: FleetOp, keys: Vec<String>, message: &Message) -> bool {
        let text = serde_json::to_string(message).expect("a message serializes");
        let ttl_ms = VERSION_TTL.as_millis() as u64;
        let published: Option<i64> = self
            .call(op, move |mut c| {
                Box::pin(async move {
                    with_keys(&scripts::INVALIDATE, keys)
                        .arg(keys::CHANNEL)
                        .arg(text)
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                })
            })
            .await;
        if published.is_some() {
            self.metrics.invalidation_sent();
        }
        published.is_some()
    }

    /// One fleet-wide GCRA decision for `client` under `rule` (`count` per `per`).
    pub async fn admit(&self, rule: &str, client: &str, count: u32, per: Duration) -> Admission {
        let key = keys::budget(rule, client);
        let interval_us = per.as_secs_f64() * 1e6 / f64::from(count.max(1));
        let decided: Option<(i64, i64)> = self
            .call(FleetOp::Rate, move |mut c| {
                Box::pin(async move {
                    scripts::GCRA
                        .key(key)
                        .arg(interval_us)
                        .arg(count)
                        .invoke_async(&mut c)
                        .await
                })
            })
            .await;
        match decided {
            Some((1, _)) => {
                self.metrics.rate(true);
                Admission::Admitted
            }
            Some((_, wait_us)) => {
                self.metrics.rate(true);
                Admission::Refused(Duration::from_micros(wait_us.max(0) as u64))
            }
            None => {
                self.metrics.rate(false);
                Admission::Unknown
            }
        }
    }

    /// Keeps the subscription to other replicas' invalidations, reconnecting after a loss
    /// (which marks the link down: what was published meanwhile was missed).
    async fn subscribe(self: Arc<Self>) {
        loop {
            let client = self.connection.load().client.clone();
            let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(keys::CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match pubsub {
                Ok(Ok(pubsub)) => {
                    self.last_heard.store(self.clock_ms(), Ordering::Release);
                    self.subscriptions.fetch_add(1, Ordering::AcqRel);
                    self.subscribed.store(true, Ordering::Release);
                    self.wake.notify_one();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) => {
                                    if let Ok(payload) = message.get_payload::<Vec<u8>>() {
                                        self.received(&payload).await;
                                    }
                                }
                                None => break,
                            },
                            () = self.resubscribe.notified() => break,
                        }
                    }
                    self.subscribed.store(false, Ordering::SeqCst);
                    self.metrics.error(FleetOp::Subscribe.as_str());
                    self.mark_down(FleetOp::Subscribe, "the subscription ended or fell silent");
                }
                Ok(Err(e)) => {
                    self.subscribed.store(false, Ordering::Release);
                    self.mark_down(FleetOp::Subscribe, &e.to_string());
                }
                Err(_) => {
                    self.subscribed.store(false, Ordering::Release);
                    self.mark_down(FleetOp::Subscribe, "no answer while subscribing");
                }
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    async fn received(&self, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Message>(payload) else {
            self.metrics.error(FleetOp::Subscribe.as_str());
            tracing::warn!("ignored a fleet message that is not an invalidation");
            return;
        };
        if message.from == self.instance {
            if message.hb {
                // Clamped: a heartbeat cannot have been sent later than now.
                self.last_heard
                    .fetch_max(message.at.min(self.clock_ms()), Ordering::AcqRel);
            }
            return;
        }
        if message.hb {
            return;
        }
        let Some(partition) = Fingerprint::from_hex(&message.p) else {
            self.metrics.error(FleetOp::Subscribe.as_str());
            tracing::warn!(
                from = %message.from,
                "ignored a fleet invalidation without a valid partition"
            );
            return;
        };
        let delay = Duration::from_micros(now_us().saturating_sub(message.at));
        self.metrics.received(delay);
        let Some(listener) = self.listener.get() else {
            return;
        };
        if message.all {
            listener
                .invalidate(partition, Vec::new(), vec!["/".into()])
                .await;
        } else {
            listener.invalidate(partition, message.x, message.s).await;
        }
    }

    /// Probes Redis, counts replicas, re-reads the password file, and brings the link up when
    /// Redis answers and the subscription is live.
    async fn supervise(self: Arc<Self>) {
        // The oldest heartbeat Redis took (published) that the subscription had not delivered
        // when last looked at: only heartbeats Redis took count, so a probe outage (none
        // published) is not taken for a dead subscription.
        let mut unheard: Option<u64> = None;
        loop {
            self.reload_password();
            let sent_at = self.clock_ms();
            let manager = self.connection.load().manager.clone();
            let instance = self.instance.clone();
            let heartbeat = serde_json::to_string(&Message {
                from: self.instance.clone(),
                p: String::new(),
                x: Vec::new(),
                s: Vec::new(),
                all: false,
                at: sent_at,
                hb: true,
            })
            .expect("a message serializes");
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, async move {
                let mut c = manager;
                let alive = scripts::HEARTBEAT
                    .key(keys::REPLICAS)
                    .arg(instance)
                    .arg(HEARTBEAT_WINDOW.as_millis() as u64)
                    .arg(keys::CHANNEL)
                    .arg(heartbeat)
                    .invoke_async::<u64>(&mut c)
                    .await?;
                let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
                Ok::<_, redis::RedisError>((alive, run_id_of(&info)))
            })
            .await;
            match probe {
                Ok(Ok((alive, run_id))) => {
                    self.replicas.store(alive.max(1), Ordering::Relaxed);
                    self.metrics.set_replicas(alive.max(1));
                    if let Some(run_id) = run_id
                        && *self.run_id.load_full() != run_id
                    {
                        self.run_id.store(Arc::new(run_id));
                    }
                    // `subscribed` first: a subscription made in between has stored its
                    // `last_heard` before it says so.
                    let subscribed = self.subscribed.load(Ordering::Acquire);
                    let heard = self.last_heard.load(Ordering::Acquire);
                    let waiting = match unheard {
                        Some(oldest) if heard < oldest => oldest,
                        _ => sent_at,
                    };
                    unheard = Some(waiting);
                    let late = heard < waiting
                        && self.clock_ms().saturating_sub(waiting)
                            > SUBSCRIPTION_SILENCE.as_millis() as u64;
                    if subscribed && late {
                        // Its own heartbeat did not come back in time: the subscription is
                        // dead, or so far behind that what memory serves may be stale. (A
                        // backlog sits in the client's unbounded queue: replaced, it is gone.)
                        self.resubscribe.notify_one();
                        self.metrics.error(FleetOp::Subscribe.as_str());
                        self.mark_down(
                            FleetOp::Subscribe,
                            "the subscription fell silent or behind (its own heartbeat is late)",
                        );
                    } else if !self.is_up() && self.subscribed.load(Ordering::Acquire) {
                        self.recover().await;
                    }
                }
                Ok(Err(e)) => {
                    if self.is_up() {
                        self.metrics.error(FleetOp::Probe.as_str());
                    }
                    self.mark_down(FleetOp::Probe, &e.to_string());
                }
                Err(_) => {
                    if self.is_up() {
                        self.metrics.error(FleetOp::Probe.as_str());
                    }
                    self.mark_down(FleetOp::Probe, "no answer to the probe");
                }
            }
            let _ = tokio::time::timeout(PROBE_INTERVAL, self.wake.notified()).await;
        }
    }

    /// The link is back: void what this replica wrote while it was down, forget what memory
    /// holds if invalidations may have been missed (the subscription was re-established), then
    /// serve from the fleet again.
    async fn recover(&self) {
        let subscriptions = self.subscriptions.load(Ordering::Acquire);
        let dirty: Vec<Fingerprint> = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for partition in &dirty {
            if !self.void_partition(partition).await {
                // Still not reachable: try again at the next probe.
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(dirty.iter().copied());
                return;
            }
        }
        let missed = self.subscriptions.load(Ordering::Acquire)
            != self.subscription_at_down.load(Ordering::Acquire);
        if missed && let Some(listener) = self.listener.get() {
            listener.resync().await;
        }
        // Up under the lock writes record their partitions under (see `invalidate`): a write
        // that failed while down either is among these, or sees the link up and publishes.
        let late: Vec<Fingerprint> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            self.up.store(true, Ordering::SeqCst);
            dirty.drain().collect()
        };
        // The subscription may have ended while this ran (its `mark_down` then found the link
        // already down and recorded nothing): up without it, this replica would be deaf to
        // every invalidation until its entries expired. Down again, its next subscription
        // counts as a new one and resyncs. (SeqCst with the subscription's store and
        // `mark_down`'s swap: one of the two sees the other.)
        if !self.subscribed.load(Ordering::SeqCst)
            || self.subscriptions.load(Ordering::Acquire) != subscriptions
        {
            self.metrics.error(FleetOp::Subscribe.as_str());
            self.mark_down(
                FleetOp::Subscribe,
                "the subscription ended while the link came back",
            );
            // Every subscription since this began counts as new, a replacement that came in
            // meanwhile too: what was published between the two was missed.
            self.subscription_at_down
                .store(subscriptions, Ordering::Release);
        }
        for partition in &late {
            if !self.void_partition(partition).await {
                self.failed(
                    FleetOp::Invalidate,
                    "could not void a partition written while down",
                );
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*partition);
            }
        }
        if !self.is_up() {
            return;
        }
        self.metrics.set_up(true);
        tracing::info!(
            redis = %redacted_url(&self.config.redis_url),
            instance = %self.instance,
            partitions_voided = dirty.len() + late.len(),
            memory_emptied = missed,
            "fleet link up: shared cache, invalidations and fleet-wide rate limits in force"
        );
    }

    /// At exit: says so if writes made while the link was down were never announced to the
    /// other replicas (they keep what those writes changed until it expires). Returns how many
    /// partitions.
    pub fn report_at_exit(&self) -> usize {
        let dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner()).len();
        if dirty > 0 {
            tracing::error!(
                partitions = dirty,
                "exiting with writes made while Redis was unreachable not announced: other \
                 replicas may serve what they changed until it expires"
            );
        }
        dirty
    }

    /// Gives `partition` a new generation (every shared entry of it is void) and tells every
    /// replica to forget it, even while the link is marked down. Returns whether Redis took it.
    async fn void_partition(&self, partition: &Fingerprint) -> bool {
        let message = Message {
            from: self.instance.clone(),
            p: partition.to_hex(),
            x: Vec::new(),
            s: Vec::new(),
            all: true,
            at: now_us(),
            hb: false,
        };
        let manager = self.connection.load().manager.clone();
        let text = serde_json::to_string(&message).expect("a message serializes");
        let key = keys::generation(partition);
        let sent = tokio::time::timeout(self.config.timeout.max(CONNECT_TIMEOUT), async {
            let mut c = manager;
            scripts::INVALIDATE
                .key(key)
                .arg(keys::CHANNEL)
                .arg(text)
                .arg(VERSION_TTL.as_millis() as u64)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await;
        matches!(sent, Ok(Ok(_)))
    }

    /// Re-reads `fleet.password_file`; on a change, connects with the new password (the next
    /// calls and subscription use it; the link stays as it is until a call fails).
    fn reload_password(&self) {
        let Some(path) = &self.config.password_file else {
            return;
        };
        let Ok(new) = read_secret("fleet.password_file", path) else {
            return;
        };
        let mut current = self.password.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_deref() == Some(new.as_str()) {
            return;
        }
        match connect(&self.config, Some(&new)) {
            Ok(connection) => {
                self.connection.store(Arc::new(connection));
                *current = Some(new);
                tracing::info!("fleet.password_file changed: reconnecting to Redis");
            }
            Err(e) => tracing::warn!(error = %e, "fleet.password_file changed but cannot be used"),
        }
    }

    /// This replica's instance name (replica and a per-process suffix).
    pub fn instance(&self) -> &str {
        &self.instance
    }
}
