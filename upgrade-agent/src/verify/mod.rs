//! Kernel image verification: bzImage header, sealed memfd, signed manifests.
//!
//! [`verify_kernel_image`] reads the image file exactly once, into a memfd that it then seals
//! against writes, shrinking and growth. It hashes the sealed bytes through a read-only
//! mapping of that memfd and parses the boot setup header from the same mapping, so the
//! digest checked against the signed manifest is the digest of the very bytes that
//! `kexec_file_load` will be handed (the returned [`VerifiedImage::memfd`]): verify exactly what
//! you boot. Nothing re-reads the path afterwards, so replacing the file mid-upgrade changes
//! nothing.
//!
//! Refusals, in the order checked ([`VerifyError`]; the `mk-upgrade` binary maps them onto
//! its exit codes, `docs/cli.md`): unreadable file (3); not a kernel (7), which includes an
//! image that is not a regular file or is over [`MAX_KERNEL_IMAGE`]; a signature file that
//! is not a regular file (3); unsigned without the insecure override, malformed signature
//! file (including one over [`MAX_SIG_FILE`]), untrusted key, bad signature, image digest
//! differing from the manifest ("tampered"), manifest release differing from the header (5);
//! downgrade below the running release, or below the version floor (6).
//!
//! Both files are read only if they are regular files within their cap ([`open_regular`]):
//! the type and size are checked with `stat` before the file is opened, so a FIFO is never
//! opened (nothing waits for a writer while `apply` holds the upgrade lock) and a device
//! such as `/dev/zero` is never read; they are checked again on the open descriptor, and
//! the read stops one byte past the cap.

pub mod bzimage;
pub mod manifest;
pub mod vmlinux;

use std::fs::{File, FileType, Metadata};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kho_proto::keys::{KeyError, KeyId, NodeKey, TrustedKeys};
use memmap2::Mmap;
use sha2::{Digest, Sha256};

pub use bzimage::{KernelInfo, NotAKernel, minimal_bzimage};
pub use manifest::{ImageManifest, MAX_SIG_FILE, MalformedSig, SigFileError, SignatureFile};
pub use rollback::{Release, ReleaseError};

use crate::sys::memfd::{self, IMAGE_SEALS, MapError, SealFlag};

/// Largest kernel image accepted (real bzImages are tens of MiB).
pub const MAX_KERNEL_IMAGE: u64 = 512 << 20;
/// The command-line option that accepts unsigned images (named in messages).
pub const INSECURE_FLAG: &str = "--insecure-allow-unsigned";
/// The command-line option that accepts images older than the running kernel.
pub const DOWNGRADE_FLAG: &str = "--allow-downgrade";

/// What [`verify_kernel_image`] checks an image against.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    /// Directory of trusted `NAME.pub` files.
    pub trusted_keys_dir: PathBuf,
    /// Accept an image without a signature file (test hosts only; a present signature file
    /// is still checked).
    pub allow_unsigned_insecure: bool,
    /// `uname -r` of the running kernel.
    pub running_release: String,
    /// The host's version floor (anti-rollback), if any. Never bypassed.
    pub floor: Option<String>,
    /// Accept a release numerically below the running one (still not below the floor).
    pub allow_downgrade: bool,
}

/// An image that passed verification, held in a sealed memfd.
#[derive(Debug)]
pub struct VerifiedImage {
    /// The image bytes, sealed with [`IMAGE_SEALS`]: hand this fd to `kexec_file_load`.
    pub memfd: OwnedFd,
    /// SHA-256 of the memfd's bytes.
    pub sha256: [u8; 32],
    /// The setup header.
    pub info: KernelInfo,
    /// The signed manifest (`None` only for an unsigned image accepted insecurely).
    pub manifest: Option<ImageManifest>,
    /// Who signed it.
    pub signer: Option<KeyId>,
    /// Image size in bytes.
    pub len: u64,
    /// Things the operator must hear about (for example: accepted unsigned).
    pub warnings: Vec<String>,
}

