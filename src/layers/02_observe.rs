//! Accounting for every request: the server span, the audit record and the request metrics, all
//! completed in one place when the response body ends or the client goes away.
//!
//! [`ObserveLayer`] sits above everything that can refuse a request, so refusals are accounted for
//! too. It puts an [`Exchange`] into the request extensions: the layers below add what only they
//! know (the upstream's status and time; in the shared gateway, who the client is), and the
//! upstream call opens its client span from it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};

use crate::app::server::ClientAddr;
use crate::http::body::{self, Body, Tap, TapHook};
use crate::layers::cache::status::CacheStatus;
use crate::layers::identity::ClientIdentity;
use crate::layers::policy::Decision;
use crate::layers::request_id::RequestId;
use crate::layers::rescue::GatewayMade;
use crate::observability::audit::AuditLog;
use crate::observability::audit::record::{self, Client, Record, Resource};
use crate::observability::metrics::{Metrics, UpstreamCallKind};
use crate::observability::telemetry::{self, ServerRequest, Telemetry};

/// The status recorded when the client went away before the response was complete (as nginx).
pub const CLIENT_CLOSED: u16 = 499;

/// Where finished exchanges are reported.
#[derive(Debug)]
pub struct Observers {
    /// Spans.
    pub telemetry: Telemetry,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// The audit trail, unless `audit.enabled = false`.
    pub audit: Option<AuditLog>,
}

/// What the upstream said, as far as the records need it.
#[derive(Debug, Clone, Copy, Default)]
struct UpstreamReport {
    status: Option<StatusCode>,
    elapsed: Option<Duration>,
}

/// One request as it passes through the gateway: what arrived, and what the layers below learn.
#[derive(Debug)]
pub struct Exchange {
    received_at: SystemTime,
    started: Instant,
    request_id: HeaderValue,
    /// The method as it arrived.
    method: Method,
    uri: Uri,
    /// Set by the canonical layer when a method override replaced the wire method.
    effective_method: OnceLock<Method>,
    /// Set by the canonical layer when the path was rewritten to its canonical form.
    canonical_uri: OnceLock<Uri>,
    if_match: Option<HeaderValue>,
    client_addr: Option<ClientAddr>,
    client: OnceLock<Arc<ClientIdentity>>,
    decision: OnceLock<Decision>,
    trace: opentelemetry::Context,
    bytes_in: AtomicU64,
    upstream: Mutex<UpstreamReport>,
    observers: Arc<Observers>,
}

impl Exchange {
    /// The exchange a request belongs to, when it came through [`ObserveLayer`].
    pub fn of<B>(req: &Request<B>) -> Option<&Arc<Exchange>> {
        req.extensions().get::<Arc<Exchange>>()
    }

    /// Records who the client is (by the identity layer).
    pub fn set_client(&self, client: Arc<ClientIdentity>) {
        let _ = self.client.set(client);
    }

