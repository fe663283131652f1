//! The one write path for persisted state: temp file, fsync, rename, fsync directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::IoError;

/// Suffix of the temporary files [`atomic_write`] creates (`.NAME.tmp`). A file with this
/// suffix that survives a crash holds a write that never became visible; it is ignored and
/// removed by [`remove_stale_temps`].
pub const TMP_SUFFIX: &str = ".tmp";

fn temp_path(path: &Path) -> Result<PathBuf, IoError> {
    let name = path.file_name().ok_or_else(|| {
        IoError::new(
            "write",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(TMP_SUFFIX);
    Ok(path.with_file_name(tmp))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `bytes` atomically and durably.
///
/// Writes `.NAME.tmp` next to `path` (mode 0644, truncating any leftover), fsyncs it, renames
/// it over `path` and fsyncs the directory. After a crash at any point `path` holds either its
/// old content or `bytes`; at worst a stale `.NAME.tmp` remains. Callers are single-writer
/// (they hold the [`crate::Lock`]), so the fixed temp name cannot be raced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = temp_path(path)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| IoError::new("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| IoError::new("write", &tmp, e))?;
    f.sync_all().map_err(|e| IoError::new("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| IoError::new("rename into place", path, e))?;
    fsync_dir(parent_dir(path))
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IoError::new("fsync directory", dir, e))
}

/// Removes `.*.tmp` files [`atomic_write`] left in `dir` after a crash; returns their paths.
/// Call it only while holding the lock (a concurrent writer's temp file would be removed).
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>, IoError> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(IoError::new("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| IoError::new("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TMP_SUFFIX) && name.len() > 1 + TMP_SUFFIX.len()
        {
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| IoError::new("remove stale temp file", &p, e))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), IoError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| IoError::new("create directory", dir, e))
}

/// Reads a whole state file if it exists, refusing files larger than `max` bytes (state files
/// are small; a huge one is corruption, and must not make us allocate its size).
pub(crate) fn read_optional(path: &Path, max: u64) -> Result<Option<Vec<u8>>, IoError> {
    use std::io::Read;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::new("open", path, e)),
    };
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| IoError::new("read", path, e))?;
    if buf.len() as u64 > max {
        return Err(IoError::new(
            "read",
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than the {max}-byte limit for a state file"),
            ),
        ));
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn stale_temps_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".journal.json.tmp"), b"half").unwrap();
        fs::write(dir.path().join("journal.json"), b"{}").unwrap();
        fs::write(dir.path().join("notes.tmp"), b"not ours").unwrap();
        let removed = remove_stale_temps(dir.path()).unwrap();
        assert_eq!(removed, vec![dir.path().join(".journal.json.tmp")]);
        assert!(dir.path().join("journal.json").exists());
        assert!(dir.path().join("notes.tmp").exists());
    }

    #[test]
    fn oversized_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        fs::write(&p, vec![b'x'; 100]).unwrap();
        assert!(read_optional(&p, 99).is_err());
        assert_eq!(read_optional(&p, 100).unwrap().unwrap().len(), 100);
        assert!(
            read_optional(&dir.path().join("none"), 1)
                .unwrap()
                .is_none()
        );
    }
}
