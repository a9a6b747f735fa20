//! The response cache: an RFC 9111 shared cache for GET in front of one origin, partitioned by
//! the credential the gateway injects.
//!
//! Reads: a fresh stored response is served from memory; a stale one is revalidated with the
//! upstream's validator; concurrent requests needing the upstream share one fetch; a failing
//! upstream may be covered by a stale response (`stale-if-error`). Clients' own conditional
//! requests are answered here. Writes pass through untouched and invalidate what they changed,
//! so no read through the gateway ever returns the state from before a write.
//!
//! The rules live in [`policy`] (pure functions), the outcome in [`status`], storage and the
//! collapsing lock in [`store`]; this module applies them to requests.

pub mod rules;
pub mod shared;
pub mod status;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneService;
use tower::{Layer, Service};

use crate::config::{CacheConfig, KeyHeaders};
use crate::context::CacheOutcome;
use crate::context::{CacheReport, Exchange, WireMethod};
use crate::fleet::{self, Fleet};
use crate::http::body::{
    self, Body, BodyTimedOut, Budget, Collected, PrefixedBody, Reservation, collect_limited,
};
use crate::http::error::{GatewayError, find_cause};
use crate::http::is_read;
use crate::observability::metrics::{CacheGauges, CacheSnapshot};
use crate::secrets::credential::{PinnedToken, SelectedCredential};
use crate::secrets::token::Fingerprint;
use rules::{Directives, NotStorable};
use status::{CacheStatus, Forward};
use store::{CacheKey, FlightOutcome, Joined, PathKey, Store, Stored, VariantKey};

/// The most stored variants of one path [`ResponseCache::identity_variant`] looks through.
const IDENTITY_SCAN_LIMIT: usize = 64;

/// Client conditionals the cache answers itself; they are never sent upstream for cacheable
/// reads (the cache wants a full response to store).
const CLIENT_CONDITIONALS: [HeaderName; 5] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Where the cache reads the time: the system clock in the gateway, a clock a test moves.
/// Every freshness, age, stale-if-error and stored-time decision goes through it.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The cache and its settings.
#[derive(Debug)]
pub struct ResponseCache {
    store: Store,
    /// The time, for every freshness decision.
    clock: Arc<dyn Clock>,
    /// Swapped whole on a reload (`SIGHUP`); each request reads it once.
    config: ArcSwap<CacheConfig>,
    /// `cache.max_inflight`: what fills in progress may hold.
    inflight: Budget,
    /// How long a collapsed request waits for the fetch it joined.
    wait_limit: Duration,
    /// The fleet's shared tier and invalidations (`[fleet]`), once joined.
    fleet: std::sync::OnceLock<Arc<Fleet>>,
    /// Late invalidations pending (`schedule_late`): when each is due, by partition and
    /// invalidation root.
    late: std::sync::Mutex<HashMap<(Fingerprint, Box<str>), tokio::time::Instant>>,
    /// The invalidations that run apart from any request (a write whose client went away, the
    /// late ones): awaited at shutdown ([`ResponseCache::finish_background`]), so that other
    /// replicas hear of them before this one exits.
    background: TaskTracker,
    /// Cancelled at shutdown: pending late invalidations run at once instead of when due.
    hurry: CancellationToken,
}

/// The most late invalidations pending for distinct roots; past it, a failed write's is
/// merged into its partition's root (`/`), which covers everything in the partition.
const LATE_PENDING_MAX: usize = 4096;
/// The longest root a late invalidation keeps (a path outside the collections is its own
/// root, as long as the client made it); a longer one is merged into the partition's root.
const LATE_ROOT_MAX: usize = 1024;

impl CacheGauges for ResponseCache {
    fn snapshot(&self) -> CacheSnapshot {
        let store = self.store();
        let (entries, weighted_bytes) = store.approximate_size();
        let s = &store.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        CacheSnapshot {
            entries,
            weighted_bytes,
            max_bytes: store.max_size(),
            hits: s.outcomes(CacheOutcome::Hit),
            misses: s.outcomes(CacheOutcome::Miss),
            revalidations: s.outcomes(CacheOutcome::Revalidated),
            stale_served: s.outcomes(CacheOutcome::Stale),
            collapsed: get(&s.collapsed),
            evictions: get(&s.evictions),
            invalidations: get(&s.invalidations),
            not_stored: NotStorable::ALL
                .iter()
                .map(|r| (r.as_str(), s.not_stored_for(*r)))
                .collect(),
        }
    }
}

impl ResponseCache {
    /// A cache per `config`; collapsed waits are bounded by `upstream_timeout`.
    pub fn new(config: CacheConfig, upstream_timeout: Duration) -> Self {
        Self::with_clock(config, upstream_timeout, Arc::new(SystemClock))
    }

    /// The same, reading the time from `clock`.
    pub fn with_clock(
        config: CacheConfig,
        upstream_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            clock,
            inflight: Budget::new(config.max_inflight),
            store: Store::new(config.max_size),
            config: ArcSwap::from_pointee(config),
            wait_limit: upstream_timeout,
            fleet: std::sync::OnceLock::new(),
            late: std::sync::Mutex::new(HashMap::new()),
            background: TaskTracker::new(),
            hurry: CancellationToken::new(),
        }
    }

    /// At shutdown, once no request is left: runs the pending late invalidations now, and
    /// waits up to `limit` for every background invalidation to finish (their Redis calls are
    /// bounded by `fleet.timeout`). Returns how many were still running at the limit (logged;
    /// other replicas may then keep entries those writes changed).
    pub async fn finish_background(&self, limit: Duration) -> usize {
        self.hurry.cancel();
        self.background.close();
        let finished = tokio::time::timeout(limit, self.background.wait())
            .await
            .is_ok();
        if let Some(fleet) = self.fleet() {
            fleet.report_at_exit();
        }
        if finished {
            return 0;
        }
        let left = self.background.len();
        tracing::warn!(
            invalidations = left,
            limit = %humantime::format_duration(limit),
            "writes' invalidations still running at exit: other replicas may keep entries they changed"
        );
        left
    }

    /// Shares this cache with the fleet's other replicas: misses look in Redis, fills and
    /// writes go there too, and other replicas' invalidations apply here.
    pub fn join_fleet(self: &Arc<Self>, fleet: Arc<Fleet>) {
        fleet.start(Arc::new(FleetListener(Arc::downgrade(self))));
        let _ = self.fleet.set(fleet);
    }

    fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// Applies the settings a reload may change (freshness, stale windows, key headers, the
    /// largest object); `max_size` and `max_inflight` keep their values until a restart.
    pub fn reconfigure(&self, new: &CacheConfig) {
        let mut next = (**self.config.load()).clone();
        next.fresh_for = new.fresh_for;
        next.stale_if_error = new.stale_if_error;
        next.stale_while_revalidate = new.stale_while_revalidate;
        next.key_headers = new.key_headers.clone();
        next.max_object_size = new.max_object_size.min(next.max_inflight);
        self.config.store(Arc::new(next));
    }

    /// The settings in force.
    pub fn config(&self) -> Arc<CacheConfig> {
        self.config.load_full()
    }

    /// The storage, for the admin endpoint and metrics.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Puts the cache into the stack.
#[derive(Clone)]
pub struct CacheLayer {
    cache: Option<Arc<ResponseCache>>,
}

impl CacheLayer {
    /// `None` disables caching (responses still say `fwd=bypass`).
    pub fn new(cache: Option<Arc<ResponseCache>>) -> Self {
        Self { cache }
    }
}

