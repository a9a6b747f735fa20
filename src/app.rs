//! The gateway assembled: the proxy stack, top to bottom, and the start-up sequence.
//!
//! Read [`Gateway::proxy_stack`] to follow a request through the gateway.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceBuilder};

use crate::audit::{AuditIntentLayer, AuditLog, AuditOpenError};
use crate::body::Body;
use crate::cache::{Cache, CacheLayer};
use crate::config::Config;
use crate::credential::{InjectTokenLayer, SelectCredentialLayer};
use crate::limits::BodyLimitLayer;
use crate::metrics::Metrics;
use crate::observe::{ObserveLayer, Observers};
use crate::request_id::RequestIdLayer;
use crate::rescue::RescueLayer;
use crate::server::{self, ServeOptions};
use crate::telemetry::{Telemetry, TelemetryError};
use crate::token::{FingerprintKey, TokenSource};
use crate::upstream::{Upstream, UpstreamSetupError};

/// State shared by the proxy stack and the admin listener.
#[derive(Debug)]
pub struct Shared {
    /// The credential in use (sidecar mode: the one named `default`).
    pub token: Arc<TokenSource>,
    /// Set once shutdown begins; `/readyz` turns 503.
    pub draining: AtomicBool,
    /// The response cache, unless `cache.enabled = false`.
    pub cache: Option<Arc<Cache>>,
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
}

/// A gateway with its listeners bound, ready to run.
pub struct Gateway {
    config: Config,
    proxy: TcpListener,
    admin: TcpListener,
    upstream: Upstream,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Start-up, in order: 1. build the upstream client (fails on a bad CA bundle) and the
    /// tracer; 2. load the token (a missing one is tolerated); 3. bind both listeners; 4. make
    /// the cache and the metrics; 5. open the audit sink (fails if it cannot be opened).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let upstream = Upstream::new(&config.upstream)?;
        let telemetry = Telemetry::new(&config.telemetry)?;
        let token = Arc::new(TokenSource::new(
            "default",
            config.token.origin.clone(),
            FingerprintKey::random(),
        ));
        let bind = |key, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let proxy = bind("server.listen", config.server.listen).await?;
        let admin = bind("admin.listen", config.admin.listen).await?;
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(Cache::new(config.cache.clone(), config.upstream.timeout)));
        let metrics = Arc::new(Metrics::new(vec![token.clone()], cache.clone()));
        let audit = match config.audit.enabled {
            true => Some(AuditLog::open(&config.audit, metrics.audit.clone())?),
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
            shared: Arc::new(Shared {
                token,
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
            // Every request gets an id, kept from the client when sane; echoed on the response.
            .layer(RequestIdLayer)
            // Trace context, server span, audit record, metrics: opened here, completed when the
            // response ends. Above everything that can refuse, so refusals are recorded too.
            .layer(ObserveLayer::new(observers.clone()))
            // Errors and panics below become CloudCasa-style error responses, here only.
            .layer(RescueLayer)
            // Refuse oversized bodies before anything reads them.
            .layer(BodyLimitLayer::new(self.config.server.max_body_size))
            // Policy, sidecar mode: the caller is local and uses the one credential.
            .layer(SelectCredentialLayer::new(self.shared.token.clone()))
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
        self.shared.token.spawn_watcher();
        let options = ServeOptions {
            header_timeout: self.config.server.header_timeout,
            drain_timeout: self.config.server.drain_timeout,
        };
        let (stop_proxy, proxy_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);
        let stack = self.proxy_stack();
        let proxy = tokio::spawn(server::serve(
            "proxy",
            self.proxy,
            stack,
            options,
            proxy_stopped,
        ));
        let shared = self.shared.clone();
        let admin_service = tower::service_fn(move |req| crate::admin::handle(shared.clone(), req));
        let admin = tokio::spawn(server::serve(
            "admin",
            self.admin,
            admin_service,
            options,
            admin_stopped,
        ));

        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        self.shared.draining.store(true, Ordering::Release);
        let _ = stop_proxy.send(true);
        let _ = proxy.await;
        // The admin listener outlives the drain so probes can watch it happen.
        let _ = stop_admin.send(true);
        let _ = admin.await;
        if let Some(audit) = &self.shared.observers.audit {
            match audit.flush().await {
                Some(head) => tracing::info!(head = %head, "audit trail flushed"),
                None => tracing::error!("audit trail could not be flushed at shutdown"),
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
