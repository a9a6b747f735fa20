//! What the cache did with a request: one [`CacheOutcome`], from which the label audit records,
//! spans and metrics use, the admin counters ([`super::store::CacheStats::count`]) and the
//! `Cache-Status` header (RFC 9211) are all derived, with the details ([`CacheStatus`]) the header
//! adds.

use http::HeaderValue;

use super::rules::NotStorable;
use crate::context::CacheOutcome;

/// The cache's name in `Cache-Status`.
pub const CACHE_NAME: &str = "cloudcasa-gateway";

/// Why the request went to the upstream (RFC 9211 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The cache is disabled, or the request could not be keyed (no credential yet).
    Bypass,
    /// The method is not cacheable (writes).
    Method,
    /// Nothing stored for this URI.
    UriMiss,
    /// Something is stored, but for other values of the headers it varies on.
    VaryMiss,
    /// The client asked for it (`no-cache`, `no-store`, `max-age`, `min-fresh`).
    Request,
    /// The stored response was stale and was revalidated.
    Stale,
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bypass => "bypass",
            Self::Method => "method",
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Request => "request",
            Self::Stale => "stale",
        }
    }
}

/// The outcome for one request, with the details `Cache-Status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    /// `None` for a hit.
    pub forward: Option<Forward>,
    /// The upstream's status when it was asked.
    pub fwd_status: Option<u16>,
    /// Remaining freshness of what was served from the cache, in seconds.
    pub ttl: Option<i64>,
    /// A response was stored.
    pub stored: bool,
    /// The request waited for another request's upstream fetch.
    pub collapsed: bool,
    /// A stale response was served because the upstream failed.
    pub stale_if_error: bool,
    /// A stale response was served while a background request revalidates it.
    pub stale_while_revalidate: bool,
    /// Why the response was not stored, when it could have been.
    pub not_stored: Option<NotStorable>,
    /// What was served (or revalidated) came from the fleet's shared tier (Redis).
    pub shared: bool,
    /// A stored response was revalidated because the fleet link is down (this replica cannot
    /// hear other replicas' invalidations).
    pub fleet_down: bool,
}

impl CacheStatus {
    /// A fresh hit.
    pub fn hit(ttl: i64) -> Self {
        Self {
            forward: None,
            fwd_status: None,
            ttl: Some(ttl),
            stored: false,
            collapsed: false,
            stale_if_error: false,
            stale_while_revalidate: false,
            not_stored: None,
            shared: false,
            fleet_down: false,
        }
    }

    /// Went to the upstream for `why`.
    pub fn forward(why: Forward) -> Self {
        Self {
            forward: Some(why),
            ttl: None,
            ..Self::hit(0)
        }
    }

    /// What the cache did, in one word.
    pub fn outcome(&self) -> CacheOutcome {
        match self.forward {
            _ if self.stale_if_error || self.stale_while_revalidate => CacheOutcome::Stale,
            None => CacheOutcome::Hit,
            // The stored response was confirmed, whether it was stale or the client said no-cache.
            Some(Forward::Stale | Forward::Request) if self.fwd_status == Some(304) => {
                CacheOutcome::Revalidated
            }
            Some(Forward::Bypass | Forward::Method) => CacheOutcome::Bypass,
            Some(_) if self.collapsed && self.fwd_status.is_none() => CacheOutcome::Collapsed,
            Some(_) => CacheOutcome::Miss,
        }
    }

    /// The outcome's label (see [`CacheOutcome::as_str`]).
    pub fn label(&self) -> &'static str {
        self.outcome().as_str()
    }

    /// The `Cache-Status` header value.
    pub fn header_value(&self) -> HeaderValue {
        // Built with push_str and itoa rather than write!: this runs for every response.
        let mut numbers = itoa::Buffer::new();
        let mut v = String::with_capacity(64);
        v.push_str(CACHE_NAME);
        match self.forward {
            _ if self.stale_if_error => v.push_str("; hit; detail=stale-if-error"),
            _ if self.stale_while_revalidate => {
                v.push_str("; fwd=stale; detail=stale-while-revalidate")
            }
            None => v.push_str("; hit"),
            Some(fwd) => {
                v.push_str("; fwd=");
                v.push_str(fwd.as_str());
                // 200 is what a forward normally yields; say so only when it is something else.
                if let Some(s) = self.fwd_status.filter(|s| *s != 200) {
                    v.push_str("; fwd-status=");
                    v.push_str(numbers.format(s));
                }
            }
        }
        if let Some(ttl) = self.ttl {
            v.push_str("; ttl=");
            v.push_str(numbers.format(ttl));
        }
        if self.stored {
            v.push_str("; stored");
        }
        if self.collapsed {
            v.push_str("; collapsed");
        }
        // One `detail` (RFC 9211 parameters do not repeat): why nothing was stored matters most.
        let detail = match (self.not_stored, self.shared, self.fleet_down) {
            _ if self.stale_if_error || self.stale_while_revalidate => None,
            (Some(reason), _, _) => Some(reason.as_str()),
            (None, true, _) => Some("shared"),
            (None, false, true) => Some("fleet-down"),
            (None, false, false) => None,
        };
        if let Some(detail) = detail {
            v.push_str("; detail=");
            v.push_str(detail);
        }
        // The string's buffer becomes the value's: no second copy.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).expect("Cache-Status is ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211_values() {
        assert_eq!(
            CacheStatus::hit(12).header_value(),
            "cloudcasa-gateway; hit; ttl=12"
        );
        let mut s = CacheStatus::forward(Forward::Stale);
        s.fwd_status = Some(304);
        assert_eq!(
            s.header_value(),
            "cloudcasa-gateway; fwd=stale; fwd-status=304"
        );
        assert_eq!(s.label(), "revalidated");
        let mut s = CacheStatus::forward(Forward::UriMiss);
        s.stored = true;
        assert_eq!(s.header_value(), "cloudcasa-gateway; fwd=uri-miss; stored");
        assert_eq!(s.label(), "miss");
        assert_eq!(
            CacheStatus::forward(Forward::Method).header_value(),
            "cloudcasa-gateway; fwd=method"
        );
        let mut s = CacheStatus::forward(Forward::UriMiss);
        s.collapsed = true;
        assert_eq!(
            s.header_value(),
            "cloudcasa-gateway; fwd=uri-miss; collapsed"
        );
        let mut s = CacheStatus::hit(-3);
        s.stale_if_error = true;
        assert_eq!(
            s.header_value(),
            "cloudcasa-gateway; hit; detail=stale-if-error; ttl=-3"
        );
        assert_eq!(s.label(), "stale");
        let mut s = CacheStatus::forward(Forward::UriMiss);
        s.fwd_status = Some(200);
        s.not_stored = Some(NotStorable::NoStore);
        assert_eq!(
            s.header_value(),
            "cloudcasa-gateway; fwd=uri-miss; detail=no-store"
        );
        s.fwd_status = Some(503);
        assert_eq!(
            s.header_value(),
            "cloudcasa-gateway; fwd=uri-miss; fwd-status=503; detail=no-store"
        );
    }
}
