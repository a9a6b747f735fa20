//! The CloudCasa upstream: URL rewriting, protocol hygiene, the pooled TLS client and its timeouts.
//!
//! Requests are sent to the configured base URL only: the client's target contributes its path and
//! query, byte for byte, and nothing else, so an absolute-form target cannot redirect the gateway.
//! Two pools are kept: reads may be retried by hyper when a pooled connection turns out dead
//! before the request was written; writes never are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::Body as _;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use tower::Service;

use crate::config::UpstreamConfig;
use crate::context::Exchange;
use crate::http::body::{
    self, Body, BodyTimedOut, BodyTooLarge, BoxError, Budget, ClientBodyError, Collected, Deadline,
    PrefixedBody, Reservation, Tap, collect_limited,
};
use crate::http::error::{GatewayError, find_cause};
use crate::http::headers::strip_hop_by_hop;
use crate::http::pem::add_pem_roots;
use crate::observability::metrics::{Metrics, UpstreamCallKind};
use crate::observability::telemetry::{self, Telemetry};

type Connector = TimeoutConnector<HttpsConnector<Route>>;
/// The pooled client used for CloudCasa.
pub type HttpClient = Client<Connector, Body>;

static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Errors building the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// The CA bundle is unusable.
    #[error("upstream.ca_file: {0}")]
    CaFile(#[source] crate::http::pem::PemError),
    /// rustls refused the configuration.
    #[error("upstream: TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The proxy credentials file cannot be read.
    #[error("upstream.proxy_credentials_file: {0}")]
    ProxyCredentials(String),
}

/// How connections to the upstream are made: directly, or through an HTTP proxy's CONNECT
/// tunnel (TLS to the upstream runs inside it, so the proxy sees neither the token nor the
/// traffic).
#[derive(Clone)]
pub enum Route {
    /// TCP to the upstream.
    Direct(HttpConnector),
    /// CONNECT through the proxy.
    Tunnel(Tunnel<HttpConnector>),
}

impl Service<Uri> for Route {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Self::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Self::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Self::Tunnel(c) => {
                let f = c.call(dst);
                Box::pin(async move {
                    f.await
                        .map_err(|e| Box::new(ProxyFailed(e.into())) as BoxError)
                })
            }
        }
    }
}

/// The CONNECT tunnel through `upstream.proxy` could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("through the proxy: {0}")]
pub struct ProxyFailed(#[source] BoxError);

/// A proxy, its `Proxy-Authorization`, and where the choice came from.
type ChosenProxy = (Uri, Option<HeaderValue>, &'static str);

/// The proxy to use for `upstream` and its `Proxy-Authorization`, with where the choice came
/// from: `upstream.proxy`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` unless `NO_PROXY` names
/// the upstream's host (hyper-util's matcher, curl's rules).
fn choose_proxy(config: &UpstreamConfig) -> Result<Option<ChosenProxy>, UpstreamSetupError> {
    if let Some(proxy) = &config.proxy {
        let auth = match &config.proxy_credentials_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    UpstreamSetupError::ProxyCredentials(format!("{}: {e}", path.display()))
                })?;
                let text = text.trim();
                if !text.contains(':') {
                    return Err(UpstreamSetupError::ProxyCredentials(format!(
                        "{} must hold user:password",
                        path.display()
                    )));
                }
                let encoded = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    text.as_bytes(),
                );
                let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|e| UpstreamSetupError::ProxyCredentials(e.to_string()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        return Ok(Some((proxy.clone(), auth, "upstream.proxy")));
    }
    let matcher = hyper_util::client::proxy::matcher::Matcher::from_env();
    Ok(matcher.intercept(&config.url).map(|i| {
        (
            i.uri().clone(),
            i.basic_auth().cloned(),
            "the proxy environment variables",
        )
    }))
}

