//! Kubernetes ServiceAccount tokens, checked with the cluster's TokenReview API.
//!
//! A review asks the API server whether the token is valid *for the gateway's audience*, and the
//! answer counts only if its `status.audiences` names that audience (an empty list means the
//! token was checked for the API server's own audience); only a ServiceAccount
//! (`system:serviceaccount:<namespace>:<name>`) is accepted. Results are cached by a hash of the
//! token for `clients.kubernetes.cache_ttl`, never past the token's own `exp`; refusals for a few
//! seconds. If the API server cannot be asked, the caller gets 503: an outage never turns into
//! access.
//!
//! The API server is a shared resource an unauthenticated client must not be able to flood:
//! what cannot be a valid ServiceAccount token for this audience (not a JWS with a JSON header
//! naming an asymmetric `alg`, an `exp` in the past, an `aud` claim without the audience) is
//! refused without asking, and calls are bounded in concurrency and rate
//! (`max_concurrent_reviews`, `review_rate`); past the bound the caller gets 503 with
//! `Retry-After`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::KubernetesConfig;
use crate::config::TokenOrigin;
use crate::context::{AuthMethod, ClientIdentity, Review, ReviewResult};
use crate::http::error::GatewayError;
use crate::secrets::token::{FingerprintKey, TokenSource};

/// How long a refusal is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum Reviewed {
    Valid(Arc<ClientIdentity>, Duration),
    Refused(String),
}

impl Reviewed {
    fn into_identity(self) -> Result<Arc<ClientIdentity>, GatewayError> {
        match self {
            Reviewed::Valid(identity, _) => Ok(identity),
            Reviewed::Refused(why) => Err(GatewayError::Unauthenticated(why)),
        }
    }
}

/// Checks ServiceAccount tokens.
pub struct TokenReviewer {
    url: Uri,
    audience: String,
    cache_ttl: Duration,
    timeout: Duration,
    own_token: Arc<TokenSource>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    cache: moka::future::Cache<[u8; 32], Reviewed>,
    in_flight: Arc<tokio::sync::Semaphore>,
    rate: governor::DefaultDirectRateLimiter,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("url", &self.url)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

struct Expiry;

impl moka::Expiry<[u8; 32], Reviewed> for Expiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Reviewed,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            Reviewed::Valid(_, ttl) => *ttl,
            Reviewed::Refused(_) => NEGATIVE_TTL,
        })
    }
}

#[derive(Deserialize)]
struct ReviewResponse {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: Option<ReviewUser>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ReviewUser {
    username: String,
}

/// The TokenReview client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReviewerSetupError {
    /// The API server's CA bundle is unusable.
    #[error("clients.kubernetes.ca_file: {0}")]
    CaFile(#[source] crate::http::pem::PemError),
    /// rustls refused the configuration.
    #[error("clients.kubernetes: TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The TokenReview URL cannot be formed from the API server's.
    #[error("clients.kubernetes.api_server: {0}")]
    Url(#[from] http::uri::InvalidUri),
}

impl TokenReviewer {
    /// What [`TokenReviewer::new`] builds from files and text, without starting anything:
    /// `--check` runs it, so that nothing it accepts fails at start.
    pub fn check(config: &KubernetesConfig) -> Result<(), ReviewerSetupError> {
        Self::tls_and_url(config).map(drop)
    }

    /// The client's TLS configuration (trusting only the cluster's CA) and the TokenReview URL.
    fn tls_and_url(
        config: &KubernetesConfig,
    ) -> Result<(rustls::ClientConfig, http::Uri), ReviewerSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        crate::http::pem::add_pem_roots(&mut roots, &config.ca_file)
            .map_err(ReviewerSetupError::CaFile)?;
        let tls = crate::http::pem::client_config(roots)?;
        let base = config.api_server.to_string();
        let url = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            base.trim_end_matches('/')
        )
        .parse()?;
        Ok((tls, url))
    }

