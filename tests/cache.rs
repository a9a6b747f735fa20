//! The cache end to end, counting what the mock CloudCasa receives.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use support::mock::Fault;
use support::*;

async fn cache_report(gw: &TestGateway) -> serde_json::Value {
    get(&gw.admin_url("/cache"), &[]).await.json()
}

/// Starts `n` concurrent GETs of `path`.
fn spawn_gets(gw: &TestGateway, path: &str, n: usize) -> Vec<tokio::task::JoinHandle<Reply>> {
    (0..n)
        .map(|_| {
            let url = gw.url(path);
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect()
}

/// Waits until `n` requests are waiting on another request's upstream fetch.
async fn wait_collapsed(gw: &TestGateway, n: u64) {
    let admin = gw.admin_url("/cache");
    eventually(
        Duration::from_secs(10),
        &format!("{n} collapsed waiters"),
        || async { get(&admin, &[]).await.json()["collapsed"] == n },
    )
    .await;
}

#[tokio::test]
async fn fifty_concurrent_misses_make_one_upstream_request() {
    let (mock, _secret, gw) = setup("").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let release = mock.state.hold_next(None);

    let tasks = spawn_gets(&gw, &path, 50);
    // Wait until the leader is at the upstream and the other 49 are waiting for it.
    mock.state.wait_for(1).await;
    wait_collapsed(&gw, 49).await;
    release.notify_one();
    let mut collapsed = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["name"], "g");
        collapsed += reply.header("cache-status").unwrap().contains("collapsed") as usize;
    }
    assert_eq!(collapsed, 49);
    assert_eq!(mock.state.requests_to(&path).len(), 1);
}

#[tokio::test]
async fn waiters_still_get_an_answer_when_the_leader_fails() {
    let (mock, _secret, gw) = setup("").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let release = mock.state.hold_next(Some(StatusCode::SERVICE_UNAVAILABLE));
    let leader = spawn_gets(&gw, &path, 1).remove(0);
    mock.state.wait_for(1).await;
    let waiters = spawn_gets(&gw, &path, 3);
    wait_collapsed(&gw, 3).await;
    release.notify_one();
    assert_eq!(
        leader.await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for w in waiters {
        assert_eq!(
            w.await.unwrap().status,
            StatusCode::OK,
            "a waiter went on by itself"
        );
    }
}

/// Issue 16: a failed leader hands over to one waiter; the rest wait for the new leader.
/// (`fresh_for` keeps a waiter that comes back after the new leader finished from revalidating.)
#[tokio::test]
async fn fifty_waiters_and_a_failing_leader_make_two_upstream_requests() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let release = mock.state.hold_next(Some(StatusCode::SERVICE_UNAVAILABLE));
    let leader = spawn_gets(&gw, &path, 1).remove(0);
    mock.state.wait_for(1).await;
    let waiters = spawn_gets(&gw, &path, 50);
    wait_collapsed(&gw, 50).await;
    release.notify_one();
    assert_eq!(
        leader.await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for w in waiters {
        let reply = w.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["name"], "g");
    }
    assert_eq!(mock.state.requests_to(&path).len(), 2);
}

