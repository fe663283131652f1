//! Signed kernel image manifests and the `IMAGE.sig` file.
//!
//! A manifest names one image by SHA-256 and states its kernel release, an optional version
//! floor (after accepting the image a host refuses anything numerically below the floor:
//! anti-rollback) and its creation time. The signature is ed25519 over a deterministic,
//! domain-separated encoding, [`ImageManifest::signed_bytes`]:
//! `"mk-upgrade image manifest v1\0" || postcard((format, image_sha256, kernel_release,
//! version_floor, created_at))` — never over JSON, whose re-serialization is not canonical.
//!
//! `IMAGE.sig` is JSON so that people can read it:
//! ```json
//! { "format": "mk-upgrade-image-signature/1",
//!   "manifest": { "format": "mk-upgrade-image-manifest/1", "image_sha256": "<64 hex>",
//!                 "kernel_release": "7.2.13-mkB", "version_floor": null, "created_at": 1795438560 },
//!   "signer_public_key": "<64 hex>", "signature": "<128 hex>" }
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use kho_proto::keys::{KeyError, KeyId, NodeKey, PUBLIC_KEY_LEN, SIGNATURE_LEN, TrustedKeys};
use serde::{Deserialize, Serialize};

use rollback::{Release, ReleaseError};

/// Format tag of a manifest.
pub const MANIFEST_FORMAT: &str = "mk-upgrade-image-manifest/1";
/// Format tag of a signature file.
pub const SIGNATURE_FORMAT: &str = "mk-upgrade-image-signature/1";
/// Domain separator prefixed to the signed bytes.
pub const SIGNING_DOMAIN: &[u8] = b"mk-upgrade image manifest v1\0";
/// Largest signature file read (a real one is about 500 bytes).
pub const MAX_SIG_FILE: u64 = 64 << 10;

/// Why a signature file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SigFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not an mk-upgrade image signature file: {reason}; sign the image again with `mk-upgrade sign`"
    )]
    Malformed {
        path: PathBuf,
        #[source]
        reason: MalformedSig,
    },
    /// A FIFO, a device, a socket or a directory: refused before it is opened (a FIFO
    /// would block the read until some writer appeared, a device might never end).
    #[error(
        "cannot use {path} as the image signature file: it is {kind}, not a regular file; save the signature to a file first"
    )]
    NotARegularFile { path: PathBuf, kind: &'static str },
}

/// What is wrong with a signature file that is not a valid `IMAGE.sig`.
#[derive(Debug, thiserror::Error)]
pub enum MalformedSig {
    /// Not JSON, or not the expected fields.
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// The file's format tag (first 80 characters) is not [`SIGNATURE_FORMAT`].
    #[error("format {0:?} is not {SIGNATURE_FORMAT:?}")]
    Format(String),
    /// The manifest's format tag (first 80 characters) is not [`MANIFEST_FORMAT`].
    #[error("manifest format {0:?} is not {MANIFEST_FORMAT:?}")]
    ManifestFormat(String),
    /// A release field of the manifest does not parse.
    #[error("{field}: {source}")]
    Release {
        /// `kernel_release` or `version_floor`.
        field: &'static str,
        #[source]
        source: ReleaseError,
    },
    /// The file is larger than [`MAX_SIG_FILE`] (refused by its size before it is opened,
    /// or when it grew past the cap while read).
    #[error("larger than {MAX_SIG_FILE} bytes")]
    TooLarge,
}

/// What a signer vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// SHA-256 of the whole image file.
    #[serde(with = "hex_array")]
    pub image_sha256: [u8; 32],
    /// The release in the image's setup header.
    pub kernel_release: String,
    /// Anti-rollback floor to raise once this image is accepted.
    pub version_floor: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

impl ImageManifest {
    /// A manifest in the current format.
    pub fn new(
        image_sha256: [u8; 32],
        kernel_release: String,
        version_floor: Option<String>,
        created_at: u64,
    ) -> Self {
        ImageManifest {
            format: MANIFEST_FORMAT.to_owned(),
            image_sha256,
            kernel_release,
            version_floor,
            created_at,
        }
    }

