//! An in-process mock of the CloudCasa API, for tests, the quickstart and the benchmark.
//!
//! It follows the API's documented semantics: Bearer tokens map to tenants (401 otherwise); every
//! collection under `/api/v1/<name>` supports Eve-style CRUD with `_id` and `_etag`; items answer
//! with `ETag` and honour `If-None-Match` (304); collections carry `Last-Modified` (honouring
//! `If-Modified-Since`) but no ETag; PATCH/PUT/DELETE require `If-Match` (428 without, 412 when
//! stale). `/api/v1/_blob` streams large bodies both ways. It records every request it receives
//! and can be told to delay, reset or fail, or to answer a path with a canned response.
//!
//! It also behaves as the real Eve 0.7 / Werkzeug stack does where that matters to a gateway's
//! security: it upper-cases the method (Werkzeug executes `delete` as `DELETE`), honours
//! `X-HTTP-Method-Override` on every wire method (Eve's default), renders XML for
//! `Accept: application/xml` with the same ETag and no `Vary`, answers `TRACE` by echoing the
//! request's headers, sends `Location` as an absolute URL naming its own host, and, when told to
//! (`set_http10`), answers HTTP/1.0 and reads nothing of a chunked request body.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How many body bytes a recorded request keeps.
const RECORD_BODY_LIMIT: usize = 64 * 1024;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The first 64 KiB of the body.
    pub body: Bytes,
    /// The full body length.
    pub body_len: u64,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the mock should do instead of answering normally.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Close the connection without answering.
    Reset,
    /// Answer with this status in the error envelope.
    Status(StatusCode),
    /// Wait until `release` is notified, then answer normally, or with `then` in the envelope.
    Hold {
        release: Arc<Notify>,
        then: Option<StatusCode>,
    },
}

type Handler = Arc<dyn Fn(&Recorded) -> Response<Bytes> + Send + Sync>;

#[derive(Default)]
struct Tenant {
    collections: HashMap<String, Collection>,
}

struct Collection {
    items: BTreeMap<String, Value>,
    modified: SystemTime,
}

impl Default for Collection {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }
}

/// The mock's state, shared with the test.
#[derive(Default)]
pub struct MockState {
    tokens: Mutex<HashMap<String, String>>,
    tenants: Mutex<HashMap<String, Tenant>>,
    requests: Mutex<Vec<Recorded>>,
    received: Notify,
    fault: Mutex<Option<(Fault, Option<usize>)>>,
    /// The next request with this method is executed at once, and its answer held until the
    /// `Notify` is notified: a fetch that read the state before a write that follows it.
    hold_answer: Mutex<Option<(Method, Arc<Notify>)>>,
    routes: Mutex<HashMap<String, Handler>>,
    next_id: Mutex<u64>,
    http10: std::sync::atomic::AtomicBool,
}

/// A running mock.
pub struct MockCloudCasa {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    /// PEM of the CA that signed the server certificate, when serving TLS.
    pub ca_pem: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockCloudCasa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockCloudCasa {
    /// Plain HTTP on an ephemeral loopback port. Tokens `token-a` (tenant `a`) and `token-b`
    /// (tenant `b`) are accepted.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), None).await
    }

    /// HTTPS with a certificate for `localhost`/`127.0.0.1` signed by a fresh test CA.
    pub async fn start_tls() -> Self {
        let (config, ca_pem) = crate::support::tls::server_config_for_localhost();
        Self::start_on("127.0.0.1:0".parse().unwrap(), Some((config, ca_pem))).await
    }

    /// Starts on `addr`, optionally with TLS.
    pub async fn start_on(addr: SocketAddr, tls: Option<(rustls::ServerConfig, String)>) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind mock");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        state.add_token("token-a", "a");
        state.add_token("token-b", "b");
        let ca_pem = tls.as_ref().map(|(_, pem)| pem.clone());
        let acceptor = tls.map(|(config, _)| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = served.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            ca_pem,
            task,
        }
    }

    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub fn url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }
}

