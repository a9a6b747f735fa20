//! The `cloudcasa-gateway` command.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloudcasa_gateway::Gateway;
use cloudcasa_gateway::config::{Config, Overrides};
use cloudcasa_gateway::observability::audit::chain::{self, GENESIS};
use cloudcasa_gateway::observability::logging;

// Every request allocates (headers, extensions, futures) and frees on another thread now and
// then; mimalloc is faster than glibc's malloc at this and returns memory more readily.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: the version, the git revision and the build date.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("GATEWAY_REVISION"),
    ", built ",
    env!("GATEWAY_BUILD_DATE"),
    ")"
);

/// A caching reverse proxy in front of the CloudCasa API that injects the API token.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
struct Cli {
    /// The TOML configuration file (see config/gateway.toml).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration and the files it names, then exit.
    #[arg(long)]
    check: bool,
    /// With --check: validate the configuration alone, not the files it names (for checking
    /// manifests outside the pod those files are mounted in).
    #[arg(long, requires = "check")]
    config_only: bool,
    /// Override server.listen.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Override admin.listen (probes, metrics, cache admin).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Override upstream.url ("production", "staging" or a URL).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Override token.file.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tools for the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Read a new API key from stdin and print its line for the keys file
    /// (`ID = "sha256:<hex>"`); only the hash is ever stored.
    HashKey {
        /// The key's id: the client identity policy rules match.
        #[arg(value_name = "ID")]
        id: String,
    },
}

fn hash_key(id: &str) -> ExitCode {
    use cloudcasa_gateway::layers::identity::api_keys::{MIN_KEY_BITS, id_problem, key_bits};
    if let Some(problem) = id_problem(id) {
        eprintln!("error: {problem}");
        return ExitCode::from(2);
    }
    let mut key = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut key) {
        eprintln!("error: cannot read the key from stdin: {e}");
        return ExitCode::from(2);
    }
    let key = key.trim_end_matches(['\r', '\n']);
    if key.trim().is_empty() {
        eprintln!(
            "error: no key on stdin (e.g. `openssl rand -hex 32 | tee key | cloudcasa-gateway hash-key {id}`)"
        );
        return ExitCode::from(2);
    }
    if key.trim() != key || key.contains(char::is_whitespace) {
        eprintln!(
            "error: the key must not contain whitespace (clients send it as `Authorization: Bearer <key>`)"
        );
        return ExitCode::from(2);
    }
    if key_bits(key) < MIN_KEY_BITS {
        eprintln!(
            "error: the key is too short to resist guessing: use at least 128 bits, e.g. \
             `openssl rand -hex 32` (64 hex characters; 32 is the least accepted)"
        );
        return ExitCode::from(2);
    }
    println!(
        "{}",
        cloudcasa_gateway::layers::identity::api_keys::key_line(id, key)
    );
    ExitCode::SUCCESS
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files and name the first broken line. Give rotated files
    /// oldest first; they are checked as one chain.
    Verify {
        /// The audit files (JSON Lines).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A chain head recorded elsewhere (the gateway logs it at shutdown and at each
        /// reopen): some record in the files must have it as its hash. Repeatable.
        #[arg(long = "head", value_name = "HASH")]
        heads: Vec<String>,
    },
}

