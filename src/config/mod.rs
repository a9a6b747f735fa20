//! Configuration: the TOML file, command-line overrides, and the validated types the rest of the
//! gateway uses.
//!
//! Two stages, as in rpxy: [`raw`] holds serde structs that mirror the file; [`Config::from_raw`]
//! turns them into validated types, collecting every problem (each naming its key) before failing.
//! Nothing outside this module sees serde or TOML.

pub mod policy;
pub mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};

use policy::{Rate, RuleSpec};
use raw::RawConfig;

/// CloudCasa's production API.
pub const PRODUCTION_URL: &str = "https://api.cloudcasa.io";
/// CloudCasa's staging API.
pub const STAGING_URL: &str = "https://api.staging.cloudcasa.io";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The proxy listener.
    pub server: ServerConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// The CloudCasa API.
    pub upstream: UpstreamConfig,
    /// The CloudCasa credentials (`[token]` is the one named `default`).
    pub credentials: Vec<CredentialConfig>,
    /// How clients are authenticated.
    pub clients: ClientsConfig,
    /// Which client may do what with which credential; empty means every identified client uses
    /// the only credential.
    pub policy: Vec<RuleSpec>,
    /// The response cache.
    pub cache: CacheConfig,
    /// Diagnostic logs.
    pub log: LogConfig,
    /// The audit trail.
    pub audit: AuditConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_size: u64,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub drain_timeout: Duration,
    /// On shutdown, how long `/readyz` says 503 while the listener still accepts, before the
    /// drain: endpoint removal propagates meanwhile.
    pub shutdown_delay: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// The longest gap between two reads of a request body; past it, 408.
    pub body_timeout: Duration,
    /// Client connections open at once at most.
    pub max_connections: usize,
    /// Tokio worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
    /// TLS (and mTLS) on the proxy listener.
    pub tls: Option<TlsConfig>,
    /// A non-loopback listener without client authentication may start (with a warning).
    pub allow_unauthenticated: bool,
    /// The methods forwarded (case-sensitive); anything else is refused with 501.
    pub methods: Vec<http::Method>,
    /// What a method-override header does.
    pub method_override: OverrideMode,
}

/// Methods forwarded when `server.methods` is not set.
pub const DEFAULT_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Methods that are never forwarded, whatever `server.methods` says: `TRACE` would echo the
/// injected token back to the client; `CONNECT` would open a tunnel with it.
pub const NEVER_FORWARDED: [Method; 2] = [Method::TRACE, Method::CONNECT];

/// What the gateway does with a method-override header (`server.method_override`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideMode {
    /// Honoured on `POST` only (its value becomes the request's method); refused (400) on any
    /// other method.
    OnPost,
    /// Refused (400) on every method.
    Refuse,
}

impl OverrideMode {
    /// The value in `server.method_override`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnPost => "on-post",
            Self::Refuse => "refuse",
        }
    }
}

/// `server.max_connections` by default. An idle HTTP/2 connection over TLS holds up to about
/// 75 KiB (an HTTP/1.1 one about 15 KiB), so 2048 of them take 150 MiB: with the shipped shared
/// gateway's 192 MiB cache and 64 MiB fill budget that is 455 MiB under its 512 Mi limit (see
/// the README's "Memory bounds").
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// The largest `server.max_connections` accepted.
pub const MAX_MAX_CONNECTIONS: usize = 1 << 20;

/// `[server.tls]`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, client certificates signed by it identify clients (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

/// One `[[credentials]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialConfig {
    /// Name used by policy rules, audit records and metrics.
    pub name: String,
    /// File or environment variable.
    pub origin: TokenOrigin,
}

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

/// The in-cluster ServiceAccount mount.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
}

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
}

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
    /// Request headers that select a representation: part of every stored variant, whether or
    /// not the upstream sends `Vary` (lower-case names).
    pub key_headers: Vec<http::HeaderName>,
}

/// `cache.key_headers` when not set: the headers Eve (and most APIs) content-negotiate on.
pub const DEFAULT_KEY_HEADERS: [&str; 2] = ["accept", "accept-encoding"];

/// `[log]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format of diagnostic logs (stderr).
    pub format: LogFormat,
    /// ANSI colours in text logs.
    pub color: LogColor,
    /// The filter (`info`, `debug`, `warn,cloudcasa_gateway=debug`, …); `RUST_LOG` wins.
    pub level: String,
}

