//! Where the gateway reports what it did: the hash-chained audit trail, OpenTelemetry traces,
//! Prometheus metrics and diagnostic logs. Nothing here decides anything about a request; the
//! observe layer hands each finished exchange to these sinks.

pub mod audit;
pub mod logging;
pub mod metrics;
pub mod telemetry;
