//! The one place where an error or a panic below becomes a response.
//!
//! Errors are [`GatewayError`]s rendered in CloudCasa's envelope; a panic (a bug) is caught,
//! logged, and answered 500, so a client never sees a dropped connection for it. The layer runs
//! twice in the proxy stack: under observe (so what it answers is audited), and as a last resort
//! at the very top, where only a panic in the layers between can reach it.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::context::{Exchange, GatewayMade, LogIds};
use crate::http::body::Body;
use crate::http::error::GatewayError;

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
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<GatewayError>,
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
        // Log lines about this request carry its ids (none above the observe layer); the ids are
        // taken from the exchange only when there is something to log.
        let exchange = Exchange::of(&req).cloned();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => RescueFuture::Running {
                future: AssertUnwindSafe(future).catch_unwind(),
                exchange,
            },
            Err(panic) => RescueFuture::Done {
                response: Some(panicked(panic, exchange.map(|e| e.log_ids()).as_ref())),
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
            exchange: Option<Arc<Exchange>>,
        },
        /// Answered already (the call itself panicked).
        Done {
            response: Option<Response<Body>>,
        },
    }
}

impl<F, E> Future for RescueFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<GatewayError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            RescueProj::Running { future, exchange } => match ready!(future.poll(cx)) {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => rescue(err.into(), exchange.as_ref().map(|e| e.log_ids()).as_ref()),
                Err(panic) => panicked(panic, exchange.as_ref().map(|e| e.log_ids()).as_ref()),
            },
            RescueProj::Done { response } => response
                .take()
                .expect("RescueFuture polled after completion"),
        };
        Poll::Ready(Ok(response))
    }
}

/// Logs a gateway-made error (with the request's ids) and renders it.
fn rescue(err: GatewayError, ids: Option<&LogIds>) -> Response<Body> {
    // `detail`, not `message`: JSON logs already have a `message` key for the event itself.
    let detail = err.message();
    let request_id = ids.map(LogIds::request_id);
    let trace_id = ids.map(|i| tracing::field::display(i.trace_id));
    if err.status().is_server_error() {
        tracing::warn!(kind = err.kind(), request_id, trace_id, %detail, "request failed");
    } else {
        tracing::debug!(kind = err.kind(), request_id, trace_id, %detail, "request refused");
    }
    let kind = err.kind();
    let mut response = err.into_response();
    response.extensions_mut().insert(GatewayMade { kind });
    response
}

fn panicked(panic: Box<dyn Any + Send>, ids: Option<&LogIds>) -> Response<Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    tracing::error!(
        panic = %what,
        request_id = ids.map(LogIds::request_id),
        trace_id = ids.map(|i| tracing::field::display(i.trace_id)),
        "a request handler panicked"
    );
    rescue(GatewayError::Internal, ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use tower::ServiceExt;

    async fn answer<S>(service: S) -> Response<Body>
    where
        S: Service<Request<()>, Response = Response<Body>>,
        S::Error: Into<GatewayError>,
    {
        let Ok(response) = RescueLayer.layer(service).oneshot(Request::new(())).await;
        response
    }

    #[tokio::test]
    async fn errors_and_panics_become_envelopes() {
        let refused = answer(tower::service_fn(|_: Request<()>| async {
            Err::<Response<Body>, _>(GatewayError::NotCached)
        }))
        .await;
        assert_eq!(refused.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            refused.extensions().get::<GatewayMade>().map(|g| g.kind),
            Some(GatewayError::NotCached.kind())
        );

        // A service that cannot fail (the layers above the inner rescue) and panics: in the
        // future, and in the call itself.
        let in_future = answer(tower::service_fn(|_: Request<()>| async {
            if true {
                panic!("a bug");
            }
            Ok::<Response<Body>, Infallible>(Response::new(crate::http::body::empty()))
        }))
        .await;
        assert_eq!(in_future.status(), StatusCode::INTERNAL_SERVER_ERROR);
        #[derive(Clone)]
        struct PanicsInCall;
        impl Service<Request<()>> for PanicsInCall {
            type Response = Response<Body>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<Body>, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<()>) -> Self::Future {
                panic!("a bug in call")
            }
        }
        let in_call = answer(PanicsInCall).await;
        assert_eq!(in_call.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            in_call.extensions().get::<GatewayMade>().map(|g| g.kind),
            Some(GatewayError::Internal.kind())
        );
    }
}
