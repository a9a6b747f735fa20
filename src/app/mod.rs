//! The gateway assembled: the proxy stack, top to bottom, and the start-up sequence.
//!
//! Read [`Gateway::proxy_stack`] to follow a request through the gateway.

pub mod admin;
pub mod check;
pub mod server;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceBuilder};

use crate::config::{AuditSink, Config, ConfigError, Overrides};
use crate::fleet::{Fleet, FleetSetupError};
use crate::http::body::Body;
use crate::layers::audit_intent::AuditIntentLayer;
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::cache::{CacheLayer, ResponseCache};
use crate::layers::canonical::{CanonicalLayer, MethodRules};
use crate::layers::identity::api_keys::ApiKeys;
use crate::layers::identity::kubernetes::TokenReviewer;
use crate::layers::identity::{Authenticator, IdentityLayer};
use crate::layers::inject_token::InjectTokenLayer;
use crate::layers::observe::{ObserveLayer, Observers};
use crate::layers::policy::{CompiledPolicy, PolicyLayer, RuleSpec};
use crate::layers::request_id::SetRequestIdLayer;
use crate::layers::rescue::RescueLayer;
use crate::observability::audit::{AuditLog, AuditOpenError};
use crate::observability::metrics::Metrics;
use crate::observability::telemetry::{Telemetry, TelemetryError};
use crate::secrets::tls::ServerTls;
use crate::secrets::token::{FingerprintKey, TokenSource};
use crate::upstream::{Upstream, UpstreamSetupError};
use server::ServeOptions;

/// The credentials in force, shared by the policy, `/readyz` and the metrics.
pub type Credentials = Arc<ArcSwap<Vec<Arc<TokenSource>>>>;

/// The policy for `config`, bound to `credentials` (validation guarantees every rule's
/// credential is among them).
fn policy_for(
    config: &Config,
    credentials: &[Arc<TokenSource>],
    fleet: Option<Arc<Fleet>>,
) -> CompiledPolicy {
    let by_name: HashMap<String, Arc<TokenSource>> = credentials
        .iter()
        .map(|c| (c.credential().to_string(), c.clone()))
        .collect();
    let rules = match config.policy.is_empty() {
        true => vec![RuleSpec::allow_all(&config.credentials[0].name)],
        false => config.policy.clone(),
    };
    CompiledPolicy::new(rules, &by_name, fleet)
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The configuration file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file, or a file it names, is not valid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Applies a new configuration to a running gateway (SIGHUP): the `[[policy]]` rules and rates,
/// the credentials, the cache settings that can change in place (`fresh_for`,
/// `stale_if_error`, `key_headers`, `max_object_size`) and `log.level`, each swapped whole and
/// atomically, with no connection dropped. What cannot change without a restart (listeners,
/// TLS, client authentication, the upstream, audit, telemetry, the cache's size and budget,
/// limits and timeouts) is reported as such and keeps its running value.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<ReloaderInner>,
}

struct ReloaderInner {
    running: std::sync::Mutex<Config>,
    policy: Arc<ArcSwap<CompiledPolicy>>,
    credentials: Credentials,
    key: FingerprintKey,
    metrics: Arc<Metrics>,
    cache: Option<Arc<ResponseCache>>,
    fleet: Option<Arc<Fleet>>,
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sections applied.
    pub applied: Vec<&'static str>,
    /// Sections that changed but need a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Reloader {
    /// Records the hash of the configuration in force at start.
    pub fn started(&self, hash: &str) {
        self.inner.metrics.config.in_force(hash);
    }

