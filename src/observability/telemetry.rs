//! OpenTelemetry traces: the tracer, W3C trace-context propagation, and the two spans the gateway
//! makes (a server span per request, a client span per upstream call).
//!
//! Every request gets a span context (trace id, span id), because audit records and the
//! upstream's `traceparent` carry them whether or not spans are exported; export (OTLP over
//! HTTP/protobuf, batched on the SDK's own thread) is added only when `telemetry.otlp_endpoint`
//! or `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and without it the spans are not recorded at all:
//! their contexts are made without the SDK's span machinery. A slow or failing
//! collector costs dropped spans, never request latency: the batch queue is bounded and spans are
//! handed over without waiting.

use std::borrow::Cow;
use std::sync::Arc;

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::TelemetryConfig;

/// The OTLP exporter could not be built (a bad endpoint in the `OTEL_*` variables).
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// The tracer and propagator, shared by every request.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Span batches the exporter failed to deliver.
    failures: prometheus_client::metrics::counter::Counter,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Spans leave the process (an OTLP endpoint is set). Without export, spans are never
    /// recorded and are made without the SDK (see [`unrecorded_child`]).
    exporting: bool,
}

/// The environment variable that turns on OTLP export without a config entry.
const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

impl Telemetry {
    /// Builds the tracer; adds the OTLP exporter when an endpoint is configured.
    pub fn new(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let failures = prometheus_client::metrics::counter::Counter::default();
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Ok(value) = std::env::var(name)
                && value != "http/protobuf"
            {
                tracing::warn!(
                    variable = name,
                    value,
                    "only OTLP over HTTP with protobuf (http/protobuf) is supported; this value is \
                     ignored and spans are sent as http/protobuf"
                );
            }
        }
        let env_endpoint = [OTLP_TRACES_ENDPOINT_ENV, OTLP_ENDPOINT_ENV]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
        // OTEL_SERVICE_NAME, when set, wins over the file (the standard variables are honoured).
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(config.service_name.clone());
        }
        let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
        let exporting = config.otlp_endpoint.is_some() || env_endpoint;
        if exporting {
            // reqwest (inside the exporter) uses rustls with the process-wide provider: ring, as
            // everywhere else in the gateway. Already installed is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(base) = &config.otlp_endpoint {
                exporter = exporter.with_endpoint(traces_url(base));
            }
            let exporter = exporter
                .build()
                .map_err(|e| TelemetryError(e.to_string()))?;
            builder = builder.with_batch_exporter(Counted {
                inner: exporter,
                failures: failures.clone(),
                last_logged: Arc::default(),
            });
        }
        if !exporting {
            // Nothing leaves the process: nothing is recorded. The request path does not use the
            // tracer then (`unrecorded_child` gives its spans the ids and flags this sampler
            // would); the sampler keeps any other span unrecorded too.
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        }
        let provider = builder.build();
        let tracer = provider.tracer("cloudcasa-gateway");
        Ok(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            failures,
            exporting,
        })
    }

    /// Span batches that could not be exported (`telemetry_export_failures_total`).
    pub fn export_failures(&self) -> prometheus_client::metrics::counter::Counter {
        self.failures.clone()
    }

    /// Starts the server span for a request, continuing the client's `traceparent` /
    /// `tracestate` when they are valid. The returned context holds the span.
    pub fn server_span(&self, request: ServerRequest<'_>) -> Context {
        // Most requests carry no trace context: a lookup by a static name settles that.
        let parent = if request.headers.contains_key(&TRACEPARENT) {
            self.propagator.extract(&HeaderExtractor(request.headers))
        } else {
            Context::current()
        };
        if !self.exporting {
            return unrecorded_child(&parent);
        }
        // Attributes only for spans that are recorded.
        let mut span = self
            .tracer
            .span_builder(request.route)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        // The method, path and route are recorded when the request ends (`describe_request`):
        // they are the effective ones, known only after the canonical layer ran.
        if span.is_recording() {
            let mut attributes = Vec::with_capacity(6);
            attributes.push(KeyValue::new("url.scheme", request.scheme));
            attributes.push(KeyValue::new(
                "network.protocol.version",
                protocol_version(request.version),
            ));
            if let Some(addr) = request.client_addr {
                attributes.push(KeyValue::new("client.address", addr.ip().to_string()));
                attributes.push(KeyValue::new("client.port", i64::from(addr.port())));
            }
            if let Some(agent) = request
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
            {
                attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
            }
            span.set_attributes(attributes);
        }
        parent.with_span(span)
    }

    /// Starts a client span under `parent` for an upstream call and writes its `traceparent`
    /// (and the inherited `tracestate`) into the outgoing headers, replacing the client's.
    pub fn client_span(
        &self,
        parent: &Context,
        method: &Method,
        url: &Uri,
        headers: &mut HeaderMap,
    ) -> Context {
        let cx = if self.exporting {
            self.recorded_client_span(parent, method, url)
        } else {
            unrecorded_child(parent)
        };
        // The client's trace context never reaches the upstream as it was sent: `traceparent`
        // is replaced (`insert` drops every value), or removed when there is none to write.
        headers.remove(&TRACESTATE);
        if !write_traceparent(&cx, headers) {
            headers.remove(&TRACEPARENT);
        }
        cx
    }

    fn recorded_client_span(&self, parent: &Context, method: &Method, url: &Uri) -> Context {
        let mut span = self
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, parent);
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.full", url.to_string()),
            ];
            if let Some(host) = url.host() {
                attributes.push(KeyValue::new("server.address", host.to_owned()));
            }
            let port = url.port_u16().unwrap_or(match url.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            attributes.push(KeyValue::new("server.port", i64::from(port)));
            span.set_attributes(attributes);
        }
        parent.with_span(span)
    }

    /// Flushes queued spans and stops the exporter (at shutdown; blocks up to `timeout`).
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %e, "telemetry: spans may have been lost at shutdown");
        }
    }
}

