//! Token injection, the last step before the upstream: whatever credential the client sent is
//! removed and the selected CloudCasa token is set, so the token never enters the cache key or
//! any other layer's view of the request. An upstream 401 makes the token source re-read its
//! Secret at once.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::Either;
use http::{Request, Response, StatusCode, header};
use tower::{Layer, Service};

use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::secrets::credential::SelectedCredential;
use crate::secrets::token::TokenSource;

/// Replaces whatever credential the client sent with the selected CloudCasa token.
#[derive(Debug, Clone, Default)]
pub struct InjectTokenLayer;

impl<S> Layer<S> for InjectTokenLayer {
    type Service = InjectToken<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InjectToken { inner }
    }
}

/// See [`InjectTokenLayer`].
#[derive(Debug, Clone)]
pub struct InjectToken<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for InjectToken<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Either<Ready<Result<Response<Body>, GatewayError>>, InjectFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let source = req
            .extensions()
            .get::<SelectedCredential>()
            .map(|c| c.0.clone());
        let Some(token) = SelectedCredential::token_for(&req) else {
            // Not forwarded; the client's own credential goes no further either.
            req.headers_mut().remove(header::AUTHORIZATION);
            let credential =
                source.map_or_else(|| "(none)".to_string(), |s| s.credential().to_string());
            return Either::Left(std::future::ready(Err(GatewayError::NoToken {
                credential,
            })));
        };
        // The client's own credential is replaced: `insert` drops every value the header had.
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.authorization().clone());
        Either::Right(InjectFuture {
            inner: self.inner.call(req),
            source,
        })
    }
}

pin_project_lite::pin_project! {
    /// Watches for an upstream 401, which means the token in use is no longer valid.
    pub struct InjectFuture<F> {
        #[pin]
        inner: F,
        source: Option<Arc<TokenSource>>,
    }
}

impl<F> Future for InjectFuture<F>
where
    F: Future<Output = Result<Response<Body>, GatewayError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result
            && response.status() == StatusCode::UNAUTHORIZED
            && let Some(source) = this.source.take()
        {
            // The Secret may have rotated before the watcher noticed: look now.
            source.request_reload();
        }
        Poll::Ready(result)
    }
}