/// Issue 16: invalidation is per collection. A write to another collection while a fill is in
/// flight does not keep that fill from being stored.
#[tokio::test]
async fn a_write_elsewhere_does_not_discard_a_fill_in_flight() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let release = mock.state.hold_next(None);
    let read = spawn_gets(&gw, &path, 1).remove(0);
    mock.state.wait_for(1).await;
    let created = send(
        Method::POST,
        &gw.url("/api/v1/clusters"),
        &[("content-type", "application/json")],
        Bytes::from_static(br#"{"name":"c"}"#),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    release.notify_one();
    let first = read.await.unwrap();
    assert!(
        first.header("cache-status").unwrap().contains("; stored"),
        "{:?}",
        first.headers
    );
    let again = get(&gw.url(&path), &[]).await;
    assert!(
        again
            .header("cache-status")
            .unwrap()
            .starts_with("cloudcasa-gateway; hit")
    );
    assert_eq!(mock.state.requests_to(&path).len(), 1);
}

/// ... while a write to the same collection does: the read that raced it is not stored, and the
/// next read sees the write (no read older than a write through the gateway).
#[tokio::test]
async fn a_write_to_the_collection_discards_a_fill_that_raced_it() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, etag) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let release = mock.state.hold_next(None);
    let read = spawn_gets(&gw, &path, 1).remove(0);
    mock.state.wait_for(1).await;
    let patched = send(
        Method::PATCH,
        &gw.url(&path),
        &[
            ("content-type", "application/json"),
            ("if-match", &format!("\"{etag}\"")),
        ],
        Bytes::from_static(br#"{"name":"h"}"#),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    release.notify_one();
    let raced = read.await.unwrap();
    assert!(
        !raced.header("cache-status").unwrap().contains("; stored"),
        "{:?}",
        raced.headers
    );
    let after = get(&gw.url(&path), &[]).await;
    assert_eq!(after.json()["name"], "h");
}

/// Issue 16: a stored complete 200 answers ranges (RFC 9110 §14) without asking the upstream.
#[tokio::test]
async fn ranges_are_answered_from_a_stored_response() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"60s\"").await;
    let (id, etag) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    let full = get(&url, &[]).await;
    let body = full.body.clone();
    let len = body.len();
    let strong = format!("\"{etag}\"");

    let first = get(&url, &[("range", "bytes=0-1")]).await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        first.header("content-range"),
        Some(format!("bytes 0-1/{len}").as_str())
    );
    assert_eq!(first.body, body.slice(0..2));
    assert!(first.header("cache-status").unwrap().contains("; hit"));

    let tail = get(&url, &[("range", "bytes=-3")]).await;
    assert_eq!(tail.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.body, body.slice(len - 3..));
    let longer = get(&url, &[("range", &format!("bytes=-{}", len + 10))]).await;
    assert_eq!(longer.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(longer.body, body);

    let matching = get(&url, &[("range", "bytes=2-"), ("if-range", &strong)]).await;
    assert_eq!(matching.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(matching.body, body.slice(2..));
    for other in ["\"other\"", &format!("W/{strong}")] {
        let whole = get(&url, &[("range", "bytes=0-1"), ("if-range", other)]).await;
        assert_eq!(whole.status, StatusCode::OK, "If-Range {other}");
        assert_eq!(whole.body, body);
    }
    let several = get(&url, &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!(several.status, StatusCode::OK);
    assert_eq!(several.body, body);
    // Numbers past u64 and a zero-length suffix (which the parser does not take): ignored, the
    // whole 200; a start at u64::MAX: 416. Never a panic or a slice past the body.
    let huge = get(&url, &[("range", "bytes=0-99999999999999999999999")]).await;
    assert_eq!(huge.status, StatusCode::OK);
    assert_eq!(huge.body, body);
    let huge_start = get(&url, &[("range", "bytes=18446744073709551615-")]).await;
    assert_eq!(huge_start.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let empty_suffix = get(&url, &[("range", "bytes=-0")]).await;
    assert_eq!(empty_suffix.status, StatusCode::OK);
    assert_eq!(empty_suffix.body, body);
    let past = get(&url, &[("range", &format!("bytes={}-", len + 5))]).await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );

    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(
        mock.state.requests_to(&path).len(),
        1,
        "all from the stored 200"
    );
}

#[tokio::test]
async fn revalidation_sends_the_etag_and_serves_the_stored_body_on_304() {
    let (mock, _secret, gw) = setup("").await;
    let (id, etag) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    let first = get(&url, &[]).await;
    assert_eq!(
        first.header("cache-status"),
        Some("cloudcasa-gateway; fwd=uri-miss; stored")
    );
    let second = get(&url, &[]).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("etag"), Some(format!("\"{etag}\"").as_str()));
    assert!(
        second
            .header("cache-status")
            .unwrap()
            .starts_with("cloudcasa-gateway; fwd=stale; fwd-status=304")
    );
    assert!(second.header("age").is_some());
    let seen = mock.state.last();
    assert_eq!(
        seen.header("if-none-match"),
        Some(format!("\"{etag}\"").as_str())
    );
    assert_eq!(cache_report(&gw).await["revalidations"], 1);
}

#[tokio::test]
async fn collections_are_revalidated_with_if_modified_since() {
    let (mock, _secret, gw) = setup("").await;
    item(&mock, "g");
    let url = gw.url("/api/v1/usergroups");
    let first = get(&url, &[]).await;
    let second = get(&url, &[]).await;
    assert_eq!(second.body, first.body);
    let seen = mock.state.last();
    assert_eq!(
        seen.header("if-modified-since"),
        first.header("last-modified")
    );
    assert!(
        second
            .header("cache-status")
            .unwrap()
            .contains("fwd-status=304")
    );
}

#[tokio::test]
async fn clients_get_304_for_items_and_for_collections() {
    let (mock, _secret, gw) = setup("").await;
    let (id, etag) = item(&mock, "g");
    let quoted = format!("\"{etag}\"");
    let reply = get(
        &gw.url(&format!("/api/v1/usergroups/{id}")),
        &[("if-none-match", &quoted)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), Some(quoted.as_str()));
    // The client's conditional was answered here; the upstream was asked unconditionally.
    assert!(mock.state.last().header("if-none-match").is_none());

    // Collections carry no ETag upstream; the gateway gives them one.
    let list = get(&gw.url("/api/v1/usergroups"), &[]).await;
    let list_etag = list.header("etag").expect("a gateway ETag").to_string();
    assert!(list_etag.starts_with("\"cc-"), "{list_etag}");
    let unchanged = get(
        &gw.url("/api/v1/usergroups"),
        &[("if-none-match", &list_etag)],
    )
    .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    // After a write the list changes, and so does its ETag.
    let created = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"h"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let changed = get(
        &gw.url("/api/v1/usergroups"),
        &[("if-none-match", &list_etag)],
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.header("etag").unwrap(), list_etag);
    assert_eq!(changed.json()["_meta"]["total"], 2);
}

#[tokio::test]
async fn fresh_for_serves_from_memory_and_explicit_directives_win() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    get(&gw.url(&path), &[]).await;
    let hit = get(&gw.url(&path), &[]).await;
    assert!(
        hit.header("cache-status")
            .unwrap()
            .starts_with("cloudcasa-gateway; hit; ttl="),
        "{:?}",
        hit.headers
    );
    assert!(hit.header("age").is_some());
    assert_eq!(mock.state.requests_to(&path).len(), 1);

    mock.state.route("/api/v1/volatile", |_| {
        http::Response::builder()
            .header("cache-control", "max-age=0")
            .header("etag", "\"v\"")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    get(&gw.url("/api/v1/volatile"), &[]).await;
    get(&gw.url("/api/v1/volatile"), &[]).await;
    assert_eq!(
        mock.state.requests_to("/api/v1/volatile").len(),
        2,
        "max-age=0 beats fresh_for"
    );
    // A client's no-cache is honoured too.
    get(&gw.url(&path), &[("cache-control", "no-cache")]).await;
    assert_eq!(mock.state.requests_to(&path).len(), 2);
}

#[tokio::test]
async fn writes_invalidate_target_collection_variants_and_locations() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, etag) = item(&mock, "g");
    let item_path = format!("/api/v1/usergroups/{id}");
    let variants = [
        "/api/v1/usergroups",
        "/api/v1/usergroups?max_results=5",
        "/api/v1/usergroups?page=2",
    ];
    let warm = || async {
        get(&gw.url(&item_path), &[]).await;
        for v in variants {
            get(&gw.url(v), &[]).await;
        }
    };
    warm().await;
    let before = mock.state.count();
    warm().await;
    assert_eq!(mock.state.count(), before, "all served from the cache");

    // A failed write (412) invalidates nothing.
    let stale = send(
        Method::PATCH,
        &gw.url(&item_path),
        &[("if-match", "nope")],
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert!(stale.header("cache-status").unwrap().contains("fwd=method"));
    warm().await;
    assert_eq!(
        mock.state.count(),
        before + 1,
        "only the PATCH went upstream"
    );

    // A successful PATCH invalidates the item and every variant of its collection.
    let ok = send(
        Method::PATCH,
        &gw.url(&item_path),
        &[("if-match", &etag)],
        r#"{"name":"renamed"}"#,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        get(&gw.url(&item_path), &[]).await.json()["name"],
        "renamed"
    );
    for v in variants {
        let reply = get(&gw.url(v), &[]).await;
        assert_eq!(
            reply.json()["_items"][0]["name"],
            "renamed",
            "{v} was served stale"
        );
    }

    // POST: the collection and the new resource's Location.
    let created = send(
        Method::POST,
        &gw.url("/api/v1/usergroups"),
        &[],
        r#"{"name":"new"}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    for v in variants {
        assert_eq!(
            get(&gw.url(v), &[]).await.json()["_meta"]["total"],
            2,
            "{v}"
        );
    }

    // DELETE: the item is gone for readers at once.
    let current = get(&gw.url(&item_path), &[]).await.json()["_etag"]
        .as_str()
        .unwrap()
        .to_string();
    let deleted = send(
        Method::DELETE,
        &gw.url(&item_path),
        &[("if-match", &current)],
        Bytes::new(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&gw.url(&item_path), &[]).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn content_location_and_location_targets_are_invalidated() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = counter.clone();
    mock.state.route("/api/v1/jobs/7", move |_| {
        let n = c.load(std::sync::atomic::Ordering::SeqCst);
        mock_json(&json!({"version": n}))
    });
    let c = counter.clone();
    mock.state.route("/api/v1/actions/run", move |_| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut r = mock_json(&json!({"ok": true}));
        r.headers_mut()
            .insert("content-location", "/api/v1/jobs/7".parse().unwrap());
        r.headers_mut().insert(
            "location",
            "http://upstream.example/api/v1/jobs/8".parse().unwrap(),
        );
        r
    });
    assert_eq!(
        get(&gw.url("/api/v1/jobs/7"), &[]).await.json()["version"],
        0
    );
    assert_eq!(
        get(&gw.url("/api/v1/jobs/7"), &[]).await.json()["version"],
        0
    );
    assert_eq!(
        send(Method::POST, &gw.url("/api/v1/actions/run"), &[], "{}")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gw.url("/api/v1/jobs/7"), &[]).await.json()["version"],
        1
    );
}

