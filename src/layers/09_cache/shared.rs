//! A stored response as bytes for the fleet's shared tier (Redis), and back.
//!
//! A fixed binary layout, versioned by its first four bytes: the times are wall-clock
//! milliseconds (replicas share no monotonic clock), every length is checked before it is used
//! (Redis holds what any replica wrote: a bad entry is a miss, never a panic), and nothing of
//! the request is in it but the values its `Vary` names (never a credential: the token is a
//! request header the gateway adds after the cache).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::store::Stored;

const MAGIC: &[u8; 4] = b"CCG1";
/// The most header lines (and `Vary` names) an entry may hold: far more than the upstream's
/// client accepts in one response (hyper's limit, 100), and far below where `HeaderMap`
/// panics.
const MAX_FIELDS: usize = 1024;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes of `stored`.
pub fn encode(stored: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.body.len() + 512);
    out.extend_from_slice(MAGIC);
    let since_epoch = stored
        .response_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    for d in [
        since_epoch,
        stored.initial_age,
        stored.lifetime,
        stored.stale_if_error,
        stored.stale_while_revalidate,
    ] {
        out.extend_from_slice(&millis(d).to_le_bytes());
    }
    out.push(u8::from(stored.upstream_etag) | (u8::from(stored.forbids_stale) << 1));
    put_bytes(&mut out, stored.etag.as_bytes());
    out.extend_from_slice(&(stored.headers.len() as u32).to_le_bytes());
    for (name, value) in &stored.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    out.extend_from_slice(&(stored.vary.len() as u32).to_le_bytes());
    for (name, value) in &stored.vary {
        put_bytes(&mut out, name.as_str().as_bytes());
        match value {
            Some(v) => {
                out.push(1);
                put_bytes(&mut out, v.as_bytes());
            }
            None => out.push(0),
        }
    }
    put_bytes(&mut out, &stored.body);
    out
}

/// Reads what [`encode`] wrote, checking every length; `None` for anything else.
struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.data.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()?;
        let start = self.at;
        self.take(n)?;
        Some(self.data.slice(start..start + n))
    }
}

/// The stored response in `data`, or `None` if `data` is not one.
pub fn decode(data: &Bytes) -> Option<Stored> {
    let mut r = Reader { data, at: 0 };
    if r.take(4)? != MAGIC {
        return None;
    }
    let mut times = [Duration::ZERO; 5];
    for t in &mut times {
        *t = Duration::from_millis(r.u64()?);
    }
    let [
        since_epoch,
        initial_age,
        lifetime,
        stale_if_error,
        stale_while_revalidate,
    ] = times;
    let flags = r.u8()?;
    let etag = HeaderValue::from_maybe_shared(r.bytes()?).ok()?;
    // What Redis holds is not trusted: an entry written by something else, or corrupted, is
    // refused, and no count in it sizes an allocation or reaches `HeaderMap`'s limits (which
    // panic).
    let count = r.u32()?;
    if count > MAX_FIELDS {
        return None;
    }
    let mut headers = HeaderMap::try_with_capacity(count).ok()?;
    for _ in 0..count {
        let name = HeaderName::from_bytes(&r.bytes()?).ok()?;
        let value = HeaderValue::from_maybe_shared(r.bytes()?).ok()?;
        headers.try_append(name, value).ok()?;
    }
    let count = r.u32()?;
    if count > MAX_FIELDS {
        return None;
    }
    let mut vary = Vec::with_capacity(count);
    for _ in 0..count {
        let name = HeaderName::from_bytes(&r.bytes()?).ok()?;
        let value = match r.u8()? {
            0 => None,
            1 => Some(HeaderValue::from_maybe_shared(r.bytes()?).ok()?),
            _ => return None,
        };
        vary.push((name, value));
    }
    let body = r.bytes()?;
    if r.at != data.len() {
        return None;
    }
    Some(Stored {
        headers,
        body,
        etag,
        upstream_etag: flags & 1 != 0,
        vary,
        response_time: SystemTime::UNIX_EPOCH.checked_add(since_epoch)?,
        initial_age,
        lifetime,
        stale_if_error,
        stale_while_revalidate,
        forbids_stale: flags & 2 != 0,
    })
}