/// The stack below the cache, type-erased: the cache's futures hold it across awaits, and a
/// concrete type keeps them provably `Send`.
pub type Inner = BoxCloneService<Request<Body>, Response<Body>, GatewayError>;

impl<S> Layer<S> for CacheLayer
where
    S: Service<Request<Body>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Service = Cache;
    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner: BoxCloneService::new(inner),
            cache: self.cache.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Cache {
    inner: Inner,
    cache: Option<Arc<ResponseCache>>,
}

impl Service<Request<Body>> for Cache {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The ready clone stays here; the clone moves into the future (tower's usual swap).
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let cache = self.cache.clone();
        Box::pin(async move {
            // The method is the effective one (see `canonical`). A request whose method came
            // from an override header is never served from or stored in the cache: the stored
            // response would be keyed on what the client sent, not on what was executed.
            let overridden = req.extensions().get::<WireMethod>().is_some();
            let exchange = Exchange::of(&req).cloned();
            let counted = cache.clone();
            let (status, result) = match (cache, req.method()) {
                (None, _) => (
                    CacheStatus::forward(Forward::Bypass),
                    pass(inner, req).await,
                ),
                (Some(_), m) if is_read(m) && overridden => (
                    CacheStatus::forward(Forward::Method),
                    pass(inner, req).await,
                ),
                (Some(cache), &Method::GET | &Method::HEAD) => cache.read(inner, req).await,
                (Some(_), &Method::OPTIONS) => (
                    CacheStatus::forward(Forward::Method),
                    pass(inner, req).await,
                ),
                // Every other effective method is a write, and invalidates.
                (Some(cache), _) => (
                    CacheStatus::forward(Forward::Method),
                    cache.write(inner, req).await,
                ),
            };
            // The one outcome, counted and reported once: the observe layer puts the header on
            // whatever response this becomes (an error is rendered by rescue, like every
            // layer's).
            let outcome = status.outcome();
            if let Some(cache) = &counted {
                cache.store.stats.count(outcome);
                if let Some(reason) = status.not_stored {
                    cache.store.stats.not_stored(reason);
                }
            }
            if let Some(ex) = exchange {
                ex.set_cache(CacheReport {
                    outcome,
                    header: status.header_value(),
                });
            }
            result
        })
    }
}

async fn pass(mut inner: Inner, req: Request<Body>) -> Result<Response<Body>, GatewayError> {
    inner.call(req).await
}

/// A fetch that may fill the cache: where it would be stored, what is stored there now (to
/// revalidate, or to fall back on), why the upstream is asked, the invalidation ticket it
/// started with, and the collapsing lock it holds if it leads a group.
struct Fill {
    key: CacheKey,
    stored: Option<Arc<Stored>>,
    forward: Forward,
    ticket: u64,
    guard: Option<store::FlightGuard>,
    /// The shared tier's versions read before the upstream is asked: the fill is offered to
    /// Redis under them (`None`: not shared, or the fleet link is down).
    shared: Option<fleet::Versions>,
    /// `stored` came from the shared tier.
    from_shared: bool,
}

/// A forwarded write whose outcome has not been invalidated for yet. Dropped unsettled (the
/// client went away while the upstream had the write), it invalidates the target as for a
/// write whose answer never came: now, and once more after `upstream.timeout`.
struct Unsettled {
    /// `None` once settled.
    cache: Option<Arc<ResponseCache>>,
    /// Where the upstream call marks whether the write may have reached the upstream.
    exchange: Option<Arc<Exchange>>,
    partition: Fingerprint,
    target: String,
}

impl Unsettled {
    /// Whether the write may have reached the upstream: if not, there is nothing to
    /// invalidate. (Without an exchange, only in this layer's unit tests, it counts as sent.)
    fn sent(&self) -> bool {
        self.exchange.as_ref().is_none_or(|ex| ex.may_be_sent())
    }

    fn settle(mut self) {
        self.cache = None;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let sent = self.sent();
        let Some(cache) = self.cache.take().filter(|_| sent) else {
            return;
        };
        let (partition, target) = (self.partition, std::mem::take(&mut self.target));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let background = cache.background.clone();
                background.spawn_on(
                    async move { cache.invalidate_unanswered(partition, &target).await },
                    &runtime,
                );
            }
            // Only at exit, when the runtime (and this replica's memory) is going away.
            Err(_) => tracing::warn!(
                path = %target,
                "a write's outcome was not known at exit: other replicas may keep its old entries"
            ),
        }
    }
}

/// What to answer a read with, decided after the upstream was asked.
type Answer = (CacheStatus, Result<Response<Body>, GatewayError>);

impl ResponseCache {
    async fn write(
        self: &Arc<Self>,
        mut inner: Inner,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        let Some(token) = SelectedCredential::token_for(&req) else {
            // No token loaded for the credential: nothing to invalidate in, and token injection
            // answers 503 (it looks again, so a token that appears in between is used, for a
            // partition that holds nothing yet).
            return inner.call(req).await;
        };
        // The write goes out with the token whose partition it invalidates, even if the token
        // rotates in between.
        let partition = token.fingerprint();
        req.extensions_mut().insert(PinnedToken(token));
        let target = req.uri().path().to_string();
        // Once the upstream call sends the write, the upstream may execute it, whatever the
        // client hears: if this future is dropped before the outcome is known and invalidated
        // for (the client went away), the guard invalidates as for a write whose answer never
        // came.
        let unsettled = Unsettled {
            cache: Some(Arc::clone(self)),
            exchange: Exchange::of(&req).cloned(),
            partition,
            target,
        };
        let response = inner.call(req).await;
        let target = unsettled.target.as_str();
        match response.as_ref().map(Response::status) {
            // RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target
            // and Location/Content-Location, with every query variant. Here, for an API
            // resource, the whole collection it belongs to: Eve serves one document under
            // several paths (its id, its name through `additional_lookup`, either with a
            // trailing slash), and a write to the collection (POST, DELETE) changes every
            // item's listing.
            Ok(status) if status.is_success() || status.is_redirection() => {
                let headers = response.as_ref().map(Response::headers).ok();
                let locations = [header::LOCATION, header::CONTENT_LOCATION]
                    .map(|h| headers.and_then(|hs| hs.get(&h)).and_then(location_path));
                let targets =
                    std::iter::once(target).chain(locations.iter().flatten().map(String::as_str));
                self.invalidate(&partition, targets).await;
            }
            // Refused (412, 428, 404, ...): nothing was executed.
            Ok(status) if status.is_client_error() || status.is_informational() => {}
            // A 5xx, or no answer once the request was on its way (a timeout, a connection
            // lost mid-request, or the client's streamed body breaking off after the upstream
            // had the headers: Eve starts a DELETE without reading its body): the upstream may
            // have executed the write, or may still (a proxy's 502/504 before Eve commits).
            // Invalidated now and once more later.
            Ok(_) => self.invalidate_unanswered(partition, target).await,
            Err(_) if unsettled.sent() => self.invalidate_unanswered(partition, target).await,
            // Never sent (the client's body broke off, was too large or stalled while it was
            // read whole; the body budget; no connection to the upstream): nothing executed.
            Err(_) => {}
        }
        unsettled.settle();
        response
    }

