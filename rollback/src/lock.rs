//! The apply lock: at most one upgrade changes a host at a time.
//!
//! `flock(LOCK_EX | LOCK_NB)` on `STATE_DIR/lock`. The kernel releases the lock when the
//! holder's file descriptor closes, including when the process dies, so a crashed upgrade
//! never leaves a stale lock behind. The file also records the holder's pid and start time,
//! only to make the refusal message useful; the flock, not the content, is the lock. The
//! file is never deleted (deleting a lock file lets two processes lock different inodes).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::atomic::ensure_dir;
use crate::{IoError, time};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Why the lock was not acquired.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another upgrade ({}) holds {path}; wait for it or check `mk-upgrade status`",
        describe_holder(*.pid, *.since)
    )]
    Busy {
        path: PathBuf,
        /// The holder's pid, if it had recorded it yet.
        pid: Option<u32>,
        /// When the holder acquired the lock (Unix seconds), if recorded.
        since: Option<u64>,
    },
    #[error(transparent)]
    Io(#[from] IoError),
}

fn describe_holder(pid: Option<u32>, since: Option<u64>) -> String {
    match (pid, since) {
        (Some(pid), Some(s)) => format!("pid {pid}, started {}", time::fmt_utc(s)),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "holder not yet recorded".to_owned(),
    }
}

#[derive(Serialize, Deserialize)]
struct Holder {
    pid: u32,
    started_at: u64,
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
    /// Takes the lock of state directory `dir` (created if missing) without waiting.
    pub fn acquire(dir: &Path) -> Result<LockGuard, LockError> {
        ensure_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| IoError::new("open", &path, e))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let holder = read_holder(&mut file);
                return Err(LockError::Busy {
                    path,
                    pid: holder.as_ref().map(|h| h.pid),
                    since: holder.map(|h| h.started_at),
                });
            }
            Err((_, errno)) => {
                return Err(IoError::new("flock", &path, std::io::Error::from(errno)).into());
            }
        };
        let holder = Holder {
            pid: std::process::id(),
            started_at: time::now_unix(),
        };
        let mut text = serde_json::to_string(&holder).unwrap_or_default();
        text.push('\n');
        let f: &mut File = &mut file;
        f.set_len(0)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(text.as_bytes()))
            .map_err(|e| IoError::new("record holder in", &path, e))?;
        Ok(LockGuard { file, path })
    }
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
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
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    const CHILD_ENV: &str = "ROLLBACK_LOCK_TEST_CHILD_DIR";

    #[test]
    fn second_acquire_in_process_is_busy_until_drop() {
        let dir = tempfile::tempdir().unwrap();
        let g = Lock::acquire(dir.path()).unwrap();
        let e = Lock::acquire(dir.path()).unwrap_err();
        match &e {
            LockError::Busy { pid, since, path } => {
                assert_eq!(*pid, Some(std::process::id()));
                assert!(since.is_some());
                assert_eq!(path, g.path());
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
