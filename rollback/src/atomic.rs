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

/// Mode of every state file this crate writes: readable by its owner only (state files hold
/// workload environments, kernel images and the upgrade record).
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory this crate creates.
pub const DIR_MODE: u32 = 0o700;

/// Replaces `path` with `bytes` atomically and durably; the file gets mode [`FILE_MODE`]
/// (0600) whatever the umask.
///
/// Writes `.NAME.tmp` next to `path` (truncating any leftover), sets its mode explicitly,
/// fsyncs it, renames it over `path` and fsyncs the directory. After a crash at any point
/// `path` holds either its old content or `bytes`; at worst a stale `.NAME.tmp` remains.
/// Callers are single-writer (they hold the [`crate::Lock`]), so the fixed temp name cannot
/// be raced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    atomic_write_with_mode(path, bytes, FILE_MODE)
}

/// [`atomic_write`] with another file mode (for files meant to be shared, such as a
/// signature); the mode is set explicitly, not left to the umask.
pub fn atomic_write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_path(path)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o777)
        .open(&tmp)
        .map_err(|e| IoError::new("create", &tmp, e))?;
    // Explicitly: the umask only narrows a new file's mode, and a leftover temp file keeps
    // whatever mode it had.
    f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| IoError::new("set the mode of", &tmp, e))?;
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

/// Creates `dir` and its missing parents, each with mode [`DIR_MODE`] (0700) set explicitly
/// whatever the umask; directories that already exist are left as they are.
pub fn ensure_private_dir(dir: &Path) -> Result<(), IoError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match fs::symlink_metadata(p) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(p);
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => break,
                }
            }
            Err(e) => return Err(IoError::new("inspect", p, e)),
        }
    }
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| IoError::new("set the mode of", d, e))?,
            // Created concurrently by someone else: not ours to change.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(IoError::new("create directory", d, e)),
        }
    }
    Ok(())
}

pub(crate) use ensure_private_dir as ensure_dir;

/// A state file as read by [`read_state`].
#[derive(Debug)]
pub(crate) enum StateFile {
    /// There is no such file.
    Missing,
    /// Its whole content.
    Contents(Vec<u8>),
    /// It is larger than the limit for its kind: corruption, never read into memory.
    TooLarge { limit: u64 },
}

/// Reads a whole state file if it exists, refusing files larger than `max` bytes (state files
/// are small; a huge one is corruption, and must not make us allocate its size).
pub(crate) fn read_state(path: &Path, max: u64) -> Result<StateFile, IoError> {
    use std::io::Read;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::Missing),
        Err(e) => return Err(IoError::new("open", path, e)),
    };
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| IoError::new("read", path, e))?;
    if buf.len() as u64 > max {
        return Ok(StateFile::TooLarge { limit: max });
    }
    Ok(StateFile::Contents(buf))
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
        assert!(matches!(
            read_state(&p, 99).unwrap(),
            StateFile::TooLarge { limit: 99 }
        ));
        assert!(matches!(read_state(&p, 100).unwrap(), StateFile::Contents(b) if b.len() == 100));
        assert!(matches!(
            read_state(&dir.path().join("none"), 1).unwrap(),
            StateFile::Missing
        ));
    }

    /// The umask of the whole process is changed, so the two mode tests run as one.
    #[test]
    fn modes_are_private_whatever_the_umask() {
        use nix::sys::stat::{Mode, umask};
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let old = umask(Mode::empty());
        let deep = dir.path().join("a/b/c");
        let dirs = ensure_private_dir(&deep);
        let file = dir.path().join("a/state.json");
        let written = atomic_write(&file, b"{}");
        // A leftover temp file with a wide mode does not pass its mode on.
        let stale = dir.path().join("a/.other.json.tmp");
        fs::write(&stale, b"x").unwrap();
        fs::set_permissions(&stale, fs::Permissions::from_mode(0o666)).unwrap();
        let other = atomic_write(&dir.path().join("a/other.json"), b"{}");
        umask(old);
        dirs.unwrap();
        written.unwrap();
        other.unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&dir.path().join("a/other.json")), 0o600);
        // An existing directory is not changed.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o755);
    }
}
