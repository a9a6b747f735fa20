//! API keys: a TOML file of `key-id = "sha256:<64 hex>"` lines, re-read when it changes.
//!
//! Only hashes are stored, so the file is not a secret worth stealing; a presented key is hashed
//! and compared with every stored hash in constant time (no early exit on a match), so timing
//! reveals neither which key matched nor how much of a hash did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The namespace of API-key identities: the key `backup-bot` identifies `apikey:backup-bot`.
pub const API_KEY_PREFIX: &str = "apikey:";

/// Key ids (with [`API_KEY_PREFIX`]) with the SHA-256 of their keys.
pub type KeyHashes = Vec<(Arc<str>, [u8; 32])>;

/// The keys file, kept current.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    keys: ArcSwap<KeyHashes>,
    last: Mutex<Option<String>>,
}

/// The line for a keys file: `id = "sha256:<hex>"`.
pub fn key_line(id: &str, key: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    let id_is_bare = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let id = if id_is_bare {
        id.to_string()
    } else {
        toml::Value::String(id.to_string()).to_string()
    };
    format!("{id} = \"sha256:{digest}\"")
}

/// Parses the file's text. Refused: an empty id, an id with control characters,
/// a value that is not a SHA-256, and two ids sharing one hash (two clients with one key could
/// not be told apart). TOML itself refuses an id given twice.
pub fn parse(text: &str) -> Result<KeyHashes, String> {
    let table: BTreeMap<String, String> =
        toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut keys: KeyHashes = Vec::with_capacity(table.len());
    for (id, value) in table {
        if let Some(problem) = id_problem(&id) {
            return Err(format!("{id:?}: {problem}"));
        }
        let hex_digest = value
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{id}: the value must be \"sha256:<64 hex digits>\""))?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest)
            .map_err(|_| format!("{id}: \"{hex_digest}\" is not 64 hex digits"))?;
        if let Some((other, _)) = keys.iter().find(|(_, d)| *d == digest) {
            return Err(format!(
                "{id} and {} have the same key hash: give every client a key of its own",
                &other[API_KEY_PREFIX.len()..]
            ));
        }
        // Stored in its namespace, so that no other kind of identity can take its name.
        keys.push((Arc::from(format!("{API_KEY_PREFIX}{id}")), digest));
    }
    Ok(keys)
}

/// Why `id` cannot name an API key, if it cannot.
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        return Some("a key id must not be empty");
    }
    if id.chars().any(char::is_control) {
        return Some("a key id must not contain control characters");
    }
    None
}

/// Roughly how many bits of randomness a key of this shape can hold: its length times the bits
/// of the smallest usual alphabet its characters fit (hex 4, base32 5, alphanumeric or base64 6,
/// printable ASCII 6.5). Used to refuse keys that are too short to resist guessing.
pub fn key_bits(key: &str) -> f64 {
    let per_char = if key.bytes().all(|b| b.is_ascii_hexdigit()) {
        4.0
    } else if key
        .bytes()
        .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    {
        5.0
    } else if key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=_-".contains(&b))
    {
        6.0
    } else {
        6.5
    };
    key.chars().count() as f64 * per_char
}

/// The least a key must hold: 128 bits (32 hex characters, 22 of base64).
pub const MIN_KEY_BITS: f64 = 128.0;

/// The API keys file cannot be used; the message names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysError {
    /// The file cannot be read.
    #[error("clients.api_keys.file: cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid keys file.
    #[error("clients.api_keys.file: {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the entry.
        reason: String,
    },
}

impl ApiKeys {
    /// Loads the file; at start a bad or missing file is an error.
    pub fn load(path: &Path) -> Result<Arc<Self>, ApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let keys = parse(&text).map_err(|reason| ApiKeysError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        tracing::info!(file = %path.display(), keys = keys.len(), "API keys loaded");
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            keys: ArcSwap::from_pointee(keys),
            last: Mutex::new(Some(text)),
        }))
    }

    /// The key id whose hash matches `key`.
    pub fn identify(&self, key: &str) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let keys = self.keys.load();
        let mut found = None;
        for (id, stored) in keys.iter() {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(id.clone());
            }
        }
        found
    }

    /// Starts watching the file.
    pub fn spawn_watcher(self: &Arc<Self>) {
        crate::secrets::watch::spawn(std::slice::from_ref(&self.path), Arc::downgrade(self), None);
    }
}

impl crate::secrets::watch::Reload for ApiKeys {
    fn reload(&self) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            // Being replaced, or gone: keep the keys in use.
            return;
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        match parse(&text) {
            Ok(keys) => {
                tracing::info!(file = %self.path.display(), keys = keys.len(), "API keys reloaded");
                self.keys.store(Arc::new(keys));
            }
            Err(e) => tracing::error!(
                file = %self.path.display(), error = %e,
                "API keys file is invalid; the previous keys stay in use"
            ),
        }
        *last = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_match() {
        let line = key_line("backup-bot", "s3cret");
        assert!(line.starts_with("backup-bot = \"sha256:"), "{line}");
        let odd = key_line("team a", "k");
        assert!(odd.starts_with("\"team a\" = "), "{odd}");
        let keys = parse(&format!("{line}\n{odd}\n")).unwrap();
        assert_eq!(keys.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let api = ApiKeys::load(&path).unwrap();
        assert_eq!(api.identify("s3cret").as_deref(), Some("apikey:backup-bot"));
        assert_eq!(api.identify("s3cre"), None);
    }

    #[test]
    fn ids_and_hashes_are_unique_and_keys_long_enough() {
        let a = key_line("a", "same-key");
        let b = key_line("b", "same-key");
        assert!(
            parse(&format!("{a}\n{b}\n"))
                .unwrap_err()
                .contains("same key hash")
        );
        assert!(
            parse(&format!("{a}\n{a}\n")).is_err(),
            "TOML refuses a repeated id"
        );
        assert!(parse(&key_line("", "k")).unwrap_err().contains("empty"));
        assert!(
            parse(&key_line("a\tb", "k"))
                .unwrap_err()
                .contains("control")
        );
        assert!(key_bits(&"0123456789abcdef".repeat(2)) >= MIN_KEY_BITS);
        assert!(key_bits(&"0123456789abcdef".repeat(2)[..31]) < MIN_KEY_BITS);
        assert!(key_bits("dGhpcyBpcyAyMiBjaGFycw") >= MIN_KEY_BITS);
        assert!(key_bits("short-key") < MIN_KEY_BITS);
    }

    #[test]
    fn bad_files_are_explained() {
        assert!(parse("a = \"md5:00\"").unwrap_err().contains("sha256"));
        assert!(parse("a = \"sha256:zz\"").unwrap_err().contains("64 hex"));
        assert!(parse("a = ").is_err());
    }
}