/// `log.color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogColor {
    /// Only when stderr is a terminal (`kubectl logs` and files get plain text).
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// `path = "-"`.
    Stdout,
    /// An append-only JSON Lines file.
    File(PathBuf),
}

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Whether records are written at all.
    pub enabled: bool,
    /// Where they go.
    pub sink: AuditSink,
    /// Writes wait for a durable intent record, and are refused (503) without one.
    pub fail_closed: bool,
}

/// `[telemetry]`.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (`/v1/traces` is appended).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
}

/// Command-line values that take precedence over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
}

/// Where a token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// A file, typically a key of a Secret mounted as a volume.
    File(PathBuf),
    /// An environment variable, read once at start.
    Env(String),
}

/// One configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `upstream.url`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the configuration came from.
    pub origin: String,
    /// The problems, in file order where possible.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration in {}:", self.origin)?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.to_string(),
            message: message.into(),
        });
    }
}

impl Config {
    /// Reads, parses and validates a file, then applies overrides.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let origin = path.map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
        let raw = match path {
            None => RawConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    origin: origin.clone(),
                    problems: vec![ConfigProblem {
                        key: "--config".into(),
                        message: format!("cannot read {}: {e}", path.display()),
                    }],
                })?;
                Self::parse(&text).map_err(|problems| ConfigError {
                    origin: origin.clone(),
                    problems,
                })?
            }
        };
        Self::from_raw(raw, overrides).map_err(|problems| ConfigError { origin, problems })
    }

    /// Parses TOML text into the raw structs. A syntax error or unknown key is reported with the
    /// key path and the line it is on.
    pub fn parse(text: &str) -> Result<RawConfig, Vec<ConfigProblem>> {
        toml::from_str::<RawConfig>(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let key = key_of_toml_error(text, e.span()).unwrap_or_else(|| "(file)".into());
            let mut message = e.message().trim().to_string();
            if let Some(line) = line {
                message.push_str(&format!(" (line {line})"));
            }
            vec![ConfigProblem { key, message }]
        })
    }

    /// Validates the raw structs, applying overrides first. Reports every problem at once.
    pub fn from_raw(raw: RawConfig, overrides: &Overrides) -> Result<Self, Vec<ConfigProblem>> {
        let mut p = Problems::default();
        let r = raw;

        let listen_text = overrides
            .listen
            .clone()
            .or(r.server.listen.clone())
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen_key = if overrides.listen.is_some() {
            "--listen"
        } else {
            "server.listen"
        };
        let listen = parse_addr(&mut p, listen_key, &listen_text);
        let (admin_key, admin_text) = match &overrides.admin_listen {
            Some(a) => ("--admin-listen", a.as_str()),
            None => (
                "admin.listen",
                r.admin.listen.as_deref().unwrap_or("127.0.0.1:9901"),
            ),
        };
        let admin_listen = parse_addr(&mut p, admin_key, admin_text);

        let max_body_size = r
            .server
            .max_body_size
            .map_or(16 * 1024 * 1024, |s| s.as_u64());
        if max_body_size == 0 {
            p.add("server.max_body_size", "must be greater than zero");
        }
        let header_timeout = positive(&mut p, "server.header_timeout", r.server.header_timeout, 10);
        let drain_timeout = r.server.drain_timeout.unwrap_or(Duration::from_secs(20));
        let idle_timeout = positive(&mut p, "server.idle_timeout", r.server.idle_timeout, 60);
        let body_timeout = positive(&mut p, "server.body_timeout", r.server.body_timeout, 30);
        let max_connections = r.server.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections) {
            p.add(
                "server.max_connections",
                format!("must be between 1 and {MAX_MAX_CONNECTIONS}"),
            );
        }
        if r.server.worker_threads == Some(0) {
            p.add("server.worker_threads", "must be at least 1");
        }

        let (url_key, url_text) = match &overrides.upstream {
            Some(u) => ("--upstream", u.clone()),
            None => (
                "upstream.url",
                r.upstream.url.unwrap_or_else(|| "production".into()),
            ),
        };
        let url = parse_upstream_url(&mut p, url_key, &url_text);
        let connect_timeout = positive(
            &mut p,
            "upstream.connect_timeout",
            r.upstream.connect_timeout,
            5,
        );
        let timeout = positive(&mut p, "upstream.timeout", r.upstream.timeout, 30);
        let pool_idle_timeout = r
            .upstream
            .pool_idle_timeout
            .unwrap_or(Duration::from_secs(90));

        let proxy = r.upstream.proxy.as_deref().and_then(|text| {
            match text.parse::<Uri>() {
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
                        format!("{text:?} is not an http://HOST:PORT proxy URL (credentials go in upstream.proxy_credentials_file)"),
                    );
                    None
                }
            }
        });
        if r.upstream.proxy_credentials_file.is_some() && proxy.is_none() {
            p.add("upstream.proxy_credentials_file", "needs upstream.proxy");
        }
        let credentials = credentials(&mut p, &r.token, &r.credentials, overrides);
        let clients = clients(&mut p, r.clients);
        let policy = policy(&mut p, r.policy, &credentials);
        let tls = r.server.tls.and_then(|t| match (t.cert_file, t.key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsConfig {
                cert_file,
                key_file,
                client_ca_file: t.client_ca_file,
            }),
            _ => {
                p.add("server.tls", "set both cert_file and key_file");
                None
            }
        });
        let allow_unauthenticated = r.server.allow_unauthenticated.unwrap_or(false);
        let methods = methods(&mut p, r.server.methods);
        let method_override = match r.server.method_override.as_deref() {
            None | Some("on-post") => OverrideMode::OnPost,
            Some("refuse") => OverrideMode::Refuse,
            Some(other) => {
                p.add(
                    "server.method_override",
                    format!("must be \"on-post\" or \"refuse\", not {other:?}"),
                );
                OverrideMode::OnPost
            }
        };
        let authenticates =
            tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) || clients.any_bearer();
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && !authenticates
            && !allow_unauthenticated
        {
            p.add(
                listen_key,
                format!(
                    "{addr} is reachable from other hosts, but no client authentication is \
                     configured, so anyone who can connect would get CloudCasa access: configure \
                     server.tls.client_ca_file, [clients.kubernetes] or [clients.api_keys], or \
                     set server.allow_unauthenticated = true"
                ),
            );
        }

        let cache = CacheConfig {
            enabled: r.cache.enabled.unwrap_or(true),
            max_size: r.cache.max_size.map_or(256 * 1024 * 1024, |s| s.as_u64()),
            max_object_size: r
                .cache
                .max_object_size
                .map_or(8 * 1024 * 1024, |s| s.as_u64()),
            max_inflight: r
                .cache
                .max_inflight
                .map_or(64 * 1024 * 1024, |s| s.as_u64()),
            fresh_for: r.cache.fresh_for.unwrap_or_default(),
            stale_if_error: r.cache.stale_if_error.unwrap_or_default(),
            key_headers: key_headers(&mut p, r.cache.key_headers),
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

        let format = match r.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add(
                    "log.format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                );
                LogFormat::Text
            }
        };

        let level = r.log.level.unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            p.add("log.level", format!("{level:?} is not a log filter: {e}"));
        }
        let color = match r.log.color.as_deref() {
            None | Some("auto") => LogColor::Auto,
            Some("always") => LogColor::Always,
            Some("never") => LogColor::Never,
            Some(other) => {
                p.add(
                    "log.color",
                    format!("must be \"auto\", \"always\" or \"never\", not {other:?}"),
                );
                LogColor::Auto
            }
        };

        let audit_enabled = r.audit.enabled.unwrap_or(true);
        let audit_sink = match r.audit.path.as_deref() {
            None | Some("-") => AuditSink::Stdout,
            Some("") => {
                p.add(
                    "audit.path",
                    "must be \"-\" (stdout) or a file path; to turn auditing off set audit.enabled = false",
                );
                AuditSink::Stdout
            }
            Some(path) => AuditSink::File(PathBuf::from(path)),
        };
        let fail_closed = r.audit.fail_closed.unwrap_or(false);
        if fail_closed && !audit_enabled {
            p.add(
                "audit.fail_closed",
                "needs the audit trail: audit.enabled must not be false",
            );
        }
        let otlp_endpoint = r.telemetry.otlp_endpoint.filter(|e| !e.is_empty());
        if let Some(endpoint) = &otlp_endpoint {
            match endpoint.parse::<Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
                _ => p.add(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL, e.g. \"http://otel-collector:4318\""),
                ),
            }
        }
        let service_name = r
            .telemetry
            .service_name
            .unwrap_or_else(|| "cloudcasa-gateway".into());
        if service_name.is_empty() {
            p.add("telemetry.service_name", "must not be empty");
        }

        if let (Some(a), Some(b)) = (listen, admin_listen)
            && a == b
            && a.port() != 0
        {
            p.add("admin.listen", "must differ from server.listen");
        }

        match (p.0.is_empty(), listen, admin_listen, url) {
            (true, Some(listen), Some(admin), Some(url)) => Ok(Config {
                server: ServerConfig {
                    listen,
                    max_body_size,
                    header_timeout,
                    drain_timeout,
                    shutdown_delay: r.server.shutdown_delay.unwrap_or_default(),
                    idle_timeout,
                    body_timeout,
                    max_connections,
                    worker_threads: r.server.worker_threads,
                    tls,
                    allow_unauthenticated,
                    methods,
                    method_override,
                },
                admin: AdminConfig { listen: admin },
                upstream: UpstreamConfig {
                    url,
                    connect_timeout,
                    timeout,
                    ca_file: r.upstream.ca_file,
                    pool_idle_timeout,
                    proxy,
                    proxy_credentials_file: r.upstream.proxy_credentials_file,
                },
                credentials,
                clients,
                policy,
                cache,
                log: LogConfig {
                    format,
                    color,
                    level,
                },
                audit: AuditConfig {
                    enabled: audit_enabled,
                    sink: audit_sink,
                    fail_closed,
                },
                telemetry: TelemetryConfig {
                    otlp_endpoint,
                    service_name,
                },
            }),
            _ => Err(p.0),
        }
    }
}

