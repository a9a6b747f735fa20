//! `[log]`, `[audit]` and `[telemetry]`: where the gateway reports what it did.

use std::path::PathBuf;

use http::Uri;

use super::{Problems, defaults, raw};

/// `[log]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format of diagnostic logs (stderr).
    pub format: LogFormat,
    /// ANSI colours in text logs.
    pub color: LogColor,
    /// The filter (`info`, `debug`, `warn,cloudcasa_gateway=debug`, …); `RUST_LOG` wins.
    pub level: String,
}

/// `log.color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogColor {
    /// Only when stderr is a terminal (`kubectl logs` and files get plain text).
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// `path = "-"`.
    Stdout,
    /// An append-only JSON Lines file.
    File(PathBuf),
}

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Whether records are written at all.
    pub enabled: bool,
    /// Where they go.
    pub sink: AuditSink,
    /// Writes wait for a durable intent record, and are refused (503) without one.
    pub fail_closed: bool,
    /// What records waiting for the writer, or being written, may hold, in bytes.
    pub max_queued: u64,
}

/// The least `audit.max_queued`: room for the largest record (a 64 KiB target whose every byte
/// is escaped, about 130 KiB) several times over.
pub const MIN_AUDIT_QUEUED: u64 = 1024 * 1024;

/// `[telemetry]`.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (`/v1/traces` is appended).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (`OTEL_SERVICE_NAME` wins when set).
    pub service_name: String,
}

/// Validates `[log]`.
pub(super) fn log(p: &mut Problems, r: raw::RawLog) -> LogConfig {
    let format = match r.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(
                "log.format",
                format!("must be \"text\" or \"json\", not {other:?}"),
            );
            LogFormat::Text
        }
    };
    let level = r.level.unwrap_or_else(|| defaults::LOG_LEVEL.into());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        p.add("log.level", format!("{level:?} is not a log filter: {e}"));
    }
    let color = match r.color.as_deref() {
        None | Some("auto") => LogColor::Auto,
        Some("always") => LogColor::Always,
        Some("never") => LogColor::Never,
        Some(other) => {
            p.add(
                "log.color",
                format!("must be \"auto\", \"always\" or \"never\", not {other:?}"),
            );
            LogColor::Auto
        }
    };
    LogConfig {
        format,
        color,
        level,
    }
}

/// Validates `[audit]`.
pub(super) fn audit(p: &mut Problems, r: raw::RawAudit) -> AuditConfig {
    let enabled = r.enabled.unwrap_or(true);
    let sink = match r.path.as_deref() {
        None | Some("-") => AuditSink::Stdout,
        Some("") => {
            p.add(
                "audit.path",
                "must be \"-\" (stdout) or a file path; to turn auditing off set audit.enabled = false",
            );
            AuditSink::Stdout
        }
        Some(path) => AuditSink::File(PathBuf::from(path)),
    };
    let fail_closed = r.fail_closed.unwrap_or(false);
    if fail_closed && !enabled {
        p.add(
            "audit.fail_closed",
            "needs the audit trail: audit.enabled must not be false",
        );
    }
    let max_queued = r
        .max_queued
        .map_or(super::defaults::AUDIT_MAX_QUEUED, |b| b.as_u64());
    if max_queued < MIN_AUDIT_QUEUED {
        p.add(
            "audit.max_queued",
            "must be at least 1MiB: one record can take about 130 KiB",
        );
    }
    AuditConfig {
        enabled,
        sink,
        fail_closed,
        max_queued,
    }
}

/// Validates `[telemetry]`.
pub(super) fn telemetry(p: &mut Problems, r: raw::RawTelemetry) -> TelemetryConfig {
    let otlp_endpoint = r.otlp_endpoint.filter(|e| !e.is_empty());
    if let Some(endpoint) = &otlp_endpoint {
        match endpoint.parse::<Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
            _ => p.add(
                "telemetry.otlp_endpoint",
                format!(
                    "{endpoint:?} is not an http:// or https:// URL, e.g. \
                     \"http://otel-collector:4318\""
                ),
            ),
        }
    }
    let service_name = r
        .service_name
        .unwrap_or_else(|| defaults::SERVICE_NAME.into());
    if service_name.is_empty() {
        p.add("telemetry.service_name", "must not be empty");
    }
    TelemetryConfig {
        otlp_endpoint,
        service_name,
    }
}
