//! `[clients]`: how the shared gateway authenticates its clients (ServiceAccount tokens through
//! TokenReview, API keys).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use super::policy::Rate;
use super::{Problems, defaults, parse_https_url, positive, raw};

/// `[clients]`.
#[derive(Debug, Clone, Default)]
pub struct ClientsConfig {
    /// Kubernetes ServiceAccount tokens, checked with the TokenReview API.
    pub kubernetes: Option<KubernetesConfig>,
    /// The API keys file.
    pub api_keys: Option<PathBuf>,
}

impl ClientsConfig {
    /// Whether any client authentication is configured besides mTLS.
    pub fn any_bearer(&self) -> bool {
        self.kubernetes.is_some() || self.api_keys.is_some()
    }
}

/// `[clients.kubernetes]`.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// The audience a client's token must be issued for.
    pub audience: String,
    /// The API server's base URL.
    pub api_server: Uri,
    /// The gateway's own ServiceAccount token (re-read as it rotates).
    pub token_file: PathBuf,
    /// The API server's CA bundle.
    pub ca_file: PathBuf,
    /// How long a review result is reused (never past the token's expiry).
    pub cache_ttl: Duration,
    /// Deadline for one TokenReview call.
    pub timeout: Duration,
    /// TokenReview calls in flight at most; past it callers get 503 with `Retry-After`.
    pub max_concurrent_reviews: u32,
    /// TokenReview calls started per period at most (a burst of that many is allowed).
    pub review_rate: Rate,
}

/// Validates `[clients]`.
pub(super) fn clients(p: &mut Problems, r: raw::RawClients) -> ClientsConfig {
    let kubernetes = r.kubernetes.map(|k| {
        let sa = Path::new(defaults::SERVICE_ACCOUNT_DIR);
        let api_server = match k.api_server {
            Some(url) => parse_https_url(p, "clients.kubernetes.api_server", &url),
            None => match (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            ) {
                (Ok(host), Ok(port)) => {
                    let host = if host.contains(':') { format!("[{host}]") } else { host };
                    parse_https_url(p, "clients.kubernetes.api_server", &format!("https://{host}:{port}"))
                }
                _ => {
                    p.add(
                        "clients.kubernetes.api_server",
                        "not set, and KUBERNETES_SERVICE_HOST/PORT are not set (not running in a pod?)",
                    );
                    None
                }
            },
        };
        let audience = k.audience.unwrap_or_else(|| defaults::AUDIENCE.into());
        if audience.is_empty() {
            p.add("clients.kubernetes.audience", "must not be empty");
        }
        KubernetesConfig {
            audience,
            api_server: api_server.unwrap_or_default(),
            token_file: k.token_file.unwrap_or_else(|| sa.join("token")),
            ca_file: k.ca_file.unwrap_or_else(|| sa.join("ca.crt")),
            cache_ttl: k.cache_ttl.unwrap_or(defaults::REVIEW_CACHE_TTL),
            timeout: positive(
                p,
                "clients.kubernetes.timeout",
                k.timeout,
                defaults::REVIEW_TIMEOUT,
            ),
            max_concurrent_reviews: match k.max_concurrent_reviews {
                None => defaults::MAX_CONCURRENT_REVIEWS,
                Some(0) => {
                    p.add("clients.kubernetes.max_concurrent_reviews", "must be at least 1");
                    1
                }
                Some(n) => n,
            },
            review_rate: match k.review_rate.as_deref().map(Rate::parse) {
                None => Rate::parse(defaults::REVIEW_RATE).expect("a valid rate"),
                Some(Ok(rate)) => rate,
                Some(Err(e)) => {
                    p.add("clients.kubernetes.review_rate", e);
                    Rate::parse(defaults::REVIEW_RATE).expect("a valid rate")
                }
            },
        }
    });
    let api_keys = r.api_keys.and_then(|k| {
        if k.file.is_none() {
            p.add("clients.api_keys.file", "is required");
        }
        k.file
    });
    ClientsConfig {
        kubernetes,
        api_keys,
    }
}
