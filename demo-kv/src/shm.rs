//! The memfd behind `mk-demo-kv`: creation, sealing, validation of an adopted descriptor,
//! and the shared (`MAP_SHARED`) mapping (whose `unsafe` lives in [`crate::sys`]).
//!
//! Seals: a memfd created here gets `F_SEAL_SHRINK` (nobody can truncate it under a
//! mapping, which would turn accesses into SIGBUS); it must be able to grow, so no
//! `F_SEAL_GROW`, and no `F_SEAL_SEAL` so that a supervisor may still add seals (for
//! example `F_SEAL_GROW` before a handover). An adopted memfd gets `F_SEAL_SHRINK` added
//! when it lacks it and sealing is still allowed.
//!
//! Concurrency contract: at most one process writes the memfd at a time. mk-upgrade
//! guarantees it (the old instance is frozen before the new one starts, and killed or
//! thawed before the other one runs again). Within a process, writes need `&mut Shm`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::{SFlag, fstat};

use super::log::{HEADER_LEN, OFF_COMMITTED, OFF_INDEX_ROOT};
use crate::sys::SharedMap;

/// A failed operation on the memfd.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("memfd_create(\"mk-demo-kv\") failed: {0}")]
    Create(Errno),
    #[error("kv-data fd {fd}: {op} failed: {source}")]
    Sys {
        fd: RawFd,
        op: &'static str,
        source: Errno,
    },
    #[error("kv-data fd {fd}: mmap(MAP_SHARED, {len} bytes) failed: {source}")]
    Map {
        fd: RawFd,
        len: u64,
        source: std::io::Error,
    },
    #[error("kv-data fd {fd} is not a memfd ({what}); pass the memfd created by mk-demo-kv")]
    NotMemfd { fd: RawFd, what: String },
    #[error("kv-data fd {fd} is sealed against writes (seals {seals:#x}); it cannot be adopted")]
    WriteSealed { fd: RawFd, seals: i32 },
    #[error("kv-data memfd is {len} bytes, above what this process can map")]
    TooLarge { len: u64 },
    #[error(
        "kv-data fd {fd}: its size stayed fixed (ftruncate: EPERM, no F_SEAL_GROW: a LUO \
         preservation holds it) for {waited_ms} ms; the write is refused"
    )]
    SizeHeld { fd: RawFd, waited_ms: u64 },
}

/// How long [`Shm::grow`] waits for a size a preservation holds fixed.
pub const GROW_WAIT: Duration = Duration::from_secs(5);

/// A memfd and its shared mapping (the whole file).
#[derive(Debug)]
pub struct Shm {
    file: File,
    map: SharedMap,
    fd: RawFd,
}

fn raw(f: &File) -> RawFd {
    f.as_raw_fd()
}

/// Creates a fresh memfd of `len` bytes, sealed against shrinking.
pub fn create_memfd(len: u64) -> Result<File, ShmError> {
    let fd = memfd_create(
        "mk-demo-kv",
        MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC,
    )
    .map_err(ShmError::Create)?;
    let file = File::from(fd);
    set_len(&file, len)?;
    add_shrink_seal(&file)?;
    Ok(file)
}

/// Takes an inherited descriptor and checks that it is a writable memfd.
pub fn adopt_memfd(owned: OwnedFd) -> Result<File, ShmError> {
    let fd = owned.as_raw_fd();
    let file = File::from(owned);
    let st = fstat(&file).map_err(|source| ShmError::Sys {
        fd,
        op: "fstat",
        source,
    })?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(ShmError::NotMemfd {
            fd,
            what: format!("st_mode {:#o} is not a regular file", st.st_mode),
        });
    }
    let seals = match fcntl(&file, FcntlArg::F_GET_SEALS) {
        Ok(s) => s,
        Err(e) => {
            return Err(ShmError::NotMemfd {
                fd,
                what: format!("F_GET_SEALS failed: {e}"),
            });
        }
    };
    let sealed = SealFlag::from_bits_truncate(seals);
    if sealed.contains(SealFlag::F_SEAL_WRITE) || seals & libc::F_SEAL_FUTURE_WRITE != 0 {
        return Err(ShmError::WriteSealed { fd, seals });
    }
    if !sealed.contains(SealFlag::F_SEAL_SHRINK) && !sealed.contains(SealFlag::F_SEAL_SEAL) {
        add_shrink_seal(&file)?;
    }
    Ok(file)
}

/// The error for a `kv-data` descriptor number that is not open.
pub fn not_open(fd: RawFd) -> ShmError {
    ShmError::NotMemfd {
        fd,
        what: "not an open descriptor".into(),
    }
}

fn add_shrink_seal(file: &File) -> Result<(), ShmError> {
    fcntl(file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))
        .map(drop)
        .map_err(|source| ShmError::Sys {
            fd: raw(file),
            op: "fcntl(F_ADD_SEALS, F_SEAL_SHRINK)",
            source,
        })
}

fn set_len(file: &File, len: u64) -> Result<(), ShmError> {
    let off = libc::off_t::try_from(len).map_err(|_| ShmError::TooLarge { len })?;
    nix::unistd::ftruncate(file, off).map_err(|source| ShmError::Sys {
        fd: raw(file),
        op: "ftruncate",
        source,
    })
}

