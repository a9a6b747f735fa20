//! Prometheus metrics (prometheus-client, OpenMetrics text) served at the admin listener's
//! `/metrics`.
//!
//! Request metrics are recorded once per request when it completes (by [`crate::layers::observe`]);
//! cache, token and audit figures are read from the counters those parts keep anyway, at scrape
//! time, so nothing is counted twice.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::context::CacheOutcome;
use crate::secrets::tls::ServerTls;
use crate::secrets::token::TokenSource;

/// Every metric name starts with this.
pub const PREFIX: &str = "cloudcasa_gateway";

/// Latency buckets in seconds: 100 µs (a cache hit) to 30 s (the default upstream timeout).
const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    status_class: &'static str,
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusClassLabel {
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

/// See [`Metrics::client_series`].
type ClientSeries = std::sync::RwLock<
    std::collections::HashMap<
        Arc<str>,
        [Option<Counter>; StatusClass::COUNT],
        foldhash::fast::RandomState,
    >,
>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    // Arc<str>: the identity's own id, shared, so counting a request allocates nothing.
    client: Arc<str>,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    client: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The audit sink's counters, shared with its writer thread.
#[derive(Debug, Clone, Default)]
pub struct AuditMetrics {
    written: Family<PhaseLabel, Counter>,
    failed: Family<ReasonLabel, Counter>,
    /// Records queued and not yet taken by the writer.
    pub queued: Gauge,
}

impl AuditMetrics {
    /// `n` records of `phase` (`intent` or `outcome`) reached the sink.
    pub fn written(&self, phase: &'static str, n: u64) {
        self.written.get_or_create(&PhaseLabel { phase }).inc_by(n);
    }

    /// `n` records were lost: `reason` is `write` (the sink failed) or `queue_full`.
    pub fn failed(&self, reason: &'static str, n: u64) {
        self.failed.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// Records counted as lost for `reason` so far.
    pub fn failed_so_far(&self, reason: &'static str) -> u64 {
        self.failed.get_or_create(&ReasonLabel { reason }).get()
    }
}

/// What an upstream call was for, as the `call` label of `upstream_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamCallKind {
    /// A read with nothing to revalidate.
    Fetch = 0,
    /// A conditional read (the cache's, or a client's passed through).
    Revalidate = 1,
    /// Any other method.
    Write = 2,
}

impl UpstreamCallKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Revalidate => "revalidate",
            Self::Write => "write",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    method: &'static str,
    call: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// Why the gateway closed a client connection itself, as the `reason` label of
/// `connections_closed_total`. Closes the client asked for (or a shutdown) are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request headers (or, before them, no protocol preface) within
    /// `server.header_timeout`.
    HeaderTimeout = 0,
    /// An HTTP/2 connection made no request within `server.header_timeout` of its preface.
    NoRequest = 1,
    /// No request in flight for `server.idle_timeout` (HTTP/1.1: or `header_timeout`, whichever
    /// is shorter, since hyper's header timer also runs between requests).
    IdleTimeout = 2,
    /// An HTTP/2 peer did not answer a keep-alive PING within `server.h2_keepalive_timeout`.
    KeepaliveTimeout = 3,
    /// The TLS handshake failed (no common protocol, an untrusted client certificate, junk).
    TlsHandshakeFailed = 4,
    /// The TLS handshake did not complete within `server.header_timeout`.
    TlsHandshakeTimeout = 5,
    /// The client let the gateway's writes to it wait for `server.send_timeout` (it stopped
    /// reading its responses).
    SendTimeout = 6,
}

impl CloseReason {
    /// Every reason, in label-index order.
    pub const ALL: [Self; 7] = [
        Self::HeaderTimeout,
        Self::NoRequest,
        Self::IdleTimeout,
        Self::KeepaliveTimeout,
        Self::TlsHandshakeFailed,
        Self::TlsHandshakeTimeout,
        Self::SendTimeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::NoRequest => "no_request",
            Self::IdleTimeout => "idle_timeout",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::SendTimeout => "send_timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// One listener's connection counts, handed to its accept loop.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because `server.max_connections` were open.
    pub refused: Counter,
    /// Connections the gateway closed, by [`CloseReason`] index: resolved once per listener so
    /// that counting a close hashes no labels.
    closed: [Counter; CloseReason::ALL.len()],
}

impl ListenerMetrics {
    /// The gateway closed a connection for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }
}

/// Connection counts by listener.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Family<ListenerLabel, Gauge>,
    refused: Family<ListenerLabel, Counter>,
    closed: Family<ClosedLabels, Counter>,
}