    /// Builds the client: trusts only the cluster's CA, authenticates with the gateway's own
    /// ServiceAccount token (re-read as it rotates).
    pub fn new(config: &KubernetesConfig) -> Result<Self, ReviewerSetupError> {
        let (tls, url) = Self::tls_and_url(config)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let own_token = Arc::new(TokenSource::new(
            "kubernetes-serviceaccount",
            TokenOrigin::File(config.token_file.clone()),
            FingerprintKey::random(),
        ));
        own_token.spawn_watcher();
        Ok(Self {
            url,
            audience: config.audience.clone(),
            cache_ttl: config.cache_ttl,
            timeout: config.timeout,
            own_token,
            client: Client::builder(TokioExecutor::new()).build(https),
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .expire_after(Expiry)
                .build(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_reviews as usize,
            )),
            rate: governor::RateLimiter::direct(config.review_rate.quota()),
        })
    }

    /// Reviews a bearer token: the identity, 401 for a token that is not valid here, or 503
    /// when the API server cannot say; and, when the token was not in the review cache, what
    /// became of it (for the observer to count).
    pub async fn review(
        &self,
        token: &str,
    ) -> (Result<Arc<ClientIdentity>, GatewayError>, Option<Review>) {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(r) = self.cache.get(&key).await {
            return (r.into_identity(), None);
        }
        let fact = |result, elapsed| Some(Review { result, elapsed });
        if let Err(why) = precheck(token, &self.audience, SystemTime::now()) {
            let refused = GatewayError::Unauthenticated(format!(
                "not a valid ServiceAccount token for this gateway ({why})"
            ));
            return (Err(refused), fact(ReviewResult::Prechecked, None));
        }
        let _permit = match self.admit() {
            Ok(permit) => permit,
            Err(e) => return (Err(e), fact(ReviewResult::Throttled, None)),
        };
        let started = std::time::Instant::now();
        let asked = self.ask(token).await;
        let result = match &asked {
            Ok(Reviewed::Valid(..)) => ReviewResult::Authenticated,
            Ok(Reviewed::Refused(_)) => ReviewResult::Refused,
            Err(_) => ReviewResult::Error,
        };
        let review = fact(result, Some(started.elapsed()));
        match asked {
            Ok(r) => {
                self.cache.insert(key, r.clone()).await;
                (r.into_identity(), review)
            }
            Err(e) => (Err(e), review),
        }
    }

    /// A place among the TokenReview calls allowed now, or 503 with a time to retry.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        use governor::clock::{Clock, DefaultClock};
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            GatewayError::IdentityThrottled {
                retry_after: Duration::from_secs(1),
            }
        })?;
        if let Err(not_until) = self.rate.check() {
            return Err(GatewayError::IdentityThrottled {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            });
        }
        Ok(permit)
    }

    async fn ask(&self, token: &str) -> Result<Reviewed, GatewayError> {
        let unavailable =
            |why: String| GatewayError::IdentityUnavailable(format!("TokenReview failed: {why}"));
        let Some(own) = self.own_token.current() else {
            return Err(unavailable(
                "the gateway's own ServiceAccount token is not loaded".into(),
            ));
        };
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::AUTHORIZATION, own.authorization().clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| unavailable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| crate::http::error::chain_text(&e))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))?
            .map_err(unavailable)?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            return Err(unavailable(format!(
                "the API server answered {status} (does the gateway's ServiceAccount have \
                 system:auth-delegator?)"
            )));
        }
        let review: ReviewResponse = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("unreadable TokenReview response: {e}")))?;
        let st = review.status;
        if !st.authenticated {
            let why = st.error.unwrap_or_else(|| "token not valid".into());
            return Ok(Reviewed::Refused(format!(
                "Kubernetes token rejected ({})",
                why.chars().take(200).collect::<String>()
            )));
        }
        // An empty list means the API server checked the token for its own audience, not ours.
        if !st.audiences.contains(&self.audience) {
            return Ok(Reviewed::Refused(format!(
                "Kubernetes token is not for audience '{}'",
                self.audience
            )));
        }
        let username = st.user.map(|u| u.username).unwrap_or_default();
        if !username.starts_with("system:serviceaccount:") {
            return Ok(Reviewed::Refused(
                "only ServiceAccount tokens are accepted".into(),
            ));
        }
        let ttl = match token_expiry(token) {
            Some(exp) => match exp.duration_since(SystemTime::now()) {
                Ok(left) => left.min(self.cache_ttl),
                Err(_) => Duration::ZERO,
            },
            None => self.cache_ttl,
        };
        Ok(Reviewed::Valid(
            Arc::new(ClientIdentity {
                id: username.into(),
                method: AuthMethod::Kubernetes,
            }),
            ttl,
        ))
    }
}

