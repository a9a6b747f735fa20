//! The security boundary: every decision (policy, fail-closed audit, the audit record, the cache
//! key, invalidation) is made on the request the upstream will execute. The mock behaves as Eve
//! does where that matters: it honours `X-HTTP-Method-Override` on any method, upper-cases
//! methods, renders XML without `Vary`, echoes TRACE, and can answer HTTP/1.0.

mod support;

use bytes::Bytes;
use cloudcasa_gateway::layers::identity::api_keys::key_line;
use http::{Method, StatusCode};
use serde_json::json;
use support::*;

const READER_KEY: &str = "reader-key-0123456789abcdef0123456789";

/// A gateway whose only client, `apikey:reader`, may GET and HEAD usergroups and nothing else.
async fn reader_gateway(extra: &str) -> (MockCloudCasa, SecretDir, TestGateway, tempfile::TempDir) {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let dir = tempfile::tempdir().unwrap();
    let keys = write_file(
        dir.path(),
        "keys.toml",
        &(key_line("reader", READER_KEY) + "\n"),
    );
    let gw = TestGateway::for_mock(
        &mock,
        &secret,
        &format!(
            r#"
[clients.api_keys]
file = "{}"

[[policy]]
name = "read-usergroups"
clients = ["apikey:reader"]
methods = ["GET", "HEAD"]
paths = ["/api/v1/usergroups", "/api/v1/usergroups/**"]
credential = "default"
{extra}
"#,
            keys.display()
        ),
    )
    .await;
    (mock, secret, gw, dir)
}

fn reader() -> (&'static str, String) {
    ("authorization", format!("Bearer {READER_KEY}"))
}

async fn as_reader(
    gw: &TestGateway,
    method: Method,
    path: &str,
    extra: &[(&str, &str)],
    body: &'static str,
) -> Reply {
    let (name, value) = reader();
    let mut headers = vec![(name, value.as_str())];
    headers.extend_from_slice(extra);
    send(
        method,
        &gw.url(path),
        &headers,
        Bytes::from_static(body.as_bytes()),
    )
    .await
}

