//! Every `unsafe` of mk-demo-kv, behind safe functions: taking ownership of the
//! descriptors inherited through `MK_STATE_FDS`, the shared mapping of the memfd, and
//! handing descriptors to a child process.
//!
//! The rest of the crate is `#![deny(unsafe_code)]`; each `unsafe` block here states why
//! it is sound in a `// SAFETY:` comment.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use state_serializers::fdenv::{self, FdEnvError};

/// Whether `fd` is an open descriptor of this process (checked before taking ownership:
/// owning a closed number would close someone else's descriptor later).
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags; it touches no memory and is valid
    // for any integer (a closed or negative one yields EBADF).
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// One descriptor named in `MK_STATE_FDS`.
#[derive(Debug)]
pub struct StateFd {
    /// Its name in `MK_STATE_FDS`.
    pub name: String,
    /// Its number in this process.
    pub raw: RawFd,
    /// The descriptor, now owned; `None` when the number is not an open descriptor.
    pub fd: Option<OwnedFd>,
}

/// Why the `MK_STATE_FDS` descriptors could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(transparent)]
    FdEnv(#[from] FdEnvError),
    #[error("the MK_STATE_FDS descriptors were already taken by this process")]
    AlreadyTaken,
}

/// Set by the first [`take_state_fds`] of the process.
static STATE_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the descriptors this process inherited under the names `wanted`
/// accepts in `MK_STATE_FDS` (`docs/state.md`; absent: none). Other names are left alone
/// (not closed). Only the first call in a process takes anything; later calls fail with
/// [`TakeError::AlreadyTaken`], so no descriptor is ever owned twice.
///
/// Call it at the start of `main`, before anything else in the process opens or closes
/// descriptors by number: the contract is that the supervisor handed these numbers to
/// this process for it alone.
pub fn take_state_fds(wanted: impl Fn(&str) -> bool) -> Result<Vec<StateFd>, TakeError> {
    let named = fdenv::from_env()?.unwrap_or_default();
    if STATE_FDS_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(TakeError::AlreadyTaken);
    }
    Ok(named
        .into_iter()
        .filter(|n| wanted(&n.name))
        .map(|n| {
            let fd = fd_is_open(n.fd).then(|| {
                // SAFETY: the descriptor is open (checked above); MK_STATE_FDS names it
                // as handed to this process for its own use, fdenv::parse refused
                // duplicate numbers and stdio (0..=2), and the flag above lets this run
                // once per process, so nothing else owns it; the OwnedFd closes it once.
                unsafe { OwnedFd::from_raw_fd(n.fd) }
            });
            StateFd {
                name: n.name,
                raw: n.fd,
                fd,
            }
        })
        .collect())
}

/// Name of the variable that names a standby copy's socket (mk-upgrade's `standby = true`).
pub const STANDBY_ENV: &str = "MK_STANDBY_FD";

/// Set by the first [`take_standby_fd`] of the process.
static STANDBY_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the standby socket named by `MK_STANDBY_FD` (absent: `Ok(None)`).
/// Only the first call in a process takes it.
pub fn take_standby_fd() -> Result<Option<OwnedFd>, String> {
    let Some(value) = std::env::var_os(STANDBY_ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let fd = text
        .parse::<RawFd>()
        .ok()
        .filter(|n| *n >= 3 && n.to_string() == text)
        .ok_or_else(|| format!("{STANDBY_ENV}={text:?} is not a descriptor number >= 3"))?;
    if !fd_is_open(fd) {
        return Err(format!("{STANDBY_ENV}={fd} is not an open descriptor"));
    }
    if STANDBY_FD_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(format!("{STANDBY_ENV} was already taken by this process"));
    }
    // SAFETY: the descriptor is open (checked above); the supervisor handed it to this
    // process for its own use under MK_STANDBY_FD, and the flag above lets this run once per
    // process, so nothing else owns it; the OwnedFd closes it once.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Receives one packet into `buf` with up to 128 descriptors (close-on-exec); returns the
/// bytes received (0: the peer closed the socket) and the descriptors, owned.
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 128]);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in this process for this
                // recvmsg call; nothing else knows its number yet, so this is its only
                // owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err(io::Error::other(
            "the packet or its descriptors were truncated",
        ));
    }
    Ok((n, fds))
}

/// Makes the command's child inherit `fds` across its exec (clears `FD_CLOEXEC` on them
/// between fork and exec), as a supervisor handing descriptors under `MK_STATE_FDS` does.
/// The descriptors must stay open in this process until the child is spawned.
pub fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the forked child before exec; it only iterates a vector
    // allocated before the fork and calls fcntl, which is async-signal-safe, and builds its
    // error from errno without allocating.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A shared (`MAP_SHARED`), read-write mapping of a whole file.
