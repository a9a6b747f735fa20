//! The `cloudcasa-gateway` binary: `--check`, bad configurations, flags, and signals.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cloudcasa-gateway");

fn check(config: &str, token: Option<&str>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    if let Some(t) = token {
        std::fs::write(&token_path, t).unwrap();
    }
    let text = config.replace("TOKEN_PATH", &token_path.display().to_string());
    let path = write_file(dir.path(), "gateway.toml", &text);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_accepts_a_good_config() {
    let (ok, out) = check("[token]\nfile = \"TOKEN_PATH\"\n", Some("t"));
    assert!(ok, "{out}");
    assert!(out.contains("configuration OK"));
}

#[test]
fn check_names_the_offending_key() {
    let cases = [
        (
            "[server]\nlistn = \"x\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "server.listn",
        ),
        (
            "[upstream]\ntimeout = \"later\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "upstream.timeout",
        ),
        (
            "[upstream]\nurl = \"gopher://x\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "upstream.url",
        ),
        (
            "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "upstream.ca_file",
        ),
        (
            "[server]\nmax_body_size = \"lots\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "server.max_body_size",
        ),
        ("[token]\nfile = \"TOKEN_PATH\"\nenv = \"X\"\n", "token"),
        ("[telemetry]\nx = 1\n", "telemetry.x"),
        (
            "[audit]\npath = \"\"\n[token]\nfile = \"TOKEN_PATH\"\n",
            "audit.path",
        ),
    ];
    for (config, key) in cases {
        let (ok, out) = check(config, Some("t"));
        assert!(!ok, "accepted: {config}");
        assert!(out.contains(&format!("{key}:")), "expected {key} in: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[test]
fn check_requires_named_files_to_be_readable() {
    let (ok, out) = check("[token]\nfile = \"TOKEN_PATH\"\n", None);
    assert!(!ok);
    assert!(out.contains("token.file:"), "{out}");
}

#[test]
fn help_and_version() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--config",
        "--check",
        "--listen",
        "--admin-listen",
        "--upstream",
        "--token-file",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let version = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// The real binary in front of `mock`, on free ports, with `extra` TOML; returns once ready.
async fn spawn_gateway(
    mock: &MockCloudCasa,
    secret: &SecretDir,
    extra: &str,
) -> (ChildGateway, String) {
    let log = secret.dir.path().join("stderr.log");
    let child = ChildGateway::start(log, &[], |proxy, admin| {
        let config = write_file(
            secret.dir.path(),
            "gateway.toml",
            &format!("[admin]\nlisten = \"{admin}\"\n[server]\ndrain_timeout = \"10s\"\n{extra}\n"),
        );
        vec![
            "--config".into(),
            config.into(),
            "--listen".into(),
            proxy.to_string().into(),
            "--upstream".into(),
            mock.url().into(),
            "--token-file".into(),
            secret.token_path().into(),
        ]
    })
    .await;
    let ready = format!("http://{}/readyz", child.admin);
    eventually(
        Duration::from_secs(10),
        "the gateway to become ready",
        || async {
            match client().get(ready.parse().unwrap()).await {
                Ok(r) => r.status() == StatusCode::OK,
                Err(_) => false,
            }
        },
    )
    .await;
    let base = format!("http://{}", child.proxy);
    (child, base)
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let (mut child, base) = spawn_gateway(&mock, &secret, "").await;

    mock.state
        .set_fault(Fault::Delay(Duration::from_millis(500)), Some(1));
    let url = format!("{base}/api/v1/clusters");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    mock.state.wait_for(1).await;
    child.signal("TERM");
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    let (status, logs) = child.wait().await;
    assert!(status.success(), "exit: {status:?}");
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(
        !logs.contains("token-a"),
        "the token leaked into the logs: {logs}"
    );
}

#[tokio::test]
async fn sighup_reopens_the_audit_file_and_the_chain_goes_on() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let (mut child, base) = spawn_gateway(
        &mock,
        &secret,
        &format!("[audit]\npath = \"{}\"", audit.display()),
    )
    .await;
    let url = format!("{base}/api/v1/clusters");
    get(&url, &[]).await;
    eventually(Duration::from_secs(10), "the first record", || {
        std::future::ready(read_records(&audit).len() == 1)
    })
    .await;
    // What logrotate does: move the file, then signal.
    std::fs::rename(&audit, &rotated).unwrap();
    child.signal("HUP");
    eventually(Duration::from_secs(10), "a new audit file", || {
        std::future::ready(audit.exists())
    })
    .await;
    get(&url, &[]).await;
    child.signal("TERM");
    let (status, logs) = child.wait().await;
    assert!(status.success(), "exit: {status:?}: {logs}");
    assert_eq!(read_records(&rotated).len(), 1);
    assert_eq!(read_records(&audit).len(), 1);
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&rotated)
        .arg(&audit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("OK: 2 records"),
        "{text}"
    );
}

#[test]
fn a_reachable_listener_without_client_authentication_refuses_to_start() {
    let open = "[server]\nlisten = \"0.0.0.0:8443\"\n[token]\nfile = \"TOKEN_PATH\"\n";
    let (ok, out) = check(open, Some("t"));
    assert!(!ok, "started open: {out}");
    assert!(
        out.contains("server.listen:") && out.contains("allow_unauthenticated"),
        "{out}"
    );
    let allowed = open.replace("[token]", "allow_unauthenticated = true\n[token]");
    let (ok, out) = check(&allowed, Some("t"));
    assert!(ok, "{out}");
    // (The one file serves as the token and as a valid keys file.)
    let with_keys = format!("{open}[clients.api_keys]\nfile = \"TOKEN_PATH\"\n");
    let keys = cloudcasa_gateway::layers::identity::api_keys::key_line("a", "k");
    let (ok, out) = check(&with_keys, Some(&keys));
    assert!(ok, "{out}");
}

#[test]
fn check_validates_credentials_and_policy() {
    let base = "[[credentials]]\nname = \"team-a\"\nfile = \"TOKEN_PATH\"\n";
    let cases = [
        (
            format!("{base}[[policy]]\nclients = [\"apikey:a\"]\ncredential = \"team-b\"\n"),
            "policy[0].credential",
        ),
        (
            format!("{base}[[policy]]\nclients = [\"apikey:a[\"]\ncredential = \"team-a\"\n"),
            "policy[0].clients",
        ),
        (
            format!(
                "{base}[[policy]]\nclients = [\"apikey:a\"]\npaths = [\"api/**\"]\ncredential = \"team-a\"\n"
            ),
            "policy[0].paths",
        ),
        (
            // Paths are matched without their trailing slash: this pattern could never match.
            format!(
                "{base}[[policy]]\nclients = [\"apikey:a\"]\npaths = [\"/api/v1/clusters/\"]\ncredential = \"team-a\"\n"
            ),
            "policy[0].paths",
        ),
        (
            format!(
                "{base}[[policy]]\nclients = [\"apikey:a\"]\nrate = \"fast\"\ncredential = \"team-a\"\n"
            ),
            "policy[0].rate",
        ),
        (
            format!("{base}[[credentials]]\nname = \"team-b\"\nfile = \"TOKEN_PATH\"\n"),
            "policy",
        ),
        (
            // A bare id names no kind of client: an API key's id is apikey:<id>.
            format!("{base}[[policy]]\nclients = [\"backup-bot\"]\ncredential = \"team-a\"\n"),
            "policy[0].clients",
        ),
        (
            format!(
                "{base}[[policy]]\nclients = [\"apikey:a\"]\nrate = \"2000000000/s\"\ncredential = \"team-a\"\n"
            ),
            "policy[0].rate",
        ),
        (
            format!("{base}[server]\nmethods = [\"GET\", \"TRACE\"]\n"),
            "server.methods",
        ),
        (
            format!("{base}[server]\nmethods = [\"get\"]\n"),
            "server.methods",
        ),
        (
            format!("{base}[server]\nmethod_override = \"always\"\n"),
            "server.method_override",
        ),
        (
            format!("{base}[cache]\nkey_headers = [\"authorization\"]\n"),
            "cache.key_headers",
        ),
        (
            format!(
                "{base}[clients.kubernetes]\napi_server = \"https://127.0.0.1:6443\"\nreview_rate = \"0/s\"\nmax_concurrent_reviews = 0\n"
            ),
            "clients.kubernetes.review_rate",
        ),
        (
            format!("{base}[[credentials]]\nname = \"team-a\"\nfile = \"TOKEN_PATH\"\n"),
            "credentials[1].name",
        ),
        (
            format!(
                "{base}[server.tls]\ncert_file = \"/nonexistent/tls.crt\"\nkey_file = \"/nonexistent/tls.key\"\n"
            ),
            "server.tls.cert_file",
        ),
    ];
    for (config, key) in cases {
        let (ok, out) = check(&config, Some("t"));
        assert!(!ok, "accepted: {config}");
        assert!(out.contains(&format!("{key}:")), "expected {key} in: {out}");
    }
    let (_, out) = check(
        &format!("{base}[[policy]]\nclients = [\"backup-bot\"]\ncredential = \"team-a\"\n"),
        Some("t"),
    );
    assert!(
        out.contains("did you mean \"apikey:backup-bot\"?"),
        "no hint: {out}"
    );
    let good = format!(
        "{base}[[policy]]\nclients = [\"system:serviceaccount:velero:*\"]\nmethods = [\"GET\"]\npaths = [\"/api/v1/**\"]\ncredential = \"team-a\"\nrate = \"50/s\"\n"
    );
    let (ok, out) = check(&good, Some("t"));
    assert!(ok, "{out}");
}

#[test]
fn hash_key_prints_a_line_for_the_keys_file() {
    use std::io::Write;
    let hash_key = |id: &str, key: &str| {
        let mut child = Command::new(BIN)
            .args(["hash-key", id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A refused id exits before reading the key: the pipe may be closed by then.
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{key}\n").as_bytes());
        child.wait_with_output().unwrap()
    };
    let key = "9f86d081884c7d659a2feaa0c55ad015";
    let out = hash_key("backup-bot", key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("backup-bot = \"sha256:"), "{line}");
    assert!(!line.contains(key));
    let keys = cloudcasa_gateway::layers::identity::api_keys::parse(&line).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        line.trim(),
        cloudcasa_gateway::layers::identity::api_keys::key_line("backup-bot", key)
    );
    // Fewer than 128 bits of key, or no id: refused.
    for (id, key, why) in [
        ("backup-bot", "the-new-key", "too short"),
        ("backup-bot", &key[..31], "too short"),
        ("", key, "empty"),
    ] {
        let out = hash_key(id, key);
        assert!(!out.status.success(), "{id:?} {key:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn version_names_the_revision_and_build_date() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!(
            "cloudcasa-gateway {} (revision ",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let date = text
        .split("built ")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(')');
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "{text}"
    );
}

#[test]
fn check_refuses_keys_files_with_shared_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let line = |id| cloudcasa_gateway::layers::identity::api_keys::key_line(id, "one-key-for-two");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, format!("{}\n{}\n", line("a"), line("b"))).unwrap();
    let config = format!(
        "[token]\nfile = \"TOKEN_PATH\"\n[clients.api_keys]\nfile = \"{}\"\n",
        keys.display()
    );
    let (ok, out) = check(&config, Some("t"));
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("clients.api_keys.file") && out.contains("same key hash"),
        "{out}"
    );
}

/// `--admin-listen` overrides `admin.listen`: the admin port is where the flag says, and nothing
/// listens where the file says.
#[tokio::test]
async fn admin_listen_overrides_the_file() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let in_file = free_addr();
    let child = ChildGateway::start(secret.dir.path().join("stderr.log"), &[], |proxy, admin| {
        let config = write_file(
            secret.dir.path(),
            "gateway.toml",
            &format!(
                "[server]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{in_file}\"\n\
                 [audit]\nenabled = false\n[upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"\n",
                mock.url(),
                secret.token_path().display()
            ),
        );
        // ChildGateway waits for `admin` to accept: only the flag can put the port there.
        vec![
            "--config".into(),
            config.into(),
            "--admin-listen".into(),
            admin.to_string().into(),
        ]
    })
    .await;
    let ready = format!("http://{}/readyz", child.admin);
    eventually(
        Duration::from_secs(10),
        "ready on the flag's port",
        || async { get(&ready, &[]).await.status == StatusCode::OK },
    )
    .await;
    let metrics = get(&format!("http://{}/metrics", child.admin), &[]).await;
    assert!(metrics.text().contains("cloudcasa_gateway_build_info"));
    assert!(
        std::net::TcpStream::connect(in_file).is_err(),
        "the file's admin address is listening too"
    );
    assert!(
        child.logs().contains(&format!("admin={}", child.admin)),
        "{}",
        child.logs()
    );
}

