//! Crash-safe file system steps: fsync of files and directories, atomic replace, writer lock.
//!
//! A datastore must survive a writer killed at any instant (docs/architecture.md §3). The recipe
//! is the classic one: write new data to files nobody references yet, fsync them and their
//! directory, then publish with a single `rename` of a fully written, fsynced temporary file
//! over `manifest.json`, and fsync the directory so the rename itself is durable. Readers only
//! ever follow the manifest, so they see either the old state or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::error::{DatastoreError, Result};

/// Name of the lock file that serialises writers (appends, retire, compact, garbage removal)
/// across processes.
pub const LOCK_FILE: &str = "LOCK";

/// fsync a directory so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| DatastoreError::io("open directory", dir, e))?;
        f.sync_all()
            .map_err(|e| DatastoreError::io("fsync directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary sibling is written and fsynced, renamed
/// over `path`, and the parent directory is fsynced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(|e| DatastoreError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| DatastoreError::io("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| DatastoreError::io("fsync", &tmp, e))?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(DatastoreError::io("rename into place", path, e));
    }
    sync_dir(parent)
}

/// An exclusive, cross-process writer lock, released on drop (when the file is closed).
pub struct WriterLock {
    _file: File,
}

fn open_lock_file(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DatastoreError::io("open lock file", &path, e))
}

impl WriterLock {
    /// Blocks until no other writer (in any process) holds the lock.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let file = open_lock_file(dir)?;
        file.lock()
            .map_err(|e| DatastoreError::io("lock", &dir.join(LOCK_FILE), e))?;
        Ok(WriterLock { _file: file })
    }

    /// Takes the lock only if it is free right now.
    pub fn try_acquire(dir: &Path) -> Result<Option<Self>> {
        let file = open_lock_file(dir)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(WriterLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(DatastoreError::io("lock", &dir.join(LOCK_FILE), e))
            }
        }
    }
}
