//! `[upstream]`: the CloudCasa API, its timeouts, CA bundle and the egress proxy.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

use super::{Overrides, Problems, defaults, positive, raw};

/// CloudCasa's production API.
pub const PRODUCTION_URL: &str = "https://api.cloudcasa.io";
/// CloudCasa's staging API.
pub const STAGING_URL: &str = "https://api.staging.cloudcasa.io";

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL of the API (scheme, authority, optional path prefix).
    pub url: Uri,
    /// Time allowed to establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers.
    pub timeout: Duration,
    /// Extra PEM roots to trust, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// An HTTP proxy reached with CONNECT (`None`: `HTTPS_PROXY`/`NO_PROXY` decide).
    pub proxy: Option<Uri>,
    /// `user:password` for the proxy's Basic authentication.
    pub proxy_credentials_file: Option<PathBuf>,
    /// What the request bodies read whole before they are sent may hold, all together.
    pub max_buffered_bodies: u64,
}

/// The largest body read whole before sending (a chunked one, `upstream::BUFFER_CHUNKED_UP_TO`):
/// `upstream.max_buffered_bodies` must hold at least one.
pub const MIN_BUFFERED_BODIES: u64 = 1024 * 1024;

/// Validates `[upstream]` (with `--upstream` applied); `None` when the URL is unusable.
pub(super) fn upstream(
    p: &mut Problems,
    r: raw::RawUpstream,
    overrides: &Overrides,
) -> Option<UpstreamConfig> {
    let (url_key, url_text) = match &overrides.upstream {
        Some(u) => ("--upstream", u.clone()),
        None => (
            "upstream.url",
            r.url.unwrap_or_else(|| defaults::UPSTREAM_URL.into()),
        ),
    };
    let url = parse_upstream_url(p, url_key, &url_text);
    let connect_timeout = positive(
        p,
        "upstream.connect_timeout",
        r.connect_timeout,
        defaults::CONNECT_TIMEOUT,
    );
    let timeout = positive(p, "upstream.timeout", r.timeout, defaults::UPSTREAM_TIMEOUT);
    let pool_idle_timeout = r.pool_idle_timeout.unwrap_or(defaults::POOL_IDLE_TIMEOUT);
    let proxy = r
        .proxy
        .as_deref()
        .and_then(|text| match text.parse::<Uri>() {
            Ok(u)
                if u.scheme_str() == Some("http")
                    && u.host().is_some()
                    && u.path_and_query().is_none_or(|pq| pq.as_str() == "/") =>
            {
                Some(u)
            }
            _ => {
                p.add(
                    "upstream.proxy",
                    format!(
                        "{text:?} is not an http://HOST:PORT proxy URL (credentials go in \
                     upstream.proxy_credentials_file)"
                    ),
                );
                None
            }
        });
    if r.proxy_credentials_file.is_some() && proxy.is_none() {
        p.add("upstream.proxy_credentials_file", "needs upstream.proxy");
    }
    let max_buffered_bodies = r
        .max_buffered_bodies
        .map_or(defaults::MAX_BUFFERED_BODIES, |b| b.as_u64());
    if max_buffered_bodies < MIN_BUFFERED_BODIES {
        p.add(
            "upstream.max_buffered_bodies",
            "must be at least 1MiB: a chunked request body up to 1 MiB is read whole before it \
             is sent",
        );
    }
    Some(UpstreamConfig {
        url: url?,
        connect_timeout,
        timeout,
        ca_file: r.ca_file,
        pool_idle_timeout,
        proxy,
        proxy_credentials_file: r.proxy_credentials_file,
        max_buffered_bodies,
    })
}

fn parse_upstream_url(p: &mut Problems, key: &str, text: &str) -> Option<Uri> {
    let text = match text {
        "production" => PRODUCTION_URL,
        "staging" => STAGING_URL,
        other => other,
    };
    let uri: Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            p.add(key, format!("{text:?} is not a URL: {e}"));
            return None;
        }
    };
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            p.add(key, format!("{text:?} must start with https:// or http://, or be \"production\" or \"staging\""));
            return None;
        }
    }
    if uri.authority().is_none() {
        p.add(key, format!("{text:?} has no host"));
        return None;
    }
    if uri.query().is_some() {
        p.add(key, "must not contain a query");
        return None;
    }
    Some(uri)
}
