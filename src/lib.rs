//! cloudcasa-gateway: a caching reverse proxy in front of the CloudCasa REST API.
//!
//! The request path is assembled in [`app`]; each other module owns one concern.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod context;
pub mod fleet;
pub mod http;
pub mod layers;
pub mod observability;
pub mod secrets;
pub mod upstream;

/// The git revision this binary was built from (`unknown` outside a checkout).
pub const REVISION: &str = env!("GATEWAY_REVISION");
/// The date this binary was built (UTC, `YYYY-MM-DD`).
pub const BUILD_DATE: &str = env!("GATEWAY_BUILD_DATE");

pub use app::Gateway;
pub use config::Config;
