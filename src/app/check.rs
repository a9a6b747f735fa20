//! The checks of `--check` (and of a reload) that touch the filesystem: every file the
//! configuration names must be readable now and hold what start-up will load from it. They are
//! kept out of config validation, which does no I/O; start-up loads the same files and fails on
//! the same problems.

use std::path::Path;

use crate::config::{AuditSink, Config, ConfigError, ConfigProblem, TokenOrigin};
use crate::layers::identity::api_keys;
use crate::layers::identity::kubernetes::TokenReviewer;
use crate::secrets::tls::ServerTls;
use crate::upstream::Upstream;

/// Problems found, each under its key.
#[derive(Default)]
struct Found(Vec<ConfigProblem>);

impl Found {
    fn add(&mut self, key: &str, message: String) {
        self.0.push(ConfigProblem {
            key: key.to_string(),
            message,
        });
    }

    /// `path` must exist and be readable as metadata (the file's contents are checked where
    /// start-up parses them).
    fn readable(&mut self, key: &str, path: &Path) {
        if let Err(e) = std::fs::metadata(path) {
            self.add(key, format!("cannot read {}: {e}", path.display()));
        }
    }

    /// An error from building what start-up builds; its text names the key first ("key: why").
    fn built(&mut self, error: &dyn std::fmt::Display) {
        let text = error.to_string();
        match text.split_once(": ") {
            Some((key, why)) => self.add(key, why.to_string()),
            None => self.add("(start-up)", text),
        }
    }
}

/// The extra checks of `--check`: files named in the configuration must be readable now and
/// hold what start-up loads from them. (At run time a missing token file is tolerated: the
/// Secret may appear later.) `live_audit` is the audit file a running gateway writes, on a
/// reload: not read, since its last line may be half written at that moment.
pub fn check_files(config: &Config, live_audit: Option<&Path>) -> Result<(), ConfigError> {
    let mut p = Found::default();
    for (i, c) in config.credentials.iter().enumerate() {
        let key = |field: &str| match c.name.as_str() {
            "default" => format!("token.{field}"),
            _ => format!("credentials[{i}].{field}"),
        };
        match &c.origin {
            TokenOrigin::File(path) => match std::fs::read_to_string(path) {
                Ok(t) if t.trim().is_empty() => {
                    p.add(&key("file"), format!("{} is empty", path.display()))
                }
                Ok(_) => {}
                Err(e) => p.add(&key("file"), format!("cannot read {}: {e}", path.display())),
            },
            TokenOrigin::Env(name) => {
                if std::env::var(name)
                    .map(|v| v.trim().is_empty())
                    .unwrap_or(true)
                {
                    p.add(
                        &key("env"),
                        format!("environment variable {name} is not set or empty"),
                    );
                }
            }
        }
    }
    if let Some(tls) = &config.server.tls {
        let before = p.0.len();
        p.readable("server.tls.cert_file", &tls.cert_file);
        p.readable("server.tls.key_file", &tls.key_file);
        if let Some(ca) = &tls.client_ca_file {
            p.readable("server.tls.client_ca_file", ca);
        }
        // Parsed and matched as start-up does (a certificate, a key that is the certificate's,
        // a usable CA bundle), once every file is there.
        if p.0.len() == before
            && let Err(e) = ServerTls::load(tls)
        {
            p.built(&e);
        }
    }
    // `[fleet]`: start-up reads these (a missing password or partition key would make the
    // replica unable to join, or join a different partition space).
    if let Some(fleet) = &config.fleet {
        for (key, path) in [
            ("fleet.password_file", &fleet.password_file),
            ("fleet.ca_file", &fleet.ca_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::read(path)
            {
                p.add(key, format!("cannot read {}: {e}", path.display()));
            }
        }
        // Read as start-up reads it, once: unreadable, or too short.
        if let Some(path) = &fleet.partition_key_file {
            match crate::fleet::read_partition_key(path) {
                Err(crate::fleet::FleetSetupError::File { source, .. }) => p.add(
                    "fleet.partition_key_file",
                    format!("cannot read {}: {source}", path.display()),
                ),
                Err(e) => p.built(&e),
                Ok(_) => {}
            }
        }
    }
    // The upstream's client as start-up builds it: the CA bundle parsed, the proxy's
    // credentials read and checked, the proxy variables read.
    if let Err(e) = Upstream::check(&config.upstream) {
        p.built(&e);
    }
    if let Some(k) = &config.clients.kubernetes {
        p.readable("clients.kubernetes.token_file", &k.token_file);
        if let Err(e) = TokenReviewer::check(k) {
            p.built(&e);
        }
    }
    if let Some(keys) = &config.clients.api_keys {
        // Parsed, as start-up parses it: nothing --check accepts may fail at start.
        match std::fs::read_to_string(keys) {
            Err(e) => p.add(
                "clients.api_keys.file",
                format!("cannot read {}: {e}", keys.display()),
            ),
            Ok(text) => {
                if let Err(e) = api_keys::parse(&text) {
                    p.add("clients.api_keys.file", format!("{}: {e}", keys.display()));
                }
            }
        }
    }
    if let (true, AuditSink::File(path)) = (config.audit.enabled, &config.audit.sink)
        && live_audit != Some(path.as_path())
        && let Err(why) = audit_file_writable(path)
    {
        p.add("audit.path", why);
    }
    if p.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            origin: "the files named in the configuration".into(),
            problems: p.0,
        })
    }
}

/// Whether the audit trail can be opened as start-up opens it (for appending, creating it if
/// need be) and its chain head read, without changing anything: an existing file is opened
/// for appending and read (a device such as `/dev/null` only opened; a pipe, whose opening
/// waits for a reader, left to start-up); otherwise a file is created in its directory and
/// removed again.
fn audit_file_writable(path: &Path) -> Result<(), String> {
    if path.exists() {
        use std::os::unix::fs::FileTypeExt;
        let kind = std::fs::metadata(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .file_type();
        if kind.is_dir() {
            return Err(format!("{} is a directory", path.display()));
        }
        // A pipe is opened as start-up opens it, which waits for its reader: not here.
        if kind.is_fifo() {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {} for appending: {e}", path.display()))?;
        // A device (`/dev/null`) has no chain to read: start-up starts one.
        if !kind.is_file() {
            return Ok(());
        }
        return crate::observability::audit::chain::read_head(path)
            .map(drop)
            .map_err(|e| format!("cannot read {}: {e}", path.display()));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    let probe = dir.join(format!(".cloudcasa-gateway-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot create {} in {}: {e}",
            path.display(),
            dir.display()
        )),
    }
}
