//! Errors the gateway produces itself, and the one place they become HTTP responses.
//!
//! Every layer returns [`GatewayError`]; [`GatewayError::into_response`] renders CloudCasa's error
//! envelope `{"_status":"ERR","_error":{"code":N,"message":"..."}}`. Messages are written here from
//! the error's own fields, never from request headers, so no credential can reach an error body.

use std::convert::Infallible;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::http::body::{self, Body, BoxError};

/// What went wrong, as far as the client needs to know.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request could not be understood (bad header value, bad URI).
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// The request path cannot be made canonical (dot segments, encoded separators, empty
    /// segments): refused before policy, so no rule can be matched on a path the upstream
    /// would read differently.
    #[error("invalid request path: {0}")]
    InvalidPath(String),
    /// The method is not in `server.methods` (or is never forwarded, like TRACE and CONNECT).
    #[error("method {0} is not forwarded by this gateway")]
    UnsupportedMethod(String),
    /// A method-override header where the gateway does not honour one.
    #[error("method override refused: {0}")]
    MethodOverride(String),
    /// The client's request body broke off or was malformed (a bad chunk, a short body).
    #[error("the request body could not be read: {0}")]
    BadRequestBody(#[source] BoxError),
    /// The client stopped sending its request body for `server.body_timeout`.
    #[error("the request body stalled: no bytes for {}", humantime::format_duration(*.0))]
    BodyTimeout(Duration),
    /// The upstream's response could not be parsed (oversized or malformed headers, a broken
    /// message): the upstream is reachable but broken.
    #[error("CloudCasa upstream sent a malformed response: {0}")]
    UpstreamProtocol(#[source] BoxError),
    /// The request body exceeds `server.max_body_size` (or, chunked for an HTTP/1.0 upstream,
    /// which needs it whole, `upstream.max_buffered_bodies`).
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
    /// No usable token is loaded for the credential the request would use.
    #[error("no CloudCasa API token is loaded for credential '{credential}'")]
    NoToken {
        /// The credential's name (never its value).
        credential: String,
    },
    /// The upstream could not be reached (DNS, connect, TLS, reset).
    #[error("CloudCasa upstream unreachable: {0}")]
    UpstreamUnreachable(#[source] BoxError),
    /// The upstream did not answer with response headers within `upstream.timeout`.
    #[error("CloudCasa upstream did not answer within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    /// The client sent `Cache-Control: only-if-cached` and nothing usable is stored.
    #[error("not in the gateway's cache (the request said only-if-cached)")]
    NotCached,
    /// Fail-closed auditing could not record the intent of a write, so it was not forwarded.
    #[error("the write was not forwarded because its audit record could not be written ({0})")]
    AuditUnavailable(String),
    /// The caller could not be identified (or its credential is not valid here).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's identity could not be checked (the Kubernetes API server is unreachable).
    #[error("cannot check the client's identity now: {0}")]
    IdentityUnavailable(String),
    /// Too many TokenReview calls are in flight or were made recently; the caller may retry.
    #[error("too many client identities to check right now; retry in {}s", retry_after_secs(*retry_after))]
    IdentityThrottled {
        /// When to try again.
        retry_after: Duration,
    },
    /// No policy rule lets this caller make this request.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The caller is over its rule's rate.
    #[error("rate limit exceeded; retry in {}s", retry_after_secs(*retry_after))]
    RateLimited {
        /// When a request would be allowed again.
        retry_after: Duration,
    },
    /// The request bodies read whole before sending fill `upstream.max_buffered_bodies`, and
    /// this one cannot stream (a chunked body for an HTTP/1.0 upstream).
    #[error(
        "the gateway holds as many request bodies as it may (upstream.max_buffered_bodies); retry in {}s",
        retry_after_secs(*retry_after)
    )]
    BodiesBuffered {
        /// When to try again.
        retry_after: Duration,
    },
    /// A bug: a handler panicked. The panic payload is logged, not returned.
    #[error("internal gateway error")]
    Internal,
}

/// Services that cannot fail fit where a `GatewayError` is expected.
impl From<Infallible> for GatewayError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

impl GatewayError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::InvalidPath(_)
            | Self::MethodOverride(_)
            | Self::BadRequestBody(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMethod(_) => StatusCode::NOT_IMPLEMENTED,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            Self::IdentityThrottled { .. } | Self::BodiesBuffered { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoToken { .. } | Self::AuditUnavailable(_) | Self::IdentityUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) | Self::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short machine-friendly name, for logs, audit records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::InvalidPath(_) => "invalid_path",
            Self::UnsupportedMethod(_) => "unsupported_method",
            Self::MethodOverride(_) => "method_override",
            Self::BadRequestBody(_) => "bad_request_body",
            Self::BodyTimeout(_) => "body_timeout",
            Self::UpstreamProtocol(_) => "upstream_protocol",
            Self::IdentityThrottled { .. } => "identity_throttled",
            Self::BodiesBuffered { .. } => "bodies_buffered",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NoToken { .. } => "no_token",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::NotCached => "not_cached",
            Self::AuditUnavailable(_) => "audit_unavailable",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::IdentityUnavailable(_) => "identity_unavailable",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::Internal => "internal",
        }
    }

    /// Whether the upstream failed (as opposed to the request being refused): the cases in
    /// which a stale response may stand in (`stale-if-error`).
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            Self::UpstreamUnreachable(_) | Self::UpstreamTimeout(_) | Self::UpstreamProtocol(_)
        )
    }

    /// The message including its cause chain (hyper's errors hide the useful part in `source`).
    pub fn message(&self) -> String {
        chain_text(self)
    }

    /// Renders the CloudCasa error envelope. The single place errors become responses.
    pub fn into_response(self) -> Response<Body> {
        let mut response = error_response(self.status(), &self.message());
        let headers = response.headers_mut();
        match self {
            Self::Unauthenticated(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cloudcasa-gateway\""),
                );
            }
            Self::RateLimited { retry_after }
            | Self::IdentityThrottled { retry_after }
            | Self::BodiesBuffered { retry_after } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` is whole seconds; round up so a client that waits that long gets through.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

/// An error and its causes as one line, each cause once (hyper's errors hide the useful part in
/// `source`, and some causes repeat their parent's text).
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = cause.source();
    }
    msg
}

/// A response in CloudCasa's error envelope, for answers the gateway makes itself.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let payload = serde_json::json!({
        "_status": "ERR",
        "_error": { "code": status.as_u16(), "message": message },
    });
    let mut response = Response::new(body::full(payload.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Walks an error's cause chain looking for a `T` (hyper wraps body errors several levels deep).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_cloudcasa_shape() {
        let resp = GatewayError::UpstreamTimeout(Duration::from_secs(30)).into_response();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["_status"], "ERR");
        assert_eq!(v["_error"]["code"], 504);
        assert_eq!(
            v["_error"]["message"],
            "CloudCasa upstream did not answer within 30s"
        );
    }

    #[test]
    fn message_includes_causes_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = GatewayError::UpstreamUnreachable(Box::new(io));
        assert_eq!(err.message(), "CloudCasa upstream unreachable: refused");
    }
}