#[tokio::test]
async fn a_method_override_is_judged_as_the_method_it_names() {
    let (mock, _secret, gw, _dir) = reader_gateway("").await;
    item(&mock, "a");
    item(&mock, "b");
    let (id, etag) = item(&mock, "c");
    let if_match = format!("\"{etag}\"");

    // Eve would delete the collection, create a document, modify one: the gateway refuses each
    // override on a method other than POST before anything is forwarded.
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        let reply = as_reader(
            &gw,
            Method::GET,
            "/api/v1/usergroups",
            &[(name, "DELETE")],
            "",
        )
        .await;
        assert!(reply.envelope_message(400).contains("POST only"), "{name}");
    }
    let head = as_reader(
        &gw,
        Method::HEAD,
        &format!("/api/v1/usergroups/{id}"),
        &[("x-http-method-override", "PATCH"), ("if-match", &if_match)],
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(head.status, StatusCode::BAD_REQUEST);
    // On POST the override is the method: the reader may not DELETE or PATCH.
    for target in ["DELETE", "PATCH", "POST"] {
        let reply = as_reader(
            &gw,
            Method::POST,
            "/api/v1/usergroups",
            &[("x-http-method-override", target), ("if-match", &if_match)],
            r#"{"name":"x"}"#,
        )
        .await;
        let message = reply.envelope_message(403);
        assert!(message.contains(&format!("may not {target} ")), "{message}");
    }
    assert_eq!(mock.state.count(), 0, "nothing reached the upstream");

    // POST overriding to GET is a GET for policy: allowed, forwarded as a GET without the
    // header, and neither served from nor stored in the cache.
    for _ in 0..2 {
        let read = as_reader(
            &gw,
            Method::POST,
            "/api/v1/usergroups",
            &[("x-http-method-override", "GET")],
            "",
        )
        .await;
        assert_eq!(read.status, StatusCode::OK, "{}", read.text());
        assert_eq!(read.json()["_items"].as_array().unwrap().len(), 3);
        assert_eq!(
            read.header("cache-status"),
            Some("cloudcasa-gateway; fwd=method")
        );
        let seen = mock.state.last();
        assert_eq!(seen.method, Method::GET);
        assert!(seen.header("x-http-method-override").is_none());
    }
    assert_eq!(mock.state.count(), 2);

    let records = gw.wait_audit(9).await;
    let overridden: Vec<_> = records
        .iter()
        .filter(|r| r["wire_method"] == "POST")
        .map(|r| (r["method"].as_str().unwrap(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        overridden,
        [
            ("DELETE", 403),
            ("PATCH", 403),
            ("POST", 403),
            ("GET", 200),
            ("GET", 200)
        ]
    );
}

#[tokio::test]
async fn a_post_override_is_the_effective_method_everywhere() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "before");
    let path = format!("/api/v1/usergroups/{id}");
    get(&gw.url(&path), &[]).await;
    let hit = get(&gw.url(&path), &[]).await;
    hit.assert_fresh_hit(60, "");
    let collection = get(&gw.url("/api/v1/usergroups"), &[]).await;
    assert_eq!(collection.status, StatusCode::OK);

    let patched = send(
        Method::POST,
        &gw.url(&path),
        &[
            ("x-http-method-override", "PATCH"),
            ("if-match", &format!("\"{etag}\"")),
        ],
        r#"{"name":"after"}"#,
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let seen = mock.state.last();
    assert_eq!(seen.method, Method::PATCH);
    assert!(seen.header("x-http-method-override").is_none());

    // The write invalidated the item and its collection, as a PATCH does.
    let item_now = get(&gw.url(&path), &[]).await;
    assert_eq!(item_now.json()["name"], "after");
    let listed = get(&gw.url("/api/v1/usergroups"), &[]).await;
    assert_eq!(listed.json()["_items"][0]["name"], "after");

    let records = gw.wait_audit(6).await;
    let write = &records[3];
    assert_eq!(
        (write["method"].as_str(), write["wire_method"].as_str()),
        (Some("PATCH"), Some("POST"))
    );
    assert_eq!(write["path"], path);
    assert_eq!(records[0]["wire_method"], serde_json::Value::Null);
}

#[tokio::test]
async fn fail_closed_audit_sees_every_write_however_it_is_spelled() {
    let (mock, _secret, gw) = setup("[audit]\npath = \"/dev/full\"\nfail_closed = true").await;
    let (id, etag) = item(&mock, "kept");
    let path = format!("/api/v1/usergroups/{id}");
    let if_match = format!("\"{etag}\"");
    // An override to a write is a write: no intent record, no forwarding.
    let overridden = send(
        Method::POST,
        &gw.url(&path),
        &[
            ("x-http-method-override", "DELETE"),
            ("if-match", &if_match),
        ],
        "",
    )
    .await;
    assert!(overridden.envelope_message(503).contains("audit"));
    // Spellings Werkzeug would upper-case and execute, and methods outside server.methods: 501.
    for method in ["delete", "Post", "PURGE", "MOVE"] {
        let reply = send(
            Method::from_bytes(method.as_bytes()).unwrap(),
            &gw.url(&path),
            &[("if-match", &if_match)],
            "",
        )
        .await;
        assert!(
            reply.envelope_message(501).contains(method),
            "{method}: {}",
            reply.text()
        );
    }
    assert_eq!(mock.state.count(), 0, "nothing reached the upstream");
    let still = get(&gw.url(&path), &[]).await;
    assert_eq!(still.json()["name"], "kept");
}

#[tokio::test]
async fn trace_connect_and_lower_case_methods_are_never_forwarded() {
    let (mock, _secret, gw) = setup("").await;
    let trace = send(Method::TRACE, &gw.url("/api/v1/usergroups"), &[], "").await;
    assert!(trace.envelope_message(501).contains("TRACE"));
    assert!(!trace.text().contains("token-a"));
    let connect = raw_exchange(
        gw.proxy,
        b"CONNECT api.cloudcasa.io:443 HTTP/1.1\r\nHost: api.cloudcasa.io:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 501"), "{connect}");
    assert!(connect.contains("\"_status\":\"ERR\""), "{connect}");
    // Spellings Werkzeug would upper-case and execute are refused and audited as spelled.
    for method in ["delete", "Post"] {
        let reply = send(
            Method::from_bytes(method.as_bytes()).unwrap(),
            &gw.url("/api/v1/usergroups"),
            &[],
            "",
        )
        .await;
        assert!(reply.envelope_message(501).contains(method));
    }
    assert_eq!(mock.state.count(), 0);
    // All were audited.
    let records = gw.wait_audit(4).await;
    let methods: Vec<_> = records
        .iter()
        .map(|r| (r["method"].as_str().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        methods,
        [
            ("TRACE", "unsupported_method"),
            ("CONNECT", "unsupported_method"),
            ("delete", "unsupported_method"),
            ("Post", "unsupported_method"),
        ]
    );
}

#[tokio::test]
async fn narrowed_methods_and_refused_overrides() {
    let (mock, _secret, gw) =
        setup("[server]\nmethods = [\"GET\", \"HEAD\", \"POST\"]\nmethod_override = \"refuse\"")
            .await;
    let (id, etag) = item(&mock, "x");
    let path = format!("/api/v1/usergroups/{id}");
    send(
        Method::DELETE,
        &gw.url(&path),
        &[("if-match", &format!("\"{etag}\""))],
        "",
    )
    .await
    .envelope_message(501);
    let overridden = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[("x-http-method-override", "GET")],
        "",
    )
    .await;
    assert!(overridden.envelope_message(400).contains("refuse"));
    assert_eq!(mock.state.count(), 0);
}

