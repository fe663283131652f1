//! ed25519 node keys and the trusted-keys directory.
//!
//! One key format serves both signatures mk-upgrade checks: the handover image's manifest
//! signature (see [`crate::image`]) and the signed manifest of a kernel image.
//!
//! * A **public key file** `NAME.pub` holds the 32-byte ed25519 public key as 64 hex digits,
//!   optionally followed by a newline. A trusted-keys directory is a directory of such files;
//!   other files in it are ignored.
//! * A **secret key file** `NAME.key` holds the 32-byte ed25519 seed the same way, and is
//!   created with mode 0600. It never needs to be on the upgraded host, only where images are
//!   signed (and, for image manifests, on the node that writes them).
//! * A **key id** is the first 8 bytes of SHA-256 over the public key, printed as 16 hex
//!   digits: short enough for messages, long enough to tell keys apart.
//!
//! Key files are checked like sshd's `StrictModes` before a byte of them is believed: a key
//! file (public or secret) must be a regular file reached without a symbolic link, owned by
//! root or the running user, writable by neither its group nor others, in a directory with
//! the same owner and write rules (the directory of a single key file; the trusted-keys
//! directory itself, which may be reached through a symbolic link). Anyone who could change
//! a trusted key could otherwise make their own signatures trusted. A refusal is a typed
//! [`KeyError::InsecureKeyFile`] or [`KeyError::InsecureKeyDir`] naming the path and the
//! `chmod`/`chown` that fixes it.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Largest key file accepted (64 hex digits, a newline, and slack for CRLF).
const MAX_KEY_FILE: u64 = 128;
/// Most `*.pub` files a trusted-keys directory may hold (more is refused, not truncated).
pub const MAX_TRUSTED_KEYS: usize = 1024;

/// Why a key file, or the directory holding it, cannot be trusted (sshd `StrictModes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insecure {
    /// The key file is a symbolic link: its contents are wherever the link points.
    Symlink,
    /// Writable by its group (`mode` is the permission bits).
    GroupWritable { mode: u32 },
    /// Writable by every user.
    WorldWritable { mode: u32 },
    /// Owned by `uid`, which is neither root nor the running user (`euid`).
    Owner { uid: u32, euid: u32 },
}

impl fmt::Display for Insecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Insecure::Symlink => f.write_str("is a symbolic link"),
            Insecure::GroupWritable { mode } => {
                write!(f, "is writable by its group (mode {mode:04o})")
            }
            Insecure::WorldWritable { mode } => {
                write!(f, "is writable by everyone (mode {mode:04o})")
            }
            Insecure::Owner { uid, euid } => write!(
                f,
                "is owned by uid {uid}, which is neither root nor the running user (uid {euid})"
            ),
        }
    }
}

impl Insecure {
    /// The command that fixes `problem` for `path`.
    fn fix(self, path: &Path) -> String {
        let p = path.display();
        match self {
            Insecure::Symlink => format!(
                "replace the link with a regular file holding the key: cp --remove-destination \"$(readlink -f {p})\" {p}"
            ),
            Insecure::GroupWritable { .. } | Insecure::WorldWritable { .. } => {
                format!("chmod go-w {p}")
            }
            Insecure::Owner { euid: 0, .. } => format!("chown root {p}"),
            Insecure::Owner { euid, .. } => format!("chown root {p} (or chown {euid} {p})"),
        }
    }

    /// The first rule `meta` (of a file or directory) breaks, for a process running as
    /// `euid`: owner, then write permission for others, then for the group.
    fn of(meta: &fs::Metadata, euid: u32) -> Option<Insecure> {
        let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
        if uid != 0 && uid != euid {
            Some(Insecure::Owner { uid, euid })
        } else if mode & 0o002 != 0 {
            Some(Insecure::WorldWritable { mode })
        } else if mode & 0o020 != 0 {
            Some(Insecure::GroupWritable { mode })
        } else {
            None
        }
    }
}

