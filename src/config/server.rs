//! `[server]` and `[admin]`: the listeners, their limits, TLS, and which methods are forwarded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;

use super::{Overrides, Problems, at_least_a_second, defaults, parse_addr, positive, raw};

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
    /// The longest a client may keep the gateway's writes to it waiting; past it, the
    /// connection is closed.
    pub send_timeout: Duration,
    /// The longest an HTTP/2 stream's response may wait for the client to take its next frame
    /// (its flow-control window kept shut); past it, the connection is reset.
    pub h2_stall_timeout: Duration,
    /// An HTTP/2 peer that sent no frame for this long is sent a PING.
    pub h2_keepalive_interval: Duration,
    /// ...and its connection is closed if the PING is not acknowledged within this.
    pub h2_keepalive_timeout: Duration,
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

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
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

/// Validates `[server]` (the listener's address with `--listen` applied); `None` when the
/// address is unusable (the problem is recorded).
pub(super) fn server(
    p: &mut Problems,
    r: raw::RawServer,
    overrides: &Overrides,
) -> Option<ServerConfig> {
    let listen_text = overrides
        .listen
        .clone()
        .or(r.listen.clone())
        .unwrap_or_else(|| defaults::LISTEN.into());
    let listen = parse_addr(p, listen_key(overrides), &listen_text);
    let max_body_size = r
        .max_body_size
        .map_or(defaults::MAX_BODY_SIZE, |s| s.as_u64());
    if max_body_size == 0 {
        p.add("server.max_body_size", "must be greater than zero");
    }
    let header_timeout = positive(
        p,
        "server.header_timeout",
        r.header_timeout,
        defaults::HEADER_TIMEOUT,
    );
    let drain_timeout = r.drain_timeout.unwrap_or(defaults::DRAIN_TIMEOUT);
    let idle_timeout = positive(
        p,
        "server.idle_timeout",
        r.idle_timeout,
        defaults::IDLE_TIMEOUT,
    );
    let body_timeout = positive(
        p,
        "server.body_timeout",
        r.body_timeout,
        defaults::BODY_TIMEOUT,
    );
    let send_timeout = at_least_a_second(
        p,
        "server.send_timeout",
        r.send_timeout,
        defaults::SEND_TIMEOUT,
    );
    let h2_stall_timeout = at_least_a_second(
        p,
        "server.h2_stall_timeout",
        r.h2_stall_timeout,
        defaults::H2_STALL_TIMEOUT,
    );
    let h2_keepalive_interval = positive(
        p,
        "server.h2_keepalive_interval",
        r.h2_keepalive_interval,
        defaults::H2_KEEPALIVE_INTERVAL,
    );
    let h2_keepalive_timeout = positive(
        p,
        "server.h2_keepalive_timeout",
        r.h2_keepalive_timeout,
        defaults::H2_KEEPALIVE_TIMEOUT,
    );
    let max_connections = r.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
    if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections) {
        p.add(
            "server.max_connections",
            format!("must be between 1 and {MAX_MAX_CONNECTIONS}"),
        );
    }
    if r.worker_threads == Some(0) {
        p.add("server.worker_threads", "must be at least 1");
    }
    let tls = r.tls.and_then(|t| match (t.cert_file, t.key_file) {
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
    let methods = methods(p, r.methods);
    let method_override = match r.method_override.as_deref() {
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
    Some(ServerConfig {
        listen: listen?,
        max_body_size,
        header_timeout,
        drain_timeout,
        shutdown_delay: r.shutdown_delay.unwrap_or_default(),
        idle_timeout,
        body_timeout,
        send_timeout,
        h2_stall_timeout,
        h2_keepalive_interval,
        h2_keepalive_timeout,
        max_connections,
        worker_threads: r.worker_threads,
        tls,
        allow_unauthenticated: r.allow_unauthenticated.unwrap_or(false),
        methods,
        method_override,
    })
}

/// The key the proxy listener's address came from.
pub(super) fn listen_key(overrides: &Overrides) -> &'static str {
    match overrides.listen.is_some() {
        true => "--listen",
        false => "server.listen",
    }
}

/// Validates `[admin]` (with `--admin-listen` applied).
pub(super) fn admin(
    p: &mut Problems,
    r: raw::RawAdmin,
    overrides: &Overrides,
) -> Option<AdminConfig> {
    let (key, text) = match &overrides.admin_listen {
        Some(a) => ("--admin-listen", a.as_str()),
        None => (
            "admin.listen",
            r.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN),
        ),
    };
    Some(AdminConfig {
        listen: parse_addr(p, key, text)?,
    })
}
