//! The apply lock: at most one upgrade changes a host at a time.
//!
//! `flock(LOCK_EX | LOCK_NB)` on `STATE_DIR/lock`. The kernel releases the lock when the
//! holder's file descriptor closes, including when the process dies, so a crashed upgrade
//! never leaves a stale lock behind. The file also records the holder's pid and start time,
//! only to make the refusal message useful; the flock, not the content, is the lock. That
//! record is sealed (`crate::seal`, format [`LOCK_FORMAT`]) so that a damaged one is reported
//! as damaged, never shown as another pid. The file is never deleted (deleting a lock file
//! lets two processes lock different inodes) and has mode 0600.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::atomic::{FILE_MODE, StateFile, ensure_dir, read_state};
use crate::seal::{self, Read as SealRead, Refusal};
use crate::{IoError, time};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";
/// Format tag of the holder record in the lock file (sealed).
pub const LOCK_FORMAT: &str = "mk-upgrade-lock/1";
/// Largest holder record read.
const MAX_RECORD: u64 = 4096;

/// Why the lock was not acquired.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another upgrade ({}) holds {path}; wait for it or check `mk-upgrade status`",
        describe_holder(*.pid, *.since, .damaged.as_deref())
    )]
    Busy {
        path: PathBuf,
        /// The holder's pid, if it had recorded it yet.
        pid: Option<u32>,
        /// When the holder acquired the lock (Unix seconds), if recorded.
        since: Option<u64>,
        /// The holder record is damaged (why); `pid` and `since` are then unknown.
        damaged: Option<String>,
    },
    #[error(transparent)]
    Io(#[from] IoError),
}

fn describe_holder(pid: Option<u32>, since: Option<u64>, damaged: Option<&str>) -> String {
    match (pid, since, damaged) {
        (_, _, Some(why)) => format!(
            "holder unknown: its record in the lock file is damaged ({why}); `fuser -v` on the \
             lock file names the process"
        ),
        (Some(pid), Some(s), None) => format!("pid {pid}, started {}", time::fmt_utc(s)),
        (Some(pid), None, None) => format!("pid {pid}"),
        _ => "holder not yet recorded".to_owned(),
    }
}

/// Who holds the lock, as its holder recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's pid.
    pub pid: u32,
    /// When it acquired the lock (Unix seconds).
    pub started_at: u64,
}

#[derive(Serialize, Deserialize)]
struct HolderRecord {
    format: String,
    pid: u32,
    started_at: u64,
}

/// Why the holder record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// The record is damaged; the lock itself (the flock) is unaffected.
    #[error(
        "the holder record in {} is damaged ({reason}); the lock itself (an flock) is not \
         affected: `fuser -v {}` names the process holding it",
        path.display(), path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
}

impl HolderError {
    /// Whether the record is damaged.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, HolderError::Corrupt { .. })
    }
}

/// Decodes a holder record: `None` for an empty file (not recorded yet, or released).
fn parse_holder(path: &Path, bytes: &[u8]) -> Result<Option<Holder>, HolderError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let corrupt = |reason: String| HolderError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    match seal::read::<HolderRecord, HolderRecord>(bytes, LOCK_FORMAT, LOCK_FORMAT) {
        Ok(SealRead::Current(r)) => Ok(Some(Holder {
            pid: r.pid,
            started_at: r.started_at,
        })),
        // Never: the legacy format named is the current one, which must be sealed.
        Ok(SealRead::Legacy(_)) => Err(corrupt("unsealed".into())),
        Err(Refusal::Corrupt(reason)) => Err(corrupt(reason)),
        Err(Refusal::Foreign(found)) => {
            Err(corrupt(format!("format {found:?} is not {LOCK_FORMAT:?}")))
        }
    }
}

/// Namespace for acquiring the lock.
#[derive(Debug)]
pub struct Lock;

/// A held lock; released when dropped or when the process exits.
#[derive(Debug)]
pub struct LockGuard {
    file: Flock<File>,
    path: PathBuf,
}

impl LockGuard {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Lock {
    /// The holder recorded in the lock file of state directory `dir`: `None` when the lock
    /// is free or its holder has not recorded itself yet; a damaged record is
    /// [`HolderError::Corrupt`], never another pid.
    pub fn holder(dir: &Path) -> Result<Option<Holder>, HolderError> {
        let path = dir.join(LOCK_FILE);
        match read_state(&path, MAX_RECORD)? {
            StateFile::Missing => Ok(None),
            StateFile::TooLarge { limit } => Err(HolderError::Corrupt {
                path,
                reason: format!("larger than the {limit}-byte limit"),
            }),
            StateFile::Contents(bytes) => parse_holder(&path, &bytes),
        }
    }

