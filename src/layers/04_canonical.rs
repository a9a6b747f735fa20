//! The request the upstream will execute: one *effective method* and one *canonical path*,
//! decided once, right below the outer accounting and before identity, so that policy, rate
//! limits, fail-closed audit, the cache and invalidation all judge what CloudCasa will do rather
//! than the bytes on the wire.
//!
//! - **Methods** are case-sensitive (RFC 9110 §9.1). Only `server.methods` are forwarded; `TRACE`
//!   and `CONNECT` never are (config validation refuses them), nor is any other spelling, such as
//!   `delete`, which some servers upper-case and execute. Refused: 501.
//! - **Method override.** Eve honours `X-HTTP-Method-Override` on every wire method by default.
//!   Here an override header (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`) is
//!   honoured on `POST` only (`server.method_override = "on-post"`), and its value, which must
//!   itself be in `server.methods`, *becomes* the request's method: the request is rewritten
//!   and forwarded with that method and without the header, so the upstream executes exactly
//!   what every layer saw. On any other wire method, or with `method_override = "refuse"`, the
//!   header is refused with 400. [`WireMethod`] remembers the method that arrived.
//! - **Paths.** Escapes of characters a path segment may carry raw (unreserved, sub-delims, `:`,
//!   `@`) are decoded and other escapes upper-cased (RFC 3986 §6.2.2), so `/api/v1/%75sergroups`
//!   is `/api/v1/usergroups` and `run%3Anow` is `run:now` for every layer and the upstream
//!   alike: a rule written for one spelling cannot be side-stepped with another. A path that cannot be made canonical without guessing how the upstream
//!   reads it is refused with 400 `invalid_path`: `.`/`..` segments (raw or encoded, any case),
//!   an encoded `/` or `\`, a raw `\`, an encoded control character (NUL included), an empty
//!   segment in the middle (`//`), a malformed escape, or a target that is not a path (Envoy's
//!   `path_with_escaped_slashes_action: REJECT_REQUEST` is the model).
//! - **Headers.** Hop-by-hop headers, and every header `Connection` names, are removed here
//!   rather than at the upstream call, so no layer keys or decides on a header the upstream will
//!   never see (`Connection: accept` would otherwise make the cache key on an `Accept` that is
//!   stripped later). Header names containing `_` are dropped, as nginx does by default
//!   (`underscores_in_headers off`): WSGI servers such as Werkzeug map `-` and `_` to the same
//!   CGI variable, so `X_HTTP_METHOD_OVERRIDE` would reach Eve as `X-HTTP-Method-Override`.
//! - **Representation.** A request without `Accept` is sent `Accept: application/json` (by the
//!   upstream call), and the cache keys it as such (`policy::representation_key`).

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use tower::{Layer, Service};

pub use crate::config::{DEFAULT_METHODS, NEVER_FORWARDED, OverrideMode};
use crate::context::{Exchange, WireMethod};
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::http::headers::{is_hop_by_hop, strip_hop_by_hop};

/// The method-override headers some frameworks honour (Eve, Rails, ASP.NET, Google APIs).
pub const OVERRIDE_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Which methods are forwarded and how overrides are treated.
#[derive(Debug, Clone)]
pub struct MethodRules {
    /// `server.methods`.
    pub allowed: Arc<[Method]>,
    /// `server.method_override`.
    pub overrides: OverrideMode,
}

impl Default for MethodRules {
    fn default() -> Self {
        Self {
            allowed: DEFAULT_METHODS.to_vec().into(),
            overrides: OverrideMode::OnPost,
        }
    }
}

impl MethodRules {
    fn check_allowed(&self, method: &Method) -> Result<(), GatewayError> {
        if self.allowed.contains(method) {
            Ok(())
        } else {
            Err(GatewayError::UnsupportedMethod(printable(
                method.as_str().as_bytes(),
            )))
        }
    }

    /// The effective method of a request: `None` when it is the wire method (no override).
    pub fn effective(
        &self,
        wire: &Method,
        headers: &http::HeaderMap,
    ) -> Result<Option<Method>, GatewayError> {
        let overridden = OVERRIDE_HEADERS.iter().any(|h| headers.contains_key(h));
        self.decide(wire, headers, overridden)
    }

