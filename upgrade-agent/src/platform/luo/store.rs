//! The kernels the LUO host agent keeps on disk, so that `mk-upgrade rollback --platform
//! luo` (and the next upgrade) still work after the agent restarts: the running kernel and
//! the previous one, each with its own initramfs and command line.
//!
//! Layout: `STATE_DIR/luo/kernels/{current,previous}/` with `image`, optionally `initrd`,
//! and `meta.json` (`{"release", "cmdline", "image_sha256", "initrd_sha256"}`), every file
//! 0600 in 0700 directories, written atomically. A kernel is loaded back only if both
//! digests match what `meta.json` records (the image also has to be at most
//! [`MAX_KERNEL_BYTES`], the initramfs at most [`MAX_INITRD_BYTES`]); anything else is
//! reported and ignored, never booted.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::host::KernelRef;
use crate::handover;

/// Largest kernel image kept (as the verification cap).
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;
/// Largest initramfs kept.
pub const MAX_INITRD_BYTES: u64 = 2 << 30;
/// Largest `meta.json` read.
const MAX_META_BYTES: u64 = 64 << 10;

/// Which kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The kernel running now.
    Current,
    /// The kernel before it (the target of a rollback).
    Previous,
}

impl Role {
    fn dir(self) -> &'static str {
        match self {
            Role::Current => "current",
            Role::Previous => "previous",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    release: String,
    cmdline: String,
    image_sha256: String,
    initrd_sha256: Option<String>,
}

/// Why a kept kernel could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_fd(fd: BorrowedFd<'_>, cap: u64, path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone_to_owned().map_err(io(path))?);
    let len = f.metadata().map_err(io(path))?.len();
    if len > cap {
        return Err(StoreError::Invalid {
            path: path.to_owned(),
            what: format!("{len} bytes, more than {cap}"),
        });
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    f.read_exact_at(&mut buf, 0).map_err(io(path))?;
    Ok(buf)
}

fn read_file(path: &Path, cap: u64) -> Result<Vec<u8>, StoreError> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if !meta.is_file() || meta.len() > cap {
        return Err(StoreError::Invalid {
            path: path.to_owned(),
            what: format!("not a regular file of at most {cap} bytes"),
        });
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .map_err(io(path))?
        .take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(io(path))?;
    Ok(buf)
}

fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    rollback::atomic_write(path, bytes).map_err(|e| StoreError::Invalid {
        path: path.to_owned(),
        what: e.to_string(),
    })
}

/// The kernels of the state directory `state_dir`.
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
}

impl KernelStore {
    /// The store under `STATE_DIR/luo/kernels`.
    pub fn new(state_dir: &Path) -> Self {
        KernelStore {
            dir: super::agent_dir(state_dir).join("kernels"),
        }
    }