#[tokio::test]
async fn paths_are_canonical_for_policy_cache_and_upstream_or_refused() {
    let (mock, _secret, gw, _dir) = reader_gateway("").await;
    mock.state
        .seed("a", "clusters", json!({"name": "secret-cluster"}));
    item(&mock, "g");
    let (name, value) = reader();
    let auth = format!("{name}: {value}\r\n");
    for path in [
        "/api/v1/usergroups/../clusters",
        "/api/v1/usergroups/./../clusters",
        "/api/v1/usergroups/%2e%2e/clusters",
        "/api/v1/usergroups/%2E%2e/clusters",
        "/api/v1/usergroups/..%2fclusters",
        "/api/v1/usergroups%2F..%2Fclusters",
        "/api/v1/usergroups/..%5Cclusters",
        "/api/v1/usergroups/..\\clusters",
        "/api/v1/usergroups//..//clusters",
        "/api/v1/usergroups/x%00",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{auth}Connection: close\r\n\r\n");
        let response = raw_exchange(gw.proxy, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
        assert!(
            response.contains("invalid request path"),
            "{path}: {response}"
        );
    }
    assert_eq!(mock.state.count(), 0, "nothing reached the upstream");

    // An encoded unreserved character is decoded: one path for policy, cache and upstream.
    let encoded = as_reader(&gw, Method::GET, "/api/v1/%75sergroups", &[], "").await;
    assert_eq!(encoded.status, StatusCode::OK, "{}", encoded.text());
    assert_eq!(mock.state.last().uri.path(), "/api/v1/usergroups");
    let plain = as_reader(&gw, Method::GET, "/api/v1/usergroups", &[], "").await;
    assert_eq!(plain.status, StatusCode::OK);
    // ... and the cache keyed both on the same path (stored, then revalidated).
    assert!(plain.header("cache-status").unwrap().contains("fwd=stale"));
    // A disguised path to another collection is still another collection: 403.
    let other = as_reader(&gw, Method::GET, "/api/v1/%63lusters", &[], "").await;
    assert!(other.envelope_message(403).contains("/api/v1/clusters"));
    let records = gw.wait_audit(13).await;
    assert_eq!(records[10]["path"], "/api/v1/usergroups");
    assert_eq!(records[0]["error"], "invalid_path");
}

#[tokio::test]
async fn headers_that_select_a_representation_are_part_of_the_key() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    item(&mock, "g");
    let url = gw.url("/api/v1/usergroups");
    let xml = get(&url, &[("accept", "application/xml")]).await;
    assert!(xml.text().starts_with("<resource>"), "{}", xml.text());
    for accept in [Some("application/json"), None] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
        let json = get(&url, &headers).await;
        assert_eq!(json.json()["_items"][0]["name"], "g", "{accept:?}");
    }
    let xml_again = get(&url, &[("accept", "application/xml")]).await;
    assert!(xml_again.text().starts_with("<resource>"));
    assert!(xml_again.header("cache-status").unwrap().contains("hit"));
    // Two upstream fetches: one per representation (no Accept means application/json).
    assert_eq!(mock.state.count(), 2);
    let gzip = get(&url, &[("accept-encoding", "gzip")]).await;
    assert!(
        gzip.header("cache-status")
            .unwrap()
            .contains("fwd=uri-miss")
    );
    // Keyed on the bytes the upstream reads: Werkzeug reads `application/ xml` as two media
    // ranges, neither of them XML, and answers JSON, which must not be stored where XML
    // readers look (a hostile review poisoned the XML variant so).
    let spaced = get(&url, &[("accept", "application/ xml")]).await;
    assert_eq!(spaced.json()["_items"][0]["name"], "g");
    let xml_still = get(&url, &[("accept", "application/xml")]).await;
    assert!(
        xml_still.text().starts_with("<resource>"),
        "{}",
        xml_still.text()
    );
}

