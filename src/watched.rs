//! Files a running server reads again when they change on disk (a renewed
//! certificate, a DKIM key made by `petrel dkim generate`), so that they
//! need no restart: their modification times and sizes, compared at most
//! every [`CHECK_INTERVAL`] by whoever needs them next.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// How often a look at the files may be due (a `stat` each).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Identifies one version of some files (a missing file counts too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<(Option<SystemTime>, u64)>);

impl FileStamp {
    pub fn of<P: AsRef<Path>>(paths: &[P]) -> FileStamp {
        FileStamp(
            paths
                .iter()
                .map(|path| match std::fs::metadata(path) {
                    Ok(meta) => (meta.modified().ok(), meta.len()),
                    Err(_) => (None, 0),
                })
                .collect(),
        )
    }
}

/// Some files and the version of them last loaded.
#[derive(Debug)]
pub struct Watched {
    paths: Vec<PathBuf>,
    state: Mutex<(Instant, FileStamp)>,
}

impl Watched {
    /// Watches `paths` as they are now (the version just loaded).
    pub fn new(paths: Vec<PathBuf>) -> Watched {
        let stamp = FileStamp::of(&paths);
        Watched {
            paths,
            state: Mutex::new((Instant::now(), stamp)),
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The files' new stamp when they changed since the last load and a
    /// check was due; `None` otherwise. The caller reloads, then calls
    /// [`Watched::loaded`] (or not, to try again at the next change).
    pub fn changed(&self) -> Option<FileStamp> {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.0.elapsed() < CHECK_INTERVAL {
                return None;
            }
            state.0 = Instant::now();
        }
        let stamp = FileStamp::of(&self.paths);
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.1 != stamp).then_some(stamp)
    }

    /// `stamp` is the version now in use.
    pub fn loaded(&self, stamp: FileStamp) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = stamp;
    }

    /// The stamp of the files as they are now.
    pub fn current(&self) -> FileStamp {
        FileStamp::of(&self.paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_appears_or_changes_is_noticed_once_a_check_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let watched = Watched::new(vec![key.clone()]);
        // Not due yet: nothing is looked at.
        std::fs::write(&key, b"one").unwrap();
        assert!(watched.changed().is_none());
        watched.state.lock().unwrap().0 -= CHECK_INTERVAL;
        let stamp = watched.changed().expect("the new file");
        watched.loaded(stamp);
        watched.state.lock().unwrap().0 -= CHECK_INTERVAL;
        assert!(watched.changed().is_none(), "unchanged since loaded");
        std::fs::write(&key, b"longer").unwrap();
        watched.state.lock().unwrap().0 -= CHECK_INTERVAL;
        assert!(watched.changed().is_some());
    }
}
