//! `[cache]`: the response cache's bounds, freshness defaults and key headers.

use std::time::Duration;

use super::{Problems, defaults, raw};

/// `[cache]`.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Whether GET responses are cached at all.
    pub enabled: bool,
    /// Total weighted size of stored responses, in bytes.
    pub max_size: u64,
    /// Largest body stored, in bytes; larger ones stream through.
    pub max_object_size: u64,
    /// Bytes that fills in progress (read from the upstream, not yet stored or sent) may hold
    /// in all; a fill past it streams through unstored.
    pub max_inflight: u64,
    /// Freshness given to responses that carry no freshness information of their own.
    pub fresh_for: Duration,
    /// How long past freshness a stored response may stand in for a failing upstream.
    pub stale_if_error: Duration,
    /// How long past freshness a stored response may be served at once while one background
    /// request revalidates it (RFC 5861).
    pub stale_while_revalidate: Duration,
    /// Request headers that select a representation: part of every stored variant, whether or
    /// not the upstream sends `Vary` (lower-case names).
    pub key_headers: Vec<http::HeaderName>,
}

/// Validates `[cache]`.
pub(super) fn cache(p: &mut Problems, r: raw::RawCache) -> CacheConfig {
    let cache = CacheConfig {
        enabled: r.enabled.unwrap_or(true),
        max_size: r.max_size.map_or(defaults::CACHE_MAX_SIZE, |s| s.as_u64()),
        max_object_size: r
            .max_object_size
            .map_or(defaults::CACHE_MAX_OBJECT_SIZE, |s| s.as_u64()),
        max_inflight: r
            .max_inflight
            .map_or(defaults::CACHE_MAX_INFLIGHT, |s| s.as_u64()),
        fresh_for: r.fresh_for.unwrap_or_default(),
        stale_if_error: r.stale_if_error.unwrap_or_default(),
        stale_while_revalidate: r.stale_while_revalidate.unwrap_or_default(),
        key_headers: key_headers(p, r.key_headers),
    };
    if cache.enabled && cache.max_object_size > cache.max_size {
        p.add("cache.max_object_size", "must not exceed cache.max_size");
    }
    if cache.enabled && cache.max_inflight < cache.max_object_size {
        p.add(
            "cache.max_inflight",
            "must be at least cache.max_object_size, or the largest objects could never be stored",
        );
    }
    cache
}

/// `cache.key_headers`: valid header names, lower-cased; `authorization` is refused (the cache
/// is partitioned by the credential the gateway injects, and the client's own never travels).
fn key_headers(p: &mut Problems, raw: Option<Vec<String>>) -> Vec<http::HeaderName> {
    let list = raw.unwrap_or_else(|| defaults::CACHE_KEY_HEADERS.map(String::from).to_vec());
    let mut out: Vec<http::HeaderName> = Vec::new();
    for name in list {
        match http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()) {
            Ok(h) if h == http::header::AUTHORIZATION => p.add(
                "cache.key_headers",
                "authorization cannot be a key header: the cache is partitioned by credential",
            ),
            Ok(h) if out.contains(&h) => {}
            Ok(h) => out.push(h),
            Err(_) => p.add(
                "cache.key_headers",
                format!("{name:?} is not a header name"),
            ),
        }
    }
    out
}
