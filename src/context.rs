//! The request context: one [`Exchange`] per request, and the facts the layers record on it.
//!
//! The observe layer creates the exchange and puts it into the request extensions; each layer
//! below records what only it knows, once (the canonical request, who the client is, the policy's
//! decision, why a request was refused, a TokenReview, what the upstream answered), and the
//! observe layer reads it all when the response ends, to write the audit record, end the span and
//! count the metrics. Layers write facts; they do not count or log their own outcomes.
//!
//! This module depends on nothing else in the crate, so every layer can use it without pulling
//! in another layer; the types here are the vocabulary they share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Request, StatusCode, Uri};
use opentelemetry::trace::TraceContextExt;

/// The address of the peer that sent a request, in request extensions (set by the listener),
/// and what its connection shares with every request on it.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    /// The peer's socket address.
    pub addr: SocketAddr,
    conn: Arc<Connection>,
}

#[derive(Debug)]
struct Connection {
    /// The address as text, formatted once per connection (every audit record carries it).
    text: Box<str>,
    /// Why the gateway closed the connection itself, once it did.
    closed_for: OnceLock<&'static str>,
}

impl ClientAddr {
    /// Formats `addr` once.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conn: Arc::new(Connection {
                text: addr.to_string().into(),
                closed_for: OnceLock::new(),
            }),
        }
    }

    /// The address as text.
    pub fn text(&self) -> &str {
        &self.conn.text
    }

    /// The gateway is closing the connection for `why` (a close reason's label): requests still
    /// open on it end with that error rather than `client_closed`.
    pub fn closing(&self, why: &'static str) {
        let _ = self.conn.closed_for.set(why);
    }

    /// Why the gateway closed the connection, if it did.
    pub fn closed_for(&self) -> Option<&'static str> {
        self.conn.closed_for.get().copied()
    }
}

/// How a client proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// Nothing: the listener is loopback (sidecar mode).
    Local,
    /// Nothing: `server.allow_unauthenticated = true`.
    Anonymous,
    /// A client certificate.
    Mtls,
    /// A Kubernetes ServiceAccount token (TokenReview).
    Kubernetes,
    /// An API key.
    ApiKey,
}

impl AuthMethod {
    /// The name in audit records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Anonymous => "none",
            Self::Mtls => "mtls",
            Self::Kubernetes => "kubernetes",
            Self::ApiKey => "api_key",
        }
    }
}

/// A caller, as identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The id policy rules match: a SPIFFE ID or other SAN, a ServiceAccount username, an API
    /// key id, `local` or `anonymous`.
    pub id: Arc<str>,
    /// How it was established.
    pub method: AuthMethod,
}

/// The identity a verified client certificate gave the connection; set by the listener.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Arc<ClientIdentity>);

/// The method the client sent, in request extensions, when an override replaced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMethod(pub Method);

/// What the policy decided for a request, for audit records.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The rule that matched.
    pub rule: Arc<str>,
    /// The credential's name (never its value).
    pub credential: Arc<str>,
}

/// Why a request was refused before it reached the cache: the identity and policy layers record
/// it, and the observer counts it per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No acceptable credential (401).
    Unauthenticated,
    /// The Kubernetes API server could not review a ServiceAccount token (503).
    IdentityUnavailable,
    /// Too many TokenReviews at once or per second (503).
    IdentityThrottled,
    /// No policy rule allows it (403).
    Forbidden,
    /// Over the rule's rate (429).
    RateLimited,
}

impl Refusal {
    /// The label in metrics (`reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::IdentityUnavailable => "identity_unavailable",
            Self::IdentityThrottled => "identity_throttled",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// What became of a ServiceAccount token that was not in the review cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewResult {
    /// Refused without asking the API server (not a JWS, expired, wrong audience).
    Prechecked,
    /// Refused because reviews are at their bound.
    Throttled,
    /// The API server authenticated it.
    Authenticated,
    /// The API server refused it.
    Refused,
    /// The API server could not be asked, or its answer made no sense.
    Error,
}

impl ReviewResult {
    /// The label in metrics (`result`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prechecked => "prechecked",
            Self::Throttled => "throttled",
            Self::Authenticated => "authenticated",
            Self::Refused => "refused",
            Self::Error => "error",
        }
    }
}