impl ConnectionMetrics {
    /// The handles for `listener` (`proxy` or `admin`); creates every series it can count.
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let label = ListenerLabel { listener };
        ListenerMetrics {
            open: self.open.get_or_create(&label).clone(),
            refused: self.refused.get_or_create(&label).clone(),
            closed: CloseReason::ALL.map(|reason| {
                self.closed
                    .get_or_create(&ClosedLabels {
                        listener,
                        reason: reason.as_str(),
                    })
                    .clone()
            }),
        }
    }
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `requests`, `request_duration` and `upstream_responses` series by label index, filled on
    /// first use.
    request_handles: Handles<Counter>,
    duration_handles: Handles<Histogram>,
    upstream_handles: Handles<Counter>,
    upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    upstream_duration_handles: Handles<Histogram>,
    upstream_responses: Family<StatusClassLabel, Counter>,
    gateway_errors: Family<KindLabel, Counter>,
    in_flight: Gauge,
    client_requests: Family<ClientLabels, Counter>,
    /// `client_requests`' series by client, resolved once each: counting a request is then a
    /// foldhash lookup under a read lock, where the family hashes its whole label set with
    /// SipHash under its own lock (about 400 instructions a request). It holds a handle per
    /// series the family holds, so it grows no further than the family does.
    client_series: ClientSeries,
    client_denials: Family<DenialLabels, Counter>,
    /// The `client` label of callers that were not identified.
    unidentified: Arc<str>,
    /// Handed to the audit sink.
    pub audit: AuditMetrics,
    /// Handed to the listeners.
    pub connections: ConnectionMetrics,
    /// Handed to the TokenReview client.
    pub token_reviews: TokenReviewMetrics,
    /// Handed to the reloader.
    pub config: ConfigMetrics,
    /// Handed to the fleet link.
    pub fleet: FleetMetrics,
}

