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
