//! The gateway core end to end: a real gateway on ephemeral ports in front of the mock CloudCasa.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Version};
use serde_json::json;
use support::*;

#[tokio::test]
async fn injects_the_token_and_strips_the_clients_credential() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;

    let reply = get(
        &gw.url("/api/v1/usergroups"),
        &[
            ("authorization", "Bearer client-supplied-secret"),
            // A second line: the token replaces every one.
            ("authorization", "Basic Y2xpZW50OnNlY3JldA=="),
            ("proxy-authorization", "Basic eA=="),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = mock.state.last();
    assert_eq!(seen.header("authorization"), Some("Bearer token-a"));
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert!(seen.header("proxy-authorization").is_none());
    // A bare client gets the headers CloudCasa wants.
    assert_eq!(seen.header("accept"), Some("application/json"));
    assert_eq!(seen.header("host"), Some(mock.addr.to_string().as_str()));
    // Nothing the gateway answered carries the token.
    assert!(!format!("{:?}{}", reply.headers, reply.text()).contains("token-a"));
}

#[tokio::test]
async fn never_changes_what_the_client_sent_and_adds_content_type_to_bodies() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;

    let reply = get(
        &gw.url("/api/v1/usergroups?max_results=5&where=%7B%7D"),
        &[("accept", "application/json; q=0.9"), ("x-custom", "kept")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = mock.state.last();
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/api/v1/usergroups?max_results=5&where=%7B%7D"
    );
    assert_eq!(seen.header("accept"), Some("application/json; q=0.9"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert!(
        seen.header("content-type").is_none(),
        "no body, no content type"
    );

    let created = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"g1"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_eq!(
        mock.state.last().header("content-type"),
        Some("application/json")
    );

    let odd = send(
        Method::POST,
        &gw.url("/api/v1/_blob"),
        &[("content-type", "text/plain")],
        "abc",
    )
    .await;
    assert_eq!(odd.status, StatusCode::OK);
    assert_eq!(mock.state.last().header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn rotation_by_symlink_swap_is_picked_up_within_two_seconds() {
    let mock = MockCloudCasa::start().await;
    let mut secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    assert_eq!(
        get(&gw.url("/api/v1/clusters"), &[]).await.status,
        StatusCode::OK
    );

    secret.rotate("token-b");
    let started = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(2),
        "the rotated token in use",
        || async {
            get(&gw.url("/api/v1/clusters"), &[]).await;
            mock.state.last().header("authorization") == Some("Bearer token-b")
        },
    )
    .await;
    assert!(started.elapsed() <= Duration::from_secs(2));
}

#[tokio::test]
async fn upstream_401_triggers_an_immediate_reread() {
    let mock = MockCloudCasa::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A plain file outside any watched layout change: rewrite it in place, with the mock
    // answering 401 for the old token, and expect the gateway to look again at once.
    let path = write_file(dir.path(), "token", "token-old");
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"",
        mock.url(),
        path.display()
    ))
    .await;
    let first = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert_eq!(
        first.status,
        StatusCode::UNAUTHORIZED,
        "the mock does not know token-old"
    );
    write_file(dir.path(), "token", "token-a");
    eventually(
        Duration::from_secs(2),
        "the new token after a 401",
        || async { get(&gw.url("/api/v1/clusters"), &[]).await.status == StatusCode::OK },
    )
    .await;
}

#[tokio::test]
async fn no_token_means_503_and_not_ready_until_the_secret_appears() {
    let mock = MockCloudCasa::start().await;
    let mut secret = SecretDir::empty();
    let gw = TestGateway::for_mock(&mock, &secret, "").await;

    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let reply = get(
        &gw.url("/api/v1/clusters"),
        &[("authorization", "Bearer mine")],
    )
    .await;
    let message = reply.envelope_message(503);
    assert!(message.contains("no CloudCasa API token"), "{message}");
    assert_eq!(
        mock.state.count(),
        0,
        "nothing reaches the upstream without a token"
    );
    assert_eq!(
        get(&gw.admin_url("/healthz"), &[]).await.status,
        StatusCode::OK
    );

    secret.appear("token-a");
    eventually(
        Duration::from_secs(3),
        "readiness after the secret appears",
        || async { get(&gw.admin_url("/readyz"), &[]).await.status == StatusCode::OK },
    )
    .await;
    assert_eq!(
        get(&gw.url("/api/v1/clusters"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn writes_pass_if_match_through_and_428_412_arrive_unchanged() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    let doc = mock.state.seed("a", "usergroups", json!({"name": "g"}));
    let id = doc["_id"].as_str().unwrap();
    let etag = doc["_etag"].as_str().unwrap();
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));

    let missing = send(Method::PATCH, &url, &[], r#"{"name":"h"}"#).await;
    assert_eq!(missing.status, StatusCode::PRECONDITION_REQUIRED);
    assert_eq!(
        missing.json(),
        json!({"_status": "ERR", "_error": {"code": 428, "message": "To edit a document its etag must be provided using the If-Match header"}})
    );
    let stale = send(
        Method::PATCH,
        &url,
        &[("if-match", "0000")],
        r#"{"name":"h"}"#,
    )
    .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        stale.json(),
        json!({"_status": "ERR", "_error": {"code": 412, "message": "Client and server etags don't match"}})
    );
    assert_eq!(mock.state.last().header("if-match"), Some("0000"));

    let ok = send(
        Method::PATCH,
        &url,
        &[("if-match", etag), ("x-trace-me", "1")],
        r#"{"name":"h"}"#,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let seen = mock.state.last();
    assert_eq!(seen.header("if-match"), Some(etag));
    assert_eq!(seen.header("x-trace-me"), Some("1"));
    assert_eq!(seen.body, Bytes::from_static(br#"{"name":"h"}"#));
    let new_etag = ok.json()["_etag"].as_str().unwrap().to_string();
    assert_eq!(ok.header("etag"), Some(format!("\"{new_etag}\"").as_str()));

    let deleted = send(
        Method::DELETE,
        &url,
        &[("if-match", &new_etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_failed_write_is_never_retried() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    // Warm a pooled connection, then make the upstream drop the next request on the floor.
    assert_eq!(
        get(&gw.url("/api/v1/usergroups"), &[]).await.status,
        StatusCode::OK
    );
    mock.state.clear();
    mock.state.set_fault(Fault::Reset, Some(1));
    let reply = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"x"}"#,
    )
    .await;
    reply.envelope_message(502);
    assert_eq!(
        mock.state.count(),
        1,
        "the POST reached the upstream exactly once"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let mock = MockCloudCasa::start().await;
    mock.state.route("/api/v1/hop", |_| {
        http::Response::builder()
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "yes")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;

    let response = raw_exchange(
        gw.proxy,
        b"GET /api/v1/hop HTTP/1.1\r\nHost: gw\r\nConnection: close, X-Client-Hop\r\nX-Client-Hop: 1\r\n\
Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eA==\r\n\
X-Kept: yes\r\n\r\n",
    )
    .await;
    let seen = mock.state.last();
    for h in [
        "x-client-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            seen.headers.get(h).is_none(),
            "{h} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));
    let lower = response.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{response}");
    assert!(lower.contains("x-end-to-end: yes"));
    for h in ["x-upstream-hop", "keep-alive:", "proxy-authenticate"] {
        assert!(!lower.contains(h), "{h} reached the client: {response}");
    }
}

#[tokio::test]
async fn absolute_form_targets_cannot_redirect_the_gateway() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    let response = raw_exchange(
        gw.proxy,
        b"GET http://attacker.invalid:1/api/v1/clusters?x=1 HTTP/1.1\r\nHost: attacker.invalid:1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = mock.state.last();
    assert_eq!(seen.uri.to_string(), "/api/v1/clusters?x=1");
    assert_eq!(seen.header("host"), Some(mock.addr.to_string().as_str()));
}

#[tokio::test]
async fn non_path_targets_get_400_in_the_envelope() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    let response = raw_exchange(
        gw.proxy,
        b"OPTIONS * HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        response.contains(r#""_status":"ERR""#) && response.contains(r#""code":400"#),
        "{response}"
    );
    assert_eq!(mock.state.count(), 0);
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_made_otherwise() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;

    let kept = get(&gw.url("/api/v1/clusters"), &[("x-request-id", "abc-123")]).await;
    assert_eq!(kept.header("x-request-id"), Some("abc-123"));
    assert_eq!(mock.state.last().header("x-request-id"), Some("abc-123"));

    let replaced = get(
        &gw.url("/api/v1/clusters"),
        &[("x-request-id", "bad id\"with quotes")],
    )
    .await;
    let made = replaced.header("x-request-id").unwrap().to_string();
    assert_eq!(made.len(), 36, "a UUID: {made}");
    assert_eq!(
        mock.state.last().header("x-request-id"),
        Some(made.as_str())
    );

    // Two ids, each sane: neither can be the one the records name, so the gateway makes one,
    // and the upstream sees exactly that one.
    let two = get(
        &gw.url("/api/v1/clusters"),
        &[("x-request-id", "first-1"), ("x-request-id", "second-2")],
    )
    .await;
    let made_for_two = two.header("x-request-id").unwrap().to_string();
    assert_eq!(made_for_two.len(), 36, "a UUID: {made_for_two}");
    let seen = mock.state.last();
    let upstream_ids: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(upstream_ids, [made_for_two.as_str()]);

    let none = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert_ne!(none.header("x-request-id"), Some(made.as_str()));
    // Gateway-made errors carry one too.
    let err = get(&gw.url("/api/v1/_blob"), &[("content-length", "0")]).await;
    assert!(err.header("x-request-id").is_some());
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "[server]\nmax_body_size = \"1KiB\"").await;

    let declared = send(
        Method::POST,
        &gw.url("/api/v1/_blob"),
        &[],
        vec![b'z'; 2048],
    )
    .await;
    assert!(declared.envelope_message(413).contains("1024 bytes"));
    assert_eq!(mock.state.count(), 0, "refused before forwarding");

    let response = raw_exchange(
        gw.proxy,
        format!(
            "POST /api/v1/_blob HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n800\r\n{}\r\n800\r\n{}\r\n0\r\n\r\n",
            "z".repeat(2048),
            "z".repeat(2048)
        )
        .as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains(r#""code":413"#), "{response}");
}

#[tokio::test]
async fn slow_upstream_gets_504_and_unreachable_gets_502() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"300ms\"\n[token]\nfile = \"{}\"",
        mock.url(),
        secret.token_path().display()
    ))
    .await;
    mock.state
        .set_fault(Fault::Delay(Duration::from_secs(3)), Some(1));
    let slow = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert!(
        slow.envelope_message(504)
            .contains("did not answer within 300ms")
    );

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw2 = TestGateway::start(&format!(
        "[upstream]\nurl = \"http://{closed}\"\n[token]\nfile = \"{}\"",
        secret.token_path().display()
    ))
    .await;
    let down = get(&gw2.url("/api/v1/clusters"), &[]).await;
    let message = down.envelope_message(502);
    assert!(message.contains("unreachable"), "{message}");
    assert!(!message.contains("token-a"));
}

#[tokio::test]
async fn tls_upstream_trusted_through_ca_file_speaks_h2_by_alpn() {
    let mock = MockCloudCasa::start_tls().await;
    let secret = SecretDir::new("token-a");
    let ca = write_file(secret.dir.path(), "ca.pem", mock.ca_pem.as_ref().unwrap());
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\n[token]\nfile = \"{}\"",
        mock.url(),
        ca.display(),
        secret.token_path().display()
    ))
    .await;
    let reply = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = mock.state.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.header("authorization"), Some("Bearer token-a"));

    // Without the CA the certificate is not trusted: 502, never a silent downgrade.
    let untrusting = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"",
        mock.url(),
        secret.token_path().display()
    ))
    .await;
    let refused = get(&untrusting.url("/api/v1/clusters"), &[]).await;
    let message = refused.envelope_message(502);
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}

#[tokio::test]
async fn http2_prior_knowledge_on_the_same_port() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "").await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let resp = h2
        .request(
            http::Request::get(gw.url("/api/v1/clusters"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(
        mock.state.last().header("authorization"),
        Some("Bearer token-a")
    );
}

#[tokio::test]
async fn clients_that_trickle_or_stay_silent_are_cut_off() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "[server]\nheader_timeout = \"300ms\"").await;
    // Half a request line, then nothing: the server must close the connection.
    let partial = raw_exchange(gw.proxy, b"GET /api/v1/clusters HTTP/1.1\r\nHost: x\r\n").await;
    assert!(!partial.contains("200 OK"), "{partial}");
    // Nothing at all: same.
    raw_exchange(gw.proxy, b"").await;
    // A partial HTTP/2 preface: same.
    raw_exchange(gw.proxy, b"PRI * HTTP/2.0\r\n").await;
    assert_eq!(mock.state.count(), 0);
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let mut gw = TestGateway::for_mock(&mock, &secret, "[server]\ndrain_timeout = \"10s\"").await;
    mock.state
        .set_fault(Fault::Delay(Duration::from_millis(500)), Some(1));
    let url = gw.url("/api/v1/clusters");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    mock.state.wait_for(1).await;

    let admin = gw.admin_url("/readyz");
    let proxy = gw.proxy;
    let stopped = gw.begin_shutdown();
    eventually(
        Duration::from_secs(5),
        "readiness to report draining",
        || async { get(&admin, &[]).await.status == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "no new connections while draining"
    );
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the in-flight request completed"
    );
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("the gateway stops")
        .unwrap();
}

/// A CONNECT proxy on loopback, as corporate egress proxies are: it reads the CONNECT request,
/// checks `Proxy-Authorization` when `auth` is set (407 otherwise), opens the tunnel, and records
/// what it saw (the request heads, and every byte that went through, to prove they were TLS).
async fn connect_proxy(
    auth: Option<&'static str>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, b) = (heads.clone(), bytes.clone());
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (h, b) = (h.clone(), b.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                h.lock().unwrap().push(head.clone());
                if let Some(expected) = auth
                    && !head.contains(&format!("Proxy-Authorization: {expected}\r\n"))
                    && !head.contains(&format!("proxy-authorization: {expected}\r\n"))
                {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                        .await;
                    return;
                }
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .unwrap();
                let (mut cr, mut cw) = client.split();
                let (mut ur, mut uw) = upstream.split();
                let to_upstream = async {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        b.lock().unwrap().extend_from_slice(&buf[..n]);
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let to_client = tokio::io::copy(&mut ur, &mut cw);
                let _ = tokio::join!(to_upstream, to_client);
            });
        }
    });
    (addr, heads, bytes)
}