impl Metrics {
    /// Registers every metric; `tokens` and `cache` are read at scrape time.
    pub fn new(
        tokens: Arc<arc_swap::ArcSwap<Vec<Arc<TokenSource>>>>,
        cache: Option<Arc<dyn CacheGauges>>,
        tls: Option<Arc<ServerTls>>,
        telemetry_failures: Counter,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let upstream_duration =
            Family::<UpstreamLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let upstream_responses = Family::<StatusClassLabel, Counter>::default();
        let gateway_errors = Family::<KindLabel, Counter>::default();
        let in_flight = Gauge::default();
        let client_requests = Family::<ClientLabels, Counter>::default();
        let client_denials = Family::<DenialLabels, Counter>::default();
        let audit = AuditMetrics::default();
        let connections = ConnectionMetrics::default();
        let token_reviews = TokenReviewMetrics {
            reviews: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        let name = |n: &str| format!("{PREFIX}_{n}");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                revision: crate::REVISION,
            })
            .set(1);
        let config = ConfigMetrics {
            reloads: Family::default(),
            last_success: Gauge::default(),
            info: Family::default(),
        };
        for result in ["success", "failure"] {
            let _ = config.reloads.get_or_create(&ResultLabel { result });
        }
        // Series that panels and alerts watch exist from the start.
        for result in [
            "authenticated",
            "refused",
            "error",
            "throttled",
            "prechecked",
        ] {
            let _ = token_reviews.reviews.get_or_create(&ResultLabel { result });
        }
        for result in ["authenticated", "refused", "error"] {
            let _ = token_reviews
                .duration
                .get_or_create(&ResultLabel { result });
        }
        registry.register(
            name("config_reloads"),
            "Configuration reloads (SIGHUP) by result: success (applied), failure (the file was \
             invalid; the running configuration stays)",
            config.reloads.clone(),
        );
        registry.register(
            name("config_last_reload_success_timestamp_seconds"),
            "When a reload was last applied, seconds since the epoch (0: never)",
            config.last_success.clone(),
        );
        registry.register(
            name("config_info"),
            "1, labelled with the hash (SHA-256, 16 hex digits) of the configuration file in force",
            config.info.clone(),
        );
        registry.register(
            name("build_info"),
            "1, labelled with the gateway's version and git revision",
            build,
        );
        registry.register(
            name("token_reviews"),
            "TokenReview calls by result (authenticated, refused, error), and reviews not made \
             (throttled: over max_concurrent_reviews or review_rate; prechecked: not a token the \
             API server could accept)",
            token_reviews.reviews.clone(),
        );
        registry.register(
            name("token_review_duration_seconds"),
            "Time a TokenReview call took, by result",
            token_reviews.duration.clone(),
        );
        registry.register(
            name("audit_queue_depth"),
            "Audit records waiting for the writer (the queue holds 65,536)",
            audit.queued.clone(),
        );
        registry.register(
            name("telemetry_export_failures"),
            "Span batches the OTLP exporter could not deliver (the collector unreachable, refusing, slow)",
            telemetry_failures,
        );
        registry.register_collector(Box::new(ProcessCollector));
        if let Some(tls) = tls {
            registry.register_collector(Box::new(TlsCollector(tls)));
        }
        registry.register(
            name("connections_open"),
            "Client connections open, by listener",
            connections.open.clone(),
        );
        registry.register(
            name("connections_refused"),
            "Client connections closed at once because server.max_connections were open",
            connections.refused.clone(),
        );
        registry.register(
            name("connections_closed"),
            "Client connections the gateway closed, by listener and reason (header_timeout, \
             no_request, idle_timeout, keepalive_timeout, tls_handshake_failed, \
             tls_handshake_timeout, send_timeout)",
            connections.closed.clone(),
        );
        // Every series exists from the start, so that the first close is an increase.
        for listener in ["proxy", "admin"] {
            let _ = connections.listener(listener);
        }
        registry.register(
            name("requests"),
            "Requests answered, by method, status class and cache status",
            requests.clone(),
        );
        registry.register(
            name("request_duration_seconds"),
            "Time from request received to response complete, by method, status class and cache status",
            request_duration.clone(),
        );
        registry.register(
            name("upstream_duration_seconds"),
            "Time from sending a request upstream to its response headers, by method, call \
             (fetch, revalidate, write) and status class",
            upstream_duration.clone(),
        );
        registry.register(
            name("upstream_responses"),
            "Responses received from the CloudCasa API, by status class",
            upstream_responses.clone(),
        );
        registry.register(
            name("gateway_errors"),
            "Responses the gateway made itself, by error kind (e.g. upstream_unreachable)",
            gateway_errors.clone(),
        );
        registry.register(
            name("requests_in_flight"),
            "Requests received and not yet complete",
            in_flight.clone(),
        );
        registry.register(
            name("client_requests"),
            "Requests by identified client and status class",
            client_requests.clone(),
        );
        registry.register(
            name("client_denials"),
            "Requests refused by client (empty: not identified) and reason \
             (unauthenticated, identity_unavailable, identity_throttled, forbidden, rate_limited)",
            client_denials.clone(),
        );
        registry.register(
            name("audit_records_written"),
            "Audit records written to the sink, by phase",
            audit.written.clone(),
        );
        registry.register(
            name("audit_records_failed"),
            "Audit records lost, by reason (write: the sink failed; queue_full)",
            audit.failed.clone(),
        );
        // Series that alerts watch start at zero, so that the first increment is an increase.
        for phase in ["intent", "outcome"] {
            audit.written(phase, 0);
        }
        for reason in ["write", "queue_full"] {
            audit.failed(reason, 0);
        }
        for status_class in ["2xx", "3xx", "4xx", "5xx"] {
            let _ = upstream_responses.get_or_create(&StatusClassLabel { status_class });
        }
        for kind in [
            "upstream_unreachable",
            "upstream_timeout",
            "upstream_protocol",
            "audit_unavailable",
        ] {
            let _ = gateway_errors.get_or_create(&KindLabel { kind });
        }
        let fleet = FleetMetrics::register(&mut registry);
        registry.register_collector(Box::new(TokenCollector(tokens)));
        if let Some(cache) = cache {
            registry.register_collector(Box::new(CacheCollector(cache)));
        }
        Self {
            registry,
            requests,
            request_duration,
            request_handles: Handles::new(REQUEST_SLOTS),
            duration_handles: Handles::new(REQUEST_SLOTS),
            upstream_handles: Handles::new(StatusClass::COUNT),
            upstream_duration,
            upstream_duration_handles: Handles::new(UPSTREAM_SLOTS),
            upstream_responses,
            gateway_errors,
            in_flight,
            client_requests,
            client_series: ClientSeries::default(),
            client_denials,
            unidentified: Arc::from(""),
            audit,
            connections,
            token_reviews,
            config,
            fleet,
        }
    }

    /// An identified client's request completed.
    pub fn client_request(&self, client: &Arc<str>, status: StatusCode) {
        let class = StatusClass::of(status);
        let known = self.client_series.read().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(series)) = known.get(client).map(|s| &s[class.index()]) {
            series.inc();
            return;
        }
        drop(known);
        // A counter's clone is a handle on the same series.
        let series = self
            .client_requests
            .get_or_create(&ClientLabels {
                client: client.clone(),
                status_class: class.as_str(),
            })
            .clone();
        series.inc();
        self.client_series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(client.clone())
            .or_default()[class.index()] = Some(series);
    }

    /// A request was refused before reaching the cache or upstream; `None`: the caller was not
    /// identified.
    pub fn client_denied(&self, client: Option<&Arc<str>>, reason: &'static str) {
        self.client_denials
            .get_or_create(&DenialLabels {
                client: client.unwrap_or(&self.unidentified).clone(),
                reason,
            })
            .inc();
    }

    /// A request arrived.
    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    /// A request completed (or its client went away, `status` 499).
    pub fn request_finished(
        &self,
        method: &Method,
        status: StatusCode,
        cache: CacheOutcome,
        error: Option<&'static str>,
        elapsed: Duration,
    ) {
        self.in_flight.dec();
        let (m, s) = (MethodLabel::of(method), StatusClass::of(status));
        let labels = || RequestLabels {
            method: m.as_str(),
            status_class: s.as_str(),
            cache: cache.as_str(),
        };
        let i = request_slot(m, s, cache);
        self.request_handles
            .get(i, || self.requests.get_or_create(&labels()).clone())
            .inc();
        self.duration_handles
            .get(i, || self.request_duration.get_or_create(&labels()).clone())
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.gateway_errors.get_or_create(&KindLabel { kind }).inc();
        }
    }

    /// An upstream call returned response headers.
    pub fn upstream_answered(
        &self,
        method: &Method,
        call: UpstreamCallKind,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let (m, s) = (MethodLabel::of(method), StatusClass::of(status));
        let status_class = s.as_str();
        self.upstream_duration_handles
            .get(upstream_slot(m, call, s), || {
                self.upstream_duration
                    .get_or_create(&UpstreamLabels {
                        method: m.as_str(),
                        call: call.as_str(),
                        status_class,
                    })
                    .clone()
            })
            .observe(elapsed.as_secs_f64());
        self.upstream_handles
            .get(s.index(), || {
                self.upstream_responses
                    .get_or_create(&StatusClassLabel { status_class })
                    .clone()
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A label whose values are a fixed set, so that series handles can be kept in a table indexed
/// by it (see [`slot`]) instead of hashing the labels on every request. Methods outside the
/// standard set share one value (`other`), so a client cannot grow the series.
trait Label: Copy {
    /// How many values.
    const COUNT: usize;
    /// This value's position, below [`Label::COUNT`].
    fn index(self) -> usize;
    /// The value as exported.
    fn as_str(self) -> &'static str;
}

/// The `method` label: the standard methods, and `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MethodLabel(u8);

impl MethodLabel {
    const NAMES: [&'static str; 8] = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
    ];

    fn of(method: &Method) -> Self {
        Self(match *method {
            Method::GET => 0,
            Method::HEAD => 1,
            Method::POST => 2,
            Method::PUT => 3,
            Method::PATCH => 4,
            Method::DELETE => 5,
            Method::OPTIONS => 6,
            _ => 7,
        })
    }
}

impl Label for MethodLabel {
    const COUNT: usize = Self::NAMES.len();
    fn index(self) -> usize {
        usize::from(self.0)
    }
    fn as_str(self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

/// The `status_class` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl StatusClass {
    fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            100..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }
}

impl Label for StatusClass {
    const COUNT: usize = 5;
    fn index(self) -> usize {
        self as usize
    }
    fn as_str(self) -> &'static str {
        ["1xx", "2xx", "3xx", "4xx", "5xx"][self.index()]
    }
}

impl Label for CacheOutcome {
    const COUNT: usize = CacheOutcome::ALL.len();
    fn index(self) -> usize {
        CacheOutcome::index(self)
    }
    fn as_str(self) -> &'static str {
        CacheOutcome::as_str(self)
    }
}

impl Label for UpstreamCallKind {
    const COUNT: usize = 3;
    fn index(self) -> usize {
        self as usize
    }
    fn as_str(self) -> &'static str {
        UpstreamCallKind::as_str(self)
    }
}

