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
    pub key_headers: KeyHeaders,
}

/// `cache.key_headers`, and their form: a digest of the names, which every representation key
/// starts with, so that a key made under one list of names never matches a key made under
/// another (after a reload, or in a replica of another configuration sharing Redis): the values
/// `v2` of `Accept-Encoding` and of `X-Api-Version` must not be one variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHeaders {
    names: Vec<http::HeaderName>,
    form: [u8; 16],
}

impl KeyHeaders {
    /// The key headers `names`, in order.
    pub fn new(names: Vec<http::HeaderName>) -> Self {
        use sha2::Digest;
        let joined = names
            .iter()
            .map(http::HeaderName::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let digest = sha2::Sha256::digest(joined.as_bytes());
        let mut form = [0u8; 16];
        const_hex::encode_to_slice(&digest[..8], &mut form).expect("16 bytes hold 8 in hex");
        Self { names, form }
    }

    /// The digest of the names, 16 hex digits (never a `\n`).
    pub fn form(&self) -> &[u8; 16] {
        &self.form
    }
}

impl std::ops::Deref for KeyHeaders {
    type Target = [http::HeaderName];

    fn deref(&self) -> &Self::Target {
        &self.names
    }
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
fn key_headers(p: &mut Problems, raw: Option<Vec<String>>) -> KeyHeaders {
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
    KeyHeaders::new(out)
}