    /// Records the request the upstream will execute, where it differs from the one that
    /// arrived (by the canonical layer): the audit record, span and metrics then describe it.
    pub fn set_effective(&self, method: Option<Method>, uri: Option<Uri>) {
        if let Some(method) = method {
            let span = self.trace.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(
                    "http.request.method",
                    method.as_str().to_owned(),
                ));
                span.set_attribute(KeyValue::new(
                    "http.request.method_original",
                    self.method.as_str().to_owned(),
                ));
            }
            let _ = self.effective_method.set(method);
        }
        if let Some(uri) = uri {
            let _ = self.canonical_uri.set(uri);
        }
    }

    /// The method every layer below the canonical one sees.
    pub fn method(&self) -> &Method {
        self.effective_method.get().unwrap_or(&self.method)
    }

    fn uri(&self) -> &Uri {
        self.canonical_uri.get().unwrap_or(&self.uri)
    }

    /// Records the policy's decision.
    pub fn set_decision(&self, decision: Decision) {
        let _ = self.decision.set(decision);
    }

    /// Starts the client span for an upstream call under this request's server span, and writes
    /// `traceparent` into the outgoing headers.
    pub fn upstream_call(
        &self,
        method: &Method,
        url: &Uri,
        headers: &mut HeaderMap,
    ) -> UpstreamCall {
        let span = self
            .observers
            .telemetry
            .client_span(&self.trace, method, url, headers);
        let kind = if !crate::layers::canonical::is_read(method) {
            UpstreamCallKind::Write
        } else if headers.contains_key(header::IF_NONE_MATCH)
            || headers.contains_key(header::IF_MODIFIED_SINCE)
        {
            UpstreamCallKind::Revalidate
        } else {
            UpstreamCallKind::Fetch
        };
        UpstreamCall {
            span,
            started: Instant::now(),
            status: None,
            kind,
            method: method.clone(),
        }
    }

    /// Records the upstream's answer (the last one, if the cache asked more than once).
    pub fn upstream_answered(&self, call: &mut UpstreamCall, status: StatusCode) {
        call.status = Some(status);
        let elapsed = call.started.elapsed();
        self.observers
            .metrics
            .upstream_answered(&call.method, call.kind, status, elapsed);
        let mut report = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        report.status = Some(status);
        report.elapsed = Some(elapsed);
    }

    /// The fail-closed intent record for this request.
    pub fn intent_record(&self) -> Vec<u8> {
        let mut r = self.record_base("intent");
        r.cache = None;
        r.to_open_json()
    }

    fn record_base(&self, phase: &'static str) -> Record<'_> {
        let path = self.uri().path();
        let span = self.trace.span();
        let sc = span.span_context();
        Record {
            ts: humantime::format_rfc3339_millis(self.received_at).to_string(),
            phase,
            request_id: self.request_id.to_str().unwrap_or_default(),
            // The same lowercase hex as their Display, without the formatter.
            trace_id: hex::encode(sc.trace_id().to_bytes()),
            span_id: hex::encode(sc.span_id().to_bytes()),
            client: Client {
                addr: self.client_addr.as_ref().map(|a| &*a.text),
                id: self.client.get().map(|c| c.id.as_ref()),
                auth: self.client.get().map(|c| c.method.as_str()),
            },
            rule: self.decision.get().map(|d| d.rule.as_ref()),
            credential: self.decision.get().map(|d| d.credential.as_ref()),
            method: self.method().as_str(),
            wire_method: self.effective_method.get().map(|_| self.method.as_str()),
            path,
            query: self.uri().query(),
            resource: Resource::parse(path),
            status: None,
            upstream_status: None,
            cache: None,
            if_match: self.if_match.as_ref().and_then(|v| v.to_str().ok()),
            etag: None,
            bytes_in: None,
            bytes_out: None,
            duration_ms: None,
            upstream_ms: None,
            error: None,
            complete: None,
        }
    }
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

impl Exchange {
    /// The ids every log line about this request carries.
    pub fn log_ids(&self) -> LogIds {
        LogIds {
            request_id: self.request_id.clone(),
            trace_id: self.trace.span().span_context().trace_id(),
        }
    }
}

/// An upstream call in progress: its client span and start time.
#[derive(Debug)]
pub struct UpstreamCall {
    span: opentelemetry::Context,
    started: Instant,
    status: Option<StatusCode>,
    kind: UpstreamCallKind,
    method: Method,
}

impl UpstreamCall {
    /// Ends the client span now (the call failed, or its response body ended).
    pub fn end(&self, status: Option<StatusCode>, error: Option<&'static str>) {
        telemetry::end_span(&self.span, status, error, true);
    }
}

impl TapHook for UpstreamCall {
    fn data(&mut self, _len: usize) {}
    fn end(&mut self, complete: bool) {
        let error = (!complete).then_some("response_body_incomplete");
        UpstreamCall::end(self, self.status, error);
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    observers: Arc<Observers>,
}

impl ObserveLayer {
    /// Reports to `observers`.
    pub fn new(observers: Arc<Observers>) -> Self {
        Self { observers }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            observers: self.observers.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    observers: Arc<Observers>,
}

/// Counts request body bytes into the exchange.
#[derive(Debug)]
pub struct CountIn(Arc<Exchange>);

impl TapHook for CountIn {
    fn data(&mut self, len: usize) {
        self.0.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    }
    fn end(&mut self, _complete: bool) {}
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<Tap<B, CountIn>>, Response = Response<Body>, Error = Infallible>,
    B: http_body::Body,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let client_addr = req.extensions().get::<ClientAddr>().cloned();
        let trace = self.observers.telemetry.server_span(ServerRequest {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            version: req.version(),
            scheme: "http",
            route: record::route(req.uri().path()),
            client_addr: client_addr.as_ref().map(|a| a.addr),
        });
        let exchange = Arc::new(Exchange {
            received_at: SystemTime::now(),
            started: Instant::now(),
            request_id: req
                .extensions()
                .get::<RequestId>()
                .map(|id| id.0.clone())
                .unwrap_or_else(|| HeaderValue::from_static("-")),
            method: req.method().clone(),
            uri: req.uri().clone(),
            effective_method: OnceLock::new(),
            canonical_uri: OnceLock::new(),
            if_match: req.headers().get(header::IF_MATCH).cloned(),
            client_addr,
            client: OnceLock::new(),
            decision: OnceLock::new(),
            trace,
            bytes_in: AtomicU64::new(0),
            upstream: Mutex::new(UpstreamReport::default()),
            observers: self.observers.clone(),
        });
        self.observers.metrics.request_started();
        let completion = Completion {
            exchange: exchange.clone(),
            response: None,
            bytes_out: 0,
            done: false,
        };
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(exchange.clone());
        let req = Request::from_parts(parts, Tap::new(body, CountIn(exchange)));
        ObserveFuture {
            inner: self.inner.call(req),
            completion: Some(completion),
        }
    }
}

pin_project_lite::pin_project! {
    /// Wraps the response body so the exchange completes when it ends.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        // Dropped unfinished when the client goes away before the response: recorded as 499.
        completion: Option<Completion>,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let Some(mut completion) = this.completion.take() else {
            return Poll::Ready(Ok(response));
        };
        completion.response = Some(Answered::from(
            &response,
            *completion.exchange.method() == Method::HEAD,
        ));
        Poll::Ready(Ok(response.map(|b| body::boxed(Tap::new(b, completion)))))
    }
}

/// What the response said, taken when its headers left.
#[derive(Debug)]
struct Answered {
    status: StatusCode,
    cache: Option<CacheStatus>,
    etag: Option<String>,
    error: Option<&'static str>,
    /// A body that is empty by definition (HEAD, 204, 304) is complete when dropped.
    bodiless: bool,
}

impl Answered {
    fn from(response: &Response<Body>, head: bool) -> Self {
        let status = response.status();
        Self {
            status,
            cache: response.extensions().get::<CacheStatus>().cloned(),
            etag: response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(record::unquote_etag),
            error: response.extensions().get::<GatewayMade>().map(|g| g.kind),
            bodiless: head
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED,
        }
    }
}

/// Completes an exchange exactly once: when the response body ends, or when it (or the response
/// future, before there was a response) is dropped.
#[derive(Debug)]
struct Completion {
    exchange: Arc<Exchange>,
    response: Option<Answered>,
    bytes_out: u64,
    done: bool,
}

impl TapHook for Completion {
    fn data(&mut self, len: usize) {
        self.bytes_out += len as u64;
    }
    fn end(&mut self, complete: bool) {
        self.finish(complete);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Completion {
    fn finish(&mut self, complete: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let ex = &*self.exchange;
        let observers = &ex.observers;
        let duration = ex.started.elapsed();
        let complete = complete || self.response.as_ref().is_some_and(|r| r.bodiless);
        let upstream = *ex.upstream.lock().unwrap_or_else(|e| e.into_inner());
        let (status, error) = match &self.response {
            Some(r) if complete || r.error.is_some() => (r.status, r.error),
            Some(r) => (r.status, Some("client_closed")),
            None => (
                StatusCode::from_u16(CLIENT_CLOSED).expect("499 is a valid status"),
                Some("client_closed"),
            ),
        };
        let cache = self.response.as_ref().and_then(|r| r.cache.as_ref());
        let cache_label = cache.map_or("bypass", CacheStatus::label);

        let span = ex.trace.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("cloudcasa_gateway.cache.status", cache_label));
            if let Some(c) = cache
                && let Ok(detail) = c.header_value().to_str()
            {
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.cache.detail",
                    detail.to_owned(),
                ));
            }
            span.set_attribute(KeyValue::new(
                "http.response.body.size",
                self.bytes_out as i64,
            ));
            if let Some(client) = ex.client.get() {
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.client.id",
                    client.id.to_string(),
                ));
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.client.auth",
                    client.method.as_str(),
                ));
            }
            if let Some(d) = ex.decision.get() {
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.policy.rule",
                    d.rule.to_string(),
                ));
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.credential",
                    d.credential.to_string(),
                ));
            }
        }
        if let Some(client) = ex.client.get() {
            observers.metrics.client_request(&client.id, status);
        }
        telemetry::end_span(&ex.trace, Some(status), error, false);

        observers
            .metrics
            .request_finished(ex.method(), status, cache_label, error, duration);

        if let Some(audit) = &observers.audit {
            let mut r = ex.record_base("outcome");
            r.status = Some(status.as_u16());
            r.upstream_status = upstream.status.map(|s| s.as_u16());
            r.cache = Some(cache_label);
            r.etag = self.response.as_ref().and_then(|r| r.etag.clone());
            r.bytes_in = Some(ex.bytes_in.load(Ordering::Relaxed));
            r.bytes_out = Some(self.bytes_out);
            r.duration_ms = Some(record::millis(duration));
            r.upstream_ms = upstream.elapsed.map(record::millis);
            r.error = error;
            r.complete = Some(complete);
            audit.record(r.to_open_json(), || ex.log_ids());
        }
    }
}