    /// Invalidates what a write to `targets` may have changed (see `write`), in Redis and every
    /// other replica first, then in this replica's memory: the other way round, a read here in
    /// between could find the pre-write entry still in Redis and keep it in memory under a
    /// ticket taken after the local invalidation. Both happen before the client hears the
    /// write's outcome.
    async fn invalidate<'t>(
        &self,
        partition: &Fingerprint,
        targets: impl Iterator<Item = &'t str>,
    ) {
        // Scopes borrow from the paths: a write allocates no string per scope.
        let (mut roots, mut exact): (Vec<&str>, Vec<&str>) =
            targets.map(invalidation_scope).unzip();
        roots.sort_unstable();
        roots.dedup();
        exact.sort_unstable();
        exact.dedup();
        if let Some(fleet) = self.fleet() {
            fleet.invalidate(partition, &exact, &roots).await;
        }
        self.store.invalidate(*partition, &exact, &roots).await;
    }

    /// For a write whose answer never came: invalidated now, and once more later
    /// (`schedule_late`).
    async fn invalidate_unanswered(self: &Arc<Self>, partition: Fingerprint, target: &str) {
        self.invalidate(&partition, [target].into_iter()).await;
        self.schedule_late(partition, target);
    }

    /// A write whose answer never came may still be executing upstream after the gateway's
    /// invalidation: a read in between would store the old document again. So the target's
    /// collection is invalidated once more, one `upstream.timeout` later. Best effort: a commit
    /// later than that is not covered. One timer per partition and root, however many writes
    /// failed (a later failure moves the time on), and at most [`LATE_PENDING_MAX`] roots of at
    /// most [`LATE_ROOT_MAX`] bytes, past which the partition's root stands in: a client
    /// failing writes cannot make the gateway hold a task, or a long path, per write.
    fn schedule_late(self: &Arc<Self>, partition: Fingerprint, target: &str) {
        if self.hurry.is_cancelled() {
            // Shutting down: the invalidation that just ran is the last this replica makes.
            return;
        }
        let due = tokio::time::Instant::now() + self.wait_limit;
        let (root, _) = invalidation_scope(target);
        let root = if root.len() > LATE_ROOT_MAX {
            "/"
        } else {
            root
        };
        let mut key = (partition, Box::<str>::from(root));
        let mut pending = self.late.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= LATE_PENDING_MAX && !pending.contains_key(&key) {
            key.1 = "/".into();
        }
        match pending.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut later) => *later.get_mut() = due,
            std::collections::hash_map::Entry::Vacant(first) => {
                let key = first.key().clone();
                first.insert(due);
                self.background.spawn(Arc::clone(self).run_late(key));
            }
        }
    }

    /// Waits until the late invalidation of `key` is due (a later failed write may have moved
    /// it on), then runs it.
    async fn run_late(self: Arc<Self>, key: (Fingerprint, Box<str>)) {
        loop {
            let due = {
                let pending = self.late.lock().unwrap_or_else(|e| e.into_inner());
                match pending.get(&key) {
                    Some(due) => *due,
                    None => return,
                }
            };
            // At shutdown it runs at once: later, this replica is gone.
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.hurry.cancelled() => {}
            }
            {
                let mut pending = self.late.lock().unwrap_or_else(|e| e.into_inner());
                let moved_on = pending.get(&key).is_some_and(|now_due| *now_due > due);
                if moved_on && !self.hurry.is_cancelled() {
                    continue;
                }
                pending.remove(&key);
            }
            self.invalidate(&key.0, [&*key.1].into_iter()).await;
            return;
        }
    }

    async fn read(self: &Arc<Self>, inner: Inner, mut req: Request<Body>) -> Answer {
        let request_cc = Directives::parse(req.headers());
        let Some(token) = SelectedCredential::token_for(&req) else {
            // No credential, no partition: nothing can be served or stored (injection answers 503).
            return (
                CacheStatus::forward(Forward::Bypass),
                pass(inner, req).await,
            );
        };
        req.extensions_mut().insert(PinnedToken(token.clone()));
        let config = self.config.load_full();
        collapse_key_headers(&config.key_headers, req.headers_mut());
        let key = CacheKey {
            path: PathKey {
                partition: token.fingerprint(),
                path: req.uri().path().into(),
            },
            variant: VariantKey {
                query: req.uri().query().unwrap_or("").into(),
                representation: rules::representation_key(&config.key_headers, req.headers()),
            },
        };
        let is_head = req.method() == Method::HEAD;
        // While the fleet link is down this replica cannot hear other replicas' writes: what
        // memory holds is revalidated before it is served.
        let fleet_down = self.fleet().is_some_and(|f| !f.is_up());
        if !is_head && req.headers().contains_key(header::RANGE) {
            // A fresh stored response answers the range itself (`serve_range`). Otherwise the
            // request goes upstream as it came, `Range` and `If-Range` together, and its answer
            // is not stored: only a complete 200 is.
            let now = self.clock.now();
            let found = match self.store.get(&key).await {
                Some(s) => Some(s),
                None => self.identity_variant(&key, &config.key_headers).await,
            };
            if let Some(s) = found.filter(|s| {
                !fleet_down
                    && s.matches_vary(req.headers())
                    && rules::fresh_enough(s.age(now), s.lifetime, &request_cc, s.forbids_stale)
            }) {
                return (
                    CacheStatus::hit(s.ttl(now)),
                    Ok(serve_range(&s, req.headers(), now)),
                );
            }
            return (
                CacheStatus::forward(Forward::Request),
                pass(inner, req).await,
            );
        }
        if request_cc.no_store {
            let mut status = CacheStatus::forward(Forward::Request);
            status.not_stored = Some(NotStorable::NoStore);
            return (status, pass(inner, req).await);
        }

        let mut may_collapse = true;
        // Collapsed requests wait at most as long as one upstream call may take, in total,
        // however many leaders fail in that time.
        let deadline = tokio::time::Instant::now() + self.wait_limit;
        let mut joined = false;
        loop {
            let now = self.clock.now();
            let found = self.store.get(&key).await;
            let vary_miss = found
                .as_ref()
                .is_some_and(|s| !s.matches_vary(req.headers()));
            let stored = found.filter(|_| !vary_miss);
            if let Some(s) = &stored
                && !fleet_down
                && rules::fresh_enough(s.age(now), s.lifetime, &request_cc, s.forbids_stale)
            {
                return (
                    CacheStatus::hit(s.ttl(now)),
                    Ok(serve(s, req.headers(), is_head, now)),
                );
            }
            // stale-while-revalidate (RFC 5861): serve the stale response now, and let one
            // request in the background revalidate it (none, if a fetch is already under way).
            if let Some(s) = &stored
                && !is_head
                && !fleet_down
                && !request_cc.no_cache
                && request_cc.max_age.is_none()
                && request_cc.min_fresh.is_none()
                && s.usable_while_revalidating(now)
            {
                let ticket = self.store.ticket();
                if let Joined::Leader(guard) = self.store.join(&key, ticket) {
                    let fill = Fill {
                        key: key.clone(),
                        stored: Some(s.clone()),
                        forward: Forward::Stale,
                        ticket,
                        guard: Some(guard),
                        shared: None,
                        from_shared: false,
                    };
                    self.revalidate_in_background(&inner, &req, &token, fill);
                }
                let mut status = CacheStatus::hit(s.ttl(now));
                status.stale_while_revalidate = true;
                return (status, Ok(serve(s, req.headers(), false, now)));
            }
            if request_cc.only_if_cached {
                return (
                    CacheStatus::forward(Forward::Request),
                    Err(GatewayError::NotCached),
                );
            }
            let forward = match &stored {
                Some(s) if s.age(now) < s.lifetime && !fleet_down => Forward::Request,
                Some(s) if s.age(now) < s.lifetime => Forward::Stale,
                Some(_) => Forward::Stale,
                None if vary_miss => Forward::VaryMiss,
                None => Forward::UriMiss,
            };
            if is_head {
                // A HEAD cannot fill the cache; it goes upstream as it is.
                return (CacheStatus::forward(forward), pass(inner, req).await);
            }
            let ticket = self.store.ticket();
            let guard = if may_collapse {
                match self.store.join(&key, ticket) {
                    Joined::Leader(guard) => Some(guard),
                    Joined::Waiter(mut outcome) => {
                        if !joined {
                            joined = true;
                            self.store.stats.collapsed.fetch_add(1, Ordering::Relaxed);
                        }
                        let waited =
                            tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some))
                                .await;
                        // `None`: waited as long as an upstream call may take.
                        let outcome = match waited {
                            Err(_) => None,
                            Ok(Err(_)) => Some(FlightOutcome::Released),
                            Ok(Ok(done)) => Some(done.clone().unwrap_or(FlightOutcome::Released)),
                        };
                        match outcome {
                            Some(FlightOutcome::Stored(s)) => {
                                let mut status = CacheStatus::forward(forward);
                                status.collapsed = true;
                                let now = self.clock.now();
                                return (status, Ok(serve(&s, req.headers(), false, now)));
                            }
                            // Nothing to share: every waiter asks on its own, at once.
                            Some(FlightOutcome::Uncacheable) | None => may_collapse = false,
                            // The leader failed or went away: the first waiter back leads a
                            // new fetch and the others wait for it, until the deadline.
                            Some(FlightOutcome::Released) => {}
                        }
                        continue;
                    }
                }
            } else {
                None
            };
            let mut fill = Fill {
                key,
                stored,
                forward,
                ticket,
                guard,
                shared: None,
                from_shared: false,
            };
            if fill.stored.is_none()
                && let Some(answer) = self
                    .look_in_fleet(&mut fill, req.headers(), &request_cc)
                    .await
            {
                // Another replica had it (the shared tier).
                return answer;
            }
            let mut answer = self.fetch(inner, req, &request_cc, fill).await;
            answer.0.fleet_down = fleet_down;
            return answer;
        }
    }

    /// Starts the background revalidation of a response served under stale-while-revalidate:
    /// the same GET, with the same credential pinned, as the leader of `key`'s fetch. It is
    /// not a request of its own (no exchange, no audit record); it counts as an upstream call.
    fn revalidate_in_background(
        self: &Arc<Self>,
        inner: &Inner,
        req: &Request<Body>,
        token: &Arc<crate::secrets::token::LoadedToken>,
        fill: Fill,
    ) {
        let mut background = Request::new(body::empty());
        *background.uri_mut() = req.uri().clone();
        *background.headers_mut() = req.headers().clone();
        background
            .extensions_mut()
            .insert(PinnedToken(token.clone()));
        if let Some(credential) = req.extensions().get::<SelectedCredential>() {
            background.extensions_mut().insert(credential.clone());
        }
        let (cache, inner) = (self.clone(), inner.clone());
        tokio::spawn(async move {
            let directives = Directives::parse(background.headers());
            // The answer is stored (or refused) by `fetch`; nobody reads it.
            let _ = cache.fetch(inner, background, &directives, fill).await;
        });
    }

    async fn fetch(
        &self,
        mut inner: Inner,
        req: Request<Body>,
        request_cc: &Directives,
        fill: Fill,
    ) -> Answer {
        let Fill {
            key,
            stored,
            forward,
            ticket,
            guard,
            shared,
            from_shared,
        } = fill;
        let config = self.config.load_full();
        let mut status = CacheStatus::forward(forward);
        status.shared = from_shared;
        let (mut parts, body) = req.into_parts();
        let client = parts.headers.clone();
        for h in &CLIENT_CONDITIONALS {
            parts.headers.remove(h);
        }
        match &stored {
            Some(s) if s.upstream_etag => {
                parts.headers.insert(header::IF_NONE_MATCH, s.etag.clone());
            }
            Some(s) => {
                if let Some(lm) = s.headers.get(header::LAST_MODIFIED) {
                    parts.headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
                }
            }
            None => {}
        }
        let request_time = self.clock.now();
        let result = inner.call(Request::from_parts(parts, body)).await;
        let now = self.clock.now();
        let stale = stored.as_ref().filter(|s| s.usable_if_error(now));

        let response = match result {
            Err(err) => {
                if let Some(s) = stale
                    && err.is_upstream_failure()
                {
                    return self.serve_stale(s, &client, now);
                }
                return (status, Err(err));
            }
            Ok(response) => response,
        };
        let code = response.status();
        status.fwd_status = Some(code.as_u16());
        if code.is_server_error()
            && let Some(s) = stale
        {
            return self.serve_stale(s, &client, now);
        }
        if code == StatusCode::NOT_MODIFIED
            && let Some(old) = &stored
        {
            let updated = Arc::new(revalidated(
                old,
                response.headers(),
                &config,
                request_time,
                now,
            ));
            status.stored = self.offer_to_fleet(&key, shared, &updated, now).await
                && self.store.insert(&key, updated.clone(), ticket).await;
            if let Some(guard) = guard {
                guard.finish(shared_with_waiters(status.stored, &updated));
            }
            status.ttl = Some(updated.ttl(now));
            return (status, Ok(serve(&updated, &client, false, now)));
        }
        let response_cc = Directives::parse(response.headers());
        if let Err(reason) = rules::storable(code, request_cc, response.headers(), &response_cc) {
            if stored.is_some() && !code.is_server_error() {
                // The upstream no longer gives what was stored (gone, or now uncacheable); a
                // passing 5xx is no reason to forget it.
                self.store.remove(&key).await;
            }
            if code == StatusCode::OK {
                status.not_stored = Some(reason);
            }
            // A 5xx is a failed fetch (the guard, dropped, lets a waiter try again); any other
            // answer that cannot be stored is what every waiter would get: they go at once.
            if let Some(guard) = guard
                && !code.is_server_error()
            {
                guard.finish(FlightOutcome::Uncacheable);
            }
            return (status, Ok(response));
        }

        let (parts, body) = response.into_parts();
        // The bytes of this fill count against `cache.max_inflight` until its client has them.
        // A body of known length reserves all of it up front, so that concurrent fills do not
        // each take a share and none completes; one of unknown length reserves as it arrives.
        let mut reserved = Reservation::default();
        let mut over_budget = false;
        let length = body
            .size_hint()
            .exact()
            .filter(|n| *n <= config.max_object_size);
        if let Some(n) = length
            && !reserved.grow(&self.inflight, n)
        {
            status.not_stored = Some(NotStorable::InflightLimit);
            if let Some(guard) = guard {
                guard.finish(FlightOutcome::Uncacheable);
            }
            return (status, Ok(Response::from_parts(parts, body)));
        }
        let reserve = |len: usize| {
            let reserved = length.is_some() || reserved.grow(&self.inflight, len as u64);
            over_budget |= !reserved;
            reserved
        };
        // An upstream that stalls mid-body must not hold the fill for ever (its client, the
        // collapsing lock its waiters queue on, its share of `max_inflight`): the upstream's
        // bodies end with `BodyTimedOut` after `upstream.timeout` without bytes (see
        // `Upstream`), which ends the fill with 504.
        let collected = collect_limited(body, config.max_object_size, reserve).await;
        let bytes = match collected {
            Ok(Collected::Complete(bytes)) => bytes,
            Ok(Collected::TooLarge(prefix, rest)) => {
                status.not_stored = Some(match over_budget {
                    true => NotStorable::InflightLimit,
                    false => NotStorable::TooLarge,
                });
                let body = reserved.hold(body::boxed(PrefixedBody { prefix, rest }));
                if let Some(guard) = guard {
                    guard.finish(FlightOutcome::Uncacheable);
                }
                return (status, Ok(Response::from_parts(parts, body)));
            }
            // The body failed (stalled, or broke off): a failed fetch, for which a stored
            // response usable under stale-if-error stands in, as for a failure before the
            // headers.
            Err(err) => {
                // Judged again now: the body may have trickled in past the stale window.
                let now = self.clock.now();
                if let Some(s) = stale.filter(|s| s.usable_if_error(now)) {
                    return self.serve_stale(s, &client, now);
                }
                let err = match find_cause::<BodyTimedOut>(err.as_ref()) {
                    Some(_) => GatewayError::UpstreamTimeout(self.wait_limit),
                    None => GatewayError::UpstreamUnreachable(err),
                };
                return (status, Err(err));
            }
        };
        let fresh = Arc::new(build_stored(
            parts.headers,
            bytes,
            &client,
            &config,
            request_time,
            now,
        ));
        status.stored = self.offer_to_fleet(&key, shared, &fresh, now).await
            && self.store.insert(&key, fresh.clone(), ticket).await;
        if let Some(guard) = guard {
            guard.finish(shared_with_waiters(status.stored, &fresh));
        }
        (
            status,
            Ok(serve(&fresh, &client, false, now).map(|body| reserved.hold(body))),
        )
    }

    /// For a `Range` request that found nothing under its own key: a stored response of the
    /// same path and query whose key differs only in `Accept-Encoding` and that is not
    /// content-coded, when the request accepts the identity coding. Clients (Node's fetch,
    /// browsers) ask for ranges with `Accept-Encoding: identity` after fetching the whole with
    /// `gzip, deflate`; an uncoded body is what they asked for, whatever the other key said.
    /// The candidate still passes the caller's Vary and freshness checks, never leaves the
    /// credential partition, and a path with more than [`IDENTITY_SCAN_LIMIT`] stored variants
    /// is not scanned (a miss goes upstream, as before).
    async fn identity_variant(&self, key: &CacheKey, names: &KeyHeaders) -> Option<Arc<Stored>> {
        // Line 0 of a representation key is the names' form.
        let ae = 1 + names.iter().position(|n| n == header::ACCEPT_ENCODING)?;
        let parts = |r: &[u8]| {
            r.split(|b| *b == b'\n')
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        let mine = parts(&key.variant.representation);
        if !rules::accepts_identity(mine.get(ae)?) {
            return None;
        }
        for variant in self
            .store
            .variants_of(&key.path, &key.variant.query, IDENTITY_SCAN_LIMIT)
        {
            let theirs = parts(&variant.representation);
            let same_but_coding = theirs.len() == mine.len()
                && theirs
                    .iter()
                    .zip(&mine)
                    .enumerate()
                    .all(|(i, (a, b))| i == ae || a == b);
            if !same_but_coding || variant == key.variant {
                continue;
            }
            let candidate = CacheKey {
                path: key.path.clone(),
                variant,
            };
            if let Some(s) = self.store.get(&candidate).await
                && !s.headers.contains_key(header::CONTENT_ENCODING)
            {
                return Some(s);
            }
        }
        None
    }

    /// Looks for `fill`'s key in the fleet's shared tier after a miss in memory. A fresh entry
    /// is kept in memory and served (`detail=shared`); a stale one becomes what the fetch
    /// revalidates. The versions read are kept in `fill` for offering the fill to Redis.
    async fn look_in_fleet(
        &self,
        fill: &mut Fill,
        headers: &HeaderMap,
        request_cc: &Directives,
    ) -> Option<Answer> {
        let fleet = self.fleet().filter(|f| f.config().shared_cache)?;
        let key = &fill.key;
        let variant = shared_variant(&key.variant);
        let lookup = fleet
            .lookup(&key.path.partition, &key.path.path, &variant)
            .await?;
        fill.shared = Some(lookup.versions);
        let data = lookup.data?;
        let Some(stored) = shared::decode(&data) else {
            tracing::warn!(path = %key.path.path, "ignored a shared cache entry that does not decode");
            return None;
        };
        if !stored.matches_vary(headers) {
            return None;
        }
        let stored = Arc::new(stored);
        let now = self.clock.now();
        if rules::fresh_enough(
            stored.age(now),
            stored.lifetime,
            request_cc,
            stored.forbids_stale,
        ) {
            let mut status = CacheStatus::hit(stored.ttl(now));
            status.shared = true;
            self.store.insert(key, stored.clone(), fill.ticket).await;
            if let Some(guard) = fill.guard.take() {
                guard.finish(FlightOutcome::Stored(stored.clone()));
            }
            return Some((status, Ok(serve(&stored, headers, false, now))));
        }
        fill.stored = Some(stored);
        fill.forward = Forward::Stale;
        fill.from_shared = true;
        None
    }

    /// Offers a fill to the fleet's shared tier under the versions read before it began.
    /// Returns `false` only when Redis refused it because a write covered its path since (the
    /// fill may predate that write, so memory must not keep it either); a link that is down,
    /// an object over `fleet.max_shared_object_size` or no fleet at all is no reason not to
    /// keep it in memory.
    async fn offer_to_fleet(
        &self,
        key: &CacheKey,
        versions: Option<fleet::Versions>,
        stored: &Stored,
        now: SystemTime,
    ) -> bool {
        let (Some(fleet), Some(versions)) = (self.fleet(), versions) else {
            return true;
        };
        if stored.body.len() as u64 > fleet.config().max_shared_object_size {
            return true;
        }
        let stored_there = fleet
            .store(
                &key.path.partition,
                &key.path.path,
                &shared_variant(&key.variant),
                versions,
                shared::encode(stored),
                shared::useful_for(stored, now),
            )
            .await;
        stored_there != Some(false)
    }

    fn serve_stale(&self, stale: &Stored, client: &HeaderMap, now: SystemTime) -> Answer {
        let mut status = CacheStatus::hit(stale.ttl(now));
        status.stale_if_error = true;
        (status, Ok(serve(stale, client, false, now)))
    }
}

