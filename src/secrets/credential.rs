//! Which CloudCasa credential a request is sent with.
//!
//! The choice is made early (by the policy layer; in sidecar mode, the one credential) because
//! the cache partitions by it; the token is applied last (by the inject-token layer) so it never
//! enters the cache key or any layer's view of the request. The cache pins the token it keyed on
//! as a [`PinnedToken`] so that a rotation between the two steps cannot mix tenants.

use std::sync::Arc;

use http::Request;

use crate::secrets::token::{LoadedToken, TokenSource};

/// The credential chosen for a request, in request extensions.
#[derive(Debug, Clone)]
pub struct SelectedCredential(pub Arc<TokenSource>);

/// The exact token the cache keyed a request on; injection uses it when present.
#[derive(Debug, Clone)]
pub struct PinnedToken(pub Arc<LoadedToken>);

impl SelectedCredential {
    /// The token to use for this request: the pinned one, or the source's current one.
    pub fn token_for<B>(req: &Request<B>) -> Option<Arc<LoadedToken>> {
        if let Some(pinned) = req.extensions().get::<PinnedToken>() {
            return Some(pinned.0.clone());
        }
        req.extensions().get::<SelectedCredential>()?.0.current()
    }
}
