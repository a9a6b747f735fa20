//! What the gateway accepts from a client before anything else looks at the request: the body
//! size limit (`server.max_body_size`), enforced up front from `Content-Length` and while
//! streaming for chunked bodies, so the body is never buffered to check it.

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response, header};

use tower::{Layer, Service};

use crate::body::{self, Body, BoxError};
use crate::error::GatewayError;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    limit: u64,
}

impl BodyLimitLayer {
    /// Bodies over `limit` bytes are refused with 413.
    pub fn new(limit: u64) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    limit: u64,
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
        let limit = self.limit;
        Either::Right(self.inner.call(req.map(|b| body::limited(b, limit))))
    }
}