/// A TokenReview this request caused: its result, and how long the API server took when asked.
#[derive(Debug, Clone, Copy)]
pub struct Review {
    /// What became of it.
    pub result: ReviewResult,
    /// The API server's time, when it was asked.
    pub elapsed: Option<Duration>,
}

/// What the cache did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Served a fresh stored response; the upstream was not asked.
    Hit,
    /// Waited for another request's upstream fetch and served what it stored.
    Collapsed,
    /// The upstream confirmed a stored response (304) and the stored body was served.
    Revalidated,
    /// The upstream was asked and its response served (nothing usable stored, the client's
    /// directives, a failed fetch).
    Miss,
    /// A stale stored response was served because the upstream failed (`stale-if-error`).
    Stale,
    /// Not a cacheable request: a write, a method override, OPTIONS, or the cache is disabled.
    Bypass,
}

impl CacheOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [CacheOutcome; 6] = [
        Self::Hit,
        Self::Collapsed,
        Self::Revalidated,
        Self::Miss,
        Self::Stale,
        Self::Bypass,
    ];

    /// The label in audit records (`cache`), spans and metrics (`cache`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Collapsed => "collapsed",
            Self::Revalidated => "revalidated",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Bypass => "bypass",
        }
    }

    /// The index of this outcome's counter.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the cache did with a request, as the cache layer reports it: its one outcome (the label
/// audit records, spans and metrics use) and the `Cache-Status` header (RFC 9211) derived from
/// it. The observe layer puts the header on the response, whether the cache answered or the
/// request failed below it.
#[derive(Debug, Clone)]
pub struct CacheReport {
    /// What the cache did.
    pub outcome: CacheOutcome,
    /// The `Cache-Status` value.
    pub header: HeaderValue,
}

/// Marks a response the gateway made itself (for audit and metrics).
#[derive(Debug, Clone, Copy)]
pub struct GatewayMade {
    /// The error's kind (`GatewayError::kind`).
    pub kind: &'static str,
}

/// What ties a log line to a request: its id and its trace.
#[derive(Debug, Clone)]
pub struct LogIds {
    /// `X-Request-Id`.
    pub request_id: HeaderValue,
    /// The W3C trace id (32 hex digits).
    pub trace_id: opentelemetry::trace::TraceId,
}

impl LogIds {
    /// The request id as text.
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }
}

/// What the upstream said, as far as the records need it (the last answer, if the cache asked
/// more than once).
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamReport {
    /// Its status.
    pub status: Option<StatusCode>,
    /// How long it took to answer (headers).
    pub elapsed: Option<Duration>,
}

/// One request as it passes through the gateway: what arrived, and what the layers below learn.
#[derive(Debug)]
pub struct Exchange {
    /// When it arrived (wall clock, for the record's `ts`).
    pub received_at: SystemTime,
    /// When it arrived (monotonic, for durations).
    pub started: Instant,
    /// `X-Request-Id`.
    pub request_id: HeaderValue,
    /// The method as it arrived.
    pub wire_method: Method,
    /// The target as it arrived.
    pub wire_uri: Uri,
    /// `If-Match`, as it arrived.
    pub if_match: Option<HeaderValue>,
    /// The peer, when the listener knows it.
    pub client_addr: Option<ClientAddr>,
    /// The server span's context: the parent of upstream calls' client spans.
    pub trace: opentelemetry::Context,
    effective_method: OnceLock<Method>,
    canonical_uri: OnceLock<Uri>,
    client: OnceLock<Arc<ClientIdentity>>,
    decision: OnceLock<Decision>,
    refusal: OnceLock<Refusal>,
    review: OnceLock<Review>,
    cache: OnceLock<CacheReport>,
    bytes_in: AtomicU64,
    upstream: Mutex<UpstreamReport>,
    /// Whether the request may have reached the upstream: set by the upstream call just before
    /// the request goes to its connection, and cleared again when no connection could be made.
    /// The cache invalidates for a write whose answer never came only when this is set, so a
    /// write refused before it was sent (its body broke off, the upstream was down) or left by
    /// its client before that point purges nothing.
    may_be_sent: std::sync::atomic::AtomicBool,
}

