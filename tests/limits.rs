//! Hostile and careless clients cannot exhaust the gateway: idle connections close, HTTP/2
//! connections must make a request, connections are capped, waiting for bytes costs no CPU,
//! request bodies have a deadline, cache fills are bounded in memory, and a broken upstream is
//! named as such. Bounded loops throughout; CPU time and RSS come from /proc/self.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const EMPTY_SETTINGS: &[u8] = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Reads until the server closes; how long that took, or `None` if it did not within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut sink)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

/// This process's CPU time (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn idle_connections_close_and_h2_says_goaway_first() {
    let (_mock, _secret, gw) = setup("[server]\nidle_timeout = \"500ms\"").await;
    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = TcpStream::connect(gw.proxy).await.unwrap();
    h1.write_all(b"GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    h1.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let took = closed_within(&mut h1, Duration::from_secs(5)).await;
    assert!(took.is_some(), "an idle HTTP/1.1 connection stayed open");

    // HTTP/2: one request, then no stream open: GOAWAY, then the connection ends.
    let stream = TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(
            http::Request::get(gw.url("/api/v1/usergroups"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    assert!(
        sender.is_closed(),
        "no GOAWAY: the client still thinks it can send"
    );
}

#[tokio::test]
async fn an_h2_connection_must_make_a_request_within_header_timeout() {
    let (mock, _secret, gw) = setup("[server]\nheader_timeout = \"500ms\"").await;
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(gw.proxy).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        c.write_all(EMPTY_SETTINGS).await.unwrap();
        conns.push(c);
    }
    for c in &mut conns {
        let took = closed_within(c, Duration::from_secs(5)).await;
        assert!(
            took.is_some(),
            "a preface-and-SETTINGS client kept its connection"
        );
    }
    assert_eq!(mock.state.count(), 0);
}

#[tokio::test]
async fn a_stalled_partial_preface_costs_no_cpu() {
    let (_mock, _secret, gw) = setup("[server]\nheader_timeout = \"3s\"").await;
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(gw.proxy).await.unwrap();
        c.write_all(&PREFACE[..16]).await.unwrap();
        conns.push(c);
    }
    // Let every connection reach its wait, then measure a second of stalling.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu, wall) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time() - cpu;
    let elapsed = wall.elapsed();
    // A spinning wait burns a core per connection group (the old one: 0.6–1.3 s per second).
    assert!(
        used < Duration::from_millis(200),
        "{used:?} of CPU in {elapsed:?} while 50 connections stalled"
    );
    // And they are still cut off at header_timeout.
    for c in &mut conns {
        assert!(closed_within(c, Duration::from_secs(6)).await.is_some());
    }
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_the_rest_are_served() {
    let (_mock, _secret, gw) = setup("[server]\nmax_connections = 4").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(gw.proxy).await.unwrap();
        c.write_all(b"GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let mut status = [0u8; 12];
        c.read_exact(&mut status).await.unwrap();
        held.push(c);
    }
    for _ in 0..3 {
        let mut refused = TcpStream::connect(gw.proxy).await.unwrap();
        let took = closed_within(&mut refused, Duration::from_secs(2)).await;
        assert!(took.is_some(), "a connection past the cap was kept open");
    }
    // An established connection is unaffected.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = Vec::new();
    first.read_to_end(&mut text).await.unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    let metrics = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("cloudcasa_gateway_connections_refused_total{listener=\"proxy\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_ends_in_408_and_is_never_forwarded_whole() {
    let (mock, _secret, gw) = setup("[server]\nbody_timeout = \"500ms\"").await;
    // A small declared body (read before sending): nothing reaches the upstream.
    let mut small = TcpStream::connect(gw.proxy).await.unwrap();
    small
        .write_all(
            b"POST /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\
              Content-Type: application/json\r\n\r\n{\"name\":",
        )
        .await
        .unwrap();
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), small.read_to_end(&mut text))
        .await
        .expect("answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"_status\":\"ERR\""), "{text}");
    assert_eq!(mock.state.count(), 0);

    // A trickle: one byte every 100 ms keeps a body alive; then silence ends it.
    let mut trickle = TcpStream::connect(gw.proxy).await.unwrap();
    trickle
        .write_all(b"POST /api/v1/_blob HTTP/1.1\r\nHost: gw\r\nContent-Length: 200000\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        trickle.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), trickle.read_to_end(&mut text))
        .await
        .expect("answered in time")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // The upstream saw the start of the large body, never all of it.
    for seen in mock.state.requests() {
        assert!(seen.body_len < 200_000, "{} bytes forwarded", seen.body_len);
    }
    let records = gw.wait_audit(2).await;
    assert!(
        records
            .iter()
            .all(|r| r["error"] == "body_timeout" && r["status"] == 408)
    );
    let metrics = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("cloudcasa_gateway_gateway_errors_total{kind=\"body_timeout\"} 2"),
        "{metrics}"
    );
}