fn mock_json(v: &serde_json::Value) -> http::Response<Bytes> {
    support::mock::json_response(StatusCode::OK, v)
}

#[tokio::test]
async fn the_cache_is_partitioned_by_credential() {
    let mock = MockCloudCasa::start().await;
    mock.state
        .seed("a", "clusters", json!({"name": "tenant-a-cluster"}));
    mock.state
        .seed("b", "clusters", json!({"name": "tenant-b-cluster"}));
    let mut secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "[cache]\nfresh_for = \"1h\"").await;
    let url = gw.url("/api/v1/clusters");
    assert_eq!(
        get(&url, &[]).await.json()["_items"][0]["name"],
        "tenant-a-cluster"
    );
    assert!(
        get(&url, &[])
            .await
            .header("cache-status")
            .unwrap()
            .contains("; hit")
    );

    secret.rotate("token-b");
    eventually(Duration::from_secs(3), "tenant b's data", || async {
        get(&url, &[]).await.json()["_items"][0]["name"] == "tenant-b-cluster"
    })
    .await;
    // From now on nothing of tenant a is served, fresh as it is in the cache.
    for _ in 0..5 {
        assert_eq!(
            get(&url, &[]).await.json()["_items"][0]["name"],
            "tenant-b-cluster"
        );
    }
}