impl MockState {
    /// Accept `token` as a credential of `tenant`.
    pub fn add_token(&self, token: &str, tenant: &str) {
        self.tokens
            .lock()
            .unwrap()
            .insert(token.into(), tenant.into());
    }

    /// Everything received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Requests received for `path` (path only, query ignored).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.uri.path() == path)
            .collect()
    }

    /// The most recent request.
    pub fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the mock received no request")
    }

    /// Forget what was received.
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// Waits until at least `n` requests have been received (bounded, so a bug cannot hang a test).
    pub async fn wait_for(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.received.notified();
            if self.count() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("the mock received {} requests, expected {n}", self.count());
            }
        }
    }

    /// Misbehave on the next `times` requests (`None`: until cleared).
    pub fn set_fault(&self, fault: Fault, times: Option<usize>) {
        *self.fault.lock().unwrap() = Some((fault, times));
    }

    /// Behave again.
    /// Holds the next request until the returned `Notify` is notified, then answers normally or
    /// with `then` in the envelope.
    pub fn hold_next(&self, then: Option<StatusCode>) -> Arc<Notify> {
        let release = Arc::new(Notify::new());
        self.set_fault(
            Fault::Hold {
                release: release.clone(),
                then,
            },
            Some(1),
        );
        release
    }

    /// Executes the next `method` request at once but holds its answer until the returned
    /// `Notify` is notified.
    pub fn hold_next_answer(&self, method: Method) -> Arc<Notify> {
        let release = Arc::new(Notify::new());
        *self.hold_answer.lock().unwrap() = Some((method, release.clone()));
        release
    }

    /// Answer as Werkzeug's development server does: HTTP/1.0, and a chunked request body is
    /// read as empty.
    pub fn set_http10(&self, on: bool) {
        self.http10.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn clear_fault(&self) {
        *self.fault.lock().unwrap() = None;
    }

    /// Answer `path` (exact, query ignored) with `handler`, after the token check.
    pub fn route(
        &self,
        path: &str,
        handler: impl Fn(&Recorded) -> Response<Bytes> + Send + Sync + 'static,
    ) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.into(), Arc::new(handler));
    }

    /// Creates an item directly (no request recorded); returns the stored document.
    pub fn seed(&self, tenant: &str, collection: &str, doc: Value) -> Value {
        let mut tenants = self.tenants.lock().unwrap();
        let coll = tenants
            .entry(tenant.into())
            .or_default()
            .collections
            .entry(collection.into())
            .or_default();
        let id = self.new_id();
        let doc = finish_doc(id.clone(), doc);
        coll.items.insert(id, doc.clone());
        coll.modified = now_secs();
        doc
    }

    fn new_id(&self) -> String {
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        format!("{:024x}", 0x624e188b47ea96df6df10000u128 + *n as u128)
    }

    fn take_fault(&self) -> Option<Fault> {
        let mut slot = self.fault.lock().unwrap();
        let (fault, times) = slot.as_mut()?;
        let fault = fault.clone();
        if let Some(left) = times {
            *left -= 1;
            if *left == 0 {
                *slot = None;
            }
        }
        Some(fault)
    }
}

fn now_secs() -> SystemTime {
    // HTTP dates have one-second resolution; keep stored times comparable with them.
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn etag_of(doc: &Value) -> String {
    let mut copy = doc.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("_etag");
    }
    hex::encode(&Sha256::digest(copy.to_string().as_bytes())[..20])
}

fn finish_doc(id: String, mut doc: Value) -> Value {
    let map = doc.as_object_mut().expect("documents are JSON objects");
    map.insert("_id".into(), json!(id));
    map.insert(
        "_updated".into(),
        json!(httpdate::fmt_http_date(now_secs())),
    );
    let etag = etag_of(&doc);
    doc.as_object_mut()
        .unwrap()
        .insert("_etag".into(), json!(etag));
    doc
}