impl VerifiedImage {
    /// A read-only mapping of the sealed bytes (for storing the image in a slot).
    pub fn map(&self) -> Result<Mmap, MapError> {
        memfd::map_sealed(self.memfd.as_fd())
    }
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read kernel image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a bootable x86-64 kernel: {reason}")]
    NotAKernel {
        path: PathBuf,
        #[source]
        reason: NotAKernelReason,
    },
    #[error("cannot hold the image in a sealed memfd ({op}): {source}")]
    Memfd {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hold the image in a sealed memfd (map): {0}")]
    MemfdMap(#[source] MapError),
    #[error(
        "cannot hold the image in a sealed memfd (F_GET_SEALS): seals {have:?} lack {IMAGE_SEALS:?}"
    )]
    MemfdUnsealed { have: SealFlag },
    #[error(
        "{image} is unsigned (no {sig}); sign it with `mk-upgrade sign {image} --key KEY` and \
         put the signer's .pub file in the trusted-keys directory, or pass {INSECURE_FLAG} \
         (test hosts only)",
        image = .image.display(),
        sig = .sig.display()
    )]
    Unsigned { image: PathBuf, sig: PathBuf },
    #[error(transparent)]
    SignatureFile(#[from] SigFileError),
    #[error("trusted-keys directory {dir}: {source}")]
    TrustStore {
        dir: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error(
        "{sig} is signed by key {key_id}, which is not in the trusted-keys directory {dir}; if \
         you trust that signer, copy its .pub file there"
    )]
    UntrustedKey {
        sig: PathBuf,
        key_id: KeyId,
        dir: PathBuf,
    },
    #[error(
        "the signature in {sig} (key {key_id}) does not verify: the manifest was changed after \
         signing; sign the image again"
    )]
    BadSignature { sig: PathBuf, key_id: KeyId },
    #[error(
        "{image} was modified after signing (tampered): its SHA-256 is {actual}, the signed \
         manifest says {expected}; fetch the image again from its source"
    )]
    Tampered {
        image: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "the signed manifest is for kernel {signed}, but the image's header says {header}: the \
         signature belongs to another image"
    )]
    ReleaseMismatch { signed: String, header: String },
    #[error("{what} {source}")]
    BadRelease {
        what: &'static str,
        #[source]
        source: ReleaseError,
    },
    #[error(
        "{candidate} is older than the running kernel {running}: refusing a downgrade (pass \
         {DOWNGRADE_FLAG} if it is intended)"
    )]
    Downgrade { candidate: String, running: String },
    #[error(
        "{candidate} is below the version floor {floor} (anti-rollback: an accepted image raised \
         it); only a kernel at or above {floor} can be installed"
    )]
    BelowFloor { candidate: String, floor: String },
}