/// The gateway binary as the manifests run it (with its own allocator), as a child process.
/// A gateway process and the directory holding its config (dropped after the process).
struct Child {
    gw: ChildGateway,
    _dir: tempfile::TempDir,
}

async fn child_gateway(mock: &MockCloudCasa, secret: &SecretDir, extra: &str) -> Child {
    let dir = tempfile::tempdir().unwrap();
    let gw = ChildGateway::start(dir.path().join("stderr.log"), &[], |proxy, admin| {
        let config = write_file(
            dir.path(),
            "gateway.toml",
            &format!(
                "[server]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n[upstream]\nurl = \"{}\"\n\
                 [token]\nfile = \"{}\"\n[audit]\nenabled = false\n{extra}\n",
                mock.url(),
                secret.token_path().display()
            ),
        );
        vec!["--config".into(), config.into()]
    })
    .await;
    let admin = gw.admin;
    eventually(
        Duration::from_secs(10),
        "the gateway is ready",
        || async move {
            let client = client();
            let req = http::Request::get(format!("http://{admin}/readyz"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            matches!(client.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        },
    )
    .await;
    Child { gw, _dir: dir }
}

fn child_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test]
async fn cache_fills_are_bounded_by_max_inflight() {
    const OBJECT: u64 = 7 * 1024 * 1024;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    // The case: 24 stalled clients, distinct 7 MiB objects, a 64 MiB cache.
    let gw = child_gateway(
        &mock,
        &secret,
        "[cache]\nmax_size = \"64MiB\"\nmax_object_size = \"8MiB\"\nmax_inflight = \"16MiB\"",
    )
    .await;
    let pid = gw.gw.process.id();
    let before = child_rss(pid);
    // 24 clients each ask for a distinct 7 MiB object that the upstream sends slowly (2 s),
    // and never read the answer.
    let mut stalled = Vec::new();
    for i in 0..24 {
        let mut c = TcpStream::connect(gw.gw.proxy).await.unwrap();
        let request = format!(
            "GET /api/v1/_blob?size={OBJECT}&trickle=18&n={i} HTTP/1.1\r\nHost: gw\r\n\
             Cache-Control: no-cache\r\n\r\n"
        );
        c.write_all(request.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While those fills run, the budget (16 MiB: two 7 MiB fills) is taken: a reader's fill
    // streams through unstored.
    let url = format!("http://{}/api/v1/_blob?size={OBJECT}&n=reader", gw.gw.proxy);
    let reply = get(&url, &[]).await;
    assert_eq!(reply.body.len() as u64, OBJECT);
    assert_eq!(
        reply.header("cache-status"),
        Some("cloudcasa-gateway; fwd=uri-miss; detail=inflight-limit")
    );
    let mut peak = 0;
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(child_rss(pid).saturating_sub(before));
    }
    eprintln!(
        "RSS peak growth with 24 stalled 7 MiB fills: {} MiB",
        peak >> 20
    );
    // Without the budget: 24 × 7 MiB = 168 MiB held. With it: 16 MiB of fills, what was
    // stored (at most cache.max_size; two objects here), and what the stalled streams hold in
    // flight (64 KiB buffers each way).
    assert!(
        peak < 48 * 1024 * 1024,
        "RSS grew by {} MiB with 24 stalled fills",
        peak >> 20
    );
    drop(stalled);
}

#[tokio::test]
async fn a_broken_upstream_is_named_upstream_protocol() {
    let (mock, _secret, gw) = setup("").await;
    mock.state.route("/api/v1/many-headers", |_| {
        let mut response = http::Response::builder().header("content-type", "application/json");
        for i in 0..300 {
            response = response.header(format!("x-h{i}"), "v");
        }
        response.body(Bytes::from_static(b"{}")).unwrap()
    });
    let reply = get(&gw.url("/api/v1/many-headers"), &[]).await;
    assert!(
        reply.envelope_message(502).contains("malformed"),
        "{}",
        reply.text()
    );

    // A server that answers with something that is not HTTP.
    let junk = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = junk.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = junk.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 abc\r\n\r\n").await;
        }
    });
    let secret = SecretDir::new("token-a");
    let broken = TestGateway::start(&format!(
        "[upstream]\nurl = \"http://{junk_addr}\"\n[token]\nfile = \"{}\"",
        secret.token_path().display()
    ))
    .await;
    let reply = send(Method::GET, &broken.url("/api/v1/x"), &[], Bytes::new()).await;
    reply.envelope_message(502);
    let records = broken.wait_audit(1).await;
    assert_eq!(records[0]["error"], "upstream_protocol");
    let records = gw.wait_audit(1).await;
    assert_eq!(records[0]["error"], "upstream_protocol");
}