/// The CloudCasa error envelope.
pub fn envelope(status: StatusCode, message: &str) -> Response<Bytes> {
    json_response(
        status,
        &json!({"_status": "ERR", "_error": {"code": status.as_u16(), "message": message}}),
    )
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(value.to_string()))
        .unwrap()
}

fn xml_response(value: &Value) -> Response<Bytes> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
        .body(xml_of(value))
        .unwrap()
}

fn etag_matches(header_value: Option<&HeaderValue>, etag: &str) -> bool {
    let Some(value) = header_value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    value.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.trim_start_matches("W/").trim_matches('"') == etag
    })
}

type MockBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn handle(
    state: Arc<MockState>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            body_len += data.len() as u64;
            if kept.len() < RECORD_BODY_LIMIT {
                let room = RECORD_BODY_LIMIT - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }
    let http10 = state.http10.load(std::sync::atomic::Ordering::Relaxed);
    if http10 && parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // Werkzeug 0.11 reads `Content-Length` bytes, and there is none.
        kept.clear();
        body_len = 0;
    }
    let recorded = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: Bytes::from(kept),
        body_len,
    };
    state.requests.lock().unwrap().push(recorded.clone());
    state.received.notify_waiters();

    match state.take_fault() {
        Some(Fault::Reset) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock reset",
            ));
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Status(status)) => return Ok(finish(envelope(status, "mock failure"))),
        Some(Fault::Hold { release, then }) => {
            release.notified().await;
            if let Some(status) = then {
                return Ok(finish(envelope(status, "mock failure")));
            }
        }
        None => {}
    }

    let tenant = recorded
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| state.tokens.lock().unwrap().get(t).cloned());
    let Some(tenant) = tenant else {
        return Ok(finish(envelope(
            StatusCode::UNAUTHORIZED,
            "Please provide proper credentials",
        )));
    };

    let route = state.routes.lock().unwrap().get(parts.uri.path()).cloned();
    if let Some(handler) = route {
        return Ok(finish(handler(&recorded)));
    }
    if parts.uri.path() == "/api/v1/_blob" {
        return Ok(blob(&recorded));
    }
    // What Eve executes: Werkzeug upper-cases the method, and Eve lets
    // X-HTTP-Method-Override replace it on any request.
    let mut executed = recorded.clone();
    // Werkzeug maps `-` and `_` in header names to the same CGI variable.
    let override_header = recorded.headers.iter().find_map(|(name, value)| {
        (name.as_str().replace('_', "-") == "x-http-method-override")
            .then(|| value.to_str().unwrap_or_default())
    });
    let method = override_header
        .unwrap_or(recorded.method.as_str())
        .to_ascii_uppercase();
    executed.method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
    if executed.method == Method::TRACE {
        // A server with TRACE on echoes the request, headers and all.
        return Ok(finish(
            Response::builder()
                .header(header::CONTENT_TYPE, "message/http")
                .body(Bytes::from(format!("{:?}", recorded.headers)))
                .unwrap(),
        ));
    }
    let mut response = finish(api(&state, &tenant, &executed));
    let held = {
        let mut slot = state.hold_answer.lock().unwrap();
        match slot.as_ref() {
            Some((method, _)) if *method == executed.method => slot.take().map(|(_, n)| n),
            _ => None,
        }
    };
    if let Some(release) = held {
        release.notified().await;
    }
    if let Some(location) = response.headers().get(header::LOCATION).cloned() {
        // Eve's Location is absolute, naming the host it was asked as.
        let host = recorded.header("host").unwrap_or("localhost").to_string();
        let absolute = format!("http://{host}{}", location.to_str().unwrap());
        response
            .headers_mut()
            .insert(header::LOCATION, absolute.parse().unwrap());
        // A 201 may say where its representation lives (RFC 9110 §8.7), as absolutely.
        response
            .headers_mut()
            .insert(header::CONTENT_LOCATION, absolute.parse().unwrap());
    }
    if http10 {
        *response.version_mut() = Version::HTTP_10;
    }
    Ok(response)
}

