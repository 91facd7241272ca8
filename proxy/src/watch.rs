//! Watching configuration files: a debounced callback whenever something under the watched paths
//! changes. Directories of files are watched (not the files), so atomic renames and Kubernetes'
//! symlink swaps are seen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet period after the last event before reloading, so a multi-file update lands as one.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Calls `reload` (on a blocking thread) after changes under `paths`: a directory is watched
/// recursively, a file through its parent directory.
pub fn on_change(paths: &[&Path], reload: impl Fn() + Send + Sync + 'static) -> notify::Result<()> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(()); // a full channel already means "reload pending"
        }
    })?;
    let mut targets: Vec<(PathBuf, RecursiveMode)> = paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                (p.to_path_buf(), RecursiveMode::Recursive)
            } else {
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                    _ => PathBuf::from("."),
                };
                (parent, RecursiveMode::NonRecursive)
            }
        })
        .collect();
    targets.sort_by(|a, b| a.0.cmp(&b.0));
    targets.dedup_by(|a, b| a.0 == b.0);
    for (dir, mode) in &targets {
        watcher.watch(dir, *mode)?;
    }
    let reload = Arc::new(reload);
    tokio::spawn(async move {
        let _watcher = watcher; // dropping it would stop the events
        while rx.recv().await.is_some() {
            while tokio::time::timeout(DEBOUNCE, rx.recv())
                .await
                .is_ok_and(|e| e.is_some())
            {}
            let reload = reload.clone();
            // File reads, parsing and compiling are blocking work.
            let _ = tokio::task::spawn_blocking(move || reload()).await;
        }
    });
    Ok(())
}
