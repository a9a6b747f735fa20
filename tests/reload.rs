//! Reload on SIGHUP: policy, rates, credentials, cache settings and the log level change in a
//! running gateway; an invalid file changes nothing; what needs a restart is reported.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cloudcasa_gateway::Gateway;
use cloudcasa_gateway::config::{Config, Overrides};
use cloudcasa_gateway::layers::identity::api_keys::key_line;
use http::{Method, StatusCode};
use support::*;

const READER: &str = "reader-key-0123456789abcdef0123456789";
const WRITER: &str = "writer-key-0123456789abcdef0123456789";

fn config_text(mock: &MockCloudCasa, dir: &std::path::Path, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[audit]\nenabled = false\n\
         [[credentials]]\nname = \"team-a\"\nfile = \"{}\"\n\
         [clients.api_keys]\nfile = \"{}\"\n{extra}\n",
        mock.url(),
        dir.join("token-a").display(),
        dir.join("keys.toml").display(),
    )
}

const READ_ONLY: &str =
    "[[policy]]\nclients = [\"apikey:reader\"]\nmethods = [\"GET\"]\ncredential = \"team-a\"\n";

#[tokio::test]
async fn sighup_applies_policy_rates_credentials_and_cache_settings() {
    let mock = MockCloudCasa::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_file(dir, "token-a", "token-a");
    write_file(dir, "token-b", "token-b");
    write_file(
        dir,
        "keys.toml",
        &format!(
            "{}\n{}\n",
            key_line("reader", READER),
            key_line("writer", WRITER)
        ),
    );
    let path = write_file(dir, "gateway.toml", &config_text(&mock, dir, READ_ONLY));
    let config = Config::load(Some(&path), &Overrides::default()).unwrap();
    let gateway = Gateway::bind(config).await.unwrap();
    let (proxy, admin) = (gateway.proxy_addr(), gateway.admin_addr());
    let reloader = gateway.reloader();
    let _running = tokio::spawn(gateway.run(std::future::pending()));
    let url = |p: &str| format!("http://{proxy}{p}");
    let as_key = |key: &'static str| ("authorization", format!("Bearer {key}"));
    let send_as = |key: &'static str, method: Method, p: &str| {
        let (name, value) = as_key(key);
        let url = url(p);
        async move {
            send(
                method,
                &url,
                &[(name, value.as_str())],
                Bytes::from_static(br#"{"name":"x"}"#),
            )
            .await
        }
    };

    assert_eq!(
        send_as(READER, Method::POST, "/api/v1/usergroups")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send_as(WRITER, Method::GET, "/api/v1/usergroups")
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // The new file: the reader may POST at 2/m, the writer uses a new credential (tenant b),
    // GETs are fresh for a minute, and a listener setting changed too.
    let next = config_text(
        &mock,
        dir,
        "[server]\nheader_timeout = \"3s\"\n[cache]\nfresh_for = \"60s\"\n[log]\nlevel = \"debug\"\n\
         [[credentials]]\nname = \"team-b\"\nfile = \"TOKEN_B\"\n\
         [[policy]]\nclients = [\"apikey:reader\"]\nmethods = [\"GET\", \"POST\"]\nrate = \"2/m\"\ncredential = \"team-a\"\n\
         [[policy]]\nclients = [\"apikey:writer\"]\ncredential = \"team-b\"\n",
    )
    .replace("[server]\nlisten = \"127.0.0.1:0\"\n", "")
    .replacen("[server]\n", "[server]\nlisten = \"127.0.0.1:0\"\n", 1)
    .replace("TOKEN_B", &dir.join("token-b").display().to_string());
    std::fs::write(&path, &next).unwrap();
    let report = reloader.reload_from(&path, &Overrides::default()).unwrap();
    assert_eq!(
        report.applied,
        ["credentials", "policy", "cache", "log.level"],
        "{report:?}"
    );
    assert_eq!(report.needs_restart, ["server"], "{report:?}");

    for _ in 0..2 {
        let created = send_as(READER, Method::POST, "/api/v1/usergroups").await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    }
    let limited = send_as(READER, Method::POST, "/api/v1/usergroups").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let as_b = send_as(WRITER, Method::GET, "/api/v1/usergroups").await;
    assert_eq!(as_b.status, StatusCode::OK, "{}", as_b.text());
    assert_eq!(
        mock.state.last().header("authorization"),
        Some("Bearer token-b")
    );
    let hit = send_as(WRITER, Method::GET, "/api/v1/usergroups").await;
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        hit.headers
    );

    // An invalid file changes nothing, and says so.
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    assert!(reloader.reload_from(&path, &Overrides::default()).is_err());
    let still = send_as(WRITER, Method::GET, "/api/v1/usergroups").await;
    assert_eq!(still.status, StatusCode::OK);
    let metrics = get(&format!("http://{admin}/metrics"), &[]).await.text();
    assert!(
        metrics.contains("cloudcasa_gateway_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloudcasa_gateway_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    let hash = cloudcasa_gateway::app::config_hash(next.as_bytes());
    assert!(
        metrics.contains(&format!(
            "cloudcasa_gateway_config_info{{hash=\"{hash}\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_binary_reloads_on_sighup() {
    let mock = MockCloudCasa::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_file(dir, "token-a", "token-a");
    write_file(
        dir,
        "keys.toml",
        &format!("{}\n", key_line("reader", READER)),
    );
    let text = |proxy: SocketAddr, admin: SocketAddr, policy: &str| {
        config_text(&mock, dir, policy)
            .replace(
                "listen = \"127.0.0.1:0\"\n[admin]",
                &format!("listen = \"{proxy}\"\n[admin]"),
            )
            .replace(
                "[admin]\nlisten = \"127.0.0.1:0\"",
                &format!("[admin]\nlisten = \"{admin}\""),
            )
    };
    let path = dir.join("gateway.toml");
    let child = ChildGateway::start(dir.join("stderr.log"), &[], |proxy, admin| {
        std::fs::write(&path, text(proxy, admin, READ_ONLY)).unwrap();
        vec!["--config".into(), path.clone().into()]
    })
    .await;
    let proxy = child.proxy;
    let post = || async {
        send(
            Method::POST,
            &format!("http://{proxy}/api/v1/usergroups"),
            &[("authorization", &format!("Bearer {READER}"))],
            Bytes::from_static(br#"{"name":"y"}"#),
        )
        .await
        .status
    };
    assert_eq!(post().await, StatusCode::FORBIDDEN);
    std::fs::write(
        &path,
        text(
            child.proxy,
            child.admin,
            &READ_ONLY.replace("[\"GET\"]", "[\"GET\", \"POST\"]"),
        ),
    )
    .unwrap();
    child.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "the new policy in force",
        || async { post().await == StatusCode::CREATED },
    )
    .await;
}

/// A reload that changes `cache.stale_while_revalidate` alone applies it: responses stored after
/// it get the window (served at once, revalidated in the background), not only the next restart.
#[tokio::test]
async fn a_reload_changing_only_stale_while_revalidate_applies_it() {
    let mock = MockCloudCasa::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_file(dir, "token-a", "token-a");
    let text = |cache: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[audit]\nenabled = false\n[token]\nfile = \"{}\"\n{cache}",
            mock.url(),
            dir.join("token-a").display(),
        )
    };
    // fresh_for is 0 and the mock sends no Cache-Control: every stored item is stale at once,
    // so a second GET is either revalidated while the client waits, or (inside the window)
    // served stale at once.
    let path = write_file(dir, "gateway.toml", &text(""));
    let config = Config::load(Some(&path), &Overrides::default()).unwrap();
    let gateway = Gateway::bind(config).await.unwrap();
    let proxy = gateway.proxy_addr();
    let reloader = gateway.reloader();
    let _running = tokio::spawn(gateway.run(std::future::pending()));
    let second_get = |id: String| async move {
        let url = format!("http://{proxy}/api/v1/usergroups/{id}");
        let first = get(&url, &[]).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());
        let second = get(&url, &[]).await;
        assert_eq!(second.status, StatusCode::OK, "{}", second.text());
        second.header("cache-status").unwrap().to_string()
    };

    let (before, _) = item(&mock, "before");
    let status = second_get(before).await;
    assert!(status.contains("fwd=stale; fwd-status=304"), "{status}");

    std::fs::write(&path, text("[cache]\nstale_while_revalidate = \"1h\"\n")).unwrap();
    let report = reloader.reload_from(&path, &Overrides::default()).unwrap();
    assert_eq!(report.applied, ["cache"], "{report:?}");
    assert!(report.needs_restart.is_empty(), "{report:?}");

    let (after, _) = item(&mock, "after");
    let status = second_get(after).await;
    assert!(
        status.contains("fwd=stale; detail=stale-while-revalidate"),
        "the reloaded window is not in force: {status}"
    );
}

/// The binary's log level follows `log.level` on SIGHUP: a refused request's debug line appears
/// after a reload to `debug` and is gone after one back to `info`; the reload metrics say when
/// the last reload was applied.
#[tokio::test]
async fn sighup_changes_the_log_level_of_the_running_binary() {
    let mock = MockCloudCasa::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let token = write_file(dir, "token", "token-a");
    let path = dir.join("gateway.toml");
    let text = |proxy: SocketAddr, admin: SocketAddr, level: &str| {
        // Only /api/v1/** is allowed: /version is refused with 403, logged at debug.
        format!(
            "[server]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n[audit]\nenabled = false\n\
             [upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"\n[log]\nlevel = \"{level}\"\n\
             [[policy]]\nclients = [\"local\"]\npaths = [\"/api/v1/**\"]\ncredential = \"default\"\n",
            mock.url(),
            token.display()
        )
    };
    let child = ChildGateway::start(dir.join("stderr.log"), &[], |proxy, admin| {
        std::fs::write(&path, text(proxy, admin, "info")).unwrap();
        vec!["--config".into(), path.clone().into()]
    })
    .await;
    let refuse = |id: &'static str| {
        let url = format!("http://{}/version", child.proxy);
        async move {
            let reply = get(&url, &[("x-request-id", id)]).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        }
    };
    // The debug line is written before the response is sent: once the reply is here, the line
    // is in the file or never will be.
    let logged = |id: &str| {
        child
            .logs()
            .lines()
            .any(|l| l.contains("request refused") && l.contains(id))
    };
    let reload_to = |level: &str, reloads: usize| {
        std::fs::write(&path, text(child.proxy, child.admin, level)).unwrap();
        child.signal("HUP");
        let logs = || child.logs();
        async move {
            eventually(Duration::from_secs(10), "the reload applied", || async {
                logs().matches("configuration reloaded").count() == reloads
            })
            .await;
        }
    };
    let epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };

    refuse("at-info").await;
    assert!(!logged("at-info"), "{}", child.logs());

    let before = epoch().floor();
    reload_to("debug", 1).await;
    refuse("at-debug").await;
    assert!(
        logged("at-debug"),
        "no debug line at debug: {}",
        child.logs()
    );

    reload_to("info", 2).await;
    let after = epoch().ceil();
    refuse("back-at-info").await;
    assert!(!logged("back-at-info"), "{}", child.logs());

    let metrics = get(&format!("http://{}/metrics", child.admin), &[])
        .await
        .text();
    assert!(
        metrics.contains("cloudcasa_gateway_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
    let last: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("cloudcasa_gateway_config_last_reload_success_timestamp_seconds ")
        })
        .unwrap_or_else(|| panic!("no last reload timestamp: {metrics}"))
        .trim()
        .parse()
        .unwrap();
    // Seconds since the epoch, taken between the first SIGHUP and the second reload's log line.
    assert!(
        before <= last && last <= after,
        "{before} <= {last} <= {after}"
    );
}
