//! The token never appears in logs, error bodies or responses. A test binary of its own because
//! it installs the process-wide log subscriber, at TRACE, capturing everything.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_reach_logs_or_responses() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .init();

    let gateway_token = "token-a";
    let second_token = "rotated-secret-9f8e7d";
    let client_secret = "client-own-secret-123";
    let mock = MockCloudCasa::start().await;
    mock.state.add_token(second_token, "a");
    let mut secret = SecretDir::new(gateway_token);
    let gw = TestGateway::start(&format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"300ms\"\n[token]\nfile = \"{}\"",
        mock.url(),
        secret.token_path().display()
    ))
    .await;
    let auth = format!("Bearer {client_secret}");
    let mut replies = Vec::new();

    replies.push(get(&gw.url("/api/v1/usergroups"), &[("authorization", &auth)]).await);
    replies.push(
        send(
            Method::PATCH,
            &gw.url("/api/v1/usergroups/nope"),
            &[("authorization", &auth)],
            "{}",
        )
        .await,
    );
    mock.state
        .set_fault(Fault::Delay(Duration::from_secs(2)), Some(1));
    replies.push(get(&gw.url("/api/v1/slow"), &[]).await);
    mock.state.set_fault(Fault::Reset, Some(1));
    replies.push(get(&gw.url("/api/v1/reset"), &[]).await);
    mock.state
        .set_fault(Fault::Status(StatusCode::SERVICE_UNAVAILABLE), Some(1));
    replies.push(get(&gw.url("/api/v1/fail"), &[]).await);
    // An upstream 401 (the mock forgets the token), which makes the gateway re-read the token.
    mock.state.add_token(gateway_token, "nobody-knows");
    secret.rotate(second_token);
    eventually(Duration::from_secs(3), "the rotated token", || async {
        get(&gw.url("/api/v1/usergroups"), &[]).await;
        mock.state.last().header("authorization") == Some(&format!("Bearer {second_token}"))
    })
    .await;
    // The Secret disappears: requests keep the last good token, logs say why.
    std::fs::remove_file(secret.token_path()).unwrap();
    let watched = logs.clone();
    eventually(
        Duration::from_secs(3),
        "the load failure to be logged",
        || {
            let seen = String::from_utf8_lossy(&watched.0.lock().unwrap())
                .contains("cannot load CloudCasa token");
            async move { seen }
        },
    )
    .await;
    replies.push(get(&gw.url("/api/v1/usergroups"), &[("authorization", &auth)]).await);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 404, 504, 502, 503, 200]);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("CloudCasa token loaded"),
        "the capture works: {logs}"
    );
    for secret_value in [gateway_token, second_token, client_secret] {
        assert!(
            !logs.contains(secret_value),
            "{secret_value} appears in the logs"
        );
        for reply in &replies {
            assert!(!format!("{:?}", reply.headers).contains(secret_value));
            assert!(
                !reply.text().contains(secret_value),
                "{secret_value} in {}",
                reply.text()
            );
        }
    }
}