#[tokio::test]
async fn a_tls_upstream_is_reached_through_an_egress_proxy_with_credentials() {
    let mock = MockCloudCasa::start_tls().await;
    let secret = SecretDir::new("token-a");
    let ca = write_file(secret.dir.path(), "ca.pem", mock.ca_pem.as_ref().unwrap());
    // "user:secret" in Basic.
    let (proxy, heads, bytes) = connect_proxy(Some("Basic dXNlcjpzZWNyZXQ=")).await;
    let credentials = write_file(secret.dir.path(), "proxy-credentials", "user:secret\n");
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\nproxy = \"http://{proxy}\"\n\
         proxy_credentials_file = \"{}\"\n[token]\nfile = \"{}\"",
        mock.url(),
        ca.display(),
        credentials.display(),
        secret.token_path().display()
    ))
    .await;
    let reply = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        mock.state.last().header("authorization"),
        Some("Bearer token-a")
    );
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(&format!(
            "CONNECT localhost:{} HTTP/1.1\r\n",
            mock.addr.port()
        )),
        "{heads:?}"
    );
    // The token crossed the proxy inside TLS only.
    let through = bytes.lock().unwrap().clone();
    assert!(!through.is_empty());
    assert!(!String::from_utf8_lossy(&through).contains("token-a"));

    // Wrong credentials: the proxy refuses the tunnel; the client gets a 502 that says so.
    let wrong = write_file(secret.dir.path(), "wrong-credentials", "user:nope\n");
    let refused = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\nproxy = \"http://{proxy}\"\n\
         proxy_credentials_file = \"{}\"\n[token]\nfile = \"{}\"",
        mock.url(),
        ca.display(),
        wrong.display(),
        secret.token_path().display()
    ))
    .await;
    let reply = get(&refused.url("/api/v1/clusters"), &[]).await;
    let message = reply.envelope_message(502);
    assert!(message.contains("proxy"), "{message}");
}

