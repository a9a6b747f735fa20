//! Keeping file-backed state current: the token, the API keys file, the TLS certificate.
//!
//! Each watched file's *directory* is watched (Kubernetes replaces a mounted Secret or ConfigMap
//! by swapping a `..data` symlink there, which a watch on the file itself would miss), and the
//! files are re-read every second as a fallback for filesystems without events. Re-reading is
//! the target's business: it compares with what it has and acts only on a change.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

/// How often files are re-read even when no file event arrives.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// State that re-reads its files.
pub trait Reload: Send + Sync + 'static {
    /// Re-reads the files (called on a blocking thread).
    fn reload(&self);
}

/// Watches `paths` for `target` until the last `Arc` to it is dropped. `nudge` asks for a reload
/// at once (e.g. after an upstream 401).
pub fn spawn<T: Reload>(paths: &[PathBuf], target: Weak<T>, nudge: Option<Arc<Notify>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut dirs: Vec<PathBuf> = paths.iter().map(|p| directory_of(p)).collect();
    dirs.sort();
    dirs.dedup();
    let names: Vec<OsString> = paths
        .iter()
        .filter_map(|p| p.file_name().map(OsStr::to_os_string))
        .collect();
    let watcher = watch_directories(&dirs, names, tx);
    tokio::spawn(watch_loop(target, nudge.unwrap_or_default(), rx, watcher));
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether an event concerns the watched files: their own names, or the `..data` symlink and
/// `..<timestamp>` directories a Kubernetes volume update swaps. Other files in the directory
/// (an audit log next to a token, say) must not cause re-reads, and neither may reads: re-reading
/// a file opens it, and an open that caused a re-read would loop (with two processes watching one
/// directory, each one's reads would wake the other for ever).
fn relevant(event: &notify::Event, names: &[OsString]) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        p.file_name().is_some_and(|n| {
            names.iter().any(|w| w == n) || n.as_encoded_bytes().starts_with(b"..")
        })
    })
}

fn watch_directories(
    dirs: &[PathBuf],
    names: Vec<OsString>,
    tx: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| relevant(&e, &names)) {
            let _ = tx.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(error = %err, "file watching unavailable; polling instead");
            return None;
        }
    };
    for dir in dirs {
        if let Err(err) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot watch the directory; polling it");
        }
    }
    Some(watcher)
}

async fn watch_loop<T: Reload>(
    target: Weak<T>,
    nudge: Arc<Notify>,
    mut events: mpsc::UnboundedReceiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
) {
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = events.recv() => {
                // A symlink swap arrives as a burst of events; read once for the burst.
                while events.try_recv().is_ok() {}
            }
            _ = poll.tick() => {}
            _ = nudge.notified() => {}
        }
        let Some(strong) = target.upgrade() else {
            return;
        };
        // File reads are blocking; keep them off the request-serving threads.
        let _ = tokio::task::spawn_blocking(move || strong.reload()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_watched_files_and_kubernetes_swaps_are_relevant() {
        let names = vec![OsString::from("token")];
        let event = |p: &str| notify::Event::new(notify::EventKind::Any).add_path(PathBuf::from(p));
        assert!(relevant(&event("/s/token"), &names));
        let read = notify::Event::new(notify::EventKind::Access(notify::event::AccessKind::Open(
            notify::event::AccessMode::Read,
        )))
        .add_path(PathBuf::from("/s/token"));
        assert!(
            !relevant(&read, &names),
            "reading the file must not trigger a re-read"
        );
        assert!(relevant(&event("/s/..data"), &names));
        assert!(relevant(&event("/s/..2026_11_27_00_00_01.1"), &names));
        assert!(!relevant(&event("/s/audit.jsonl"), &names));
    }
}