/// What a fill hands the requests waiting on it: what it stored, or, when it was refused (a
/// write covered the path while the fill was under way, here or on another replica), nothing:
/// the waiters ask on their own rather than take what may predate the write.
fn shared_with_waiters(stored: bool, response: &Arc<Stored>) -> FlightOutcome {
    match stored {
        true => FlightOutcome::Stored(response.clone()),
        false => FlightOutcome::Uncacheable,
    }
}

/// The form of the representation key in shared-tier keys. Replicas of an older form keyed
/// `Accept` normalized (lower case, no whitespace), which let a spaced `application/ xml` store
/// JSON where XML readers look: a new form never reads what an older one stored (those entries
/// expire unread), so a rolling upgrade cannot carry such an entry over.
/// Form `r3` keys start with the key headers' form (see `KeyHeaders`), so replicas whose
/// `cache.key_headers` differ (a configuration rolling out) never read each other's variants.
const SHARED_VARIANT_FORM: &[u8] = b"r3\0";

/// A variant as the shared tier keys it: the form, the query and the key headers' values.
fn shared_variant(variant: &VariantKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        SHARED_VARIANT_FORM.len() + variant.query.len() + 1 + variant.representation.len(),
    );
    out.extend_from_slice(SHARED_VARIANT_FORM);
    out.extend_from_slice(variant.query.as_bytes());
    out.push(0);
    out.extend_from_slice(&variant.representation);
    out
}

