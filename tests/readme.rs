//! The README's quickstart, request by request: the same configuration file (config/local.toml),
//! the same mock seeds, the same methods, headers and bodies as its curl commands, and the same
//! rotation by rewriting a copy of the token file (tests/readme_quickstart.sh, from .ci/run,
//! runs the shell blocks themselves); and the README's Development block is what CI runs.

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

/// Shell lines with `\` continuations joined, comments and blank lines dropped, whitespace
/// collapsed.
fn commands(shell: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in shell.lines() {
        // A comment: `#` at the start or after two spaces (no command here has `  #` in quotes).
        let line = match line.trim_start().starts_with('#') {
            true => "",
            false => line.split("  #").next().unwrap(),
        };
        let (line, continued) = match line.trim_end().strip_suffix('\\') {
            Some(l) => (l, true),
            None => (line, false),
        };
        pending.push(' ');
        pending.push_str(line);
        if !continued {
            let command = pending.split_whitespace().collect::<Vec<_>>().join(" ");
            if !command.is_empty() {
                out.push(command);
            }
            pending.clear();
        }
    }
    out
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The first ```sh block after `marker`.
fn block_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in README.md"));
    let start = at + text[at..].find("```sh\n").unwrap() + "```sh\n".len();
    &text[start..start + text[start..].find("```").unwrap()]
}

/// The README's "Development" block is what `.ci/run` runs, command for command (pip flags
/// included).
#[test]
fn the_development_block_is_what_ci_runs() {
    let readme = readme();
    let development = commands(block_after(&readme, "\n## Development\n"));
    assert!(development.len() >= 8, "{development:?}");
    let ci = commands(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap(),
    );
    let missing: Vec<_> = development.iter().filter(|c| !ci.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "README commands .ci/run does not run as written: {missing:?}\n.ci/run: {ci:#?}"
    );
}

/// tests/readme_quickstart.sh (run by .ci/run) finds every block it runs.
#[test]
fn the_blocks_ci_runs_are_marked() {
    let readme = readme();
    for name in ["demo", "terminal-1", "terminal-2", "terminal-3", "overlay"] {
        let marker = format!("<!-- readme-run: {name} -->\n```sh\n");
        assert!(readme.contains(&marker), "no {marker:?} in README.md");
    }
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/readme_quickstart.sh"
    ))
    .unwrap();
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(ci.contains("\nbash tests/readme_quickstart.sh\n"));
    for name in ["demo", "terminal-1", "terminal-2", "terminal-3", "overlay"] {
        assert!(script.contains(name), "the script does not run {name}");
    }
}
