//! The top of the proxy stack: the one place where an error or a panic below becomes a response.
//!
//! Errors are [`GatewayError`]s rendered in CloudCasa's envelope; a panic (a bug) is caught,
//! logged, and answered 500, so a client never sees a dropped connection for it.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::body::Body;
use crate::error::GatewayError;

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Rescue { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Rescue<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RescueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A layer that is not ready answers through its call's error instead.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => RescueFuture::Running {
                future: AssertUnwindSafe(future).catch_unwind(),
            },
            Err(panic) => RescueFuture::Done {
                response: Some(panicked(panic)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Rescue`].
    // pin-project-lite cannot carry docs on enum fields.
    #[allow(missing_docs)]
    #[project = RescueProj]
    pub enum RescueFuture<F> {
        /// Waiting for the stack below.
        Running {
            #[pin]
            future: CatchUnwind<AssertUnwindSafe<F>>,
        },
        /// Answered already (the call itself panicked).
        Done {
            response: Option<Response<Body>>,
        },
    }
}

impl<F> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<Body>, GatewayError>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            RescueProj::Running { future } => match ready!(future.poll(cx)) {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => rescue(err),
                Err(panic) => panicked(panic),
            },
            RescueProj::Done { response } => response
                .take()
                .expect("RescueFuture polled after completion"),
        };
        Poll::Ready(Ok(response))
    }
}

/// Logs a gateway-made error and renders it.
pub fn rescue(err: GatewayError) -> Response<Body> {
    let message = err.message();
    if err.status().is_server_error() {
        tracing::warn!(kind = err.kind(), %message, "request failed");
    } else {
        tracing::debug!(kind = err.kind(), %message, "request refused");
    }
    let kind = err.kind();
    let mut response = err.into_response();
    response.extensions_mut().insert(GatewayMade { kind });
    response
}

/// Marks a response the gateway made itself (for audit and metrics).
#[derive(Debug, Clone, Copy)]
pub struct GatewayMade {
    /// [`GatewayError::kind`].
    pub kind: &'static str,
}

fn panicked(panic: Box<dyn Any + Send>) -> Response<Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    tracing::error!(panic = %what, "a request handler panicked");
    rescue(GatewayError::Internal)
}