/// The slot of a combination of label values in a handle table of `size` slots: the values'
/// indexes read as one mixed-radix number, so every combination has its own slot.
fn slot(digits: &[(usize, usize)]) -> usize {
    digits
        .iter()
        .fold(0, |acc, &(index, count)| acc * count + index)
}

/// Slots of the per-request tables: one per (method, status class, cache outcome).
const REQUEST_SLOTS: usize = MethodLabel::COUNT * StatusClass::COUNT * CacheOutcome::ALL.len();
/// Slots of the upstream duration table: one per (method, call kind, status class).
const UPSTREAM_SLOTS: usize = MethodLabel::COUNT * 3 * StatusClass::COUNT;

fn request_slot(m: MethodLabel, s: StatusClass, c: CacheOutcome) -> usize {
    slot(&[
        (m.index(), MethodLabel::COUNT),
        (s.index(), StatusClass::COUNT),
        (Label::index(c), <CacheOutcome as Label>::COUNT),
    ])
}

fn upstream_slot(m: MethodLabel, call: UpstreamCallKind, s: StatusClass) -> usize {
    slot(&[
        (m.index(), MethodLabel::COUNT),
        (Label::index(call), <UpstreamCallKind as Label>::COUNT),
        (s.index(), StatusClass::COUNT),
    ])
}

/// Series handles of one family by label index, each looked up in the family once: recording
/// is then an array index instead of hashing the labels and taking the family's lock on every
/// request. The handles share their values with the family, which still does the exposition.
#[derive(Debug)]
struct Handles<M> {
    slots: Box<[OnceLock<M>]>,
}

impl<M> Handles<M> {
    fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, i: usize, create: impl FnOnce() -> M) -> &M {
        self.slots[i].get_or_init(create)
    }
}

/// A standard method's name as a `&'static str`; `None` for an extension method.
pub fn standard_method(method: &Method) -> Option<&'static str> {
    let m = MethodLabel::of(method);
    (m.index() < MethodLabel::COUNT - 1).then_some(m.as_str())
}

fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: Option<&[(&str, &str)]>,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let name = format!("{PREFIX}_{name}");
    let mut m = encoder.encode_descriptor(&name, help, None, metric.metric_type())?;
    match labels {
        Some(labels) => metric.encode(m.encode_family(&labels)?),
        None => metric.encode(m),
    }
}

/// The standard `process_*` metrics (as the Prometheus client libraries name them), read from
/// /proc at scrape time: resident memory, CPU seconds, open and maximum file descriptors, start
/// time. prometheus-client has no process collector of its own.
#[derive(Debug)]
struct ProcessCollector;