/// Eve renders XML for clients that prefer it, with the same ETag and no `Vary`.
fn wants_xml(req: &Recorded) -> bool {
    // Werkzeug keeps the last of repeated header lines.
    req.headers
        .get_all(header::ACCEPT)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/xml"))
}

fn xml_of(value: &Value) -> Bytes {
    Bytes::from(format!("<resource><json>{value}</json></resource>"))
}

fn finish(resp: Response<Bytes>) -> Response<MockBody> {
    resp.map(|b| http_body_util::Full::new(b).boxed_unsync())
}

/// `GET /api/v1/_blob?size=N` streams N bytes (`&trickle=MS`: one 64 KiB chunk every MS
/// milliseconds); a write reports how many bytes it received.
fn blob(req: &Recorded) -> Response<MockBody> {
    if req.method == Method::GET {
        let param = |name: &str| {
            req.uri
                .query()
                .and_then(|q| {
                    q.split('&')
                        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                })
                .and_then(|n| n.parse::<u64>().ok())
        };
        let size = param("size").unwrap_or(0);
        let body = match param("trickle") {
            None => RepeatBody { remaining: size }.boxed_unsync(),
            Some(ms) => {
                let chunks = futures_util::stream::unfold(size, move |left| async move {
                    if left == 0 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let n = left.min(65536);
                    let chunk = Bytes::from(vec![b'x'; n as usize]);
                    Some((Ok::<_, Infallible>(Frame::data(chunk)), left - n))
                });
                // The length is declared, as a real server would.
                http_body_util::StreamBody::new(chunks).boxed_unsync()
            }
        };
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .body(body)
            .unwrap();
    }
    finish(json_response(
        StatusCode::OK,
        &json!({"received": req.body_len}),
    ))
}

/// A body of `remaining` bytes produced lazily, 64 KiB at a time.
struct RepeatBody {
    remaining: u64,
}

impl http_body::Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        static CHUNK: [u8; 65536] = [b'x'; 65536];
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

