//! The mock CloudCasa and the gateway in one process, for a look before configuring anything.
//!
//! `cargo run --example demo`: the mock on 127.0.0.1:8090 (tenant `a`, token `token-a`, a few
//! documents), the gateway on 127.0.0.1:8080 (admin 127.0.0.1:9901) with the token in a
//! temporary file, and the curl commands to try. Ctrl-C stops both.

#[path = "../tests/support/mock.rs"]
mod mock;
#[path = "../tests/support"]
mod support {
    pub mod tls;
}

use cloudcasa_gateway::Gateway;
use cloudcasa_gateway::config::{Config, Overrides};
use serde_json::json;

#[tokio::main]
async fn main() {
    let mock = mock::MockCloudCasa::start_on("127.0.0.1:8090".parse().unwrap(), None).await;
    let group = mock
        .state
        .seed("a", "usergroups", json!({"name": "ops", "users": []}));
    mock.state.seed(
        "a",
        "clusters",
        json!({"name": "prod-eu-1", "status": {"state": "ACTIVE"}}),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token = dir.path().join("token");
    std::fs::write(&token, "token-a\n").expect("the token file");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n\
         [upstream]\nurl = \"{}\"\n[token]\nfile = \"{}\"\n[cache]\nfresh_for = \"10s\"\n\
         [audit]\npath = \"{}\"\n",
        mock.url(),
        token.display(),
        dir.path().join("audit.jsonl").display()
    );
    let raw = Config::parse(&toml).expect("the demo configuration parses");
    let config = Config::from_raw(raw, &Overrides::default()).expect("the demo configuration");
    let gateway = match Gateway::bind(config).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot start the gateway: {e} (is something on 8080, 8090 or 9901?)");
            std::process::exit(1);
        }
    };
    let (id, etag) = (
        group["_id"].as_str().unwrap(),
        group["_etag"].as_str().unwrap(),
    );
    println!(
        "The mock CloudCasa listens on {mock}, the gateway on http://127.0.0.1:8080 (it holds the\n\
         token; clients hold none). Try:\n\n\
         curl -i http://127.0.0.1:8080/api/v1/usergroups\n\
         curl -i http://127.0.0.1:8080/api/v1/usergroups/{id}            # again: Cache-Status: hit\n\
         curl -i -X PATCH -H 'Content-Type: application/json' -d '{{\"name\":\"renamed\"}}' \\\n  \
           http://127.0.0.1:8080/api/v1/usergroups/{id}                    # 428: If-Match required\n\
         curl -i -X PATCH -H 'Content-Type: application/json' -H 'If-Match: \"{etag}\"' \\\n  \
           -d '{{\"name\":\"renamed\"}}' http://127.0.0.1:8080/api/v1/usergroups/{id}\n\
         curl -i -X TRACE http://127.0.0.1:8080/api/v1/usergroups         # 501: never forwarded\n\
         curl -s http://127.0.0.1:9901/metrics | grep cloudcasa_gateway_requests_total\n\
         cat {audit}                                                       # the audit trail\n\n\
         Ctrl-C stops both.",
        mock = mock.url(),
        audit = dir.path().join("audit.jsonl").display(),
    );
    gateway
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
}