/// Why a key could not be loaded or a signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a key file (expected 64 hex digits, one ed25519 key)")]
    Malformed { path: PathBuf },
    #[error("{path}: not a valid ed25519 public key")]
    InvalidPublicKey { path: PathBuf },
    #[error("no trusted keys in {dir} (put the signer's NAME.pub files there)")]
    NoTrustedKeys { dir: PathBuf },
    #[error(
        "{path}: key file {problem}, so it cannot be trusted (anyone who can change it can make their own signatures trusted); fix: {fix}"
    )]
    InsecureKeyFile {
        path: PathBuf,
        problem: Insecure,
        /// The command that fixes it.
        fix: String,
    },
    #[error(
        "{dir}: the directory holding key files {problem}, so its keys cannot be trusted (anyone who can write it can replace them); fix: {fix}"
    )]
    InsecureKeyDir {
        dir: PathBuf,
        problem: Insecure,
        /// The command that fixes it.
        fix: String,
    },
    #[error("{dir} holds more than {max} *.pub files; refusing to read them all")]
    TooManyKeys { dir: PathBuf, max: usize },
    #[error("signed by key {key_id}, which is not among the trusted keys")]
    Untrusted { key_id: KeyId },
    #[error(
        "signature by key {key_id} does not verify: the signed bytes were changed or the signature is not of them"
    )]
    BadSignature { key_id: KeyId },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("cannot gather randomness for a new key: {0}")]
    Random(String),
}

