//! Traces and metrics end to end: W3C trace context continued and propagated, spans exported
//! over OTLP/HTTP and decoded by a receiver in the test, and `/metrics` after known traffic.

mod support;

use std::collections::HashMap;

use http::{Method, StatusCode};
use support::otlp::OtlpReceiver;
use support::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{PARENT_ID}-01")
}

#[tokio::test]
async fn trace_context_is_continued_and_propagated() {
    let (mock, _secret, gw) = setup("").await;
    let reply = get(
        &gw.url("/api/v1/clusters"),
        &[
            ("traceparent", &traceparent()),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let sent = mock.state.last();
    let upstream = sent
        .header("traceparent")
        .expect("traceparent sent upstream");
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream}");
    assert_eq!(parts[1], TRACE_ID, "same trace");
    assert_ne!(
        parts[2], PARENT_ID,
        "a span of the gateway's own is the parent"
    );
    assert_eq!(parts[3], "01");
    assert_eq!(sent.header("tracestate"), Some("vendor=abc"));

    let record = &gw.wait_audit(1).await[0];
    assert_eq!(record["trace_id"], TRACE_ID);
    assert_ne!(record["span_id"], PARENT_ID);
    assert_ne!(
        record["span_id"], parts[2],
        "the record names the server span"
    );

    // Without a traceparent the gateway starts a trace and still propagates it.
    get(&gw.url("/api/v1/clusters"), &[]).await;
    let fresh = mock.state.last();
    let fresh = fresh.header("traceparent").unwrap();
    assert!(!fresh.contains(TRACE_ID), "{fresh}");
    let record = &gw.wait_audit(2).await[1];
    assert_eq!(
        Some(record["trace_id"].as_str().unwrap()),
        fresh.split('-').nth(1)
    );
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http() {
    let receiver = OtlpReceiver::start().await;
    let (mock, _secret, mut gw) = setup(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"",
        receiver.endpoint()
    ))
    .await;
    let (id, _) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    let reply = get(
        &gw.url(&path),
        &[
            ("traceparent", &traceparent()),
            ("user-agent", "velero/1.0"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let upstream_parent = mock.state.last().header("traceparent").unwrap().to_string();
    // Shutdown flushes the batch.
    gw.begin_shutdown().await.unwrap();

    let spans = receiver.spans();
    let everything = format!("{spans:?}");
    assert!(!everything.contains("token-a") && !everything.to_lowercase().contains("bearer"));
    assert!(
        receiver.rejected.lock().unwrap().is_empty(),
        "{:?}",
        receiver.rejected
    );
    let trace_id = hex(&spans[0].span.trace_id);
    let server = spans
        .iter()
        .find(|s| s.span.kind == 2)
        .unwrap_or_else(|| panic!("no server span in {spans:#?}"));
    let client = spans
        .iter()
        .find(|s| s.span.kind == 3)
        .unwrap_or_else(|| panic!("no client span in {spans:#?}"));
    assert_eq!(trace_id, TRACE_ID);
    for s in [server, client] {
        assert_eq!(hex(&s.span.trace_id), TRACE_ID);
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            assert_eq!(s.service_name.as_deref(), Some("cloudcasa-gateway"));
        }
    }
    assert_eq!(hex(&server.span.parent_span_id), PARENT_ID);
    assert_eq!(server.span.name, "GET /api/v1/{collection}/{id}");
    let expect = |s: &support::otlp::Received, key: &str, value: &str| {
        assert_eq!(
            s.attr(key).as_deref(),
            Some(value),
            "{key} in {:#?}",
            s.span.attributes
        );
    };
    expect(server, "http.request.method", "GET");
    expect(server, "url.path", &path);
    expect(server, "url.scheme", "http");
    expect(server, "http.route", "/api/v1/{collection}/{id}");
    expect(server, "http.response.status_code", "200");
    expect(server, "network.protocol.version", "1.1");
    expect(server, "client.address", "127.0.0.1");
    expect(server, "user_agent.original", "velero/1.0");
    expect(server, "cloudcasa_gateway.cache.status", "miss");
    expect(server, "cloudcasa_gateway.client.id", "local");

    assert_eq!(client.span.parent_span_id, server.span.span_id);
    assert_eq!(
        upstream_parent,
        format!("00-{TRACE_ID}-{}-01", hex(&client.span.span_id)),
        "the upstream saw the client span as its parent"
    );
    expect(client, "http.request.method", "GET");
    expect(client, "http.response.status_code", "200");
    expect(client, "server.address", "127.0.0.1");
    expect(client, "server.port", &mock.addr.port().to_string());
    assert!(client.attr("url.full").unwrap().ends_with(&path));
    assert!(client.span.end_time_unix_nano >= client.span.start_time_unix_nano);
    assert!(server.span.end_time_unix_nano >= client.span.end_time_unix_nano);
}

#[tokio::test]
async fn spans_and_metrics_describe_the_request_the_upstream_executed() {
    // A POST overriding to PATCH, with a path spelled `%75sergroups`: the upstream executes
    // PATCH /api/v1/usergroups/ID, and that is what the span and the metrics say.
    let receiver = OtlpReceiver::start().await;
    let (mock, _secret, mut gw) = setup(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"",
        receiver.endpoint()
    ))
    .await;
    let (id, etag) = item(&mock, "traced");
    let canonical = format!("/api/v1/usergroups/{id}");
    let reply = send(
        Method::POST,
        &gw.url(&format!("/api/v1/%75sergroups/{id}")),
        &[
            ("x-http-method-override", "PATCH"),
            ("if-match", &format!("\"{etag}\"")),
            ("content-type", "application/json"),
        ],
        r#"{"name":"after"}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(mock.state.last().method, Method::PATCH);
    assert_eq!(mock.state.last().uri.path(), canonical);

    gw.wait_audit(1).await;
    let m = scrape(&gw).await;
    let series = |method: &str| {
        format!(
            "cloudcasa_gateway_requests_total{{method=\"{method}\",status_class=\"2xx\",cache=\"bypass\"}}"
        )
    };
    assert_eq!(m.get(&series("PATCH")).copied(), Some(1.0), "{m:#?}");
    assert_eq!(m.get(&series("POST")).copied().unwrap_or(0.0), 0.0);
    assert_eq!(
        m.get("cloudcasa_gateway_upstream_duration_seconds_count{method=\"PATCH\",call=\"write\",status_class=\"2xx\"}")
            .copied(),
        Some(1.0),
        "{m:#?}"
    );

    gw.begin_shutdown().await.unwrap();
    let spans = receiver.spans();
    let server = spans
        .iter()
        .find(|s| s.span.kind == 2)
        .unwrap_or_else(|| panic!("no server span in {spans:#?}"));
    let client = spans
        .iter()
        .find(|s| s.span.kind == 3)
        .unwrap_or_else(|| panic!("no client span in {spans:#?}"));
    assert_eq!(server.span.name, "PATCH /api/v1/{collection}/{id}");
    let attr = |s: &support::otlp::Received, key: &str| s.attr(key);
    assert_eq!(
        attr(server, "http.request.method").as_deref(),
        Some("PATCH")
    );
    assert_eq!(
        attr(server, "http.request.method_original").as_deref(),
        Some("POST")
    );
    assert_eq!(
        attr(server, "url.path").as_deref(),
        Some(canonical.as_str())
    );
    assert_eq!(
        attr(server, "http.route").as_deref(),
        Some("/api/v1/{collection}/{id}")
    );
    assert_eq!(
        attr(client, "http.request.method").as_deref(),
        Some("PATCH")
    );
    assert!(attr(client, "url.full").unwrap().ends_with(&canonical));
}

#[tokio::test]
async fn an_unreachable_collector_does_not_touch_requests() {
    // Port 1 on loopback: connection refused on every export attempt.
    let (_mock, _secret, gw) = setup("[telemetry]\notlp_endpoint = \"http://127.0.0.1:1\"").await;
    for _ in 0..20 {
        assert_eq!(
            get(&gw.url("/api/v1/clusters"), &[]).await.status,
            StatusCode::OK
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the OpenMetrics text into `name{labels}` → value.
async fn scrape(gw: &TestGateway) -> HashMap<String, f64> {
    let reply = get(&gw.admin_url("/metrics"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        reply.headers
    );
    let text = reply.text();
    assert!(text.ends_with("# EOF\n"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            (
                series.to_string(),
                value.parse().unwrap_or_else(|_| panic!("bad value in {l}")),
            )
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let (mock, _secret, gw) =
        setup("[server]\nmax_body_size = \"1KiB\"\n[cache]\nfresh_for = \"1m\"").await;
    let (id, _) = item(&mock, "ops");
    let path = format!("/api/v1/usergroups/{id}");
    // Known traffic: a miss, a fresh hit, a revalidation the client asked for, a 412, a 413.
    assert_eq!(get(&gw.url(&path), &[]).await.status, StatusCode::OK);
    let hit = get(&gw.url(&path), &[]).await;
    assert!(
        hit.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        hit.headers
    );
    let revalidated = get(&gw.url(&path), &[("cache-control", "no-cache")]).await;
    assert!(
        revalidated
            .header("cache-status")
            .unwrap()
            .contains("fwd-status=304"),
        "{:?}",
        revalidated.headers
    );
    let stale = send(
        Method::PATCH,
        &gw.url(&path),
        &[("if-match", "\"old\"")],
        "{}",
    )
    .await;
    stale.envelope_message(412);
    post_oversized(&gw).await.envelope_message(413);

    gw.wait_audit(5).await;
    let m = scrape(&gw).await;
    let v = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("{series} missing: {m:#?}"))
    };
    let p = "cloudcasa_gateway_";
    let requests = |method: &str, class: &str, cache: &str| {
        v(&format!(
            "{p}requests_total{{method=\"{method}\",status_class=\"{class}\",cache=\"{cache}\"}}"
        ))
    };
    assert_eq!(requests("GET", "2xx", "miss"), 1.0);
    assert_eq!(requests("GET", "2xx", "revalidated"), 1.0);
    assert_eq!(requests("GET", "2xx", "hit"), 1.0);
    assert_eq!(requests("PATCH", "4xx", "bypass"), 1.0);
    assert_eq!(requests("POST", "4xx", "bypass"), 1.0);
    assert_eq!(v(&format!("{p}requests_in_flight")), 0.0);
    assert_eq!(
        v(&format!(
            "{p}request_duration_seconds_count{{method=\"GET\",status_class=\"2xx\",cache=\"miss\"}}"
        )),
        1.0
    );
    // The miss, the revalidation and the PATCH, each under its own call label.
    for (method, call, status) in [
        ("GET", "fetch", "2xx"),
        ("GET", "revalidate", "3xx"),
        ("PATCH", "write", "4xx"),
    ] {
        assert_eq!(
            v(&format!(
                "{p}upstream_duration_seconds_count{{method=\"{method}\",call=\"{call}\",status_class=\"{status}\"}}"
            )),
            1.0,
            "{call}"
        );
    }
    assert_eq!(
        v(&format!(
            "{p}upstream_responses_total{{status_class=\"2xx\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "{p}upstream_responses_total{{status_class=\"3xx\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "{p}upstream_responses_total{{status_class=\"4xx\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "{p}gateway_errors_total{{kind=\"payload_too_large\"}}"
        )),
        1.0
    );
    assert_eq!(v(&format!("{p}cache_hits_total")), 1.0);
    assert_eq!(v(&format!("{p}cache_misses_total")), 1.0);
    assert_eq!(v(&format!("{p}cache_revalidations_total")), 1.0);
    assert_eq!(v(&format!("{p}cache_collapsed_total")), 0.0);
    assert_eq!(v(&format!("{p}cache_evictions_total")), 0.0);
    assert_eq!(v(&format!("{p}cache_entries")), 1.0);
    assert!(v(&format!("{p}cache_weighted_bytes")) > 0.0);
    assert_eq!(
        v(&format!("{p}token_loaded{{credential=\"default\"}}")),
        1.0
    );
    assert_eq!(
        v(&format!(
            "{p}token_load_failures_total{{credential=\"default\"}}"
        )),
        0.0
    );
    let age = v(&format!("{p}token_age_seconds{{credential=\"default\"}}"));
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(m.contains_key(&format!("{p}token_reloads_total{{credential=\"default\"}}")));
    assert_eq!(
        v(&format!(
            "{p}audit_records_written_total{{phase=\"outcome\"}}"
        )),
        5.0
    );
}