fn audit_verify(files: &[PathBuf], heads: &[String]) -> ExitCode {
    let mut anchors = Vec::with_capacity(heads.len());
    for head in heads {
        match chain::ChainHash::parse(head) {
            Some(hash) => anchors.push(hash),
            None => {
                eprintln!("error: --head {head:?} is not a chain hash (64 lowercase hex digits)");
                return ExitCode::from(2);
            }
        }
    }
    match chain::verify_anchored(files, &anchors) {
        Ok(v) if !v.missing_anchors.is_empty() || !v.unanchored.is_empty() => {
            for anchor in &v.missing_anchors {
                eprintln!(
                    "BROKEN: no record has the head {anchor}, and no chain continues from it: \
                     the records up to it were removed or replaced"
                );
            }
            for chain in &v.unanchored {
                eprintln!(
                    "BROKEN: chain {chain:?} continues from a record that is not in these files \
                     and that no --head names: the records before it were removed (or give its \
                     earlier files, or the head logged when they were rotated)"
                );
            }
            ExitCode::from(1)
        }
        Ok(v) => {
            if v.chains.is_empty() && v.torn.is_empty() {
                println!("OK: 0 records (the file is empty)");
                return ExitCode::SUCCESS;
            }
            println!(
                "OK: {} records in {} chain{}, each intact",
                v.records,
                v.chains.len(),
                if v.chains.len() == 1 { "" } else { "s" }
            );
            for c in &v.chains {
                let anchor = match c.anchor {
                    a if a == GENESIS => "the chain starts here".to_string(),
                    a => format!("continues a chain whose previous hash was {a}"),
                };
                println!(
                    "  chain {} (replica {}): {} records ({anchor}); head {}",
                    if c.id.is_empty() { "-" } else { &c.id },
                    c.replica.as_deref().unwrap_or("-"),
                    c.records,
                    c.head
                );
            }
            if !anchors.is_empty() {
                println!(
                    "  every --head given is in these files, and every chain starts from the beginning or from one"
                );
            }
            if v.torn.is_empty() {
                return ExitCode::SUCCESS;
            }
            // Intact, but records were lost where a write was cut off.
            for (file, line) in &v.torn {
                println!(
                    "  TORN: {file} line {line} is not a whole record (a write cut off by a \
                     crash): skipped; records were lost there"
                );
            }
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("BROKEN: {e}");
            ExitCode::from(if e.line == 0 { 2 } else { 1 })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Audit(AuditCommand::Verify { files, heads })) => {
            return audit_verify(files, heads);
        }
        Some(Command::HashKey { id }) => return hash_key(id),
        None => {}
    }
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream,
        token_file: cli.token_file,
    };
    let config_path = cli.config.clone();
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        let files = match cli.config_only {
            true => Ok(()),
            false => cloudcasa_gateway::app::check::check_files(&config, None),
        };
        return match files {
            Ok(()) => {
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        };
    }
    logging::init(config.log.format, config.log.color, &config.log.level);

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = config.server.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let gateway = match Gateway::bind(config).await {
            Ok(g) => g,
            Err(err) => {
                tracing::error!(error = %err, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            proxy = %gateway.proxy_addr(),
            admin = %gateway.admin_addr(),
            version = env!("CARGO_PKG_VERSION"),
            "cloudcasa-gateway listening"
        );
        let reloader = gateway.reloader();
        if let Some(path) = &config_path
            && let Ok(bytes) = std::fs::read(path)
        {
            reloader.started(&cloudcasa_gateway::app::config_hash(&bytes));
        }
        on_sighup(gateway.audit(), reloader, config_path, overrides);
        gateway.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// SIGHUP: the audit file is reopened (logrotate moved it), and the configuration file is
/// re-read and applied where it can be (see `Reloader`).
fn on_sighup(
    audit: Option<cloudcasa_gateway::observability::audit::AuditLog>,
    reloader: cloudcasa_gateway::app::Reloader,
    path: Option<PathBuf>,
    overrides: Overrides,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler: no audit reopen, no reload");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: reopening the audit file, reloading the configuration"
            );
            if let Some(audit) = &audit {
                audit.reopen();
            }
            match &path {
                // Off the runtime's workers: it reads and parses files (TLS, the audit file's
                // tail), which would stall the requests sharing a worker.
                Some(path) => {
                    let (reloader, path, overrides) =
                        (reloader.clone(), path.clone(), overrides.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        reloader.reload_from(&path, &overrides)
                    })
                    .await;
                }
                None => tracing::info!("no configuration file (--config): nothing to reload"),
            }
        }
    });
}