    /// Keeps `k` as `role` (replacing what was kept).
    pub fn save(&self, role: Role, k: &KernelRef) -> Result<(), StoreError> {
        private_dir(&self.dir)?;
        let dir = self.dir.join(role.dir());
        private_dir(&dir)?;
        let image = read_fd(k.image.as_fd(), MAX_KERNEL_BYTES, &dir.join("image"))?;
        let initrd = k
            .initrd
            .as_ref()
            .map(|i| read_fd(i.as_fd(), MAX_INITRD_BYTES, &dir.join("initrd")))
            .transpose()?;
        let meta = Meta {
            release: k.release.clone(),
            cmdline: k.cmdline.clone(),
            image_sha256: hex::encode(Sha256::digest(&image)),
            initrd_sha256: initrd.as_ref().map(|i| hex::encode(Sha256::digest(i))),
        };
        // The metadata last: a crash in between leaves digests that do not match, which
        // load refuses.
        write(&dir.join("image"), &image)?;
        match &initrd {
            Some(i) => write(&dir.join("initrd"), i)?,
            None => match std::fs::remove_file(dir.join("initrd")) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&dir.join("initrd"))(e)),
            },
        }
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| StoreError::Invalid {
            path: dir.join("meta.json"),
            what: e.to_string(),
        })?;
        write(&dir.join("meta.json"), &text)
    }

    /// The kernel kept as `role`, if one is kept and intact. `Ok(None)` when none is kept.
    pub fn load(&self, role: Role) -> Result<Option<KernelRef>, StoreError> {
        let dir = self.dir.join(role.dir());
        let meta_path = dir.join("meta.json");
        if !meta_path.exists() {
            return Ok(None);
        }
        let meta: Meta =
            serde_json::from_slice(&read_file(&meta_path, MAX_META_BYTES)?).map_err(|e| {
                StoreError::Invalid {
                    path: meta_path.clone(),
                    what: e.to_string(),
                }
            })?;
        let check = |name: &str, cap: u64, want: &str| -> Result<OwnedFd, StoreError> {
            let path = dir.join(name);
            let bytes = read_file(&path, cap)?;
            let got = hex::encode(Sha256::digest(&bytes));
            if got != want {
                return Err(StoreError::Invalid {
                    path,
                    what: format!("SHA-256 {got}, but {want} was kept: refusing to boot it"),
                });
            }
            handover::sealed_memfd(name, &bytes).map_err(io(&path))
        };
        let image = check("image", MAX_KERNEL_BYTES, &meta.image_sha256)?;
        let initrd = meta
            .initrd_sha256
            .as_deref()
            .map(|want| check("initrd", MAX_INITRD_BYTES, want))
            .transpose()?;
        Ok(Some(KernelRef {
            image,
            release: meta.release,
            initrd,
            cmdline: meta.cmdline,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(release: &str, with_initrd: bool) -> KernelRef {
        KernelRef {
            image: handover::sealed_memfd("k", format!("kernel {release}").as_bytes()).unwrap(),
            release: release.into(),
            initrd: with_initrd
                .then(|| handover::sealed_memfd("i", format!("initrd {release}").as_bytes()))
                .transpose()
                .unwrap(),
            cmdline: format!("console=ttyS0 for={release}"),
        }
    }

    fn contents(fd: &OwnedFd) -> Vec<u8> {
        read_fd(fd.as_fd(), 1 << 20, Path::new("x")).unwrap()
    }

    #[test]
    fn kept_kernels_come_back_with_their_own_initrd_and_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let s = KernelStore::new(dir.path());
        assert!(s.load(Role::Previous).unwrap().is_none());
        s.save(Role::Previous, &kernel("7.3.4-mkA", true)).unwrap();
        s.save(Role::Current, &kernel("7.3.4-mkB", false)).unwrap();
        let p = s.load(Role::Previous).unwrap().unwrap();
        assert_eq!(p.release, "7.3.4-mkA");
        assert_eq!(p.cmdline, "console=ttyS0 for=7.3.4-mkA");
        assert_eq!(contents(&p.image), b"kernel 7.3.4-mkA");
        assert_eq!(contents(p.initrd.as_ref().unwrap()), b"initrd 7.3.4-mkA");
        let c = s.load(Role::Current).unwrap().unwrap();
        assert!(c.initrd.is_none());
        // Private whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let kdir = super::super::agent_dir(dir.path()).join("kernels/previous");
        assert_eq!(mode(&kdir), 0o700);
        assert_eq!(mode(&kdir.join("image")), 0o600);
        // Replacing a kept kernel without an initramfs drops the old one.
        s.save(Role::Previous, &kernel("7.3.4-mkC", false)).unwrap();
        assert!(s.load(Role::Previous).unwrap().unwrap().initrd.is_none());
        assert!(!kdir.join("initrd").exists());
    }

    #[test]
    fn a_changed_kept_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = KernelStore::new(dir.path());
        s.save(Role::Previous, &kernel("7.3.4-mkA", true)).unwrap();
        let kdir = super::super::agent_dir(dir.path()).join("kernels/previous");
        for name in ["image", "initrd"] {
            let p = kdir.join(name);
            let good = std::fs::read(&p).unwrap();
            let mut bad = good.clone();
            bad[0] ^= 1;
            std::fs::write(&p, &bad).unwrap();
            let e = s.load(Role::Previous).unwrap_err().to_string();
            assert!(e.contains("refusing to boot it"), "{e}");
            std::fs::write(&p, &good).unwrap();
        }
        std::fs::write(kdir.join("meta.json"), b"{").unwrap();
        assert!(s.load(Role::Previous).is_err());
    }
}
