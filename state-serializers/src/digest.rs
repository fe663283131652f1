//! Content digests of preserved memory regions (memfds): length, CRC32 and SHA-256.
//!
//! Contents are read with `pread` in 1 MiB chunks (no shared file offset is moved, so a
//! descriptor shared with a workload is left as it was); one pass feeds both hashes.
//! [`digest_many`] spreads several regions over rayon's thread pool.

use std::os::fd::BorrowedFd;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Result, StateError};

/// Read chunk size.
const CHUNK: usize = 1 << 20;

/// Length and digests of a region's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDigest {
    pub len: u64,
    pub crc32: u32,
    pub sha256: [u8; 32],
}

impl RegionDigest {
    /// The digest of an in-memory buffer.
    pub fn of_bytes(data: &[u8]) -> Self {
        Self {
            len: data.len() as u64,
            crc32: crc32fast::hash(data),
            sha256: Sha256::digest(data).into(),
        }
    }
}

/// Reads the whole of `fd` (from offset 0 to EOF) and returns its digest.
pub fn digest_fd(fd: BorrowedFd<'_>) -> Result<RegionDigest> {
    let mut buf = vec![0u8; CHUNK];
    let mut crc = crc32fast::Hasher::new();
    let mut sha = Sha256::new();
    let mut off: u64 = 0;
    loop {
        let n = match nix::sys::uio::pread(fd, &mut buf, off as libc::off_t) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(StateError::Sys {
                    call: "pread",
                    source: e.into(),
                });
            }
        };
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        sha.update(&buf[..n]);
        off += n as u64;
    }
    Ok(RegionDigest {
        len: off,
        crc32: crc.finalize(),
        sha256: sha.finalize().into(),
    })
}

/// Checks `fd`'s contents against `expected`; `token` names the region in the error.
pub fn verify_fd(token: &str, fd: BorrowedFd<'_>, expected: &RegionDigest) -> Result<()> {
    let found = digest_fd(fd)?;
    if found == *expected {
        Ok(())
    } else {
        Err(StateError::DigestMismatch {
            token: token.to_owned(),
            expected_len: expected.len,
            expected_crc32: expected.crc32,
            expected_sha256: hex::encode(expected.sha256),
            found_len: found.len,
            found_crc32: found.crc32,
            found_sha256: hex::encode(found.sha256),
        })
    }
}

/// Digests several descriptors in parallel; results are in input order.
pub fn digest_many(fds: &[BorrowedFd<'_>]) -> Vec<Result<RegionDigest>> {
    fds.par_iter().map(|fd| digest_fd(*fd)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn file_digest_equals_buffer_digest_across_chunks() {
        let data: Vec<u8> = (0..(CHUNK * 2 + 12345))
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let d = digest_fd(f.as_fd()).unwrap();
        assert_eq!(d, RegionDigest::of_bytes(&data));
        assert_eq!(d.len, data.len() as u64);
        verify_fd("t", f.as_fd(), &d).unwrap();
        let mut bad = d;
        bad.crc32 ^= 1;
        let e = verify_fd("t", f.as_fd(), &bad).unwrap_err();
        assert!(
            matches!(e, StateError::DigestMismatch { ref token, .. } if token == "t"),
            "{e}"
        );
    }

    #[test]
    fn parallel_matches_sequential() {
        let files: Vec<std::fs::File> = (0..5u8)
            .map(|i| {
                let mut f = tempfile::tempfile().unwrap();
                f.write_all(&vec![i; 1000 * usize::from(i) + 1]).unwrap();
                f
            })
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let par = digest_many(&fds);
        for (f, r) in files.iter().zip(par) {
            assert_eq!(r.unwrap(), digest_fd(f.as_fd()).unwrap());
        }
    }

    #[test]
    fn unreadable_fd_is_an_error() {
        let (_r, w) = std::io::pipe().unwrap();
        let e = digest_fd(w.as_fd()).unwrap_err();
        assert!(matches!(e, StateError::Sys { call: "pread", .. }), "{e}");
    }
}
