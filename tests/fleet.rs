//! Fleet mode against a real `redis-server`: two gateways (replicas) in front of one mock
//! CloudCasa share a cache tier, an invalidation stream and rate budgets, and keep serving,
//! degraded, when Redis dies.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::redis_server::RedisServer;
use support::*;

/// Two replicas, `gw-a` and `gw-b`, sharing `redis`, each with `extra` TOML.
async fn replicas(
    redis: &RedisServer,
    extra: &str,
) -> (MockCloudCasa, SecretDir, TestGateway, TestGateway) {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let replica = |name: &str| {
        format!(
            "[fleet]\nredis_url = \"{}\"\nreplica = \"{name}\"\ntimeout = \"200ms\"\n{extra}",
            redis.url()
        )
    };
    let a = TestGateway::for_mock(&mock, &secret, &replica("gw-a")).await;
    let b = TestGateway::for_mock(&mock, &secret, &replica("gw-b")).await;
    for gw in [&a, &b] {
        wait_link(gw.admin, 1).await;
    }
    (mock, secret, a, b)
}

async fn metric(gw: &TestGateway, series: &str) -> Option<f64> {
    let text = get(&gw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until the fleet link of the gateway whose admin listener is `admin` is up (1) or down
/// (0).
async fn wait_link(admin: std::net::SocketAddr, up: u64) {
    eventually(
        Duration::from_secs(10),
        &format!("fleet_link_up {up}"),
        || async { metric_at(admin, "cloudcasa_gateway_fleet_link_up").await == Some(up) },
    )
    .await;
}

fn gets(mock: &MockCloudCasa, path: &str) -> usize {
    mock.state
        .requests_to(path)
        .iter()
        .filter(|r| r.method == Method::GET)
        .count()
}

#[tokio::test]
async fn replicas_share_fills_and_see_each_others_writes() {
    let redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(&redis, "[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");

    // One upstream fetch for two replicas: B finds A's fill in Redis.
    let first = get(&a.url(&path), &[]).await;
    assert_eq!(first.json()["name"], "before");
    let shared = get(&b.url(&path), &[]).await;
    assert_eq!(shared.json()["name"], "before");
    shared.assert_fresh_hit(60, "; detail=shared");
    assert_eq!(
        gets(&mock, &path),
        1,
        "the upstream saw one GET for two replicas"
    );
    // And from B's memory after that.
    let local = get(&b.url(&path), &[]).await;
    local.assert_fresh_hit(60, "");
    let listing = get(&b.url("/api/v1/usergroups"), &[]).await;
    assert_eq!(listing.json()["_items"][0]["name"], "before");

    // A write through A reaches B's memory (fresh for another minute) within a pub/sub hop.
    let patched = rename(&a.url(&path), &etag, "after").await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    eventually(Duration::from_secs(2), "B sees the write", || async {
        get(&b.url(&path), &[]).await.json()["name"] == "after"
    })
    .await;
    let listing = get(&b.url("/api/v1/usergroups"), &[]).await;
    assert_eq!(listing.json()["_items"][0]["name"], "after");
    assert_eq!(
        metric(
            &b,
            "cloudcasa_gateway_fleet_invalidations_total{direction=\"received\"}"
        )
        .await,
        Some(1.0)
    );
    let delays = metric(
        &b,
        "cloudcasa_gateway_fleet_invalidation_delay_seconds_count{direction=\"received\"}",
    )
    .await;
    assert_eq!(delays, Some(1.0));

    // Nothing in Redis names the token; every key is the gateway's.
    let dump = redis.dump().await;
    assert!(!dump.contains("token-a"), "{dump}");
    // (Keys, not the dump's lines: a stored body may hold a newline.)
    let keys = redis.keys().await;
    assert!(keys.iter().all(|k| k.starts_with("ccg:")), "{keys:?}");
}

#[tokio::test]
async fn a_fill_racing_a_write_on_another_replica_is_not_shared() {
    let redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(&redis, "[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");

    // B's fetch reads the item, then its answer is held while A writes.
    let release = mock.state.hold_next_answer(Method::GET);
    let url = b.url(&path);
    let fill = tokio::spawn(async move { get(&url, &[]).await });
    eventually(
        Duration::from_secs(5),
        "B's fetch reached the upstream",
        || std::future::ready(gets(&mock, &path) == 1),
    )
    .await;
    let patched = rename(&a.url(&path), &etag, "after").await;
    assert_eq!(patched.status, StatusCode::OK);
    release.notify_one();
    // B's client asked before the write finished: it may get the old state...
    assert_eq!(fill.await.unwrap().json()["name"], "before");
    // ...but nobody else will: Redis refused the fill, and neither replica serves it.
    assert_eq!(
        metric(
            &b,
            "cloudcasa_gateway_fleet_shared_stores_total{result=\"invalidated\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(get(&a.url(&path), &[]).await.json()["name"], "after");
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "after");
}

#[tokio::test]
async fn a_replica_shutting_down_runs_its_late_invalidations_before_it_exits() {
    let redis = RedisServer::start().await;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let fleet = |name: &str| {
        format!(
            "[fleet]\nredis_url = \"{}\"\nreplica = \"{name}\"\ntimeout = \"200ms\"\n\
             [cache]\nfresh_for = \"60s\"\n",
            redis.url()
        )
    };
    // A gives up on the upstream only after a minute: its late invalidation is a minute away.
    let mut a = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"60s\"\n[token]\nfile = \"{}\"\n{}",
        mock.url(),
        secret.token_path().display(),
        fleet("gw-a")
    ))
    .await;
    let b = TestGateway::for_mock(&mock, &secret, &fleet("gw-b")).await;
    for gw in [&a, &b] {
        wait_link(gw.admin, 1).await;
    }
    let (id, etag) = item(&mock, "old");
    let path = format!("/api/v1/usergroups/{id}");
    let received = "cloudcasa_gateway_fleet_invalidations_total{direction=\"received\"}";

    // A PATCH through A reaches the upstream, which holds it unexecuted; its client goes away.
    let release = mock.state.hold_next(Some(StatusCode::SERVICE_UNAVAILABLE));
    abandon_rename(a.proxy, &mock, &path, &etag).await;
    // A invalidates at once (B hears it) and schedules the second invalidation.
    // (B hears the first invalidation.)
    expect_metric(b.admin, received, 1).await;
    // B stores the document as it still is; then the write commits upstream (straight at it,
    // as a slow upstream would).
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "old");
    release.notify_one();
    let late = rename_at_upstream(&mock, &path, &etag, "token-a", "new").await;
    assert_eq!(late.status, StatusCode::OK);
    let stale = get(&b.url(&path), &[]).await;
    assert!(
        stale
            .header("cache-status")
            .is_some_and(|s| s.contains("hit")),
        "B holds the old document: {:?}",
        stale.headers
    );
    assert_eq!(stale.json()["name"], "old");

    // A shuts down: its late invalidation, due in a minute, runs before it exits.
    tokio::time::timeout(Duration::from_secs(10), a.begin_shutdown())
        .await
        .expect("A stops within its limits")
        .unwrap();
    // (B hears the late invalidation.)
    expect_metric(b.admin, received, 2).await;
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "new");
}

