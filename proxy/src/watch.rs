//! Watching configuration files: a debounced callback whenever one of them changes. Directories
//! of files are watched (not the files), so atomic renames and Kubernetes' symlink swaps are seen;
//! events about other files in those directories are ignored.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet period after the last event before reloading, so a multi-file update lands as one.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What to watch for one configured path.
#[derive(Debug, Clone)]
enum Target {
    /// Anything under this directory.
    Tree(PathBuf),
    /// This file, seen through its directory.
    File { dir: PathBuf, file: PathBuf },
}

impl Target {
    fn of(path: &Path) -> Self {
        if path.is_dir() {
            return Self::Tree(path.to_path_buf());
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        Self::File {
            dir,
            file: path.to_path_buf(),
        }
    }

    fn watched_dir(&self) -> (&Path, RecursiveMode) {
        match self {
            Self::Tree(dir) => (dir, RecursiveMode::Recursive),
            Self::File { dir, .. } => (dir, RecursiveMode::NonRecursive),
        }
    }

    /// Whether an event about `changed` concerns this target. Kubernetes' atomic writer swaps a
    /// `..data` symlink next to the files rather than touching them, so `..`-names count too.
    fn concerns(&self, changed: &Path) -> bool {
        match self {
            Self::Tree(dir) => changed.starts_with(dir),
            Self::File { dir, file } => {
                changed.file_name() == file.file_name()
                    || (changed.parent() == Some(dir.as_path())
                        && changed
                            .file_name()
                            .and_then(OsStr::to_str)
                            .is_some_and(|n| n.starts_with("..")))
            }
        }
    }
}

/// Calls `reload` (on a blocking thread) after changes to `paths`: a directory counts as
/// everything under it, a file as itself.
pub fn on_change(paths: &[&Path], reload: impl Fn() + Send + Sync + 'static) -> notify::Result<()> {
    let targets: Vec<Target> = paths.iter().map(|p| Target::of(p)).collect();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let interesting = targets.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|changed| interesting.iter().any(|t| t.concerns(changed)))
        {
            let _ = tx.try_send(()); // a full channel already means "reload pending"
        }
    })?;
    let mut dirs: Vec<(&Path, RecursiveMode)> = targets.iter().map(Target::watched_dir).collect();
    dirs.sort_by(|a, b| a.0.cmp(b.0));
    dirs.dedup_by(|a, b| a.0 == b.0);
    for (dir, mode) in dirs {
        watcher.watch(dir, mode)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_targets_ignore_their_neighbours_but_not_kubernetes_swaps() {
        let t = Target::File {
            dir: "/etc/mandate".into(),
            file: "/etc/mandate/data.json".into(),
        };
        assert!(t.concerns(Path::new("/etc/mandate/data.json")));
        assert!(t.concerns(Path::new("/etc/mandate/..data")));
        assert!(t.concerns(Path::new("/etc/mandate/..2026_11_21_22_00_00.123")));
        assert!(!t.concerns(Path::new("/etc/mandate/decisions.jsonl")));
        let tree = Target::Tree("/etc/policy".into());
        assert!(tree.concerns(Path::new("/etc/policy/sub/authz.rego")));
        assert!(!tree.concerns(Path::new("/etc/other.rego")));
    }
}