/// The upstream service: the bottom of the stack. Cloned for every request by the layers above
/// (tower's ready-clone pattern), so it is one `Arc`.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<UpstreamInner>,
}

struct UpstreamInner {
    scheme: Scheme,
    authority: Authority,
    prefix: Arc<str>,
    reads: HttpClient,
    writes: HttpClient,
    timeout: Duration,
    /// The upstream's last response was HTTP/1.0: chunked request bodies must be sent whole.
    http10: AtomicBool,
    /// `upstream.max_buffered_bodies`: what the request bodies read whole before sending hold,
    /// all together. Without it, every stream of every connection could hold a body (100
    /// streams of 1 MiB on one HTTP/2 connection).
    buffered: Budget,
    /// Where calls are reported: a client span each, and the upstream metrics.
    observers: Option<(Telemetry, Arc<Metrics>)>,
}

impl Upstream {
    /// Builds the clients for `config`; each call opens a client span with `telemetry` (under
    /// the request's server span) and is counted in `metrics`.
    pub fn new(
        config: &UpstreamConfig,
        telemetry: Telemetry,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamSetupError> {
        Self::build(config, Some((telemetry, metrics)))
    }

    /// What [`Upstream::new`] builds from files (the CA bundle, the proxy's credentials) and
    /// the environment (the proxy variables), without connecting: `--check` runs it, so that
    /// nothing it accepts fails at start.
    pub fn check(config: &UpstreamConfig) -> Result<(), UpstreamSetupError> {
        Self::build(config, None).map(drop)
    }

    fn build(
        config: &UpstreamConfig,
        observers: Option<(Telemetry, Arc<Metrics>)>,
    ) -> Result<Self, UpstreamSetupError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            add_pem_roots(&mut roots, path).map_err(UpstreamSetupError::CaFile)?;
        }
        let tls = crate::http::pem::client_config(roots)?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let route = match choose_proxy(config)? {
            None => Route::Direct(http),
            Some((proxy, auth, from)) => {
                // Never the credentials: the proxy's scheme, host and port only. (Not for
                // `--check`, which builds this without observers.)
                if observers.is_some() {
                    tracing::info!(
                        proxy = %format_args!("http://{}", proxy.authority().map_or("", |a| a.as_str()).rsplit('@').next().unwrap_or("")),
                        from,
                        "the upstream is reached through a proxy (CONNECT)"
                    );
                }
                let tunnel = Tunnel::new(proxy, http);
                Route::Tunnel(match auth {
                    Some(auth) => tunnel.with_auth(auth),
                    None => tunnel,
                })
            }
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(route);
        let connector = TimeoutConnector {
            inner: https,
            timeout: config.connect_timeout,
        };
        let client = |retry: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(config.pool_idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .retry_canceled_requests(retry)
                // A response streamed to a client that reads slowly is held back here, not
                // buffered: at most this much per upstream connection.
                .http1_max_buf_size(UPSTREAM_READ_BUFFER)
                .build(connector.clone())
        };
        let url = &config.url;
        Ok(Self {
            inner: Arc::new(UpstreamInner {
                scheme: url.scheme().cloned().unwrap_or(Scheme::HTTPS),
                authority: url
                    .authority()
                    .cloned()
                    .expect("validated: upstream.url has a host"),
                prefix: url.path().trim_end_matches('/').into(),
                reads: client(true),
                writes: client(false),
                timeout: config.timeout,
                http10: AtomicBool::new(false),
                buffered: Budget::new(config.max_buffered_bodies),
                observers,
            }),
        })
    }