/// What /proc says about this process, in the units Prometheus wants.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// Resident set size, bytes.
    pub resident_bytes: f64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: f64,
    /// The soft limit on file descriptors.
    pub max_fds: f64,
    /// Start time, seconds since the epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads /proc/self (`None` off Linux or if /proc is not mounted).
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        // USER_HZ and the page size are 100 and 4096 on every Linux this runs on.
        const TICKS: f64 = 100.0;
        let cpu_seconds = (field(11)? + field(12)?) / TICKS;
        let start_ticks = field(19)?;
        let resident_bytes = field(21)? * 4096.0;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()?
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::INFINITY);
        Some(Self {
            resident_bytes,
            cpu_seconds,
            open_fds,
            max_fds,
            start_time_seconds: boot + start_ticks / TICKS,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else {
            return Ok(());
        };
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    revision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

/// Configuration reloads, handed to the reloader.
#[derive(Debug, Clone)]
pub struct ConfigMetrics {
    reloads: Family<ResultLabel, Counter>,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    info: Family<HashLabel, Gauge>,
}

impl ConfigMetrics {
    /// The configuration in force has this hash (at start, and after each successful reload).
    pub fn in_force(&self, hash: &str) {
        self.info.clear();
        self.info
            .get_or_create(&HashLabel { hash: hash.into() })
            .set(1);
    }

    /// A reload was applied (`hash`) or refused (`None`).
    pub fn reloaded(&self, hash: Option<&str>) {
        let result = if hash.is_some() { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        if let Some(hash) = hash {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_success.set(now);
            self.in_force(hash);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// TokenReview calls, handed to the reviewer.
#[derive(Debug, Clone)]
pub struct TokenReviewMetrics {
    reviews: Family<ResultLabel, Counter>,
    duration: Family<ResultLabel, Histogram, fn() -> Histogram>,
}

impl TokenReviewMetrics {
    /// A review call ended with `result` (`authenticated`, `refused`, `error`) after `elapsed`;
    /// `throttled` and `prechecked` count calls that were never made.
    pub fn reviewed(&self, result: &'static str, elapsed: Option<Duration>) {
        let label = ResultLabel { result };
        self.reviews.get_or_create(&label).inc();
        if let Some(elapsed) = elapsed {
            self.duration
                .get_or_create(&label)
                .observe(elapsed.as_secs_f64());
        }
    }
}

/// The proxy listener's certificate expiry.
#[derive(Debug)]
struct TlsCollector(Arc<ServerTls>);

impl Collector for TlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(self.0.not_after());
        let name = format!("{PREFIX}_tls_certificate_not_after_seconds");
        let mut m = encoder.encode_descriptor(
            &name,
            "When the listener's TLS certificate expires, seconds since the epoch",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(m.encode_family(&[("listener", "proxy")])?)?;
        Ok(())
    }
}

#[derive(Debug)]
struct TokenCollector(Arc<arc_swap::ArcSwap<Vec<Arc<TokenSource>>>>);

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = SystemTime::now();
        // One descriptor per metric, then a sample per credential.
        type Get = fn(&TokenSource, SystemTime) -> f64;
        let gauges: [(&str, &str, Get); 2] = [
            (
                "token_age_seconds",
                "Seconds since the credential's token was last loaded (-1: never loaded)",
                |t, now| {
                    t.current().map_or(-1.0, |l| {
                        now.duration_since(l.loaded_at())
                            .unwrap_or_default()
                            .as_secs_f64()
                    })
                },
            ),
            (
                "token_loaded",
                "1 when a token is loaded for the credential",
                |t, _| f64::from(u8::from(t.current().is_some())),
            ),
        ];
        for (name, help, get) in gauges {
            let name = format!("{PREFIX}_{name}");
            let mut m =
                encoder.encode_descriptor(&name, help, None, ConstGauge::new(0.0).metric_type())?;
            for t in self.0.load().iter() {
                let labels = [("credential", t.credential())];
                ConstGauge::new(get(t, now)).encode(m.encode_family(&labels)?)?;
            }
        }
        type Count = fn(&TokenSource) -> u64;
        let counters: [(&str, &str, Count); 2] = [
            ("token_reloads", "Times a changed token was loaded", |t| {
                t.stats.reloads.load(std::sync::atomic::Ordering::Relaxed)
            }),
            (
                "token_load_failures",
                "Times loading the token failed (the last good one stays in use)",
                |t| t.stats.failures.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in counters {
            let name = format!("{PREFIX}_{name}");
            let mut m = encoder.encode_descriptor(
                &name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for t in self.0.load().iter() {
                let labels = [("credential", t.credential())];
                ConstCounter::new(get(t)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// What the cache reports at scrape time: its size and the counters it keeps anyway.
/// Implemented by the cache layer, so that metrics need not know the cache.
#[derive(Debug, Clone, Default)]
pub struct CacheSnapshot {
    /// Entries stored.
    pub entries: u64,
    /// Their weighted size in bytes.
    pub weighted_bytes: u64,
    /// `cache.max_size`.
    pub max_bytes: u64,
    /// Requests answered from the cache without asking upstream.
    pub hits: u64,
    /// Requests with nothing usable stored.
    pub misses: u64,
    /// Stored responses revalidated upstream.
    pub revalidations: u64,
    /// Stale responses served because the upstream failed.
    pub stale_served: u64,
    /// Requests that waited for another request's upstream fetch.
    pub collapsed: u64,
    /// Entries evicted to stay within `cache.max_size`.
    pub evictions: u64,
    /// Paths invalidated by writes.
    pub invalidations: u64,
    /// Responses to reads that were not stored, by reason (the `Cache-Status` `detail`, e.g.
    /// `inflight-limit`, `too-large`); every reason is listed, counted or not.
    pub not_stored: Vec<(&'static str, u64)>,
}

/// A source of [`CacheSnapshot`]s.
pub trait CacheGauges: Send + Sync + std::fmt::Debug + 'static {
    /// The figures now.
    fn snapshot(&self) -> CacheSnapshot;
}

#[derive(Debug)]
struct CacheCollector(Arc<dyn CacheGauges>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let e = &mut encoder;
        encode_one(
            e,
            "cache_entries",
            "Stored responses (one per variant)",
            None,
            ConstGauge::new(s.entries as i64),
        )?;
        encode_one(
            e,
            "cache_weighted_bytes",
            "Weighted size of stored responses",
            None,
            ConstGauge::new(s.weighted_bytes as i64),
        )?;
        encode_one(
            e,
            "cache_max_bytes",
            "cache.max_size",
            None,
            ConstGauge::new(s.max_bytes as i64),
        )?;
        let counters = [
            (
                "cache_hits",
                "Requests answered from the cache without asking upstream",
                s.hits,
            ),
            (
                "cache_misses",
                "Requests with nothing usable stored",
                s.misses,
            ),
            (
                "cache_revalidations",
                "Stored responses revalidated upstream",
                s.revalidations,
            ),
            (
                "cache_stale_served",
                "Stale responses served because the upstream failed",
                s.stale_served,
            ),
            (
                "cache_collapsed",
                "Requests that waited for another request's upstream fetch",
                s.collapsed,
            ),
            (
                "cache_evictions",
                "Entries evicted to stay within cache.max_size",
                s.evictions,
            ),
            (
                "cache_invalidations",
                "Paths invalidated by writes",
                s.invalidations,
            ),
        ];
        for (name, help, value) in counters {
            encode_one(e, name, help, None, ConstCounter::new(value))?;
        }
        let name = format!("{PREFIX}_cache_not_stored");
        let mut m = encoder.encode_descriptor(
            &name,
            "Responses to reads not stored, by reason (as Cache-Status detail: inflight-limit, \
             too-large, no-store, private, set-cookie, vary-star, status)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (reason, value) in &s.not_stored {
            ConstCounter::new(*value).encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-client handles count into the family's own series: one series per client and
    /// class seen, none for a class never seen, the same whether a series was just created or
    /// found among the handles.
    #[test]
    fn client_requests_count_through_their_handles() {
        let m = Metrics::new(Default::default(), None, None, Counter::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..3 {
            m.client_request(&a, StatusCode::OK);
        }
        m.client_request(&a, StatusCode::FORBIDDEN);
        m.client_request(&b, StatusCode::CREATED);
        let text = m.encode();
        let series = |client: &str, class: &str| {
            format!(
                "cloudcasa_gateway_client_requests_total{{client=\"{client}\",status_class=\"{class}\"}}"
            )
        };
        for (client, class, n) in [("a", "2xx", 3), ("a", "4xx", 1), ("b", "2xx", 1)] {
            let line = format!("{} {n}\n", series(client, class));
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        assert!(!text.contains(&series("b", "4xx")), "{text}");
        assert!(!text.contains(&series("a", "5xx")), "{text}");
    }

    #[test]
    fn exposition_names_and_counts() {
        let m = Metrics::new(Default::default(), None, None, Counter::default());
        m.request_started();
        m.request_finished(
            &Method::GET,
            StatusCode::OK,
            CacheOutcome::Hit,
            None,
            Duration::from_millis(1),
        );
        m.request_started();
        m.request_finished(
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::BAD_GATEWAY,
            CacheOutcome::Bypass,
            Some("upstream_unreachable"),
            Duration::from_millis(1),
        );
        m.audit.failed("write", 2);
        let text = m.encode();
        assert!(
            text.contains(
                "cloudcasa_gateway_requests_total{method=\"GET\",status_class=\"2xx\",cache=\"hit\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "cloudcasa_gateway_requests_total{method=\"other\",status_class=\"5xx\",cache=\"bypass\"} 1"
        ));
        assert!(
            text.contains(
                "cloudcasa_gateway_gateway_errors_total{kind=\"upstream_unreachable\"} 1"
            )
        );
        assert!(text.contains("cloudcasa_gateway_requests_in_flight 0"));
        assert!(text.contains("cloudcasa_gateway_audit_records_failed_total{reason=\"write\"} 2"));
        // Every close reason of every listener is exposed from the start; a close counts in
        // its own series.
        m.connections
            .listener("proxy")
            .closed(CloseReason::NoRequest);
        let text = m.encode();
        for listener in ["proxy", "admin"] {
            for reason in CloseReason::ALL {
                let count = u8::from(listener == "proxy" && reason == CloseReason::NoRequest);
                let line = format!(
                    "cloudcasa_gateway_connections_closed_total{{listener=\"{listener}\",reason=\"{}\"}} {count}\n",
                    reason.as_str()
                );
                assert!(text.contains(&line), "{line}{text}");
            }
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn label_indexes_point_at_their_labels() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert_eq!(MethodLabel::of(&m).as_str(), m.as_str());
        }
        assert_eq!(MethodLabel::of(&Method::TRACE).as_str(), "other");
        assert_eq!(standard_method(&Method::PATCH), Some("PATCH"));
        assert_eq!(standard_method(&Method::TRACE), None);
        for code in [100, 204, 304, 412, 503, 599] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                StatusClass::of(status).as_str(),
                format!("{}xx", code / 100)
            );
        }
    }

    /// Every combination of label values has its own slot, inside the table.
    #[test]
    fn slots_are_distinct_and_in_range() {
        let methods: Vec<MethodLabel> = (0..MethodLabel::COUNT as u8).map(MethodLabel).collect();
        let classes = [
            StatusClass::Informational,
            StatusClass::Success,
            StatusClass::Redirection,
            StatusClass::ClientError,
            StatusClass::ServerError,
        ];
        assert_eq!(classes.len(), StatusClass::COUNT);
        let calls = [
            UpstreamCallKind::Fetch,
            UpstreamCallKind::Revalidate,
            UpstreamCallKind::Write,
        ];
        let mut seen = std::collections::HashSet::new();
        for &m in &methods {
            for &s in &classes {
                for c in CacheOutcome::ALL {
                    let i = request_slot(m, s, c);
                    assert!(i < REQUEST_SLOTS && seen.insert(i), "{m:?} {s:?} {c:?}");
                }
            }
        }
        assert_eq!(seen.len(), REQUEST_SLOTS);
        seen.clear();
        for &m in &methods {
            for &call in &calls {
                for &s in &classes {
                    let i = upstream_slot(m, call, s);
                    assert!(i < UPSTREAM_SLOTS && seen.insert(i), "{m:?} {call:?} {s:?}");
                }
            }
        }
        assert_eq!(seen.len(), UPSTREAM_SLOTS);
    }

    #[test]
    fn memoised_handles_count_into_the_exposed_series() {
        let m = Metrics::new(Default::default(), None, None, Counter::default());
        let finish = |cache: CacheOutcome| {
            m.request_started();
            m.request_finished(
                &Method::PATCH,
                StatusCode::PRECONDITION_FAILED,
                cache,
                None,
                Duration::from_micros(50),
            );
        };
        // Three through one memoised handle, and one of every outcome.
        for _ in 0..3 {
            finish(CacheOutcome::Miss);
        }
        for outcome in CacheOutcome::ALL {
            finish(outcome);
        }
        for _ in 0..2 {
            m.upstream_answered(
                &Method::GET,
                UpstreamCallKind::Revalidate,
                StatusCode::NOT_MODIFIED,
                Duration::from_micros(10),
            );
        }
        let text = m.encode();
        assert!(
            text.contains("cloudcasa_gateway_upstream_responses_total{status_class=\"3xx\"} 2")
        );
        assert!(
            text.contains(
                "cloudcasa_gateway_requests_total{method=\"PATCH\",status_class=\"4xx\",cache=\"miss\"} 4"
            ),
            "{text}"
        );
        for outcome in CacheOutcome::ALL
            .iter()
            .filter(|o| **o != CacheOutcome::Miss)
        {
            let line = format!(
                "cloudcasa_gateway_requests_total{{method=\"PATCH\",status_class=\"4xx\",cache=\"{}\"}} 1",
                outcome.as_str()
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(text.contains(
            "cloudcasa_gateway_request_duration_seconds_count{method=\"PATCH\",status_class=\"4xx\",cache=\"miss\"} 4"
        ));
        assert!(
            text.contains(
                "cloudcasa_gateway_request_duration_seconds_bucket{le=\"0.0001\",method=\"PATCH\",status_class=\"4xx\",cache=\"miss\"} 4"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "cloudcasa_gateway_upstream_duration_seconds_count{method=\"GET\",call=\"revalidate\",status_class=\"3xx\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("cloudcasa_gateway_build_info{version=\""));
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("process_cpu_seconds_total "));
        assert!(text.contains("cloudcasa_gateway_requests_in_flight 0"));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

/// The fleet link's metrics (`[fleet]`), handed to it; registered whether or not a fleet is
/// configured, so dashboards and alerts find the series.
#[derive(Debug, Clone)]
pub struct FleetMetrics {
    up: Gauge,
    replicas: Gauge,
    errors: Family<OpLabel, Counter>,
    /// The series counted per request (lookups, stores, rate decisions, invalidations), resolved
    /// once: a family lookup hashes the labels and takes a lock on every call.
    series: Arc<FleetSeries>,
}

#[derive(Debug)]
struct FleetSeries {
    lookup_hit: Counter,
    lookup_miss: Counter,
    stored: Counter,
    invalidated: Counter,
    sent: Counter,
    received: Counter,
    delay: Histogram,
    rate_fleet: Counter,
    rate_local: Counter,
}

/// Propagation delays: a pub/sub hop is sub-millisecond on one network.
const PROPAGATION_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

fn propagation_histogram() -> Histogram {
    Histogram::new(PROPAGATION_BUCKETS)
}

impl FleetMetrics {
    fn register(registry: &mut Registry) -> Self {
        let lookups = Family::<ResultLabel, Counter>::default();
        let stores = Family::<ResultLabel, Counter>::default();
        let invalidations = Family::<DirectionLabel, Counter>::default();
        let delay = Family::<DirectionLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            propagation_histogram,
        );
        let rate = Family::<ModeLabel, Counter>::default();
        // Every series exists from the start (dashboards and alerts find them). Each handle is
        // taken inside a closure or block of its own: a family's read guard lives to the end of
        // the expression that took it, and a second `get_or_create` on that family in the same
        // struct literal would wait for it forever.
        let result = |f: &Family<ResultLabel, Counter>, result| {
            f.get_or_create(&ResultLabel { result }).clone()
        };
        let direction = |f: &Family<DirectionLabel, Counter>, direction| {
            f.get_or_create(&DirectionLabel { direction }).clone()
        };
        let mode = |mode| rate.get_or_create(&ModeLabel { mode }).clone();
        let delay_received = {
            delay
                .get_or_create(&DirectionLabel {
                    direction: "received",
                })
                .clone()
        };
        let series = FleetSeries {
            lookup_hit: result(&lookups, "hit"),
            lookup_miss: result(&lookups, "miss"),
            stored: result(&stores, "stored"),
            invalidated: result(&stores, "invalidated"),
            sent: direction(&invalidations, "sent"),
            received: direction(&invalidations, "received"),
            delay: delay_received,
            rate_fleet: mode("fleet"),
            rate_local: mode("local"),
        };
        let m = Self {
            up: Gauge::default(),
            replicas: Gauge::default(),
            errors: Family::default(),
            series: Arc::new(series),
        };
        let name = |n: &str| format!("{PREFIX}_{n}");
        registry.register(
            name("fleet_link_up"),
            "1 while Redis answers and this replica hears other replicas' invalidations; 0 while \
             it serves degraded (memory cache revalidates every read, per-replica rate limits)",
            m.up.clone(),
        );
        registry.register(
            name("fleet_replicas"),
            "Replicas alive at the last heartbeat (0: no [fleet], 1 until the first heartbeat)",
            m.replicas.clone(),
        );
        registry.register(
            name("fleet_errors"),
            "Redis calls that failed or timed out, by operation",
            m.errors.clone(),
        );
        registry.register(
            name("fleet_shared_lookups"),
            "Lookups in the shared (Redis) tier after a memory miss, by result (hit, miss)",
            lookups,
        );
        registry.register(
            name("fleet_shared_stores"),
            "Fills offered to the shared tier, by result (stored; invalidated: a write covered \
             the path while the fill was under way, so it was not stored)",
            stores,
        );
        registry.register(
            name("fleet_invalidations"),
            "Invalidations published (sent) and applied from other replicas (received)",
            invalidations,
        );
        registry.register(
            name("fleet_invalidation_delay_seconds"),
            "From a write's invalidation being published to another replica applying it",
            delay,
        );
        registry.register(
            name("fleet_rate_decisions"),
            "Rate decisions by where they were made (fleet: Redis; local: the per-replica \
             share while Redis is unreachable)",
            rate,
        );
        for op in [
            "lookup",
            "store",
            "invalidate",
            "rate",
            "probe",
            "subscribe",
        ] {
            let _ = m.errors.get_or_create(&OpLabel { op });
        }
        m
    }

    /// The link is up (or down).
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Replicas alive.
    pub fn set_replicas(&self, n: u64) {
        self.replicas.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A Redis call failed.
    pub fn error(&self, op: &'static str) {
        self.errors.get_or_create(&OpLabel { op }).inc();
    }

    /// A shared-tier lookup found an entry (or not).
    pub fn lookup(&self, hit: bool) {
        match hit {
            true => self.series.lookup_hit.inc(),
            false => self.series.lookup_miss.inc(),
        };
    }

    /// A fill was offered to the shared tier: stored, or refused because a write covered it.
    pub fn stored(&self, stored: bool) {
        match stored {
            true => self.series.stored.inc(),
            false => self.series.invalidated.inc(),
        };
    }

    /// An invalidation was published.
    pub fn invalidation_sent(&self) {
        self.series.sent.inc();
    }

    /// Another replica's invalidation arrived `delay` after it was published.
    pub fn received(&self, delay: Duration) {
        self.series.received.inc();
        self.series.delay.observe(delay.as_secs_f64());
    }

    /// A rate decision was made by Redis (or, when it could not, by this replica's share).
    pub fn rate(&self, by_fleet: bool) {
        match by_fleet {
            true => self.series.rate_fleet.inc(),
            false => self.series.rate_local.inc(),
        };
    }
}
