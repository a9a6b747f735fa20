//! `X-Request-Id`: keep a sane one from the client, make one otherwise, and send it both ways.
//!
//! The id is left on the request's `X-Request-Id` header, one value, for the layers below (the
//! observe layer puts it on the exchange, for audit records and logs), and is copied onto the
//! response whatever produced it.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::ready;
use tower::{Layer, Service};

use crate::http::headers::X_REQUEST_ID;

/// An id is kept when it is 1 to 128 characters of letters, digits and `-_.:+/=`; anything else
/// (control characters, spaces, quotes) could corrupt logs downstream, so it is replaced.
pub fn is_sane(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

fn generate() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// Layer that assigns request ids.
#[derive(Debug, Clone, Default)]
pub struct SetRequestIdLayer;

impl<S> Layer<S> for SetRequestIdLayer {
    type Service = SetRequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SetRequestId { inner }
    }
}

/// Service that assigns request ids.
#[derive(Debug, Clone)]
pub struct SetRequestId<S> {
    inner: S,
}

impl<S, ReqB, ResB, E> Service<Request<ReqB>> for SetRequestId<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>, Error = E>,
{
    type Response = Response<ResB>;
    type Error = E;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let mut values = req.headers().get_all(&X_REQUEST_ID).iter();
        let id = match (values.next(), values.next()) {
            (Some(v), None) if is_sane(v) => v.clone(),
            // Missing, not sane, or more than one: one the gateway makes (`insert` replaces
            // every value), so the header holds exactly the id the records name.
            _ => {
                let id = generate();
                req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        RequestIdFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// Copies the id onto the response, whatever layer below produced it.
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, B, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(id)) = (&mut result, this.id.take()) {
            resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanity_rules() {
        assert!(is_sane(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!is_sane(&HeaderValue::from_static("has space")));
        assert!(!is_sane(&HeaderValue::from_static("")));
        assert!(!is_sane(&HeaderValue::from_str(&"a".repeat(129)).unwrap()));
        assert!(is_sane(&generate()));
    }
}