    /// The exact bytes signed: domain separator, then the postcard encoding of the fields
    /// in declaration order.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let fields = (
            self.format.as_str(),
            self.image_sha256,
            self.kernel_release.as_str(),
            self.version_floor.as_deref(),
            self.created_at,
        );
        let mut out = SIGNING_DOMAIN.to_vec();
        out.extend(postcard::to_allocvec(&fields).expect("postcard encodes plain tuples"));
        out
    }

    fn validate(&self) -> Result<(), MalformedSig> {
        if self.format != MANIFEST_FORMAT {
            return Err(MalformedSig::ManifestFormat(
                self.format.chars().take(80).collect(),
            ));
        }
        let release = |field, s: &str| {
            Release::parse(s)
                .map(drop)
                .map_err(|source| MalformedSig::Release { field, source })
        };
        release("kernel_release", &self.kernel_release)?;
        if let Some(f) = &self.version_floor {
            release("version_floor", f)?;
        }
        Ok(())
    }
}

/// The content of an `IMAGE.sig` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always [`SIGNATURE_FORMAT`].
    pub format: String,
    /// What was signed.
    pub manifest: ImageManifest,
    /// The signer's ed25519 public key.
    #[serde(with = "hex_array")]
    pub signer_public_key: [u8; PUBLIC_KEY_LEN],
    /// ed25519 signature over [`ImageManifest::signed_bytes`].
    #[serde(with = "hex_array")]
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignatureFile {
    /// Signs `manifest` with `key`.
    pub fn sign(manifest: ImageManifest, key: &NodeKey) -> Self {
        let signature = key.sign(&manifest.signed_bytes());
        SignatureFile {
            format: SIGNATURE_FORMAT.to_owned(),
            manifest,
            signer_public_key: key.public(),
            signature,
        }
    }

    /// The signer's key id.
    pub fn signer(&self) -> KeyId {
        KeyId::of(&self.signer_public_key)
    }

    /// Verifies the signature against `trusted`; returns the signer's id.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<KeyId, KeyError> {
        trusted.verify(
            &self.signer_public_key,
            &self.manifest.signed_bytes(),
            &self.signature,
        )
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("signature file serializes");
        v.push(b'\n');
        v
    }

    /// Parses and validates JSON bytes (formats, release syntax); `path` is for messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SigFileError> {
        let malformed = |reason: MalformedSig| SigFileError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let sig: SignatureFile =
            serde_json::from_slice(bytes).map_err(|e| malformed(MalformedSig::Json(e)))?;
        if sig.format != SIGNATURE_FORMAT {
            return Err(malformed(MalformedSig::Format(
                sig.format.chars().take(80).collect(),
            )));
        }
        sig.manifest.validate().map_err(malformed)?;
        Ok(sig)
    }

    /// Reads `path`; `Ok(None)` if it does not exist. Only a regular file of at most
    /// [`MAX_SIG_FILE`] bytes is read: anything else is refused before it is opened
    /// ([`super::open_regular`]), so a FIFO never blocks verification.
    pub fn read(path: &Path) -> Result<Option<Self>, SigFileError> {
        use super::OpenRefusal;
        let io = |source| SigFileError::Io {
            path: path.to_owned(),
            source,
        };
        let too_large = || SigFileError::Malformed {
            path: path.to_owned(),
            reason: MalformedSig::TooLarge,
        };
        let (f, len) = match super::open_regular(path, MAX_SIG_FILE) {
            Ok(f) => f,
            Err(OpenRefusal::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(OpenRefusal::Io(e)) => return Err(io(e)),
            Err(OpenRefusal::Kind(kind)) => {
                return Err(SigFileError::NotARegularFile {
                    path: path.to_owned(),
                    kind,
                });
            }
            Err(OpenRefusal::TooLarge { .. }) => return Err(too_large()),
        };
        // Sized from the file, which is at most the cap.
        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        f.take(MAX_SIG_FILE + 1).read_to_end(&mut buf).map_err(io)?;
        if buf.len() as u64 > MAX_SIG_FILE {
            return Err(too_large());
        }
        Self::parse(path, &buf).map(Some)
    }
}