///
/// Plain writes go through `&mut self` only, so no slice handed out by
/// [`SharedMap::slice`] is written to by them while it lives. Words used as atomics (the
/// header's `committed` and `index root`, the index tables) change through `&self`; the
/// crate never borrows those words as a byte slice while their atomics are in use (it
/// borrows the header once to decode it at start-up, and then single log entries, never
/// an index table: `crate::store`). Another process mapping the same memfd must not write
/// while this one runs (the single-writer contract of `crate::shm`).
#[derive(Debug)]
pub struct SharedMap {
    map: MmapRaw,
}

impl SharedMap {
    /// Maps the first `len` bytes of `file` shared and read-write.
    pub fn new(file: &File, len: usize) -> io::Result<Self> {
        Ok(Self {
            map: MmapOptions::new().len(len).map_raw(file)?,
        })
    }

    /// Mapped length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The 8 bytes at `off` as an atomic. Panics when out of the mapping or misaligned.
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        &self.atomic_u64s(off, 1)[0]
    }

    /// The `n` 8-byte words from `off` as atomics. Panics when out of the mapping or
    /// misaligned.
    pub fn atomic_u64s(&self, off: usize, n: usize) -> &[AtomicU64] {
        let end = n
            .checked_mul(8)
            .and_then(|b| off.checked_add(b))
            .expect("offset overflow");
        assert!(
            end <= self.len(),
            "{n} atomics at {off} beyond mapping of {}",
            self.len()
        );
        let ptr = self.map.as_ptr().wrapping_add(off);
        assert!(
            ptr.align_offset(std::mem::align_of::<AtomicU64>()) == 0,
            "atomics at {off} are not 8-byte aligned"
        );
        // SAFETY: the `8 * n` bytes lie inside the live mapping and start 8-byte aligned
        // (both checked above); they live as long as `&self` (the mapping is only replaced
        // or dropped through `&mut self` or by value); AtomicU64 has the layout of u64 and
        // any bit pattern is valid; these words (the memfd's index tables) are accessed
        // only atomically while shared, in this and any other process (the crate never
        // hands out a byte slice over a table's words: see `crate::store`).
        #[expect(clippy::cast_ptr_alignment, reason = "alignment is asserted above")]
        unsafe {
            std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), n)
        }
    }

    /// Borrows `len` bytes from `off`. Panics when out of the mapping.
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        let end = off.checked_add(len).expect("offset overflow");
        assert!(
            end <= self.len(),
            "read {off}+{len} beyond mapping of {}",
            self.len()
        );
        // SAFETY: the range lies inside the live mapping (checked above), which outlives
        // the returned borrow of `&self`; this process writes plain bytes only through
        // `&mut self`, and the callers do not borrow words it changes atomically (type
        // docs), so no write aliases the slice here; another process that holds the memfd
        // does not run while we do (the single-writer contract in the type docs).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), len) }
    }

    /// Copies `bytes` to offset `off`. Panics when out of the mapping.
    pub fn write(&mut self, off: usize, bytes: &[u8]) {
        let end = off.checked_add(bytes.len()).expect("offset overflow");
        assert!(
            end <= self.len(),
            "write {off}+{} beyond mapping of {}",
            bytes.len(),
            self.len()
        );
        // SAFETY: the destination range lies inside the live, writable mapping (checked
        // above); `&mut self` excludes any outstanding slice of this mapping, so `bytes`
        // (a live shared borrow) does not point into it and the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(off),
                bytes.len(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_is_open_checks_the_number() {
        assert!(!fd_is_open(1_000_000));
        assert!(!fd_is_open(-1));
        let f = tempfile::tempfile().unwrap();
        assert!(fd_is_open(std::os::fd::AsRawFd::as_raw_fd(&f)));
    }

    #[test]
    fn shared_map_bounds_and_round_trip() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let mut m = SharedMap::new(&f, 4096).unwrap();
        assert_eq!(m.len(), 4096);
        m.write(100, b"hello");
        assert_eq!(m.slice(100, 5), b"hello");
        m.atomic_u64(32).store(7, Ordering::Release);
        assert_eq!(m.slice(32, 8), 7u64.to_le_bytes());
        // A second mapping of the same file sees the bytes.
        let other = SharedMap::new(&f, 4096).unwrap();
        assert_eq!(other.slice(100, 5), b"hello");
        assert!(std::panic::catch_unwind(|| other.slice(4090, 7).len()).is_err());
        assert!(
            std::panic::catch_unwind(|| other.atomic_u64(4092).load(Ordering::Relaxed)).is_err()
        );
        assert!(std::panic::catch_unwind(|| other.atomic_u64(3).load(Ordering::Relaxed)).is_err());
        let words = m.atomic_u64s(64, 4);
        words[3].store(9, Ordering::Release);
        assert_eq!(other.slice(88, 8), 9u64.to_le_bytes());
        assert!(std::panic::catch_unwind(|| other.atomic_u64s(4064, 5).len()).is_err());
        assert!(std::panic::catch_unwind(|| other.atomic_u64s(4, 1).len()).is_err());
    }
}
