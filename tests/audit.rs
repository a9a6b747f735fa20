//! The audit trail end to end: every field of the record for each kind of exchange, the hash chain
//! and `audit verify`, restarts, fail-closed writes, and a client that goes away.

mod support;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cloudcasa-gateway");

/// Every member a record has, in order. Nothing else may appear (no header, no body, no token).
const MEMBERS: [&str; 28] = [
    "ts",
    "phase",
    "request_id",
    "trace_id",
    "span_id",
    "client",
    "rule",
    "credential",
    "method",
    "wire_method",
    "path",
    "query",
    "resource",
    "status",
    "upstream_status",
    "cache",
    "if_match",
    "etag",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "error",
    "complete",
    "replica",
    "chain",
    "prev",
    "hash",
];

fn is_hex(v: &Value, len: usize) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The members every record has, checked the same way for all.
fn check_shape(r: &Value, reply: &Reply) {
    let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = MEMBERS.to_vec();
    expected.sort_unstable();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "{r}");
    let ts = r["ts"].as_str().unwrap();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(),
        "ts {ts}"
    );
    assert_eq!(r["phase"], "outcome");
    assert_eq!(
        r["request_id"].as_str(),
        reply.header("x-request-id"),
        "{r}"
    );
    assert!(is_hex(&r["trace_id"], 32), "{r}");
    // The replica is this host's name (no [fleet]: POD_NAME, else the hostname).
    assert!(r["replica"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
    assert!(is_hex(&r["chain"], 16), "{r}");
    assert!(is_hex(&r["span_id"], 16), "{r}");
    assert!(is_hex(&r["prev"], 64) && is_hex(&r["hash"], 64), "{r}");
    assert_eq!(r["client"]["id"], "local");
    assert_eq!(r["client"]["auth"], "local");
    assert_eq!(r["rule"], "default", "{r}");
    assert_eq!(r["credential"], "default", "{r}");
    let addr = r["client"]["addr"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(r["status"], reply.status.as_u16());
    assert_eq!(r["bytes_out"], reply.body.len() as u64, "{r}");
    assert_eq!(r["complete"], true);
    let duration = r["duration_ms"].as_f64().unwrap();
    if let Some(upstream) = r["upstream_ms"].as_f64() {
        assert!(upstream > 0.0 && upstream <= duration, "{r}");
    }
    let etag = reply
        .header("etag")
        .map(|e| e.trim_matches('"').to_string());
    assert_eq!(r["etag"].as_str().map(str::to_string), etag, "{r}");
}

/// Checks the members that say what happened.
#[allow(clippy::too_many_arguments)]
fn check_outcome(
    r: &Value,
    reply: &Reply,
    method: &str,
    path: &str,
    resource: Value,
    upstream_status: Value,
    cache: &str,
    if_match: Value,
    bytes_in: u64,
    error: Value,
) {
    check_shape(r, reply);
    assert_eq!(r["method"], method, "{r}");
    assert_eq!(r["path"], path, "{r}");
    assert_eq!(r["resource"], resource, "{r}");
    assert_eq!(r["upstream_status"], upstream_status, "{r}");
    assert_eq!(r["cache"], cache, "{r}");
    assert_eq!(r["if_match"], if_match, "{r}");
    assert_eq!(r["bytes_in"], bytes_in, "{r}");
    assert_eq!(r["error"], error, "{r}");
    assert_eq!(r["upstream_ms"].is_null(), upstream_status.is_null(), "{r}");
}

#[tokio::test]
async fn every_field_for_each_kind_of_exchange() {
    let (mock, _secret, gw) = setup("[server]\nmax_body_size = \"1KiB\"").await;
    let (id, etag) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    let resource = json!({"collection": "usergroups", "id": id});
    let client_credential = "Bearer client-held-secret";

    // 1. A GET that misses, with a query and the client's own credential (stripped, unrecorded).
    let query_url = gw.url(&format!("{path}?projection=%7B%22name%22%3A1%7D"));
    let miss = get(&query_url, &[("authorization", client_credential)]).await;
    assert_eq!(miss.status, StatusCode::OK);
    // 2. The same item again: stale at once (no freshness), revalidated with a 304.
    let revalidated = get(&query_url, &[]).await;
    assert_eq!(
        revalidated
            .header("cache-status")
            .map(|s| s.contains("fwd=stale")),
        Some(true)
    );
    // 3. A PATCH with the right If-Match.
    let patch_body = r#"{"name":"ops-renamed"}"#;
    let if_match = format!("\"{etag}\"");
    let patched = send(
        Method::PATCH,
        &gw.url(&path),
        &[("if-match", &if_match)],
        patch_body,
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    // 4. The same PATCH again: its If-Match is stale now.
    let stale = send(
        Method::PATCH,
        &gw.url(&path),
        &[("if-match", &if_match)],
        patch_body,
    )
    .await;
    stale.envelope_message(412);
    // 5. A request the gateway refuses itself: body over server.max_body_size.
    let big = "x".repeat(2048);
    let refused = send(Method::POST, &gw.url("/api/v1/usergroups"), &[], big).await;
    refused.envelope_message(413);
    // 6. The upstream drops the connection: a gateway-made 502.
    mock.state.set_fault(Fault::Reset, None);
    let failed = get(&gw.url("/api/v1/clusters"), &[]).await;
    failed.envelope_message(502);
    mock.state.clear_fault();

    let records = gw.wait_audit(6).await;
    assert_eq!(records.len(), 6, "{records:#?}");
    let r = &records[0];
    check_outcome(
        r,
        &miss,
        "GET",
        &path,
        resource.clone(),
        json!(200),
        "miss",
        Value::Null,
        0,
        Value::Null,
    );
    assert_eq!(r["query"], "projection=%7B%22name%22%3A1%7D");
    check_outcome(
        &records[1],
        &revalidated,
        "GET",
        &path,
        resource.clone(),
        json!(304),
        "revalidated",
        Value::Null,
        0,
        Value::Null,
    );
    assert_eq!(records[1]["query"], r["query"]);
    check_outcome(
        &records[2],
        &patched,
        "PATCH",
        &path,
        resource.clone(),
        json!(200),
        "bypass",
        json!(if_match),
        patch_body.len() as u64,
        Value::Null,
    );
    assert_ne!(
        records[2]["etag"].as_str(),
        Some(etag.as_str()),
        "the new ETag"
    );
    check_outcome(
        &records[3],
        &stale,
        "PATCH",
        &path,
        resource,
        json!(412),
        "bypass",
        json!(if_match),
        patch_body.len() as u64,
        Value::Null,
    );
    check_outcome(
        &records[4],
        &refused,
        "POST",
        "/api/v1/usergroups",
        json!({"collection": "usergroups", "id": null}),
        Value::Null,
        "bypass",
        Value::Null,
        0,
        json!("payload_too_large"),
    );
    check_outcome(
        &records[5],
        &failed,
        "GET",
        "/api/v1/clusters",
        json!({"collection": "clusters", "id": null}),
        Value::Null,
        "miss",
        Value::Null,
        0,
        json!("upstream_unreachable"),
    );
    // Distinct requests, distinct ids; a trace per request (no traceparent was sent).
    let ids: std::collections::HashSet<_> = records.iter().map(|r| r["trace_id"].clone()).collect();
    assert_eq!(ids.len(), 6);

    let text = std::fs::read_to_string(gw.audit.as_ref().unwrap()).unwrap();
    for secret in ["token-a", "client-held-secret", "Bearer", "authorization"] {
        assert!(
            !text.to_lowercase().contains(&secret.to_lowercase()),
            "{secret} in the audit trail"
        );
    }
    let verified = verify(&[gw.audit.as_ref().unwrap()]);
    assert!(verified.0, "{}", verified.1);
    assert!(verified.1.contains("OK: 6 records"), "{}", verified.1);
}

fn verify(files: &[&Path]) -> (bool, String) {
    let (code, out) = verify_anchored(files, &[]);
    (code == Some(0), out)
}

/// `audit verify --head …` on `files`: its exit code and output.
fn verify_anchored(files: &[&Path], heads: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify"])
        .args(heads.iter().flat_map(|h| ["--head", h]))
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Writes `lines` to a file in `dir` and runs `audit verify` on it.
fn verify_lines(dir: &Path, name: &str, lines: &[&str]) -> (bool, String) {
    let path = write_file(dir, name, &(lines.join("\n") + "\n"));
    verify(&[&path])
}

#[tokio::test]
async fn the_chain_survives_restarts_and_verify_finds_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!("[audit]\npath = \"{}\"", audit.display());
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    for run in 0..2 {
        let mut gw = TestGateway::for_mock(&mock, &secret, &extra).await;
        for _ in 0..2 {
            assert_eq!(
                get(&gw.url("/api/v1/clusters"), &[]).await.status,
                StatusCode::OK
            );
        }
        // Shutdown flushes the trail.
        gw.begin_shutdown().await.unwrap();
        assert_eq!(read_records(&audit).len(), 2 * (run + 1));
    }
    let records = read_records(&audit);
    assert_eq!(
        records[2]["prev"], records[1]["hash"],
        "the second run continues the chain"
    );
    let (ok, out) = verify(&[&audit]);
    assert!(
        ok && out.contains("OK: 4 records") && out.contains("starts here"),
        "{out}"
    );

    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let edited = lines[1].replace("\"status\":200", "\"status\":204");
    assert_ne!(edited, lines[1]);
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "edited",
            vec![lines[0], &edited, lines[2], lines[3]],
            "line 2: hash does not match",
        ),
        (
            "deleted",
            vec![lines[0], lines[2], lines[3]],
            "line 2: prev is",
        ),
        (
            "reordered",
            vec![lines[0], lines[2], lines[1], lines[3]],
            "line 2: prev is",
        ),
    ];
    for (name, lines, expected) in cases {
        let (ok, out) = verify_lines(dir.path(), name, &lines);
        assert!(!ok, "{name} passed: {out}");
        assert!(out.contains(expected), "{name}: {out}");
    }
    // Rotated files verify as one chain, oldest first; the second alone is anchored, not broken.
    let old = write_file(dir.path(), "audit.1", &(lines[..2].join("\n") + "\n"));
    let new = write_file(dir.path(), "audit.2", &(lines[2..].join("\n") + "\n"));
    let (ok, out) = verify(&[&old, &new]);
    assert!(ok && out.contains("OK: 4 records"), "{out}");
    let (ok, out) = verify(&[&new]);
    assert!(ok && out.contains("continues a chain"), "{out}");
    let (ok, out) = verify(&[&new, &old]);
    assert!(!ok && out.contains("audit.1 line 1: prev is"), "{out}");

    // A line cut off by a crash: reported (exit 3), and the chain is checked across it.
    let torn = &lines[3][..40];
    let path = write_file(
        dir.path(),
        "torn",
        &([lines[0], lines[1], torn, lines[2], lines[3]].join("\n") + "\n"),
    );
    let (code, out) = verify_anchored(&[&path], &[]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("OK: 4 records") && out.contains("TORN: ") && out.contains("torn line 3"),
        "{out}"
    );
    // A head logged at shutdown, kept elsewhere, must be in the files, and every chain must
    // start from the beginning or from a head given: cutting the chain short before the head,
    // or removing records before it, is then found.
    let last = records[3]["hash"].as_str().unwrap();
    let (code, out) = verify_anchored(&[&audit], &[last]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_anchored(&[&old], &[last]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("no record has the head {last}")),
        "{out}"
    );
    let (code, out) = verify_anchored(&[&new], &[last]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("continues from a record that is not in these files"),
        "{out}"
    );
    // The newer file alone, with the head logged when the older one was rotated.
    let rotated = records[1]["hash"].as_str().unwrap();
    let (code, out) = verify_anchored(&[&new], &[rotated, last]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify_anchored(&[&audit], &["not-a-hash"]);
    assert_eq!(code, Some(2), "{out}");
}

async fn metric(gw: &TestGateway, line_start: &str) -> Option<f64> {
    let text = get(&gw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn fail_closed_refuses_writes_it_cannot_record_but_never_blocks_reads() {
    let (mock, _secret, gw) = setup("[audit]\npath = \"/dev/full\"\nfail_closed = true").await;
    let (id, etag) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    let if_match = format!("\"{etag}\"");
    for method in [Method::PATCH, Method::DELETE] {
        let reply = send(
            method,
            &gw.url(&path),
            &[("if-match", &if_match)],
            r#"{"name":"x"}"#,
        )
        .await;
        let message = reply.envelope_message(503);
        assert!(message.contains("audit"), "{message}");
    }
    let post = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"y"}"#,
    )
    .await;
    post.envelope_message(503);
    assert_eq!(mock.state.count(), 0, "nothing reached the upstream");

    // Reads go on, their records lost and counted.
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    assert_eq!(mock.state.count(), 1);
    let failed = "cloudcasa_gateway_audit_records_failed_total{reason=\"write\"}";
    // 3 intents, 3 outcomes of refused writes, 1 outcome of the read.
    eventually(
        std::time::Duration::from_secs(10),
        "7 failed records",
        || async { metric(&gw, failed).await == Some(7.0) },
    )
    .await;
}

fn phases_and_methods(
    records: &[serde_json::Value],
) -> Vec<(serde_json::Value, serde_json::Value)> {
    records
        .iter()
        .map(|r| (r["phase"].clone(), r["method"].clone()))
        .collect()
}

#[tokio::test]
async fn fail_closed_writes_the_intent_before_forwarding() {
    let (mock, _secret, gw) = setup("[audit]\nfail_closed = true").await;
    // The test gateway keeps its own file; fail_closed applies to it.
    let (id, etag) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(
        rename(&gw.url(&path), &etag, "x").await.status,
        StatusCode::OK
    );
    let get_reply = get(&gw.url(&path), &[]).await;
    assert_eq!(get_reply.status, StatusCode::OK);
    let records = gw.wait_audit(3).await;
    let phases = phases_and_methods(&records);
    assert_eq!(
        phases,
        [
            (json!("intent"), json!("PATCH")),
            (json!("outcome"), json!("PATCH")),
            (json!("outcome"), json!("GET")),
        ],
        "reads have no intent record"
    );
    let (intent, outcome) = (&records[0], &records[1]);
    assert_eq!(intent["request_id"], outcome["request_id"]);
    assert_eq!(intent["trace_id"], outcome["trace_id"]);
    // The pair's key: the span id is the gateway's own (a client can send two writes with one
    // request id and trace id).
    assert_eq!(intent["span_id"], outcome["span_id"]);
    assert_eq!(intent["if_match"], format!("\"{etag}\""));
    for member in [
        "status",
        "upstream_status",
        "cache",
        "etag",
        "bytes_out",
        "duration_ms",
        "complete",
    ] {
        assert!(intent[member].is_null(), "intent {member}: {intent}");
    }
    assert_eq!(outcome["status"], 200);
}

#[tokio::test]
async fn a_removed_audit_file_is_created_again_before_anything_counts_as_written() {
    let (mock, _secret, gw) = setup("[audit]\nfail_closed = true").await;
    let audit = gw.audit.clone().unwrap();
    let (id, etag) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    gw.wait_audit(1).await;
    // Removed by hand (or compressed away by a rotation before the reopen): the open file
    // would take every later record, and a write's intent, into an inode nobody can read.
    std::fs::remove_file(&audit).unwrap();
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    assert_eq!(
        rename(&gw.url(&path), &etag, "x").await.status,
        StatusCode::OK
    );
    let records = gw.wait_audit(3).await;
    let phases = phases_and_methods(&records);
    assert_eq!(
        phases,
        [
            (json!("outcome"), json!("GET")),
            (json!("intent"), json!("PATCH")),
            (json!("outcome"), json!("PATCH")),
        ],
        "the new file holds what came after the removal"
    );
}

#[tokio::test]
async fn a_response_the_upstream_breaks_off_is_not_blamed_on_the_client() {
    // Headers for 1,000 bytes, ten of them, then the connection closed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = vec![0u8; 4096];
            let _ = conn.read(&mut head).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                .await;
        }
    });
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"http://{upstream}\"\n[token]\nfile = \"{}\"\n[cache]\nenabled = false\n",
        secret.token_path().display()
    ))
    .await;
    let reply = raw_exchange(
        gw.proxy,
        b"GET /api/v1/usergroups HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "the headers went out first: {reply}"
    );
    assert!(reply.ends_with("0123456789"), "{reply}");
    let records = gw.wait_audit(1).await;
    let record = &records[0];
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["complete"], false, "{record}");
    assert_eq!(record["error"], "upstream_body", "{record}");
    assert_eq!(record["bytes_out"], 10, "{record}");
    let metrics = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("cloudcasa_gateway_gateway_errors_total{kind=\"upstream_body\"} 1"),
        "{metrics}"
    );
    server.abort();
}

