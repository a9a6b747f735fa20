//! What an SRE relies on: rollouts that do not refuse connections, and logs that parse, carry
//! the request's ids, have no colour codes in files, and do not feed on themselves.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use support::*;

#[tokio::test]
async fn during_the_shutdown_delay_the_gateway_is_unready_but_still_serves() {
    let (_mock, _secret, mut gw) = setup("[server]\nshutdown_delay = \"1500ms\"").await;
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status.as_u16(), 200);
    let (admin, url, proxy) = (gw.admin, gw.url("/api/v1/usergroups"), gw.proxy);
    let stopped = gw.begin_shutdown();
    eventually(
        Duration::from_millis(500),
        "/readyz turns 503",
        || async move {
            get(&format!("http://{admin}/readyz"), &[])
                .await
                .status
                .as_u16()
                == 503
        },
    )
    .await;
    // A connection made now, while endpoint removal propagates, is served.
    let during = get(&url, &[]).await;
    assert_eq!(during.status.as_u16(), 200, "{}", during.text());
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the gateway stops after the delay and the drain")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "still accepting after the delay"
    );
}

/// Fails on a JSON value with a repeated object key anywhere inside it.
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Runs the binary with `toml` for as long as `exercise` takes, stderr to `log`; returns what
/// it logged.
async fn run_logging<F, Fut>(
    toml: &str,
    env: &[(&str, &str)],
    log: &std::path::Path,
    exercise: F,
) -> String
where
    F: FnOnce(std::net::SocketAddr, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let config = |proxy, admin| {
        write_file(
            dir.path(),
            "gateway.toml",
            &format!(
                "[server]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n[audit]\nenabled = false\n{toml}\n"
            ),
        )
    };
    let child = ChildGateway::start(log.to_path_buf(), env, |proxy, admin| {
        vec!["--config".into(), config(proxy, admin).into()]
    })
    .await;
    exercise(child.proxy, child.admin).await;
    drop(child);
    std::fs::read_to_string(log).unwrap()
}

#[tokio::test]
async fn json_logs_parse_with_unique_keys_and_carry_the_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", "token-a");
    // Nothing listens upstream: every request is a gateway-made 502, logged as a warning.
    let dead = free_addr();
    let log = dir.path().join("stderr.log");
    let mut ids = Vec::new();
    let text = run_logging(
        &format!(
            "[upstream]\nurl = \"http://{dead}\"\n[token]\nfile = \"{}\"\n[log]\nformat = \"json\"",
            token.display()
        ),
        &[],
        &log,
        |proxy, _| {
            let ids = &mut ids;
            async move {
                for i in 0..5 {
                    let reply = get(
                        &format!("http://{proxy}/api/v1/usergroups/{i}"),
                        &[("x-request-id", &format!("req-{i}"))],
                    )
                    .await;
                    assert_eq!(reply.status.as_u16(), 502);
                    ids.push(reply.header("x-request-id").unwrap().to_string());
                }
            }
        },
    )
    .await;
    let mut failures = 0;
    for line in text.lines() {
        let mut de = serde_json::Deserializer::from_str(line);
        NoDuplicates
            .deserialize(&mut de)
            .unwrap_or_else(|e| panic!("{e}: {line}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["message"] == "request failed" {
            failures += 1;
            let id = v["request_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no request_id: {line}"));
            assert!(ids.iter().any(|i| i == id), "{line}");
            let trace = v["trace_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no trace_id: {line}"));
            assert_eq!(trace.len(), 32, "{line}");
            assert_eq!(v["kind"], "upstream_unreachable");
        }
    }
    assert_eq!(failures, 5, "{text}");
}

#[tokio::test]
async fn text_logs_in_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", "token-a");
    let log = dir.path().join("stderr.log");
    let text = run_logging(
        &format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"",
            token.display()
        ),
        &[],
        &log,
        |proxy, _| async move {
            get(&format!("http://{proxy}/api/v1/x"), &[]).await;
        },
    )
    .await;
    assert!(text.contains("request failed"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI codes in a file: {text:?}");
}

#[tokio::test]
async fn the_file_watcher_does_not_log_its_own_writes_at_trace() {
    // stderr is a file in the directory the token watcher watches: every line written there is
    // a filesystem event, and a watcher that logged its events would feed on itself.
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", "token-a");
    let log = dir.path().join("stderr.log");
    let text = run_logging(
        &format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"",
            token.display()
        ),
        &[("RUST_LOG", "trace")],
        &log,
        |_, _| tokio::time::sleep(Duration::from_secs(2)),
    )
    .await;
    assert!(
        text.len() < 1024 * 1024,
        "{} bytes of logs in 2 s of idling",
        text.len()
    );
}