/// Short identifier of a public key: the first 8 bytes of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of a public key.
    pub fn of(public: &[u8; PUBLIC_KEY_LEN]) -> Self {
        let digest = Sha256::digest(public);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A directory of key files, opened once and checked (owner, write permissions): every
/// key file is then opened relative to this descriptor, so the directory checked is the
/// directory read even if its path is renamed or relinked meanwhile.
struct KeyDir {
    dir: fs::File,
    path: PathBuf,
    euid: u32,
}

impl KeyDir {
    /// Opens `path` (following a symbolic link to the directory itself) and checks it.
    /// `O_NONBLOCK`: a FIFO at `path` is refused (not a directory) instead of waited on.
    fn open(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        let meta = dir.metadata().map_err(io)?;
        let euid = nix::unistd::geteuid().as_raw();
        if let Some(problem) = Insecure::of(&meta, euid) {
            return Err(KeyError::InsecureKeyDir {
                dir: path.to_owned(),
                problem,
                fix: problem.fix(path),
            });
        }
        Ok(KeyDir {
            dir,
            path: path.to_owned(),
            euid,
        })
    }

    /// The names in the directory ending in `.pub` (at most [`MAX_TRUSTED_KEYS`]), sorted.
    fn public_key_names(&self) -> Result<Vec<OsString>, KeyError> {
        let io = |source: std::io::Error| KeyError::Io {
            path: self.path.clone(),
            source,
        };
        let fd = self.dir.try_clone().map_err(io)?;
        let mut listing = nix::dir::Dir::from_fd(fd.into()).map_err(|e| io(e.into()))?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(|e| io(e.into()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if Path::new(name).extension().is_some_and(|e| e == "pub") {
                if names.len() == MAX_TRUSTED_KEYS {
                    return Err(KeyError::TooManyKeys {
                        dir: self.path.clone(),
                        max: MAX_TRUSTED_KEYS,
                    });
                }
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads the key file `name` of this directory: 32 bytes as 64 hex digits. Refuses a
    /// symbolic link (`O_NOFOLLOW`), anything but a regular file of at most
    /// [`MAX_KEY_FILE`] bytes (`O_NONBLOCK`: a FIFO is refused, not waited on), and a file
    /// with the wrong owner or writable by group or others.
    fn read_key(&self, name: &OsStr) -> Result<[u8; 32], KeyError> {
        let path = self.path.join(name);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let malformed = || KeyError::Malformed { path: path.clone() };
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY;
        let fd = match nix::fcntl::openat(&self.dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // With O_NOFOLLOW, ELOOP on the last (here: only) component means a symlink.
            Err(nix::errno::Errno::ELOOP) => {
                return Err(KeyError::InsecureKeyFile {
                    fix: Insecure::Symlink.fix(&path),
                    path,
                    problem: Insecure::Symlink,
                });
            }
            Err(e) => return Err(io(e.into())),
        };
        let file = fs::File::from(fd);
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() || meta.len() > MAX_KEY_FILE {
            return Err(malformed());
        }
        if let Some(problem) = Insecure::of(&meta, self.euid) {
            return Err(KeyError::InsecureKeyFile {
                fix: problem.fix(&path),
                path,
                problem,
            });
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    malformed()
                } else {
                    io(e)
                }
            })?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim_end_matches(['\n', '\r']), &mut out)
            .map_err(|_| malformed())?;
        Ok(out)
    }
}

/// Reads one key file at `path`, checking it and its directory (see [`KeyDir::read_key`]).
fn read_hex32(path: &Path) -> Result<[u8; 32], KeyError> {
    let name = path.file_name().ok_or_else(|| KeyError::Malformed {
        path: path.to_owned(),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let key_dir = KeyDir::open(dir)?;
    key_dir.read_key(name).map_err(|e| match e {
        // Name the file as the caller gave it.
        KeyError::InsecureKeyFile { problem, .. } => KeyError::InsecureKeyFile {
            path: path.to_owned(),
            problem,
            fix: problem.fix(path),
        },
        KeyError::Malformed { .. } => KeyError::Malformed {
            path: path.to_owned(),
        },
        KeyError::Io { source, .. } => KeyError::Io {
            path: path.to_owned(),
            source,
        },
        other => other,
    })
}

/// A set of trusted ed25519 public keys.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, VerifyingKey, PathBuf)>,
}

impl TrustedKeys {
    /// Loads every `*.pub` file of `dir` (at most [`MAX_TRUSTED_KEYS`]). A malformed
    /// `.pub` file is an error (a typo in a trust store must not silently drop a key); an
    /// empty directory is an error too; so is a directory or key file that others could
    /// change (see the module documentation: [`KeyError::InsecureKeyDir`],
    /// [`KeyError::InsecureKeyFile`]).
    pub fn load_dir(dir: &Path) -> Result<Self, KeyError> {
        let key_dir = KeyDir::open(dir)?;
        let mut keys = TrustedKeys::default();
        for name in key_dir.public_key_names()? {
            let public = key_dir.read_key(&name)?;
            keys.add(public, dir.join(name))?;
        }
        if keys.is_empty() {
            return Err(KeyError::NoTrustedKeys {
                dir: dir.to_owned(),
            });
        }
        Ok(keys)
    }

    /// Adds one public key; `origin` is where it came from, for messages.
    pub fn add(&mut self, public: [u8; PUBLIC_KEY_LEN], origin: PathBuf) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&public).map_err(|_| KeyError::InvalidPublicKey {
            path: origin.clone(),
        })?;
        let id = KeyId::of(&public);
        if !self.keys.iter().any(|(k, _, _)| *k == id) {
            self.keys.push((id, key, origin));
        }
        Ok(())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the trusted keys.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _, _)| *id)
    }

    /// Verifies `signature` over `message` by `public`, which must be trusted.
    /// Uses ed25519 strict verification (no malleable or small-order keys).
    pub fn verify(
        &self,
        public: &[u8; PUBLIC_KEY_LEN],
        message: &[u8],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<KeyId, KeyError> {
        let key_id = KeyId::of(public);
        let Some((_, key, _)) = self
            .keys
            .iter()
            .find(|(id, k, _)| *id == key_id && k.as_bytes() == public)
        else {
            return Err(KeyError::Untrusted { key_id });
        };
        key.verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| KeyError::BadSignature { key_id })?;
        Ok(key_id)
    }
}

