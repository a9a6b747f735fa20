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

/// A body stalled: no bytes for its gap (a client's request body: `server.body_timeout`; an
/// upstream's response body: `upstream.timeout`).
#[derive(Debug, thiserror::Error)]
#[error("no body bytes for {}", humantime::format_duration(*.timeout))]
pub struct BodyTimedOut {
    /// The configured gap.
    pub timeout: std::time::Duration,
}

/// Wraps a client's body so that it errors with [`BodyTooLarge`] past `limit` bytes, with
/// [`BodyTimedOut`] when no bytes come for `timeout` while someone waits for them, and with
/// [`ClientBodyError`] when the client's own stream fails.
pub fn client_body<B>(body: B, limit: u64, timeout: std::time::Duration) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    Deadline::new(limited, timeout)
        .map_err(move |e| {
            if find_in::<http_body_util::LengthLimitError>(&e) {
                Box::new(BodyTooLarge { limit }) as BoxError
            } else if e.is::<BodyTimedOut>() {
                e
            } else {
                Box::new(ClientBodyError(e)) as BoxError
            }
        })
        .boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body that fails with [`BodyTimedOut`] when it has kept its reader waiting for `gap`.
    /// The clock runs only while someone polls and the body has nothing (backpressure from a
    /// slow upstream never counts), and a timer exists only while the body is pending, so a
    /// body that is already whole costs nothing. (tower-http's `TimeoutBody` would do, but it
    /// forwards neither `size_hint` nor `is_end_stream`, which the upstream call relies on.)
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        gap: std::time::Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<B> Deadline<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, gap: std::time::Duration) -> Self {
        Self {
            inner,
            gap,
            sleep: None,
        }
    }
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.set(None);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.gap)));
                }
                let sleep = this.sleep.as_pin_mut().expect("set above");
                match sleep.poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(BodyTimedOut { timeout: *this.gap }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `err` is, or is caused by, a `T`.
fn find_in<T: std::error::Error + 'static>(err: &BoxError) -> bool {
    crate::http::error::find_cause::<T>(err.as_ref()).is_some()
}

/// A memory budget shared by many bodies (`cache.max_inflight`, `upstream.max_buffered_bodies`),
/// in KiB permits: a semaphore, so that a reservation is taken without waiting and given back
/// when its holder drops it.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// What the permits hold in all.
    bytes: u64,
}

impl Budget {
    /// `bytes` in whole KiB, at least one.
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(kib)),
            bytes: kib as u64 * 1024,
        }
    }

    /// What the budget holds in all, in bytes (whole KiB).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Bytes held against a [`Budget`]. Permits are taken as the bytes cross each KiB, so a body
/// read in small frames is not counted a KiB per frame.
#[derive(Debug, Default)]
pub struct Reservation {
    bytes: u64,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Reservation {
    /// Reserves `len` more bytes of `budget`; `false`, with nothing more taken, when the budget
    /// has not that much left.
    pub fn grow(&mut self, budget: &Budget, len: u64) -> bool {
        let total = self.bytes.saturating_add(len);
        // In u64, then checked: saturating each side to u32 first would make the KiB past 4 TiB
        // free (both sides at the cap), for a budget configured that large.
        let Ok(more) = u32::try_from(total.div_ceil(1024) - self.bytes.div_ceil(1024)) else {
            return false;
        };
        if more > 0 {
            match budget.permits.clone().try_acquire_many_owned(more) {
                Ok(permit) => match &mut self.permit {
                    Some(held) => held.merge(permit),
                    None => self.permit = Some(permit),
                },
                Err(_) => return false,
            }
        }
        self.bytes = total;
        true
    }

    /// `body`, holding what is reserved until it ends or is dropped.
    pub fn hold(self, body: Body) -> Body {
        match self.permit {
            Some(permit) => boxed(Tap::new(body, Hold(permit))),
            None => body,
        }
    }
}

/// Holds something (a memory reservation) for as long as the body it taps is alive.
#[derive(Debug)]
pub struct Hold<T>(pub T);

impl<T: Send + 'static> TapHook for Hold<T> {
    fn data(&mut self, _len: usize) {}
    fn end(&mut self, _complete: bool) {}
}