/// Serde for byte arrays as lowercase hex strings.
mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(s.as_bytes(), &mut out)
            .map_err(|e| serde::de::Error::custom(format!("expected {} hex digits: {e}", 2 * N)))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ImageManifest {
        ImageManifest::new(
            [0xAB; 32],
            "7.2.13-mkB".into(),
            Some("7.2.0".into()),
            1_795_438_560,
        )
    }

    #[test]
    fn signed_bytes_are_deterministic_and_domain_separated() {
        let m = manifest();
        let b = m.signed_bytes();
        assert!(b.starts_with(SIGNING_DOMAIN));
        assert_eq!(b, m.clone().signed_bytes());
        // Every field is covered.
        let mut m2 = m.clone();
        m2.created_at += 1;
        assert_ne!(m2.signed_bytes(), b);
        let mut m2 = m.clone();
        m2.version_floor = None;
        assert_ne!(m2.signed_bytes(), b);
        let mut m2 = m;
        m2.image_sha256[31] ^= 1;
        assert_ne!(m2.signed_bytes(), b);
    }

    #[test]
    fn json_roundtrip_and_verify() {
        let key = NodeKey::from_seed([3; 32]);
        let sig = SignatureFile::sign(manifest(), &key);
        let json = sig.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(&"ab".repeat(32)) && text.contains("7.2.13-mkB"));
        let back = SignatureFile::parse(Path::new("x.sig"), &json).unwrap();
        assert_eq!(back, sig);
        let mut trusted = TrustedKeys::default();
        trusted.add(key.public(), "k.pub".into()).unwrap();
        assert_eq!(back.verify(&trusted).unwrap(), key.key_id());
        // Editing the JSON manifest breaks the signature.
        let edited = text.replace("7.2.13-mkB", "7.2.14-mkB");
        let edited = SignatureFile::parse(Path::new("x.sig"), edited.as_bytes()).unwrap();
        assert!(matches!(
            edited.verify(&trusted),
            Err(KeyError::BadSignature { .. })
        ));
    }

    #[test]
    fn malformed_files_are_refused() {
        let p = Path::new("img.sig");
        for bad in [
            &b""[..],
            b"{}",
            b"not json",
            br#"{"format":"mk-upgrade-image-signature/1"}"#,
        ] {
            assert!(matches!(
                SignatureFile::parse(p, bad),
                Err(SigFileError::Malformed { .. })
            ));
        }
        let key = NodeKey::from_seed([3; 32]);
        let mut sig = SignatureFile::sign(manifest(), &key);
        sig.manifest.format = "mk-upgrade-image-manifest/2".into();
        let e = SignatureFile::parse(p, &sig.to_json()).unwrap_err();
        assert!(e.to_string().contains("manifest format"), "{e}");
        assert!(
            matches!(
                e,
                SigFileError::Malformed {
                    reason: MalformedSig::ManifestFormat(_),
                    ..
                }
            ),
            "{e}"
        );
        let mut sig = SignatureFile::sign(manifest(), &key);
        sig.manifest.kernel_release = "garbage".into();
        let e = SignatureFile::parse(p, &sig.to_json()).unwrap_err();
        assert!(
            matches!(
                e,
                SigFileError::Malformed {
                    reason: MalformedSig::Release {
                        field: "kernel_release",
                        ..
                    },
                    ..
                }
            ),
            "{e}"
        );
        // The chain reaches the release parser's own error.
        let source = std::error::Error::source(&e).and_then(std::error::Error::source);
        assert!(matches!(source, Some(s) if s.is::<ReleaseError>()), "{e}");
        let text = String::from_utf8(SignatureFile::sign(manifest(), &key).to_json()).unwrap();
        let short = text.replace(&"ab".repeat(32), "abab");
        assert!(SignatureFile::parse(p, short.as_bytes()).is_err());
    }
}
