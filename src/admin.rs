//! The admin listener: liveness, readiness, and (in later modules) cache control and metrics.
//! Kept off the proxy port so that a sidecar's clients cannot reach it by accident.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::app::Shared;
use crate::body::{self, Body};
use crate::error::error_response;

/// Handles one admin request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(&shared),
        (_, "/healthz" | "/readyz") => error_response(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, path) => error_response(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint at {path}"),
        ),
    };
    Ok(response)
}

fn readyz(shared: &Shared) -> Response<Body> {
    if shared.draining.load(Ordering::Acquire) {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down");
    }
    match shared.token.current() {
        Some(_) => text(StatusCode::OK, "ready\n"),
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "no CloudCasa API token is loaded for credential '{}'",
                shared.token.credential()
            ),
        ),
    }
}

fn text(status: StatusCode, body_text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(body_text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}
