//! Accounting for every request: the server span, the audit record and the request metrics, all
//! completed in one place when the response body ends or the client goes away.
//!
//! [`ObserveLayer`] sits above everything that can refuse a request, so refusals are accounted for
//! too. It puts an [`Exchange`] into the request extensions: the layers below record what only
//! they know (the canonical request, who the client is, the rule, why a request was refused, the
//! upstream's status and time), and this layer, the exchange's reader, turns those facts into the
//! audit record, the span's attributes and the metrics, so no layer counts its own outcomes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};

use crate::context::{CacheOutcome, ClientAddr, Exchange, GatewayMade};
use crate::http::body::{self, Body, Tap, TapHook};
use crate::http::headers::{CACHE_STATUS, X_REQUEST_ID};
use crate::http::resource;
use crate::observability::audit::AuditLog;
use crate::observability::audit::record::{self, Record};
use crate::observability::metrics::Metrics;
use crate::observability::telemetry::{self, ServerRequest, Telemetry};

/// The status recorded when the client went away before the response was complete (as nginx).
pub const CLIENT_CLOSED: u16 = 499;
/// The error kind of a response whose body broke off at its source after the headers were sent
/// (the upstream reset, closed or paused past `upstream.timeout` mid-body): the client got a
/// truncated response through no fault of its own.
pub const UPSTREAM_BODY: &str = "upstream_body";

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
        self.0.add_bytes_in(len as u64);
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
            uri: req.uri(),
            headers: req.headers(),
            version: req.version(),
            scheme: "http",
            route: resource::route(req.uri().path()),
            client_addr: client_addr.as_ref().map(|a| a.addr),
        });
        let exchange = Arc::new(Exchange::new(
            // As the request id layer settled it (see `request_id`).
            req.headers()
                .get(&X_REQUEST_ID)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("-")),
            req.method().clone(),
            req.uri().clone(),
            req.headers().get(header::IF_MATCH).cloned(),
            client_addr,
            trace,
        ));
        self.observers.metrics.request_started();
        let completion = Completion {
            exchange: exchange.clone(),
            observers: self.observers.clone(),
            response: None,
            bytes_out: 0,
            body_failed: false,
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
        let Ok(mut response) = ready!(this.inner.poll(cx));
        let Some(mut completion) = this.completion.take() else {
            return Poll::Ready(Ok(response));
        };
        // What the cache did, on whatever the response became (an error rendered by rescue too).
        if let Some(report) = completion.exchange.cache() {
            response
                .headers_mut()
                .insert(CACHE_STATUS.clone(), report.header.clone());
        }
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
    /// The response's ETag, kept as the header value (a reference count, no copy): it is
    /// unquoted only when an audit record needs it.
    etag: Option<HeaderValue>,
    error: Option<&'static str>,
    /// A body that is empty by definition (HEAD, 204, 304) is complete when dropped.
    bodiless: bool,
}

impl Answered {
    fn from(response: &Response<Body>, head: bool) -> Self {
        let status = response.status();
        Self {
            status,
            etag: response.headers().get(header::ETAG).cloned(),
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
    observers: Arc<Observers>,
    response: Option<Answered>,
    bytes_out: u64,
    /// The response body broke off at its source, after the headers went out: the upstream
    /// reset, closed or stalled, not the client.
    body_failed: bool,
    done: bool,
}

impl TapHook for Completion {
    fn data(&mut self, len: usize) {
        self.bytes_out += len as u64;
    }
    fn end(&mut self, complete: bool) {
        self.finish(complete);
    }
    fn failed(&mut self) {
        self.body_failed = true;
        self.finish(false);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Why a request ended without its client: `client_closed`, unless the gateway closed the
/// connection itself (and said why on it).
fn abandoned_for(ex: &Exchange) -> &'static str {
    ex.client_addr
        .as_ref()
        .and_then(ClientAddr::closed_for)
        .unwrap_or("client_closed")
}

impl Completion {
    fn finish(&mut self, complete: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let ex = &*self.exchange;
        let observers = &*self.observers;
        let duration = ex.started.elapsed();
        let complete = complete || self.response.as_ref().is_some_and(|r| r.bodiless);
        let upstream = ex.upstream();
        let (status, error) = match &self.response {
            Some(r) if complete || r.error.is_some() => (r.status, r.error),
            Some(r) if self.body_failed => (r.status, Some(UPSTREAM_BODY)),
            // Ended without the client: it left, or the gateway closed its connection (it
            // stopped reading: `send_timeout`).
            Some(r) => (r.status, Some(abandoned_for(ex))),
            None => (
                StatusCode::from_u16(CLIENT_CLOSED).expect("499 is a valid status"),
                Some(abandoned_for(ex)),
            ),
        };
        let cache = ex.cache();
        let outcome = cache.map_or(CacheOutcome::Bypass, |c| c.outcome);
        let cache_label = outcome.as_str();

        telemetry::describe_request(&ex.trace, ex.method(), ex.overridden_from(), ex.uri());
        let span = ex.trace.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("cloudcasa_gateway.cache.status", cache_label));
            if let Some(c) = cache
                && let Ok(detail) = c.header.to_str()
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
            if let Some(client) = ex.client() {
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.client.id",
                    client.id.to_string(),
                ));
                span.set_attribute(KeyValue::new(
                    "cloudcasa_gateway.client.auth",
                    client.method.as_str(),
                ));
            }
            if let Some(d) = ex.decision() {
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
        if let Some(client) = ex.client() {
            observers.metrics.client_request(&client.id, status);
        }
        if let Some(refusal) = ex.refusal() {
            observers
                .metrics
                .client_denied(ex.client().map(|c| &c.id), refusal.as_str());
        }
        if let Some(review) = ex.review() {
            observers
                .metrics
                .token_reviews
                .reviewed(review.result.as_str(), review.elapsed);
        }
        telemetry::end_span(&ex.trace, Some(status), error, false);

        observers
            .metrics
            .request_finished(ex.method(), status, outcome, error, duration);

        if let Some(audit) = &observers.audit {
            let mut r = Record::of(ex, "outcome");
            r.status = Some(status.as_u16());
            r.upstream_status = upstream.status.map(|s| s.as_u16());
            r.cache = Some(cache_label);
            r.etag = self
                .response
                .as_ref()
                .and_then(|r| r.etag.as_ref())
                .and_then(|v| v.to_str().ok())
                .map(record::unquote_etag);
            r.bytes_in = Some(ex.bytes_in());
            r.bytes_out = Some(self.bytes_out);
            r.duration_ms = Some(record::millis(duration));
            r.upstream_ms = upstream.elapsed.map(record::millis);
            r.error = error;
            r.complete = Some(complete);
            audit.record(&r, || ex.log_ids());
        }
    }
}