/// Applies other replicas' invalidations to this replica's memory.
struct FleetListener(std::sync::Weak<ResponseCache>);

impl fleet::Listener for FleetListener {
    fn invalidate(
        &self,
        partition: crate::secrets::token::Fingerprint,
        exact: Vec<String>,
        roots: Vec<String>,
    ) -> BoxFuture<'static, ()> {
        let cache = self.0.clone();
        Box::pin(async move {
            if let Some(cache) = cache.upgrade() {
                cache.store.invalidate(partition, &exact, &roots).await;
            }
        })
    }

    fn resync(&self) -> BoxFuture<'static, ()> {
        let cache = self.0.clone();
        Box::pin(async move {
            if let Some(cache) = cache.upgrade() {
                cache.store.purge_prefix("").await;
            }
        })
    }
}

/// The path of a `Location`-style header value (relative or absolute).
fn location_path(value: &HeaderValue) -> Option<String> {
    let uri: http::Uri = value.to_str().ok()?.parse().ok()?;
    let path = uri.path();
    path.starts_with('/').then(|| path.to_string())
}

/// Joins repeated key headers into one line (RFC 9110 §5.3: the same meaning), so that the
/// upstream sees what the cache keyed on: Werkzeug keeps only the last of repeated lines, and
/// two `Accept` lines would otherwise be keyed as both but rendered as one.
fn collapse_key_headers(names: &[HeaderName], headers: &mut HeaderMap) {
    for name in names {
        let mut values = headers.get_all(name).iter();
        if values.next().is_some()
            && values.next().is_some()
            && let Some(joined) = rules::join_values(headers, name)
        {
            headers.insert(name.clone(), joined);
        }
    }
}

