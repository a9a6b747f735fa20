//! `[fleet]`: the Redis that replicas of one gateway share (cache tier, invalidations, rate
//! budgets). Without the section the gateway runs alone, as before.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{Problems, defaults, raw};

/// `[fleet]`.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `redis://host:port/db` or `rediss://` (TLS); may carry a username and password.
    pub redis_url: String,
    /// A file holding the Redis password (re-read when it changes), instead of the URL's.
    pub password_file: Option<PathBuf>,
    /// CA bundle for `rediss://` (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// A file holding the secret all replicas key credential fingerprints with, so they share
    /// cache partitions without anything secret in Redis (default: see the README).
    pub partition_key_file: Option<PathBuf>,
    /// This replica's name in audit records and logs.
    pub replica: String,
    /// Whether stored responses are shared through Redis (the L2 tier).
    pub shared_cache: bool,
    /// Largest body kept in Redis, in bytes.
    pub max_shared_object_size: u64,
    /// The longest any Redis call may take before the fleet link counts as down.
    pub timeout: Duration,
}

/// The URL without its password: the only form that may be logged or shown.
pub fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => "(not a URL)".to_string(),
    }
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("partition_key_file", &self.partition_key_file)
            .field("replica", &self.replica)
            .field("shared_cache", &self.shared_cache)
            .field("max_shared_object_size", &self.max_shared_object_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// This host's name: `$POD_NAME` (the downward API), else the kernel's hostname.
pub fn default_replica() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "gateway".to_string())
}

/// Validates `[fleet]`.
pub(super) fn fleet(p: &mut Problems, r: Option<raw::RawFleet>) -> Option<FleetConfig> {
    let r = r?;
    let Some(url) = r.redis_url else {
        p.add("fleet.redis_url", "is required in [fleet]");
        return None;
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        p.add(
            "fleet.redis_url",
            format!(
                "{:?} is not a redis:// or rediss:// URL",
                redacted_url(&url)
            ),
        );
    } else if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        p.add(
            "fleet.redis_url",
            format!("{:?} is not a Redis URL: {e}", redacted_url(&url)),
        );
    }
    if r.ca_file.is_some() && !url.starts_with("rediss://") {
        p.add("fleet.ca_file", "applies to rediss:// (TLS) URLs only");
    }
    let replica = r.replica.unwrap_or_else(default_replica);
    if replica.is_empty()
        || replica.len() > 253
        || !replica
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        p.add(
            "fleet.replica",
            format!("{replica:?} must be 1–253 characters of [A-Za-z0-9._-]"),
        );
    }
    let timeout = r.timeout.unwrap_or(defaults::FLEET_TIMEOUT);
    if timeout.is_zero() || timeout > Duration::from_secs(5) {
        p.add(
            "fleet.timeout",
            "must be more than 0 and at most 5s: every request may wait this long on Redis",
        );
    }
    let max_shared_object_size = r
        .max_shared_object_size
        .map_or(defaults::FLEET_MAX_SHARED_OBJECT_SIZE, |s| s.as_u64());
    // Redis refuses values over 512 MB.
    if max_shared_object_size > 256 * 1024 * 1024 {
        p.add("fleet.max_shared_object_size", "must be at most 256MiB");
    }
    Some(FleetConfig {
        redis_url: url,
        password_file: r.password_file,
        ca_file: r.ca_file,
        partition_key_file: r.partition_key_file,
        replica,
        shared_cache: r.shared_cache.unwrap_or(true),
        max_shared_object_size,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redacted_url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redacted_url("rediss://gw:s3cret@redis:6380"),
            "rediss://gw:***@redis:6380"
        );
        assert_eq!(redacted_url("redis://redis:6379"), "redis://redis:6379");
        let config = FleetConfig {
            redis_url: "redis://:s3cret@h/0".into(),
            password_file: None,
            ca_file: None,
            partition_key_file: None,
            replica: "gw-0".into(),
            shared_cache: true,
            max_shared_object_size: 1,
            timeout: Duration::from_millis(50),
        };
        assert!(!format!("{config:?}").contains("s3cret"));
    }
}
