//! The proxy's layers, one file or folder per step, numbered in stack order (outermost first).
//! [`crate::app`] stacks them; read its `proxy_stack` for the one-line reason each is there.
//!
//! A layer depends on the plumbing below it (`http`, `config`, `secrets`, `upstream`,
//! `context`), never on the app; it records what it learns on the request's exchange and does not
//! count its own refusals: the observe layer accounts for every request from what the exchange
//! says.

#[path = "08_audit_intent.rs"]
pub mod audit_intent;
#[path = "07_body_limit.rs"]
pub mod body_limit;
#[path = "09_cache/mod.rs"]
pub mod cache;
#[path = "04_canonical.rs"]
pub mod canonical;
#[path = "05_identity/mod.rs"]
pub mod identity;
#[path = "10_inject_token.rs"]
pub mod inject_token;
#[path = "02_observe.rs"]
pub mod observe;
#[path = "06_policy.rs"]
pub mod policy;
#[path = "01_request_id.rs"]
pub mod request_id;
#[path = "03_rescue.rs"]
pub mod rescue;
