//! Where responses are kept: a moka cache bounded by bytes with one entry per variant (credential
//! partition, path, query, representation), so a lookup or a fill costs the same with one or
//! 100,000 variants of a path and concurrent fills of two variants never lose one; and an index
//! of the stored variants by bucket and path, so that "invalidate the collection with every
//! query variant" visits only that collection's entries.
//!
//! Also here: the collapsing lock ([`Flights`]) and the invalidation epochs ([`Epochs`]) that
//! keep a fetch started before a write from storing what the write just changed. Epochs are per
//! invalidated scope (a path, or a subtree such as a collection, in one credential partition): a
//! write discards only the fills and collapsed fetches of the paths it invalidated, never those
//! elsewhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{RwLock, watch};

use super::rules::NotStorable;
use crate::context::CacheOutcome;
use crate::secrets::token::Fingerprint;

/// The primary cache key: the credential's keyed fingerprint (never the token) and the path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathKey {
    /// Which credential fetched it: responses never cross credentials.
    pub partition: Fingerprint,
    /// The request path, exactly as sent upstream.
    pub path: Box<str>,
}

/// Which stored response of a path: the query and the representation asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VariantKey {
    /// The exact query string (empty when there is none).
    pub query: Box<str>,
    /// The request's `cache.key_headers` values as the upstream receives them (see
    /// `rules::representation_key`): two requests that could get different representations
    /// never share a stored response, whether or not the upstream says `Vary`.
    pub representation: Box<[u8]>,
}

/// A full key: the path key and the variant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Partition and path.
    pub path: PathKey,
    /// Query and representation.
    pub variant: VariantKey,
}

/// A stored response.
#[derive(Debug)]
pub struct Stored {
    /// End-to-end response headers as received (hop-by-hop removed upstream).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The ETag clients see: the upstream's, or the gateway's own when it sent none.
    pub etag: HeaderValue,
    /// Whether the upstream sent that ETag (and so can revalidate it).
    pub upstream_etag: bool,
    /// The request header values this response varies on.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// When it was received.
    pub response_time: SystemTime,
    /// Its age when it was received.
    pub initial_age: Duration,
    /// Freshness lifetime.
    pub lifetime: Duration,
    /// How long past its lifetime it may stand in for a failing upstream.
    pub stale_if_error: Duration,
    /// How long past its lifetime it may be served while a background request revalidates it.
    pub stale_while_revalidate: Duration,
    /// Must never be served stale.
    pub forbids_stale: bool,
}

impl Stored {
    /// Current age (RFC 9111 §4.2.3).
    /// Saturates: ages and lifetimes come from the upstream's numbers.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age.saturating_add(
            now.duration_since(self.response_time)
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Remaining freshness in whole seconds (negative when stale), saturating.
    pub fn ttl(&self, now: SystemTime) -> i64 {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        secs(self.lifetime).saturating_sub(secs(self.age(now)))
    }

    /// Whether it is stale but may be served at once while it is revalidated in the background.
    pub fn usable_while_revalidating(&self, now: SystemTime) -> bool {
        let age = self.age(now);
        !self.forbids_stale
            && age >= self.lifetime
            && age < self.lifetime.saturating_add(self.stale_while_revalidate)
    }

    /// Whether it may be served because the upstream failed.
    pub fn usable_if_error(&self, now: SystemTime) -> bool {
        !self.forbids_stale && self.age(now) < self.lifetime.saturating_add(self.stale_if_error)
    }

    /// Whether the request's values match the ones this response was stored for.
    pub fn matches_vary(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, stored)| *stored == super::rules::join_values(request, name))
    }

    /// What keeping this response costs in memory, overheads included, so that `cache.max_size`
    /// bounds the process's memory rather than just the bytes of bodies and headers. The constants
    /// were measured (bench/run.sh's memory run: 100,000 entries of 1 KiB): a header costs its
    /// bytes plus about 128 (its slot in the map and its own allocation), a stored response about
    /// 512 besides (the `Stored`, its map, its ETag and Vary copies).
    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        self.body.len() + headers + STORED_OVERHEAD
    }
}

/// Memory per stored header beyond its name and value (see [`Stored::weight`]).
const HEADER_OVERHEAD: usize = 128;
/// Memory per stored response beyond its body and headers.
const STORED_OVERHEAD: usize = 512;
/// Memory per stored variant beyond its response: moka's entry, the key, the index's slot.
const ENTRY_OVERHEAD: usize = 384;

/// What moka holds for a key: the response, and an id that tells this entry from a later one
/// stored under the same key (see [`PathIndex`]).
#[derive(Debug, Clone)]
struct Slot {
    stored: Arc<Stored>,
    id: u64,
}

