//! cloudcasa-gateway: a caching reverse proxy in front of the CloudCasa REST API.
//!
//! The request path is assembled in [`app`]; each other module owns one concern.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod cache;
pub mod canonical;
pub mod config;
pub mod credential;
pub mod error;
pub mod gate;
pub mod headers;
pub mod identity;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod request_id;
pub mod rescue;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod watch;

/// The git revision this binary was built from (`unknown` outside a checkout).
pub const REVISION: &str = env!("GATEWAY_REVISION");
/// The date this binary was built (UTC, `YYYY-MM-DD`).
pub const BUILD_DATE: &str = env!("GATEWAY_BUILD_DATE");

pub use app::Gateway;
pub use config::Config;