/// Whether a bearer token is shaped like a JWT (three base64url segments), as ServiceAccount
/// tokens are; API keys are not.
pub fn is_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let shaped = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        })
    };
    shaped(parts.next()) && shaped(parts.next()) && shaped(parts.next()) && parts.next().is_none()
}

/// Refuses, without asking the API server, what cannot be a ServiceAccount token valid for
/// `audience` at `now`: the signature is the API server's to check, but the header must be JSON
/// naming an asymmetric `alg` (the API server signs with RS256 or ES256), and the claims, when
/// present, must not say the token expired or was issued for other audiences.
pub fn precheck(token: &str, audience: &str, now: SystemTime) -> Result<(), &'static str> {
    if !is_jwt(token) {
        return Err("not a JWT");
    }
    let mut parts = token.split('.');
    let decode = |part: Option<&str>| {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part?.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()
    };
    let header = decode(parts.next()).ok_or("its header is not base64url JSON")?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    const ASYMMETRIC: [&str; 10] = [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    ];
    if !ASYMMETRIC.contains(&alg) {
        return Err("its header names no asymmetric signature algorithm");
    }
    let claims = decode(parts.next()).ok_or("its claims are not base64url JSON")?;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_u64().ok_or("its exp is not a number of seconds")?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if exp <= now {
            return Err("it has expired");
        }
    }
    let for_us = match claims.get("aud") {
        None => true,
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        Some(_) => false,
    };
    if !for_us {
        return Err("it was issued for another audience");
    }
    Ok(())
}

/// The `exp` claim of a JWT, read without verifying it (the API server verifies); used only to
/// bound how long a review is cached.
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()?;
    // A client's number: an `exp` past what SystemTime holds is no expiry we can use.
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(header: &str, claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes());
        format!("{}.{}.c2ln", b(header), b(claims))
    }

    #[test]
    fn precheck_refuses_what_cannot_be_a_valid_token() {
        let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let rs = r#"{"alg":"RS256","kid":"k"}"#;
        let ok = |claims: &str| precheck(&jwt(rs, claims), "gw", now);
        assert_eq!(ok(r#"{"aud":["gw","x"],"exp":2000000000}"#), Ok(()));
        assert_eq!(ok(r#"{"aud":"gw"}"#), Ok(()));
        assert_eq!(ok(r#"{"sub":"legacy"}"#), Ok(()));
        assert!(ok(r#"{"aud":["api"],"exp":2000000000}"#).is_err());
        assert!(ok(r#"{"aud":[],"exp":2000000000}"#).is_err());
        assert!(ok(r#"{"aud":"gw","exp":1800000000}"#).is_err());
        assert!(ok(r#"{"aud":"gw","exp":"soon"}"#).is_err());
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{}"#,
            "not json",
        ] {
            assert!(
                precheck(&jwt(header, r#"{"aud":"gw"}"#), "gw", now).is_err(),
                "{header}"
            );
        }
        assert!(precheck("aaaa.bbbb.cccc", "gw", now).is_err());
        assert!(precheck("plain-key", "gw", now).is_err());
    }

    #[test]
    fn jwt_shape_and_expiry() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"exp":2000000000,"sub":"x"}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        assert!(is_jwt(&token));
        assert!(!is_jwt("plain-api-key"));
        assert!(!is_jwt("a.b"));
        assert_eq!(
            token_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(token_expiry("a.b.c"), None);
    }
}