impl Slot {
    fn weight(&self, key: &CacheKey) -> u32 {
        let total = key.path.path.len()
            + key.variant.query.len()
            + key.variant.representation.len()
            + ENTRY_OVERHEAD
            + self.stored.weight();
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Which variants are stored, by partition and bucket, then path: the bucket is the collection
/// root of an API path (`/api/v1/usergroups` for `/api/v1/usergroups/624e/`), else its first
/// segment. A write's invalidation visits only its bucket's paths, never the whole cache: a moka
/// predicate over every entry per write made write-heavy load cost CPU in proportion to the
/// cache's size.
///
/// Entries leave the index when invalidated, and when moka evicts or expires them (its
/// eviction listener), but only if the index still names that very entry: a variant evicted and
/// stored again must stay indexed, whatever order the notifications come in.
type PathIndex = Mutex<Buckets>;
/// Partition, then bucket, then path: nested so that a lookup borrows the bucket and path
/// (`&str`) instead of building an owned key for each.
type Buckets = Map<Fingerprint, Map<Box<str>, Paths>>;
type Paths = Map<Box<str>, Map<VariantKey, u64>>;

/// The store's own maps (the path index, the invalidation epochs, the fills in flight), keyed
/// by paths clients choose and visited on every write and fill: hashed with foldhash, seeded per
/// process, like the store's moka cache (SipHash was about 700 instructions per write).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Takes `key` out of the index, if the index still names entry `id` there (`None`: any).
fn unindex(index: &mut Buckets, key: &CacheKey, id: Option<u64>) {
    let b = bucket(&key.path.path);
    let Some(buckets) = index.get_mut(&key.path.partition) else {
        return;
    };
    let Some(paths) = buckets.get_mut(b) else {
        return;
    };
    if let Some(variants) = paths.get_mut(&key.path.path) {
        if id.is_none_or(|id| variants.get(&key.variant) == Some(&id)) {
            variants.remove(&key.variant);
        }
        if variants.is_empty() {
            paths.remove(&key.path.path);
        }
    }
    if paths.is_empty() {
        buckets.remove(b);
        if buckets.is_empty() {
            index.remove(&key.path.partition);
        }
    }
}

/// The bucket of `path` in the [`PathIndex`].
fn bucket(path: &str) -> &str {
    if let Some(r) = crate::http::resource::Resource::parse(path) {
        let end = "/api/v1/".len() + r.collection.len();
        return &path[..end];
    }
    match path[1.min(path.len())..].find('/') {
        Some(i) => &path[..i + 1],
        None => path.trim_end_matches('/'),
    }
}

/// The one bucket every path in the subtree of `root` is in: `root`'s own, except for `/` and
/// the ancestors of the API's collections (`/api`, `/api/v1`), whose subtrees span every
/// collection's bucket (`None`: look in all of them).
fn subtree_bucket(root: &str) -> Option<&str> {
    match root.trim_end_matches('/') {
        "" | "/api" | "/api/v1" => None,
        _ => Some(bucket(root)),
    }
}

static NEXT_ENTRY_ID: AtomicU64 = AtomicU64::new(1);

/// Counters, exported by the admin endpoint and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests per [`CacheOutcome`], counted once per request by [`CacheStats::count`]: the
    /// admin endpoint's `hits`, `misses`, `revalidations` and `stale_served` and the metrics of
    /// the same names are read from here.
    outcomes: [AtomicU64; CacheOutcome::ALL.len()],
    /// Requests that joined another request's upstream fetch to wait for it, counted when they
    /// join (most end as [`CacheOutcome::Collapsed`]; one whose leader stored nothing fetches on
    /// its own).
    pub collapsed: AtomicU64,
    /// Entries evicted for space.
    pub evictions: AtomicU64,
    /// Paths invalidated by writes or by the admin endpoint.
    pub invalidations: AtomicU64,
    /// Responses to reads not stored, per [`NotStorable`] (indexed by [`NotStorable::index`]).
    not_stored: [AtomicU64; NotStorable::ALL.len()],
}

impl CacheStats {
    /// Counts one request's outcome.
    pub fn count(&self, outcome: CacheOutcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response that was not stored for `reason`.
    pub fn not_stored(&self, reason: NotStorable) {
        self.not_stored[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses not stored for `reason`.
    pub fn not_stored_for(&self, reason: NotStorable) -> u64 {
        self.not_stored[reason.index()].load(Ordering::Relaxed)
    }

    /// Requests that ended as `outcome`.
    pub fn outcomes(&self, outcome: CacheOutcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }
}

/// What an invalidation covered, for [`Epochs`]: a path exactly, or a subtree (a root and
/// everything below it by whole segments; `""` is the partition's root `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One path, with every query variant.
    Exact(&'a str),
    /// A root and every path below it.
    Subtree(&'a str),
}

/// When each invalidated scope was last invalidated, on one monotonic clock of invalidations.
///
/// A fetch takes a ticket (the clock's value) when it starts; its fill is stored only if
/// nothing that covers its path was invalidated after that: its path exactly, or a subtree
/// rooted at the path or at one of its ancestors. The check walks the path's ancestors (one
/// lookup per segment), so it costs the same however many scopes are remembered, and a write
/// discards only the fills and collapsed fetches of the paths it invalidated, never those of
/// a sibling. The map is bounded: past [`Epochs::LIMIT`] scopes it is emptied and `floor` raised
/// to the clock, and a fetch whose ticket is below the floor is not stored (it cannot know what
/// was invalidated since); that takes writes to thousands of distinct paths within one fetch.
#[derive(Debug, Default)]
pub struct Epochs {
    clock: u64,
    floor: u64,
    /// Per partition, per scope path (without its trailing `/`): when it was last invalidated
    /// exactly, and as a subtree root.
    by_scope: Map<Fingerprint, Map<Box<str>, ScopeEpochs>>,
    scopes: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct ScopeEpochs {
    exact: u64,
    subtree: u64,
}

impl Epochs {
    /// Scopes remembered at most.
    const LIMIT: usize = 16 * 1024;

    /// Records an invalidation of `scopes` in `partition` now.
    fn bump(&mut self, partition: Fingerprint, scopes: &[Scope<'_>]) {
        self.clock += 1;
        let now = self.clock;
        let map = self.by_scope.entry(partition).or_default();
        for scope in scopes {
            let (path, subtree) = match scope {
                Scope::Exact(p) => (p, false),
                Scope::Subtree(p) => (p, true),
            };
            let path = path.trim_end_matches('/');
            let entry = match map.get_mut(path) {
                Some(e) => e,
                None => {
                    self.scopes += 1;
                    map.entry(path.into()).or_default()
                }
            };
            match subtree {
                true => entry.subtree = now,
                false => entry.exact = now,
            }
        }
        if self.scopes > Self::LIMIT {
            self.by_scope.clear();
            self.scopes = 0;
            self.floor = now;
        }
    }

    /// Records an invalidation of everything (a purge).
    fn bump_all(&mut self) {
        self.clock += 1;
        self.by_scope.clear();
        self.scopes = 0;
        self.floor = self.clock;
    }

    /// Whether something covering `key`'s path was invalidated after `ticket` was taken.
    fn invalidated_since(&self, key: &PathKey, ticket: u64) -> bool {
        if ticket < self.floor {
            return true;
        }
        let Some(scopes) = self.by_scope.get(&key.partition) else {
            return false;
        };
        let path = key.path.trim_end_matches('/');
        if scopes.get(path).is_some_and(|e| e.exact > ticket) {
            return true;
        }
        // The path itself, then each ancestor by whole segments, down to the root `""`.
        let mut at = path;
        loop {
            if scopes.get(at).is_some_and(|e| e.subtree > ticket) {
                return true;
            }
            match at.rfind('/') {
                Some(i) => at = &at[..i],
                None => return false,
            }
        }
    }
}

/// The response store.
pub struct Store {
    /// Hashed with foldhash rather than SipHash: a lookup hashes the whole key (credential
    /// fingerprint, path, query, key headers) on every request, and foldhash does it in a
    /// fraction of the instructions. Its seed is random per process, so clients, who choose
    /// paths and queries, cannot aim for collisions.
    cache: moka::future::Cache<CacheKey, Slot, foldhash::fast::RandomState>,
    index: Arc<PathIndex>,
    /// Per-bucket invalidation epochs.
    epochs: Mutex<Epochs>,
    /// Fills hold it shared while checking the epoch and inserting; invalidations hold it
    /// exclusively, so no fill can slip its old data in between.
    fill_gate: RwLock<()>,
    max_size: u64,
    /// Counters.
    pub stats: Arc<CacheStats>,
    /// The collapsing lock.
    pub flights: Arc<Flights>,
}

impl Store {
    /// A store holding at most `max_size` weighted bytes.
    pub fn new(max_size: u64) -> Self {
        let stats = Arc::new(CacheStats::default());
        let evicted = stats.clone();
        let index: Arc<PathIndex> = Arc::default();
        let unindex_from = index.clone();
        let cache = moka::future::Cache::builder()
            .max_capacity(max_size)
            .weigher(|k: &CacheKey, v: &Slot| v.weight(k))
            .eviction_listener(move |k: Arc<CacheKey>, v: Slot, cause| {
                use moka::notification::RemovalCause;
                if cause == RemovalCause::Size {
                    evicted.evictions.fetch_add(1, Ordering::Relaxed);
                }
                if cause != RemovalCause::Replaced {
                    let mut index = unindex_from.lock().unwrap_or_else(|e| e.into_inner());
                    unindex(&mut index, &k, Some(v.id));
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            cache,
            index,
            epochs: Mutex::default(),
            fill_gate: RwLock::new(()),
            max_size,
            stats,
            flights: Arc::new(Flights::default()),
        }
    }

    /// A ticket for a fetch about to start: capture it before asking the upstream.
    pub fn ticket(&self) -> u64 {
        self.epochs.lock().unwrap_or_else(|e| e.into_inner()).clock
    }

    /// Whether `key`'s bucket was invalidated after `ticket` was taken.
    fn invalidated_since(&self, key: &PathKey, ticket: u64) -> bool {
        self.epochs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .invalidated_since(key, ticket)
    }

    /// Joins the fetch in progress for `key`, unless its bucket was invalidated after that fetch
    /// started (then this request leads a new one).
    pub fn join(&self, key: &CacheKey, ticket: u64) -> Joined {
        self.flights.join(key, ticket, |started| {
            self.invalidated_since(&key.path, started)
        })
    }

    /// The stored response for `key`, if any.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        self.cache.get(key).await.map(|slot| slot.stored)
    }

    /// Stores `stored` unless `key`'s bucket was invalidated after `ticket` was taken. Returns
    /// whether it was stored.
    pub async fn insert(&self, key: &CacheKey, stored: Arc<Stored>, ticket: u64) -> bool {
        let _gate = self.fill_gate.read().await;
        if self.invalidated_since(&key.path, ticket) {
            return false;
        }
        let slot = Slot {
            stored,
            id: NEXT_ENTRY_ID.fetch_add(1, Ordering::Relaxed),
        };
        if u64::from(slot.weight(key)) > self.max_size {
            return false;
        }
        {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let buckets = index.entry(key.path.partition).or_default();
            // Owned keys only for a bucket or path not indexed yet.
            let b = bucket(&key.path.path);
            let paths = match buckets.get_mut(b) {
                Some(paths) => paths,
                None => buckets.entry(b.into()).or_default(),
            };
            let variants = match paths.get_mut(&key.path.path) {
                Some(variants) => variants,
                None => paths.entry(key.path.path.clone()).or_default(),
            };
            variants.insert(key.variant.clone(), slot.id);
        }
        self.cache.insert(key.clone(), slot).await;
        true
    }

    /// The stored variants of `path` with `query`, if it has at most `limit` variants in all
    /// (none otherwise: the caller's scan stays bounded whatever a client stored).
    pub fn variants_of(&self, path: &PathKey, query: &str, limit: usize) -> Vec<VariantKey> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let Some(variants) = index
            .get(&path.partition)
            .and_then(|buckets| buckets.get(bucket(&path.path)))
            .and_then(|paths| paths.get(&path.path))
        else {
            return Vec::new();
        };
        if variants.len() > limit {
            return Vec::new();
        }
        variants
            .keys()
            .filter(|v| &*v.query == query)
            .cloned()
            .collect()
    }

    /// Takes out of the index, in `partition`, every variant of the paths `covers` accepts in
    /// bucket `which` (`None`: in every bucket of the partition); returns their keys.
    fn take_indexed(
        &self,
        partition: Fingerprint,
        which: Option<&str>,
        covers: impl Fn(&str) -> bool,
    ) -> Vec<CacheKey> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let mut doomed = Vec::new();
        let Some(buckets) = index.get_mut(&partition) else {
            return doomed;
        };
        let mut take = |paths: &mut Paths| {
            paths.retain(|path, variants| {
                let gone = covers(path);
                if gone {
                    doomed.extend(variants.keys().map(|variant| CacheKey {
                        path: PathKey {
                            partition,
                            path: path.clone(),
                        },
                        variant: variant.clone(),
                    }));
                }
                !gone
            });
        };
        match which {
            Some(b) => {
                if let Some(paths) = buckets.get_mut(b) {
                    take(paths);
                    if paths.is_empty() {
                        buckets.remove(b);
                    }
                }
            }
            None => {
                buckets.values_mut().for_each(&mut take);
                buckets.retain(|_, paths| !paths.is_empty());
            }
        }
        if buckets.is_empty() {
            index.remove(&partition);
        }
        doomed
    }

    /// Removes one stored variant (the upstream said it is gone).
    pub async fn remove(&self, key: &CacheKey) {
        let scopes = [Scope::Exact(&key.path.path)];
        self.invalidate_with(Some((key.path.partition, &scopes)), || async {
            unindex(
                &mut self.index.lock().unwrap_or_else(|e| e.into_inner()),
                key,
                None,
            );
            self.cache.invalidate(key).await;
        })
        .await;
    }

    /// Removes, in one partition, every variant of each path in `exact` and of every path in the
    /// subtree of each of `roots` (the root itself, with or without a trailing slash, and every
    /// path below it, segment by segment: `/a/b` covers `/a/b/c`, not `/a/bc`). Effective at
    /// once: no later lookup returns what was removed.
    pub async fn invalidate(
        &self,
        partition: Fingerprint,
        exact: &[impl AsRef<str>],
        roots: &[impl AsRef<str>],
    ) {
        let scopes: Vec<Scope<'_>> = exact
            .iter()
            .map(|p| Scope::Exact(p.as_ref()))
            .chain(roots.iter().map(|r| Scope::Subtree(r.as_ref())))
            .collect();
        self.invalidate_with(Some((partition, &scopes)), || async {
            // The variants of the exact paths and of the roots' subtrees, taken out of the index
            // under its lock; then removed from moka.
            let mut doomed = Vec::new();
            for path in exact.iter().map(AsRef::as_ref) {
                doomed.extend(self.take_indexed(partition, Some(bucket(path)), |p| p == path));
            }
            for root in roots.iter().map(AsRef::as_ref) {
                let which = subtree_bucket(root);
                doomed.extend(self.take_indexed(partition, which, |p| in_subtree(p, root)));
            }
            for key in doomed {
                self.cache.invalidate(&key).await;
            }
            self.stats
                .invalidations
                .fetch_add(roots.len() as u64, Ordering::Relaxed);
            self.stats
                .invalidations
                .fetch_add(exact.len() as u64, Ordering::Relaxed);
        })
        .await;
    }

    /// Removes every path in the subtree of `prefix` (whole segments) in every partition
    /// (`""`: everything). Returns how many paths were removed.
    pub async fn purge_prefix(&self, prefix: &str) -> usize {
        let mut removed = 0;
        self.invalidate_with(None, || async {
            if prefix.is_empty() {
                removed = self.cache.iter().count();
                self.cache.invalidate_all();
                self.index.lock().unwrap_or_else(|e| e.into_inner()).clear();
            } else {
                // Whole segments: `/api/v1/clusters` is not a prefix of `/api/v1/clustersets`.
                let keys: Vec<Arc<CacheKey>> = self
                    .cache
                    .iter()
                    .filter(|(k, _)| in_subtree(&k.path.path, prefix))
                    .map(|(k, _)| k)
                    .collect();
                removed = distinct_paths(&keys);
                self.forget(keys).await;
            }
        })
        .await;
        self.purged(removed).await
    }

    /// Removes the stored responses for exactly `path` and `query` (every representation) in
    /// every partition. Returns how many were removed.
    pub async fn purge_key(&self, path: &str, query: &str) -> usize {
        let mut removed = 0;
        self.invalidate_with(None, || async {
            let keys: Vec<Arc<CacheKey>> = self
                .cache
                .iter()
                .filter(|(k, _)| &*k.path.path == path && &*k.variant.query == query)
                .map(|(k, _)| k)
                .collect();
            removed = keys.len();
            self.forget(keys).await;
        })
        .await;
        self.purged(removed).await
    }

    /// Takes `keys` out of the index, then out of moka.
    async fn forget(&self, keys: Vec<Arc<CacheKey>>) {
        {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            for key in &keys {
                unindex(&mut index, key, None);
            }
        }
        for key in keys {
            self.cache.invalidate(&*key).await;
        }
    }

    /// Counts an admin purge's removals and lets moka apply them, so the report that follows
    /// (`GET /cache`) agrees.
    async fn purged(&self, removed: usize) -> usize {
        self.stats
            .invalidations
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.cache.run_pending_tasks().await;
        removed
    }

    /// Runs `invalidate` with fills held off, after recording the invalidation of `scopes` in
    /// a partition (`None`: of everything, for the admin purges).
    async fn invalidate_with<F, Fut>(
        &self,
        scopes: Option<(Fingerprint, &[Scope<'_>])>,
        invalidate: F,
    ) where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let _gate = self.fill_gate.write().await;
        {
            let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
            match scopes {
                Some((partition, scopes)) => epochs.bump(partition, scopes),
                None => epochs.bump_all(),
            }
        }
        invalidate().await;
    }

    /// Entries (stored responses, all variants) and weighted bytes, after pending evictions ran.
    pub async fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    /// Applies pending inserts and evictions to the counts (moka updates them lazily).
    pub async fn settle(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Stored responses and weighted bytes as of the last maintenance (see [`Store::settle`]).
    pub fn approximate_size(&self) -> (u64, u64) {
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    /// The configured bound in bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }
}

/// How many distinct paths (in any partition) `keys` name.
fn distinct_paths(keys: &[Arc<CacheKey>]) -> usize {
    keys.iter()
        .map(|k| &k.path)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Whether `path` is `root` or below it, by whole segments.
pub fn in_subtree(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    match path.strip_prefix(root) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// How an upstream fetch shared by several requests ended.
#[derive(Debug, Clone)]
pub enum FlightOutcome {
    /// The response was stored: waiters answer from it.
    Stored(Arc<Stored>),
    /// The response cannot be stored (and is not a failure): every waiter asks on its own.
    Uncacheable,
    /// The fetch failed (an error, a 5xx) or its request went away: one waiter leads a new
    /// fetch and the others wait for it.
    Released,
}

/// One upstream fetch in progress.
pub struct Flight {
    ticket: u64,
    outcome: watch::Receiver<Option<FlightOutcome>>,
}

/// The collapsing lock: concurrent requests for one key share one upstream fetch.
#[derive(Default)]
pub struct Flights {
    in_progress: Mutex<Map<CacheKey, Arc<Flight>>>,
}

/// What a request gets from [`Flights::join`].
pub enum Joined {
    /// This request fetches; it must finish the guard.
    Leader(FlightGuard),
    /// Another request fetches; wait on this.
    Waiter(watch::Receiver<Option<FlightOutcome>>),
}

impl Flights {
    /// Joins the fetch for `key`, or starts one with `ticket`. A fetch that `stale(its ticket)`
    /// says began before a write invalidated the key is not joined: this request leads anew.
    pub fn join(
        self: &Arc<Self>,
        key: &CacheKey,
        ticket: u64,
        stale: impl FnOnce(u64) -> bool,
    ) -> Joined {
        let mut map = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = map.get(key)
            && !stale(flight.ticket)
        {
            return Joined::Waiter(flight.outcome.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(
            key.clone(),
            Arc::new(Flight {
                ticket,
                outcome: rx,
            }),
        );
        Joined::Leader(FlightGuard {
            flights: self.clone(),
            key: key.clone(),
            ticket,
            tx: Some(tx),
        })
    }
}

/// Held by the leader; dropping it without finishing releases the waiters, so a leader whose
/// client went away never leaves them hanging.
pub struct FlightGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    ticket: u64,
    tx: Option<watch::Sender<Option<FlightOutcome>>>,
}

impl FlightGuard {
    /// Publishes the outcome to the waiters.
    pub fn finish(mut self, outcome: FlightOutcome) {
        self.release(outcome);
    }

    fn release(&mut self, outcome: FlightOutcome) {
        if let Some(tx) = self.tx.take() {
            let mut map = self
                .flights
                .in_progress
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if map.get(&self.key).is_some_and(|f| f.ticket == self.ticket) {
                map.remove(&self.key);
            }
            drop(map);
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.release(FlightOutcome::Released);
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .field("max_size", &self.max_size)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::token::FingerprintKey;

    fn stored(body: &'static str) -> Arc<Stored> {
        Arc::new(Stored {
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
            etag: HeaderValue::from_static("\"e\""),
            upstream_etag: true,
            vary: Vec::new(),
            response_time: SystemTime::now(),
            initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            forbids_stale: false,
        })
    }

    fn key(path: &str, query: &str) -> CacheKey {
        let partition = FingerprintKey::random().fingerprint(b"t");
        CacheKey {
            path: PathKey {
                partition,
                path: path.into(),
            },
            variant: VariantKey {
                query: query.into(),
                representation: b"application/json".as_slice().into(),
            },
        }
    }

    /// `path` in `of`'s partition, with `of`'s variant.
    fn sibling(of: &CacheKey, path: &str) -> CacheKey {
        CacheKey {
            path: PathKey {
                partition: of.path.partition,
                path: path.into(),
            },
            variant: of.variant.clone(),
        }
    }

    #[tokio::test]
    async fn a_fill_started_before_an_invalidation_is_not_stored() {
        let store = Store::new(1 << 20);
        let k = key("/api/v1/x", "");
        let epoch = store.ticket();
        store
            .invalidate(k.path.partition, &["/api/v1/x"], &[""; 0])
            .await;
        assert!(!store.insert(&k, stored("old"), epoch).await);
        assert!(store.get(&k).await.is_none());
        assert!(store.insert(&k, stored("new"), store.ticket()).await);
        assert_eq!(store.get(&k).await.unwrap().body, "new");
    }

    /// A write discards only fills in the buckets it invalidated, in its partition; a write to
    /// `/` covers the partition; a purge covers everything.
    #[tokio::test]
    async fn invalidation_discards_only_fills_of_its_buckets() {
        let store = Store::new(1 << 20);
        let partition = FingerprintKey::random().fingerprint(b"t");
        let other = FingerprintKey::random().fingerprint(b"u");
        let at = |partition, path: &str| CacheKey {
            path: PathKey {
                partition,
                path: path.into(),
            },
            variant: VariantKey {
                query: "".into(),
                representation: b"application/json".as_slice().into(),
            },
        };
        let jobs = at(partition, "/api/v1/jobs/1");
        let clusters = at(partition, "/api/v1/clusters/9");
        let elsewhere = at(other, "/api/v1/jobs/1");

        let ticket = store.ticket();
        store
            .invalidate(partition, &[""; 0], &["/api/v1/clusters"])
            .await;
        assert!(!store.insert(&clusters, stored("old"), ticket).await);
        assert!(
            store.insert(&jobs, stored("j"), ticket).await,
            "another bucket"
        );
        assert!(
            store.insert(&elsewhere, stored("e"), ticket).await,
            "another partition"
        );

        let ticket = store.ticket();
        store.invalidate(partition, &[""; 0], &["/"]).await;
        assert!(
            !store.insert(&jobs, stored("j2"), ticket).await,
            "/ covers the partition"
        );
        assert!(store.insert(&elsewhere, stored("e2"), ticket).await);

        let ticket = store.ticket();
        store.purge_prefix("/api/v1/jobs").await;
        assert!(
            !store.insert(&elsewhere, stored("e3"), ticket).await,
            "purges cover all"
        );
        assert!(store.insert(&elsewhere, stored("e4"), store.ticket()).await);
    }

    /// One entry per variant: concurrent fills of different variants of one path all land, and
    /// invalidating the path removes every one of 20,000 variants.
    #[tokio::test]
    async fn variants_are_stored_apart_and_invalidated_together() {
        let store = Arc::new(Store::new(1 << 30));
        let partition = FingerprintKey::random().fingerprint(b"t");
        let page = |n: usize| CacheKey {
            path: PathKey {
                partition,
                path: "/api/v1/jobs".into(),
            },
            variant: VariantKey {
                query: format!("page={n}").into(),
                representation: b"application/json".as_slice().into(),
            },
        };
        let ticket = store.ticket();
        let fills: Vec<_> = (0..64)
            .map(|n| {
                let store = store.clone();
                let key = page(n);
                tokio::spawn(async move { store.insert(&key, stored("p"), ticket).await })
            })
            .collect();
        for fill in fills {
            assert!(fill.await.unwrap());
        }
        for n in 0..64 {
            assert!(store.get(&page(n)).await.is_some(), "page {n} was lost");
        }
        for n in 64..20_000 {
            assert!(store.insert(&page(n), stored("p"), ticket).await);
        }
        assert_eq!(store.size().await.0, 20_000);
        store
            .invalidate(partition, &[""; 0], &["/api/v1/jobs"])
            .await;
        assert_eq!(store.size().await.0, 0);
        assert!(store.get(&page(19_999)).await.is_none());
        assert!(store.index.lock().unwrap().is_empty());
    }

    /// Outside the API, a write invalidates its own subtree and its parent exactly: fills of
    /// its siblings go on (the cache-tests suite writes to `/test/<uuid>` paths side by side).
    #[tokio::test]
    async fn a_write_spares_its_siblings_fills() {
        let store = Store::new(1 << 20);
        let partition = FingerprintKey::random().fingerprint(b"t");
        let at = |path: &str| CacheKey {
            path: PathKey {
                partition,
                path: path.into(),
            },
            variant: VariantKey {
                query: "".into(),
                representation: b"application/json".as_slice().into(),
            },
        };
        let ticket = store.ticket();
        store.invalidate(partition, &["/test"], &["/test/a"]).await;
        assert!(store.insert(&at("/test/b"), stored("b"), ticket).await);
        assert!(
            store.insert(&at("/test/ab"), stored("ab"), ticket).await,
            "whole segments"
        );
        assert!(!store.insert(&at("/test/a"), stored("a"), ticket).await);
        assert!(!store.insert(&at("/test/a/x/"), stored("x"), ticket).await);
        assert!(
            !store.insert(&at("/test/"), stored("t"), ticket).await,
            "the parent"
        );
        assert!(store.insert(&at("/other"), stored("o"), ticket).await);
    }

    /// Past its bound the epoch map is emptied, and fills that started before are refused
    /// rather than risk storing what an invalidation they cannot see removed.
    #[test]
    fn the_epoch_map_is_bounded_and_conservative() {
        let mut epochs = Epochs::default();
        let partition = FingerprintKey::random().fingerprint(b"t");
        let key = PathKey {
            partition,
            path: "/api/v1/jobs/1".into(),
        };
        let before = epochs.clock;
        for i in 0..=Epochs::LIMIT {
            epochs.bump(partition, &[Scope::Subtree(&format!("/c{i}"))]);
        }
        assert!(epochs.scopes <= Epochs::LIMIT);
        assert!(epochs.invalidated_since(&key, before));
        assert!(!epochs.invalidated_since(&key, epochs.clock));
    }

    #[test]
    fn buckets_are_collections_or_first_segments() {
        assert_eq!(bucket("/api/v1/usergroups/624e/"), "/api/v1/usergroups");
        assert_eq!(bucket("/api/v1/usergroups"), "/api/v1/usergroups");
        assert_eq!(bucket("/other/x/y"), "/other");
        assert_eq!(bucket("/other"), "/other");
        assert_eq!(bucket("/"), "");
        // A root is in the bucket of every path of its subtree.
        for (root, path) in [
            ("/api/v1/usergroups", "/api/v1/usergroups/a/"),
            ("/other/x", "/other/x/y"),
        ] {
            assert_eq!(bucket(root), bucket(path));
        }
    }

    #[test]
    fn subtrees_are_whole_segments() {
        assert!(in_subtree("/api/v1/clusters", "/api/v1/clusters"));
        assert!(in_subtree("/api/v1/clusters/", "/api/v1/clusters"));
        assert!(in_subtree("/api/v1/clusters/x/y", "/api/v1/clusters"));
        assert!(in_subtree("/api/v1/clusters/x", "/api/v1/clusters/"));
        assert!(!in_subtree("/api/v1/clustersets", "/api/v1/clusters"));
        assert!(!in_subtree("/api/v1", "/api/v1/clusters"));
    }

    #[tokio::test]
    async fn subtree_invalidation_is_immediate_and_stays_in_its_partition() {
        let store = Store::new(1 << 20);
        let item = key("/api/v1/usergroups/1", "");
        let alias = sibling(&item, "/api/v1/usergroups/alpha/");
        let neighbour = sibling(&item, "/api/v1/usergroupsets");
        let other_tenant = key("/api/v1/usergroups/1", "");
        for k in [&item, &alias, &neighbour, &other_tenant] {
            assert!(store.insert(k, stored("x"), store.ticket()).await);
        }
        store
            .invalidate(item.path.partition, &[""; 0], &["/api/v1/usergroups"])
            .await;
        assert!(store.get(&item).await.is_none());
        assert!(store.get(&alias).await.is_none());
        assert!(store.get(&neighbour).await.is_some());
        assert!(store.get(&other_tenant).await.is_some());
    }

    /// The index is nested (partition, bucket, path): what empties at one level leaves the one
    /// above, so invalidated and removed entries leave nothing behind, and one partition's
    /// invalidation leaves another's entries indexed.
    #[tokio::test]
    async fn the_index_keeps_no_empty_buckets_or_partitions() {
        let store = Store::new(1 << 20);
        let a = key("/api/v1/a/1", "");
        let (a2, a3) = (sibling(&a, "/api/v1/b/1"), sibling(&a, "/other/x"));
        let b = key("/api/v1/a/1", "");
        for k in [&a, &a2, &a3, &b] {
            assert!(store.insert(k, stored("x"), store.ticket()).await);
        }
        let buckets = |p: &Fingerprint| {
            let index = store.index.lock().unwrap();
            let mut names: Vec<String> = index
                .get(p)
                .map(|b| b.keys().map(|k| k.to_string()).collect())
                .unwrap_or_default();
            names.sort();
            names
        };
        assert_eq!(
            buckets(&a.path.partition),
            ["/api/v1/a", "/api/v1/b", "/other"]
        );
        store
            .invalidate(a.path.partition, &["/api/v1"], &["/api/v1/b"])
            .await;
        assert_eq!(buckets(&a.path.partition), ["/api/v1/a", "/other"]);
        store.invalidate(a.path.partition, &[""; 0], &["/"]).await;
        assert!(store.index.lock().unwrap().get(&a.path.partition).is_none());
        assert!(store.get(&a).await.is_none() && store.get(&a3).await.is_none());
        assert_eq!(buckets(&b.path.partition), ["/api/v1/a"]);
        assert!(store.get(&b).await.is_some());
        store.remove(&b).await;
        assert!(store.index.lock().unwrap().is_empty());
    }

    /// A root above the collections (`/api/v1`, `/api`, `/`) reaches into every collection's
    /// bucket; a root below one stays in its bucket.
    #[tokio::test]
    async fn a_root_above_the_collections_invalidates_all_of_them() {
        for root in ["/api/v1", "/api/v1/", "/api", "/"] {
            let store = Store::new(1 << 20);
            let a = key("/api/v1/clusters/1", "");
            let b = sibling(&a, "/api/v1/usergroups");
            let outside = sibling(&a, "/other/x");
            for k in [&a, &b, &outside] {
                assert!(store.insert(k, stored("x"), store.ticket()).await);
            }
            store.invalidate(a.path.partition, &[""; 0], &[root]).await;
            assert!(store.get(&a).await.is_none(), "{root}: clusters kept");
            assert!(store.get(&b).await.is_none(), "{root}: usergroups kept");
            assert_eq!(store.get(&outside).await.is_none(), root == "/", "{root}");
        }
        for (root, bucket_of_root) in [
            ("/api/v1/clusters", "/api/v1/clusters"),
            ("/api/x", "/api"),
            ("/other/x", "/other"),
        ] {
            assert_eq!(subtree_bucket(root), Some(bucket_of_root));
            assert_eq!(bucket(root), bucket_of_root);
        }
        // Whatever the root, every path of its subtree is in the bucket it names.
        let paths = [
            "/",
            "/api",
            "/api/v1",
            "/api/v1/clusters",
            "/api/v1/clusters/1/x",
            "/api/x/y",
            "/other",
            "/other/x/y",
        ];
        for root in paths {
            for path in paths.iter().filter(|p| in_subtree(p, root)) {
                if let Some(b) = subtree_bucket(root) {
                    assert_eq!(bucket(path), b, "{path} under {root}");
                }
            }
        }
    }

    #[tokio::test]
    async fn variants_of_a_path_are_kept_and_invalidated_together() {
        let store = Store::new(1 << 20);
        let (a, b) = (key("/c", "page=1"), key("/c", "page=2"));
        let b = CacheKey {
            path: a.path.clone(),
            ..b
        };
        assert!(store.insert(&a, stored("1"), store.ticket()).await);
        assert!(store.insert(&b, stored("2"), store.ticket()).await);
        assert_eq!(store.get(&a).await.unwrap().body, "1");
        assert_eq!(store.get(&b).await.unwrap().body, "2");
        store.invalidate(a.path.partition, &["/c"], &[""; 0]).await;
        assert!(store.get(&a).await.is_none() && store.get(&b).await.is_none());
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_releases_its_waiters() {
        let flights = Arc::new(Flights::default());
        let k = key("/x", "");
        let Joined::Leader(guard) = flights.join(&k, 0, |_| false) else {
            panic!("first is leader")
        };
        let Joined::Waiter(mut rx) = flights.join(&k, 0, |_| false) else {
            panic!("second waits")
        };
        // A request joining after an invalidation does not wait on the older fetch.
        assert!(matches!(
            flights.join(&k, 1, |started| started < 1),
            Joined::Leader(_)
        ));
        drop(guard);
        let outcome = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert!(matches!(outcome, Some(FlightOutcome::Released)));
    }
}
