//! Hostile and careless clients cannot exhaust the gateway: idle connections close (HTTP/2 with
//! GOAWAY first), HTTP/2 peers are pinged, HTTP/2 connections must make a request, connections
//! are capped, waiting for bytes costs no CPU, request bodies have a deadline, clients that stop
//! reading their responses are cut off (slow ones are not), cache fills are
//! bounded in memory, and a broken upstream is named as such. Every close the gateway makes is
//! counted. Bounded loops throughout; CPU time and RSS are the gateway child process's, from
//! /proc/PID.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::h2wire::{self, GOAWAY, PING};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = h2wire::PREFACE;
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

/// A gateway in front of `mock` with the token from `secret`, and `[upstream]` and `[server]`
/// lines of the test's own.
async fn gateway_with(
    mock: &MockCloudCasa,
    secret: &SecretDir,
    upstream: &str,
    server: &str,
) -> TestGateway {
    TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\n{upstream}\n[token]\nfile = \"{}\"\n[server]\n{server}\n",
        mock.url(),
        secret.token_path().display()
    ))
    .await
}

/// A connection to `addr` with a small receive buffer, so that the gateway's writes to it soon
/// wait for its reads.
async fn small_window(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Asks on `conn` (HTTP/1.1) for a 64 MiB answer tagged `n`, far past what the sockets and the
/// gateway hold, reads its status line, and reads nothing more.
async fn stop_reading<S: AsyncReadExt + AsyncWriteExt + Unpin>(conn: &mut S, n: &str) {
    let request = format!(
        "GET /api/v1/_blob?size={}&n={n} HTTP/1.1\r\nHost: gw\r\n\r\n",
        64 * MIB
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    conn.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
}

/// Waits (at most 15 s) until `count` proxy connections were closed for `send_timeout`.
async fn wait_send_timeouts(admin: std::net::SocketAddr, count: u64) {
    eventually(
        Duration::from_secs(15),
        &format!("{count} connections closed for send_timeout"),
        || async move { metric_at(admin, &closed_series("send_timeout")).await == Some(count) },
    )
    .await;
}

/// A process's CPU time (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may contain spaces): utime
    // and stime are the 14th and 15th fields, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn idle_connections_close_and_h2_says_goaway_first() {
    const IDLE: Duration = Duration::from_millis(500);
    // Idleness is sampled every quarter of idle_timeout and a connection is idle only after a
    // whole idle_timeout without requests: closing earlier than this is a bug, not jitter.
    const AT_LEAST: Duration = Duration::from_millis(450);
    let (_mock, _secret, gw) = setup("[server]\nidle_timeout = \"500ms\"").await;
    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = TcpStream::connect(gw.proxy).await.unwrap();
    h1.write_all(b"GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    h1.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let took = closed_within(&mut h1, Duration::from_secs(5))
        .await
        .expect("an idle HTTP/1.1 connection stayed open");
    assert!(
        took >= AT_LEAST,
        "closed {took:?} after its response, idle_timeout {IDLE:?}"
    );

    // HTTP/2 on the wire: one request, then no stream open: GOAWAY, then the end of the
    // connection. The peer answers PINGs, as a live client does (the graceful GOAWAY waits for
    // one round trip).
    let mut h2 = TcpStream::connect(gw.proxy).await.unwrap();
    let request = h2wire::get(1, "http", "gw", "/api/v1/usergroups");
    h2.write_all(&[h2wire::client_start(), request].concat())
        .await
        .unwrap();
    let seen = h2wire::exchange(&mut h2, true, Duration::from_secs(5)).await;
    assert!(
        seen.closed,
        "an idle HTTP/2 connection stayed open: {seen:?}"
    );
    let answered = seen.stream_end(1).expect("the request was answered");
    let goaway = seen
        .first(GOAWAY)
        .expect("a GOAWAY before the connection ended");
    assert_eq!(goaway.goaway_error(), Some(0), "NO_ERROR: {goaway:?}");
    let quiet = goaway.at - answered;
    assert!(
        quiet >= AT_LEAST,
        "GOAWAY {quiet:?} after the last response"
    );
    // The last frame is a GOAWAY too (the final one names the last stream served).
    let last = seen.frames.last().unwrap();
    assert_eq!(
        (last.kind, last.goaway_error()),
        (GOAWAY, Some(0)),
        "{last:?}"
    );

    // Both closes counted as idle.
    expect_metric(gw.admin, &closed_series("idle_timeout"), 2).await;
}

#[tokio::test]
async fn h2_keepalive_pings_find_silent_peers() {
    // header_timeout is long enough for the live peer's second; pings come every 200 ms.
    let (_mock, _secret, gw) = setup(
        "[server]\nheader_timeout = \"4s\"\nh2_keepalive_interval = \"200ms\"\n\
         h2_keepalive_timeout = \"300ms\"",
    )
    .await;
    // A peer that sent its preface and SETTINGS and then vanished: pinged, then dropped.
    let mut silent = TcpStream::connect(gw.proxy).await.unwrap();
    silent.write_all(&h2wire::client_start()).await.unwrap();
    let seen = h2wire::exchange(&mut silent, false, Duration::from_secs(3)).await;
    assert!(
        seen.closed,
        "an unresponsive HTTP/2 peer kept its connection"
    );
    let ping = seen
        .first(PING)
        .expect("a PING before the connection ended");
    assert!(ping.payload.len() == 8, "{ping:?}");
    // Not before the PING went unanswered for the keep-alive timeout.
    assert!(
        seen.ended - ping.at >= Duration::from_millis(250),
        "closed {:?} after the PING",
        seen.ended - ping.at
    );

    // A peer that answers stays, pinged again and again.
    let mut live = TcpStream::connect(gw.proxy).await.unwrap();
    live.write_all(&h2wire::client_start()).await.unwrap();
    let seen = h2wire::exchange(&mut live, true, Duration::from_millis(1200)).await;
    assert!(!seen.closed, "a peer answering PINGs was dropped: {seen:?}");
    assert!(seen.pings() >= 2, "{} PINGs in 1.2 s", seen.pings());

    expect_metric(gw.admin, &closed_series("keepalive_timeout"), 1).await;
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
    expect_metric(gw.admin, &closed_series("no_request"), 50).await;
}

#[tokio::test]
async fn http1_closes_at_header_timeout_are_told_idle_or_slow() {
    // hyper's header timer runs between keep-alive requests too, so with header_timeout below
    // idle_timeout both of these close at header_timeout; only the second was slow.
    let (_mock, _secret, gw) = setup("[server]\nheader_timeout = \"400ms\"").await;
    let request = b"GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\r\n";
    let mut idle = TcpStream::connect(gw.proxy).await.unwrap();
    let mut slow = TcpStream::connect(gw.proxy).await.unwrap();
    // hyper starts the header timer as soon as a response is written: each close is timed
    // from when its response was read (a little later), and seen no earlier than it happened.
    let mut answered = Vec::new();
    for c in [&mut idle, &mut slow] {
        c.write_all(request).await.unwrap();
        let mut status = [0u8; 12];
        c.read_exact(&mut status).await.unwrap();
        assert_eq!(&status, b"HTTP/1.1 200");
        answered.push(Instant::now());
    }
    // Half of the next request's headers, then nothing.
    slow.write_all(b"GET /api/v1/usergroups HTTP/1.1\r\nHo")
        .await
        .unwrap();
    for (c, since) in [&mut idle, &mut slow].into_iter().zip(answered) {
        let closed = closed_within(c, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "open past header_timeout");
        let took = since.elapsed();
        assert!(took >= Duration::from_millis(350), "closed after {took:?}");
    }
    expect_metric(gw.admin, &closed_series("idle_timeout"), 1).await;
    expect_metric(gw.admin, &closed_series("header_timeout"), 1).await;
}

#[tokio::test]
async fn a_stalled_partial_preface_costs_no_cpu() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    // The gateway as its own process, so that only its CPU time is measured.
    let gw = child_gateway(&mock, &secret, "header_timeout = \"3s\"", "").await;
    let pid = gw.gw.process.id();
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(gw.gw.proxy).await.unwrap();
        c.write_all(&PREFACE[..16]).await.unwrap();
        conns.push(c);
    }
    // Let every connection reach its wait, then measure a second of stalling.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu, wall) = (cpu_time(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time(pid) - cpu;
    let elapsed = wall.elapsed();
    eprintln!("gateway CPU time while 50 connections stalled: {used:?} in {elapsed:?}");
    // A spinning wait burns a core per connection group (the old one: 0.6–1.3 s per second).
    assert!(
        used < Duration::from_millis(200),
        "{used:?} of CPU in {elapsed:?} while 50 connections stalled"
    );
    // And they are still cut off at header_timeout, and counted.
    for c in &mut conns {
        assert!(closed_within(c, Duration::from_secs(6)).await.is_some());
    }
    expect_metric(gw.gw.admin, &closed_series("header_timeout"), 50).await;
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
async fn a_client_that_stops_reading_is_cut_off_and_a_slow_one_is_not() {
    const SEND_TIMEOUT: Duration = Duration::from_secs(1);
    let (_mock, _secret, gw) = setup("[server]\nsend_timeout = \"1s\"").await;

    // 64 MiB, far past what the sockets and the gateway hold: once the client stops reading,
    // a write waits, and keeps waiting.
    let mut stalled = small_window(gw.proxy).await;
    // Before the request: a lower bound on when its writes began to wait.
    let started = Instant::now();
    stop_reading(&mut stalled, "stalled").await;
    let admin = gw.admin;
    wait_send_timeouts(admin, 1).await;
    assert!(
        started.elapsed() >= SEND_TIMEOUT,
        "closed {:?} after the client stopped reading",
        started.elapsed()
    );
    // Closed: what was queued drains, then the end (or a reset), well short of the body.
    let mut drained = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n @ 1..) = stalled.read(&mut buf).await {
            drained += n as u64;
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    assert!(drained < 64 * MIB, "{drained} bytes after the close");
    // The record says why the response ended short.
    let records = gw.wait_audit(1).await;
    let record = records
        .iter()
        .find(|r| r["query"].as_str().is_some_and(|q| q.contains("n=stalled")))
        .unwrap_or_else(|| panic!("the stalled request's record: {records:?}"));
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["complete"], false, "{record}");
    assert_eq!(record["error"], "send_timeout", "{record}");

    // HTTP/2: a client that stops reading its connection is cut off the same way, and its
    // stream's record says so.
    let mut h2 = small_window(gw.proxy).await;
    let mut start = h2wire::client_start_widest();
    start.extend(h2wire::get(
        1,
        "http",
        "gw",
        "/api/v1/_blob?size=67108864&n=stalled-h2",
    ));
    h2.write_all(&start).await.unwrap();
    wait_send_timeouts(admin, 2).await;
    let records = gw.wait_audit(2).await;
    let record = records
        .iter()
        .find(|r| {
            r["query"]
                .as_str()
                .is_some_and(|q| q.contains("n=stalled-h2"))
        })
        .unwrap_or_else(|| panic!("the stalled stream's record: {records:?}"));
    assert_eq!(record["error"], "send_timeout", "{record}");
    drop(h2);

    // A client that reads slowly but steadily (pauses far shorter than send_timeout, while
    // the gateway's writes wait on it) gets its whole answer.
    const SIZE: u64 = 12 * MIB;
    let mut slow = small_window(gw.proxy).await;
    slow.write_all(
        format!(
            "GET /api/v1/_blob?size={SIZE}&n=slow HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut received = 0u64;
    let mut next_pause = 0u64;
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(n @ 1..) = slow.read(&mut buf).await {
            received += n as u64;
            if received >= next_pause {
                next_pause += 512 * 1024;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the slow read did not end");
    assert!(
        received > SIZE,
        "{received} bytes: the slow reader was cut off"
    );
    assert_eq!(
        metric_at(admin, &closed_series("send_timeout")).await,
        Some(2)
    );
}

#[tokio::test]
async fn an_h2_stream_whose_window_stays_shut_is_cut_off() {
    // A client that reads its connection and answers PINGs, but gives its streams no window
    // (SETTINGS_INITIAL_WINDOW_SIZE 0) and never opens one: no write waits at the socket, yet
    // the stream holds its response and an upstream connection. The stream's own watch ends
    // the connection.
    let (_mock, _secret, gw) = setup("[server]\nh2_stall_timeout = \"1s\"").await;
    let mut conn = TcpStream::connect(gw.proxy).await.unwrap();
    let mut start = h2wire::PREFACE.to_vec();
    start.extend(h2wire::frame(h2wire::SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    start.extend(h2wire::get(
        1,
        "http",
        "gw",
        // Past cache.max_object_size, so it streams: the record can tell it was cut short.
        &format!("/api/v1/_blob?size={}&n=shut", 16 * MIB),
    ));
    let started = Instant::now();
    conn.write_all(&start).await.unwrap();
    let seen = h2wire::exchange(&mut conn, true, Duration::from_secs(15)).await;
    assert!(seen.closed, "the connection stayed open: {seen:?}");
    assert!(
        seen.ended - started >= Duration::from_secs(1),
        "closed {:?} after the request",
        seen.ended - started
    );
    assert!(
        seen.first(h2wire::HEADERS).is_some(),
        "the response's headers went out: {seen:?}"
    );
    assert!(seen.first(h2wire::DATA).is_none(), "{seen:?}");
    wait_send_timeouts(gw.admin, 1).await;
    let records = gw.wait_audit(1).await;
    let record = records.last().unwrap();
    assert_eq!(record["complete"], false, "{record}");
    assert_eq!(record["error"], "send_timeout", "{record}");
}

#[tokio::test]
async fn an_h2_close_stuck_behind_a_shut_window_is_cut_off() {
    // A window of one byte: hyper takes the small answer whole and hands it to h2, so its
    // stream is done for hyper and nothing is in flight; h2 sends one byte, and the rest waits
    // behind the window the client never opens further. The idle close (GOAWAY) cannot end; once
    // it has waited send_timeout with nothing in flight, the connection is reset.
    let (_mock, _secret, gw) =
        setup("[server]\nidle_timeout = \"1s\"\nsend_timeout = \"1s\"\nh2_stall_timeout = \"1h\"")
            .await;
    let mut conn = TcpStream::connect(gw.proxy).await.unwrap();
    let mut start = h2wire::PREFACE.to_vec();
    start.extend(h2wire::frame(h2wire::SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 1]));
    start.extend(h2wire::get(1, "http", "gw", "/api/v1/usergroups"));
    conn.write_all(&start).await.unwrap();
    let seen = h2wire::exchange(&mut conn, true, Duration::from_secs(15)).await;
    assert!(seen.closed, "the connection stayed open: {seen:?}");
    assert!(
        seen.first(GOAWAY).is_some(),
        "the idle close began: {seen:?}"
    );
    assert!(
        seen.stream_end(1).is_none(),
        "the answer never ended: {seen:?}"
    );
    wait_send_timeouts(gw.admin, 1).await;
    assert_eq!(
        metric_at(gw.admin, &closed_series("idle_timeout")).await,
        Some(0)
    );
}

#[tokio::test]
async fn a_tls_client_that_stops_reading_is_cut_off() {
    // Over TLS a write can go through into the session's buffer and then wait in a flush (or
    // in the close_notify of a close): those waits count too.
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new("gateway server CA");
    let (cert, key) = ca.leaf_pem(&["127.0.0.1"]);
    let cert = write_file(dir.path(), "cert.pem", &cert);
    let key = write_file(dir.path(), "key.pem", &key);
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(
        &mock,
        &secret,
        &format!(
            "[server]\nsend_timeout = \"1s\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = small_window(gw.proxy).await;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    stop_reading(&mut tls, "tls").await;
    wait_send_timeouts(gw.admin, 1).await;
    let records = gw.wait_audit(1).await;
    assert_eq!(records.last().unwrap()["error"], "send_timeout");
}

#[tokio::test]
async fn a_client_pausing_its_reads_does_not_trip_the_upstream_deadline() {
    // upstream.timeout bounds the pauses of the upstream's body while the gateway waits for
    // it; a client that stops reading for three times as long is backpressure, not a stall.
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = gateway_with(&mock, &secret, "timeout = \"1s\"", "send_timeout = \"20s\"").await;
    const SIZE: u64 = 32 * MIB;
    let mut conn = small_window(gw.proxy).await;
    conn.write_all(
        format!("GET /api/v1/_blob?size={SIZE}&n=paused HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut received = 0u64;
    let mut paused = false;
    let mut buf = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            received += n as u64;
            // Past what a fill holds in memory (cache.max_object_size): the rest is read from
            // the upstream as the client takes it.
            if !paused && received > 20 * MIB {
                paused = true;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the read did not end");
    assert!(paused);
    assert!(received > SIZE, "{received} bytes: the answer was cut off");
    let records = gw.wait_audit(1).await;
    let record = records.last().unwrap();
    assert_eq!(record["complete"], true, "{record}");
    assert_eq!(record["error"], serde_json::Value::Null, "{record}");
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

/// A gateway child process in front of `mock`: `server` lines go in `[server]`, `extra` after
/// every section.
async fn child_gateway(
    mock: &MockCloudCasa,
    secret: &SecretDir,
    server: &str,
    extra: &str,
) -> Child {
    let dir = tempfile::tempdir().unwrap();
    let gw = ChildGateway::start(dir.path().join("stderr.log"), &[], |proxy, admin| {
        let config = write_file(
            dir.path(),
            "gateway.toml",
            &format!(
                "[server]\nlisten = \"{proxy}\"\n{server}\n[admin]\nlisten = \"{admin}\"\n[upstream]\nurl = \"{}\"\n\
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

/// What the README's "Memory bounds" says the process needs at most, for a cache of
/// `max_size`, a fill budget of `max_inflight` and `max_connections`:
/// 30 MiB + 1.1 × max_size + max_inflight + max_connections × 75 KiB.
fn documented_bound(max_size: u64, max_inflight: u64, max_connections: u64) -> u64 {
    30 * MIB + max_size * 11 / 10 + max_inflight + max_connections * 75 * 1024
}

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn cache_fills_are_bounded_by_max_inflight() {
    const OBJECT: u64 = 7 * MIB;
    const CLIENTS: u64 = 40;
    // The setting: a 64 MiB budget (and a 64 MiB cache). 128 connections make the
    // documented bound 174 MiB, which 40 stalled 7 MiB fills (280 MiB) would break without
    // the budget.
    let (max_size, max_inflight, max_connections) = (64 * MIB, 64 * MIB, 128);
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = child_gateway(
        &mock,
        &secret,
        &format!("max_connections = {max_connections}"),
        "[cache]\nmax_size = \"64MiB\"\nmax_object_size = \"8MiB\"\nmax_inflight = \"64MiB\"",
    )
    .await;
    let pid = gw.gw.process.id();
    let bound = documented_bound(max_size, max_inflight, max_connections);
    let before = child_rss(pid);
    // Clients each ask for a distinct 7 MiB object that the upstream sends slowly (2 s), and
    // never read the answer.
    let mut stalled = Vec::new();
    for i in 0..CLIENTS {
        let mut c = TcpStream::connect(gw.gw.proxy).await.unwrap();
        let request = format!(
            "GET /api/v1/_blob?size={OBJECT}&trickle=18&n={i} HTTP/1.1\r\nHost: gw\r\n\
             Cache-Control: no-cache\r\n\r\n"
        );
        c.write_all(request.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While those fills run, the budget (nine 7 MiB fills) is taken: a reader's fill streams
    // through unstored.
    let url = format!("http://{}/api/v1/_blob?size={OBJECT}&n=reader", gw.gw.proxy);
    let reply = get(&url, &[]).await;
    assert_eq!(reply.body.len() as u64, OBJECT);
    assert_eq!(
        reply.header("cache-status"),
        Some("cloudcasa-gateway; fwd=uri-miss; detail=inflight-limit")
    );
    // Until well after the trickled fills have completed (2 s).
    let mut peak = 0;
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(child_rss(pid));
    }
    eprintln!(
        "RSS with {CLIENTS} stalled 7 MiB fills: {} MiB before, peak {} MiB; documented bound {} MiB",
        before / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "RSS reached {} MiB with {CLIENTS} stalled fills, over the documented {} MiB",
        peak / MIB,
        bound / MIB
    );
    // Every fill past the budget said so, and was counted.
    let mut streamed = 1; // the reader's
    for c in &mut stalled {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut byte))
                .await
                .expect("a response head")
                .unwrap();
            head.push(byte[0]);
            assert!(head.len() < 8192);
        }
        if String::from_utf8_lossy(&head).contains("detail=inflight-limit") {
            streamed += 1;
        }
    }
    assert!(
        streamed > 1 + CLIENTS / 2,
        "{streamed} fills streamed past the budget"
    );
    expect_metric(
        gw.gw.admin,
        "cloudcasa_gateway_cache_not_stored_total{reason=\"inflight-limit\"}",
        streamed,
    )
    .await;
    drop(stalled);
}

#[tokio::test]
async fn an_h2_connection_with_stalled_streams_holds_bounded_memory() {
    // The README's bound for one HTTP/2 connection whose client never reads: 40 MiB (20–31 MiB
    // measured with the gateway's limits, from run to run; 73 MiB with hyper's defaults and
    // the same 100 streams, which allow 200).
    const WORST_CASE: u64 = 40 * MIB;
    const STREAMS: u32 = 100;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = child_gateway(&mock, &secret, "", "").await;
    let pid = gw.gw.process.id();
    // Warm up (the upstream pool, the allocator's caches) so that growth is the streams'.
    let warm = format!("http://{}/api/v1/_blob?size={}&n=warm", gw.gw.proxy, MIB);
    assert_eq!(get(&warm, &[]).await.body.len() as u64, MIB);
    let before = child_rss(pid);
    let mut conn = TcpStream::connect(gw.gw.proxy).await.unwrap();
    // The largest windows a client can give, so that only the gateway's own limits hold
    // responses back; then it never reads.
    let mut start = h2wire::client_start_widest();
    for i in 0..STREAMS {
        // 16 MiB: past cache.max_object_size, so each streams through without being stored.
        let path = format!("/api/v1/_blob?size={}&n={i}", 16 * MIB);
        start.extend(h2wire::get(2 * i + 1, "http", "gw", &path));
    }
    conn.write_all(&start).await.unwrap();
    let admin = gw.gw.admin;
    eventually(
        Duration::from_secs(10),
        "every stream in flight",
        || async move {
            metric_at(admin, "cloudcasa_gateway_requests_in_flight")
                .await
                .is_some_and(|n| n == u64::from(STREAMS))
        },
    )
    .await;
    // Until the queues are full and stay so.
    let mut peak = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(child_rss(pid).saturating_sub(before));
    }
    eprintln!(
        "RSS growth with {STREAMS} stalled HTTP/2 streams on one connection: {} KiB",
        peak / 1024
    );
    assert!(
        peak <= WORST_CASE,
        "one connection with {STREAMS} stalled streams grew RSS by {} MiB",
        peak / MIB
    );
    // Still stalled (not failed) when measured.
    assert_eq!(
        metric_at(admin, "cloudcasa_gateway_requests_in_flight").await,
        Some(u64::from(STREAMS))
    );
    drop(conn);
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

/// A chunked POST of `size` bytes to the usergroups collection, written raw; `close` asks
/// the gateway to close the connection after answering.
fn chunked_post(size: usize, finished: bool, close: bool) -> Vec<u8> {
    let mut request = format!(
        "POST /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n{}\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    let body = vec![b'x'; size];
    for chunk in body.chunks(16 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    if finished {
        request.extend_from_slice(b"0\r\n\r\n");
    }
    request
}

#[tokio::test]
async fn request_bodies_read_whole_share_one_budget() {
    // 1 MiB for all the bodies read whole before sending. A client that sends 1000 KiB of a
    // chunked body and stalls holds most of it; the next chunked body does not fit, so it
    // streams (chunked, as it came) instead of adding to what the gateway holds.
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = gateway_with(
        &mock,
        &secret,
        "max_buffered_bodies = \"1MiB\"",
        "body_timeout = \"30s\"",
    )
    .await;
    let sent_whole = |r: &support::mock::Recorded| {
        r.header("content-length").is_some() && r.header("transfer-encoding").is_none()
    };
    raw_exchange(gw.proxy, &chunked_post(100 * 1024, true, true)).await;
    assert_eq!(mock.state.count(), 1);
    assert!(
        sent_whole(&mock.state.last()),
        "with the budget free, read whole"
    );

    let mut staller = TcpStream::connect(gw.proxy).await.unwrap();
    staller
        .write_all(&chunked_post(1000 * 1024, false, false))
        .await
        .unwrap();
    // (Nothing reaches the upstream while the gateway reads it; give it the time to.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.state.count(), 1);
    raw_exchange(gw.proxy, &chunked_post(100 * 1024, true, true)).await;
    assert_eq!(mock.state.count(), 2);
    let streamed = mock.state.last();
    assert_eq!(streamed.header("transfer-encoding"), Some("chunked"));
    assert_eq!(streamed.body_len, 100 * 1024);

    // An HTTP/1.0 upstream reads nothing of a chunked body, so such a body cannot stream: 503,
    // retry in a second, and nothing forwarded.
    mock.state.set_http10(true);
    assert_eq!(
        get(&gw.url("/api/v1/usergroups"), &[]).await.status,
        StatusCode::OK
    );
    let before = mock.state.count();
    let refused = raw_exchange(gw.proxy, &chunked_post(100 * 1024, true, true)).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(
        refused.contains("upstream.max_buffered_bodies"),
        "{refused}"
    );
    assert_eq!(mock.state.count(), before);
    let metrics = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("cloudcasa_gateway_gateway_errors_total{kind=\"bodies_buffered\"} 1"),
        "{metrics}"
    );

    // The staller goes away: its share comes back, and bodies are read whole again.
    drop(staller);
    eventually(Duration::from_secs(5), "the budget back", || async {
        let reply = raw_exchange(gw.proxy, &chunked_post(10 * 1024, true, true)).await;
        !reply.starts_with("HTTP/1.1 503")
    })
    .await;
    assert!(sent_whole(&mock.state.last()));
    // Larger than the whole budget: no retry can help, so 413, not 503.
    let before = mock.state.count();
    let too_large = raw_exchange(gw.proxy, &chunked_post(1536 * 1024, true, true)).await;
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");
    assert_eq!(mock.state.count(), before);
}
