//! The README's quickstart, request by request: the same configuration file (config/local.toml),
//! the same mock seeds, the same methods, headers and bodies as its curl commands, and the same
//! rotation by rewriting a copy of the token file.

mod support;

use std::time::Duration;

use cloudcasa_gateway::Gateway;
use cloudcasa_gateway::config::{Config, Overrides};
use http::{Method, StatusCode};
use serde_json::json;
use support::*;

#[tokio::test]
async fn the_quickstart_works_as_written() {
    let mock = MockCloudCasa::start().await;
    for name in ["testusergroup", "ops"] {
        mock.state
            .seed("a", "usergroups", json!({"name": name, "users": []}));
    }
    // `cp config/local-token /tmp/cloudcasa-token`
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("cloudcasa-token");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/local-token"),
        &token,
    )
    .unwrap();
    // `cargo run -- --config config/local.toml --token-file /tmp/cloudcasa-token`, on free
    // ports and in front of this test's mock.
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        upstream: Some(mock.url()),
        token_file: Some(token.clone()),
    };
    let config = Config::load(
        Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/local.toml"
        ))),
        &overrides,
    )
    .unwrap();
    let gateway = Gateway::bind(config).await.unwrap();
    let (proxy, admin) = (gateway.proxy_addr(), gateway.admin_addr());
    let _running = tokio::spawn(gateway.run(std::future::pending()));
    let url = |path: &str| format!("http://{proxy}{path}");

    let list = get(&url("/api/v1/usergroups"), &[]).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let first = &list.json()["_items"][0];
    let (id, etag) = (
        first["_id"].as_str().unwrap().to_string(),
        first["_etag"].as_str().unwrap().to_string(),
    );
    let item = get(&url(&format!("/api/v1/usergroups/{id}")), &[]).await;
    assert_eq!(item.status, StatusCode::OK);
    let json = [("content-type", "application/json")];
    let without = send(
        Method::PATCH,
        &url(&format!("/api/v1/usergroups/{id}")),
        &json,
        r#"{"name":"renamed"}"#,
    )
    .await;
    assert_eq!(without.status.as_u16(), 428);
    let with = send(
        Method::PATCH,
        &url(&format!("/api/v1/usergroups/{id}")),
        &[json[0], ("if-match", &etag)],
        r#"{"name":"renamed"}"#,
    )
    .await;
    assert_eq!(with.status, StatusCode::OK, "{}", with.text());
    assert_eq!(
        mock.state.last().header("content-type"),
        Some("application/json")
    );
    let ready = get(&format!("http://{admin}/readyz"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK);

    // `echo token-b > /tmp/cloudcasa-token`: picked up within a second (tenant b sees none of
    // tenant a's groups).
    std::fs::write(&token, "token-b\n").unwrap();
    eventually(Duration::from_secs(3), "the rotated token in use", || {
        let list = url("/api/v1/usergroups");
        async move {
            get(&list, &[]).await.json()["_items"]
                .as_array()
                .is_some_and(Vec::is_empty)
        }
    })
    .await;
}
