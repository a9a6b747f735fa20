//! The benchmark's servers, built for speed so that they are never the bottleneck:
//!
//! - `upstream`: a mock CloudCasa API. It checks the bearer token, serves a 1 KiB item that stays
//!   fresh (`max-age`), a 1 KiB item that must be revalidated (`no-cache` + ETag, 304 on
//!   `If-None-Match`), a 100 KiB collection, an uncacheable item (`no-store`), any
//!   `/api/v1/items/<n>` (for the memory run), and accepts PATCH with a matching `If-Match`.
//! - `ceiling`: a bare hyper server answering every GET with the 1 KiB item's bytes from memory:
//!   what a cache hit costs with no proxying at all.
//! - `proxy`: a bare hyper reverse proxy (hyper server, hyper-util pooled client, the token set
//!   in `Authorization`, small bodies read whole) and nothing else: no cache, audit, metrics,
//!   spans or identity. What pass-through costs when built on the same crates as the gateway, so
//!   the table can tell the gateway's own cost from hyper's.
//!
//! Usage: bench_servers upstream|ceiling ADDR [THREADS]
//!        bench_servers proxy ADDR THREADS UPSTREAM_ADDR

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const TOKEN: &str = "Bearer bench-token";
const ETAG: &str = "\"bench-etag-0001\"";

fn item(size: usize) -> Bytes {
    // A JSON document of exactly `size` bytes, shaped like an Eve item.
    let head =
        r#"{"_id":"624e188b47ea96df6df10001","_etag":"bench-etag-0001","name":"bench","pad":""#;
    let tail = r#""}"#;
    let pad = "x".repeat(size - head.len() - tail.len());
    Bytes::from(format!("{head}{pad}{tail}"))
}

struct Bodies {
    small: Bytes,
    collection: Bytes,
}

fn respond(status: StatusCode, body: Bytes, cache_control: &'static str) -> Response<Full<Bytes>> {
    respond_with(status, body, cache_control, None)
}

fn respond_with(
    status: StatusCode,
    body: Bytes,
    cache_control: &'static str,
    accel_expires: Option<&'static str>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    // nginx reads X-Accel-Expires only when it comes before Cache-Control.
    if let Some(v) = accel_expires {
        h.insert("x-accel-expires", HeaderValue::from_static(v));
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, HeaderValue::from_static(ETAG));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static("Fri, 27 Nov 2026 00:00:00 GMT"),
    );
    r
}

async fn upstream(req: Request<Incoming>, bodies: &Bodies) -> Response<Full<Bytes>> {
    if req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        != Some(TOKEN.as_bytes())
    {
        return respond(
            StatusCode::UNAUTHORIZED,
            Bytes::from_static(br#"{"_status":"ERR","_error":{"code":401,"message":"no token"}}"#),
            "no-store",
        );
    }
    let path = req.uri().path();
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .map(|v| v.as_bytes())
        == Some(ETAG.as_bytes());
    match (req.method(), path) {
        (&Method::GET, "/api/v1/fresh") => {
            respond(StatusCode::OK, bodies.small.clone(), "max-age=3600")
        }
        (&Method::GET, "/api/v1/collection") => {
            respond(StatusCode::OK, bodies.collection.clone(), "max-age=3600")
        }
        (&Method::GET, "/api/v1/revalidate") => {
            let (status, body) = match not_modified {
                true => (StatusCode::NOT_MODIFIED, Bytes::new()),
                false => (StatusCode::OK, bodies.small.clone()),
            };
            // nginx cannot store a response that is stale at once from Cache-Control alone
            // (no-cache and max-age=0 make it uncacheable); an expiry in the past does that.
            respond_with(status, body, "no-cache", Some("@1"))
        }
        (&Method::GET, "/api/v1/uncached") => {
            respond(StatusCode::OK, bodies.small.clone(), "no-store")
        }
        (&Method::GET, p) if p.starts_with("/api/v1/items/") => {
            respond(StatusCode::OK, bodies.small.clone(), "max-age=3600")
        }
        (&Method::PATCH, "/api/v1/patch") => {
            let matches =
                req.headers().get(header::IF_MATCH).map(|v| v.as_bytes()) == Some(ETAG.as_bytes());
            let _ = req.into_body().collect().await;
            if matches {
                respond(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"_status":"OK","_etag":"bench-etag-0001"}"#),
                    "no-store",
                )
            } else {
                respond(
                    StatusCode::PRECONDITION_FAILED,
                    Bytes::from_static(br#"{"_status":"ERR"}"#),
                    "no-store",
                )
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"_status":"ERR"}"#),
            "no-store",
        ),
    }
}

type ProxyClient = Client<HttpConnector, Full<Bytes>>;
/// The servers' own answers, or the upstream's relayed by the proxy (no boxing: the ceiling
/// must not pay for the proxy's body type).
type AnyBody = http_body_util::Either<Full<Bytes>, Incoming>;

fn own(response: Response<Full<Bytes>>) -> Response<AnyBody> {
    response.map(AnyBody::Left)
}

/// The bare proxy's whole request path.
async fn proxy(
    req: Request<Incoming>,
    client: ProxyClient,
    upstream: Authority,
) -> Response<AnyBody> {
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await else {
        return own(respond(StatusCode::BAD_REQUEST, Bytes::new(), "no-store"));
    };
    // The client's path and query under the upstream's scheme and authority, built from parts
    // as the gateway does: the reference should not pay for formatting the gateway avoids.
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(upstream);
    let Ok(uri) = Uri::from_parts(uri) else {
        return own(respond(StatusCode::BAD_REQUEST, Bytes::new(), "no-store"));
    };
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    parts
        .headers
        .insert(header::AUTHORIZATION, HeaderValue::from_static(TOKEN));
    match client
        .request(Request::from_parts(parts, Full::new(body.to_bytes())))
        .await
    {
        Ok(response) => response.map(AnyBody::Right),
        Err(_) => own(respond(StatusCode::BAD_GATEWAY, Bytes::new(), "no-store")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr) = match (args.get(1), args.get(2)) {
        (Some(m), Some(a)) => (m.clone(), a.parse::<SocketAddr>().expect("ADDR")),
        _ => {
            eprintln!(
                "usage: bench_servers upstream|ceiling ADDR [THREADS] | proxy ADDR THREADS UPSTREAM"
            );
            std::process::exit(2);
        }
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    let bodies: &'static Bodies = Box::leak(Box::new(Bodies {
        small: item(1024),
        collection: item(100 * 1024),
    }));
    let ceiling = mode == "ceiling";
    let upstream_addr: Option<Authority> = (mode == "proxy").then(|| {
        args.get(4)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .and_then(|a| a.to_string().parse().ok())
            .expect("proxy needs UPSTREAM_ADDR")
    });
    let client: ProxyClient = {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Client::builder(TokioExecutor::new()).build(http)
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        eprintln!("bench_servers {mode} on {addr}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let upstream_addr = upstream_addr.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let client = client.clone();
                    let upstream_addr = upstream_addr.clone();
                    async move {
                        let response = if let Some(upstream) = upstream_addr {
                            proxy(req, client, upstream).await
                        } else if ceiling {
                            let body = if req.uri().path() == "/api/v1/collection" {
                                bodies.collection.clone()
                            } else {
                                bodies.small.clone()
                            };
                            own(respond(StatusCode::OK, body, "max-age=3600"))
                        } else {
                            own(upstream(req, bodies).await)
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