fn api(state: &MockState, tenant: &str, req: &Recorded) -> Response<Bytes> {
    // Eve routes with and without a trailing slash alike.
    let segments: Vec<&str> = req
        .uri
        .path()
        .trim_start_matches("/api/v1/")
        .trim_end_matches('/')
        .split('/')
        .collect();
    if !req.uri.path().starts_with("/api/v1/") || segments.iter().any(|s| s.is_empty()) {
        return envelope(
            StatusCode::NOT_FOUND,
            "The requested URL was not found on the server.",
        );
    }
    let mut tenants = state.tenants.lock().unwrap();
    let coll = tenants
        .entry(tenant.into())
        .or_default()
        .collections
        .entry(segments[0].into())
        .or_default();
    match (segments.len(), &req.method) {
        (1, &Method::GET | &Method::HEAD) => {
            let last_modified = coll.modified;
            let since = req
                .header("if-modified-since")
                .and_then(|v| httpdate::parse_http_date(v).ok());
            if since.is_some_and(|since| last_modified <= since) {
                return Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .header(
                        header::LAST_MODIFIED,
                        httpdate::fmt_http_date(last_modified),
                    )
                    .body(Bytes::new())
                    .unwrap();
            }
            let items: Vec<&Value> = coll.items.values().collect();
            let listing = json!({"_items": items, "_meta": {"page": 1, "max_results": 25, "total": items.len()}});
            let mut resp = json_response(StatusCode::OK, &listing);
            if wants_xml(req) {
                resp = xml_response(&listing);
            }
            resp.headers_mut().insert(
                header::LAST_MODIFIED,
                httpdate::fmt_http_date(last_modified).parse().unwrap(),
            );
            resp
        }
        (1, &Method::DELETE) => {
            // Eve deletes the whole collection (RESOURCE_METHODS includes DELETE).
            coll.items.clear();
            coll.modified = now_secs();
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Bytes::new())
                .unwrap()
        }
        (1, &Method::POST) => {
            let Ok(doc @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
                return envelope(
                    StatusCode::BAD_REQUEST,
                    "The browser (or proxy) sent a request that this server could not understand.",
                );
            };
            let id = state.new_id();
            let doc = finish_doc(id.clone(), doc);
            coll.items.insert(id.clone(), doc.clone());
            coll.modified = now_secs();
            let mut resp = json_response(StatusCode::CREATED, &doc);
            let h = resp.headers_mut();
            h.insert(
                header::ETAG,
                format!("\"{}\"", doc["_etag"].as_str().unwrap())
                    .parse()
                    .unwrap(),
            );
            h.insert(
                header::LOCATION,
                format!("/api/v1/{}/{id}", segments[0]).parse().unwrap(),
            );
            resp
        }
        (2, method) => {
            // Items by id, or by name (Eve's `additional_lookup`).
            let id = match coll.items.contains_key(segments[1]) {
                true => segments[1].to_string(),
                false => coll
                    .items
                    .iter()
                    .find(|(_, doc)| doc["name"] == segments[1])
                    .map_or_else(|| segments[1].to_string(), |(id, _)| id.clone()),
            };
            let id = id.as_str();
            let Some(doc) = coll.items.get(id).cloned() else {
                return envelope(
                    StatusCode::NOT_FOUND,
                    "The requested URL was not found on the server.",
                );
            };
            let etag = doc["_etag"].as_str().unwrap().to_string();
            match *method {
                Method::GET | Method::HEAD => {
                    let status = if etag_matches(req.headers.get(header::IF_NONE_MATCH), &etag) {
                        StatusCode::NOT_MODIFIED
                    } else {
                        StatusCode::OK
                    };
                    let mut resp = if status == StatusCode::OK && wants_xml(req) {
                        xml_response(&doc)
                    } else if status == StatusCode::OK {
                        json_response(status, &doc)
                    } else {
                        Response::builder()
                            .status(status)
                            .body(Bytes::new())
                            .unwrap()
                    };
                    resp.headers_mut()
                        .insert(header::ETAG, format!("\"{etag}\"").parse().unwrap());
                    resp
                }
                Method::PATCH | Method::PUT | Method::DELETE => {
                    if !req.headers.contains_key(header::IF_MATCH) {
                        return envelope(
                            StatusCode::PRECONDITION_REQUIRED,
                            "To edit a document its etag must be provided using the If-Match header",
                        );
                    }
                    if !etag_matches(req.headers.get(header::IF_MATCH), &etag) {
                        return envelope(
                            StatusCode::PRECONDITION_FAILED,
                            "Client and server etags don't match",
                        );
                    }
                    if *method == Method::DELETE {
                        coll.items.remove(id);
                        coll.modified = now_secs();
                        return Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .body(Bytes::new())
                            .unwrap();
                    }
                    let Ok(Value::Object(changes)) = serde_json::from_slice::<Value>(&req.body)
                    else {
                        return envelope(
                            StatusCode::BAD_REQUEST,
                            "The browser (or proxy) sent a request that this server could not understand.",
                        );
                    };
                    let mut updated = if *method == Method::PUT {
                        json!({})
                    } else {
                        doc.clone()
                    };
                    for (k, v) in changes {
                        updated[k] = v;
                    }
                    let updated = finish_doc(id.to_string(), updated);
                    coll.items.insert(id.to_string(), updated.clone());
                    coll.modified = now_secs();
                    let new_etag = updated["_etag"].as_str().unwrap().to_string();
                    let mut resp = json_response(
                        StatusCode::OK,
                        &json!({"_status": "OK", "_id": id, "_etag": new_etag, "_updated": updated["_updated"]}),
                    );
                    resp.headers_mut()
                        .insert(header::ETAG, format!("\"{new_etag}\"").parse().unwrap());
                    resp
                }
                _ => envelope(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "The method is not allowed for the requested URL.",
                ),
            }
        }
        _ => envelope(
            StatusCode::METHOD_NOT_ALLOWED,
            "The method is not allowed for the requested URL.",
        ),
    }
}
