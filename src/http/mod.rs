//! HTTP plumbing shared by every layer: the body type, header hygiene, the gateway's errors and
//! their one rendering as CloudCasa's envelope, and the future behind layers that wait before
//! calling the stack below.

pub mod body;
pub mod error;
pub mod gate;
pub mod headers;
pub mod pem;
pub mod resource;

/// Whether a method only reads (GET, HEAD, OPTIONS): never a write, safe to retry, never
/// invalidates, never waits for a fail-closed audit record.
pub fn is_read(method: &::http::Method) -> bool {
    matches!(
        *method,
        ::http::Method::GET | ::http::Method::HEAD | ::http::Method::OPTIONS
    )
}