/// Without `upstream.proxy`, the binary takes its proxy from `HTTPS_PROXY` (as curl does), and
/// `NO_PROXY` naming the upstream's host bypasses it. A child process, so the variables are its
/// own and no other test sees them.
#[tokio::test]
async fn https_proxy_from_the_environment_and_no_proxy_bypassing_it() {
    let mock = MockCloudCasa::start_tls().await;
    let secret = SecretDir::new("token-a");
    let dir = secret.dir.path();
    let ca = write_file(dir, "ca.pem", mock.ca_pem.as_ref().unwrap());
    let (proxy, heads, _) = connect_proxy(None).await;
    let proxy_url = format!("http://{proxy}");
    let start = |name: &'static str, no_proxy: &'static str| {
        let config = dir.join(format!("{name}.toml"));
        let (mock_url, ca, token) = (mock.url(), ca.clone(), secret.token_path());
        let proxy_url = proxy_url.clone();
        async move {
            // Both spellings: the matcher reads either, and the test runner's own environment
            // must not leak in.
            let env = [
                ("HTTPS_PROXY", proxy_url.as_str()),
                ("https_proxy", proxy_url.as_str()),
                ("NO_PROXY", no_proxy),
                ("no_proxy", no_proxy),
            ];
            ChildGateway::start(dir.join(format!("{name}.log")), &env, |p, a| {
                std::fs::write(
                    &config,
                    format!(
                        "[server]\nlisten = \"{p}\"\n[admin]\nlisten = \"{a}\"\n[audit]\nenabled = false\n\
                         [upstream]\nurl = \"{mock_url}\"\nca_file = \"{}\"\n[token]\nfile = \"{}\"\n",
                        ca.display(),
                        token.display()
                    ),
                )
                .unwrap();
                vec!["--config".into(), config.clone().into()]
            })
            .await
        }
    };

    let through = start("through", "example.com").await;
    let reply = get(&format!("http://{}/api/v1/clusters", through.proxy), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with(&format!(
            "CONNECT localhost:{} HTTP/1.1\r\n",
            mock.addr.port()
        )),
        "{seen:?}"
    );
    assert!(
        through
            .logs()
            .contains("the upstream is reached through a proxy"),
        "{}",
        through.logs()
    );
    drop(through);

    let bypass = start("bypass", "example.com,localhost").await;
    let reply = get(&format!("http://{}/api/v1/clusters", bypass.proxy), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        heads.lock().unwrap().len(),
        1,
        "NO_PROXY names the host: no tunnel"
    );
    assert_eq!(mock.state.requests_to("/api/v1/clusters").len(), 2);
    assert!(
        !bypass.logs().contains("through a proxy"),
        "{}",
        bypass.logs()
    );
}
