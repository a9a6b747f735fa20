//! Secret material and the files it comes from: CloudCasa tokens (hot-reloaded from a mounted
//! Secret), the credential a request is sent with, the proxy's TLS certificate and client CA, and
//! the file watching that keeps them current.

pub mod credential;
pub mod tls;
pub mod token;
pub mod watch;