    /// Takes the lock of state directory `dir` (created if missing, mode 0700) without
    /// waiting.
    pub fn acquire(dir: &Path) -> Result<LockGuard, LockError> {
        let (path, file) = open_lock_file(dir)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let (holder, damaged) = match read_holder(&path, &mut file) {
                    Ok(h) => (h, None),
                    Err(HolderError::Corrupt { reason, .. }) => (None, Some(reason)),
                    Err(HolderError::Io(_)) => (None, None),
                };
                return Err(LockError::Busy {
                    path,
                    pid: holder.as_ref().map(|h| h.pid),
                    since: holder.map(|h| h.started_at),
                    damaged,
                });
            }
            Err((_, errno)) => {
                return Err(IoError::new("flock", &path, std::io::Error::from(errno)).into());
            }
        };
        {
            use std::os::unix::fs::PermissionsExt;
            // Explicitly: a lock file created by an older version may have a wider mode.
            let f: &File = &file;
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| IoError::new("set the mode of", &path, e))?;
        }
        let record = HolderRecord {
            format: LOCK_FORMAT.to_owned(),
            pid: std::process::id(),
            started_at: time::now_unix(),
        };
        let bytes = seal::seal(&record).expect("holder record serializes");
        let f: &mut File = &mut file;
        f.set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(&bytes))
            .map_err(|e| IoError::new("record holder in", &path, e))?;
        Ok(LockGuard { file, path })
    }
}

/// A shared hold of the lock file ([`Lock::try_shared`]): while it lives no writer holds
/// (or can take) the lock.
#[derive(Debug)]
pub struct SharedGuard {
    _file: Flock<File>,
}

impl Lock {
    /// For readers that would also tidy the state files (the journal's recovery of
    /// interrupted writes and damaged records): a shared flock of `dir`'s lock file without
    /// waiting. `Some` while no writer holds the lock (and then none can take it until the
    /// guard is dropped: keep it only as long as the tidying reads); `None` when a writer
    /// holds it, and the reader must not touch the writer's files. The holder record is not
    /// written.
    pub fn try_shared(dir: &Path) -> Result<Option<SharedGuard>, IoError> {
        let (path, file) = open_lock_file(dir)?;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(f) => Ok(Some(SharedGuard { _file: f })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(IoError::new("flock", &path, std::io::Error::from(errno))),
        }
    }
}

/// Opens (creating it, and `dir`, if missing) the lock file of state directory `dir`.
fn open_lock_file(dir: &Path) -> Result<(PathBuf, File), IoError> {
    ensure_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| IoError::new("open", &path, e))?;
    Ok((path, file))
}

fn read_holder(path: &Path, file: &mut File) -> Result<Option<Holder>, HolderError> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.take(MAX_RECORD + 1).read_to_end(&mut buf))
        .map_err(|e| IoError::new("read", path, e))?;
    if buf.len() as u64 > MAX_RECORD {
        return Err(HolderError::Corrupt {
            path: path.to_owned(),
            reason: format!("larger than the {MAX_RECORD}-byte limit"),
        });
    }
    parse_holder(path, &buf)
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Clear the holder record; the flock itself is released when `file` closes.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_hold_is_refused_while_a_writer_holds_the_lock_and_blocks_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Lock::try_shared(dir.path()).unwrap();
        assert!(shared.is_some(), "no writer: shared hold granted");
        assert!(matches!(
            Lock::acquire(dir.path()),
            Err(LockError::Busy { .. })
        ));
        drop(shared);
        let w = Lock::acquire(dir.path()).unwrap();
        assert!(Lock::try_shared(dir.path()).unwrap().is_none());
        drop(w);
        assert!(Lock::try_shared(dir.path()).unwrap().is_some());
    }
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    const CHILD_ENV: &str = "ROLLBACK_LOCK_TEST_CHILD_DIR";

    #[test]
    fn second_acquire_in_process_is_busy_until_drop() {
        let dir = tempfile::tempdir().unwrap();
        let g = Lock::acquire(dir.path()).unwrap();
        let e = Lock::acquire(dir.path()).unwrap_err();
        match &e {
            LockError::Busy {
                pid,
                since,
                path,
                damaged,
            } => {
                assert_eq!(*pid, Some(std::process::id()));
                assert!(since.is_some());
                assert_eq!(path, g.path());
                assert_eq!(*damaged, None);
            }
            LockError::Io(e) => panic!("{e}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id()))
                && msg.contains("mk-upgrade status"),
            "{msg}"
        );
        drop(g);
        Lock::acquire(dir.path()).unwrap();
    }

    /// Not a test on its own: the body run in the child process of
    /// `lock_held_by_another_process_is_released_when_it_dies`.
    #[test]
    fn lock_holder_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let _g = Lock::acquire(Path::new(&dir)).unwrap();
        println!("LOCKED");
        std::io::stdout().flush().unwrap();
        let mut sink = String::new();
        let _ = std::io::stdin().read_to_string(&mut sink);
    }

    #[test]
    fn lock_held_by_another_process_is_released_when_it_dies() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "lock::tests::lock_holder_child", "--nocapture"])
            .env(CHILD_ENV, dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|l| l.unwrap() == "LOCKED"),
            "child never took the lock"
        );
        let e = Lock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(e, LockError::Busy { pid: Some(p), .. } if p == child.id()),
            "{e}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        Lock::acquire(dir.path()).unwrap();
    }
}
