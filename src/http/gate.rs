//! A step that must finish before a request goes on: the future behind layers that wait for
//! something (a TokenReview, a durable audit record) and then call the stack below, or refuse.
//!
//! Written as a state machine rather than an `async` block because rustc cannot prove such a
//! block `Send` for a generic inner service (the higher-ranked lifetime problem), and so that the
//! inner service is not called at all, not even to build its future, before the step allows it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use tower::Service;

use crate::http::body::Body;
use crate::http::error::GatewayError;

/// What a finished step does to the request before it goes on.
pub type Admit<B> = Box<dyn FnOnce(&mut Request<B>) + Send>;

pin_project_lite::pin_project! {
    /// Waits for a step, then calls the inner service with the admitted request.
    // pin-project-lite cannot carry docs on enum fields.
    #[allow(missing_docs)]
    #[project = GateProj]
    pub enum GateFuture<S: Service<Request<B>>, B> {
        /// The step is running.
        Waiting {
            step: BoxFuture<'static, Result<Admit<B>, GatewayError>>,
            next: Option<(S, Request<B>)>,
        },
        /// Admitted (or nothing to wait for).
        Calling {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, B: 'static> GateFuture<S, B>
where
    S: Service<Request<B>> + Clone,
{
    /// Runs `step` first; `inner` is the ready service, replaced by a clone for later calls.
    pub fn wait(
        inner: &mut S,
        req: Request<B>,
        step: BoxFuture<'static, Result<Admit<B>, GatewayError>>,
    ) -> Self {
        let clone = inner.clone();
        Self::Waiting {
            step,
            next: Some((std::mem::replace(inner, clone), req)),
        }
    }

    /// Refused without calling the inner service.
    pub fn refuse(error: GatewayError) -> Self {
        Self::Waiting {
            step: Box::pin(std::future::ready(Err(error))),
            next: None,
        }
    }

    /// Nothing to wait for.
    pub fn call(inner: &mut S, req: Request<B>) -> Self {
        Self::Calling {
            future: inner.call(req),
        }
    }
}

impl<S, B> Future for GateFuture<S, B>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
{
    type Output = Result<Response<Body>, GatewayError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let future = match self.as_mut().project() {
                GateProj::Calling { future } => return future.poll(cx),
                GateProj::Waiting { step, next } => {
                    let admit = ready!(step.as_mut().poll(cx))?;
                    let (mut inner, mut req) = next.take().expect("polled after completion");
                    admit(&mut req);
                    inner.call(req)
                }
            };
            self.set(GateFuture::Calling { future });
        }
    }
}