/// How long a shared entry is worth keeping: while it is fresh or may stand in stale, and, for
/// one the upstream can revalidate (it has the upstream's ETag), at least a minute, since a
/// stale entry still saves the body's transfer when the upstream answers 304.
pub fn useful_for(stored: &Stored, now: SystemTime) -> Duration {
    let useful = stored
        .lifetime
        .saturating_add(stored.stale_if_error.max(stored.stale_while_revalidate))
        .saturating_sub(stored.age(now));
    let floor = match stored.upstream_etag {
        true => Duration::from_secs(60),
        false => Duration::from_secs(1),
    };
    useful.max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Stored {
            headers,
            body: Bytes::from_static(b"{\"_id\":\"1\"}"),
            etag: HeaderValue::from_static("\"abc\""),
            upstream_etag: true,
            vary: vec![
                (
                    HeaderName::from_static("accept-language"),
                    Some(HeaderValue::from_static("de")),
                ),
                (HeaderName::from_static("x-none"), None),
            ],
            response_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            initial_age: Duration::from_secs(3),
            lifetime: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(5),
            stale_while_revalidate: Duration::ZERO,
            forbids_stale: true,
        }
    }

    #[test]
    fn a_stored_response_survives_the_trip() {
        let s = sample();
        let back = decode(&Bytes::from(encode(&s))).expect("decodes");
        assert_eq!(back.headers, s.headers);
        assert_eq!(back.body, s.body);
        assert_eq!(back.etag, s.etag);
        assert_eq!(back.vary, s.vary);
        assert_eq!(back.response_time, s.response_time);
        assert_eq!(
            (back.initial_age, back.lifetime, back.stale_if_error),
            (s.initial_age, s.lifetime, s.stale_if_error)
        );
        assert_eq!(back.stale_while_revalidate, s.stale_while_revalidate);
        assert_eq!(
            (back.upstream_etag, back.forbids_stale),
            (s.upstream_etag, s.forbids_stale)
        );
    }

    #[test]
    fn anything_else_is_not_an_entry() {
        let good = encode(&sample());
        // Every truncation, and a byte too many, is refused, never a panic.
        for end in 0..good.len() {
            assert!(
                decode(&Bytes::copy_from_slice(&good[..end])).is_none(),
                "{end}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(&Bytes::from(longer)).is_none());
        // A count that claims more than there is.
        let mut huge = good.clone();
        let at = 4 + 5 * 8 + 1 + 4 + "\"abc\"".len();
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&Bytes::from(huge)).is_none());
        assert!(decode(&Bytes::from_static(b"not an entry")).is_none());
    }

    #[test]
    fn hostile_counts_are_refused_without_a_panic() {
        // A count that a big enough entry could back: `HeaderMap::with_capacity` panics past
        // 24,576, and `append` past 32,768 lines.
        let mut big = sample();
        big.body = Bytes::from(vec![b'x'; 300 * 1024]);
        let at = 4 + 5 * 8 + 1 + 4 + "\"abc\"".len();
        let mut forged = encode(&big);
        forged[at..at + 4].copy_from_slice(&30_000u32.to_le_bytes());
        assert!(decode(&Bytes::from(forged)).is_none());
        // As many real lines: well formed, and refused.
        let mut many = sample();
        for i in 0..MAX_FIELDS as u32 {
            many.headers.append("x-a", HeaderValue::from(i));
        }
        assert!(decode(&Bytes::from(encode(&many))).is_none());
        let mut wide = sample();
        wide.vary = (0..=MAX_FIELDS)
            .map(|_| (HeaderName::from_static("x-v"), None))
            .collect();
        assert!(decode(&Bytes::from(encode(&wide))).is_none());
        // Up to the limit, an entry decodes.
        wide.vary.pop();
        assert!(decode(&Bytes::from(encode(&wide))).is_some());
    }

    #[test]
    fn entries_are_kept_while_useful() {
        let mut s = sample();
        s.upstream_etag = false;
        let now = s.response_time + Duration::from_secs(10);
        // 60 s fresh + 5 s stale-if-error − 13 s of age.
        assert_eq!(useful_for(&s, now), Duration::from_secs(52));
        s.lifetime = Duration::ZERO;
        s.stale_if_error = Duration::ZERO;
        assert_eq!(useful_for(&s, now), Duration::from_secs(1));
        // One the upstream can revalidate saves a body for a minute at least.
        s.upstream_etag = true;
        assert_eq!(useful_for(&s, now), Duration::from_secs(60));
    }
}
