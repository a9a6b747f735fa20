//! HTTP plumbing shared by every layer: the body type, header hygiene, the gateway's errors and
//! their one rendering as CloudCasa's envelope, and the future behind layers that wait before
//! calling the stack below.

pub mod body;
pub mod error;
pub mod gate;
pub mod headers;