/// `cache.key_headers`: valid header names, lower-cased; `authorization` is refused (the cache
/// is partitioned by the credential the gateway injects, and the client's own never travels).
fn key_headers(p: &mut Problems, raw: Option<Vec<String>>) -> Vec<http::HeaderName> {
    let list = raw.unwrap_or_else(|| DEFAULT_KEY_HEADERS.map(String::from).to_vec());
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

/// `server.methods`: method names exactly as they travel (case-sensitive); TRACE and CONNECT are
/// never forwarded.
fn methods(p: &mut Problems, raw: Option<Vec<String>>) -> Vec<http::Method> {
    let Some(list) = raw else {
        return DEFAULT_METHODS.to_vec();
    };
    if list.is_empty() {
        p.add("server.methods", "must not be empty");
    }
    let mut out = Vec::new();
    for name in list {
        match http::Method::from_bytes(name.as_bytes()) {
            Ok(m) if NEVER_FORWARDED.contains(&m) => p.add(
                "server.methods",
                format!("{name} is never forwarded (it would echo or tunnel the injected token)"),
            ),
            Ok(m) if m.as_str().bytes().any(|b| b.is_ascii_lowercase()) => p.add(
                "server.methods",
                format!(
                    "{name:?}: method names are case-sensitive and the standard ones are \
                     upper-case; did you mean {:?}?",
                    name.to_ascii_uppercase()
                ),
            ),
            Ok(m) if out.contains(&m) => {}
            Ok(m) => out.push(m),
            Err(_) => p.add("server.methods", format!("{name:?} is not an HTTP method")),
        }
    }
    out
}

fn token_origin(
    p: &mut Problems,
    section: &str,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Option<TokenOrigin> {
    match (file, env) {
        (Some(file), None) => Some(TokenOrigin::File(file)),
        (None, Some(env)) if !env.is_empty() => Some(TokenOrigin::Env(env)),
        (None, Some(_)) => {
            p.add(
                &format!("{section}.env"),
                "must name an environment variable",
            );
            None
        }
        (Some(_), Some(_)) => {
            p.add(
                section,
                format!("set exactly one of {section}.file and {section}.env, not both"),
            );
            None
        }
        (None, None) => {
            p.add(
                section,
                format!("set {section}.file (a mounted Secret) or {section}.env"),
            );
            None
        }
    }
}

/// `[token]` (the credential named `default`) and `[[credentials]]`.
fn credentials(
    p: &mut Problems,
    token: &raw::RawToken,
    named: &[raw::RawCredential],
    overrides: &Overrides,
) -> Vec<CredentialConfig> {
    let mut out = Vec::new();
    let token_file = overrides.token_file.clone().or(token.file.clone());
    let has_token = token_file.is_some() || token.env.is_some();
    if (has_token || named.is_empty())
        && let Some(origin) = token_origin(p, "token", token_file, token.env.clone())
    {
        out.push(CredentialConfig {
            name: "default".into(),
            origin,
        });
    }
    for (i, c) in named.iter().enumerate() {
        let section = format!("credentials[{i}]");
        let name = match c.name.as_deref() {
            Some(n)
                if !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                n
            }
            Some(n) => {
                p.add(
                    &format!("{section}.name"),
                    format!("{n:?} must be letters, digits, '-', '_' or '.'"),
                );
                continue;
            }
            None => {
                p.add(&format!("{section}.name"), "is required");
                continue;
            }
        };
        if out.iter().any(|o: &CredentialConfig| o.name == name) {
            p.add(
                &format!("{section}.name"),
                format!("{name:?} is defined twice ([token] is the credential named \"default\")"),
            );
            continue;
        }
        if let Some(origin) = token_origin(p, &section, c.file.clone(), c.env.clone()) {
            out.push(CredentialConfig {
                name: name.to_string(),
                origin,
            });
        }
    }
    out
}

fn clients(p: &mut Problems, r: raw::RawClients) -> ClientsConfig {
    let kubernetes = r.kubernetes.map(|k| {
        let sa = Path::new(SERVICE_ACCOUNT_DIR);
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
        let audience = k.audience.unwrap_or_else(|| "cloudcasa-gateway".into());
        if audience.is_empty() {
            p.add("clients.kubernetes.audience", "must not be empty");
        }
        KubernetesConfig {
            audience,
            api_server: api_server.unwrap_or_default(),
            token_file: k.token_file.unwrap_or_else(|| sa.join("token")),
            ca_file: k.ca_file.unwrap_or_else(|| sa.join("ca.crt")),
            cache_ttl: k.cache_ttl.unwrap_or(Duration::from_secs(30)),
            timeout: positive(p, "clients.kubernetes.timeout", k.timeout, 5),
            max_concurrent_reviews: match k.max_concurrent_reviews {
                None => 16,
                Some(0) => {
                    p.add("clients.kubernetes.max_concurrent_reviews", "must be at least 1");
                    1
                }
                Some(n) => n,
            },
            review_rate: match k.review_rate.as_deref().map(Rate::parse) {
                None => Rate::parse("50/s").expect("a valid rate"),
                Some(Ok(rate)) => rate,
                Some(Err(e)) => {
                    p.add("clients.kubernetes.review_rate", e);
                    Rate::parse("50/s").expect("a valid rate")
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

fn policy(
    p: &mut Problems,
    rules: Vec<raw::RawPolicy>,
    credentials: &[CredentialConfig],
) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        let key = |field: &str| format!("policy[{i}].{field}");
        let name = r.name.unwrap_or_else(|| format!("policy[{i}]"));
        let credential = match r.credential {
            Some(c) if credentials.iter().any(|k| k.name == c) => c,
            Some(c) => {
                let known: Vec<_> = credentials.iter().map(|k| k.name.as_str()).collect();
                p.add(
                    &key("credential"),
                    format!("no credential named {c:?} (defined: {})", known.join(", ")),
                );
                continue;
            }
            None => {
                p.add(
                    &key("credential"),
                    "is required: the credential this rule's requests use",
                );
                continue;
            }
        };
        let rate = match r.rate.as_deref().map(Rate::parse) {
            None => None,
            Some(Ok(rate)) => Some(rate),
            Some(Err(e)) => {
                p.add(&key("rate"), e);
                None
            }
        };
        let Some(clients) = r.clients.filter(|c| !c.is_empty()) else {
            p.add(
                &key("clients"),
                "is required: client ids or globs, e.g. [\"system:serviceaccount:velero:*\"]",
            );
            continue;
        };
        match RuleSpec::new(name, clients, r.methods, r.paths, credential, rate) {
            Ok(rule) => out.push(rule),
            Err((field, message)) => p.add(&key(field), message),
        }
    }
    if out.is_empty() && credentials.len() > 1 {
        p.add(
            "policy",
            "with more than one credential, [[policy]] rules must say which client uses which",
        );
    }
    out
}

fn parse_https_url(p: &mut Problems, key: &str, text: &str) -> Option<Uri> {
    match text.parse::<Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Some(u),
        _ => {
            p.add(key, format!("{text:?} is not an https:// URL"));
            None
        }
    }
}

fn parse_addr(p: &mut Problems, key: &str, text: &str) -> Option<SocketAddr> {
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            p.add(
                key,
                format!("{text:?} is not an IP address and port, e.g. \"127.0.0.1:8080\""),
            );
            None
        }
    }
}

fn positive(p: &mut Problems, key: &str, value: Option<Duration>, default_secs: u64) -> Duration {
    let value = value.unwrap_or(Duration::from_secs(default_secs));
    if value.is_zero() {
        p.add(key, "must be greater than zero");
    }
    value
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

/// Finds the dotted key a TOML error points at, from the section header above the error span and
/// the key on its line; toml's own message names only the last segment.
fn key_of_toml_error(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let span = span?;
    let before = &text[..span.start.min(text.len())];
    let section = before.lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|s| s.trim_matches('[').trim().to_string())
    });
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        // The error is about the table header itself (an unknown section).
        let name = line.trim_matches(|c| c == '[' || c == ']').trim();
        return Some(name.to_string()).filter(|n| !n.is_empty()).or(section);
    }
    let key = line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    match (section, key) {
        (Some(s), Some(k)) => Some(format!("{s}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (s, None) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<Config, Vec<ConfigProblem>> {
        Config::from_raw(Config::parse(text)?, &Overrides::default())
    }

    fn keys(problems: &[ConfigProblem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = validate("[token]\nfile = \"/t\"\n").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.server.max_body_size, 16 * 1024 * 1024);
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.drain_timeout, Duration::from_secs(20));
        assert_eq!(c.upstream.url, PRODUCTION_URL);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert!(c.cache.enabled);
        assert_eq!(c.cache.max_size, 256 * 1024 * 1024);
        assert_eq!(c.cache.max_object_size, 8 * 1024 * 1024);
        assert_eq!(c.cache.fresh_for, Duration::ZERO);
    }

    #[test]
    fn environment_names_and_units() {
        let c = validate(
            "[upstream]\nurl = \"staging\"\ntimeout = \"5m\"\n[server]\nmax_body_size = \"1KiB\"\n[token]\nenv = \"T\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.url, STAGING_URL);
        assert_eq!(c.upstream.timeout, Duration::from_secs(300));
        assert_eq!(c.server.max_body_size, 1024);
        assert_eq!(c.credentials[0].origin, TokenOrigin::Env("T".into()));
        assert_eq!(c.credentials[0].name, "default");
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let problems = validate("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n").unwrap_err();
        assert_eq!(keys(&problems), ["server.lisen"]);
        assert!(
            problems[0].message.contains("unknown field"),
            "{problems:?}"
        );
        assert!(problems[0].message.contains("line 3"), "{problems:?}");
    }

    #[test]
    fn unknown_section_is_named() {
        let problems = validate("[token]\nfile = \"/t\"\n[telemetri]\nx = 1\n").unwrap_err();
        assert_eq!(keys(&problems), ["telemetri"]);
    }

    #[test]
    fn bad_duration_is_named() {
        let problems = validate("[upstream]\ntimeout = \"soon\"\n").unwrap_err();
        assert_eq!(keys(&problems), ["upstream.timeout"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = validate(
            "[server]\nlisten = \"nope\"\n[upstream]\nurl = \"ftp://x\"\n[token]\nfile = \"/a\"\nenv = \"B\"\n[log]\nformat = \"xml\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&problems),
            ["server.listen", "upstream.url", "token", "log.format"]
        );
    }

    #[test]
    fn overrides_win_and_are_named() {
        let raw =
            Config::parse("[token]\nfile = \"/a\"\n[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides {
            listen: Some("bad".into()),
            admin_listen: Some("worse".into()),
            upstream: Some("http://127.0.0.1:9".into()),
            token_file: Some("/b".into()),
        };
        let problems = Config::from_raw(raw, &o).unwrap_err();
        assert_eq!(keys(&problems), ["--listen", "--admin-listen"]);
    }

    #[test]
    fn audit_and_telemetry() {
        let c = validate("[token]\nfile = \"/t\"\n").unwrap();
        assert_eq!(c.audit.sink, AuditSink::Stdout);
        assert!(c.audit.enabled && !c.audit.fail_closed);
        assert_eq!(c.telemetry.service_name, "cloudcasa-gateway");
        assert_eq!(c.telemetry.otlp_endpoint, None);
        let c = validate(
            "[token]\nfile = \"/t\"\n[audit]\npath = \"/var/log/a.jsonl\"\nfail_closed = true\n[telemetry]\notlp_endpoint = \"http://c:4318\"\n",
        )
        .unwrap();
        assert_eq!(c.audit.sink, AuditSink::File("/var/log/a.jsonl".into()));
        assert!(c.audit.fail_closed);
        let problems = validate(
            "[token]\nfile = \"/t\"\n[audit]\nenabled = false\nfail_closed = true\n[telemetry]\notlp_endpoint = \"c:4318\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&problems),
            ["audit.fail_closed", "telemetry.otlp_endpoint"]
        );
    }

    #[test]
    fn token_source_is_required() {
        assert_eq!(keys(&validate("").unwrap_err()), ["token"]);
    }
}
