//! The audit record: which fields, in which order, and how an exchange becomes one.
//!
//! Only facts about the request are recorded, never credentials or bodies: there is no field an
//! `Authorization` header could reach.

use serde::Serialize;

use crate::context::Exchange;
use crate::http::resource::Resource;

/// Who made the request.
#[derive(Debug, Clone, Serialize)]
pub struct Client<'a> {
    /// The peer's address.
    pub addr: Option<&'a str>,
    /// The client's identity (`local` in sidecar mode); `null` when it was not identified.
    pub id: Option<&'a str>,
    /// How it was identified: `local`, `none`, `mtls`, `kubernetes`, `api_key`.
    pub auth: Option<&'static str>,
}

/// One line of the audit trail, without the chain members (`prev`, `hash`), which the writer adds.
#[derive(Debug, Clone, Serialize)]
pub struct Record<'a> {
    /// RFC 3339 UTC with milliseconds: when the request was received.
    pub ts: String,
    /// `intent` (before a write is forwarded, in fail-closed mode) or `outcome`.
    pub phase: &'static str,
    /// The request id (`X-Request-Id`).
    pub request_id: &'a str,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits: the gateway's server span.
    pub span_id: String,
    /// Who asked.
    pub client: Client<'a>,
    /// The policy rule that allowed the request.
    pub rule: Option<&'a str>,
    /// The CloudCasa credential used (its name, never its value).
    pub credential: Option<&'a str>,
    /// The effective method: the one the upstream was (or would have been) asked to execute.
    pub method: &'a str,
    /// The method on the wire, when a method-override header replaced it (`null` otherwise).
    pub wire_method: Option<&'a str>,
    /// The request path in canonical form (as forwarded).
    pub path: &'a str,
    /// The query string, as sent.
    pub query: Option<&'a str>,
    /// The CloudCasa resource the path names.
    pub resource: Option<Resource<'a>>,
    /// The status the client got (499: it went away first). `null` in an intent record.
    pub status: Option<u16>,
    /// The upstream's status; `null` when the upstream was not asked or did not answer.
    pub upstream_status: Option<u16>,
    /// `hit`, `revalidated`, `miss`, `stale` or `bypass`.
    pub cache: Option<&'static str>,
    /// The client's `If-Match`, as sent.
    pub if_match: Option<&'a str>,
    /// The response's `ETag` value, unquoted.
    pub etag: Option<String>,
    /// Request body bytes read from the client.
    pub bytes_in: Option<u64>,
    /// Response body bytes sent to the client.
    pub bytes_out: Option<u64>,
    /// Received to response complete, in milliseconds.
    pub duration_ms: Option<f64>,
    /// Sent upstream to upstream response headers, in milliseconds.
    pub upstream_ms: Option<f64>,
    /// The error kind, when the gateway made the response itself.
    pub error: Option<&'a str>,
    /// `false` when the client went away before the response was complete.
    pub complete: Option<bool>,
}

/// A record's JSON object with its closing brace left off: the chain members (`prev`, `hash`)
/// are appended by the writer, which hashes these bytes as they will be on disk. Only
/// [`Record::to_open_json`] makes one, so the writer never sees bytes that are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRecord(Vec<u8>);

impl OpenRecord {
    /// The bytes, up to (not including) the closing brace.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Record<'_> {
    /// The record as an [`OpenRecord`], ready for the chain members.
    pub fn to_open_json(&self) -> OpenRecord {
        let mut out = Vec::with_capacity(640);
        serde_json::to_writer(&mut out, self).expect("a record always serializes");
        debug_assert_eq!(out.last(), Some(&b'}'));
        out.pop();
        OpenRecord(out)
    }
}

impl<'a> Record<'a> {
    /// The members every record has, from what the exchange says so far.
    pub fn of(ex: &'a Exchange, phase: &'static str) -> Self {
        let path = ex.uri().path();
        let span = opentelemetry::trace::TraceContextExt::span(&ex.trace);
        let sc = span.span_context();
        Record {
            ts: humantime::format_rfc3339_millis(ex.received_at).to_string(),
            phase,
            request_id: ex.request_id.to_str().unwrap_or_default(),
            // The same lowercase hex as their Display, without the formatter.
            trace_id: hex::encode(sc.trace_id().to_bytes()),
            span_id: hex::encode(sc.span_id().to_bytes()),
            client: Client {
                addr: ex.client_addr.as_ref().map(|a| &*a.text),
                id: ex.client().map(|c| c.id.as_ref()),
                auth: ex.client().map(|c| c.method.as_str()),
            },
            rule: ex.decision().map(|d| d.rule.as_ref()),
            credential: ex.decision().map(|d| d.credential.as_ref()),
            method: ex.method().as_str(),
            wire_method: ex.overridden().then(|| ex.wire_method.as_str()),
            path,
            query: ex.uri().query(),
            resource: Resource::parse(path),
            status: None,
            upstream_status: None,
            cache: None,
            if_match: ex.if_match.as_ref().and_then(|v| v.to_str().ok()),
            etag: None,
            bytes_in: None,
            bytes_out: None,
            duration_ms: None,
            upstream_ms: None,
            error: None,
            complete: None,
        }
    }
}

/// The fail-closed intent record for a request, open for the chain members.
pub fn intent(ex: &Exchange) -> OpenRecord {
    Record::of(ex, "intent").to_open_json()
}

/// An ETag's value without its quotes (a weak one keeps its `W/`).
pub fn unquote_etag(value: &str) -> String {
    match value.strip_prefix("W/") {
        Some(rest) => format!("W/{}", rest.trim_matches('"')),
        None => value.trim_matches('"').to_string(),
    }
}

/// Milliseconds with microsecond precision.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote_etag("\"abc\""), "abc");
        assert_eq!(unquote_etag("W/\"abc\""), "W/abc");
    }
}