/// Current size of the memfd, from `fstat`.
pub fn file_len(file: &File) -> Result<u64, ShmError> {
    let st = fstat(file).map_err(|source| ShmError::Sys {
        fd: raw(file),
        op: "fstat",
        source,
    })?;
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

fn map(file: &File) -> Result<SharedMap, ShmError> {
    let len = file_len(file)?;
    let ulen = usize::try_from(len).map_err(|_| ShmError::TooLarge { len })?;
    SharedMap::new(file, ulen).map_err(|source| ShmError::Map {
        fd: raw(file),
        len,
        source,
    })
}

impl Shm {
    /// Maps the whole memfd shared and read-write. The memfd is at least `HEADER_LEN`
    /// bytes (the caller grows an empty one first).
    pub fn map(file: File) -> Result<Self, ShmError> {
        let fd = raw(&file);
        let map = map(&file)?;
        Ok(Self { file, map, fd })
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The memfd's number in this process.
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Mapped length (the memfd size at the last map).
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Grows the memfd to `new_len` bytes and remaps it. Offsets stay valid.
    ///
    /// `EPERM` without `F_SEAL_GROW` means the size is held fixed for a while: a LUO
    /// preservation (the agent preserves the memfd just before freezing this process,
    /// `preserve_before_freeze`) freezes it until the move ends. The freeze follows at
    /// once, or the move is abandoned and the preservation dropped, so the grow is retried
    /// for up to [`GROW_WAIT`] before it fails.
    pub fn grow(&mut self, new_len: u64) -> Result<(), ShmError> {
        self.grow_waiting(new_len, GROW_WAIT, set_len)
    }

    fn grow_waiting(
        &mut self,
        new_len: u64,
        wait: Duration,
        mut set: impl FnMut(&File, u64) -> Result<(), ShmError>,
    ) -> Result<(), ShmError> {
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match set(&self.file, new_len) {
                Err(ShmError::Sys {
                    source: Errno::EPERM,
                    fd,
                    ..
                }) if !self.seals().contains(SealFlag::F_SEAL_GROW) => {
                    if t0.elapsed() >= wait {
                        return Err(ShmError::SizeHeld {
                            fd,
                            waited_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => break other?,
            }
        }
        self.map = map(&self.file)?;
        Ok(())
    }

    fn seals(&self) -> SealFlag {
        fcntl(&self.file, FcntlArg::F_GET_SEALS)
            .map_or(SealFlag::empty(), SealFlag::from_bits_truncate)
    }

    /// Remaps when another process grew the memfd. Returns the mapped length.
    pub fn refresh(&mut self) -> Result<u64, ShmError> {
        if file_len(&self.file)? != self.len() {
            self.map = map(&self.file)?;
        }
        Ok(self.len())
    }

    /// The shared `committed` header field.
    pub fn committed(&self) -> &AtomicU64 {
        assert!(self.map.len() >= HEADER_LEN);
        // Offset 32 of a page-aligned mapping is 8-byte aligned (asserted by atomic_u64).
        self.map.atomic_u64(OFF_COMMITTED)
    }

    /// The shared `index root` header field (format version 2).
    pub fn index_root(&self) -> &AtomicU64 {
        assert!(self.map.len() >= HEADER_LEN);
        self.map.atomic_u64(OFF_INDEX_ROOT)
    }

    /// The `n` 8-byte words from `off` (8-byte aligned) as atomics: an index table. Panics
    /// when out of the mapping.
    pub fn words(&self, off: u64, n: usize) -> &[AtomicU64] {
        let off = usize::try_from(off).expect("offset overflow");
        self.map.atomic_u64s(off, n)
    }

    /// Borrows `len` bytes from `off`. Panics when out of the mapping.
    pub fn slice(&self, off: u64, len: usize) -> &[u8] {
        let off = usize::try_from(off).expect("offset overflow");
        self.map.slice(off, len)
    }

    /// Copies `bytes` to offset `off`. Panics when out of the mapping.
    pub fn write(&mut self, off: u64, bytes: &[u8]) {
        let off = usize::try_from(off).expect("offset overflow");
        self.map.write(off, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eperm(file: &File) -> ShmError {
        ShmError::Sys {
            fd: raw(file),
            op: "ftruncate",
            source: Errno::EPERM,
        }
    }

    #[test]
    fn a_size_held_fixed_is_waited_for_then_grown() {
        let mut shm = Shm::map(create_memfd(4096).unwrap()).unwrap();
        let mut refusals = 3;
        shm.grow_waiting(8192, Duration::from_secs(5), |f, len| {
            if refusals > 0 {
                refusals -= 1;
                Err(eperm(f))
            } else {
                set_len(f, len)
            }
        })
        .unwrap();
        assert_eq!(refusals, 0);
        assert_eq!(shm.len(), 8192);
    }

    #[test]
    fn a_size_held_too_long_fails_naming_the_wait() {
        let mut shm = Shm::map(create_memfd(4096).unwrap()).unwrap();
        let e = shm
            .grow_waiting(8192, Duration::from_millis(20), |f, _| Err(eperm(f)))
            .unwrap_err();
        assert!(
            matches!(e, ShmError::SizeHeld { waited_ms, .. } if waited_ms >= 20),
            "{e}"
        );
        assert!(e.to_string().contains("LUO preservation"), "{e}");
        assert_eq!(shm.len(), 4096);
    }

    #[test]
    fn a_grow_seal_fails_at_once() {
        let mut shm = Shm::map(create_memfd(4096).unwrap()).unwrap();
        fcntl(&shm.file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        let t0 = Instant::now();
        let e = shm.grow(8192).unwrap_err();
        assert!(
            matches!(
                e,
                ShmError::Sys {
                    source: Errno::EPERM,
                    ..
                }
            ),
            "{e}"
        );
        assert!(t0.elapsed() < GROW_WAIT, "a seal is not waited for");
    }
}
