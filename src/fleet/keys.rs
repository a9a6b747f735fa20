//! The Redis key layout, in one place.
//!
//! Every key of a credential partition carries the partition in a hash tag (`ccg:{P}:…`), so a
//! script's keys (an entry and the versions of its path, or the scopes a write invalidates)
//! always share one Redis Cluster slot. Paths are canonical (the canonical layer ran first);
//! versions are kept per path exactly (`x:`) and per subtree root (`s:`), mirroring the
//! in-memory epochs (`layers::cache::store::Epochs`), plus one generation per partition (`g`)
//! that invalidates the whole partition.
//!
//! Nothing here holds a secret: a partition is a keyed fingerprint of the credential's token,
//! never the token.

use sha2::{Digest, Sha256};

use crate::secrets::token::Fingerprint;

/// The pub/sub channel invalidations travel on.
pub const CHANNEL: &str = "ccg:invalidations";
/// The sorted set of live replicas (member: instance, score: last heartbeat in ms).
pub const REPLICAS: &str = "ccg:replicas";

fn partition_prefix(partition: &Fingerprint) -> String {
    format!("ccg:{{{}}}:", partition.to_hex())
}

/// A path without its trailing slashes, as the scopes name it (`/` is the root, `""`).
fn trimmed(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// The longest path, in bytes, whose responses are shared through Redis.
pub const MAX_SHARED_PATH: usize = 1024;
/// The deepest path, in segments, whose responses are shared (a path depends on one version
/// per ancestor: this bounds the keys one lookup reads).
pub const MAX_SHARED_DEPTH: usize = 16;

/// Whether responses of `path` may go through the shared tier: a client chooses paths, and
/// each segment is a key a lookup reads, so long and deep ones stay in the replica's memory.
pub fn shareable(path: &str) -> bool {
    path.len() <= MAX_SHARED_PATH && path.bytes().filter(|b| *b == b'/').count() <= MAX_SHARED_DEPTH
}

/// A scope's name in a key: the path hashed (128 bits), so a key's length does not grow with
/// the path a client sent.
fn scope(path: &str) -> String {
    hex::encode(&Sha256::digest(trimmed(path).as_bytes())[..16])
}

/// The version keys a stored response of `path` depends on: the partition's generation, the
/// path exactly, and the path and each ancestor as a subtree root, down to the root. A write
/// that invalidates any of these scopes bumps one of them.
pub fn versions_of(partition: &Fingerprint, path: &str) -> Vec<String> {
    let prefix = partition_prefix(partition);
    let path = trimmed(path);
    let mut keys = vec![format!("{prefix}g"), format!("{prefix}x:{}", scope(path))];
    let mut at = path;
    loop {
        keys.push(format!("{prefix}s:{}", scope(at)));
        match at.rfind('/') {
            Some(i) => at = &at[..i],
            None => break,
        }
    }
    keys
}

/// The version keys a write bumps: each exact path and each subtree root.
pub fn versions_bumped(
    partition: &Fingerprint,
    exact: &[impl AsRef<str>],
    roots: &[impl AsRef<str>],
) -> Vec<String> {
    let prefix = partition_prefix(partition);
    exact
        .iter()
        .map(|p| format!("{prefix}x:{}", scope(p.as_ref())))
        .chain(
            roots
                .iter()
                .map(|r| format!("{prefix}s:{}", scope(r.as_ref()))),
        )
        .collect()
}

/// The partition's generation key (bumped when a replica may have missed invalidations).
pub fn generation(partition: &Fingerprint) -> String {
    format!("{}g", partition_prefix(partition))
}

/// The key of one stored variant: the path and the variant (query and key headers) hashed, so
/// a key's length does not grow with what a client puts in its query.
pub fn entry(partition: &Fingerprint, path: &str, variant: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(path.as_bytes());
    hasher.update([0]);
    hasher.update(variant);
    let digest = hasher.finalize();
    format!(
        "{}e:{}",
        partition_prefix(partition),
        hex::encode(&digest[..16])
    )
}

/// A stored variant's key followed by its path's version keys: the keys of a lookup or a store.
pub fn entry_and_versions(partition: &Fingerprint, path: &str, variant: &[u8]) -> Vec<String> {
    let mut keys = vec![entry(partition, path, variant)];
    keys.extend(versions_of(partition, path));
    keys
}

/// The key of one client's budget under one rule (hashed: rule names and client ids are
/// configuration and identities, and a key of fixed length keeps Redis's memory predictable).
pub fn budget(rule: &str, client: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(rule.as_bytes());
    hasher.update([0]);
    hasher.update(client.as_bytes());
    format!("ccg:rate:{}", hex::encode(&hasher.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::token::FingerprintKey;

    #[test]
    fn a_path_depends_on_its_own_and_its_ancestors_scopes() {
        let p = FingerprintKey::fleet(None).fingerprint(b"t");
        let pre = partition_prefix(&p);
        let keys = versions_of(&p, "/api/v1/usergroups/10/");
        let short: Vec<_> = keys.iter().map(|k| k.strip_prefix(&pre).unwrap()).collect();
        let expected: Vec<String> = vec![
            "g".to_string(),
            format!("x:{}", scope("/api/v1/usergroups/10")),
            format!("s:{}", scope("/api/v1/usergroups/10")),
            format!("s:{}", scope("/api/v1/usergroups")),
            format!("s:{}", scope("/api/v1")),
            format!("s:{}", scope("/api")),
            format!("s:{}", scope("")),
        ];
        assert_eq!(short, expected);
        // A key's length does not depend on the path's.
        let long = format!("/api/v1/{}", "x".repeat(900));
        assert!(
            versions_of(&p, &long)
                .iter()
                .all(|k| k.len() <= pre.len() + 34)
        );
        assert!(shareable("/api/v1/usergroups/10"));
        assert!(!shareable(&format!(
            "/api/v1/{}",
            "x".repeat(MAX_SHARED_PATH)
        )));
        assert!(!shareable(&"/a".repeat(MAX_SHARED_DEPTH + 1)));
        // What a PATCH of that item bumps is among them: the collection's subtree, and its
        // parent exactly.
        let bumped = versions_bumped(&p, &["/api/v1"], &["/api/v1/usergroups"]);
        assert!(keys.contains(&bumped[1]));
        assert!(versions_of(&p, "/api/v1").contains(&bumped[0]));
        // The root `/` is the empty scope.
        assert_eq!(
            versions_bumped(&p, &[""; 0], &["/"]),
            [format!("{pre}s:{}", scope(""))]
        );
        // Every key of a partition shares one hash tag (one Redis Cluster slot).
        for k in keys.iter().chain(&bumped) {
            assert!(k.starts_with(&format!("ccg:{{{}}}:", p.to_hex())));
        }
        assert!(entry(&p, "/a", b"q").starts_with(&pre));
    }

    #[test]
    fn entries_and_budgets_are_distinct_per_input() {
        let p = FingerprintKey::fleet(None).fingerprint(b"t");
        assert_ne!(entry(&p, "/a", b"b"), entry(&p, "/a\0b", b""));
        assert_ne!(budget("r", "c"), budget("r", "d"));
        assert_ne!(budget("rc", ""), budget("r", "c"));
    }
}