#[tokio::test]
async fn rate_budgets_are_fleet_wide() {
    let redis = RedisServer::start().await;
    let (_mock, _secret, a, b) = replicas(
        &redis,
        r#"
[[policy]]
name = "twenty-a-minute"
clients = ["local"]
methods = ["GET"]
paths = ["/api/v1/**"]
credential = "default"
rate = "20/m"
"#,
    )
    .await;
    let mut admitted = 0;
    for i in 0..60 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let reply = get(&gw.url("/api/v1/usergroups"), &[]).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => assert!(reply.header("retry-after").is_some()),
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    // The burst of one budget (one more may have been earned in the seconds the loop took).
    assert!((20..=21).contains(&admitted), "admitted {admitted} of 60");
    let fleet = |gw| {
        metric(
            gw,
            "cloudcasa_gateway_fleet_rate_decisions_total{mode=\"fleet\"}",
        )
    };
    assert_eq!(fleet(&a).await, Some(30.0));
    assert_eq!(fleet(&b).await, Some(30.0));
}

#[tokio::test]
async fn redis_dying_degrades_and_its_return_recovers() {
    let mut redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(
        &redis,
        r#"
[cache]
fresh_for = "60s"

[[policy]]
name = "limited"
clients = ["local"]
methods = ["GET", "PATCH"]
paths = ["/api/v1/**"]
credential = "default"
rate = "1000/m"
"#,
    )
    .await;
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "before");
    get(&b.url(&path), &[]).await.assert_fresh_hit(60, "");

    redis.kill();
    for gw in [&a, &b] {
        wait_link(gw.admin, 0).await;
    }
    // Writes and reads still succeed; the write cannot reach B, so B revalidates what it holds.
    let patched = rename(&a.url(&path), &etag, "after").await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let degraded = get(&b.url(&path), &[]).await;
    assert_eq!(degraded.status, StatusCode::OK);
    assert_eq!(
        degraded.json()["name"],
        "after",
        "no stale read while Redis is down"
    );
    assert!(
        degraded
            .header("cache-status")
            .is_some_and(|s| s.contains("detail=fleet-down")),
        "{:?}",
        degraded.headers
    );
    // Rate limits fall back to this replica's share (the budget is far from spent).
    assert!(
        metric(
            &b,
            "cloudcasa_gateway_fleet_rate_decisions_total{mode=\"local\"}"
        )
        .await
        .is_some_and(|n| n >= 1.0)
    );
    let ready = get(&b.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "readiness stays up");

    redis.restart().await;
    for gw in [&a, &b] {
        wait_link(gw.admin, 1).await;
    }
    let back = get(&b.url(&path), &[]).await;
    assert_eq!(back.json()["name"], "after");
    let again = get(&b.url(&path), &[]).await;
    assert_eq!(again.json()["name"], "after");
    assert!(
        again
            .header("cache-status")
            .is_some_and(|s| s.contains("hit")),
        "cached again once the link is up: {:?}",
        again.headers
    );
    for gw in [&a, &b] {
        assert!(
            metric(gw, "cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"}")
                .await
                .is_some_and(|n| n >= 1.0)
        );
    }
}