/// What a write to `path` invalidates: the subtree of the collection it names
/// (`/api/v1/usergroups/ID/...` and `/api/v1/usergroups` → `/api/v1/usergroups`), or, outside
/// `/api/v1/<collection>`, the path's own subtree; and, exactly, the parent of that root.
fn invalidation_scope(path: &str) -> (&str, &str) {
    let root = match crate::http::resource::Resource::parse(path) {
        // `/api/v1/<collection>`, a prefix of the path itself.
        Some(r) => &path[.."/api/v1/".len() + r.collection.len()],
        None => path.trim_end_matches('/'),
    };
    let root = if root.is_empty() { "/" } else { root };
    (root, parent(root))
}

/// The collection a resource belongs to: `/api/v1/usergroups/ID` → `/api/v1/usergroups`.
fn parent(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &trimmed[..i],
    }
}

fn build_stored(
    mut headers: HeaderMap,
    body: Bytes,
    client: &HeaderMap,
    config: &CacheConfig,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Stored {
    let directives = Directives::parse(&headers);
    let initial_age = rules::initial_age(&headers, request_time, response_time);
    // Age is recomputed on every response served from the cache.
    headers.remove(header::AGE);
    let (etag, upstream_etag) = match headers.get(header::ETAG) {
        Some(e) => (e.clone(), true),
        None => {
            let digest = Sha256::digest(&body);
            let tag = format!("\"cc-{}\"", hex::encode(&digest[..16]));
            (
                HeaderValue::from_str(&tag).expect("hex is a valid header value"),
                false,
            )
        }
    };
    let etag = detach_value(&etag);
    let vary = rules::vary_values(&rules::vary_names(&headers), client)
        .into_iter()
        .map(|(name, value)| (name, value.as_ref().map(detach_value)))
        .collect();
    Stored {
        vary,
        lifetime: rules::freshness_lifetime(&headers, &directives, config.fresh_for),
        stale_if_error: config
            .stale_if_error
            .max(Duration::from_secs(directives.stale_if_error.unwrap_or(0))),
        stale_while_revalidate: config.stale_while_revalidate.max(Duration::from_secs(
            directives.stale_while_revalidate.unwrap_or(0),
        )),
        forbids_stale: directives.forbids_stale(),
        headers: detach_headers(&headers),
        body,
        etag,
        upstream_etag,
        response_time,
        initial_age,
    }
}

/// A copy of a header value that owns exactly its bytes: hyper's values are slices of its read
/// buffers, and a stored slice would keep the whole buffer (kilobytes) alive as long as the entry.
fn detach_value(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).expect("already a valid value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

fn detach_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        copy.append(name.clone(), detach_value(value));
    }
    copy
}

/// A stored response updated with a 304's headers (RFC 9111 §4.3.4).
fn revalidated(
    old: &Stored,
    update: &HeaderMap,
    config: &CacheConfig,
    request_time: SystemTime,
    now: SystemTime,
) -> Stored {
    let mut headers = old.headers.clone();
    for name in update.keys() {
        if rules::keep_on_update(name) {
            continue;
        }
        headers.remove(name);
        for value in update.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut fresh = build_stored(
        headers,
        old.body.clone(),
        &HeaderMap::new(),
        config,
        request_time,
        now,
    );
    fresh.vary = old.vary.clone();
    fresh.etag = old.etag.clone();
    fresh.upstream_etag = old.upstream_etag;
    fresh
}

/// A response from a stored one: 304 when the client's conditional matches, else 200 (with no
/// body for HEAD).
fn serve(stored: &Stored, client: &HeaderMap, head: bool, now: SystemTime) -> Response<Body> {
    let age = HeaderValue::from(stored.age(now).as_secs());
    if rules::not_modified(
        client,
        Some(&stored.etag),
        stored.headers.get(header::LAST_MODIFIED),
    ) {
        let mut response = Response::new(body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in &rules::NOT_MODIFIED_HEADERS {
            for value in stored.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(header::ETAG, stored.etag.clone());
        headers.insert(header::AGE, age);
        return response;
    }
    let mut response = Response::new(if head {
        body::empty()
    } else {
        body::full(stored.body.clone())
    });
    // Only 200 responses are stored. (Measured with callgrind: cloning and letting the first
    // insert grow the map is cheaper than building a map with room, and spare room in every
    // stored map would cost memory per entry.)
    let headers = response.headers_mut();
    *headers = stored.headers.clone();
    headers.insert(header::ETAG, stored.etag.clone());
    headers.insert(header::AGE, age);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.body.len()));
    response
}

/// A `Range` request answered from a stored complete 200 (RFC 9110 §14): one satisfiable
/// byte range gets 206 with `Content-Range`; several ranges, or a range the parser does not take,
/// get the whole 200 (which §14.2 allows); a range that starts past the end gets 416. An
/// `If-Range` that does not match the stored response strongly (its own strong ETag, or its
/// exact `Last-Modified`) gets the whole 200, as does a client conditional that says 304.
fn serve_range(stored: &Stored, client: &HeaderMap, now: SystemTime) -> Response<Body> {
    let whole = || serve(stored, client, false, now);
    if rules::not_modified(
        client,
        Some(&stored.etag),
        stored.headers.get(header::LAST_MODIFIED),
    ) {
        return whole();
    }
    if let Some(if_range) = client.get(header::IF_RANGE)
        && !if_range_matches(if_range, stored)
    {
        return whole();
    }
    let Some(range) = client.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return whole();
    };
    let len = stored.body.len() as u64;
    let (start, end) = match rules::byte_range(range, len) {
        rules::ByteRange::Whole => return whole(),
        rules::ByteRange::Part { start, end } => (start, end),
        rules::ByteRange::Unsatisfiable => {
            let mut response = Response::new(body::empty());
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ASCII"),
            );
            headers.insert(header::ETAG, stored.etag.clone());
            return response;
        }
    };
    let mut response = whole();
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    // `byte_range` keeps both bounds within the body.
    let part = stored.body.slice(start as usize..=end as usize);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).expect("ASCII"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len()));
    *response.body_mut() = body::full(part);
    response
}