/// A child of `parent` that is not recorded, for when no span leaves the process: the span
/// context the SDK gives a child under the sampler it uses then (`ParentBased(AlwaysOff)`: the
/// parent's trace id, sampled flag and trace state; a new trace, not sampled, without a valid
/// parent) and a new span id, without building the SDK's span, which no processor would see.
/// Ids come from the SDK's own generator.
fn unrecorded_child(parent: &Context) -> Context {
    let ids = RandomIdGenerator::default();
    let span = parent.span();
    let p = span.span_context();
    let context = if p.is_valid() {
        let flags = if p.is_sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            p.trace_id(),
            ids.new_span_id(),
            flags,
            false,
            p.trace_state().clone(),
        )
    } else {
        SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::default(),
            false,
            TraceState::NONE,
        )
    };
    parent.with_remote_span_context(context)
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Writes the W3C `traceparent` for the span in `cx` (and `tracestate`, when it has one) into
/// `headers`, replacing any there; false when `cx` has no valid span context to write. The
/// bytes are what the SDK's `TraceContextPropagator` writes, hex-encoded into a fixed buffer
/// instead of through `format!`, because every upstream call does it.
fn write_traceparent(cx: &Context, headers: &mut HeaderMap) -> bool {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return false;
    }
    // version "00", trace id, span id, flags (only "sampled" is defined)
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let flags = [sc.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8()];
    let hex_into = |out: &mut [u8], bytes: &[u8]| {
        const_hex::encode_to_slice(bytes, out).expect("the buffer holds two digits per byte");
    };
    hex_into(&mut value[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut value[36..52], &sc.span_id().to_bytes());
    hex_into(&mut value[53..55], &flags);
    headers.insert(
        TRACEPARENT.clone(),
        HeaderValue::from_bytes(&value).expect("hex digits and dashes"),
    );
    let state = sc.trace_state().header();
    if !state.is_empty()
        && let Ok(state) = HeaderValue::from_str(&state)
    {
        headers.insert(TRACESTATE.clone(), state);
    }
    true
}

/// A span name from a method, without allocating for the standard ones.
fn method_name(method: &Method) -> Cow<'static, str> {
    crate::observability::metrics::standard_method(method)
        .map_or_else(|| Cow::Owned(method.as_str().to_owned()), Cow::Borrowed)
}

/// Names the server span after the request the upstream executes, once it is known: the span
/// is named `"{method} {route}"` and carries the effective method (and the wire method when an
/// override replaced it), the canonical path and its query. Set once, at the end, so the span
/// never holds two values for one attribute.
pub fn describe_request(cx: &Context, method: &Method, wire_method: Option<&Method>, uri: &Uri) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    let route = crate::http::resource::route(uri.path());
    span.update_name(format!("{method} {route}"));
    span.set_attribute(KeyValue::new(
        "http.request.method",
        method.as_str().to_owned(),
    ));
    if let Some(wire) = wire_method {
        span.set_attribute(KeyValue::new(
            "http.request.method_original",
            wire.as_str().to_owned(),
        ));
    }
    span.set_attribute(KeyValue::new("url.path", uri.path().to_owned()));
    if let Some(query) = uri.query() {
        span.set_attribute(KeyValue::new("url.query", query.to_owned()));
    }
    span.set_attribute(KeyValue::new("http.route", route));
}

