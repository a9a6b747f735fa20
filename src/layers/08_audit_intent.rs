//! Fail-closed audit: a write is forwarded only once its intent record is durable.
//!
//! With `audit.fail_closed = true`, every request whose effective method is not a read waits
//! here until the audit writer has written and fsynced its intent record; if that fails or takes
//! longer than the writer's bound, the client gets 503 and the upstream sees nothing.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::context::Exchange;
use crate::http::body::Body;
use crate::http::error::GatewayError;
use crate::http::gate::{Admit, GateFuture};
use crate::observability::audit::AuditLog;
use crate::observability::audit::record;

/// Fail-closed mode: every write (any effective method but GET, HEAD and OPTIONS) waits here for
/// its intent record to be durable.
#[derive(Debug, Clone)]
pub struct AuditIntentLayer {
    audit: Option<AuditLog>,
}

impl AuditIntentLayer {
    /// Active only when `audit` is fail-closed.
    pub fn new(audit: Option<AuditLog>) -> Self {
        Self {
            audit: audit.filter(AuditLog::fail_closed),
        }
    }
}

impl<S> Layer<S> for AuditIntentLayer {
    type Service = AuditIntent<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditIntent {
            inner,
            audit: self.audit.clone(),
        }
    }
}

/// See [`AuditIntentLayer`].
#[derive(Debug, Clone)]
pub struct AuditIntent<S> {
    inner: S,
    audit: Option<AuditLog>,
}

impl<S> Service<Request<Body>> for AuditIntent<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = GatewayError> + Clone,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = GateFuture<S, Body>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let exchange = Exchange::of(&req).cloned();
        let (Some(audit), Some(exchange), true) =
            (&self.audit, exchange, !crate::http::is_read(req.method()))
        else {
            return GateFuture::call(&mut self.inner, req);
        };
        let audit = audit.clone();
        let json = record::intent(&exchange);
        let step = async move {
            match audit.intent(json).await {
                Ok(()) => Ok(Box::new(|_: &mut Request<Body>| {}) as Admit<Body>),
                Err(why) => Err(GatewayError::AuditUnavailable(why)),
            }
        };
        GateFuture::wait(&mut self.inner, req, Box::pin(step))
    }
}