#[tokio::test]
async fn a_client_that_goes_away_is_recorded() {
    let (mock, _secret, gw) = setup("[cache]\nmax_object_size = \"1MiB\"").await;
    let big = Bytes::from(vec![b'x'; 32 * 1024 * 1024]);
    mock.state.route("/api/v1/big", move |_| {
        http::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(big.clone())
            .unwrap()
    });
    let response = client()
        .get(gw.url("/api/v1/big").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    drop(response);
    let records = gw.wait_audit(1).await;
    let r = &records[0];
    assert_eq!(r["request_id"], request_id);
    assert_eq!(r["status"], 200);
    assert_eq!(r["upstream_status"], 200);
    assert_eq!(r["complete"], false, "{r}");
    assert_eq!(r["error"], "client_closed", "{r}");
    assert!(r["bytes_out"].as_u64().unwrap() < 32 * 1024 * 1024, "{r}");
}

#[tokio::test]
async fn a_request_cut_off_at_the_drain_timeout_is_recorded_before_the_last_flush() {
    cut_off_at_the_drain_timeout(false).await;
}

#[tokio::test]
async fn an_http2_stream_cut_off_at_the_drain_timeout_is_recorded_before_the_last_flush() {
    // HTTP/2 streams are tasks of their own, apart from their connection's.
    cut_off_at_the_drain_timeout(true).await;
}

async fn cut_off_at_the_drain_timeout(http2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let mut gw = TestGateway::for_mock(
        &mock,
        &secret,
        &format!(
            "[server]\ndrain_timeout = \"200ms\"\n[audit]\npath = \"{}\"",
            audit.display()
        ),
    )
    .await;
    // The upstream never answers while the gateway drains.
    let release = mock.state.hold_next(None);
    let url = gw.url("/api/v1/clusters");
    let request_id = "cut-off-at-the-drain-timeout";
    let in_flight = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(http2)
                .build_http::<http_body_util::Full<Bytes>>();
        let request = http::Request::get(url)
            .header("x-request-id", request_id)
            .body(Default::default())
            .unwrap();
        let _ = client.request(request).await;
    });
    mock.state.wait_for(1).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), gw.begin_shutdown())
        .await
        .expect("the gateway stops after its drain timeout")
        .unwrap();
    // Stopped: the trail was flushed last, so the cut-off request is in it.
    let records = read_records(&audit);
    let record = records
        .iter()
        .find(|r| r["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no record of the cut-off request: {records:?}"));
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["complete"], false, "{record}");
    release.notify_one();
    in_flight.abort();
}