#[tokio::test]
async fn no_store_private_set_cookie_and_vary() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    for (path, header, value) in [
        ("/api/v1/nostore", "cache-control", "no-store"),
        ("/api/v1/private", "cache-control", "private"),
        ("/api/v1/cookie", "set-cookie", "session=1"),
        ("/api/v1/varystar", "vary", "*"),
    ] {
        mock.state.route(path, move |_| {
            http::Response::builder()
                .header(header, value)
                .body(Bytes::from_static(b"{}"))
                .unwrap()
        });
        let first = get(&gw.url(path), &[]).await;
        assert!(
            first.header("cache-status").unwrap().contains("detail="),
            "{path}: {:?}",
            first.headers
        );
        get(&gw.url(path), &[]).await;
        assert_eq!(mock.state.requests_to(path).len(), 2, "{path} was stored");
    }
    // A client's no-store: neither served from nor stored in the cache.
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    get(&gw.url(&path), &[("cache-control", "no-store")]).await;
    get(&gw.url(&path), &[]).await;
    assert_eq!(mock.state.requests_to(&path).len(), 2);

    mock.state.route("/api/v1/varied", |r| {
        let lang = r.header("accept-language").unwrap_or("none").to_string();
        http::Response::builder()
            .header("vary", "Accept-Language")
            .body(Bytes::from(lang))
            .unwrap()
    });
    let en = get(&gw.url("/api/v1/varied"), &[("accept-language", "en")]).await;
    assert_eq!(en.text(), "en");
    let de = get(&gw.url("/api/v1/varied"), &[("accept-language", "de")]).await;
    assert_eq!(
        de.text(),
        "de",
        "a variant for another language is never served"
    );
    assert!(de.header("cache-status").unwrap().contains("fwd=vary-miss"));
    let de_again = get(&gw.url("/api/v1/varied"), &[("accept-language", "de")]).await;
    assert_eq!(de_again.text(), "de");
    assert!(de_again.header("cache-status").unwrap().contains("; hit"));
}

