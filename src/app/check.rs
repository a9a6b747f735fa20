//! The checks of `--check` (and of a reload) that touch the filesystem: every file the
//! configuration names must be readable now and hold what start-up will load from it. They are
//! kept out of config validation, which does no I/O; start-up loads the same files and fails on
//! the same problems.

use std::path::Path;

use crate::config::{AuditSink, Config, ConfigError, ConfigProblem, TokenOrigin};
use crate::layers::identity::api_keys;

/// The extra checks of `--check`: files named in the configuration must be readable now.
/// (At run time a missing token file is tolerated: the Secret may appear later.)
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    let mut p: Vec<ConfigProblem> = Vec::new();
    let mut add = |key: &str, message: String| {
        p.push(ConfigProblem {
            key: key.to_string(),
            message,
        })
    };
    for (i, c) in config.credentials.iter().enumerate() {
        let key = |field: &str| match c.name.as_str() {
            "default" => format!("token.{field}"),
            _ => format!("credentials[{i}].{field}"),
        };
        match &c.origin {
            TokenOrigin::File(path) => match std::fs::read_to_string(path) {
                Ok(t) if t.trim().is_empty() => {
                    add(&key("file"), format!("{} is empty", path.display()))
                }
                Ok(_) => {}
                Err(e) => add(&key("file"), format!("cannot read {}: {e}", path.display())),
            },
            TokenOrigin::Env(name) => {
                if std::env::var(name)
                    .map(|v| v.trim().is_empty())
                    .unwrap_or(true)
                {
                    add(
                        &key("env"),
                        format!("environment variable {name} is not set or empty"),
                    );
                }
            }
        }
    }
    let readable = |add: &mut dyn FnMut(&str, String), key: &str, path: &Path| {
        if let Err(e) = std::fs::metadata(path) {
            add(key, format!("cannot read {}: {e}", path.display()));
        }
    };
    if let Some(tls) = &config.server.tls {
        readable(&mut add, "server.tls.cert_file", &tls.cert_file);
        readable(&mut add, "server.tls.key_file", &tls.key_file);
        if let Some(ca) = &tls.client_ca_file {
            readable(&mut add, "server.tls.client_ca_file", ca);
        }
    }
    // `[fleet]`: start-up reads these (a missing password or partition key would make the
    // replica unable to join, or join a different partition space).
    if let Some(fleet) = &config.fleet {
        for (key, path) in [
            ("fleet.password_file", &fleet.password_file),
            ("fleet.partition_key_file", &fleet.partition_key_file),
            ("fleet.ca_file", &fleet.ca_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::read(path)
            {
                add(key, format!("cannot read {}: {e}", path.display()));
            }
        }
    }
    // Parsed, as start-up parses it.
    if let Some(ca) = &config.upstream.ca_file
        && let Err(e) = crate::http::pem::read_pem_roots(ca)
    {
        add("upstream.ca_file", e.to_string());
    }
    if let Some(f) = &config.upstream.proxy_credentials_file {
        readable(&mut add, "upstream.proxy_credentials_file", f);
    }
    if let Some(k) = &config.clients.kubernetes {
        readable(&mut add, "clients.kubernetes.token_file", &k.token_file);
        readable(&mut add, "clients.kubernetes.ca_file", &k.ca_file);
    }
    if let Some(keys) = &config.clients.api_keys {
        // Parsed, as start-up parses it: nothing --check accepts may fail at start.
        match std::fs::read_to_string(keys) {
            Err(e) => add(
                "clients.api_keys.file",
                format!("cannot read {}: {e}", keys.display()),
            ),
            Ok(text) => {
                if let Err(e) = api_keys::parse(&text) {
                    add("clients.api_keys.file", format!("{}: {e}", keys.display()));
                }
            }
        }
    }
    if let (true, AuditSink::File(path)) = (config.audit.enabled, &config.audit.sink) {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            add(
                "audit.path",
                format!("directory {} does not exist", dir.display()),
            );
        }
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            origin: "the files named in the configuration".into(),
            problems: p,
        })
    }
}