    /// The upstream URI for a client's request target: only its path and query are used.
    pub fn target(&self, original: &Uri) -> Result<Uri, GatewayError> {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        if !pq.starts_with('/') {
            return Err(GatewayError::BadRequest(format!(
                "request target {pq:?} is not a path; send origin-form targets such as /api/v1/clusters"
            )));
        }
        let up = &*self.inner;
        let pq: PathAndQuery = match original.path_and_query() {
            // The client's own, already parsed and checked: a reference count, no copy.
            Some(pq) if up.prefix.is_empty() => pq.clone(),
            _ if up.prefix.is_empty() => PathAndQuery::from_static("/"),
            _ => format!("{}{}", up.prefix, pq)
                .parse()
                .map_err(|e| GatewayError::BadRequest(format!("request target: {e}")))?,
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(up.scheme.clone());
        parts.authority = Some(up.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|e| GatewayError::BadRequest(format!("request target: {e}")))
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Response<Body>, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let uri = match self.target(req.uri()) {
            Ok(uri) => uri,
            Err(e) => return std::future::ready(Err(e)).boxed(),
        };
        let exchange = Exchange::of(&req).cloned();
        let call = match (&exchange, &self.inner.observers) {
            (Some(ex), Some((telemetry, metrics))) => {
                let method = req.method().clone();
                Some(UpstreamCall::start(
                    telemetry,
                    metrics,
                    ex,
                    method,
                    &uri,
                    req.headers_mut(),
                ))
            }
            _ => None,
        };
        *req.uri_mut() = uri;
        // hyper picks HTTP/2 when ALPN offers it; the client's own version is its business.
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        // The client set Host for us; the upstream's is set by hyper from the URI.
        headers.remove(header::HOST);
        // What the cache keyed a request without Accept as (`policy::DEFAULT_ACCEPT`).
        if !headers.contains_key(header::ACCEPT) {
            headers.insert(header::ACCEPT, APPLICATION_JSON.clone());
        }
        if !headers.contains_key(header::CONTENT_TYPE) && !req.body().is_end_stream() {
            req.headers_mut()
                .insert(header::CONTENT_TYPE, APPLICATION_JSON.clone());
        }
        let retry_safe = is_retry_safe(req.method());
        let up = self.inner.clone();
        let timeout = up.timeout;
        async move {
            let http10 = up.http10.load(Ordering::Relaxed);
            let req = buffer_body(req, http10, &up.buffered).await?;
            let client = if retry_safe { &up.reads } else { &up.writes };
            if let Some(ex) = &exchange {
                ex.set_sent(true);
            }
            let sent = client.request(req);
            let result = match tokio::time::timeout(timeout, sent).await {
                Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
                Ok(Err(err)) => {
                    // No connection, so nothing was sent (TCP, TLS, the proxy's CONNECT).
                    if err.is_connect()
                        && let Some(ex) = &exchange
                    {
                        ex.set_sent(false);
                    }
                    Err(classify(err))
                }
                Ok(Ok(response)) => Ok(response),
            };
            let mut response = match (result, call) {
                (Err(err), Some(call)) => {
                    call.end(None, Some(err.kind()));
                    return Err(err);
                }
                (Err(err), None) => return Err(err),
                // An upstream that stalls mid-body must not hold its client, its connection
                // and what is queued for ever: no bytes for `upstream.timeout` while the body
                // is waited on ends it (a cache fill with 504, a response already under way
                // short: HTTP/1.1 closes the connection, HTTP/2 resets the stream). The clock
                // stops while the client is what is slow.
                (Ok(response), None) => response.map(|b| body::boxed(Deadline::new(b, timeout))),
                (Ok(response), Some(mut call)) => {
                    if let Some(ex) = &exchange {
                        call.answered(ex, response.status());
                    }
                    // The client span lasts until the upstream's body has been passed on.
                    response.map(|b| body::boxed(Tap::new(Deadline::new(b, timeout), call)))
                }
            };
            strip_hop_by_hop(response.headers_mut());
            // A proxy answers with its own HTTP version (RFC 9110 §2.5): an HTTP/1.0 upstream
            // must not make HTTP/1.1 clients close their connections.
            up.http10
                .store(response.version() == Version::HTTP_10, Ordering::Relaxed);
            *response.version_mut() = Version::HTTP_11;
            up.localize_locations(response.headers_mut());
            Ok(response)
        }
        .boxed()
    }
}

/// An upstream call in progress: its client span (ended when the upstream's body has been
/// passed on, or the call failed) and what the metrics need when it answers.
struct UpstreamCall {
    span: opentelemetry::Context,
    metrics: Arc<Metrics>,
    started: Instant,
    status: Option<http::StatusCode>,
    kind: UpstreamCallKind,
    method: Method,
}

impl UpstreamCall {
    /// Starts the client span under the request's server span, and writes `traceparent` into
    /// the outgoing headers.
    fn start(
        telemetry: &Telemetry,
        metrics: &Arc<Metrics>,
        ex: &Exchange,
        method: Method,
        url: &Uri,
        headers: &mut http::HeaderMap,
    ) -> Self {
        let span = telemetry.client_span(&ex.trace, &method, url, headers);
        let kind = if !is_retry_safe(&method) {
            UpstreamCallKind::Write
        } else if headers.contains_key(header::IF_NONE_MATCH)
            || headers.contains_key(header::IF_MODIFIED_SINCE)
        {
            UpstreamCallKind::Revalidate
        } else {
            UpstreamCallKind::Fetch
        };
        Self {
            span,
            metrics: metrics.clone(),
            started: Instant::now(),
            status: None,
            kind,
            method,
        }
    }

