//! Saving the store to a file and loading it back: the "cold start from disk" baseline.
//!
//! `mk-demo-kv --save-to PATH` writes the bytes of its `kv-data` memfd (after
//! `--preload-mib`) to `PATH` and exits; `mk-demo-kv --load-from PATH` fills a fresh (or an
//! empty handed-over) memfd with the bytes of `PATH` — a file or a block device holding
//! such an image, e.g. a raw virtio-blk disk — and then opens it as it would open a
//! handed-over memfd (header and index checked, records verified when read). The image is
//! the memfd's bytes and nothing else: the store's own header, per-record CRC32s and
//! index are its integrity checks. A block device is read up to its size (`lseek` to its
//! end), so the image should be the store's exact size (a multiple of 512 bytes: store
//! capacities are whole MiB).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Copy chunk: large reads keep a virtio-blk device streaming.
const CHUNK: usize = 4 << 20;
/// Largest image loaded (the store's own limit on its memfd).
pub const MAX_IMAGE: u64 = 64 << 30;

/// Why saving or loading failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: the image is empty")]
    Empty { path: PathBuf },
    #[error("{path}: the image is {len} bytes, more than {MAX_IMAGE}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path}: ended after {got} of {want} bytes")]
    Short { path: PathBuf, got: u64, want: u64 },
    #[error("the kv-data memfd already holds {len} bytes: --load-from fills an empty store only")]
    NotEmpty { len: u64 },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Size of the image at `path`: a regular file's length, or a block device's size.
pub fn image_len(path: &Path) -> Result<u64, PersistError> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    f.seek(SeekFrom::End(0)).map_err(io_err(path, "seek"))
}

/// Copies the whole image at `path` into `memfd` (grown to the image's size; it must be
/// empty). Returns the number of bytes loaded.
pub fn load_into(path: &Path, memfd: &File) -> Result<u64, PersistError> {
    let mem = Path::new("kv-data memfd");
    let have = memfd.metadata().map_err(io_err(mem, "fstat"))?.len();
    if have != 0 {
        return Err(PersistError::NotEmpty { len: have });
    }
    let want = image_len(path)?;
    if want == 0 {
        return Err(PersistError::Empty {
            path: path.to_owned(),
        });
    }
    if want > MAX_IMAGE {
        return Err(PersistError::TooLarge {
            path: path.to_owned(),
            len: want,
        });
    }
    memfd.set_len(want).map_err(io_err(mem, "ftruncate"))?;
    let mut src = File::open(path).map_err(io_err(path, "open"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off: u64 = 0;
    while off < want {
        let n = usize::try_from((want - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        let got = match src.read(&mut buf[..n]) {
            Ok(0) => {
                return Err(PersistError::Short {
                    path: path.to_owned(),
                    got: off,
                    want,
                });
            }
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "read")(e)),
        };
        memfd
            .write_all_at(&buf[..got], off)
            .map_err(io_err(mem, "write"))?;
        off += got as u64;
    }
    Ok(off)
}

/// Writes every byte of `memfd` to a new file at `path` (replaced if it exists, synced).
/// Returns the number of bytes written.
pub fn save(memfd: BorrowedFd<'_>, path: &Path) -> Result<u64, PersistError> {
    let mem = Path::new("kv-data memfd");
    let memfd = File::from(memfd.try_clone_to_owned().map_err(io_err(mem, "dup"))?);
    let len = memfd.metadata().map_err(io_err(mem, "fstat"))?.len();
    let mut out = File::create(path).map_err(io_err(path, "create"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off: u64 = 0;
    while off < len {
        let n = usize::try_from((len - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        memfd
            .read_exact_at(&mut buf[..n], off)
            .map_err(io_err(mem, "read"))?;
        out.write_all(&buf[..n]).map_err(io_err(path, "write"))?;
        off += n as u64;
    }
    out.sync_all().map_err(io_err(path, "fsync"))?;
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd() -> File {
        crate::shm::create_memfd(0).unwrap()
    }

    #[test]
    fn save_then_load_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = memfd();
        let data: Vec<u8> = (0..(CHUNK * 2 + 4096))
            .map(|i| (i * 31 + i / 7) as u8)
            .collect();
        src.set_len(data.len() as u64).unwrap();
        src.write_all_at(&data, 0).unwrap();
        let img = dir.path().join("kv.img");
        assert_eq!(save(src.as_fd(), &img).unwrap(), data.len() as u64);
        assert_eq!(image_len(&img).unwrap(), data.len() as u64);
        let dst = memfd();
        assert_eq!(load_into(&img, &dst).unwrap(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        dst.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert_eq!(dst.metadata().unwrap().len(), data.len() as u64);
    }

    #[test]
    fn load_refuses_missing_empty_and_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.img");
        let e = load_into(&missing, &memfd()).unwrap_err();
        assert!(matches!(e, PersistError::Io { op: "open", .. }), "{e}");
        let empty = dir.path().join("empty.img");
        File::create(&empty).unwrap();
        let e = load_into(&empty, &memfd()).unwrap_err();
        assert!(matches!(e, PersistError::Empty { .. }), "{e}");
        let full = memfd();
        full.set_len(4096).unwrap();
        std::fs::write(&empty, b"x").unwrap();
        let e = load_into(&empty, &full).unwrap_err();
        assert!(matches!(e, PersistError::NotEmpty { len: 4096 }), "{e}");
        assert!(e.to_string().contains("empty store only"), "{e}");
    }

    #[test]
    fn save_into_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = save(memfd().as_fd(), &dir.path().join("no/such/dir/kv.img")).unwrap_err();
        assert!(matches!(e, PersistError::Io { op: "create", .. }), "{e}");
    }
}
