//! The admin listener: liveness, readiness, Prometheus metrics, and cache inspection and purging.
//! Kept off the proxy port so that a sidecar's clients cannot reach it by accident.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::app::Shared;
use crate::context::CacheOutcome;
use crate::context::ClientAddr;
use crate::http::body::{self, Body};
use crate::http::error::error_response;

/// Handles one admin request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(&shared),
        (&Method::GET, "/metrics") => metrics(&shared).await,
        (&Method::GET, "/cache") => cache_report(&shared).await,
        (&Method::DELETE, "/cache") if !may_purge(req.extensions().get::<ClientAddr>()) => {
            error_response(
                StatusCode::FORBIDDEN,
                "DELETE /cache is accepted from 127.0.0.1 and ::1 only (kubectl exec or port-forward)",
            )
        }
        (&Method::DELETE, "/cache") => cache_purge(&shared, req.uri().query()).await,
        (_, "/cache") => error_response(StatusCode::METHOD_NOT_ALLOWED, "use GET or DELETE"),
        (_, "/healthz" | "/readyz" | "/metrics") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, path) => error_response(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint at {path}"),
        ),
    };
    Ok(response)
}

fn readyz(shared: &Shared) -> Response<Body> {
    if shared.draining.load(Ordering::Acquire) {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down");
    }
    let credentials = shared.credentials.load();
    let missing: Vec<&str> = credentials
        .iter()
        .filter(|c| c.current().is_none())
        .map(|c| c.credential())
        .collect();
    if missing.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "no CloudCasa API token is loaded for credential(s) {}",
                missing
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    }
}

async fn cache_report(shared: &Shared) -> Response<Body> {
    let Some(cache) = &shared.cache else {
        return json(StatusCode::OK, serde_json::json!({"enabled": false}));
    };
    let store = cache.store();
    let (entries, weighted) = store.size().await;
    let s = &store.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json(
        StatusCode::OK,
        serde_json::json!({
            "enabled": true,
            "entries": entries,
            "weighted_bytes": weighted,
            "max_bytes": store.max_size(),
            "hits": s.outcomes(CacheOutcome::Hit),
            "misses": s.outcomes(CacheOutcome::Miss),
            "revalidations": s.outcomes(CacheOutcome::Revalidated),
            "stale_served": s.outcomes(CacheOutcome::Stale),
            "collapsed": n(&s.collapsed),
            "outcomes": CacheOutcome::ALL
                .iter()
                .map(|o| (o.as_str().to_string(), s.outcomes(*o).into()))
                .collect::<serde_json::Map<_, _>>(),
            "evictions": n(&s.evictions),
            "invalidations": n(&s.invalidations),
        }),
    )
}

/// Whether a peer may purge: the admin port also serves probes and scrapes from the pod network
/// (a sidecar's listens on 0.0.0.0 for the kubelet), and anyone there could otherwise empty the
/// cache and turn every read into an upstream call. Loopback is what `kubectl exec` and
/// `kubectl port-forward` arrive from.
///
/// Exactly `127.0.0.1` and `::1`, not all of `127.0.0.0/8`: a service mesh's inbound sidecar
/// (Istio's) forwards traffic from the pod network to the application from `127.0.0.6`.
fn may_purge(peer: Option<&ClientAddr>) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    peer.is_some_and(|p| match p.addr.ip().to_canonical() {
        IpAddr::V4(ip) => ip == Ipv4Addr::LOCALHOST,
        IpAddr::V6(ip) => ip == Ipv6Addr::LOCALHOST,
    })
}

/// `DELETE /cache` empties the cache; `DELETE /cache?prefix=/api/v1/x` removes one path prefix.
async fn cache_purge(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let Some(cache) = &shared.cache else {
        return error_response(
            StatusCode::CONFLICT,
            "the cache is disabled (cache.enabled = false)",
        );
    };
    let (mut prefix, mut path, mut key_query) = (None, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            "prefix" if value.starts_with('/') => prefix = Some(value),
            "path" if value.starts_with('/') => path = Some(value),
            "query" => key_query = Some(value),
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unsupported parameter {pair:?}; use ?prefix=/api/v1/... (a subtree) or \
                         ?path=/api/v1/...&query=... (one key)"
                    ),
                );
            }
        }
    }
    match (prefix, path) {
        (Some(_), Some(_)) => error_response(
            StatusCode::BAD_REQUEST,
            "use either prefix (a subtree) or path (one key), not both",
        ),
        (None, Some(path)) => {
            let query = key_query.unwrap_or_default();
            let removed = cache.store().purge_key(&path, &query).await;
            json(
                StatusCode::OK,
                serde_json::json!({"removed_responses": removed, "path": path, "query": query}),
            )
        }
        (prefix, None) if key_query.is_none() => {
            let prefix = prefix.unwrap_or_default();
            let removed = cache.store().purge_prefix(&prefix).await;
            json(
                StatusCode::OK,
                serde_json::json!({"removed_paths": removed, "prefix": prefix}),
            )
        }
        _ => error_response(StatusCode::BAD_REQUEST, "query goes with path"),
    }
}

/// `%XX` escapes decoded (a purge names a path and query as a client sent them, escaped once
/// more to fit in this query); invalid escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn metrics(shared: &Shared) -> Response<Body> {
    if let Some(cache) = &shared.cache {
        cache.store().settle().await;
    }
    let mut response = Response::new(body::full(shared.observers.metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body_text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(body_text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_may_purge() {
        let peer = |a: &str| ClientAddr::new(a.parse().unwrap());
        for allowed in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert!(may_purge(Some(&peer(allowed))), "{allowed}");
        }
        for refused in [
            "10.1.2.3:5000",
            "127.0.0.6:5000",
            "127.8.9.1:5000",
            "[::ffff:127.0.0.6]:5000",
            "0.0.0.0:5000",
            "[fd00::1]:5000",
            "[::ffff:10.0.0.1]:5000",
        ] {
            assert!(!may_purge(Some(&peer(refused))), "{refused}");
        }
        assert!(!may_purge(None), "an unknown peer is refused");
    }
}
