//! The audit record: which fields, in which order, and how an exchange becomes one.
//!
//! Only facts about the request are recorded, never credentials or bodies: there is no field an
//! `Authorization` header could reach.

use serde::{Serialize, Serializer};

use crate::context::{ClientAddr, Exchange};
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

/// ASCII bytes (a timestamp, hex digits) serialized as a JSON string.
fn ascii<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(bytes).unwrap_or_default())
}

/// One line of the audit trail, without the chain members (`prev`, `hash`), which the writer adds.
///
/// Written by [`Record::to_open_json`], a writer for this one schema (the member names are
/// constants, numbers go through itoa and zmij, strings are escaped only when they hold a byte
/// that needs it), whose bytes are exactly serde_json's for the same record (the `Serialize`
/// derive is the reference: `tests/no_panic.rs` compares the two on random records).
#[derive(Debug, Clone, Serialize)]
pub struct Record<'a> {
    /// RFC 3339 UTC with milliseconds: when the request was received.
    #[serde(serialize_with = "ascii")]
    pub ts: [u8; 24],
    /// `intent` (before a write is forwarded, in fail-closed mode) or `outcome`.
    pub phase: &'static str,
    /// The request id (`X-Request-Id`).
    pub request_id: &'a str,
    /// 32 hex digits.
    #[serde(serialize_with = "ascii")]
    pub trace_id: [u8; 32],
    /// 16 hex digits: the gateway's server span.
    #[serde(serialize_with = "ascii")]
    pub span_id: [u8; 16],
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
    pub etag: Option<std::borrow::Cow<'a, str>>,
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
        self.write_open_json(&mut out);
        OpenRecord(out)
    }

    /// Appends the record's open JSON (as [`Record::to_open_json`]'s bytes) to `out`: the audit
    /// writer's staging buffer, so that a record costs no allocation of its own.
    pub fn write_open_json(&self, out: &mut Vec<u8>) {
        let mut o = Json(out);
        o.raw(b"{\"ts\":");
        o.ascii(&self.ts);
        o.raw(b",\"phase\":");
        o.str(self.phase);
        o.raw(b",\"request_id\":");
        o.str(self.request_id);
        o.raw(b",\"trace_id\":");
        o.ascii(&self.trace_id);
        o.raw(b",\"span_id\":");
        o.ascii(&self.span_id);
        o.raw(b",\"client\":{\"addr\":");
        o.opt_str(self.client.addr);
        o.raw(b",\"id\":");
        o.opt_str(self.client.id);
        o.raw(b",\"auth\":");
        o.opt_str(self.client.auth);
        o.raw(b"},\"rule\":");
        o.opt_str(self.rule);
        o.raw(b",\"credential\":");
        o.opt_str(self.credential);
        o.raw(b",\"method\":");
        o.str(self.method);
        o.raw(b",\"wire_method\":");
        o.opt_str(self.wire_method);
        o.raw(b",\"path\":");
        o.str(self.path);
        o.raw(b",\"query\":");
        o.opt_str(self.query);
        o.raw(b",\"resource\":");
        match &self.resource {
            Some(r) => {
                o.raw(b"{\"collection\":");
                o.str(r.collection);
                o.raw(b",\"id\":");
                o.opt_str(r.id);
                o.raw(b"}");
            }
            None => o.raw(b"null"),
        }
        o.raw(b",\"status\":");
        o.opt_int(self.status.map(u64::from));
        o.raw(b",\"upstream_status\":");
        o.opt_int(self.upstream_status.map(u64::from));
        o.raw(b",\"cache\":");
        o.opt_str(self.cache);
        o.raw(b",\"if_match\":");
        o.opt_str(self.if_match);
        o.raw(b",\"etag\":");
        o.opt_str(self.etag.as_deref());
        o.raw(b",\"bytes_in\":");
        o.opt_int(self.bytes_in);
        o.raw(b",\"bytes_out\":");
        o.opt_int(self.bytes_out);
        o.raw(b",\"duration_ms\":");
        o.opt_float(self.duration_ms);
        o.raw(b",\"upstream_ms\":");
        o.opt_float(self.upstream_ms);
        o.raw(b",\"error\":");
        o.opt_str(self.error);
        o.raw(b",\"complete\":");
        match self.complete {
            Some(true) => o.raw(b"true"),
            Some(false) => o.raw(b"false"),
            None => o.raw(b"null"),
        }
    }
}

