//! RFC 9111 rules as pure functions: what may be stored, for how long it is fresh, when a stored
//! response may be served, and how a client's conditional request is answered.
//!
//! Everything here is a function of headers and times; the cache service applies the results.

use std::time::{Duration, SystemTime};

use crate::config::KeyHeaders;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Cache-Control directives that matter to a shared cache, parsed from one header map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (on a response, any form, including `no-cache="field"`, taken as unqualified).
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`.
    pub s_maxage: Option<u64>,
    /// `stale-if-error=N`.
    pub stale_if_error: Option<u64>,
    /// `stale-while-revalidate=N`.
    pub stale_while_revalidate: Option<u64>,
    /// `max-stale` (request; `Some(u64::MAX)` when given without a value).
    pub max_stale: Option<u64>,
    /// `min-fresh=N` (request).
    pub min_fresh: Option<u64>,
    /// `only-if-cached` (request).
    pub only_if_cached: bool,
}

impl Directives {
    /// Parses every `Cache-Control` header (and `Pragma: no-cache` when there is none).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = Directives::default();
        let mut any = false;
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for item in split_list(text) {
                any = true;
                // RFC 9111 §5.2: `token [ "=" ( token / quoted-string ) ]`, no whitespace
                // around "=": `max-age =3600` has no valid argument.
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) if n == n.trim_end() && a == a.trim_start() => {
                        (n, Some(a.trim_end().trim_matches('"')))
                    }
                    Some((n, _)) => (n.trim(), Some("")),
                    None => (item.trim(), None),
                };
                let seconds = || arg.and_then(|a| a.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    // An invalid max-age makes the response stale (RFC 9111 §4.2.1); of
                    // duplicates, the first counts (§4.2.1: "use the first").
                    "max-age" => {
                        d.max_age.get_or_insert(seconds().unwrap_or(0));
                    }
                    "s-maxage" => {
                        d.s_maxage.get_or_insert(seconds().unwrap_or(0));
                    }
                    "stale-if-error" => d.stale_if_error = d.stale_if_error.or(seconds()),
                    "stale-while-revalidate" => {
                        d.stale_while_revalidate = d.stale_while_revalidate.or(seconds())
                    }
                    "max-stale" => {
                        d.max_stale.get_or_insert(match arg {
                            None => u64::MAX,
                            Some(_) => seconds().unwrap_or(0),
                        });
                    }
                    "min-fresh" => d.min_fresh = d.min_fresh.or(seconds()),
                    "only-if-cached" => d.only_if_cached = true,
                    _ => {}
                }
            }
        }
        if !any
            && headers.get_all(header::PRAGMA).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
            })
        {
            d.no_cache = true;
        }
        d
    }

    /// Whether a stale response may never be served without revalidation (RFC 9111 §5.2.2.2,
    /// §5.2.2.8: `s-maxage` implies `proxy-revalidate`).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

/// Splits a comma-separated header list, respecting quoted strings.
fn split_list(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// Only 200 responses are stored.
    Status,
    /// `Cache-Control: no-store` on the request or the response.
    NoStore,
    /// `Cache-Control: private`: meant for one user agent.
    Private,
    /// `Vary: *` can never be matched.
    VaryStar,
    /// A response that sets cookies is meant for one client.
    SetCookie,
    /// The body exceeds `cache.max_object_size`.
    TooLarge,
    /// Fills in progress already hold `cache.max_inflight`: this one streams through.
    InflightLimit,
}

impl NotStorable {
    /// Every reason, in counter-index order ([`NotStorable::index`]).
    pub const ALL: [Self; 7] = [
        Self::Status,
        Self::NoStore,
        Self::Private,
        Self::VaryStar,
        Self::SetCookie,
        Self::TooLarge,
        Self::InflightLimit,
    ];

    /// This reason's position in [`NotStorable::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Label for logs, metrics and `Cache-Status` `detail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::NoStore => "no-store",
            Self::Private => "private",
            Self::VaryStar => "vary-star",
            Self::SetCookie => "set-cookie",
            Self::TooLarge => "too-large",
            Self::InflightLimit => "inflight-limit",
        }
    }
}

/// Decides whether a response to a GET may be stored (RFC 9111 §3). Responses without a
/// validator or freshness information are stored too: the gateway validates them itself by
/// comparing body hashes, and answers clients with an ETag of its own.
pub fn storable(
    status: http::StatusCode,
    request: &Directives,
    response: &HeaderMap,
    directives: &Directives,
) -> Result<(), NotStorable> {
    if status != http::StatusCode::OK {
        return Err(NotStorable::Status);
    }
    if request.no_store || directives.no_store {
        return Err(NotStorable::NoStore);
    }
    if directives.private {
        return Err(NotStorable::Private);
    }
    if vary_names(response).iter().any(|n| n == "*") {
        return Err(NotStorable::VaryStar);
    }
    if response.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    Ok(())
}

/// The field names listed in `Vary`, lower-cased.
pub fn vary_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The request's values for the headers a response varies on. `Authorization` is left out: the
/// cache is already partitioned by the credential the gateway injects, and the client's own
/// credential never reaches the upstream.
pub fn vary_values(
    names: &[String],
    request: &HeaderMap,
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names
        .iter()
        .filter(|n| n.as_str() != "authorization")
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .map(|name| {
            let joined = join_values(request, &name);
            (name, joined)
        })
        .collect()
}

/// The representation part of a cache key: the request's values of `names` (`cache.key_headers`)
/// byte for byte as the upstream receives them, values of one header joined by `, ` (as
/// `join_values` joins them for the upstream), headers by `\n` (which no header value can
/// contain, so two different requests cannot produce one key). Not normalized: Werkzeug reads
/// `Accept: application/ xml` as two media ranges, neither of them XML, and Eve answers JSON,
/// so a key that folded it into `application/xml` let one client store JSON for every XML
/// reader (a hostile review found it). Two spellings of one value are two variants, never a
/// wrong answer. A missing `Accept` is keyed as `application/json`, what the upstream is sent
/// in its place. Bytes, not text: a value with obs-text bytes must not be merged with another
/// by a lossy conversion. The key starts with the names' form (see [`KeyHeaders`]) on a line
/// of its own: the values of one list of names never match those of another. One allocation;
/// this runs on every cached read.
pub fn representation_key(names: &KeyHeaders, request: &HeaderMap) -> Box<[u8]> {
    let mut key = Vec::with_capacity(64);
    key.extend_from_slice(names.form());
    for name in names.iter() {
        key.push(b'\n');
        let mut values = request.get_all(name).iter().peekable();
        if values.peek().is_none() && name == header::ACCEPT {
            key.extend_from_slice(DEFAULT_ACCEPT);
            continue;
        }
        for (j, value) in values.enumerate() {
            if j > 0 {
                key.extend_from_slice(b", ");
            }
            key.extend_from_slice(value.as_bytes());
        }
    }
    key.into_boxed_slice()
}

/// Whether a request's `Accept-Encoding` (its bytes in the representation key) accepts the
/// identity coding (RFC 9110 §12.5.3): an empty one does; otherwise unless `identity;q=0`, or
/// `*;q=0` without an `identity` of its own, says no. Codings are case-insensitive and may
/// have whitespace around them: read here in lower case without it.
pub fn accepts_identity(accept_encoding: &[u8]) -> bool {
    let accept_encoding: Vec<u8> = accept_encoding
        .iter()
        .filter(|b| !matches!(b, b' ' | b'\t'))
        .map(u8::to_ascii_lowercase)
        .collect();
    let zero = |params: &[u8]| {
        params.split(|b| *b == b';').any(|p| {
            p.strip_prefix(b"q=")
                .and_then(|q| std::str::from_utf8(q).ok())
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q == 0.0)
        })
    };
    let mut identity = None;
    let mut star = None;
    for item in accept_encoding.split(|b| *b == b',') {
        let (coding, params) = match item.iter().position(|b| *b == b';') {
            Some(i) => (&item[..i], &item[i..]),
            None => (item, &item[item.len()..]),
        };
        match coding {
            b"identity" => identity = Some(!zero(params)),
            b"*" => star = Some(!zero(params)),
            _ => {}
        }
    }
    identity.or(star).unwrap_or(true)
}

/// What the upstream is sent when a request has no `Accept`.
pub const DEFAULT_ACCEPT: &[u8] = b"application/json";

/// A header's values joined with ", " (how `Vary` values are stored and compared).
pub fn join_values(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.clone();
    let rest: Vec<&[u8]> = values.map(HeaderValue::as_bytes).collect();
    if rest.is_empty() {
        return Some(first);
    }
    let mut joined = first.as_bytes().to_vec();
    for r in rest {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(r);
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// Freshness lifetime (RFC 9111 §4.2.1) for a shared cache. `fresh_for` applies only when the
/// response carries no explicit freshness information; `no-cache` means zero.
pub fn freshness_lifetime(
    headers: &HeaderMap,
    directives: &Directives,
    fresh_for: Duration,
) -> Duration {
    if directives.no_cache {
        return Duration::ZERO;
    }
    if let Some(s) = directives.s_maxage.or(directives.max_age) {
        return Duration::from_secs(s);
    }
    if let Some(expires) = headers.get(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired.
        let Some(expires) = http_date(expires) else {
            return Duration::ZERO;
        };
        let date = headers
            .get(header::DATE)
            .and_then(http_date)
            .unwrap_or_else(SystemTime::now);
        return expires.duration_since(date).unwrap_or(Duration::ZERO);
    }
    fresh_for
}

/// Age of a response when it was received (RFC 9111 §4.2.3): the larger of the upstream's `Age`
/// and the apparent age from `Date`, plus the time the request took.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    // The first member of the first Age field (RFC 9111 §5.1: a list is invalid, use its first
    // member); an invalid value counts as no Age.
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let apparent = headers
        .get(header::DATE)
        .and_then(http_date)
        .and_then(|date| response_time.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    // The upstream's number: `Age: 18446744073709551615` must not overflow.
    apparent.max(age_value.saturating_add(delay))
}

/// Parses an HTTP date header value.
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// Whether a stored response with `age` and `lifetime` may answer a request with `request`
/// directives without contacting the upstream (RFC 9111 §4.2, §5.2.1). A client's `max-stale`
/// accepts a response that much past its lifetime, unless the response `forbids_stale`.
pub fn fresh_enough(
    age: Duration,
    lifetime: Duration,
    request: &Directives,
    forbids_stale: bool,
) -> bool {
    if request.no_cache {
        return false;
    }
    if let Some(max_age) = request.max_age
        && age > Duration::from_secs(max_age)
    {
        return false;
    }
    let min_fresh = Duration::from_secs(request.min_fresh.unwrap_or(0));
    let stale_ok = match (request.max_stale, forbids_stale) {
        (Some(secs), false) => Duration::from_secs(secs),
        _ => Duration::ZERO,
    };
    // Clients' numbers: `min-fresh=18446744073709551615` or `max-stale` must not overflow.
    age.saturating_add(min_fresh) < lifetime.saturating_add(stale_ok)
}

/// Whether the entity tag `etag` matches any in an `If-None-Match` list (weak comparison,
/// RFC 9110 §13.1.2).
pub fn if_none_match(list: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = list.to_str() else {
        return false;
    };
    let ours = opaque(etag.to_str().unwrap_or(""));
    split_list(list)
        .into_iter()
        .any(|candidate| candidate == "*" || opaque(candidate) == ours)
}

fn opaque(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/").trim_matches('"')
}

/// Whether a client's conditional GET can be answered 304 from a representation with `etag` and
/// `last_modified` (RFC 9110 §13.2.2: If-None-Match takes precedence over If-Modified-Since).
pub fn not_modified(
    request: &HeaderMap,
    etag: Option<&HeaderValue>,
    last_modified: Option<&HeaderValue>,
) -> bool {
    if let Some(inm) = request.get(header::IF_NONE_MATCH) {
        return etag.is_some_and(|e| if_none_match(inm, e));
    }
    // Dates are parsed only when the client asked: this runs on every cache hit.
    let Some(since) = request.get(header::IF_MODIFIED_SINCE).and_then(http_date) else {
        return false;
    };
    last_modified
        .and_then(http_date)
        .is_some_and(|modified| modified <= since)
}

/// Headers a 304 response carries (RFC 9110 §15.4.5).
pub const NOT_MODIFIED_HEADERS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// What a `Range` request gets from a stored complete body of `len` bytes (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// The whole body, as a 200: several ranges, an empty body, or a header the parser does not
    /// take (§14.2 lets a server ignore `Range`).
    Whole,
    /// One satisfiable range, inclusive bounds, both within the body: a 206.
    Part {
        /// First byte.
        start: u64,
        /// Last byte (`start <= end < len`).
        end: u64,
    },
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Picks the answer to `range` (the client's `Range` value) for a body of `len` bytes. Clients
/// choose the numbers, so every bound is checked against `len` before anything is sliced: a
/// `Part` always lies within the body.
pub fn byte_range(range: &str, len: u64) -> ByteRange {
    use http_range_header::RangeUnsatisfiableError;
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return ByteRange::Whole;
    };
    if parsed.ranges.len() != 1 || len == 0 {
        return ByteRange::Whole;
    }
    let (start, end) = match parsed.validate(len) {
        Ok(ranges) => (*ranges[0].start(), *ranges[0].end()),
        // A suffix longer than the body is the whole body (§14.1.2).
        Err(RangeUnsatisfiableError::FileSuffixOutOfBounds) => (0, len - 1),
        Err(_) => return ByteRange::Unsatisfiable,
    };
    if start <= end && end < len {
        ByteRange::Part { start, end }
    } else {
        // The parser validated these; a disagreement is answered whole, never sliced.
        ByteRange::Whole
    }
}

/// Headers of a stored response that a 304 must not replace (RFC 9111 §3.2).
pub fn keep_on_update(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::CONTENT_ENCODING
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_RANGE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::headers::test_map as headers;
    use http::StatusCode;

    #[test]
    fn identity_is_accepted_unless_refused() {
        for yes in [
            &b""[..],
            b"identity",
            b"gzip,deflate",
            b"gzip;q=0",
            b"*;q=0,identity",
            b"identity;q=0.5",
            b"*",
            b"gzip, deflate",
        ] {
            assert!(accepts_identity(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"identity;q=0"[..],
            b"gzip,*;q=0",
            b"identity;q=0.0,gzip",
            b"*;q=0",
            b"Identity; Q=0, gzip",
            b"gzip, * ;q=0",
        ] {
            assert!(!accepts_identity(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn parses_directives() {
        let d = Directives::parse(&headers(&[
            ("cache-control", "public, max-age=60, s-maxage=\"30\""),
            (
                "cache-control",
                "Must-Revalidate, no-cache=\"set-cookie, foo\", stale-if-error=5",
            ),
        ]));
        assert!(d.public && d.must_revalidate && d.no_cache);
        assert_eq!(
            (d.max_age, d.s_maxage, d.stale_if_error),
            (Some(60), Some(30), Some(5))
        );
        assert!(Directives::parse(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(
            !Directives::parse(&headers(&[
                ("pragma", "no-cache"),
                ("cache-control", "max-age=5")
            ]))
            .no_cache
        );
        assert_eq!(
            Directives::parse(&headers(&[("cache-control", "max-age=soon")])).max_age,
            Some(0)
        );
    }

    #[test]
    fn directive_syntax_and_duplicates_follow_rfc_9111() {
        let d = |v: &str| Directives::parse(&headers(&[("cache-control", v)]));
        // Whitespace around "=": no valid argument, so stale.
        assert_eq!(d("max-age =3600").max_age, Some(0));
        assert_eq!(d("max-age= 3600").max_age, Some(0));
        assert_eq!(d("max-age=3600").max_age, Some(3600));
        // The first of duplicates counts.
        assert_eq!(d("max-age=60, max-age=3600").max_age, Some(60));
        assert_eq!(d("max-stale").max_stale, Some(u64::MAX));
        assert_eq!(d("max-stale=5, max-stale=50").max_stale, Some(5));
        // Age: the first member of a list.
        let now = SystemTime::now();
        let h = headers(&[("age", "7200, 0")]);
        assert_eq!(initial_age(&h, now, now), Duration::from_secs(7200));
        let h = headers(&[("age", "soon")]);
        assert_eq!(initial_age(&h, now, now), Duration::ZERO);
    }

    #[test]
    fn storability() {
        let ok = Directives::default();
        let check = |status, h: &[(&str, &str)]| {
            let h = headers(h);
            storable(status, &ok, &h, &Directives::parse(&h))
        };
        assert_eq!(check(StatusCode::OK, &[]), Ok(()));
        assert_eq!(check(StatusCode::NOT_FOUND, &[]), Err(NotStorable::Status));
        assert_eq!(
            check(StatusCode::OK, &[("cache-control", "no-store")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            check(StatusCode::OK, &[("cache-control", "private")]),
            Err(NotStorable::Private)
        );
        assert_eq!(
            check(StatusCode::OK, &[("vary", "accept, *")]),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(
            check(StatusCode::OK, &[("set-cookie", "a=b")]),
            Err(NotStorable::SetCookie)
        );
        let no_store_request = Directives {
            no_store: true,
            ..Default::default()
        };
        assert_eq!(
            storable(StatusCode::OK, &no_store_request, &HeaderMap::new(), &ok),
            Err(NotStorable::NoStore)
        );
    }

    #[test]
    fn freshness_prefers_explicit_information() {
        let fresh_for = Duration::from_secs(100);
        let lifetime = |h: &[(&str, &str)]| {
            let h = headers(h);
            freshness_lifetime(&h, &Directives::parse(&h), fresh_for)
        };
        assert_eq!(lifetime(&[]), fresh_for);
        assert_eq!(
            lifetime(&[("cache-control", "max-age=5")]),
            Duration::from_secs(5)
        );
        assert_eq!(
            lifetime(&[("cache-control", "max-age=5, s-maxage=7")]),
            Duration::from_secs(7)
        );
        assert_eq!(
            lifetime(&[("cache-control", "max-age=5, no-cache")]),
            Duration::ZERO
        );
        assert_eq!(
            lifetime(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
            ]),
            Duration::from_secs(60)
        );
        assert_eq!(lifetime(&[("expires", "0")]), Duration::ZERO);
    }

    #[test]
    fn age_takes_the_larger_estimate() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now - Duration::from_secs(10));
        let h = headers(&[("date", &date), ("age", "3")]);
        let age = initial_age(&h, now - Duration::from_secs(1), now);
        assert!(
            age >= Duration::from_secs(10) && age <= Duration::from_secs(11),
            "{age:?}"
        );
        let h = headers(&[("age", "30")]);
        assert_eq!(initial_age(&h, now, now), Duration::from_secs(30));
    }

    #[test]
    fn request_directives_limit_what_is_fresh() {
        let (age, life) = (Duration::from_secs(10), Duration::from_secs(60));
        assert!(fresh_enough(age, life, &Directives::default(), false));
        assert!(!fresh_enough(
            age,
            life,
            &Directives {
                no_cache: true,
                ..Default::default()
            },
            false
        ));
        assert!(!fresh_enough(
            age,
            life,
            &Directives {
                max_age: Some(5),
                ..Default::default()
            },
            false
        ));
        assert!(!fresh_enough(
            age,
            life,
            &Directives {
                min_fresh: Some(55),
                ..Default::default()
            },
            false
        ));
        assert!(!fresh_enough(life, life, &Directives::default(), false));
        // max-stale: this much past the lifetime is acceptable, unless the response forbids it.
        let stale = Directives {
            max_stale: Some(30),
            ..Default::default()
        };
        let past = life + Duration::from_secs(20);
        assert!(fresh_enough(past, life, &stale, false));
        assert!(!fresh_enough(past, life, &stale, true));
        assert!(!fresh_enough(
            life + Duration::from_secs(40),
            life,
            &stale,
            false
        ));
    }

    #[test]
    fn conditionals() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(not_modified(
            &headers(&[("if-none-match", "\"x\", W/\"abc\"")]),
            Some(&etag),
            None
        ));
        assert!(not_modified(
            &headers(&[("if-none-match", "*")]),
            Some(&etag),
            None
        ));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"x\"")]),
            Some(&etag),
            None
        ));
        let lm = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
        assert!(not_modified(
            &headers(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            None,
            Some(&lm)
        ));
        assert!(!not_modified(
            &headers(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:36 GMT")]),
            None,
            Some(&lm)
        ));
        // If-None-Match wins over If-Modified-Since.
        assert!(!not_modified(
            &headers(&[
                ("if-none-match", "\"x\""),
                ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]),
            Some(&etag),
            Some(&lm)
        ));
    }

    #[test]
    fn representation_keys_are_the_bytes_the_upstream_reads() {
        let names = KeyHeaders::new(vec![header::ACCEPT, header::ACCEPT_ENCODING]);
        let key = |pairs: &[(&str, &str)]| representation_key(&names, &headers(pairs));
        // Werkzeug reads these differently from `application/xml` (the first is no XML at all),
        // so they must not share its entry.
        for spelling in ["application/ xml", "application/xml;Q=1", "Application/XML"] {
            assert_ne!(
                key(&[("accept", spelling)]),
                key(&[("accept", "application/xml")]),
                "{spelling}"
            );
        }
        // Repeated lines are one, joined as the upstream receives them.
        assert_eq!(
            key(&[("accept", "a"), ("accept", "b")]),
            key(&[("accept", "a, b")])
        );
        assert_ne!(
            key(&[("accept", "application/xml")]),
            key(&[("accept", "application/json")])
        );
        // A value cannot pose as another header's.
        assert_ne!(
            key(&[("accept", "gzip")]),
            key(&[("accept-encoding", "gzip")])
        );
        // No Accept is keyed as what the upstream is sent instead.
        let form = std::str::from_utf8(names.form()).unwrap();
        assert_eq!(&*key(&[]), format!("{form}\napplication/json\n").as_bytes());
        assert_eq!(key(&[]), key(&[("accept", "application/json")]));
        // The same values under other names are another key: `gzip` as an `X-Api-Version`
        // is not `gzip` as an `Accept-Encoding`.
        let other = KeyHeaders::new(vec![
            header::ACCEPT,
            HeaderName::from_static("x-api-version"),
        ]);
        assert_ne!(names.form(), other.form());
        assert_ne!(
            representation_key(&other, &headers(&[("x-api-version", "gzip")])),
            key(&[("accept-encoding", "gzip")])
        );
    }

    #[test]
    fn vary_skips_authorization_and_joins_values() {
        let names = vary_names(&headers(&[
            ("vary", "Accept, Authorization"),
            ("vary", "X-Tenant"),
        ]));
        assert_eq!(names, ["accept", "authorization", "x-tenant"]);
        let v = vary_values(&names, &headers(&[("accept", "a"), ("accept", "b")]));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].1.as_ref().unwrap(), "a, b");
        assert_eq!(v[1].1, None);
    }
}
