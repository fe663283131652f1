//! Content digests of preserved memory regions (memfds): length, CRC32 and SHA-256.
//!
//! Contents are read with `pread` in 1 MiB chunks (no shared file offset is moved, so a
//! descriptor shared with a workload is left as it was); one pass feeds both hashes.
//! [`digest_many`] spreads several regions over rayon's thread pool.
//!
//! Cheaper checks for memory the kernel itself preserved (LUO, across a kexec), where the
//! adversarial strength of SHA-256 buys nothing: [`crc32_parallel`] (a full CRC32 whose
//! chunks are computed on every rayon thread and combined with
//! [`crc32fast::Hasher::combine`]) and [`PageSample`] (CRC32 of a fixed number of pages,
//! constant cost whatever the size).

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
        let n = pread_exact(fd, &mut buf, off)?;
        crc.update(&buf[..n]);
        sha.update(&buf[..n]);
        off += n as u64;
        // A short read is the end of the file.
        if n < buf.len() {
            break;
        }
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

/// Bytes per chunk of [`crc32_parallel`] (one rayon task each).
const PAR_CHUNK: u64 = 8 << 20;

fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], mut off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = libc::off_t::try_from(off).map_err(|_| StateError::Sys {
            call: "pread",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        match nix::sys::uio::pread(fd, &mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(StateError::Sys {
                    call: "pread",
                    source: e.into(),
                });
            }
        }
    }
    Ok(done)
}

fn fd_len(fd: BorrowedFd<'_>) -> Result<u64> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| StateError::Sys {
        call: "fstat",
        source: e.into(),
    })?;
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

/// Length (from `fstat`) and CRC32 of every byte of `fd`, the chunks computed in parallel
/// on rayon's pool and combined: the same value as `crc32fast::hash` of the contents.
pub fn crc32_parallel(fd: BorrowedFd<'_>) -> Result<(u64, u32)> {
    let len = fd_len(fd)?;
    let chunks = len.div_ceil(PAR_CHUNK);
    let parts: Vec<Result<crc32fast::Hasher>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let start = c * PAR_CHUNK;
            let end = (start + PAR_CHUNK).min(len);
            let mut buf = vec![0u8; CHUNK];
            let mut h = crc32fast::Hasher::new();
            let mut off = start;
            while off < end {
                let n = usize::try_from((end - off).min(CHUNK as u64)).unwrap_or(CHUNK);
                let got = pread_exact(fd, &mut buf[..n], off)?;
                h.update(&buf[..got]);
                if got < n {
                    break;
                }
                off += n as u64;
            }
            Ok(h)
        })
        .collect();
    let mut total = crc32fast::Hasher::new();
    for p in parts {
        total.combine(&p?);
    }
    Ok((len, total.finalize()))
}

/// Bounds of a [`PageSample`] (what a decoder accepts).
pub const SAMPLE_MIN_PAGE: u32 = 512;
pub const SAMPLE_MAX_PAGE: u32 = 1 << 21;
pub const SAMPLE_MAX_COUNT: u32 = 4096;

/// A constant-cost content check: the CRC32 of `count` pages of `page` bytes at positions
/// derived from `seed` (one page drawn in each of `count` equal strata of the file, the
/// first and the last page always included), concatenated in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageSample {
    pub page: u32,
    pub count: u32,
    pub seed: u64,
    pub crc32: u32,
}

