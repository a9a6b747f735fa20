//! The one body type that travels through the stack.
//!
//! Requests arrive as hyper's `Incoming`, responses come from the upstream or from the cache's
//! memory; every layer sees [`Body`], so layers stay independent of where bytes come from.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Error type carried by bodies and by the stack before it is classified.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A streamed body of bytes; never buffered unless a layer chooses to (the cache, bounded).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body made of bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A request body grew past `server.max_body_size` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// Wraps a client's body so that it errors with [`BodyTooLarge`] past `limit` bytes.
pub fn limited<B>(body: B, limit: u64) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .map_err(move |e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Box::new(BodyTooLarge { limit }) as BoxError
            } else {
                e
            }
        })
        .boxed_unsync()
}
