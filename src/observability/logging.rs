//! Diagnostic logs: stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
//! These are for operators; the audit trail is separate.
//!
//! Lines logged while handling a request carry its `request_id` and `trace_id` (the fields are
//! added where those lines are written), so a warning can be matched to its audit record and
//! trace. Text logs have ANSI colours only on a terminal (`log.color = "auto"`): `kubectl logs`
//! and log files get plain text.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

use crate::config::{LogColor, LogFormat};

/// One log line per period for a failure that can repeat on every request (a sink, a Redis, an
/// exporter answering errors): the first, then the first once `every` has passed since the last
/// line. Each failure is still counted by its caller; this only spares the log. Times are on the
/// process's monotonic clock, so a wall-clock step neither mutes nor repeats a line.
#[derive(Debug, Default)]
pub struct LogEvery {
    /// When the last line was logged: ms since [`LogEvery::clock_ms`]'s start, plus one (0:
    /// never).
    last: AtomicU64,
}

impl LogEvery {
    /// Whether a line is due now; if so, it counts as logged (one caller of concurrent ones).
    pub fn due(&self, every: Duration) -> bool {
        let now = Self::clock_ms() + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn clock_ms() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        let elapsed = START.get_or_init(Instant::now).elapsed();
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX - 1)
    }
}

/// Targets held at `warn` whatever `RUST_LOG` says: the file watcher and the event loop under
/// it log every filesystem event at trace level, and with stderr written to a watched directory
/// each of those lines would cause another event (tens of megabytes a second).
const QUIET_TARGETS: [&str; 4] = ["notify", "inotify", "mio", "polling"];

/// The filter: `RUST_LOG` when set (non-empty and valid), else `level` (`log.level`), with
/// [`QUIET_TARGETS`] held at `warn`. An empty `RUST_LOG` (a manifest's `value: ""`) is unset: as
/// a filter it would be valid and mean "errors only", silently overriding `log.level`.
pub fn filter(rust_log: Option<&str>, level: &str) -> EnvFilter {
    let mut filter = rust_log
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    for target in QUIET_TARGETS {
        let directive: Directive = format!("{target}=warn").parse().expect("a valid directive");
        filter = filter.add_directive(directive);
    }
    filter
}

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the installed subscriber's filter (set by [`init`]).
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat, color: LogColor, level: &str) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref(), level);
    let ansi = match color {
        LogColor::Always => true,
        LogColor::Never => false,
        LogColor::Auto => std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            builder.init();
        }
    }
}

/// Applies a new `log.level` (a reload); `RUST_LOG`, when set, still wins. Does nothing when
/// no subscriber was installed by [`init`] (tests).
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_FILTER.get() {
        Some(set) => set(filter(std::env::var("RUST_LOG").ok().as_deref(), level)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_repeating_failure_is_logged_once_a_period() {
        let log = super::LogEvery::default();
        let minute = std::time::Duration::from_secs(60);
        assert!(log.due(minute), "the first");
        assert!(!log.due(minute), "not again within the minute");
        assert!(
            log.due(std::time::Duration::ZERO),
            "once the period has passed"
        );
    }

    use super::*;

    #[test]
    fn an_empty_rust_log_is_unset() {
        assert_eq!(
            filter(Some(""), "debug").to_string(),
            filter(None, "debug").to_string()
        );
        assert_eq!(
            filter(Some("  "), "debug").to_string(),
            filter(None, "debug").to_string()
        );
        assert_ne!(
            filter(Some("warn"), "debug").to_string(),
            filter(None, "debug").to_string()
        );
    }

    #[test]
    fn the_watcher_stays_quiet_at_every_level() {
        for rust_log in [Some("trace"), Some("notify=trace,info"), None] {
            let text = filter(rust_log, "info").to_string();
            for target in QUIET_TARGETS {
                assert!(
                    text.contains(&format!("{target}=warn")),
                    "{rust_log:?}: {text}"
                );
            }
        }
    }
}