    /// Counts the upstream's answer and records it on the exchange.
    fn answered(&mut self, ex: &Exchange, status: http::StatusCode) {
        self.status = Some(status);
        let elapsed = self.started.elapsed();
        self.metrics
            .upstream_answered(&self.method, self.kind, status, elapsed);
        ex.set_upstream(status, elapsed);
    }

    /// Ends the client span now.
    fn end(&self, status: Option<http::StatusCode>, error: Option<&'static str>) {
        telemetry::end_span(&self.span, status, error, true);
    }
}

impl body::TapHook for UpstreamCall {
    fn data(&mut self, _len: usize) {}
    fn end(&mut self, complete: bool) {
        let error = (!complete).then_some("response_body_incomplete");
        UpstreamCall::end(self, self.status, error);
    }
}

impl UpstreamInner {
    /// Rewrites `Location` and `Content-Location` values that point at the upstream origin into
    /// paths on the gateway, the upstream's path prefix taken off (as nginx's default
    /// `proxy_redirect`): a client that follows one stays behind the gateway, where its requests
    /// get the token. Other hosts are left as they are.
    fn localize_locations(&self, headers: &mut http::HeaderMap) {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = headers.get(&name) else {
                continue;
            };
            if let Some(local) = self.local_path(value) {
                headers.insert(name, local);
            }
        }
    }

    fn local_path(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let uri: Uri = value.to_str().ok()?.parse().ok()?;
        let (scheme, authority) = (uri.scheme()?, uri.authority()?);
        let default_port = |s: &Scheme| if *s == Scheme::HTTPS { 443 } else { 80 };
        let same_origin = *scheme == self.scheme
            && authority.host().eq_ignore_ascii_case(self.authority.host())
            && authority.port_u16().unwrap_or(default_port(scheme))
                == self
                    .authority
                    .port_u16()
                    .unwrap_or(default_port(&self.scheme));
        if !same_origin {
            return None;
        }
        let path = uri.path().strip_prefix(&*self.prefix)?;
        if !(path.is_empty() || path.starts_with('/')) {
            return None;
        }
        let path = if path.is_empty() { "/" } else { path };
        let local = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        HeaderValue::from_str(&local).ok()
    }
}

fn is_retry_safe(method: &Method) -> bool {
    crate::http::is_read(method)
}

