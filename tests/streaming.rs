//! Streaming in bounded memory. A test binary of its own: it measures the process's RSS, which
//! other tests running concurrently in the same process would disturb.

mod support;

use bytes::Bytes;
use http::StatusCode;
use support::*;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_bounded_memory() {
    use http_body_util::BodyExt;
    let mock = MockCloudCasa::start().await;
    let secret = SecretDir::new("token-a");
    let gw = TestGateway::for_mock(&mock, &secret, "[server]\nmax_body_size = \"2GiB\"").await;
    const GIB: u64 = 1024 * 1024 * 1024;
    let before = rss_bytes();

    // 1 GiB download, read chunk by chunk.
    let resp = client()
        .request(
            http::Request::get(gw.url(&format!("/api/v1/_blob?size={GIB}")))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame
            .unwrap()
            .into_data()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(received, GIB);

    // 256 MiB upload, produced lazily by a channel-fed body.
    let (mut tx, upload) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let producer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'y'; 1024 * 1024]);
        for _ in 0..256 {
            tx.send_data(chunk.clone()).await.unwrap();
        }
    });
    let upload_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = upload_client
        .request(
            http::Request::post(gw.url("/api/v1/_blob"))
                .body(upload)
                .unwrap(),
        )
        .await
        .unwrap();
    producer.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["received"], 256 * 1024 * 1024);

    let grown = rss_bytes().saturating_sub(before);
    eprintln!("RSS grew by {} MiB while streaming 1.25 GiB", grown >> 20);
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {} MiB while streaming 1.25 GiB",
        grown >> 20
    );
}
