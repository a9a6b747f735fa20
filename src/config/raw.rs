//! The configuration file as written: plain serde structs, every field optional so that defaults
//! and cross-field rules live in one place (`Config::from_raw`). Unknown keys are rejected.
// Field-by-field docs would repeat the file format; the README is the reference for each key.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// Durations as humantime text (`30s`, `5m`, `1h 30m`), at most [`duration::MAX`].
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, de::Error};

    /// Ten years. No setting means more, and a clock reading plus a duration near
    /// `u64::MAX` seconds overflows: a panic on every connection (a header timeout) or every
    /// request (the upstream timeout), for a file `--check` had accepted.
    pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let value: Option<Duration> = humantime_serde::deserialize(d)?;
        match value {
            Some(v) if v > MAX => Err(D::Error::custom(format!(
                "{} is longer than the longest duration accepted, 10 years",
                humantime::format_duration(v)
            ))),
            v => Ok(v),
        }
    }
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub admin: RawAdmin,
    pub upstream: RawUpstream,
    pub token: RawToken,
    pub cache: RawCache,
    pub log: RawLog,
    pub audit: RawAudit,
    pub telemetry: RawTelemetry,
    pub credentials: Vec<RawCredential>,
    pub clients: RawClients,
    pub policy: Vec<RawPolicy>,
    pub fleet: Option<RawFleet>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    pub redis_url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub partition_key_file: Option<PathBuf>,
    pub replica: Option<String>,
    pub shared_cache: Option<bool>,
    pub max_shared_object_size: Option<ByteSize>,
    #[serde(with = "duration")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Option<String>,
    pub max_body_size: Option<ByteSize>,
    #[serde(with = "duration")]
    pub header_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub shutdown_delay: Option<Duration>,
    #[serde(with = "duration")]
    pub body_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub send_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub h2_stall_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub h2_keepalive_interval: Option<Duration>,
    #[serde(with = "duration")]
    pub h2_keepalive_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub worker_threads: Option<usize>,
    pub allow_unauthenticated: Option<bool>,
    pub tls: Option<RawServerTls>,
    pub methods: Option<Vec<String>>,
    pub method_override: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServerTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: Option<String>,
    #[serde(with = "duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(with = "duration")]
    pub timeout: Option<Duration>,
    pub ca_file: Option<PathBuf>,
    #[serde(with = "duration")]
    pub pool_idle_timeout: Option<Duration>,
    pub proxy: Option<String>,
    pub proxy_credentials_file: Option<PathBuf>,
    pub max_buffered_bodies: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawToken {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: Option<bool>,
    pub max_size: Option<ByteSize>,
    pub max_object_size: Option<ByteSize>,
    pub max_inflight: Option<ByteSize>,
    #[serde(with = "duration")]
    pub fresh_for: Option<Duration>,
    #[serde(with = "duration")]
    pub stale_if_error: Option<Duration>,
    #[serde(default, with = "duration")]
    pub stale_while_revalidate: Option<Duration>,
    pub key_headers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: Option<String>,
    pub color: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    pub fail_closed: Option<bool>,
    pub max_queued: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCredential {
    pub name: Option<String>,
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClients {
    pub kubernetes: Option<RawKubernetes>,
    pub api_keys: Option<RawApiKeys>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKubernetes {
    pub audience: Option<String>,
    pub api_server: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(with = "duration")]
    pub cache_ttl: Option<Duration>,
    #[serde(with = "duration")]
    pub timeout: Option<Duration>,
    pub max_concurrent_reviews: Option<u32>,
    pub review_rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApiKeys {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    pub name: Option<String>,
    pub clients: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub credential: Option<String>,
    pub rate: Option<String>,
}