/// What a [`Tap`] reports.
pub trait TapHook: Send + 'static {
    /// A data frame of `len` bytes passed.
    fn data(&mut self, len: usize);
    /// The body ended: `complete` when its last frame passed, `false` when it failed or was
    /// dropped unfinished (the client went away). Called exactly once, unless
    /// [`TapHook::failed`] is called instead.
    fn end(&mut self, complete: bool);
    /// The body failed: its source broke off (not the reader going away). By default, an
    /// unfinished end.
    fn failed(&mut self) {
        self.end(false);
    }
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
                    hook.failed();
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
    /// The whole body, within the limit, in an allocation of exactly its size (never a slice of
    /// a larger read buffer, which a stored copy would keep alive whole).
    Complete(Bytes),
    /// Past the limit: the bytes read so far, and the rest of the body.
    TooLarge(VecDeque<Bytes>, Body),
}

/// Reads a body whole if it fits in `limit`; otherwise hands back what was read and the rest,
/// so it can still stream through. A body of known length is read into one allocation of that
/// length, so collecting costs one copy and no more memory than the body.
///
/// `admit` is asked before each chunk is kept (with its length) and can refuse it, which ends
/// the collection as if the limit were reached: a memory budget shared by many collections.
pub async fn collect_limited(
    mut body: Body,
    limit: u64,
    mut admit: impl FnMut(usize) -> bool,
) -> Result<Collected, BoxError> {
    let mut chunks = VecDeque::new();
    if body.size_hint().lower() > limit {
        return Ok(Collected::TooLarge(chunks, body));
    }
    let known = body.size_hint().exact().filter(|n| *n <= limit);
    let mut whole = bytes::BytesMut::with_capacity(known.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let total = (whole.len() + data.len()) as u64;
            if total > limit || !admit(data.len()) {
                if !whole.is_empty() {
                    chunks.push_back(whole.split().freeze());
                }
                chunks.push_back(data);
                return Ok(Collected::TooLarge(chunks, body));
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(Collected::Complete(if whole.capacity() == whole.len() {
        whole.freeze()
    } else {
        // Grown by doubling (the length was not known): keep only what is used.
        Bytes::copy_from_slice(&whole)
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

    // Both forwarded: hyper stops polling a body once it has written `Content-Length` bytes,
    // and the observe layer then asks whether it had ended; without these, every answer that
    // grew past `cache.max_object_size` was recorded as abandoned by its client.
    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let held: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(held));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reservation_counts_every_kib_even_past_4_tib() {
        const TIB: u64 = 1 << 40;
        let budget = Budget::new(16 * TIB);
        let mut held = Reservation::default();
        assert!(held.grow(&budget, 3 * TIB));
        assert!(held.grow(&budget, 2 * TIB));
        assert!(held.grow(&budget, 1));
        // 5 TiB and one byte: every KiB of it taken from the budget, none free.
        let taken = (16 * TIB) / 1024 - budget.permits.available_permits() as u64;
        assert_eq!(taken, (5 * TIB) / 1024 + 1);
        // More than one acquisition can take at once is refused, not taken in part.
        assert!(!held.grow(&budget, 5 * TIB));
        assert_eq!(held.bytes, 5 * TIB + 1);
    }

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_a_whole_one_keeps_its_size() {
        let whole = client_body(full("abc"), 10, std::time::Duration::from_secs(1));
        assert_eq!(whole.size_hint().exact(), Some(3));
        let empty = client_body(empty(), 10, std::time::Duration::from_secs(1));
        assert!(empty.is_end_stream());
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let mut stalled = client_body(rx, 10, std::time::Duration::from_secs(30));
        tx.send_data(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(
            stalled.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        // 29 s of silence is within the gap; 30 s is not.
        let err = stalled.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyTimedOut>(), "{err}");
        drop(tx);
    }

    #[tokio::test]
    async fn collects_within_the_limit_and_hands_back_the_rest() {
        let Collected::Complete(b) = collect_limited(full("abc"), 3, |_| true).await.unwrap()
        else {
            panic!()
        };
        assert_eq!(b, "abc");
        let Collected::TooLarge(prefix, rest) =
            collect_limited(full("abcd"), 3, |_| true).await.unwrap()
        else {
            panic!()
        };
        let mut prefixed = PrefixedBody { prefix, rest };
        assert_eq!(prefixed.size_hint().exact(), Some(4));
        assert!(!prefixed.is_end_stream());
        let mut whole = Vec::new();
        while let Some(frame) = prefixed.frame().await {
            whole.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(whole, b"abcd");
        // Ended once both parts have: what the observe layer asks of a body hyper stopped
        // polling after its last byte.
        assert!(prefixed.is_end_stream());
        assert_eq!(prefixed.size_hint().exact(), Some(0));
    }
}
