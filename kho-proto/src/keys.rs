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

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Largest key file accepted (64 hex digits, a newline, and slack for CRLF).
const MAX_KEY_FILE: u64 = 128;

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

fn read_hex32(path: &Path) -> Result<[u8; 32], KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    if !meta.is_file() || meta.len() > MAX_KEY_FILE {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
        });
    }
    let text = fs::read_to_string(path).map_err(io)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim_end_matches(['\n', '\r']), &mut out).map_err(|_| {
        KeyError::Malformed {
            path: path.to_owned(),
        }
    })?;
    Ok(out)
}

/// A set of trusted ed25519 public keys.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, VerifyingKey, PathBuf)>,
}

impl TrustedKeys {
    /// Loads every `*.pub` file of `dir`. A malformed `.pub` file is an error (a typo in a
    /// trust store must not silently drop a key); an empty directory is an error too.
    pub fn load_dir(dir: &Path) -> Result<Self, KeyError> {
        let entries = fs::read_dir(dir).map_err(|source| KeyError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| KeyError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pub") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut keys = TrustedKeys::default();
        for path in paths {
            let public = read_hex32(&path)?;
            keys.add(public, path)?;
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

    /// Loads a `NAME.key` file.
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