/// An ed25519 signing key (a node key or a release-signing key).
pub struct NodeKey {
    key: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// A key from its 32-byte seed (deterministic; tests and golden vectors use this).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        NodeKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Loads a `NAME.key` file. The file and its directory are checked like trusted keys
    /// (see the module documentation).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Ok(Self::from_seed(read_hex32(path)?))
    }

    /// Writes `dir/NAME.key` (mode 0600) and `dir/NAME.pub`; refuses to overwrite either.
    /// Returns the two paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), KeyError> {
        let secret_path = dir.join(format!("{name}.key"));
        let public_path = dir.join(format!("{name}.pub"));
        for p in [&secret_path, &public_path] {
            if p.exists() {
                return Err(KeyError::Exists { path: p.clone() });
            }
        }
        let write = |path: &Path, mode: u32, bytes: &[u8]| -> Result<(), KeyError> {
            let io = |source| KeyError::Io {
                path: path.to_owned(),
                source,
            };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        KeyError::Exists {
                            path: path.to_owned(),
                        }
                    } else {
                        io(e)
                    }
                })?;
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)
        };
        write(
            &secret_path,
            0o600,
            format!("{}\n", hex::encode(self.key.to_bytes())).as_bytes(),
        )?;
        write(
            &public_path,
            0o644,
            format!("{}\n", hex::encode(self.public())).as_bytes(),
        )?;
        Ok((secret_path, public_path))
    }

    /// The public half.
    pub fn public(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.key.verifying_key().to_bytes()
    }

    /// The key id of the public half.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.public())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(message).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::generate().unwrap();
        let (sk, pk) = key.save(dir.path(), "release").unwrap();
        assert!(matches!(
            key.save(dir.path(), "release"),
            Err(KeyError::Exists { .. })
        ));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let loaded = NodeKey::load(&sk).unwrap();
        assert_eq!(loaded.public(), key.public());

        let trusted = TrustedKeys::load_dir(dir.path()).unwrap();
        assert_eq!(trusted.len(), 1);
        let sig = key.sign(b"hello");
        assert_eq!(
            trusted.verify(&key.public(), b"hello", &sig).unwrap(),
            key.key_id()
        );
        assert!(matches!(
            trusted.verify(&key.public(), b"hellp", &sig),
            Err(KeyError::BadSignature { .. })
        ));
        let other = NodeKey::from_seed([7; 32]);
        let e = trusted
            .verify(&other.public(), b"hello", &other.sign(b"hello"))
            .unwrap_err();
        assert!(matches!(e, KeyError::Untrusted { key_id } if key_id == other.key_id()));
        assert!(e.to_string().contains(&other.key_id().to_string()));
        drop(pk);
    }

    #[test]
    fn trust_store_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TrustedKeys::load_dir(dir.path()),
            Err(KeyError::NoTrustedKeys { .. })
        ));
        fs::write(dir.path().join("README"), "ignored").unwrap();
        fs::write(dir.path().join("bad.pub"), "not hex").unwrap();
        let e = TrustedKeys::load_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&e, KeyError::Malformed { path } if path.ends_with("bad.pub")),
            "{e}"
        );
        fs::write(dir.path().join("bad.pub"), "00".repeat(200)).unwrap();
        assert!(matches!(
            TrustedKeys::load_dir(dir.path()),
            Err(KeyError::Malformed { .. })
        ));
        assert!(matches!(
            TrustedKeys::load_dir(&dir.path().join("missing")),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn key_id_is_stable() {
        let key = NodeKey::from_seed([1; 32]);
        assert_eq!(key.key_id().to_string().len(), 16);
        assert_eq!(key.key_id(), KeyId::of(&key.public()));
    }
}