#[tokio::test]
async fn an_unreachable_collector_is_counted_and_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", "token-a");
    let dead = free_addr();
    let log = dir.path().join("stderr.log");
    let text = run_logging(
        &format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"\n\
             [telemetry]\notlp_endpoint = \"http://{dead}\"",
            token.display()
        ),
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
        &log,
        |proxy, admin| async move {
            for _ in 0..3 {
                get(&format!("http://{proxy}/api/v1/x"), &[]).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            eventually(
                Duration::from_secs(10),
                "export failures counted",
                || async move {
                    let metrics = get(&format!("http://{admin}/metrics"), &[]).await.text();
                    metrics
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("cloudcasa_gateway_telemetry_export_failures_total ")
                        })
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .is_some_and(|n| n >= 2.0)
                },
            )
            .await;
        },
    )
    .await;
    // The protocol the gateway does not speak is named, and the failures are logged once.
    assert!(
        text.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && text.contains("http/protobuf"),
        "{text}"
    );
    assert_eq!(
        text.matches("spans could not be exported").count(),
        1,
        "{text}"
    );
}

/// The binary run on a pseudo-terminal (util-linux `script`, as stdin, stdout and stderr) until
/// it has logged that it listens, then stopped with SIGTERM; returns what it wrote there.
async fn run_on_a_terminal(dir: &std::path::Path, color: &str) -> String {
    let token = write_file(dir, "token", "token-a");
    let config = write_file(
        dir,
        &format!("{color}.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [audit]\nenabled = false\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\
             [token]\nfile = \"{}\"\n[log]\ncolor = \"{color}\"\n",
            token.display()
        ),
    );
    let typescript = dir.join(format!("{color}.typescript"));
    let pid_file = dir.join(format!("{color}.pid"));
    // The shell writes its pid and execs the gateway in its place: that pid is the gateway's.
    let command = format!(
        "echo $$ > '{}'; exec '{}' --config '{}'",
        pid_file.display(),
        env!("CARGO_BIN_EXE_cloudcasa-gateway"),
        config.display()
    );
    let mut script = std::process::Command::new("script")
        .args(["--quiet", "--flush", "--command", &command])
        .arg(&typescript)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux, Debian's bsdutils) runs the gateway on a terminal");
    let written = || std::fs::read_to_string(&typescript).unwrap_or_default();
    eventually(Duration::from_secs(30), "the gateway to listen", || async {
        written().contains("cloudcasa-gateway listening")
    })
    .await;
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while script.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not stop within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    written()
}

/// `log.color`: "auto" colours on a terminal only (the file case is above), "never" not even
/// there, "always" even into a file.
#[tokio::test]
async fn log_color_never_and_always_override_the_terminal_check() {
    let dir = tempfile::tempdir().unwrap();
    // The control: on this terminal, "auto" does colour, so "never" below is what stops it.
    let auto = run_on_a_terminal(dir.path(), "auto").await;
    assert!(
        auto.contains("\u{1b}["),
        "no colour on a terminal: {auto:?}"
    );
    let never = run_on_a_terminal(dir.path(), "never").await;
    assert!(never.contains("cloudcasa-gateway listening"), "{never:?}");
    assert!(!never.contains('\u{1b}'), "colour with never: {never:?}");

    let token = write_file(dir.path(), "token", "token-a");
    let log = dir.path().join("always.log");
    let text = run_logging(
        &format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"\n[log]\ncolor = \"always\"",
            token.display()
        ),
        &[],
        &log,
        |proxy, _| async move {
            get(&format!("http://{proxy}/api/v1/x"), &[]).await;
        },
    )
    .await;
    assert!(text.contains("request failed"), "{text}");
    assert!(
        text.contains("\u{1b}["),
        "no colour with always, in a file: {text:?}"
    );
}
