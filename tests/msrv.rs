//! `rust-version` in Cargo.toml (and the README) is true: no locked dependency needs a newer
//! Rust. Cargo only warns about such a dependency when resolving, and only on a toolchain older
//! than it needs, so a lockfile update could silently raise the real minimum past the stated one.

use std::process::Command;

/// "1.91", "1.88.0" → (1, 91, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|e| panic!("rust-version {text:?}: {e}"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_rust_version() {
    // `cargo metadata` without --filter-platform lists the packages of every target platform,
    // so a Windows- or macOS-only dependency counts too: rust-version is a promise for all.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--locked", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == env!("CARGO_PKG_NAME"))
        .and_then(|p| p["rust_version"].as_str())
        .expect("Cargo.toml states rust-version");
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (version(needs) > version(ours))
                .then(|| format!("{} {} needs {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "rust-version is {ours}, but: {too_new:?}; raise it in Cargo.toml and the README"
    );
    // Check the packages were really read: the lockfile has hundreds, most stating a version.
    assert!(
        packages
            .iter()
            .filter(|p| p["rust_version"].is_string())
            .count()
            > 50,
        "too few packages state a rust_version: is this the full metadata?"
    );

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&format!("Building needs Rust {ours} or newer")),
        "the README states a different minimum Rust than Cargo.toml's {ours}"
    );
}
