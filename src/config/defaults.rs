//! Every default of the configuration, named: what a key is when the file does not set it.
//! The README's configuration reference and `config/*.toml` show the same values.

use std::time::Duration;

/// `server.listen`.
pub const LISTEN: &str = "127.0.0.1:8080";
/// `admin.listen`.
pub const ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// `server.max_body_size`: 16 MiB.
pub const MAX_BODY_SIZE: u64 = 16 * 1024 * 1024;
/// `server.header_timeout`.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.drain_timeout`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// `server.idle_timeout`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.body_timeout`.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// `server.send_timeout`: nginx's `send_timeout`.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.h2_stall_timeout`: Envoy's `stream_idle_timeout`. Longer than `send_timeout`: a
/// stalled stream resets its whole connection, and a client may well leave one large body
/// unread a while as it goes on using the connection.
pub const H2_STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// `server.h2_keepalive_interval`: hyper's and grpc-go's server ping interval is off by default;
/// 20 s finds a vanished peer (a NAT that dropped its mapping, a node gone) well within
/// `idle_timeout`, for one 17-byte frame per quiet connection.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// `server.h2_keepalive_timeout`: hyper's default.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// `server.max_connections`. An idle HTTP/2 connection can hold about 75 KiB (an HTTP/1.1 one
/// about 15 KiB), so 2048 of them take 150 MiB: with the shipped shared gateway's 192 MiB cache
/// and 64 MiB fill budget that is 455 MiB under its 512 Mi limit (see the README's "Memory
/// bounds", which also says what this does not cover: connections whose clients stop reading
/// responses hold up to tens of MiB each, for up to `send_timeout`).
pub const MAX_CONNECTIONS: usize = 2048;

/// `upstream.url`.
pub const UPSTREAM_URL: &str = "production";
/// `upstream.connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `upstream.timeout`.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// `upstream.pool_idle_timeout`.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `cache.max_size`: 256 MiB.
pub const CACHE_MAX_SIZE: u64 = 256 * 1024 * 1024;
/// `cache.max_object_size`: 8 MiB.
pub const CACHE_MAX_OBJECT_SIZE: u64 = 8 * 1024 * 1024;
/// `upstream.max_buffered_bodies`: 32 MiB.
pub const MAX_BUFFERED_BODIES: u64 = 32 * 1024 * 1024;
/// `audit.max_queued`: 16 MiB, about 20,000 records of 800 bytes: a third of a second of a
/// busy gateway's records while the sink stalls.
pub const AUDIT_MAX_QUEUED: u64 = 16 * 1024 * 1024;
/// `cache.max_inflight`: 64 MiB.
pub const CACHE_MAX_INFLIGHT: u64 = 64 * 1024 * 1024;
/// `cache.key_headers`: the headers Eve (and most APIs) content-negotiate on.
pub const CACHE_KEY_HEADERS: [&str; 2] = ["accept", "accept-encoding"];

/// `clients.kubernetes.audience` (and `telemetry.service_name`).
pub const AUDIENCE: &str = "cloudcasa-gateway";
/// The in-cluster ServiceAccount mount (`clients.kubernetes.token_file` and `ca_file` are in it).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// `clients.kubernetes.cache_ttl`.
pub const REVIEW_CACHE_TTL: Duration = Duration::from_secs(30);
/// `clients.kubernetes.timeout`.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// `clients.kubernetes.max_concurrent_reviews`.
pub const MAX_CONCURRENT_REVIEWS: u32 = 16;
/// `clients.kubernetes.review_rate`.
pub const REVIEW_RATE: &str = "50/s";

/// `log.level`.
pub const LOG_LEVEL: &str = "info";
/// `telemetry.service_name`.
pub const SERVICE_NAME: &str = "cloudcasa-gateway";

/// `fleet.timeout`: a Redis round trip on a cluster network is well under a millisecond; past
/// this the link counts as down and requests go on without it.
pub const FLEET_TIMEOUT: Duration = Duration::from_millis(50);
/// `fleet.max_shared_object_size`: 1 MiB.
pub const FLEET_MAX_SHARED_OBJECT_SIZE: u64 = 1024 * 1024;