/// Whether any byte of `bytes` must be escaped in a JSON string (a control character, `"` or
/// `\\`), eight bytes at a time: every record runs a dozen strings through this, and a byte
/// loop was most of the writer's cost. SWAR: a byte of `x` is zero exactly when the classic
/// `(x - 0x01..) & !x & 0x80..` has its high bit; `"` and `\\` become zero bytes by XOR, and
/// bytes below 0x20 are the ones where `x - 0x20..` borrows without the byte's own high bit set.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let word_needs = |x: u64| {
        has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
            || x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    if chunks.any(|chunk| word_needs(u64::from_le_bytes(chunk.try_into().expect("8")))) {
        return true;
    }
    // The last one to seven bytes as one more word, padded with spaces (which need no escape),
    // instead of a loop over each byte.
    let rest = chunks.remainder();
    let mut tail = [b' '; 8];
    tail[..rest.len()].copy_from_slice(rest);
    word_needs(u64::from_le_bytes(tail))
}

/// The JSON writer for [`Record`]: serde_json's output, byte for byte, for the few types a
/// record holds.
struct Json<'a>(&'a mut Vec<u8>);

impl Json<'_> {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// A JSON string, escaped as serde_json escapes: `"`, `\\` and the control characters,
    /// with the short forms for `\b \t \n \f \r` and `\u00xx` (lowercase) for the rest;
    /// everything else (DEL, non-ASCII) as it is. Most values need no escape: one scan, one copy.
    fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    /// `str` on UTF-8 bytes.
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.push(b'"');
        if !needs_escape(bytes) {
            self.0.extend_from_slice(bytes);
        } else {
            for &b in bytes {
                match b {
                    b'"' => self.0.extend_from_slice(b"\\\""),
                    b'\\' => self.0.extend_from_slice(b"\\\\"),
                    0x08 => self.0.extend_from_slice(b"\\b"),
                    b'\t' => self.0.extend_from_slice(b"\\t"),
                    b'\n' => self.0.extend_from_slice(b"\\n"),
                    0x0c => self.0.extend_from_slice(b"\\f"),
                    b'\r' => self.0.extend_from_slice(b"\\r"),
                    0x00..=0x1f => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        self.0.extend_from_slice(b"\\u00");
                        self.0.push(HEX[usize::from(b >> 4)]);
                        self.0.push(HEX[usize::from(b & 0xf)]);
                    }
                    _ => self.0.push(b),
                }
            }
        }
        self.0.push(b'"');
    }

    /// A string the record built itself (the timestamp's digits and `-:.TZ`, hex ids): written
    /// as it is, without the escape scan, since none of those bytes needs escaping.
    fn ascii<const N: usize>(&mut self, bytes: &[u8; N]) {
        debug_assert!(
            bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-:.".contains(b))
        );
        self.0.push(b'"');
        self.0.extend_from_slice(bytes);
        self.0.push(b'"');
    }

    fn opt_str(&mut self, text: Option<&str>) {
        match text {
            Some(t) => self.str(t),
            None => self.raw(b"null"),
        }
    }

    fn opt_int(&mut self, n: Option<u64>) {
        match n {
            Some(n) => self.raw(itoa::Buffer::new().format(n).as_bytes()),
            None => self.raw(b"null"),
        }
    }

    /// As serde_json: zmij's shortest form for a finite number, `null` otherwise.
    fn opt_float(&mut self, x: Option<f64>) {
        match x {
            Some(x) if x.is_finite() => self.raw(zmij::Buffer::new().format_finite(x).as_bytes()),
            _ => self.raw(b"null"),
        }
    }
}