impl Exchange {
    /// A new exchange for a request that arrived just now.
    pub fn new(
        request_id: HeaderValue,
        wire_method: Method,
        wire_uri: Uri,
        if_match: Option<HeaderValue>,
        client_addr: Option<ClientAddr>,
        trace: opentelemetry::Context,
    ) -> Self {
        Self {
            received_at: SystemTime::now(),
            started: Instant::now(),
            request_id,
            wire_method,
            wire_uri,
            if_match,
            client_addr,
            trace,
            effective_method: OnceLock::new(),
            canonical_uri: OnceLock::new(),
            client: OnceLock::new(),
            decision: OnceLock::new(),
            refusal: OnceLock::new(),
            review: OnceLock::new(),
            cache: OnceLock::new(),
            bytes_in: AtomicU64::new(0),
            upstream: Mutex::new(UpstreamReport::default()),
            may_be_sent: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The exchange a request belongs to, when it came through the observe layer.
    pub fn of<B>(req: &Request<B>) -> Option<&Arc<Exchange>> {
        req.extensions().get::<Arc<Exchange>>()
    }

    /// Records whether the request may be at the upstream now (see `may_be_sent`).
    pub fn set_sent(&self, sent: bool) {
        self.may_be_sent.store(sent, Ordering::Release);
    }

    /// Whether the request may have reached the upstream.
    pub fn may_be_sent(&self) -> bool {
        self.may_be_sent.load(Ordering::Acquire)
    }

    /// Records the request the upstream will execute, where it differs from the one that
    /// arrived (by the canonical layer): the audit record, span and metrics then describe it.
    pub fn set_effective(&self, method: Option<Method>, uri: Option<Uri>) {
        if let Some(method) = method {
            let _ = self.effective_method.set(method);
        }
        if let Some(uri) = uri {
            let _ = self.canonical_uri.set(uri);
        }
    }

    /// The method on the wire, when an override replaced it.
    pub fn overridden_from(&self) -> Option<&Method> {
        self.overridden().then_some(&self.wire_method)
    }

    /// The method the upstream executes (the wire method unless an override replaced it).
    pub fn method(&self) -> &Method {
        self.effective_method.get().unwrap_or(&self.wire_method)
    }

    /// Whether a method override replaced the wire method.
    pub fn overridden(&self) -> bool {
        self.effective_method.get().is_some()
    }

    /// The canonical target (the wire target unless it was rewritten).
    pub fn uri(&self) -> &Uri {
        self.canonical_uri.get().unwrap_or(&self.wire_uri)
    }

    /// Records who the client is (by the identity layer).
    pub fn set_client(&self, client: Arc<ClientIdentity>) {
        let _ = self.client.set(client);
    }

    /// Who the client is, once identified.
    pub fn client(&self) -> Option<&Arc<ClientIdentity>> {
        self.client.get()
    }

    /// Records the policy's decision.
    pub fn set_decision(&self, decision: Decision) {
        let _ = self.decision.set(decision);
    }

    /// The policy's decision, once made.
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.get()
    }

    /// Records why the request was refused (by the identity or policy layer).
    pub fn set_refusal(&self, refusal: Refusal) {
        let _ = self.refusal.set(refusal);
    }

    /// Why the request was refused, if it was.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal.get().copied()
    }

    /// Records the TokenReview this request caused (by the identity layer).
    pub fn set_review(&self, review: Review) {
        let _ = self.review.set(review);
    }

    /// The TokenReview this request caused, if any.
    pub fn review(&self) -> Option<Review> {
        self.review.get().copied()
    }

    /// Records what the cache did (by the cache layer).
    pub fn set_cache(&self, report: CacheReport) {
        let _ = self.cache.set(report);
    }

    /// What the cache did, if the request reached it.
    pub fn cache(&self) -> Option<&CacheReport> {
        self.cache.get()
    }

    /// Counts request body bytes as they are read.
    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Request body bytes read so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Records the upstream's answer (the last one, if the cache asked more than once).
    pub fn set_upstream(&self, status: StatusCode, elapsed: Duration) {
        let mut report = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        report.status = Some(status);
        report.elapsed = Some(elapsed);
    }

    /// What the upstream answered, if it was asked.
    pub fn upstream(&self) -> UpstreamReport {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ids every log line about this request carries.
    pub fn log_ids(&self) -> LogIds {
        LogIds {
            request_id: self.request_id.clone(),
            trace_id: self.trace.span().span_context().trace_id(),
        }
    }
}