/// The configurations in config/ (README "Running it" starts the binary with config/gateway.toml)
/// pass `--check --config-only`: their values are valid, though the files they name live in a
/// pod (or, for local.toml, are relative to the checkout).
#[test]
fn the_shipped_configurations_pass_check() {
    for name in ["gateway.toml", "local.toml", "shared-gateway.toml"] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR")))
            .args(["--check", "--config-only"])
            // As in a pod: shared-gateway.toml finds the API server through these.
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "config/{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_parses_what_start_up_parses_and_refuses_durations_that_overflow() {
    // Each of these passed --check once (the files exist) and then failed at start, or, for
    // the durations, panicked on every connection or request.
    let dir = tempfile::tempdir().unwrap();
    let junk = write_file(dir.path(), "junk.pem", "not pem\n");
    let ca = tls::TestCa::new("check");
    let (cert, key) = ca.leaf_pem(&["localhost"]);
    let cert = write_file(dir.path(), "tls.crt", &cert);
    let key = write_file(dir.path(), "tls.key", &key);
    let no_colon = write_file(dir.path(), "proxy", "just-a-user\n");
    let base = "[token]\nfile = \"TOKEN_PATH\"\n";
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "{base}[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let cases = [
        (tls(&junk, &key), "server.tls.cert_file"),
        (tls(&cert, &junk), "server.tls.key_file"),
        (
            format!(
                "{base}[upstream]\nproxy = \"http://127.0.0.1:3128\"\nproxy_credentials_file = \"{}\"\n",
                no_colon.display()
            ),
            "upstream.proxy_credentials_file",
        ),
        (
            format!(
                "{base}[clients.kubernetes]\napi_server = \"https://127.0.0.1:6443\"\n\
                 token_file = \"TOKEN_PATH\"\nca_file = \"{}\"\n",
                junk.display()
            ),
            "clients.kubernetes.ca_file",
        ),
        (
            // A directory where the audit file should be.
            format!("{base}[audit]\npath = \"{}\"\n", dir.path().display()),
            "audit.path",
        ),
        (
            format!("{base}[server]\nheader_timeout = \"11years\"\n"),
            "server.header_timeout",
        ),
        (
            format!("{base}[upstream]\ntimeout = \"11years\"\n"),
            "upstream.timeout",
        ),
        (
            format!("{base}[cache]\nfresh_for = \"11years\"\n"),
            "cache.fresh_for",
        ),
        (
            format!("{base}[cache]\nstale_while_revalidate = \"11years\"\n"),
            "cache.stale_while_revalidate",
        ),
    ];
    for (config, key) in cases {
        let (ok, out) = check(&config, Some("t"));
        assert!(!ok, "accepted: {config}");
        assert!(out.contains(&format!("{key}:")), "expected {key} in: {out}");
    }
    let (ok, out) = check(&tls(&cert, &key), Some("t"));
    assert!(ok, "{out}");
    // A device is opened, as start-up opens it; it has no chain to read.
    let (ok, out) = check(&format!("{base}[audit]\npath = \"/dev/null\"\n"), Some("t"));
    assert!(ok, "{out}");
    let (ok, out) = check(
        &format!("{base}[cache]\nfresh_for = \"9years\"\n"),
        Some("t"),
    );
    assert!(ok, "{out}");
}

#[test]
fn check_refuses_a_partition_key_too_short_to_key_partitions() {
    let dir = tempfile::tempdir().unwrap();
    for (content, accepted) in [
        ("", false),
        ("\n", false),
        ("not-16-bytes\n", false),
        ("0123456789abcdef0123456789abcdef\n", true),
    ] {
        let key = write_file(dir.path(), "partition-key", content);
        let config = format!(
            "[token]\nfile = \"TOKEN_PATH\"\n[fleet]\nredis_url = \"redis://127.0.0.1:9\"\n\
             partition_key_file = \"{}\"\n",
            key.display()
        );
        let (ok, out) = check(&config, Some("t"));
        assert_eq!(ok, accepted, "{content:?}: {out}");
        if !accepted {
            assert!(
                out.contains("fleet.partition_key_file") && out.contains("at least 16"),
                "{content:?}: {out}"
            );
        }
    }
}