/// Whether `If-Range` names the stored response: its ETag, compared strongly (a weak one never
/// matches), or its `Last-Modified`, exactly.
fn if_range_matches(if_range: &HeaderValue, stored: &Stored) -> bool {
    let value = if_range.as_bytes();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        !stored.etag.as_bytes().starts_with(b"W/") && value == stored.etag.as_bytes()
    } else {
        stored.headers.get(header::LAST_MODIFIED) == Some(if_range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves.
    #[derive(Debug)]
    struct ManualClock(std::sync::Mutex<SystemTime>);

    impl ManualClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    /// A cache with a manual clock over an upstream that answers `cache_control` with an ETag,
    /// 304 to a matching `If-None-Match`, or 503 once told to fail.
    struct Harness {
        cache: Arc<ResponseCache>,
        clock: Arc<ManualClock>,
        calls: Arc<std::sync::atomic::AtomicUsize>,
        failing: Arc<std::sync::atomic::AtomicBool>,
        service: Cache,
        source: Arc<crate::secrets::token::TokenSource>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn new(cache_control: &'static str, extra: &str) -> Self {
            use crate::config::{Config, Overrides};
            use crate::secrets::token::{FingerprintKey, TokenSource};
            let config = Config::from_raw(
                Config::parse(&format!("[token]\nfile = \"/t\"\n{extra}")).unwrap(),
                &Overrides::default(),
            )
            .unwrap();
            let clock = Arc::new(ManualClock(std::sync::Mutex::new(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            )));
            let cache = Arc::new(ResponseCache::with_clock(
                config.cache.clone(),
                Duration::from_secs(1),
                clock.clone(),
            ));
            let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let upstream = {
                let (calls, failing, clock) = (calls.clone(), failing.clone(), clock.clone());
                tower::service_fn(move |req: Request<Body>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let date = httpdate::fmt_http_date(clock.now());
                    let revalidated = req
                        .headers()
                        .get(header::IF_NONE_MATCH)
                        .is_some_and(|v| v == "\"v1\"");
                    let response = if failing.load(Ordering::SeqCst) {
                        Response::builder().status(503).body(body::empty())
                    } else {
                        Response::builder()
                            .status(if revalidated { 304 } else { 200 })
                            .header(header::ETAG, "\"v1\"")
                            .header(header::DATE, &date)
                            .header(header::CACHE_CONTROL, cache_control)
                            .body(if revalidated {
                                body::empty()
                            } else {
                                body::full("{}")
                            })
                    };
                    std::future::ready(Ok::<_, GatewayError>(response.unwrap()))
                })
            };
            let service = CacheLayer::new(Some(cache.clone())).layer(upstream);
            let dir = tempfile::tempdir().unwrap();
            let token = dir.path().join("token");
            std::fs::write(&token, "t").unwrap();
            let source = Arc::new(TokenSource::new(
                "default",
                crate::config::TokenOrigin::File(token),
                FingerprintKey::random(),
            ));
            Self {
                cache,
                clock,
                calls,
                failing,
                service,
                source,
                _dir: dir,
            }
        }

        async fn get(&mut self) -> Response<Body> {
            let mut req = Request::get("/api/v1/usergroups/1")
                .body(body::empty())
                .unwrap();
            req.extensions_mut()
                .insert(SelectedCredential(self.source.clone()));
            self.service.call(req).await.unwrap()
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn outcomes(&self, outcome: CacheOutcome) -> u64 {
            self.cache.store().stats.outcomes(outcome)
        }
    }

    /// Freshness, revalidation and the stale-if-error window, by the clock the cache is given:
    /// no sleeping.
    #[tokio::test]
    async fn freshness_and_stale_if_error_follow_the_injected_clock() {
        let mut h = Harness::new("max-age=60, stale-if-error=30", "");
        assert_eq!(h.get().await.status(), StatusCode::OK);
        assert_eq!(h.outcomes(CacheOutcome::Miss), 1);
        h.clock.advance(Duration::from_secs(59));
        assert_eq!(h.get().await.status(), StatusCode::OK);
        assert_eq!(h.outcomes(CacheOutcome::Hit), 1, "fresh at 59 s");
        assert_eq!(h.calls(), 1);
        h.clock.advance(Duration::from_secs(2));
        assert_eq!(h.get().await.status(), StatusCode::OK);
        assert_eq!(
            h.outcomes(CacheOutcome::Revalidated),
            1,
            "stale at 61 s: revalidated"
        );
        assert_eq!(h.calls(), 2);
        // The 304 made it fresh again for 60 s; past that, with the upstream failing, it may
        // stand in for 30 s more.
        h.failing.store(true, Ordering::SeqCst);
        h.clock.advance(Duration::from_secs(60 + 20));
        assert_eq!(h.get().await.status(), StatusCode::OK);
        assert_eq!(
            h.outcomes(CacheOutcome::Stale),
            1,
            "20 s into stale-if-error"
        );
        h.clock.advance(Duration::from_secs(15));
        assert_eq!(
            h.get().await.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "35 s past freshness: beyond stale-if-error"
        );
    }

    /// Waits (bounded) for the upstream to have been called `n` times.
    async fn calls_reach(h: &Harness, n: usize) {
        for _ in 0..500 {
            if h.calls() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the upstream was called {} times, not {n}", h.calls());
    }

    /// stale-while-revalidate (RFC 5861): inside the window the stale response is served at
    /// once and one background request revalidates it; past it, the request waits for the
    /// upstream. The window is the larger of the response's and `cache.stale_while_revalidate`.
    #[tokio::test]
    async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
        let mut h = Harness::new("max-age=60, stale-while-revalidate=30", "");
        h.get().await;
        h.clock.advance(Duration::from_secs(70));
        let served = h.get().await;
        assert_eq!(served.status(), StatusCode::OK);
        assert_eq!(h.outcomes(CacheOutcome::Stale), 1);
        calls_reach(&h, 2).await;
        // The background 304 refreshed it: fresh again.
        h.get().await;
        assert_eq!(h.outcomes(CacheOutcome::Hit), 1);
        assert_eq!(h.calls(), 2);
        // Past freshness and the window: a revalidation the client waits for.
        h.clock.advance(Duration::from_secs(60 + 31));
        h.get().await;
        assert_eq!(h.outcomes(CacheOutcome::Revalidated), 1);
        assert_eq!(h.outcomes(CacheOutcome::Stale), 1);

        // Off without the directive or the setting; the setting alone turns it on.
        let mut off = Harness::new("max-age=60", "");
        off.get().await;
        off.clock.advance(Duration::from_secs(70));
        off.get().await;
        assert_eq!(off.outcomes(CacheOutcome::Stale), 0);
        let mut on = Harness::new("max-age=60", "[cache]\nstale_while_revalidate = \"30s\"");
        on.get().await;
        on.clock.advance(Duration::from_secs(70));
        on.get().await;
        assert_eq!(on.outcomes(CacheOutcome::Stale), 1);
        calls_reach(&on, 2).await;
    }

    /// One outcome per request: the label (audit, spans, metrics), the header and the counters
    /// the admin endpoint and metrics read all say the same thing, for every outcome.
    #[tokio::test]
    async fn every_outcome_agrees_across_header_label_and_counters() {
        use crate::config::{Config, Overrides};
        let config = Config::from_raw(
            Config::parse("[token]\nfile = \"/t\"\n").unwrap(),
            &Overrides::default(),
        )
        .unwrap();
        let examples = |outcome: CacheOutcome| -> Vec<CacheStatus> {
            let with = |mut s: CacheStatus, f: &dyn Fn(&mut CacheStatus)| {
                f(&mut s);
                s
            };
            match outcome {
                CacheOutcome::Hit => vec![CacheStatus::hit(5)],
                CacheOutcome::Collapsed => {
                    vec![with(CacheStatus::forward(Forward::UriMiss), &|s| {
                        s.collapsed = true
                    })]
                }
                CacheOutcome::Revalidated => [Forward::Stale, Forward::Request]
                    .into_iter()
                    .map(|f| with(CacheStatus::forward(f), &|s| s.fwd_status = Some(304)))
                    .collect(),
                CacheOutcome::Miss => [Forward::UriMiss, Forward::VaryMiss, Forward::Request]
                    .into_iter()
                    .flat_map(|f| {
                        [
                            with(CacheStatus::forward(f), &|s| s.fwd_status = Some(200)),
                            with(CacheStatus::forward(f), &|s| s.stored = true),
                            CacheStatus::forward(f),
                        ]
                    })
                    .chain([with(CacheStatus::forward(Forward::Stale), &|s| {
                        s.fwd_status = Some(200)
                    })])
                    .collect(),
                CacheOutcome::Stale => vec![
                    with(CacheStatus::hit(-3), &|s| s.stale_if_error = true),
                    with(CacheStatus::hit(-3), &|s| s.stale_while_revalidate = true),
                ],
                CacheOutcome::Bypass => vec![
                    CacheStatus::forward(Forward::Bypass),
                    CacheStatus::forward(Forward::Method),
                ],
            }
        };
        for outcome in CacheOutcome::ALL {
            for status in examples(outcome) {
                assert_eq!(status.outcome(), outcome, "{status:?}");
                assert_eq!(status.label(), outcome.as_str());
                let header = status.header_value();
                let header = header.to_str().unwrap();
                let says = match outcome {
                    CacheOutcome::Hit => header.contains("; hit") && !header.contains("detail="),
                    CacheOutcome::Collapsed => {
                        header.contains("; collapsed") && !header.contains("fwd-status=")
                    }
                    CacheOutcome::Revalidated => header.contains("fwd-status=304"),
                    CacheOutcome::Miss => {
                        header.contains("; fwd=")
                            && !header.contains("fwd=method")
                            && !header.contains("fwd=bypass")
                            && !header.contains("; collapsed")
                            && !header.contains("fwd-status=304")
                    }
                    CacheOutcome::Stale => {
                        header.contains("; hit; detail=stale-if-error")
                            || header.contains("; fwd=stale; detail=stale-while-revalidate")
                    }
                    CacheOutcome::Bypass => {
                        header.contains("fwd=method") || header.contains("fwd=bypass")
                    }
                };
                assert!(says, "{outcome:?}: {header}");
            }
            // Counted once, in its own counter, which the admin figures and metrics read.
            let cache = ResponseCache::new(config.cache.clone(), Duration::from_secs(1));
            cache.store.stats.count(outcome);
            let snap = cache.snapshot();
            let expect = |o: CacheOutcome| u64::from(o == outcome);
            for o in CacheOutcome::ALL {
                assert_eq!(
                    cache.store.stats.outcomes(o),
                    expect(o),
                    "{outcome:?} counted as {o:?}"
                );
            }
            assert_eq!(snap.hits, expect(CacheOutcome::Hit));
            assert_eq!(snap.misses, expect(CacheOutcome::Miss));
            assert_eq!(snap.revalidations, expect(CacheOutcome::Revalidated));
            assert_eq!(snap.stale_served, expect(CacheOutcome::Stale));
        }
    }

    #[test]
    fn writes_invalidate_the_collections_subtree() {
        let scope = invalidation_scope;
        assert_eq!(
            scope("/api/v1/usergroups/624e/"),
            ("/api/v1/usergroups", "/api/v1")
        );
        assert_eq!(
            scope("/api/v1/usergroups"),
            ("/api/v1/usergroups", "/api/v1")
        );
        assert_eq!(scope("/other/x/"), ("/other/x", "/other"));
        assert_eq!(scope("/"), ("/", "/"));
    }

    #[test]
    fn parents() {
        assert_eq!(parent("/api/v1/usergroups/624e"), "/api/v1/usergroups");
        assert_eq!(parent("/api/v1/usergroups/"), "/api/v1");
        assert_eq!(parent("/x"), "/");
    }

    #[test]
    fn location_paths() {
        assert_eq!(
            location_path(&HeaderValue::from_static(
                "https://api.cloudcasa.io/api/v1/a/1"
            ))
            .as_deref(),
            Some("/api/v1/a/1")
        );
        assert_eq!(
            location_path(&HeaderValue::from_static("/api/v1/a/2?x")).as_deref(),
            Some("/api/v1/a/2")
        );
        assert_eq!(location_path(&HeaderValue::from_static("relative")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn late_invalidations_are_one_per_root_and_bounded() {
        let h = Harness::new("max-age=60", "");
        let partition = crate::secrets::token::FingerprintKey::random().fingerprint(b"t");
        let pending = || h.cache.late.lock().unwrap().len();
        let pending_at_root =
            |p: Fingerprint| h.cache.late.lock().unwrap().contains_key(&(p, "/".into()));
        // Many failed writes to one collection: one pending invalidation, one timer.
        for i in 0..1000 {
            h.cache
                .schedule_late(partition, &format!("/api/v1/usergroups/{i}"));
        }
        assert_eq!(pending(), 1);
        // A root longer than it keeps (a client-made path) is merged into its partition's root.
        let other = crate::secrets::token::FingerprintKey::random().fingerprint(b"u");
        h.cache
            .schedule_late(other, &format!("/{}", "x".repeat(LATE_ROOT_MAX)));
        assert!(pending_at_root(other));
        assert_eq!(pending(), 2);
        // Distinct roots (paths outside the collections are their own roots): bounded, the
        // rest merged into the partition's root.
        for i in 0..2 * LATE_PENDING_MAX {
            h.cache.schedule_late(partition, &format!("/other/{i}"));
        }
        assert_eq!(pending(), LATE_PENDING_MAX + 1);
        assert!(pending_at_root(partition));
        // Each runs once it is due (one upstream timeout on), and is gone.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_late_invalidations_run_at_once_and_are_awaited() {
        let h = Harness::new("max-age=60", "");
        let partition = crate::secrets::token::FingerprintKey::random().fingerprint(b"t");
        let pending = || h.cache.late.lock().unwrap().len();
        h.cache.schedule_late(partition, "/api/v1/usergroups/1");
        h.cache.schedule_late(partition, "/api/v1/kubeclusters/1");
        assert_eq!(pending(), 2);
        // Due one upstream timeout (1 s) on; shutdown does not wait for that. (Paused, the
        // clock moves only when every task waits: a late invalidation still waiting for its
        // time would let the limit pass first.)
        let start = tokio::time::Instant::now();
        let left = h.cache.finish_background(Duration::from_millis(100)).await;
        assert_eq!(left, 0, "every background invalidation finished");
        assert_eq!(pending(), 0);
        assert!(start.elapsed() < Duration::from_millis(100));
        // From then on a failed write's invalidation is its last: nothing is left pending.
        h.cache.schedule_late(partition, "/api/v1/usergroups/2");
        assert_eq!(pending(), 0);
    }
}