/// What the server span is made from.
#[derive(Debug)]
pub struct ServerRequest<'a> {
    /// The client's request target.
    pub uri: &'a Uri,
    /// The client's headers (for trace context and user agent).
    pub headers: &'a HeaderMap,
    /// The HTTP version the client spoke.
    pub version: Version,
    /// `http` or `https`, as the listener speaks.
    pub scheme: &'static str,
    /// The route template, e.g. `/api/v1/{collection}/{id}`.
    pub route: &'static str,
    /// The peer address.
    pub client_addr: Option<std::net::SocketAddr>,
}

/// Ends a span with the response status. Following the HTTP semantic conventions, a server span
/// is an error from 500 up and a client span from 400 up; a gateway-made error sets `error.type`
/// to its kind.
pub fn end_span(
    cx: &Context,
    status: Option<StatusCode>,
    error: Option<&'static str>,
    client: bool,
) {
    let span = cx.span();
    if !span.is_recording() {
        span.end();
        return;
    }
    if let Some(status) = status {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
    }
    let failed_status = status.filter(|s| s.is_server_error() || (client && s.is_client_error()));
    match (error, failed_status) {
        (Some(kind), _) => {
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(kind));
        }
        (None, Some(status)) => {
            span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            span.set_status(Status::error(""));
        }
        (None, None) => {}
    }
    span.end();
}