impl<'a> Record<'a> {
    /// The members every record has, from what the exchange says so far.
    pub fn of(ex: &'a Exchange, phase: &'static str) -> Self {
        let path = ex.uri().path();
        let span = opentelemetry::trace::TraceContextExt::span(&ex.trace);
        let sc = span.span_context();
        Record {
            ts: rfc3339_millis(ex.received_at),
            phase,
            request_id: ex.request_id.to_str().unwrap_or_default(),
            // The same lowercase hex as their Display, without the formatter or an allocation.
            trace_id: hex_id(sc.trace_id().to_bytes()),
            span_id: hex_id(sc.span_id().to_bytes()),
            client: Client {
                addr: ex.client_addr.as_ref().map(ClientAddr::text),
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

/// `bytes` as lowercase hex, in place (`N` is twice `bytes`' length).
fn hex_id<const M: usize, const N: usize>(bytes: [u8; M]) -> [u8; N] {
    let mut out = [0u8; N];
    const_hex::encode_to_slice(bytes, &mut out).expect("N is twice M");
    out
}

/// 10000-01-01T00:00:00Z in seconds since the epoch: the first second RFC 3339 cannot write.
const YEAR_10000: u64 = 253_402_300_800;

/// RFC 3339 UTC with milliseconds (`2026-12-02T10:22:31.123Z`, 24 bytes), as humantime writes
/// it, into a buffer of the record's own: the civil date from the day count (Howard Hinnant's
/// `civil_from_days`) and the digits written in place, which is a tenth of humantime's
/// formatter's work. A time past year 9999, which humantime cannot write, saturates at its last
/// millisecond, so the field stays a valid timestamp.
pub fn rfc3339_millis(t: std::time::SystemTime) -> [u8; 24] {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    if secs >= YEAR_10000 {
        return *b"9999-12-31T23:59:59.999Z";
    }
    // Below YEAR_10000 the day count is under 2.93 million: the cast cannot wrap.
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let mut out = [0u8; 24];
    let rem = secs % 86_400;
    let put = |out: &mut [u8; 24], at: usize, value: u64, digits: usize| {
        let mut v = value;
        for i in (0..digits).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(&mut out, 0, year as u64, 4);
    out[4] = b'-';
    put(&mut out, 5, u64::from(month), 2);
    out[7] = b'-';
    put(&mut out, 8, u64::from(day), 2);
    out[10] = b'T';
    put(&mut out, 11, rem / 3600, 2);
    out[13] = b':';
    put(&mut out, 14, rem / 60 % 60, 2);
    out[16] = b':';
    put(&mut out, 17, rem % 60, 2);
    out[19] = b'.';
    put(&mut out, 20, u64::from(since.subsec_millis()), 3);
    out[23] = b'Z';
    out
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The fail-closed intent record for a request, open for the chain members.
pub fn intent(ex: &Exchange) -> OpenRecord {
    Record::of(ex, "intent").to_open_json()
}

/// An ETag's value without its quotes (a weak one keeps its `W/`); borrowed unless weak.
pub fn unquote_etag(value: &str) -> std::borrow::Cow<'_, str> {
    match value.strip_prefix("W/") {
        Some(rest) => format!("W/{}", rest.trim_matches('"')).into(),
        None => value.trim_matches('"').into(),
    }
}

/// Milliseconds with microsecond precision.
pub fn millis(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        // Control characters, quotes, backslashes, DEL, non-ASCII: everything escaping decides.
        prop_oneof![
            "[ -~]{0,20}",
            "[\\x00-\\x1f\"\\\\\\x7f é€😀a-z]{0,20}",
            any::<String>(),
        ]
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            0.0..1e6f64,
            any::<f64>().prop_filter("finite", |x| x.is_finite()),
            Just(0.001),
            Just(1e21),
            Just(f64::MIN_POSITIVE),
        ]
    }

    proptest! {
        #[test]
        fn the_record_writer_writes_serde_jsons_bytes(
            strings in proptest::collection::vec(text(), 13),
            options in proptest::collection::vec(any::<bool>(), 16),
            ints in proptest::collection::vec(any::<u64>(), 4),
            floats in proptest::collection::vec(float(), 2),
            ts in any::<u32>(),
            trace in any::<[u8; 16]>(),
            span in any::<[u8; 8]>(),
        ) {
            let s = |i: usize| strings[i].as_str();
            let o = |i: usize, v: &'static str| options[i].then_some(v);
            let record = Record {
                ts: rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::from(ts) * 997),
                ),
                phase: o(0, "outcome").unwrap_or("intent"),
                request_id: s(0),
                trace_id: hex_id(trace),
                span_id: hex_id(span),
                client: Client {
                    addr: options[1].then(|| s(1)),
                    id: options[2].then(|| s(2)),
                    auth: o(3, "api_key"),
                },
                rule: options[4].then(|| s(3)),
                credential: options[5].then(|| s(4)),
                method: s(5),
                wire_method: options[6].then(|| s(6)),
                path: s(7),
                query: options[7].then(|| s(8)),
                resource: options[8].then(|| Resource {
                    collection: s(9),
                    id: options[9].then(|| s(10)),
                }),
                status: options[10].then_some(ints[0] as u16),
                upstream_status: options[11].then_some(ints[1] as u16),
                cache: o(12, "hit"),
                if_match: options[13].then(|| s(11)),
                etag: options[14].then(|| s(12).into()),
                bytes_in: options[15].then_some(ints[2]),
                bytes_out: Some(ints[3]),
                duration_ms: Some(floats[0]),
                upstream_ms: options[0].then_some(floats[1]),
                error: o(1, "upstream_timeout"),
                complete: options[2].then_some(options[3]),
            };
            let mut reference = serde_json::to_vec(&record).unwrap();
            prop_assert_eq!(reference.pop(), Some(b'}'));
            let written = record.to_open_json();
            prop_assert_eq!(
                String::from_utf8_lossy(written.as_bytes()),
                String::from_utf8_lossy(&reference)
            );
        }
    }

    proptest! {
        #[test]
        fn needs_escape_agrees_with_a_byte_loop(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let simple = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(needs_escape(&bytes), simple);
        }
    }

    #[test]
    fn a_time_past_year_9999_saturates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800 + 86_400);
        assert_eq!(&rfc3339_millis(t), b"9999-12-31T23:59:59.999Z");
        // At the edge: the last second of 9999 is written as it is, the next one saturates,
        // and so does a time far beyond (no overflow on the way).
        let at = |secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(
            &rfc3339_millis(at(YEAR_10000 - 1)),
            b"9999-12-31T23:59:59.000Z"
        );
        assert_eq!(&rfc3339_millis(at(YEAR_10000)), b"9999-12-31T23:59:59.999Z");
        assert_eq!(&rfc3339_millis(at(1 << 62)), b"9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn needs_escape_at_every_position() {
        for len in 0..20 {
            for at in 0..len {
                for b in [0u8, 0x1f, b'"', b'\\', 0x20, 0x7f, 0x80, 0xff, b'a'] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = b;
                    let want = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_escape(&bytes), want, "{bytes:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn timestamps_are_humantimes_everywhere(ms in 0u64..253_402_300_800_000) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            let ours = rfc3339_millis(t);
            prop_assert_eq!(
                std::str::from_utf8(&ours).unwrap(),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
    }

    #[test]
    fn timestamps_are_humantimes() {
        // Epoch, leap days, centuries, the last millisecond of 9999.
        for ms in [
            0u64,
            1,
            999,
            951_782_400_000,
            4_107_542_400_000,
            1_764_669_751_123,
            253_402_300_799_999,
        ] {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            assert_eq!(
                std::str::from_utf8(&rfc3339_millis(t)).unwrap(),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
    }

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote_etag("\"abc\""), "abc");
        assert_eq!(unquote_etag("W/\"abc\""), "W/abc");
    }
}