#[tokio::test]
async fn a_representation_survives_revalidation_for_its_own_clients_only() {
    // fresh_for = 0: every read revalidates, and the upstream's ETag is the same for XML and
    // JSON (as Eve's is), so a 304 must not confirm one client's representation for another.
    let (mock, _secret, gw) = setup("").await;
    let (id, _) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    get(&url, &[("accept", "application/xml")]).await;
    let json = get(&url, &[]).await;
    assert_eq!(json.json()["name"], "g");
    let xml = get(&url, &[("accept", "application/xml")]).await;
    assert!(xml.text().starts_with("<resource>"));
    assert!(
        xml.header("cache-status")
            .unwrap()
            .contains("fwd-status=304")
    );
}

#[tokio::test]
async fn range_travels_with_if_range_and_nothing_is_stored() {
    // Nothing stored: the partial request goes upstream as it came (a stored complete 200
    // answers ranges itself; see tests/cache.rs), and its answer is not stored.
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    let (id, _) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    let ranged = get(&url, &[("range", "bytes=0-1"), ("if-range", "\"v1\"")]).await;
    assert_eq!(
        ranged.header("cache-status"),
        Some("cloudcasa-gateway; fwd=request")
    );
    let seen = mock.state.last();
    assert_eq!(seen.header("range"), Some("bytes=0-1"));
    assert_eq!(seen.header("if-range"), Some("\"v1\""));
    assert_eq!(mock.state.count(), 1);
    let next = get(&url, &[]).await;
    assert_eq!(
        next.header("cache-status"),
        Some("cloudcasa-gateway; fwd=uri-miss; stored")
    );
}