/// What one upstream HTTP/1 connection buffers of a response at most.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Request bodies with a `Content-Length` up to this size are read whole before sending.
const BUFFER_BODIES_UP_TO: u64 = 64 * 1024;
/// Request bodies of unknown length (chunked) up to this size are read whole and sent with a
/// `Content-Length`; past it they stream, unless the upstream speaks HTTP/1.0.
const BUFFER_CHUNKED_UP_TO: u64 = 1024 * 1024;

/// Reads a request body before sending when it is small (a `Content-Length` of at most
/// [`BUFFER_BODIES_UP_TO`], as nginx does by default: headers and body leave in one write, and
/// the upstream connection is not held while a slow client trickles its body in) or of unknown
/// length (chunked). A chunked body is forwarded with a `Content-Length` when it fits in
/// [`BUFFER_CHUNKED_UP_TO`], or in `server.max_body_size` (enforced as the body streams) when
/// the upstream answered HTTP/1.0 last time: an HTTP/1.0 server (Werkzeug's, under Eve) reads
/// nothing of a chunked body. Larger bodies stream.
///
/// What is read whole counts against `budget` (`upstream.max_buffered_bodies`) until it is
/// sent. Past what is free a body streams instead, which any upstream
/// reads, except a chunked body for an HTTP/1.0 upstream: that one is refused, with 503 and
/// `Retry-After` while others hold the budget, or 413 when it is larger than the whole budget.
async fn buffer_body(
    req: Request<Body>,
    http10: bool,
    budget: &Budget,
) -> Result<Request<Body>, GatewayError> {
    let limit = match req.body().size_hint().exact() {
        Some(n) if n > 0 && n <= BUFFER_BODIES_UP_TO => n,
        Some(_) => return Ok(req),
        None if req.body().is_end_stream() => return Ok(req),
        None if http10 => u64::MAX,
        None => BUFFER_CHUNKED_UP_TO,
    };
    let known = limit <= BUFFER_BODIES_UP_TO;
    let mut held = Reservation::default();
    // A known length is read into one allocation of that size: reserved up front.
    if known && !held.grow(budget, limit) {
        return Ok(req);
    }
    let mut over_budget = false;
    let admit = |len: usize| {
        let admitted = known || held.grow(budget, len as u64);
        over_budget |= !admitted;
        admitted
    };
    let (mut parts, body) = req.into_parts();
    let collected = collect_limited(body, limit, admit).await;
    match collected {
        Ok(Collected::Complete(bytes)) => {
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            Ok(Request::from_parts(parts, held.hold(body::full(bytes))))
        }
        // Refused either way. Whether a retry can help: the rest is read (and dropped) up to
        // the whole budget, so a body larger than the budget gets 413 however busy the budget
        // was when it came, and one that fits an idle budget 503 with `Retry-After`.
        Ok(Collected::TooLarge(prefix, mut rest)) if http10 && over_budget => {
            let mut read: u64 = prefix.iter().map(|c| c.len() as u64).sum();
            drop(prefix);
            while read <= budget.bytes() {
                match http_body_util::BodyExt::frame(&mut rest).await {
                    None => break,
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Some(Err(e)) => return Err(client_body_error(e)),
                }
            }
            Err(match read > budget.bytes() {
                true => GatewayError::PayloadTooLarge {
                    limit: budget.bytes(),
                },
                false => GatewayError::BodiesBuffered {
                    retry_after: Duration::from_secs(1),
                },
            })
        }
        Ok(Collected::TooLarge(prefix, rest)) => Ok(Request::from_parts(
            parts,
            held.hold(body::boxed(PrefixedBody { prefix, rest })),
        )),
        Err(e) => Err(client_body_error(e)),
    }
}

/// What a client's failed body becomes: 413 past the limit, 408 when it stalled, else 400.
fn client_body_error(e: BoxError) -> GatewayError {
    if let Some(t) = find_cause::<BodyTooLarge>(e.as_ref()) {
        return GatewayError::PayloadTooLarge { limit: t.limit };
    }
    if let Some(t) = find_cause::<BodyTimedOut>(e.as_ref()) {
        return GatewayError::BodyTimeout(t.timeout);
    }
    GatewayError::BadRequestBody(e)
}

