//! memfd creation and sealing: `memfd_create(2)` and `fcntl(F_ADD_SEALS / F_GET_SEALS)`.
//!
//! The agent reads a kernel image once into a memfd, seals it against every change
//! ([`IMAGE_SEALS`]), hashes the sealed bytes through a read-only mapping ([`map_sealed`]) and
//! hands the same fd to `kexec_file_load(2)`: what was verified is what boots.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};

use memmap2::Mmap;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

pub use nix::fcntl::SealFlag;

/// The seals of a verified kernel image: no write, no shrink, no grow, and no seal changes.
pub const IMAGE_SEALS: SealFlag = SealFlag::F_SEAL_WRITE
    .union(SealFlag::F_SEAL_SHRINK)
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// Creates an anonymous, close-on-exec memfd that can be sealed. `name` shows up in
/// `/proc/PID/fd` as `memfd:NAME` (it must not contain NUL).
pub fn create_sealable(name: &str) -> Result<OwnedFd, Errno> {
    memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
}

/// Adds `seals` to the memfd (seals can only be added, never removed).
pub fn seal(fd: BorrowedFd<'_>, seals: SealFlag) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals)).map(drop)
}

/// The seals currently set on the memfd.
pub fn seals(fd: BorrowedFd<'_>) -> Result<SealFlag, Errno> {
    fcntl(fd, FcntlArg::F_GET_SEALS).map(SealFlag::from_bits_retain)
}

/// The file size.
pub fn size(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    nix::sys::stat::fstat(fd).map(|st| st.st_size as u64)
}

/// Writes all of `bytes` at the current offset.
pub fn write_all(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    File::from(fd.try_clone_to_owned()?).write_all(bytes)
}

/// Copies at most `max` bytes of `src` (from its current offset) into the memfd; returns the
/// number copied and whether `src` had more (in which case the caller refuses the input).
/// Uses `copy_file_range`/`sendfile` where the kernel supports them, else read/write.
pub fn fill_from(fd: BorrowedFd<'_>, src: &File, max: u64) -> io::Result<(u64, bool)> {
    let mut dst = File::from(fd.try_clone_to_owned()?);
    let mut limited = src.take(max);
    let n = io::copy(&mut limited, &mut dst)?;
    let mut probe = [0u8; 1];
    let more = n == max && (&*src).read(&mut probe)? > 0;
    Ok((n, more))
}

/// Why a memfd could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("cannot read the seals of the memfd: {0}")]
    Seals(#[source] Errno),
    #[error("the memfd lacks seals {missing:?}; refusing to map bytes that could still change")]
    NotSealed { missing: SealFlag },
    #[error("cannot map the memfd: {0}")]
    Map(#[source] io::Error),
}

/// Maps a memfd read-only after checking it carries `F_SEAL_WRITE` and `F_SEAL_SHRINK`.
pub fn map_sealed(fd: BorrowedFd<'_>) -> Result<Mmap, MapError> {
    let needed = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK;
    let have = seals(fd).map_err(MapError::Seals)?;
    if !have.contains(needed) {
        return Err(MapError::NotSealed {
            missing: needed.difference(have),
        });
    }
    let file = File::from(fd.try_clone_to_owned().map_err(MapError::Map)?);
    // SAFETY: memmap2 requires that the mapped file is not modified or truncated while the
    // mapping lives. We just checked that this inode carries F_SEAL_WRITE and F_SEAL_SHRINK,
    // which the kernel enforces for every fd and process (seals cannot be removed), so the
    // bytes are immutable and the length cannot shrink for the mapping's whole lifetime.
    unsafe { Mmap::map(&file) }.map_err(MapError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn sealed_memfd_refuses_every_change() {
        let fd = create_sealable("mk-test").unwrap();
        write_all(fd.as_fd(), b"kernel bytes").unwrap();
        assert_eq!(size(fd.as_fd()).unwrap(), 12);
        // Unsealed: mapping is refused.
        assert!(matches!(
            map_sealed(fd.as_fd()),
            Err(MapError::NotSealed { .. })
        ));
        seal(fd.as_fd(), IMAGE_SEALS).unwrap();
        assert!(seals(fd.as_fd()).unwrap().contains(IMAGE_SEALS));
        // Writes, truncation and growth fail with EPERM; no new seals may be added.
        let e = write_all(fd.as_fd(), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let f = File::from(fd.try_clone().unwrap());
        assert!(f.set_len(0).is_err());
        assert!(f.set_len(4096).is_err());
        assert!(seal(fd.as_fd(), SealFlag::F_SEAL_FUTURE_WRITE).is_err());
        let map = map_sealed(fd.as_fd()).unwrap();
        assert_eq!(&map[..], b"kernel bytes");
    }

    #[test]
    fn fill_from_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("src");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let fd = create_sealable("mk-test").unwrap();
        let (n, more) = fill_from(fd.as_fd(), &File::open(&p).unwrap(), 20_000).unwrap();
        assert_eq!((n, more), (10_000, false));
        let fd = create_sealable("mk-test").unwrap();
        let (n, more) = fill_from(fd.as_fd(), &File::open(&p).unwrap(), 4096).unwrap();
        assert_eq!((n, more), (4096, true));
        assert_eq!(size(fd.as_fd()).unwrap(), 4096);
    }
}

/// Helpers for tests that count a memfd's descriptors.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::fd::OwnedFd;

    /// A memfd with a name no other test of this process uses (`mk-<tag>-<pid>-<n>`).
    pub(crate) fn unique_memfd(tag: &str) -> (OwnedFd, String) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "mk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        (super::create_sealable(&name).unwrap(), name)
    }

    /// How many descriptors of this process refer to the memfd called `name` (robust
    /// against the other tests opening and closing descriptors meanwhile).
    pub(crate) fn open_copies(name: &str) -> usize {
        let want = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.as_os_str() == want.as_str())
            .count()
    }
}