#[tokio::test]
async fn extreme_numbers_from_clients_and_upstreams_do_not_panic() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"\nstale_if_error = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    get(&url, &[]).await;
    for cc in [
        "min-fresh=18446744073709551615",
        "max-age=18446744073709551615",
        "max-stale=18446744073709551615",
        "min-fresh=99999999999999999999999",
    ] {
        let reply = get(&url, &[("cache-control", cc)]).await;
        assert!(reply.status.is_success(), "{cc}: {}", reply.text());
    }
    mock.state.route("/api/v1/huge", |_| {
        http::Response::builder()
            .header("content-type", "application/json")
            .header("age", "18446744073709551615")
            .header(
                "cache-control",
                "max-age=18446744073709551615, stale-if-error=18446744073709551615",
            )
            .header("date", "Fri, 31 Dec 9999 23:59:59 GMT")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    let huge = gw.url("/api/v1/huge");
    for _ in 0..2 {
        let reply = get(&huge, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    mock.state
        .set_fault(Fault::Status(StatusCode::BAD_GATEWAY), None);
    let reply = get(&huge, &[("cache-control", "no-cache")]).await;
    assert_ne!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn an_http10_upstream_is_answered_as_http11_with_whole_bodies_and_local_locations() {
    let (mock, _secret, gw) = setup("").await;
    mock.state.set_http10(true);
    // A chunked body reaches the upstream with a Content-Length.
    let request = "POST /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
                   Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                   5\r\n{\"nam\r\n8\r\ne\":\"ch\"}\r\n0\r\n\r\n";
    let response = raw_exchange(gw.proxy, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let seen = mock.state.last();
    assert_eq!(seen.header("content-length"), Some("13"));
    assert!(seen.header("transfer-encoding").is_none());
    assert_eq!(seen.body, Bytes::from_static(br#"{"name":"ch"}"#));
    // The Location named the upstream's host; the client gets a path on the gateway.
    let location = response
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap_or_else(|| panic!("no location: {response}"));
    assert!(location.starts_with("/api/v1/usergroups/"), "{location}");
    let followed = get(&gw.url(location), &[]).await;
    assert_eq!(followed.json()["name"], "ch");
    assert_eq!(followed.status, StatusCode::OK);
    // Keep-alive works against an HTTP/1.0 upstream: two requests on one connection.
    let two = "GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\r\n\
               GET /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let both = raw_exchange(gw.proxy, two.as_bytes()).await;
    assert_eq!(both.matches("HTTP/1.1 200").count(), 2, "{both}");
    assert!(!both.contains("HTTP/1.0"), "{both}");
}

#[tokio::test]
async fn a_broken_request_body_is_the_clients_fault() {
    let (mock, _secret, gw) = setup("").await;
    let request = "POST /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\
                   Connection: close\r\n\r\nzz\r\nnot a chunk\r\n";
    let response = raw_exchange(gw.proxy, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("request body"), "{response}");
    assert_eq!(mock.state.count(), 0);
    let records = gw.wait_audit(1).await;
    assert_eq!(records[0]["error"], "bad_request_body");
}

#[tokio::test]
async fn underscored_override_headers_are_dropped_before_anything_decides() {
    // Werkzeug reads X_HTTP_METHOD_OVERRIDE as X-HTTP-Method-Override: the reader must not be
    // able to delete or patch through it, and nothing it sends may poison the cache.
    let (mock, _secret, gw, _dir) = reader_gateway("[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "kept");
    let (name, value) = reader();
    let auth = format!("{name}: {value}\r\n");
    for (header, target) in [
        ("X_HTTP_METHOD_OVERRIDE: DELETE", "/api/v1/usergroups"),
        ("X-HTTP_Method-Override: delete", "/api/v1/usergroups"),
        ("X_HTTP_METHOD_OVERRIDE: OPTIONS", "/api/v1/usergroups"),
    ] {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: gw\r\n{auth}{header}\r\nIf_Match: \"{etag}\"\r\n\
             Connection: close\r\n\r\n"
        );
        let response = raw_exchange(gw.proxy, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{header}: {response}");
        assert!(
            response.contains("\"name\":\"kept\""),
            "{header}: {response}"
        );
        let seen = mock.state.last();
        assert_eq!(seen.method, Method::GET);
        assert!(
            seen.headers.keys().all(|k| !k.as_str().contains('_')),
            "{:?}",
            seen.headers
        );
    }
    let still = as_reader(
        &gw,
        Method::GET,
        &format!("/api/v1/usergroups/{id}"),
        &[],
        "",
    )
    .await;
    assert_eq!(still.json()["name"], "kept");
}

#[tokio::test]
async fn the_key_is_what_the_upstream_sees() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    item(&mock, "g");
    let url = gw.url("/api/v1/usergroups");
    // `Connection: accept` strips Accept before the cache keys on it: this is a JSON request.
    let named = get(
        &url,
        &[("accept", "application/xml"), ("connection", "accept")],
    )
    .await;
    assert_eq!(named.json()["_items"][0]["name"], "g");
    assert_eq!(mock.state.last().header("accept"), Some("application/json"));
    let xml = get(&url, &[("accept", "application/xml")]).await;
    assert!(xml.text().starts_with("<resource>"), "{}", xml.text());
    // Two Accept lines reach the upstream as one, so it renders what the key says.
    let two = send(
        Method::GET,
        &url,
        &[
            ("accept", "application/json"),
            ("accept", "application/xml"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        mock.state.last().header("accept"),
        Some("application/json, application/xml")
    );
    let one = get(&url, &[("accept", "application/json, application/xml")]).await;
    assert_eq!(one.text(), two.text());
    assert!(one.header("cache-status").unwrap().contains("hit"));
}

#[tokio::test]
async fn a_write_invalidates_every_alias_of_its_collection() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "alpha");
    let reads = [
        format!("/api/v1/usergroups/{id}"),
        format!("/api/v1/usergroups/{id}/"),
        "/api/v1/usergroups/alpha".to_string(),
        "/api/v1/usergroups/alpha/".to_string(),
        "/api/v1/usergroups".to_string(),
        "/api/v1/usergroups/".to_string(),
    ];
    for path in &reads {
        get(&gw.url(path), &[]).await;
        let hit = get(&gw.url(path), &[]).await;
        assert!(
            hit.header("cache-status").unwrap().contains("hit"),
            "{path}"
        );
    }
    let patched = send(
        Method::PATCH,
        &gw.url(&format!("/api/v1/usergroups/{id}/")),
        &[("if-match", &format!("\"{etag}\""))],
        r#"{"users":["new"]}"#,
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    for path in &reads {
        let after = get(&gw.url(path), &[]).await;
        assert!(
            after
                .header("cache-status")
                .unwrap()
                .contains("fwd=uri-miss"),
            "{path}: {:?}",
            after.header("cache-status")
        );
        assert!(after.text().contains("new"), "{path}: {}", after.text());
    }
    // Other collections keep what they stored.
    mock.state.seed("a", "clusters", json!({"name": "c"}));
    get(&gw.url("/api/v1/clusters"), &[]).await;
    send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"beta"}"#,
    )
    .await;
    let other = get(&gw.url("/api/v1/clusters"), &[]).await;
    assert!(other.header("cache-status").unwrap().contains("hit"));
}

#[tokio::test]
async fn an_escaped_spelling_cannot_reach_a_broader_rule() {
    // A rate-limited rule for one action, then a broad rule: `run%3Anow` is `run:now` to the
    // upstream, so it must be `run:now` to the policy too, and share its budget.
    let (mock, _secret, gw) = setup(
        "[[policy]]\nname = \"run-now\"\nclients = [\"local\"]\npaths = [\"/api/v1/jobs/run:now\"]\n\
         credential = \"default\"\nrate = \"1/m\"\n\
         [[policy]]\nname = \"rest\"\nclients = [\"local\"]\ncredential = \"default\"\n",
    )
    .await;
    assert_ne!(
        get(&gw.url("/api/v1/jobs/run:now"), &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    for spelling in [
        "/api/v1/jobs/run%3Anow",
        "/api/v1/jobs/run%3anow",
        "/api/v1/jobs/%72un:now",
    ] {
        let reply = get(&gw.url(spelling), &[]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{spelling}");
    }
    assert_eq!(mock.state.count(), 1);
    let records = gw.wait_audit(4).await;
    assert!(
        records.iter().all(|r| r["path"] == "/api/v1/jobs/run:now"),
        "{records:?}"
    );
    assert_eq!(records[0]["rule"], "run-now");
    assert!(records[1..].iter().all(|r| r["error"] == "rate_limited"));
}

#[tokio::test]
async fn a_trailing_slash_is_judged_as_the_path_eve_routes() {
    // Eve answers `/api/v1/usergroups/` as the collection: a rule for items must not let a
    // client DELETE or POST the collection by adding a slash, and a rate-limited rule for one
    // action must not be side-stepped into a broader rule by one either.
    let (mock, _secret, gw, _dir) = reader_gateway(
        "[[policy]]\nname = \"items\"\nclients = [\"apikey:reader\"]\n\
         methods = [\"DELETE\", \"POST\"]\npaths = [\"/api/v1/usergroups/*\"]\n\
         credential = \"default\"\n\
         [[policy]]\nname = \"run-now\"\nclients = [\"apikey:reader\"]\n\
         paths = [\"/api/v1/jobs/run:now\"]\ncredential = \"default\"\nrate = \"1/m\"\n\
         [[policy]]\nname = \"jobs\"\nclients = [\"apikey:reader\"]\n\
         paths = [\"/api/v1/jobs/**\"]\ncredential = \"default\"\n",
    )
    .await;
    let (id, etag) = item(&mock, "a");
    item(&mock, "b");
    for method in [Method::DELETE, Method::POST] {
        let reply = as_reader(&gw, method.clone(), "/api/v1/usergroups/", &[], "{}").await;
        let message = reply.envelope_message(403);
        assert!(
            message.contains(&format!("may not {method} /api/v1/usergroups/")),
            "{message}"
        );
    }
    assert_eq!(mock.state.count(), 0, "nothing reached the upstream");
    // The item with a trailing slash is still the item, which the rule allows.
    let if_match = format!("\"{etag}\"");
    let reply = as_reader(
        &gw,
        Method::DELETE,
        &format!("/api/v1/usergroups/{id}/"),
        &[("if-match", &if_match)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(mock.state.count(), 1);
    // One action's budget, spent: its spelling with a slash is the same action.
    assert_ne!(
        as_reader(&gw, Method::POST, "/api/v1/jobs/run:now", &[], "{}")
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let reply = as_reader(&gw, Method::POST, "/api/v1/jobs/run:now/", &[], "{}").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mock.state.count(), 2);
}

#[tokio::test]
async fn location_and_content_location_at_the_upstream_become_gateway_paths() {
    let (mock, _secret, gw) = setup("").await;
    let created = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[("content-type", "application/json")],
        r#"{"name":"placed"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    // The mock answered with absolute URLs naming its own host (as Eve does).
    let upstream_host = mock.addr.to_string();
    for name in ["location", "content-location"] {
        let value = created
            .header(name)
            .unwrap_or_else(|| panic!("no {name}: {:?}", created.headers));
        assert!(
            value.starts_with("/api/v1/usergroups/") && !value.contains(&upstream_host),
            "{name}: {value}"
        );
    }
    assert_eq!(
        created.header("location"),
        created.header("content-location")
    );
    let followed = get(&gw.url(created.header("content-location").unwrap()), &[]).await;
    assert_eq!(followed.json()["name"], "placed");
}

#[tokio::test]
async fn only_127_0_0_1_may_purge_the_cache_not_a_mesh_sidecar_on_127_0_0_6() {
    let (_mock, _secret, gw) = setup("").await;
    let purge = b"DELETE /cache HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    // Istio's inbound sidecar forwards pod-network traffic from 127.0.0.6.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(gw.admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(purge).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the admin listener answers")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("127.0.0.1 and ::1 only"), "{answer}");
    let local = raw_exchange(gw.admin, purge).await;
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
}

#[tokio::test]
async fn rate_limits_count_the_effective_method() {
    // PATCH is limited to one an hour; POST is not limited. A POST that overrides to PATCH is a
    // PATCH for the limiter too.
    let (mock, _secret, gw) = setup(
        r#"
[[policy]]
name = "patch-hourly"
clients = ["local"]
methods = ["PATCH"]
paths = ["/api/v1/usergroups/**"]
credential = "default"
rate = "1/h"

[[policy]]
name = "create"
clients = ["local"]
methods = ["POST", "GET"]
paths = ["/api/v1/usergroups", "/api/v1/usergroups/**"]
credential = "default"
"#,
    )
    .await;
    let (id, etag) = item(&mock, "limited");
    let path = format!("/api/v1/usergroups/{id}");
    let patch_by_post = |if_match: String| {
        let url = gw.url(&path);
        async move {
            send(
                Method::POST,
                &url,
                &[
                    ("x-http-method-override", "PATCH"),
                    ("if-match", &if_match),
                    ("content-type", "application/json"),
                ],
                r#"{"name":"x"}"#,
            )
            .await
        }
    };
    let first = patch_by_post(format!("\"{etag}\"")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let second = patch_by_post(format!("\"{etag}\"")).await;
    second.envelope_message(429);
    assert!(second.header("retry-after").is_some());
    let patches = mock
        .state
        .requests()
        .iter()
        .filter(|r| r.method == Method::PATCH)
        .count();
    assert_eq!(patches, 1, "the limited PATCH never reached the upstream");
    // A plain POST is judged as a POST, under the other rule.
    let created = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[("content-type", "application/json")],
        r#"{"name":"new"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let records = gw.wait_audit(3).await;
    assert_eq!(records[1]["method"], "PATCH");
    assert_eq!(records[1]["wire_method"], "POST");
    assert_eq!(records[1]["status"], 429);
}

#[tokio::test]
async fn a_raw_quote_in_the_query_is_refused_before_the_gateway_and_an_encoded_one_passes() {
    // The limitation the README documents: the `http` crate's URI parser refuses a raw `"` in
    // the query, so hyper answers 400 itself; percent-encoded, the same query reaches Eve.
    let (mock, _secret, gw) = setup("").await;
    let raw = "GET /api/v1/usergroups?where={\"name\":\"x\"} HTTP/1.1\r\nHost: gw\r\n\
               Connection: close\r\n\r\n";
    let refused = raw_exchange(gw.proxy, raw.as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert_eq!(mock.state.count(), 0);
    let encoded = get(
        &gw.url("/api/v1/usergroups?where=%7B%22name%22:%22x%22%7D"),
        &[],
    )
    .await;
    assert_eq!(encoded.status, StatusCode::OK, "{}", encoded.text());
    assert_eq!(
        mock.state.last().uri.query(),
        Some("where=%7B%22name%22:%22x%22%7D")
    );
}

#[tokio::test]
async fn a_large_chunked_body_to_an_http10_upstream_is_sent_with_its_length() {
    // Past 1 MiB a chunked body streams, unless the upstream is known to speak HTTP/1.0 (which
    // would read none of it): then it is read whole, up to server.max_body_size, and sent with
    // a Content-Length.
    let (mock, _secret, gw) = setup("").await;
    mock.state.set_http10(true);
    assert_eq!(
        get(&gw.url("/api/v1/usergroups"), &[]).await.status,
        StatusCode::OK
    );
    let name = "n".repeat(2 * 1024 * 1024);
    let body = format!(r#"{{"name":"{name}"}}"#);
    let mut request = b"POST /api/v1/usergroups HTTP/1.1\r\nHost: gw\r\n\
Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for chunk in body.as_bytes().chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    raw_exchange(gw.proxy, &request).await;
    // (The mock keeps the first 64 KiB of a body, so it cannot parse this document and answers
    // 400; what matters is what it received.)
    let seen = mock.state.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(seen.header("transfer-encoding").is_none());
    assert_eq!(seen.body_len, body.len() as u64);
}