#[tokio::test]
async fn stale_if_error_covers_a_failing_upstream() {
    let (mock, _secret, gw) = setup("[cache]\nstale_if_error = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let url = gw.url(&format!("/api/v1/usergroups/{id}"));
    assert_eq!(get(&url, &[]).await.status, StatusCode::OK);
    for fault in [Fault::Status(StatusCode::BAD_GATEWAY), Fault::Reset] {
        mock.state.set_fault(fault, Some(1));
        let reply = get(&url, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["name"], "g");
        assert!(
            reply
                .header("cache-status")
                .unwrap()
                .contains("hit; detail=stale-if-error"),
            "{:?}",
            reply.headers
        );
    }
    // must-revalidate forbids it.
    mock.state.route("/api/v1/strict", |_| {
        http::Response::builder()
            .header("cache-control", "must-revalidate")
            .header("etag", "\"s\"")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    assert_eq!(
        get(&gw.url("/api/v1/strict"), &[]).await.status,
        StatusCode::OK
    );
    mock.state
        .set_fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE), Some(1));
    assert_eq!(
        get(&gw.url("/api/v1/strict"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Without stale_if_error, the error goes through.
    let (mock2, _s2, gw2) = setup("").await;
    let (id2, _) = item(&mock2, "g");
    let url2 = gw2.url(&format!("/api/v1/usergroups/{id2}"));
    get(&url2, &[]).await;
    mock2
        .state
        .set_fault(Fault::Status(StatusCode::BAD_GATEWAY), Some(1));
    assert_eq!(get(&url2, &[]).await.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn max_size_is_respected_after_filling_well_past_it() {
    let (mock, _secret, gw) =
        setup("[cache]\nmax_size = \"64KiB\"\nmax_object_size = \"8KiB\"").await;
    let pad = "p".repeat(4000);
    let ids: Vec<String> = (0..100)
        .map(|i| {
            mock.state.seed("a", "pads", json!({"name": i, "pad": pad}))["_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for id in &ids {
        assert_eq!(
            get(&gw.url(&format!("/api/v1/pads/{id}")), &[])
                .await
                .status,
            StatusCode::OK
        );
    }
    let report = cache_report(&gw).await;
    let weighted = report["weighted_bytes"].as_u64().unwrap();
    assert!(weighted <= 64 * 1024, "{report}");
    assert!(weighted > 32 * 1024, "the cache is actually used: {report}");
    assert!(report["evictions"].as_u64().unwrap() > 0, "{report}");
}

#[tokio::test]
async fn large_objects_stream_through_unstored() {
    let (mock, _secret, gw) =
        setup("[cache]\nmax_object_size = \"64KiB\"\nfresh_for = \"1h\"").await;
    let reply = get(&gw.url("/api/v1/_blob?size=300000"), &[]).await;
    assert_eq!(reply.body.len(), 300_000);
    assert!(
        reply
            .header("cache-status")
            .unwrap()
            .contains("detail=too-large")
    );
    get(&gw.url("/api/v1/_blob?size=300000"), &[]).await;
    assert_eq!(mock.state.requests_to("/api/v1/_blob").len(), 2);
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let full = get(&gw.url(&path), &[]).await;
    let head = send(Method::HEAD, &gw.url(&path), &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(full.body.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), full.header("etag"));
    assert!(head.header("cache-status").unwrap().contains("; hit"));
    assert_eq!(mock.state.requests_to(&path).len(), 1);
}

#[tokio::test]
async fn admin_purges_by_prefix_and_entirely() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    let (id, _) = item(&mock, "g");
    let paths = [
        format!("/api/v1/usergroups/{id}"),
        "/api/v1/clusters".to_string(),
    ];
    for p in &paths {
        get(&gw.url(p), &[]).await;
    }
    let report = cache_report(&gw).await;
    assert_eq!(report["entries"], 2, "{report}");
    let purged = send(
        Method::DELETE,
        &gw.admin_url("/cache?prefix=/api/v1/usergroups"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(purged.json()["removed_paths"], 1);
    assert!(
        get(&gw.url(&paths[0]), &[])
            .await
            .header("cache-status")
            .unwrap()
            .contains("uri-miss")
    );
    assert!(
        get(&gw.url(&paths[1]), &[])
            .await
            .header("cache-status")
            .unwrap()
            .contains("; hit")
    );
    send(Method::DELETE, &gw.admin_url("/cache"), &[], Bytes::new()).await;
    assert_eq!(cache_report(&gw).await["entries"], 0);
    assert!(
        get(&gw.url(&paths[1]), &[])
            .await
            .header("cache-status")
            .unwrap()
            .contains("uri-miss")
    );
    let bad = send(
        Method::DELETE,
        &gw.admin_url("/cache?path=x"),
        &[],
        Bytes::new(),
    )
    .await;
    bad.envelope_message(400);
    let report = cache_report(&gw).await;
    for field in [
        "hits",
        "misses",
        "revalidations",
        "evictions",
        "weighted_bytes",
    ] {
        assert!(report[field].is_u64(), "{field} in {report}");
    }
}

#[tokio::test]
async fn disabled_cache_bypasses() {
    let (mock, _secret, gw) = setup("[cache]\nenabled = false").await;
    let (id, _) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let reply = get(&gw.url(&path), &[]).await;
    assert_eq!(
        reply.header("cache-status"),
        Some("cloudcasa-gateway; fwd=bypass")
    );
    get(&gw.url(&path), &[]).await;
    assert_eq!(mock.state.requests_to(&path).len(), 2);
}

#[tokio::test]
async fn admin_purges_whole_segments_and_single_keys() {
    let (mock, _secret, gw) = setup("[cache]\nfresh_for = \"1h\"").await;
    mock.state
        .seed("a", "clusters", serde_json::json!({"name": "c"}));
    mock.state
        .seed("a", "clustersets", serde_json::json!({"name": "s"}));
    let paths = [
        "/api/v1/clusters",
        "/api/v1/clusters?page=2",
        "/api/v1/clustersets",
    ];
    for p in paths {
        get(&gw.url(p), &[]).await;
    }
    let status = |reply: &Reply| reply.header("cache-status").unwrap().to_string();
    // One key: the path with its query, every representation, every partition.
    let one = send(
        Method::DELETE,
        &gw.admin_url("/cache?path=/api/v1/clusters&query=page%3D2"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(one.json()["removed_responses"], 1, "{}", one.text());
    assert!(status(&get(&gw.url(paths[1]), &[]).await).contains("uri-miss"));
    assert!(status(&get(&gw.url(paths[0]), &[]).await).contains("; hit"));
    // A prefix is whole segments: /api/v1/clusters is not a prefix of /api/v1/clustersets.
    let subtree = send(
        Method::DELETE,
        &gw.admin_url("/cache?prefix=/api/v1/clusters"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(subtree.json()["removed_paths"], 1, "{}", subtree.text());
    assert!(status(&get(&gw.url(paths[0]), &[]).await).contains("uri-miss"));
    assert!(status(&get(&gw.url(paths[2]), &[]).await).contains("; hit"));
    let both = send(
        Method::DELETE,
        &gw.admin_url("/cache?prefix=/a&path=/b"),
        &[],
        Bytes::new(),
    )
    .await;
    both.envelope_message(400);
}

#[tokio::test]
async fn a_client_max_stale_accepts_a_stale_response_unless_it_forbids_it() {
    let (mock, _secret, gw) = setup("").await;
    mock.state.route("/api/v1/short", |_| {
        http::Response::builder()
            .header("content-type", "application/json")
            .header("cache-control", "max-age=0")
            .header("etag", "\"s\"")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    mock.state.route("/api/v1/strict", |_| {
        http::Response::builder()
            .header("content-type", "application/json")
            .header("cache-control", "max-age=0, must-revalidate")
            .header("etag", "\"m\"")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    });
    for p in ["/api/v1/short", "/api/v1/strict"] {
        get(&gw.url(p), &[]).await;
    }
    let before = mock.state.count();
    let stale = get(
        &gw.url("/api/v1/short"),
        &[("cache-control", "max-stale=60")],
    )
    .await;
    assert!(
        stale.header("cache-status").unwrap().contains("; hit"),
        "{:?}",
        stale.headers
    );
    assert_eq!(mock.state.count(), before, "served stale without asking");
    let strict = get(
        &gw.url("/api/v1/strict"),
        &[("cache-control", "max-stale=60")],
    )
    .await;
    assert!(strict.header("cache-status").unwrap().contains("fwd=stale"));
    assert_eq!(mock.state.count(), before + 1);
}

#[tokio::test]
async fn a_range_asked_for_identity_is_answered_from_the_uncoded_whole_stored_for_gzip() {
    // As Node's fetch and browsers do: the whole with `Accept-Encoding: gzip, deflate`, then a
    // range with `identity`. The stored body is not content-coded, so it answers the range.
    let (mock, _secret, gw) = setup("").await;
    for (path, coding) in [("/api/v1/plain", None), ("/api/v1/zipped", Some("gzip"))] {
        mock.state.route(path, move |_| {
            let mut response = http::Response::builder()
                .header("cache-control", "max-age=3600")
                .header("etag", "\"e1\"");
            if let Some(coding) = coding {
                response = response.header("content-encoding", coding);
            }
            response.body(Bytes::from_static(b"01234567890")).unwrap()
        });
    }
    let whole = get(
        &gw.url("/api/v1/plain"),
        &[("accept-encoding", "gzip, deflate")],
    )
    .await;
    assert_eq!(whole.status, StatusCode::OK);
    let part = get(
        &gw.url("/api/v1/plain"),
        &[("accept-encoding", "identity"), ("range", "bytes=0-1")],
    )
    .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, Bytes::from_static(b"01"));
    assert!(part.header("cache-status").unwrap().contains("; hit"));
    assert_eq!(mock.state.requests_to("/api/v1/plain").len(), 1);
    // A client that refuses identity, or a stored body that is gzip: the range goes upstream.
    get(
        &gw.url("/api/v1/plain"),
        &[
            ("accept-encoding", "identity;q=0, br"),
            ("range", "bytes=0-1"),
        ],
    )
    .await;
    assert_eq!(mock.state.requests_to("/api/v1/plain").len(), 2);
    get(&gw.url("/api/v1/zipped"), &[("accept-encoding", "gzip")]).await;
    let zipped = get(
        &gw.url("/api/v1/zipped"),
        &[("accept-encoding", "identity"), ("range", "bytes=0-1")],
    )
    .await;
    assert!(
        zipped.header("cache-status").unwrap().contains("fwd="),
        "{:?}",
        zipped.headers
    );
    assert_eq!(mock.state.requests_to("/api/v1/zipped").len(), 2);
}

/// A gateway in front of the upstream at `url` whose calls time out after `timeout`, caching
/// for an hour (unless the upstream says otherwise), with `[server]` settings `server`.
async fn impatient_gateway(
    url: &str,
    secret: &SecretDir,
    timeout: &str,
    server: &str,
) -> TestGateway {
    TestGateway::start(&format!(
        "[upstream]\nurl = \"{url}\"\ntimeout = \"{timeout}\"\n[token]\nfile = \"{}\"\n\
         [server]\n{server}\n[cache]\nfresh_for = \"1h\"\n",
        secret.token_path().display()
    ))
    .await
}

/// A mock, and a gateway in front of it with `upstream.timeout` `timeout` that has stored an
/// item named "old" (for an hour): its path and ETag.
async fn primed(timeout: &str) -> (MockCloudCasa, SecretDir, TestGateway, String, String) {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&mock.url(), &secret, timeout, "").await;
    let (id, etag) = item(&mock, "old");
    let path = format!("/api/v1/usergroups/{id}");
    assert_eq!(get(&gw.url(&path), &[]).await.json()["name"], "old");
    (mock, secret, gw, path, etag)
}

#[tokio::test]
async fn a_write_whose_client_went_away_still_invalidates() {
    let (mock, _secret, gw, path, etag) = primed("30s").await;
    assert!(
        get(&gw.url(&path), &[])
            .await
            .header("cache-status")
            .unwrap()
            .contains("hit"),
        "stored for an hour"
    );
    // The upstream executes the PATCH at once and holds its answer; the client goes away
    // before it comes. The write happened, so the old document must not be served again.
    let release = mock.state.hold_next_answer(Method::PATCH);
    abandon_rename(gw.proxy, &mock, &path, &etag).await;
    // The answer is still held: only the client's going away can have invalidated.
    eventually(
        Duration::from_secs(5),
        "the new name, not the stored one",
        || async { get(&gw.url(&path), &[]).await.json()["name"] == "new" },
    )
    .await;
    release.notify_one();
}

#[tokio::test]
async fn a_write_that_times_out_invalidates_now_and_after_a_late_commit() {
    let (mock, _secret, gw, path, etag) = primed("1s").await;

    // Executed, answered too late: 504 to the client, and the stored document is gone.
    let release = mock.state.hold_next_answer(Method::PATCH);
    let reply = rename(&gw.url(&path), &etag, "new").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let after = get(&gw.url(&path), &[]).await;
    assert_eq!(after.json()["name"], "new");
    release.notify_one();

    // Not yet executed when the gateway gave up, executed later (here: straight at the
    // upstream, as a slow upstream would): the read in between stores the old document, which
    // the second invalidation, one upstream timeout after the first, takes out.
    let etag = after.json()["_etag"].as_str().unwrap().to_string();
    let release = mock.state.hold_next(Some(StatusCode::SERVICE_UNAVAILABLE));
    let reply = rename(&gw.url(&path), &etag, "newer").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    release.notify_one();
    assert_eq!(get(&gw.url(&path), &[]).await.json()["name"], "new");
    late_commit_is_seen(&mock, &gw, &path, &etag, "newer").await;
}

#[tokio::test]
async fn a_write_whose_streamed_body_breaks_after_it_was_sent_invalidates() {
    let (_mock, _secret, gw, path, etag) = primed("30s").await;
    // A chunked body past what is read whole streams: the upstream has the request line and
    // headers (Eve starts a DELETE, or a POST that ignores its body, on them) before the body
    // breaks off with a malformed chunk.
    let mut request = format!(
        "PATCH {path} HTTP/1.1\r\nhost: x\r\nif-match: \"{etag}\"\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in vec![b' '; 1100 * 1024].chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"zz\r\n");
    let reply = raw_exchange(gw.proxy, &request).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // Whatever the upstream made of it, the stored document is not served again unasked.
    let after = get(&gw.url(&path), &[]).await;
    assert!(
        !after.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        after.headers
    );
}

#[tokio::test]
async fn a_write_answered_5xx_invalidates_now_and_after_a_late_commit() {
    let (mock, _secret, gw, path, etag) = primed("1s").await;
    // A proxy in front of Eve gives up (502) while Eve has not committed yet; a read in
    // between stores the old document again; then the commit lands.
    mock.state
        .hold_next(Some(StatusCode::BAD_GATEWAY))
        .notify_one();
    let reply = rename(&gw.url(&path), &etag, "new").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(get(&gw.url(&path), &[]).await.json()["name"], "old");
    late_commit_is_seen(&mock, &gw, &path, &etag, "new").await;
}

/// The write the gateway gave up on commits at the upstream after all (renaming `path` to
/// `name`): within seconds, the gateway's second invalidation lets reads see it.
async fn late_commit_is_seen(
    mock: &MockCloudCasa,
    gw: &TestGateway,
    path: &str,
    etag: &str,
    name: &str,
) {
    let late = rename_at_upstream(mock, path, etag, "token-a", name).await;
    assert_eq!(late.status, StatusCode::OK);
    eventually(
        Duration::from_secs(5),
        "the late commit, after the second invalidation",
        || async { get(&gw.url(path), &[]).await.json()["name"] == name },
    )
    .await;
}

/// An upstream on loopback that answers every request with headers and 3 of 10 body bytes,
/// then nothing (the connection held open), except the first when `first` is given: that one
/// gets `first` whole, and its connection is closed. Returns its address, the connections it
/// accepted, and its task.
async fn stalling_upstream(
    first: Option<&'static str>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
            let answer = match (n, first) {
                (0, Some(whole)) => whole,
                _ => {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     cache-control: max-age=60\r\ncontent-length: 10\r\n\r\n{\"a"
                }
            };
            tokio::io::AsyncWriteExt::write_all(&mut socket, answer.as_bytes())
                .await
                .unwrap();
            if n > 0 || first.is_none() {
                held.push(socket);
            }
        }
    });
    (upstream, connections, server)
}

#[tokio::test]
async fn a_fill_whose_upstream_stalls_mid_body_serves_a_stale_copy_when_allowed() {
    let whole = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 cache-control: max-age=1, stale-if-error=600\r\netag: \"v1\"\r\n\
                 connection: close\r\ncontent-length: 11\r\n\r\n{\"a\":\"old\"}";
    let (upstream, connections, server) = stalling_upstream(Some(whole)).await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&format!("http://{upstream}"), &secret, "1s", "").await;
    let url = gw.url("/api/v1/usergroups/x");
    assert_eq!(get(&url, &[]).await.json()["a"], "old");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Stale now; the refetch stalls mid-body: the stored copy stands in, as stale-if-error
    // allows.
    let reply = tokio::time::timeout(Duration::from_secs(10), get(&url, &[]))
        .await
        .expect("an answer, not a hang");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["a"], "old");
    assert!(
        reply.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        reply.headers
    );
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test]
async fn a_write_that_never_reached_the_upstream_invalidates_nothing() {
    // The upstream answers one GET, then is gone: connections to it are refused, so a write
    // cannot have reached it, and the stored document stays.
    let whole = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 cache-control: max-age=3600\r\netag: \"v1\"\r\n\
                 connection: close\r\ncontent-length: 11\r\n\r\n{\"a\":\"old\"}";
    let (upstream, _, server) = stalling_upstream(Some(whole)).await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&format!("http://{upstream}"), &secret, "30s", "").await;
    let url = gw.url("/api/v1/usergroups/x");
    assert_eq!(get(&url, &[]).await.json()["a"], "old");
    server.abort();
    let _ = server.await;
    let refused = send(Method::PATCH, &url, &[("if-match", "\"v1\"")], "{}").await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        refused.text()
    );
    let after = get(&url, &[]).await;
    assert_eq!(after.json()["a"], "old");
    assert!(after.header("cache-status").unwrap().contains("hit"));
}

#[tokio::test]
async fn a_response_passed_through_whose_upstream_stalls_mid_body_is_cut_off() {
    // A write's answer streams through (nothing is stored): headers and 3 of 10 bytes, then
    // nothing. The client gets what came, then the end of its connection once the body has
    // had no bytes for upstream.timeout, and the record names the upstream's body.
    let (upstream, _connections, server) = stalling_upstream(None).await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&format!("http://{upstream}"), &secret, "1s", "").await;
    let mut conn = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut conn,
        b"PATCH /api/v1/usergroups/x HTTP/1.1\r\nHost: gw\r\nIf-Match: \"v1\"\r\n\
          Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut answer),
    )
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut off after {took:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n{\"a"), "{text}");
    let records = gw.wait_audit(1).await;
    let record = records.last().unwrap();
    assert_eq!(record["method"], "PATCH", "{record}");
    assert_eq!(
        (&record["status"], &record["complete"], &record["error"]),
        (&json!(200), &json!(false), &json!("upstream_body")),
        "{record}"
    );
    server.abort();
}

#[tokio::test]
async fn a_fill_whose_upstream_stalls_mid_body_ends_and_frees_its_key() {
    // An upstream that sends headers and 3 of 10 bytes, then nothing, on every connection.
    let (upstream, connections, server) = stalling_upstream(None).await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&format!("http://{upstream}"), &secret, "1s", "").await;
    let url = gw.url("/api/v1/usergroups/x");
    let started = tokio::time::Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(10), get(&url, &[]))
        .await
        .expect("an answer, not a hang");
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The key is free again: the next request goes upstream itself at once, rather than
    // waiting on a fill that never ends.
    let second = tokio::time::timeout(Duration::from_secs(10), get(&url, &[]))
        .await
        .expect("an answer, not a hang");
    assert_eq!(second.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test]
async fn a_5xx_write_invalidates_and_one_refused_before_sending_does_not() {
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = impatient_gateway(&mock.url(), &secret, "30s", "max_body_size = \"1KiB\"").await;
    let (id, etag) = item(&mock, "g");
    let path = format!("/api/v1/usergroups/{id}");
    let status = |r: &Reply| r.header("cache-status").unwrap().to_string();
    get(&gw.url(&path), &[]).await;
    assert!(status(&get(&gw.url(&path), &[]).await).contains("hit"));

    // Too large to send: refused before the upstream saw anything, so nothing to invalidate.
    let refused = send(
        Method::PATCH,
        &gw.url(&path),
        &[("if-match", &format!("\"{etag}\""))],
        "x".repeat(2048),
    )
    .await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(status(&get(&gw.url(&path), &[]).await).contains("hit"));

    // A 5xx may follow a partial execution: the stored document goes.
    mock.state
        .set_fault(Fault::Status(StatusCode::INTERNAL_SERVER_ERROR), Some(1));
    let failed = rename(&gw.url(&path), &etag, "x").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let after = get(&gw.url(&path), &[]).await;
    assert!(!status(&after).contains("hit"), "{}", status(&after));
}