/// Why a file is not a kernel image [`verify_kernel_image`] accepts.
#[derive(Debug, thiserror::Error)]
pub enum NotAKernelReason {
    /// The boot setup header does not parse as a bootable x86-64 bzImage.
    #[error(transparent)]
    Header(#[from] NotAKernel),
    /// A directory, FIFO, device... (`kind` says which: [`file_kind`]); refused before it
    /// is opened.
    #[error("{kind}, not a regular file")]
    NotARegularFile { kind: &'static str },
    /// Larger than [`MAX_KERNEL_IMAGE`].
    #[error("{len} bytes is more than the {MAX_KERNEL_IMAGE}-byte limit for a kernel image")]
    TooLarge { len: u64 },
    /// The file grew past [`MAX_KERNEL_IMAGE`] while it was read.
    #[error("the file grew past the {MAX_KERNEL_IMAGE}-byte limit for a kernel image while read")]
    GrewWhileRead,
    /// Zero bytes.
    #[error("the file is empty")]
    Empty,
}

/// The default signature path: `IMAGE.sig` next to the image.
pub fn default_sig_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Reads `path` once into a sealed memfd and verifies it against `policy`; `sig` defaults to
/// [`default_sig_path`]. See the module documentation for the checks.
pub fn verify_kernel_image(
    path: &Path,
    sig: Option<&Path>,
    policy: &VerifyPolicy,
) -> Result<VerifiedImage, VerifyError> {
    let (memfd, len) = load_sealed(path)?;
    let map = memfd::map_sealed(memfd.as_fd()).map_err(VerifyError::MemfdMap)?;
    let sha256: [u8; 32] = Sha256::digest(&map[..]).into();
    let info = bzimage::parse(&map).map_err(|e| VerifyError::NotAKernel {
        path: path.to_owned(),
        reason: e.into(),
    })?;
    drop(map);

    let sig_path = sig.map_or_else(|| default_sig_path(path), Path::to_owned);
    let mut warnings = Vec::new();
    let (manifest, signer) = match SignatureFile::read(&sig_path)? {
        None if policy.allow_unsigned_insecure => {
            warnings.push(format!(
                "INSECURE: {} is unsigned and was accepted only because of {INSECURE_FLAG}",
                path.display()
            ));
            (None, None)
        }
        None => {
            return Err(VerifyError::Unsigned {
                image: path.to_owned(),
                sig: sig_path,
            });
        }
        Some(file) => {
            let signer = check_signature(&file, &sig_path, &policy.trusted_keys_dir)?;
            let m = file.manifest;
            if m.image_sha256 != sha256 {
                return Err(VerifyError::Tampered {
                    image: path.to_owned(),
                    expected: hex::encode(m.image_sha256),
                    actual: hex::encode(sha256),
                });
            }
            if m.kernel_release != info.release {
                return Err(VerifyError::ReleaseMismatch {
                    signed: m.kernel_release,
                    header: info.release,
                });
            }
            (Some(m), Some(signer))
        }
    };

    check_versions(&info.release, manifest.as_ref(), policy)?;
    Ok(VerifiedImage {
        memfd,
        sha256,
        info,
        manifest,
        signer,
        len,
        warnings,
    })
}

/// Copies the file into a fresh memfd (bounded by [`MAX_KERNEL_IMAGE`]) and seals it.
fn load_sealed(path: &Path) -> Result<(OwnedFd, u64), VerifyError> {
    let io = |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    };
    let not_kernel = |reason: NotAKernelReason| VerifyError::NotAKernel {
        path: path.to_owned(),
        reason,
    };
    let (file, _) = open_regular(path, MAX_KERNEL_IMAGE).map_err(|e| match e {
        OpenRefusal::Io(e) => io(e),
        OpenRefusal::Kind(kind) => not_kernel(NotAKernelReason::NotARegularFile { kind }),
        OpenRefusal::TooLarge { len } => not_kernel(NotAKernelReason::TooLarge { len }),
    })?;
    let memfd_err = |op| {
        move |e: nix::errno::Errno| VerifyError::Memfd {
            op,
            source: std::io::Error::from(e),
        }
    };
    let fd = memfd::create_sealable("mk-upgrade-kernel").map_err(memfd_err("memfd_create"))?;
    let (len, more) = memfd::fill_from(fd.as_fd(), &file, MAX_KERNEL_IMAGE).map_err(io)?;
    if more {
        return Err(not_kernel(NotAKernelReason::GrewWhileRead));
    }
    if len == 0 {
        return Err(not_kernel(NotAKernelReason::Empty));
    }
    memfd::seal(fd.as_fd(), IMAGE_SEALS).map_err(memfd_err("F_ADD_SEALS"))?;
    let have = memfd::seals(fd.as_fd()).map_err(memfd_err("F_GET_SEALS"))?;
    if !have.contains(IMAGE_SEALS) {
        return Err(VerifyError::MemfdUnsealed { have });
    }
    Ok((fd, len))
}

/// What a file that is not a regular file is, for refusals: `a FIFO`, `a character
/// device`, `a block device`, `a socket`, `a directory`.
pub fn file_kind(t: FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Why [`open_regular`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum OpenRefusal {
    /// Missing, unreadable (`stat` or `open` failed).
    #[error(transparent)]
    Io(std::io::Error),
    /// Not a regular file ([`file_kind`]).
    #[error("{0}, not a regular file")]
    Kind(&'static str),
    /// A regular file over the cap.
    #[error("{len} bytes, over the cap")]
    TooLarge { len: u64 },
}

fn check_regular(meta: &Metadata, cap: u64) -> Result<u64, OpenRefusal> {
    if !meta.is_file() {
        return Err(OpenRefusal::Kind(file_kind(meta.file_type())));
    }
    if meta.len() > cap {
        return Err(OpenRefusal::TooLarge { len: meta.len() });
    }
    Ok(meta.len())
}

/// Opens `path` for reading only if it is a regular file of at most `cap` bytes; returns it
/// with its size. The type and size are checked with `stat` (following symbolic links)
/// **before** the file is opened, so a FIFO is never opened and a device never read; then
/// again with `fstat` on the descriptor, in case the path was replaced in between (that
/// open uses `O_NONBLOCK | O_NOCTTY`, so even a FIFO swapped in does not make it wait for a
/// writer; the flag changes nothing for a regular file). The caller still bounds its read
/// (the file may grow).
pub fn open_regular(path: &Path, cap: u64) -> Result<(File, u64), OpenRefusal> {
    check_regular(&std::fs::metadata(path).map_err(OpenRefusal::Io)?, cap)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(OpenRefusal::Io)?;
    let len = check_regular(&file.metadata().map_err(OpenRefusal::Io)?, cap)?;
    Ok((file, len))
}

fn check_signature(
    file: &SignatureFile,
    sig_path: &Path,
    dir: &Path,
) -> Result<KeyId, VerifyError> {
    let trusted = TrustedKeys::load_dir(dir).map_err(|source| VerifyError::TrustStore {
        dir: dir.to_owned(),
        source,
    })?;
    file.verify(&trusted).map_err(|e| match e {
        KeyError::Untrusted { key_id } => VerifyError::UntrustedKey {
            sig: sig_path.to_owned(),
            key_id,
            dir: dir.to_owned(),
        },
        KeyError::BadSignature { key_id } => VerifyError::BadSignature {
            sig: sig_path.to_owned(),
            key_id,
        },
        other => VerifyError::TrustStore {
            dir: dir.to_owned(),
            source: other,
        },
    })
}

fn check_versions(
    release: &str,
    manifest: Option<&ImageManifest>,
    policy: &VerifyPolicy,
) -> Result<(), VerifyError> {
    let parse = |what, s: &str| {
        Release::parse(s).map_err(|source| VerifyError::BadRelease { what, source })
    };
    let candidate = parse("the image's release:", release)?;
    let running = parse("the running release:", &policy.running_release)?;
    if candidate.is_below(&running) && !policy.allow_downgrade {
        return Err(VerifyError::Downgrade {
            candidate: release.to_owned(),
            running: policy.running_release.clone(),
        });
    }
    let floors = policy
        .floor
        .iter()
        .map(|f| ("the host's version floor:", f))
        .chain(
            manifest
                .and_then(|m| m.version_floor.as_ref())
                .map(|f| ("the manifest's version floor:", f)),
        );
    for (what, floor) in floors {
        if candidate.is_below(&parse(what, floor)?) {
            return Err(VerifyError::BelowFloor {
                candidate: release.to_owned(),
                floor: floor.clone(),
            });
        }
    }
    Ok(())
}

/// Why an image could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("refusing to sign: {0}")]
    NotAKernel(#[from] NotAKernel),
    #[error("refusing to sign: version floor {0}")]
    BadFloor(#[source] ReleaseError),
    #[error(
        "refusing to sign: the version floor {floor} is above the image's own release {release}, \
         so hosts would refuse this very image"
    )]
    FloorAboveRelease { floor: String, release: String },
}

/// Builds and signs the manifest of `image` (whose header must parse as a kernel).
pub fn sign_image(
    image: &[u8],
    key: &NodeKey,
    version_floor: Option<String>,
    created_at: u64,
) -> Result<SignatureFile, SignError> {
    let info = bzimage::parse(image)?;
    if let Some(f) = &version_floor {
        let floor = Release::parse(f).map_err(SignError::BadFloor)?;
        let release = Release::parse(&info.release).map_err(|e| NotAKernel {
            reason: e.to_string(),
        })?;
        if release.is_below(&floor) {
            return Err(SignError::FloorAboveRelease {
                floor: f.clone(),
                release: info.release,
            });
        }
    }
    let sha256: [u8; 32] = Sha256::digest(image).into();
    let manifest = ImageManifest::new(sha256, info.release, version_floor, created_at);
    Ok(SignatureFile::sign(manifest, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> VerifyPolicy {
        VerifyPolicy {
            trusted_keys_dir: dir.to_owned(),
            allow_unsigned_insecure: false,
            running_release: "7.2.13-mkA".into(),
            floor: None,
            allow_downgrade: false,
        }
    }

    #[test]
    fn version_rules() {
        let p = policy(Path::new("/nonexistent"));
        assert!(check_versions("7.2.13-mkB", None, &p).is_ok());
        assert!(matches!(
            check_versions("7.2.12", None, &p),
            Err(VerifyError::Downgrade { .. })
        ));
        let mut p2 = p.clone();
        p2.allow_downgrade = true;
        assert!(check_versions("7.2.12", None, &p2).is_ok());
        p2.floor = Some("7.2.13".into());
        let e = check_versions("7.2.12", None, &p2).unwrap_err();
        assert!(matches!(e, VerifyError::BelowFloor { .. }));
        let mut p3 = p;
        p3.running_release = "weird".into();
        assert!(matches!(
            check_versions("7.2.13", None, &p3),
            Err(VerifyError::BadRelease { .. })
        ));
    }

    #[test]
    fn sign_refuses_non_kernels_and_bad_floors() {
        let key = NodeKey::from_seed([5; 32]);
        assert!(matches!(
            sign_image(b"hello", &key, None, 0),
            Err(SignError::NotAKernel(_))
        ));
        let img = minimal_bzimage("7.2.13-mkB");
        assert!(matches!(
            sign_image(&img, &key, Some("7.3".into()), 0),
            Err(SignError::FloorAboveRelease { .. })
        ));
        assert!(matches!(
            sign_image(&img, &key, Some("x".into()), 0),
            Err(SignError::BadFloor(_))
        ));
        let sig = sign_image(&img, &key, Some("7.2.13".into()), 9).unwrap();
        assert_eq!(sig.manifest.kernel_release, "7.2.13-mkB");
        assert_eq!(
            sig.manifest.image_sha256,
            <[u8; 32]>::from(Sha256::digest(&img))
        );
    }
}