    /// Reads, validates and applies the configuration file (the files it names are checked as
    /// `--check` does). On any problem nothing changes, the problem is logged and counted, and
    /// the error is returned.
    pub fn reload_from(
        &self,
        path: &Path,
        overrides: &Overrides,
    ) -> Result<ReloadReport, ReloadError> {
        let loaded = std::fs::read(path)
            .map_err(|source| ReloadError::Read {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|bytes| {
                let config = Config::load(Some(path), overrides)?;
                let live_audit = {
                    let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
                    match (&running.audit.enabled, &running.audit.sink) {
                        (true, AuditSink::File(path)) => Some(path.clone()),
                        _ => None,
                    }
                };
                check::check_files(&config, live_audit.as_deref())?;
                Ok((config, config_hash(&bytes)))
            });
        match loaded {
            Ok((config, hash)) => {
                let report = self.apply(config);
                self.inner.metrics.config.reloaded(Some(&hash));
                tracing::info!(
                    hash,
                    applied = ?report.applied,
                    needs_restart = ?report.needs_restart,
                    "configuration reloaded"
                );
                Ok(report)
            }
            Err(e) => {
                self.inner.metrics.config.reloaded(None);
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
                Err(e)
            }
        }
    }

    /// Applies an already validated configuration.
    pub fn apply(&self, new: Config) -> ReloadReport {
        let inner = &*self.inner;
        let mut running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = ReloadReport::default();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        // Credentials: unchanged ones keep their token source (and its watcher); new ones start.
        let credentials_changed = running.credentials != new.credentials;
        if credentials_changed {
            let old = inner.credentials.load_full();
            let next: Vec<Arc<TokenSource>> = new
                .credentials
                .iter()
                .map(|c| {
                    let kept = running
                        .credentials
                        .iter()
                        .zip(old.iter())
                        .find(|(was, _)| *was == c)
                        .map(|(_, source)| source.clone());
                    kept.unwrap_or_else(|| {
                        let source = Arc::new(TokenSource::new(
                            c.name.clone(),
                            c.origin.clone(),
                            inner.key.clone(),
                        ));
                        source.spawn_watcher();
                        source
                    })
                })
                .collect();
            inner.credentials.store(Arc::new(next));
            report.applied.push("credentials");
        }
        if credentials_changed || differs(&running.policy, &new.policy) {
            let policy = policy_for(&new, &inner.credentials.load(), inner.fleet.clone());
            inner.policy.store(Arc::new(policy));
            report.applied.push("policy");
        }
        // Every setting ResponseCache::reconfigure swaps: one left out here would be recorded as
        // running (below) without ever reaching the cache.
        let cache_in_place = |c: &crate::config::CacheConfig| {
            (
                c.fresh_for,
                c.stale_if_error,
                c.stale_while_revalidate,
                c.key_headers.clone(),
                c.max_object_size,
            )
        };
        if let Some(cache) = &inner.cache
            && cache_in_place(&running.cache) != cache_in_place(&new.cache)
        {
            cache.reconfigure(&new.cache);
            report.applied.push("cache");
        }
        let cache_fixed = |c: &crate::config::CacheConfig| (c.enabled, c.max_size, c.max_inflight);
        if cache_fixed(&running.cache) != cache_fixed(&new.cache) {
            report
                .needs_restart
                .push("cache (enabled, max_size, max_inflight)");
        }
        if running.log.level != new.log.level {
            match crate::observability::logging::set_level(&new.log.level) {
                Ok(()) => report.applied.push("log.level"),
                Err(e) => tracing::warn!(error = %e, "log.level could not be applied"),
            }
        }
        if running.log.format != new.log.format || running.log.color != new.log.color {
            report.needs_restart.push("log (format, color)");
        }
        let fixed: [(&'static str, bool); 7] = [
            ("fleet", running.fleet != new.fleet),
            ("server", differs(&running.server, &new.server)),
            ("admin", differs(&running.admin, &new.admin)),
            ("upstream", differs(&running.upstream, &new.upstream)),
            ("clients", differs(&running.clients, &new.clients)),
            ("audit", differs(&running.audit, &new.audit)),
            ("telemetry", differs(&running.telemetry, &new.telemetry)),
        ];
        for (section, changed) in fixed {
            if changed {
                report.needs_restart.push(section);
            }
        }
        for section in &report.needs_restart {
            tracing::warn!(
                section,
                "changed in the configuration file, but needs a restart"
            );
        }
        // What runs now is the new file, less what needs a restart.
        let mut next = new;
        next.server = running.server.clone();
        next.admin = running.admin.clone();
        next.upstream = running.upstream.clone();
        next.clients = running.clients.clone();
        next.audit = running.audit.clone();
        next.telemetry = running.telemetry.clone();
        next.fleet = running.fleet.clone();
        next.cache.enabled = running.cache.enabled;
        next.cache.max_size = running.cache.max_size;
        next.cache.max_inflight = running.cache.max_inflight;
        next.log.format = running.log.format;
        next.log.color = running.log.color;
        *running = next;
        report
    }
}

/// The hash `config_info` reports: SHA-256 of the file's bytes, 16 hex digits.
pub fn config_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// The least time given at shutdown to the cache's background invalidations (with `[fleet]`:
/// twice `fleet.timeout` if more), after the drain.
const BACKGROUND_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// State shared by the proxy stack and the admin listener.
#[derive(Debug)]
pub struct Shared {
    /// The CloudCasa credentials (sidecar mode: the one named `default`); a reload swaps them.
    pub credentials: Credentials,
    /// Set once shutdown begins; `/readyz` turns 503.
    pub draining: AtomicBool,
    /// The response cache, unless `cache.enabled = false`.
    pub cache: Option<Arc<ResponseCache>>,
    /// Traces, metrics and the audit trail.
    pub observers: Arc<Observers>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The config key naming the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    /// The audit sink could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditOpenError),
    /// The trace exporter could not be built.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The listener's TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::secrets::tls::TlsSetupError),
    /// The TokenReview client could not be built.
    #[error(transparent)]
    TokenReview(#[from] crate::layers::identity::kubernetes::ReviewerSetupError),
    /// The API keys file could not be loaded.
    #[error(transparent)]
    ApiKeys(#[from] crate::layers::identity::api_keys::ApiKeysError),
    /// `[fleet]` could not be set up.
    #[error(transparent)]
    Fleet(#[from] FleetSetupError),
}

/// A gateway with its listeners bound, ready to run.
pub struct Gateway {
    config: Config,
    proxy: TcpListener,
    admin: TcpListener,
    upstream: Upstream,
    shared: Arc<Shared>,
    tls: Option<Arc<ServerTls>>,
    authenticator: Arc<Authenticator>,
    policy: Arc<ArcSwap<CompiledPolicy>>,
    key: FingerprintKey,
    fleet: Option<Arc<Fleet>>,
}

/// A fleet member without a cache: other replicas' invalidations have nothing to apply to.
struct NoCache;

impl crate::fleet::Listener for NoCache {
    fn invalidate(
        &self,
        _: crate::secrets::token::Fingerprint,
        _: Vec<String>,
        _: Vec<String>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn resync(&self) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

impl Gateway {
    /// Start-up, in order: 1. build the tracer; 2. load the credentials (a missing token is
    /// tolerated) and the TLS files; 3. make the cache and the metrics, and build the upstream
    /// client (fails on a bad CA bundle); 4. load the client-authentication sources (these must
    /// load); 5. bind both listeners; 6. make the policy; 7. open the audit sink (fails if it
    /// cannot be opened).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let telemetry = Telemetry::new(&config.telemetry)?;
        // One key for all: two credentials holding the same token share a cache partition. In a
        // fleet, every replica derives the same key, so they share partitions in Redis.
        let key = match &config.fleet {
            Some(fleet) => {
                let secret = match &fleet.partition_key_file {
                    Some(path) => Some(crate::fleet::read_partition_key(path)?),
                    None => None,
                };
                FingerprintKey::fleet(secret.as_deref())
            }
            None => FingerprintKey::random(),
        };
        let credentials: Vec<Arc<TokenSource>> = config
            .credentials
            .iter()
            .map(|c| {
                Arc::new(TokenSource::new(
                    c.name.clone(),
                    c.origin.clone(),
                    key.clone(),
                ))
            })
            .collect();
        let tls = match &config.server.tls {
            Some(t) => Some(ServerTls::load(t)?),
            None => None,
        };
        let cache = config.cache.enabled.then(|| {
            Arc::new(ResponseCache::new(
                config.cache.clone(),
                config.upstream.timeout,
            ))
        });
        let credentials: Credentials = Arc::new(ArcSwap::from_pointee(credentials));
        let metrics = Arc::new(Metrics::new(
            credentials.clone(),
            cache
                .clone()
                .map(|c| c as Arc<dyn crate::observability::metrics::CacheGauges>),
            tls.clone(),
            telemetry.export_failures(),
        ));
        // Until `Reloader::started` names the file's hash (a configuration without a file has
        // none).
        metrics.config.in_force("none");
        let fleet = match &config.fleet {
            Some(f) => Some(Fleet::new(f.clone(), metrics.fleet.clone())?),
            None => None,
        };
        if let Some(fleet) = &fleet {
            match &cache {
                Some(cache) => cache.join_fleet(fleet.clone()),
                None => fleet.start(Arc::new(NoCache)),
            }
        }
        let upstream = Upstream::new(&config.upstream, telemetry.clone(), metrics.clone())?;
        let kubernetes = match &config.clients.kubernetes {
            Some(k) => Some(Arc::new(TokenReviewer::new(k)?)),
            None => None,
        };
        let api_keys = match &config.clients.api_keys {
            Some(path) => Some(ApiKeys::load(path)?),
            None => None,
        };
        let bind = |key, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let proxy = bind("server.listen", config.server.listen).await?;
        let admin = bind("admin.listen", config.admin.listen).await?;
        let policy = Arc::new(ArcSwap::from_pointee(policy_for(
            &config,
            &credentials.load(),
            fleet.clone(),
        )));
        let loopback = config.server.listen.ip().is_loopback();
        if !loopback && config.server.allow_unauthenticated {
            tracing::warn!(
                listen = %config.server.listen,
                "server.allow_unauthenticated = true: callers without credentials are let in as \
                 'anonymous' on a listener other hosts can reach"
            );
        }
        if !loopback && tls.is_none() && config.clients.any_bearer() {
            tracing::warn!(
                "clients authenticate with bearer credentials over clear text: configure \
                 [server.tls] unless a service mesh encrypts the connection"
            );
        }
        let client_auth = config.clients.any_bearer() || tls.as_ref().is_some_and(|t| t.mtls());
        let authenticator = Arc::new(Authenticator {
            local: loopback && !client_auth,
            allow_unauthenticated: config.server.allow_unauthenticated,
            kubernetes,
            api_keys,
        });
        let audit = match config.audit.enabled {
            true => {
                // The replica a fleet names, else this host's name (POD_NAME, the hostname).
                let replica = config
                    .fleet
                    .as_ref()
                    .map_or_else(crate::config::fleet::default_replica, |f| f.replica.clone());
                Some(AuditLog::open(
                    &config.audit,
                    &replica,
                    metrics.audit.clone(),
                )?)
            }
            false => None,
        };
        let observers = Arc::new(Observers {
            telemetry,
            metrics,
            audit,
        });
        Ok(Self {
            config,
            proxy,
            admin,
            upstream,
            tls,
            authenticator,
            policy,
            key,
            fleet,
            shared: Arc::new(Shared {
                credentials,
                draining: AtomicBool::new(false),
                cache,
                observers,
            }),
        })
    }

    /// The proxy listener's bound address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// What a reload (SIGHUP) can change in this gateway once it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            inner: Arc::new(ReloaderInner {
                running: std::sync::Mutex::new(self.config.clone()),
                policy: self.policy.clone(),
                credentials: self.shared.credentials.clone(),
                key: self.key.clone(),
                metrics: self.shared.observers.metrics.clone(),
                cache: self.shared.cache.clone(),
                fleet: self.fleet.clone(),
            }),
        }
    }

    /// The audit trail, for reopening its file on SIGHUP.
    pub fn audit(&self) -> Option<AuditLog> {
        self.shared.observers.audit.clone()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The request path, top to bottom. Each layer owns one concern.
    fn proxy_stack(
        &self,
    ) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let observers = &self.shared.observers;
        ServiceBuilder::new()
            // Last resort: a panic in the two layers above the inner rescue still becomes a 500.
            .layer(RescueLayer)
            // Every request gets an id, kept from the client when sane; echoed on the response.
            .layer(SetRequestIdLayer)
            // Trace context, server span, audit record, metrics: opened here, completed when the
            // response ends. Above everything that can refuse, so refusals are recorded too.
            .layer(ObserveLayer::new(observers.clone()))
            // Errors and panics below become CloudCasa-style error responses, here only.
            .layer(RescueLayer)
            // The request the upstream will execute: effective method (overrides resolved,
            // unknown methods refused), canonical path. Everything below judges this request.
            .layer(CanonicalLayer::new(MethodRules {
                allowed: self.config.server.methods.clone().into(),
                overrides: self.config.server.method_override,
            }))
            // Who is calling: client certificate, ServiceAccount token, API key, or `local`.
            .layer(IdentityLayer::new(self.authenticator.clone()))
            // Which rule allows it, with which credential, at what rate.
            .layer(PolicyLayer::new(self.policy.clone()))
            // Refuse oversized bodies before anything reads them; time out stalled ones.
            .layer(BodyLimitLayer::new(
                self.config.server.max_body_size,
                self.config.server.body_timeout,
            ))
            // Fail-closed auditing: a write goes on only once its intent record is on disk.
            .layer(AuditIntentLayer::new(observers.audit.clone()))
            // Reads from memory, revalidated by ETag; writes invalidate. Keyed by credential.
            .layer(CacheLayer::new(self.shared.cache.clone()))
            // Last: swap the client's credential for the CloudCasa token.
            .layer(InjectTokenLayer)
            .service(self.upstream.clone())
    }

    /// Runs until `shutdown` resolves, then drains in-flight requests (bounded by
    /// `server.drain_timeout`) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        for credential in self.shared.credentials.load().iter() {
            credential.spawn_watcher();
        }
        if let Some(tls) = &self.tls {
            tls.spawn_watcher();
        }
        if let Some(keys) = &self.authenticator.api_keys {
            keys.spawn_watcher();
        }
        let policy = self.policy.clone();
        let forget = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                policy.load().forget_idle_clients();
            }
        });
        let server = &self.config.server;
        let options = ServeOptions {
            header_timeout: server.header_timeout,
            drain_timeout: server.drain_timeout,
            idle_timeout: server.idle_timeout,
            max_connections: server.max_connections,
            h2_keepalive_interval: server.h2_keepalive_interval,
            h2_keepalive_timeout: server.h2_keepalive_timeout,
            send_timeout: server.send_timeout,
            h2_stall_timeout: server.h2_stall_timeout,
        };
        let connections = &self.shared.observers.metrics.connections;
        let (stop_proxy, proxy_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let stack = self.proxy_stack();
        let proxy = tokio::spawn(server::serve(
            "proxy",
            self.proxy,
            stack,
            options,
            self.tls.clone(),
            proxy_stopped,
            connections.listener("proxy"),
        ));
        let shared = self.shared.clone();
        let admin_service = tower::service_fn(move |req| admin::handle(shared.clone(), req));
        let admin = tokio::spawn(server::serve(
            "admin",
            self.admin,
            admin_service,
            ServeOptions {
                // Probes and scrapes: a few at a time. A flood here cannot starve the proxy.
                max_connections: ADMIN_MAX_CONNECTIONS,
                ..options
            },
            None,
            admin_stopped,
            connections.listener("admin"),
        ));

        shutdown.await;
        // Not ready at once, still accepting for shutdown_delay: endpoint removal reaches the
        // Service's clients and proxies meanwhile, and a connection made then is served.
        self.shared.draining.store(true, Ordering::Release);
        if !self.config.server.shutdown_delay.is_zero() {
            tracing::info!(
                delay = %humantime::format_duration(self.config.server.shutdown_delay),
                "shutting down: not ready, still accepting connections"
            );
            tokio::time::sleep(self.config.server.shutdown_delay).await;
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_proxy.send(true);
        let _ = proxy.await;
        // No request is left: the invalidations they started apart from themselves (writes
        // whose clients went away, the late second ones) are run and awaited now, so that other
        // replicas hear of them. Each is one Redis call bounded by `fleet.timeout`.
        if let Some(cache) = &self.shared.cache {
            let limit = self
                .config
                .fleet
                .as_ref()
                .map_or(std::time::Duration::ZERO, |fleet| 2 * fleet.timeout)
                .max(BACKGROUND_LIMIT);
            cache.finish_background(limit).await;
        }
        // The admin listener outlives the drain so probes can watch it happen.
        let _ = stop_admin.send(true);
        let _ = admin.await;
        forget.abort();
        if let Some(audit) = &self.shared.observers.audit {
            match audit.flush().await {
                Ok(head) => tracing::info!(head = %head, "audit trail flushed"),
                Err(why) => tracing::error!(
                    "audit trail could not be flushed at shutdown ({why}): records still queued are lost"
                ),
            }
        }
        let telemetry = self.shared.observers.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || {
            telemetry.shutdown(std::time::Duration::from_secs(5))
        })
        .await;
        tracing::info!("stopped");
    }
}