    /// [`Self::effective`], told whether an override header is present (the canonical layer
    /// learns that in its one pass over the header names).
    fn decide(
        &self,
        wire: &Method,
        headers: &http::HeaderMap,
        overridden: bool,
    ) -> Result<Option<Method>, GatewayError> {
        self.check_allowed(wire)?;
        if !overridden {
            return Ok(None);
        }
        let mut value: Option<&HeaderValue> = None;
        for name in &OVERRIDE_HEADERS {
            for v in headers.get_all(name) {
                // Two override headers that disagree: which one would the upstream read?
                if value.is_some_and(|seen| seen != v) {
                    return Err(GatewayError::MethodOverride(
                        "the request carries conflicting method-override headers".into(),
                    ));
                }
                value = Some(v);
            }
        }
        let value = value.expect("one of the headers is present");
        if value.as_bytes().iter().all(u8::is_ascii_whitespace) {
            return Err(GatewayError::MethodOverride(
                "the method-override header is empty".into(),
            ));
        }
        if self.overrides == OverrideMode::Refuse {
            return Err(GatewayError::MethodOverride(
                "this gateway does not honour method-override headers \
                 (server.method_override = \"refuse\"): send the method itself"
                    .into(),
            ));
        }
        if *wire != Method::POST {
            return Err(GatewayError::MethodOverride(format!(
                "a method-override header is honoured on POST only, not on {}",
                printable(wire.as_str().as_bytes())
            )));
        }
        let method = Method::from_bytes(value.as_bytes())
            .map_err(|_| GatewayError::UnsupportedMethod(printable(value.as_bytes())))?;
        self.check_allowed(&method)?;
        Ok(Some(method))
    }
}

/// A byte string shown in an error message: printable ASCII kept, anything else escaped, at most
/// 64 bytes (a method name is client input).
fn printable(bytes: &[u8]) -> String {
    let mut out: String = bytes
        .iter()
        .take(64)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        out.push('…');
    }
    out
}

/// Why a path cannot be made canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// The target is not an origin-form path (`*`, `host:port`).
    NotAPath,
    /// A `.` or `..` segment, raw or percent-encoded.
    DotSegment,
    /// `%2F` or `%5C`: a separator the upstream may or may not decode.
    EncodedSeparator,
    /// A raw backslash, which some servers treat as `/`.
    Backslash,
    /// An encoded control character (`%00` to `%1F`, `%7F`).
    ControlCharacter,
    /// An empty segment in the middle of the path (`//`).
    EmptySegment,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl PathProblem {
    /// The reason, for the error message.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAPath => {
                "the request target is not a path; send origin-form targets such as /api/v1/clusters"
            }
            Self::DotSegment => "'.' and '..' segments (raw or percent-encoded) are not accepted",
            Self::EncodedSeparator => "an encoded '/' or '\\' (%2F, %5C) is not accepted",
            Self::Backslash => "a backslash is not accepted in a path",
            Self::ControlCharacter => "an encoded control character (such as %00) is not accepted",
            Self::EmptySegment => "an empty path segment ('//') is not accepted",
            Self::BadEscape => "a '%' must be followed by two hex digits",
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A byte a path segment may carry raw (RFC 3986 `pchar` less `%`): unreserved, sub-delims,
/// `:` and `@`. The upstream (Werkzeug) decodes every escape, so an escaped `:` names the same
/// resource as a raw one; decoding these makes policy globs, rate buckets and cache keys see one
/// spelling. Escapes of anything else (`/`, `?`, `#`, `%`, space, non-ASCII) stay escaped.
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

/// The canonical form of a request path (see the module docs), borrowed when the path is
/// already canonical, which is the common case and costs one scan.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, PathProblem> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathProblem::NotAPath);
    }
    // Fast path: no escape, no backslash, and no segment that starts with '.' or is empty.
    let suspicious = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%' || b == b'\\' || (b == b'/' && matches!(bytes.get(i + 1), Some(b'/' | b'.')))
    });
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, segment) in segments.iter().enumerate() {
        out.push('/');
        if segment.is_empty() && n != last {
            return Err(PathProblem::EmptySegment);
        }
        let start = out.len();
        let seg = segment.as_bytes();
        let mut i = 0;
        while i < seg.len() {
            match seg[i] {
                b'\\' => return Err(PathProblem::Backslash),
                b'%' => {
                    let (Some(hi), Some(lo)) = (
                        seg.get(i + 1).copied().and_then(hex_value),
                        seg.get(i + 2).copied().and_then(hex_value),
                    ) else {
                        return Err(PathProblem::BadEscape);
                    };
                    let decoded = hi << 4 | lo;
                    match decoded {
                        b'/' | b'\\' => return Err(PathProblem::EncodedSeparator),
                        0x00..=0x1f | 0x7f => return Err(PathProblem::ControlCharacter),
                        b if is_path_char(b) => out.push(char::from(b)),
                        _ => {
                            out.push('%');
                            out.push(char::from(seg[i + 1].to_ascii_uppercase()));
                            out.push(char::from(seg[i + 2].to_ascii_uppercase()));
                        }
                    }
                    i += 3;
                }
                b => {
                    out.push(char::from(b));
                    i += 1;
                }
            }
        }
        if matches!(&out[start..], "." | "..") {
            return Err(PathProblem::DotSegment);
        }
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// The request URI with `path` in place of its own (origin-form: path and query only).
fn with_path(uri: &Uri, path: &str) -> Result<Uri, GatewayError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let pq = PathAndQuery::try_from(pq)
        .map_err(|e| GatewayError::InvalidPath(format!("request target: {e}")))?;
    Ok(Uri::from(pq))
}

