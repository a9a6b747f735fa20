//! Configuration: the TOML file, command-line overrides, and the validated types the rest of the
//! gateway uses.
//!
//! Two stages, as in rpxy: [`raw`] holds serde structs that mirror the file; [`Config::from_raw`]
//! turns them into validated types, one module per section, collecting every problem (each
//! naming its key) before failing. Defaults are named in [`defaults`]. Validation does no file
//! I/O (the files the configuration names are checked by `--check` and at start-up). Nothing
//! outside this module sees serde or TOML.

pub mod cache;
pub mod clients;
pub mod credentials;
pub mod defaults;
pub mod fleet;
pub mod observability;
pub mod policy;
pub mod raw;
pub mod server;
pub mod upstream;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

pub use cache::{CacheConfig, KeyHeaders};
pub use clients::{ClientsConfig, KubernetesConfig};
pub use credentials::{CredentialConfig, TokenOrigin};
pub use fleet::FleetConfig;
pub use observability::{AuditConfig, AuditSink, LogColor, LogConfig, LogFormat, TelemetryConfig};
pub use server::{
    AdminConfig, DEFAULT_METHODS, NEVER_FORWARDED, OverrideMode, ServerConfig, TlsConfig,
};
pub use upstream::{PRODUCTION_URL, STAGING_URL, UpstreamConfig};

use policy::RuleSpec;
use raw::RawConfig;

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
    /// Replicas sharing a Redis (`None`: this gateway runs alone).
    pub fleet: Option<FleetConfig>,
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

    /// Validates the raw structs, applying overrides first: each section in its module, then
    /// the checks that span sections. Reports every problem at once.
    pub fn from_raw(raw: RawConfig, overrides: &Overrides) -> Result<Self, Vec<ConfigProblem>> {
        let mut p = Problems::default();
        let r = raw;
        let server = server::server(&mut p, r.server, overrides);
        let admin = server::admin(&mut p, r.admin, overrides);
        let upstream = upstream::upstream(&mut p, r.upstream, overrides);
        let credentials = credentials::credentials(&mut p, &r.token, &r.credentials, overrides);
        let clients = clients::clients(&mut p, r.clients);
        let policy = policy::policy(&mut p, r.policy, &credentials);
        let cache = cache::cache(&mut p, r.cache);
        let log = observability::log(&mut p, r.log);
        let audit = observability::audit(&mut p, r.audit);
        let telemetry = observability::telemetry(&mut p, r.telemetry);
        let fleet = fleet::fleet(&mut p, r.fleet);

        // A listener other hosts can reach must authenticate its clients.
        if let Some(s) = &server {
            let authenticates =
                s.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) || clients.any_bearer();
            if !s.listen.ip().is_loopback() && !authenticates && !s.allow_unauthenticated {
                p.add(
                    server::listen_key(overrides),
                    format!(
                        "{} is reachable from other hosts, but no client authentication is \
                         configured, so anyone who can connect would get CloudCasa access: \
                         configure server.tls.client_ca_file, [clients.kubernetes] or \
                         [clients.api_keys], or set server.allow_unauthenticated = true",
                        s.listen
                    ),
                );
            }
        }
        if let (Some(s), Some(a)) = (&server, &admin)
            && s.listen == a.listen
            && s.listen.port() != 0
        {
            p.add("admin.listen", "must differ from server.listen");
        }

        match (p.0.is_empty(), server, admin, upstream) {
            (true, Some(server), Some(admin), Some(upstream)) => Ok(Config {
                server,
                admin,
                upstream,
                credentials,
                clients,
                policy,
                cache,
                log,
                audit,
                telemetry,
                fleet,
            }),
            _ => Err(p.0),
        }
    }
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

fn positive(p: &mut Problems, key: &str, value: Option<Duration>, default: Duration) -> Duration {
    let value = value.unwrap_or(default);
    if value.is_zero() {
        p.add(key, "must be greater than zero");
    }
    value
}

/// A duration that must be at least a second: shorter would cut off clients for a network's
/// hiccup, and have every connection's watchdog sample many times a second.
fn at_least_a_second(
    p: &mut Problems,
    key: &str,
    value: Option<Duration>,
    default: Duration,
) -> Duration {
    let value = value.unwrap_or(default);
    if value < Duration::from_secs(1) {
        p.add(key, "must be at least 1s");
    }
    value
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
        assert_eq!(c.audit.max_queued, 16 * 1024 * 1024);
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
        let problems =
            validate("[token]\nfile = \"/t\"\n[audit]\nmax_queued = \"512KiB\"\n").unwrap_err();
        assert_eq!(keys(&problems), ["audit.max_queued"]);
    }

    #[test]
    fn connection_timeouts_default_and_must_be_positive() {
        let c = validate("[token]\nfile = \"/t\"\n").unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.h2_keepalive_interval, Duration::from_secs(20));
        assert_eq!(c.server.h2_keepalive_timeout, Duration::from_secs(20));
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(c.server.h2_stall_timeout, Duration::from_secs(300));
        let c = validate(
            "[token]\nfile = \"/t\"\n[server]\nh2_keepalive_interval = \"5s\"\nh2_keepalive_timeout = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(c.server.h2_keepalive_interval, Duration::from_secs(5));
        assert_eq!(c.server.h2_keepalive_timeout, Duration::from_millis(250));
        let problems = validate(
            "[token]\nfile = \"/t\"\n[server]\nidle_timeout = \"0s\"\nsend_timeout = \"999ms\"\nh2_stall_timeout = \"0s\"\nh2_keepalive_interval = \"0s\"\nh2_keepalive_timeout = \"0s\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&problems),
            [
                "server.idle_timeout",
                "server.send_timeout",
                "server.h2_stall_timeout",
                "server.h2_keepalive_interval",
                "server.h2_keepalive_timeout"
            ]
        );
    }

    #[test]
    fn token_source_is_required() {
        assert_eq!(keys(&validate("").unwrap_err()), ["token"]);
    }
}
