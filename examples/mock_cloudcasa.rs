//! The mock CloudCasa API used by the tests, as a program: for the quickstart and the benchmark.
//!
//! `cargo run --example mock_cloudcasa -- [ADDR]` (default 127.0.0.1:8090). It accepts the
//! tokens `token-a` and `token-b` (two tenants) and seeds a few documents.

#[path = "../tests/support/mock.rs"]
mod mock;
#[path = "../tests/support"]
mod support {
    pub mod tls;
}

use serde_json::json;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let addr = addr.parse().unwrap_or_else(|_| {
        eprintln!("usage: mock_cloudcasa [ADDR], e.g. 127.0.0.1:8090");
        std::process::exit(2);
    });
    let mock = mock::MockCloudCasa::start_on(addr, None).await;
    for name in ["testusergroup", "ops"] {
        mock.state
            .seed("a", "usergroups", json!({"name": name, "users": []}));
    }
    mock.state.seed(
        "a",
        "clusters",
        json!({"name": "prod-eu-1", "status": {"state": "ACTIVE"}}),
    );
    println!(
        "mock CloudCasa listening on {} (tokens: token-a, token-b)",
        mock.url()
    );
    let _ = tokio::signal::ctrl_c().await;
}