/// Removes headers whose names contain `_` (see the module docs); whether there were any.
fn drop_underscored(headers: &mut http::HeaderMap) -> bool {
    // Fast path, one pass over the names: almost no request has one.
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return false;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
    true
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct CanonicalLayer {
    rules: MethodRules,
}

impl CanonicalLayer {
    /// Applies `rules` to every request.
    pub fn new(rules: MethodRules) -> Self {
        Self { rules }
    }
}

impl<S> Layer<S> for CanonicalLayer {
    type Service = Canonical<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Canonical {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Canonical<S> {
    inner: S,
    rules: MethodRules,
}

impl<S> Canonical<S> {
    fn canonicalize<B>(&self, req: &mut Request<B>) -> Result<(), GatewayError> {
        // One pass over the names decides which of the slower steps this request needs; most
        // need none of them.
        let (mut hop, mut underscored, mut overridden) = (false, false, false);
        for name in req.headers().keys() {
            hop |= is_hop_by_hop(name);
            underscored |= name.as_str().contains('_');
            overridden |= OVERRIDE_HEADERS.contains(name);
        }
        if hop {
            strip_hop_by_hop(req.headers_mut());
            overridden = OVERRIDE_HEADERS
                .iter()
                .any(|h| req.headers().contains_key(h));
        }
        if underscored
            && drop_underscored(req.headers_mut())
            && let Some(ids) = Exchange::of(req).map(|ex| ex.log_ids())
        {
            tracing::debug!(
                request_id = ids.request_id(),
                trace_id = %ids.trace_id,
                "dropped headers whose names contain '_'"
            );
        }
        let effective = self.rules.decide(req.method(), req.headers(), overridden)?;
        let path = canonical_path(req.uri().path())
            .map_err(|p| GatewayError::InvalidPath(p.as_str().into()))?;
        let uri = match path {
            Cow::Borrowed(_) => None,
            Cow::Owned(path) => Some(with_path(req.uri(), &path)?),
        };
        if effective.is_some() || uri.is_some() {
            if let Some(ex) = Exchange::of(req) {
                ex.set_effective(effective.clone(), uri.clone());
            }
            if let Some(uri) = uri {
                *req.uri_mut() = uri;
            }
            if let Some(method) = effective {
                let wire = std::mem::replace(req.method_mut(), method);
                req.extensions_mut().insert(WireMethod(wire));
                for name in &OVERRIDE_HEADERS {
                    req.headers_mut().remove(name);
                }
            }
        }
        Ok(())
    }
}

impl<S, B> Service<Request<B>> for Canonical<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Either<std::future::Ready<Result<Response<Body>, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.canonicalize(&mut req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(e) => Either::Left(std::future::ready(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::headers::test_map as headers;
    use crate::http::is_read;
    use http::HeaderMap;

    #[test]
    fn canonical_paths() {
        for ok in [
            "/",
            "/api/v1/usergroups",
            "/api/v1/usergroups/",
            "/api/v1/usergroups/624e",
            "/api/v1/.well-known/x",
            "/api/v1/a..b/...",
        ] {
            assert_eq!(canonical_path(ok), Ok(Cow::Borrowed(ok)), "{ok}");
        }
        assert_eq!(
            canonical_path("/api/v1/%75sergroups/%3a%41%7e").unwrap(),
            "/api/v1/usergroups/:A~"
        );
        assert_eq!(canonical_path("/a%20b").unwrap(), "/a%20b");
        // Characters a segment may carry raw are decoded; the rest stay escaped.
        assert_eq!(
            canonical_path("/api/v1/jobs/run%3anow%40x%21%2C%3B%3D").unwrap(),
            "/api/v1/jobs/run:now@x!,;="
        );
        assert_eq!(canonical_path("/a%3fb%23c%25d").unwrap(), "/a%3Fb%23c%25d");
        let refused = [
            ("/api/v1/usergroups/../clusters", PathProblem::DotSegment),
            ("/api/v1/usergroups/./x", PathProblem::DotSegment),
            ("/api/v1/usergroups/..", PathProblem::DotSegment),
            (
                "/api/v1/usergroups/%2e%2e/clusters",
                PathProblem::DotSegment,
            ),
            ("/api/v1/usergroups/%2E./clusters", PathProblem::DotSegment),
            ("/api/v1/usergroups/.%2E", PathProblem::DotSegment),
            (
                "/api/v1/usergroups/..%2fclusters",
                PathProblem::EncodedSeparator,
            ),
            (
                "/api/v1/usergroups%2F..%2Fclusters",
                PathProblem::EncodedSeparator,
            ),
            ("/api/v1/usergroups%5cx", PathProblem::EncodedSeparator),
            ("/api/v1/usergroups\\..\\clusters", PathProblem::Backslash),
            ("/api/v1/usergroups/x%00", PathProblem::ControlCharacter),
            ("/api/v1//usergroups", PathProblem::EmptySegment),
            ("//api/v1/usergroups", PathProblem::EmptySegment),
            ("/api/v1/x%zz", PathProblem::BadEscape),
            ("/api/v1/x%2", PathProblem::BadEscape),
            ("*", PathProblem::NotAPath),
            ("", PathProblem::NotAPath),
        ];
        for (path, problem) in refused {
            assert_eq!(canonical_path(path), Err(problem), "{path}");
        }
    }

    #[test]
    fn effective_methods() {
        let rules = MethodRules::default();
        let none = HeaderMap::new();
        assert_eq!(rules.effective(&Method::GET, &none).unwrap(), None);
        let kind = |r: Result<Option<Method>, GatewayError>| r.unwrap_err().kind();
        for wire in ["delete", "Post", "PURGE", "TRACE", "CONNECT", "MOVE"] {
            let m = Method::from_bytes(wire.as_bytes()).unwrap();
            assert_eq!(
                kind(rules.effective(&m, &none)),
                "unsupported_method",
                "{wire}"
            );
        }
        for name in [
            "x-http-method-override",
            "X-HTTP-Method",
            "x-method-override",
        ] {
            let h = headers(&[(name, "PATCH")]);
            assert_eq!(
                rules.effective(&Method::POST, &h).unwrap(),
                Some(Method::PATCH)
            );
            for wire in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
                assert_eq!(
                    kind(rules.effective(&wire, &h)),
                    "method_override",
                    "{wire}"
                );
            }
        }
        for value in ["delete", "TRACE", "CONNECT", "PURGE", "PATCH "] {
            let h = headers(&[("x-http-method-override", value)]);
            assert_eq!(
                kind(rules.effective(&Method::POST, &h)),
                "unsupported_method",
                "{value}"
            );
        }
        let conflicting = headers(&[
            ("x-http-method-override", "GET"),
            ("x-http-method", "DELETE"),
        ]);
        assert_eq!(
            kind(rules.effective(&Method::POST, &conflicting)),
            "method_override"
        );
        let agreeing = headers(&[("x-http-method-override", "GET"), ("x-http-method", "GET")]);
        assert_eq!(
            rules.effective(&Method::POST, &agreeing).unwrap(),
            Some(Method::GET)
        );
        let refuse = MethodRules {
            overrides: OverrideMode::Refuse,
            ..MethodRules::default()
        };
        let h = headers(&[("x-http-method-override", "PATCH")]);
        assert_eq!(kind(refuse.effective(&Method::POST, &h)), "method_override");
        let narrow = MethodRules {
            allowed: vec![Method::GET, Method::POST].into(),
            ..MethodRules::default()
        };
        assert_eq!(
            kind(narrow.effective(&Method::POST, &h)),
            "unsupported_method"
        );
    }

    #[test]
    fn underscored_and_hop_by_hop_headers_never_pass() {
        let mut h = headers(&[
            ("x_http_method_override", "DELETE"),
            ("x-http_method-override", "DELETE"),
            ("if_match", "\"e\""),
            ("connection", "close, accept"),
            ("accept", "application/xml"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        drop_underscored(&mut h);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-kept"]
        );
        let rules = MethodRules::default();
        let empty = headers(&[("x-http-method-override", " ")]);
        assert_eq!(
            rules.effective(&Method::POST, &empty).unwrap_err().kind(),
            "method_override"
        );
    }

    #[test]
    fn reads_and_writes() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(is_read(&m));
        }
        for m in ["POST", "PUT", "PATCH", "DELETE", "delete", "PURGE"] {
            assert!(!is_read(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }

    #[test]
    fn messages_escape_what_the_client_sent() {
        assert_eq!(printable(b"GET\x01"), "GET\\x01");
        assert!(printable(&[b'A'; 100]).ends_with('…'));
    }
}