/// The OTLP traces URL for a base endpoint such as `http://otel-collector:4318`.
pub fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry() -> Telemetry {
        Telemetry::new(&TelemetryConfig {
            otlp_endpoint: None,
            service_name: "t".into(),
        })
        .unwrap()
    }

    /// A caller's sampled trace context.
    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// The client span `t` starts under `cx` for an upstream call, writing into `headers`.
    fn upstream(t: &Telemetry, cx: &Context, method: &Method, headers: &mut HeaderMap) -> Context {
        t.client_span(cx, method, &"https://api.x/a".parse().unwrap(), headers)
    }

    fn server(t: &Telemetry, headers: &HeaderMap) -> Context {
        t.server_span(ServerRequest {
            uri: &"/api/v1/clusters".parse().unwrap(),
            headers,
            version: Version::HTTP_11,
            scheme: "http",
            route: "/api/v1/{collection}",
            client_addr: None,
        })
    }

    #[test]
    fn continues_the_callers_trace_and_propagates_a_child() {
        let t = telemetry();
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", CALLER.parse().unwrap());
        incoming.insert("tracestate", "vendor=x".parse().unwrap());
        let cx = server(&t, &incoming);
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(sc.span_id().to_string(), "00f067aa0ba902b7");

        let mut out = incoming.clone();
        let client = upstream(&t, &cx, &Method::GET, &mut out);
        let child = client.span().span_context().span_id().to_string();
        let sent = out["traceparent"].to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{child}-01")
        );
        assert_eq!(out["tracestate"], "vendor=x");
    }

    /// What the client sent as trace context never reaches the upstream as sent: repeated
    /// `traceparent` lines become the one the gateway writes, and a `tracestate` that came
    /// with no valid parent is dropped.
    #[test]
    fn the_clients_trace_headers_are_replaced_not_added_to() {
        let t = telemetry();
        let mut incoming = HeaderMap::new();
        incoming.append("traceparent", "00-zz-yy-01".parse().unwrap());
        incoming.append("traceparent", CALLER.parse().unwrap());
        incoming.insert("tracestate", "vendor=forged".parse().unwrap());
        let cx = server(&t, &incoming);
        let mut out = incoming.clone();
        let client = upstream(&t, &cx, &Method::PATCH, &mut out);
        let sc = client.span().span_context().clone();
        let sent: Vec<_> = out.get_all("traceparent").iter().collect();
        assert_eq!(
            sent,
            [&format!("00-{}-{}-00", sc.trace_id(), sc.span_id())],
            "exactly one traceparent, the gateway's"
        );
        assert!(out.get("tracestate").is_none(), "{out:?}");
    }

    /// Without export, a span's context is what the SDK would give it under the sampler it uses
    /// then: for no parent, an unsampled parent and a sampled parent with a trace state, the
    /// same trace id (or a new valid one), sampled flag and trace state, a new span id, and
    /// nothing recorded.
    #[test]
    fn unrecorded_spans_get_the_context_the_sdk_would_give_them() {
        let sdk = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build()
            .tracer("t");
        let remote = |flags: TraceFlags, state: &str| {
            Context::new().with_remote_span_context(SpanContext::new(
                opentelemetry::trace::TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
                opentelemetry::trace::SpanId::from(0x00f0_67aa_0ba9_02b7),
                flags,
                true,
                state.parse().unwrap(),
            ))
        };
        for parent in [
            Context::new(),
            remote(TraceFlags::default(), ""),
            remote(TraceFlags::SAMPLED, "vendor=x"),
        ] {
            let ours = unrecorded_child(&parent);
            let theirs = parent.with_span(sdk.start_with_context("s", &parent));
            let (o, t) = (ours.span(), theirs.span());
            let (o, t) = (o.span_context(), t.span_context());
            assert!(o.is_valid());
            let p = parent.span().span_context().clone();
            if p.is_valid() {
                assert_eq!(o.trace_id(), t.trace_id());
                assert_ne!(o.span_id(), p.span_id());
            } else {
                assert_ne!(o.trace_id(), t.trace_id(), "a new trace each time");
            }
            assert_eq!(o.trace_flags(), t.trace_flags());
            assert_eq!(o.trace_state().header(), t.trace_state().header());
            assert!(!ours.span().is_recording());
        }
    }

    #[test]
    fn starts_a_new_trace_without_or_with_a_bad_traceparent() {
        let t = telemetry();
        let mut bad = HeaderMap::new();
        bad.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        let a = server(&t, &HeaderMap::new());
        let b = server(&t, &bad);
        for cx in [&a, &b] {
            assert!(cx.span().span_context().is_valid());
        }
        assert_ne!(
            a.span().span_context().trace_id(),
            b.span().span_context().trace_id()
        );
    }

    #[test]
    fn write_traceparent_matches_and_round_trips_the_sdk_propagator() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceId, TraceState};
        let propagator = TraceContextPropagator::new();
        let state = TraceState::from_key_value([("vendor", "x"), ("other", "1")]).unwrap();
        for (flags, state) in [
            (TraceFlags::SAMPLED, TraceState::default()),
            (TraceFlags::default(), TraceState::default()),
            (TraceFlags::SAMPLED, state),
        ] {
            let sc = SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                state,
            );
            let cx = Context::new().with_remote_span_context(sc);
            let mut ours = HeaderMap::new();
            write_traceparent(&cx, &mut ours);
            let mut theirs = HeaderMap::new();
            propagator.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut theirs));
            assert_eq!(ours["traceparent"], theirs["traceparent"]);
            // The SDK writes an empty tracestate when there is none; the gateway leaves it out.
            let state = theirs.get("tracestate").filter(|v| !v.is_empty());
            assert_eq!(ours.get("tracestate"), state);
            // And it round-trips: the propagator reads back the span context that was written.
            let back = propagator.extract(&opentelemetry_http::HeaderExtractor(&ours));
            let back = back.span();
            let back = back.span_context();
            let sent = cx.span().span_context().clone();
            assert_eq!(back.trace_id(), sent.trace_id());
            assert_eq!(back.span_id(), sent.span_id());
            assert_eq!(back.trace_flags(), sent.trace_flags());
            assert_eq!(back.trace_state().header(), sent.trace_state().header());
        }
        let mut none = HeaderMap::new();
        write_traceparent(&Context::new(), &mut none);
        assert!(none.is_empty(), "an invalid span context writes nothing");
    }

    #[test]
    fn traces_url_joins() {
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    }
}

/// The OTLP exporter, with its failures counted and logged (the first, then at most one line a
/// minute): with the OpenTelemetry crates' own logging off, an unreachable collector would
/// otherwise lose spans in silence.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    failures: prometheus_client::metrics::counter::Counter,
    last_logged: Arc<crate::observability::logging::LogEvery>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.failures.inc();
            if self.last_logged.due(Duration::from_secs(60)) {
                tracing::warn!(error = %e, spans, "telemetry: spans could not be exported (logged at most once a minute; counted in cloudcasa_gateway_telemetry_export_failures_total)");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}
