//! The CloudCasa API token: where it comes from, how it is kept fresh, and how it is shown.
//!
//! A [`TokenSource`] owns one credential's token. It reads a file (a mounted Kubernetes Secret) or
//! an environment variable, keeps the current value behind an atomic pointer for the hot path, and
//! re-reads the file when its directory changes (Kubernetes swaps a `..data` symlink), every second
//! as a fallback, and at once when the upstream answers 401. The token itself is only ever held
//! inside a sensitive [`HeaderValue`]; everything that prints shows a keyed [`Fingerprint`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderValue;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::config::TokenOrigin;

/// A per-process secret key for fingerprints, so a fingerprint reveals nothing about a token and
/// cannot be precomputed from a guessed one.
#[derive(Clone)]
pub struct FingerprintKey([u8; 32]);

impl FingerprintKey {
    /// A fresh random key from the operating system.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system's random source is unavailable");
        Self(key)
    }

    /// The key every replica of a fleet derives from the same secret (`fleet.partition_key_file`),
    /// so their fingerprints of one token agree and they share cache partitions; the secret
    /// itself never leaves the replicas. Without a secret, a published constant: fingerprints
    /// are then plain keyed hashes of the token, which reveal nothing of a random token but let
    /// whoever reads Redis test guesses of it (the README says so).
    pub fn fleet(secret: Option<&[u8]>) -> Self {
        use sha2::Digest;
        let mut hasher = Sha256::new();
        hasher.update(b"cloudcasa-gateway fleet partition key v1\0");
        hasher.update(secret.unwrap_or_default());
        Self(hasher.finalize().into())
    }

    /// HMAC-SHA256 of `data` under this key.
    pub fn fingerprint(&self, data: &[u8]) -> Fingerprint {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(data);
        Fingerprint(mac.finalize().into_bytes().into())
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

/// A keyed hash of a credential: stable within one process, safe to log and to use in cache keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// 64 lowercase hex digits: how Redis keys and fleet messages name a partition.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`Fingerprint::to_hex`]'s form.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out)
            .ok()
            .map(|()| Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..6]))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// One loaded token, ready to be injected. Its `Debug` shows the fingerprint only.
pub struct LoadedToken {
    authorization: HeaderValue,
    fingerprint: Fingerprint,
    loaded_at: SystemTime,
}

impl LoadedToken {
    fn new(token: &str, key: &FingerprintKey) -> Result<Self, TokenError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| TokenError::InvalidCharacters)?;
        authorization.set_sensitive(true);
        Ok(Self {
            authorization,
            fingerprint: key.fingerprint(token.as_bytes()),
            loaded_at: SystemTime::now(),
        })
    }

    /// The `Authorization` header value (`Bearer <token>`), marked sensitive so that hyper's
    /// HPACK encoder never indexes it.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// The keyed fingerprint of the token.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// When this value was loaded.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }
}

impl fmt::Debug for LoadedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedToken")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a token could not be loaded. Never carries the token's value.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The variable is unset or not valid UTF-8.
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// Only whitespace.
    #[error("the token is empty")]
    Empty,
    /// Characters that cannot appear in an HTTP header.
    #[error("the token contains characters that cannot appear in an HTTP header")]
    InvalidCharacters,
}

/// Counters about a token source, exported as metrics.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Successful loads that changed the token (the first load counts).
    pub reloads: AtomicU64,
    /// Failed load attempts.
    pub failures: AtomicU64,
}

/// A credential's token, kept current.
pub struct TokenSource {
    credential: String,
    origin: TokenOrigin,
    key: FingerprintKey,
    current: ArcSwapOption<LoadedToken>,
    reload_requested: Arc<Notify>,
    last_error: std::sync::Mutex<Option<String>>,
    /// Load counters.
    pub stats: TokenStats,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("credential", &self.credential)
            .field("origin", &self.origin)
            .field(
                "current",
                &self.current.load().as_deref().map(|t| t.fingerprint),
            )
            .finish()
    }
}

impl TokenSource {
    /// Creates the source and makes a first load attempt; a failure leaves it empty (the gateway
    /// still starts and reports not-ready until a token appears).
    pub fn new(credential: impl Into<String>, origin: TokenOrigin, key: FingerprintKey) -> Self {
        let source = Self {
            credential: credential.into(),
            origin,
            key,
            current: ArcSwapOption::empty(),
            reload_requested: Arc::new(Notify::new()),
            last_error: std::sync::Mutex::new(None),
            stats: TokenStats::default(),
        };
        source.reload();
        source
    }

