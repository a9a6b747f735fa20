//! What the gateway accepts from a client before anything else looks at the request: the body
//! size limit (`server.max_body_size`), enforced up front from `Content-Length` and while
//! streaming for chunked bodies, so the body is never buffered to check it; and the body's
//! deadline (`server.body_timeout`), the longest gap between two reads of it.

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response, header};

use tower::{Layer, Service};

use crate::http::body::{self, Body, BoxError};
use crate::http::error::GatewayError;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    limit: u64,
    timeout: Duration,
}

impl BodyLimitLayer {
    /// Bodies over `limit` bytes are refused with 413; a body that stalls for `timeout` ends
    /// with 408.
    pub fn new(limit: u64, timeout: Duration) -> Self {
        Self { limit, timeout }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            limit: self.limit,
            timeout: self.timeout,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    limit: u64,
    timeout: Duration,
}

impl<S, B> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Either<std::future::Ready<Result<Response<Body>, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.limit) {
            return Either::Left(std::future::ready(Err(GatewayError::PayloadTooLarge {
                limit: self.limit,
            })));
        }
        let (limit, timeout) = (self.limit, self.timeout);
        Either::Right(
            self.inner
                .call(req.map(|b| body::client_body(b, limit, timeout))),
        )
    }
}