/// Why a [`PageSample`] from untrusted bytes cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error("sample page size {0} is not a power of two in [512, 2 MiB]")]
    Page(u32),
    #[error("sample count {0} is not in [1, {SAMPLE_MAX_COUNT}]")]
    Count(u32),
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE5_E9B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl PageSample {
    /// Checks the bounds (for a sample decoded from untrusted bytes).
    pub fn validate(&self) -> std::result::Result<(), SampleError> {
        if !self.page.is_power_of_two() || !(SAMPLE_MIN_PAGE..=SAMPLE_MAX_PAGE).contains(&self.page)
        {
            return Err(SampleError::Page(self.page));
        }
        if self.count == 0 || self.count > SAMPLE_MAX_COUNT {
            return Err(SampleError::Count(self.count));
        }
        Ok(())
    }

    /// Page indices sampled in a file of `len` bytes (sorted, distinct).
    pub fn pages(page: u32, count: u32, seed: u64, len: u64) -> Vec<u64> {
        let pages = len.div_ceil(u64::from(page.max(1)));
        if pages == 0 {
            return Vec::new();
        }
        let count = u64::from(count.clamp(1, SAMPLE_MAX_COUNT));
        let mut out: Vec<u64> = if pages <= count {
            (0..pages).collect()
        } else {
            (0..count)
                .map(|i| {
                    // u128: `i * pages` must not overflow for any file size.
                    let at =
                        |k: u64| (u128::from(k) * u128::from(pages) / u128::from(count)) as u64;
                    let (lo, hi) = (at(i), at(i + 1));
                    lo + splitmix(seed ^ i) % (hi - lo).max(1)
                })
                .collect()
        };
        out.push(0);
        out.push(pages - 1);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Takes a sample of `fd` (whose size is `len`).
    pub fn take(fd: BorrowedFd<'_>, len: u64, page: u32, count: u32, seed: u64) -> Result<Self> {
        let crc32 = sample_crc(fd, len, page, count, seed)?;
        Ok(PageSample {
            page,
            count,
            seed,
            crc32,
        })
    }

    /// Checks `fd` (whose size must already have been checked to be `len`) against this
    /// sample; the found CRC32 on a mismatch.
    pub fn check(&self, fd: BorrowedFd<'_>, len: u64) -> Result<std::result::Result<(), u32>> {
        let found = sample_crc(fd, len, self.page, self.count, self.seed)?;
        Ok(if found == self.crc32 {
            Ok(())
        } else {
            Err(found)
        })
    }
}

fn sample_crc(fd: BorrowedFd<'_>, len: u64, page: u32, count: u32, seed: u64) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; page as usize];
    for p in PageSample::pages(page, count, seed, len) {
        let off = p * u64::from(page);
        let n = usize::try_from((len - off).min(u64::from(page))).unwrap_or(0);
        let got = pread_exact(fd, &mut buf[..n], off)?;
        h.update(&buf[..got]);
    }
    Ok(h.finalize())
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

    fn memfd_with(data: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn parallel_crc32_equals_the_plain_crc32() {
        for len in [0usize, 1, 4095, (PAR_CHUNK as usize) * 2 + 12345] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 + i / 977) as u8).collect();
            let f = memfd_with(&data);
            assert_eq!(
                crc32_parallel(f.as_fd()).unwrap(),
                (len as u64, crc32fast::hash(&data))
            );
        }
        // A pipe has no size: nothing is read.
        let (_r, w) = std::io::pipe().unwrap();
        assert_eq!(crc32_parallel(w.as_fd()).unwrap(), (0, 0));
    }

    #[test]
    fn sample_pages_are_bounded_sorted_and_cover_both_ends() {
        assert!(PageSample::pages(4096, 16, 1, 0).is_empty());
        assert_eq!(PageSample::pages(4096, 16, 1, 4096 * 3), vec![0, 1, 2]);
        let p = PageSample::pages(4096, 256, 42, 1 << 30);
        assert!(p.len() <= 258 && p.len() >= 256, "{}", p.len());
        assert_eq!(p[0], 0);
        assert_eq!(*p.last().unwrap(), (1u64 << 30) / 4096 - 1);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(p, PageSample::pages(4096, 256, 43, 1 << 30));
        // A huge count is clamped, never allocates beyond the bound.
        assert!(
            PageSample::pages(512, u32::MAX, 0, u64::MAX / 2).len()
                <= SAMPLE_MAX_COUNT as usize + 2
        );
    }

    #[test]
    fn a_sample_catches_a_change_in_a_sampled_page_and_not_elsewhere() {
        let len = 64 * 4096;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let f = memfd_with(&data);
        let s = PageSample::take(f.as_fd(), len as u64, 4096, 8, 99).unwrap();
        s.validate().unwrap();
        assert_eq!(s.check(f.as_fd(), len as u64).unwrap(), Ok(()));
        let sampled = PageSample::pages(4096, 8, 99, len as u64);
        let unsampled = (0..64u64).find(|p| !sampled.contains(p)).unwrap();
        let mut changed = data.clone();
        changed[unsampled as usize * 4096 + 5] ^= 1;
        assert_eq!(
            s.check(memfd_with(&changed).as_fd(), len as u64).unwrap(),
            Ok(())
        );
        let mut changed = data.clone();
        changed[sampled[3] as usize * 4096 + 5] ^= 1;
        assert!(
            s.check(memfd_with(&changed).as_fd(), len as u64)
                .unwrap()
                .is_err()
        );
        // The last page is always sampled (truncation, a lost tail folio).
        let mut changed = data;
        changed[len - 1] ^= 0x80;
        assert!(
            s.check(memfd_with(&changed).as_fd(), len as u64)
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn sample_bounds_are_checked() {
        let ok = PageSample {
            page: 4096,
            count: 256,
            seed: 0,
            crc32: 0,
        };
        ok.validate().unwrap();
        for page in [0, 100, 256, 4097, 1 << 22] {
            assert_eq!(
                PageSample { page, ..ok }.validate(),
                Err(SampleError::Page(page))
            );
        }
        for count in [0, SAMPLE_MAX_COUNT + 1] {
            assert_eq!(
                PageSample { count, ..ok }.validate(),
                Err(SampleError::Count(count))
            );
        }
    }
}