#[tokio::test]
async fn interleaved_audit_trails_verify_chain_by_chain() {
    let redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(&redis, "").await;
    item(&mock, "x");
    for i in 0..3 {
        for gw in [&a, &b] {
            let reply = get(&gw.url(&format!("/api/v1/usergroups?i={i}")), &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    }
    a.wait_audit(3).await;
    b.wait_audit(3).await;
    let lines = |gw: &TestGateway| {
        std::fs::read_to_string(gw.audit.as_ref().unwrap())
            .unwrap()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (la, lb) = (lines(&a), lines(&b));
    for (records, replica) in [(&a, "gw-a"), (&b, "gw-b")] {
        for r in records.audit_records() {
            assert_eq!(r["replica"], replica);
            assert!(r["chain"].as_str().is_some_and(|c| c.len() == 16), "{r}");
        }
    }
    // As a log collector merges them.
    let mut merged = String::new();
    for i in 0..la.len().max(lb.len()) {
        for l in [la.get(i), lb.get(i)].into_iter().flatten() {
            merged.push_str(l);
            merged.push('\n');
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "merged.jsonl", &merged);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudcasa-gateway"))
        .args(["audit", "verify"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("OK: 6 records in 2 chains, each intact"),
        "{text}"
    );
    assert!(text.contains("(replica gw-a): 3 records"), "{text}");
    assert!(text.contains("(replica gw-b): 3 records"), "{text}");
}

#[tokio::test]
async fn rediss_with_the_replicas_own_ca() {
    let redis = RedisServer::start_tls().await;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let replica = |name: &str| {
        format!(
            "[cache]\nfresh_for = \"60s\"\n[fleet]\nredis_url = \"{}\"\nca_file = \"{}\"\n\
             replica = \"{name}\"\ntimeout = \"200ms\"\n",
            redis.tls_url(),
            redis.ca_file.as_ref().unwrap().display()
        )
    };
    let a = TestGateway::for_mock(&mock, &secret, &replica("gw-a")).await;
    let b = TestGateway::for_mock(&mock, &secret, &replica("gw-b")).await;
    for gw in [&a, &b] {
        wait_link(gw.admin, 1).await;
    }
    let (id, _) = item(&mock, "over-tls");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&a.url(&path), &[]).await.json()["name"], "over-tls");
    let shared = get(&b.url(&path), &[]).await;
    assert!(
        shared
            .header("cache-status")
            .is_some_and(|s| s.contains("detail=shared")),
        "{:?}",
        shared.headers
    );
    assert_eq!(gets(&mock, &path), 1);
}

#[tokio::test]
async fn a_rotated_password_file_is_used_for_the_next_connection() {
    let redis = RedisServer::start_with_password("first-password").await;
    let dir = tempfile::tempdir().unwrap();
    let password = write_file(dir.path(), "password", "first-password\n");
    let (mock, secret) = (MockCloudCasa::start().await, SecretDir::new("token-a"));
    let gw = TestGateway::for_mock(
        &mock,
        &secret,
        &format!(
            "[fleet]\nredis_url = \"{}\"\npassword_file = \"{}\"\nreplica = \"gw-a\"\n",
            redis.url_without_password(),
            password.display()
        ),
    )
    .await;
    wait_link(gw.admin, 1).await;

    // Rotate: Redis takes the new password, the Secret's file changes, old connections go.
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("second-password")
        .query_async(&mut admin)
        .await
        .unwrap();
    std::fs::write(&password, "second-password\n").unwrap();
    for kind in ["normal", "pubsub"] {
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut admin)
            .await
            .unwrap_or(redis::Value::Nil);
    }
    // Only the new password can bring the link back.
    eventually(
        Duration::from_secs(10),
        "the link is up with the new password",
        || async {
            metric(&gw, "cloudcasa_gateway_fleet_link_up").await == Some(1.0)
                && metric(
                    &gw,
                    "cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"}",
                )
                .await
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    let reply = get(&gw.url("/api/v1/usergroups"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let dump = redis.dump_with_password("second-password").await;
    assert!(!dump.contains("password"), "{dump}");
}

#[tokio::test]
async fn the_binary_logs_each_link_transition_once_and_never_the_password() {
    let mut redis = RedisServer::start_with_password("log-secret-password").await;
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", "token-a");
    let config = |proxy, admin| {
        write_file(
            dir.path(),
            "gateway.toml",
            &format!(
                "[server]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n[audit]\n\
                 enabled = false\n[upstream]\nurl = \"http://127.0.0.1:9\"\n[token]\n\
                 file = \"{}\"\n[fleet]\nredis_url = \"{}\"\nreplica = \"gw-log\"\n",
                token.display(),
                redis.url()
            ),
        )
    };
    let log = dir.path().join("gateway.log");
    let child = ChildGateway::start(log.clone(), &[("RUST_LOG", "info")], |proxy, admin| {
        vec!["--config".into(), config(proxy, admin).into()]
    })
    .await;
    let up = |child: &ChildGateway| {
        let url = format!("http://{}/metrics", child.admin);
        async move {
            let text = get(&url, &[]).await.text();
            text.lines()
                .find_map(|l| l.strip_prefix("cloudcasa_gateway_fleet_link_up "))
                .map(str::to_string)
        }
    };
    let wait_for = |value: &'static str| {
        let child = &child;
        async move {
            eventually(
                Duration::from_secs(10),
                &format!("link_up {value}"),
                || async { up(child).await.as_deref() == Some(value) },
            )
            .await
        }
    };
    wait_for("1").await;
    redis.kill();
    wait_for("0").await;
    // Probed every 500 ms while down: still one line.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart().await;
    wait_for("1").await;
    let logs = child.logs();
    assert_eq!(logs.matches("fleet link down").count(), 1, "{logs}");
    assert_eq!(logs.matches("fleet link up").count(), 2, "{logs}");
    assert!(!logs.contains("log-secret-password"), "{logs}");
    assert!(logs.contains("redis://:***@127.0.0.1"), "{logs}");
}

#[tokio::test]
async fn misses_create_nothing_in_redis_and_deep_paths_stay_local() {
    let redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(&redis, "[cache]\nfresh_for = \"60s\"").await;
    let before = redis.dump().await;
    // A miss the upstream answers 404: no version, no entry.
    assert_eq!(
        get(&a.url("/api/v1/usergroups/nope"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(redis.dump().await, before, "a miss wrote to Redis");
    // A path deeper than the shared tier takes is kept in each replica's memory only.
    let deep = format!("/api/v1/deep{}", "/x".repeat(20));
    mock.state.route(&deep, |_| {
        http::Response::builder()
            .header("cache-control", "max-age=3600")
            .body(bytes::Bytes::from_static(b"{}"))
            .unwrap()
    });
    get(&a.url(&deep), &[]).await;
    get(&b.url(&deep), &[]).await;
    assert_eq!(
        gets(&mock, &deep),
        2,
        "each replica fetched the deep path itself"
    );
    assert_eq!(
        redis.dump().await,
        before,
        "nothing of the deep path went to Redis"
    );
}

#[tokio::test]
async fn a_subscription_gone_silent_is_replaced_and_the_replica_hears_writes_again() {
    // B reaches Redis through a proxy that can make B's subscription go silent without closing
    // it (a node gone without FIN or RST): B must notice, take its link down, subscribe anew,
    // forget what it held, and hear the next write.
    use support::redis_server::SilencingProxy;
    let redis = RedisServer::start().await;
    let proxy = SilencingProxy::start(redis.addr).await;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let replica = |name: &str, addr: std::net::SocketAddr| {
        format!(
            "[cache]\nfresh_for = \"60s\"\n[fleet]\nredis_url = \"redis://{addr}/0\"\n\
             replica = \"{name}\"\ntimeout = \"200ms\"\n"
        )
    };
    let a = TestGateway::for_mock(&mock, &secret, &replica("gw-a", redis.addr)).await;
    let b = TestGateway::for_mock(&mock, &secret, &replica("gw-b", proxy.addr)).await;
    for gw in [&a, &b] {
        wait_link(gw.admin, 1).await;
    }
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "before");

    proxy.silence_open_subscriptions();
    // Within the silence limit (3 s) and a probe, B counts its subscription dead.
    eventually(
        Duration::from_secs(10),
        "B's silent subscription noticed",
        || async {
            metric(&b, "cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"}")
                .await
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    wait_link(b.admin, 1).await;
    // A write through A now reaches B through its new subscription.
    let patched = rename(&a.url(&path), &etag, "after").await;
    assert_eq!(patched.status, StatusCode::OK);
    eventually(Duration::from_secs(2), "B sees the write", || async {
        get(&b.url(&path), &[]).await.json()["name"] == "after"
    })
    .await;
}

#[tokio::test]
async fn a_redis_that_comes_back_from_an_older_snapshot_serves_nothing_of_it() {
    // Redis saves a snapshot holding an item's entry, a write through A moves the item on, and
    // Redis restarts from the snapshot (as after a crash, or a failover to a lagging replica):
    // the old entry and old versions are back, but no replica may take them for current.
    let mut redis = RedisServer::start().await;
    let (mock, _secret, a, b) = replicas(&redis, "[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&a.url(&path), &[]).await.json()["name"], "before");
    let mut admin = redis.connection().await;
    let _: () = redis::cmd("SAVE").query_async(&mut admin).await.unwrap();
    let patched = rename(&a.url(&path), &etag, "after").await;
    assert_eq!(patched.status, StatusCode::OK);
    redis.restart().await;
    let dump = redis.dump().await;
    assert!(
        dump.contains(":e:"),
        "the snapshot brought the old entry back: {dump}"
    );
    // Both lost their subscription to the restart, and are back.
    for gw in [&a, &b] {
        eventually(Duration::from_secs(10), "the restart noticed", || async {
            metric(gw, "cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"}")
                .await
                .is_some_and(|n| n >= 1.0)
        })
        .await;
        wait_link(gw.admin, 1).await;
    }
    assert_eq!(get(&b.url(&path), &[]).await.json()["name"], "after");
    assert_eq!(get(&a.url(&path), &[]).await.json()["name"], "after");
}

/// A fleet member as the library makes one, without a gateway around it, and its metrics.
fn library_fleet(
    redis: &RedisServer,
    replica: &str,
) -> (
    std::sync::Arc<cloudcasa_gateway::observability::metrics::Metrics>,
    std::sync::Arc<cloudcasa_gateway::fleet::Fleet>,
) {
    let metrics = std::sync::Arc::new(cloudcasa_gateway::observability::metrics::Metrics::new(
        Default::default(),
        None,
        None,
        Default::default(),
    ));
    let fleet = cloudcasa_gateway::fleet::Fleet::new(
        cloudcasa_gateway::config::FleetConfig {
            redis_url: redis.url(),
            password_file: None,
            ca_file: None,
            partition_key_file: None,
            replica: replica.into(),
            shared_cache: true,
            max_shared_object_size: 1024 * 1024,
            timeout: Duration::from_millis(200),
        },
        metrics.fleet.clone(),
    )
    .unwrap();
    (metrics, fleet)
}

/// A fleet listener that counts what it is asked to do.
#[derive(Default)]
struct TestListener {
    /// Taken over each invalidation (a replica whose memory cache is slow to apply them).
    delay: Duration,
    /// The first resync kills the subscription it runs under (as a Redis restart or a network
    /// cut at that moment would), and returns once the replica has counted its end.
    kill_first: Option<(
        redis::aio::MultiplexedConnection,
        std::sync::Arc<cloudcasa_gateway::observability::metrics::Metrics>,
    )>,
    applied: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    resyncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Subscriptions the first resync killed.
    killed: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl cloudcasa_gateway::fleet::Listener for TestListener {
    fn invalidate(
        &self,
        _partition: cloudcasa_gateway::secrets::token::Fingerprint,
        _exact: Vec<String>,
        _roots: Vec<String>,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        let (delay, applied) = (self.delay, self.applied.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            applied.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    }

    fn resync(&self) -> futures_util::future::BoxFuture<'static, ()> {
        let first = self
            .resyncs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 0;
        let (kill, killed) = (self.kill_first.clone(), self.killed.clone());
        Box::pin(async move {
            let Some((mut redis, metrics)) = kill.filter(|_| first) else {
                return;
            };
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut redis)
                .await
                .unwrap_or(-1);
            killed.store(n, std::sync::atomic::Ordering::SeqCst);
            // Until the subscription's task has seen its end (it counts it), bounded.
            for _ in 0..100 {
                if metrics
                    .encode()
                    .contains("cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"} 1")
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}

#[tokio::test]
async fn a_subscription_lost_while_the_link_comes_back_is_not_taken_for_live() {
    let redis = RedisServer::start().await;
    let (metrics, fleet) = library_fleet(&redis, "gw-a");
    let listener = TestListener {
        kill_first: Some((redis.connection().await, metrics.clone())),
        ..TestListener::default()
    };
    let (resyncs, killed) = (listener.resyncs.clone(), listener.killed.clone());
    // The first link-up resyncs (nothing was heard before it); that resync loses the
    // subscription. Taken for live, the replica would hear nothing from then on and never
    // resync again; down, its next subscription brings the link up with a second resync.
    fleet.start(std::sync::Arc::new(listener));
    eventually(Duration::from_secs(10), "a second resync", || {
        std::future::ready(resyncs.load(std::sync::atomic::Ordering::SeqCst) >= 2)
    })
    .await;
    assert_eq!(
        killed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the replica's one subscription was killed"
    );
    eventually(Duration::from_secs(5), "the link up again", || {
        std::future::ready(fleet.is_up())
    })
    .await;
}

/// The binary as fleet replica `name` in front of `mock` with the token `token-a`, sharing
/// `redis`, without an audit trail, logging at info into `dir`; `server` is more of `[server]`,
/// `extra` more sections.
async fn child_replica(
    dir: &std::path::Path,
    mock: &MockCloudCasa,
    redis: &RedisServer,
    name: &str,
    server: &str,
    extra: &str,
) -> ChildGateway {
    let token = write_file(dir, "token", "token-a");
    ChildGateway::start(
        dir.join("gateway.log"),
        &[("RUST_LOG", "info")],
        |proxy, admin| {
            let config = format!(
                "[server]\nlisten = \"{proxy}\"\n{server}\n[admin]\nlisten = \"{admin}\"\n\
             [audit]\nenabled = false\n[upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"\n\
             [fleet]\nredis_url = \"{}\"\nreplica = \"{name}\"\n{extra}\n",
                mock.url(),
                token.display(),
                redis.url()
            );
            vec![
                "--config".into(),
                write_file(dir, "gateway.toml", &config).into(),
            ]
        },
    )
    .await
}

#[tokio::test]
async fn exiting_with_writes_never_announced_says_so() {
    let mut redis = RedisServer::start().await;
    let mock = MockCloudCasa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = child_replica(
        dir.path(),
        &mock,
        &redis,
        "gw-exit",
        "drain_timeout = \"1s\"",
        "",
    )
    .await;
    wait_link(child.admin, 1).await;
    redis.kill();
    wait_link(child.admin, 0).await;
    // A write while Redis is away: remembered, to be announced when it is back. It never is.
    let (id, etag) = item(&mock, "old");
    let url = format!("http://{}/api/v1/usergroups/{id}", child.proxy);
    assert_eq!(rename(&url, &etag, "new").await.status, StatusCode::OK);
    child.signal("TERM");
    let (status, logs) = child.wait().await;
    assert!(status.success(), "{logs}");
    assert!(
        logs.contains("exiting with writes made while Redis was unreachable not announced")
            && logs.contains("partitions=1"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_replica_that_falls_behind_its_invalidations_drops_them_and_empties_its_memory() {
    let redis = RedisServer::start().await;
    let (metrics, fleet) = library_fleet(&redis, "gw-slow");
    let listener = TestListener {
        delay: Duration::from_millis(100),
        ..TestListener::default()
    };
    let (applied, resyncs) = (listener.applied.clone(), listener.resyncs.clone());
    fleet.start(std::sync::Arc::new(listener));
    eventually(Duration::from_secs(10), "the link up", || {
        std::future::ready(fleet.is_up())
    })
    .await;
    let first = resyncs.load(std::sync::atomic::Ordering::SeqCst);
    // Another replica's writes, 100 of them at once: ten seconds of work for this one, during
    // which its memory would serve what they changed while the link says up.
    let partition = cloudcasa_gateway::secrets::token::FingerprintKey::random()
        .fingerprint(b"t")
        .to_hex();
    let mut c = redis.connection().await;
    for i in 0..100 {
        let message = serde_json::json!({
            "from": "gw-other-0000", "p": partition, "x": [format!("/api/v1/x/{i}")],
            "s": [], "at": 0, "hb": false,
        });
        let _: i64 = redis::cmd("PUBLISH")
            .arg("ccg:invalidations")
            .arg(message.to_string())
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Its own heartbeat, queued behind them, comes back late: the link goes down (memory is
    // revalidated meanwhile), the subscription and its backlog are replaced, and the link
    // comes back with the memory emptied.
    eventually(
        Duration::from_secs(8),
        "a resync after falling behind",
        || std::future::ready(resyncs.load(std::sync::atomic::Ordering::SeqCst) > first),
    )
    .await;

    let text = metrics.encode();
    let errors = series_value(
        &text,
        "cloudcasa_gateway_fleet_errors_total{op=\"subscribe\"}",
    );
    assert!(errors.is_some_and(|n| n >= 1), "{text}");
    eventually(Duration::from_secs(5), "the link up again", || {
        std::future::ready(fleet.is_up())
    })
    .await;
    // The backlog went with the old subscription: nothing more of it is applied.
    let then = applied.load(std::sync::atomic::Ordering::SeqCst);
    assert!(then < 100, "{then} applied");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        applied.load(std::sync::atomic::Ordering::SeqCst),
        then,
        "the backlog was dropped, not worked through"
    );
}

#[tokio::test]
async fn error_replies_from_redis_are_counted_each_and_logged_once_a_minute() {
    let redis = RedisServer::start().await;
    let mock = MockCloudCasa::start().await;
    let dir = tempfile::tempdir().unwrap();
    let child = child_replica(
        dir.path(),
        &mock,
        &redis,
        "gw-err",
        "",
        // A patient link: only Redis's error replies may count here, not a slow machine.
        "timeout = \"2s\"\n[cache]\nfresh_for = \"60s\"",
    )
    .await;
    wait_link(child.admin, 1).await;
    let read = |id: String| {
        let url = format!("http://{}/api/v1/usergroups/{id}", child.proxy);
        async move { get(&url, &[]).await.status }
    };
    let (first, _) = item(&mock, "first");
    assert_eq!(read(first).await, StatusCode::OK);
    // The partition's generation, which every lookup reads, made a hash: Redis answers every
    // lookup of the partition with WRONGTYPE.
    let generation = redis
        .keys()
        .await
        .into_iter()
        .find(|k| k.ends_with(":g"))
        .expect("a stored response created the partition's generation");
    let mut c = redis.connection().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&generation)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("HSET")
        .arg(&generation)
        .arg("a")
        .arg("b")
        .query_async(&mut c)
        .await
        .unwrap();
    for name in ["second", "third", "fourth"] {
        let (id, _) = item(&mock, name);
        assert_eq!(read(id).await, StatusCode::OK, "served without Redis");
    }
    let text = get(&format!("http://{}/metrics", child.admin), &[])
        .await
        .text();
    let lookups = series_value(&text, "cloudcasa_gateway_fleet_errors_total{op=\"lookup\"}");
    assert_eq!(lookups, Some(3), "{text}");
    assert_eq!(
        series_value(&text, "cloudcasa_gateway_fleet_link_up"),
        Some(1),
        "{text}"
    );
    let logs = child.logs();
    let logged = logs
        .lines()
        .filter(|l| l.contains("a fleet call failed with an error from Redis"))
        .filter(|l| l.contains("lookup"))
        .count();
    assert_eq!(logged, 1, "{logs}");
    assert!(logs.contains("WRONGTYPE"), "{logs}");
}
