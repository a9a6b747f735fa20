//! The one body type that travels through the stack.
//!
//! Requests arrive as hyper's `Incoming`, responses come from the upstream or from the cache's
//! memory; every layer sees [`Body`], so layers stay independent of where bytes come from.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame};
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

/// The client's request body failed: it broke off, or its framing was malformed. Marked so that
/// the upstream call can tell the client's fault (400) from the upstream's (502).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(#[source] pub BoxError);

/// Wraps a client's body so that it errors with [`BodyTooLarge`] past `limit` bytes, and with
/// [`ClientBodyError`] when the client's own stream fails.
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
                Box::new(ClientBodyError(e)) as BoxError
            }
        })
        .boxed_unsync()
}

/// What a [`Tap`] reports.
pub trait TapHook: Send + 'static {
    /// A data frame of `len` bytes passed.
    fn data(&mut self, len: usize);
    /// The body ended: `complete` when its last frame passed, `false` when it failed or was
    /// dropped unfinished (the client went away). Called exactly once.
    fn end(&mut self, complete: bool);
}

pin_project_lite::pin_project! {
    /// A body that reports its frames and its end to a hook, passing everything through.
    pub struct Tap<B: http_body::Body, H: TapHook> {
        #[pin]
        inner: B,
        hook: Option<H>,
    }

    impl<B: http_body::Body, H: TapHook> PinnedDrop for Tap<B, H> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut hook) = this.hook.take() {
                // A body nobody polled because it had nothing to give is complete, too.
                hook.end(http_body::Body::is_end_stream(this.inner.as_ref().get_ref()));
            }
        }
    }
}

impl<B: http_body::Body, H: TapHook> Tap<B, H> {
    /// Wraps `inner`.
    pub fn new(inner: B, hook: H) -> Self {
        Self {
            inner,
            hook: Some(hook),
        }
    }
}

impl<B, H> http_body::Body for Tap<B, H>
where
    B: http_body::Body<Data = Bytes>,
    H: TapHook,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(hook)) = (f.data_ref(), this.hook.as_mut()) {
                    hook.data(data.len());
                }
            }
            Some(Err(_)) => {
                if let Some(mut hook) = this.hook.take() {
                    hook.end(false);
                }
            }
            None => {
                if let Some(mut hook) = this.hook.take() {
                    hook.end(true);
                }
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body read up to a limit by [`collect_limited`].
pub enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// Past the limit: the chunks read so far, and the rest of the body.
    TooLarge(VecDeque<Bytes>, Body),
}

/// Reads a body whole if it fits in `limit`; otherwise hands back what was read and the rest,
/// so the response can still stream through.
pub async fn collect_limited(mut body: Body, limit: u64) -> Result<Collected, BoxError> {
    let mut chunks = VecDeque::new();
    if body.size_hint().lower() > limit {
        return Ok(Collected::TooLarge(chunks, body));
    }
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            chunks.push_back(data);
            if total > limit {
                return Ok(Collected::TooLarge(chunks, body));
            }
        }
    }
    Ok(Collected::Complete(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().expect("one chunk"),
        _ => {
            let mut all = Vec::with_capacity(total as usize);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            Bytes::from(all)
        }
    }))
}

/// Chunks already read, then the rest of the body.
pub struct PrefixedBody {
    /// Read already.
    pub prefix: VecDeque<Bytes>,
    /// Not read yet.
    pub rest: Body,
}

impl http_body::Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collects_within_the_limit_and_hands_back_the_rest() {
        let Collected::Complete(b) = collect_limited(full("abc"), 3).await.unwrap() else {
            panic!()
        };
        assert_eq!(b, "abc");
        let Collected::TooLarge(prefix, rest) = collect_limited(full("abcd"), 3).await.unwrap()
        else {
            panic!()
        };
        let whole = PrefixedBody { prefix, rest }
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(whole, "abcd");
    }
}