    /// The credential's name (for logs, errors and audit records).
    pub fn credential(&self) -> &str {
        &self.credential
    }

    /// The token in use now, if one is loaded. Cheap: one atomic load.
    pub fn current(&self) -> Option<Arc<LoadedToken>> {
        self.current.load_full()
    }

    /// Asks the watcher to re-read the source now (after an upstream 401).
    pub fn request_reload(&self) {
        self.reload_requested.notify_one();
    }

    fn read(&self) -> Result<LoadedToken, TokenError> {
        let raw = match &self.origin {
            TokenOrigin::File(path) => {
                std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                    path: path.clone(),
                    source,
                })?
            }
            TokenOrigin::Env(name) => {
                std::env::var(name).map_err(|_| TokenError::EnvMissing(name.clone()))?
            }
        };
        let token = raw.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        LoadedToken::new(token, &self.key)
    }

    /// Reads the source once and swaps the token in if it changed. A failed read keeps the last
    /// good token: a Secret being swapped or briefly absent must not take the gateway down.
    /// Returns true when the token in use changed.
    pub fn reload(&self) -> bool {
        match self.read() {
            Ok(token) => {
                self.last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let previous = self.current.load();
                if previous.as_deref().map(|p| p.fingerprint) == Some(token.fingerprint) {
                    return false;
                }
                tracing::info!(
                    credential = %self.credential,
                    fingerprint = %token.fingerprint,
                    "CloudCasa token loaded"
                );
                self.current.store(Some(Arc::new(token)));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(err) => {
                let text = err.to_string();
                let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
                // Log each distinct failure once, not once a second while it persists.
                if last.as_deref() != Some(text.as_str()) {
                    tracing::warn!(credential = %self.credential, error = %text, "cannot load CloudCasa token");
                    *last = Some(text);
                }
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Starts watching the source. The task ends when the last `Arc` to the source is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) {
        let TokenOrigin::File(path) = &self.origin else {
            // An environment variable cannot change under a running process.
            return;
        };
        crate::secrets::watch::spawn(
            std::slice::from_ref(path),
            Arc::downgrade(self),
            Some(self.reload_requested.clone()),
        );
    }
}

impl crate::secrets::watch::Reload for TokenSource {
    fn reload(&self) {
        TokenSource::reload(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_token() {
        let key = FingerprintKey::random();
        let token = LoadedToken::new("super-secret-value", &key).unwrap();
        let shown = format!("{token:?} {} {:?}", token.fingerprint, token.authorization);
        assert!(!shown.contains("super-secret-value"), "{shown}");
        assert!(token.authorization.is_sensitive());
    }

    #[test]
    fn fingerprints_are_keyed() {
        let (a, b) = (FingerprintKey::random(), FingerprintKey::random());
        assert_eq!(a.fingerprint(b"t"), a.fingerprint(b"t"));
        assert_ne!(a.fingerprint(b"t"), b.fingerprint(b"t"));
        assert_ne!(a.fingerprint(b"t"), a.fingerprint(b"u"));
    }

    #[test]
    fn file_token_is_trimmed_and_failures_keep_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc\n").unwrap();
        let key = FingerprintKey::random();
        let source = TokenSource::new("default", TokenOrigin::File(path.clone()), key.clone());
        let first = source.current().unwrap();
        assert_eq!(first.authorization(), "Bearer abc");
        std::fs::remove_file(&path).unwrap();
        assert!(!source.reload());
        assert_eq!(source.current().unwrap().fingerprint(), first.fingerprint());
        assert_eq!(source.stats.failures.load(Ordering::Relaxed), 1);
        std::fs::write(&path, "\n").unwrap();
        assert!(!source.reload(), "an empty file is not a token");
        std::fs::write(&path, "def").unwrap();
        assert!(source.reload());
        assert_eq!(source.current().unwrap().authorization(), "Bearer def");
    }

    #[test]
    fn missing_source_starts_empty() {
        let source = TokenSource::new(
            "default",
            TokenOrigin::Env("CLOUDCASA_GATEWAY_TEST_UNSET_VARIABLE".into()),
            FingerprintKey::random(),
        );
        assert!(source.current().is_none());
    }

    #[test]
    fn header_breaking_token_is_refused() {
        let err = LoadedToken::new("a\nb", &FingerprintKey::random()).unwrap_err();
        assert!(matches!(err, TokenError::InvalidCharacters));
    }
}