fn classify(err: hyper_util::client::legacy::Error) -> GatewayError {
    if let Some(too_large) = find_cause::<BodyTooLarge>(&err) {
        return GatewayError::PayloadTooLarge {
            limit: too_large.limit,
        };
    }
    if let Some(t) = find_cause::<BodyTimedOut>(&err) {
        return GatewayError::BodyTimeout(t.timeout);
    }
    if find_cause::<ClientBodyError>(&err).is_some() {
        return GatewayError::BadRequestBody(Box::new(err));
    }
    // The upstream answered, but not in HTTP hyper could read: oversized or malformed headers,
    // a status line that is not one. Reachable, and broken. (A connection closed before any
    // answer stays "unreachable".)
    if let Some(h) = find_cause::<hyper::Error>(&err)
        && (h.is_parse() || h.is_parse_status() || h.is_parse_too_large())
    {
        return GatewayError::UpstreamProtocol(Box::new(err));
    }
    if find_cause::<ConnectTimedOut>(&err).is_some() {
        return GatewayError::UpstreamUnreachable(Box::new(ConnectTimedOut));
    }
    GatewayError::UpstreamUnreachable(Box::new(err))
}

/// The connect phase (TCP and TLS) took longer than `upstream.connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connection (TCP and TLS) not established within upstream.connect_timeout")]
pub struct ConnectTimedOut;

/// Bounds the whole connect phase, TLS handshake included (HttpConnector bounds TCP only).
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

impl<C> Service<Uri> for TimeoutConnector<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimedOut) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let config = UpstreamConfig {
            url: url.parse().unwrap(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ca_file: None,
            pool_idle_timeout: Duration::from_secs(1),
            proxy: None,
            proxy_credentials_file: None,
            max_buffered_bodies: 1024 * 1024,
        };
        Upstream::build(&config, None).unwrap()
    }

    #[tokio::test]
    async fn absolute_form_cannot_change_the_host() {
        let up = upstream("https://api.cloudcasa.io");
        let target = up
            .target(
                &"http://elsewhere.example:81/api/v1/x?a=%2F&b"
                    .parse()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(target, "https://api.cloudcasa.io/api/v1/x?a=%2F&b");
    }

    #[tokio::test]
    async fn locations_at_the_upstream_become_gateway_paths() {
        let up = upstream("http://127.0.0.1:5000/base/");
        let local = |v: &'static str| up.inner.local_path(&HeaderValue::from_static(v));
        assert_eq!(
            local("http://127.0.0.1:5000/base/api/v1/usergroups/10").unwrap(),
            "/api/v1/usergroups/10"
        );
        assert_eq!(local("http://127.0.0.1:5000/base?x=1").unwrap(), "/?x=1");
        // Not the upstream, or not under its prefix: left alone.
        assert_eq!(local("http://127.0.0.1:5001/base/x"), None);
        assert_eq!(local("https://127.0.0.1:5000/base/x"), None);
        assert_eq!(local("http://127.0.0.1:5000/basement/x"), None);
        assert_eq!(local("http://elsewhere.example/base/x"), None);
        assert_eq!(local("/already/relative"), None);
        let up = upstream("https://API.cloudcasa.io");
        assert_eq!(
            up.inner
                .local_path(&HeaderValue::from_static(
                    "https://api.cloudcasa.io:443/api/v1/x"
                ))
                .unwrap(),
            "/api/v1/x"
        );
    }

    #[tokio::test]
    async fn prefix_is_joined() {
        let up = upstream("http://127.0.0.1:9/base/");
        assert_eq!(
            up.target(&"/api/v1/x".parse().unwrap()).unwrap(),
            "http://127.0.0.1:9/base/api/v1/x"
        );
    }
}
