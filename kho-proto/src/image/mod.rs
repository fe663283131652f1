//! The handover image: header, region table, payloads, manifest digest and signature.
//!
//! This is what the outgoing kernel's agent writes into KHO-preserved memory (a LUO memfd
//! on mainline, a shared region on the emulated multikernel platform) and what the incoming
//! kernel's agent reads back. Format 1.1 (and the 1.0 it extends) is specified byte for
//! byte in `docs/protocol.md` Part 1; [`layout`] is that specification as code.
//!
//! ```text
//! +--------------------+ 0
//! | header (128 B)     |  magic, version, lengths, upgrade id, release, header CRC32
//! +--------------------+ header_len
//! | region table       |  region_count x 80 B: kind, flags, offset, length, CRC32, SHA-256
//! +--------------------+ table_end
//! | payloads           |  inline payloads, 8-byte aligned, in table order, zero padding
//! +--------------------+ manifest_offset = total_len - 32 (- 100 if signed; 1.0: - 96)
//! | manifest digest    |  SHA-256 of bytes [0, table_end)
//! | [signature block]  |  signer public key (32) + ed25519 signature (64)
//! |                    |  + CRC32 of those 96 bytes (4; since 1.1)
//! +--------------------+ total_len
//! ```
//!
//! * Writing: [`ImageBuilder`].
//! * Reading: [`ImageView::parse`] (cheap: header, table and bounds, zero copy), then
//!   [`ImageView::verify`] (every region's CRC32 and SHA-256 in parallel, padding,
//!   manifest digest, signature block CRC32, signature, compatibility rule), then
//!   [`ImageView::decode`].
//! * External regions (gigabytes of workload memory in their own preserved memfds) are
//!   checked with [`verify_external`] / [`ExternalRef::verify_reader`].
//!
//! Every decoder treats the bytes as hostile: no panics, all arithmetic checked, no
//! allocation beyond one small record per table entry actually present in the input.

mod builder;
mod error;
pub mod layout;
mod view;

/// Inline payload, in bytes, from which an image's regions are hashed in parallel (rayon,
/// one region per task) when built or verified; below it, on the calling thread.
pub const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// `f` of every region, in table order: across rayon's pool (one region per task) when the
/// image holds `inline` bytes of inline payload, at least [`PARALLEL_MIN_BYTES`]; else on
/// the calling thread (a workload's spec and task state, kilobytes: waking the pool's
/// worker and then this thread costs more than the hashing, inside a workload's blackout).
fn per_region<T: Sync, R: Send>(
    regions: &[T],
    inline: usize,
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    if inline < PARALLEL_MIN_BYTES {
        regions.iter().map(f).collect()
    } else {
        regions.par_iter().with_max_len(1).map(f).collect()
    }
}

use std::fmt;
use std::io::Read;

use sha2::{Digest, Sha256};

pub use builder::ImageBuilder;
pub use error::{BuildError, FailureClass, ImageError};
pub use layout::{FORMAT_MAJOR, FORMAT_MINOR, MAGIC};
pub use view::{
    Header, ImageView, RegionData, RegionView, SignatureStatus, VerifyOptions, VerifyReport,
};

/// What a region holds. Values are the on-wire `kind` field (u16, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegionKind {
    /// 1: the agent's own manifest of the upgrade (structured).
    AgentManifest,
    /// 2: serialized device state (structured).
    DeviceState,
    /// 3: memory state: maps of workload memory, usually pointing at external regions.
    MemoryState,
    /// 4: task state (processes, threads, fds) (structured).
    TaskState,
    /// 5: an opaque workload blob (raw bytes, or external).
    WorkloadBlob,
    /// 6: the upgrade journal (structured).
    Journal,
    /// Any other value: a kind from a newer minor or a private extension. 0 is reserved
    /// and never valid on the wire.
    Unknown(u16),
}

impl RegionKind {
    /// The kind of an on-wire value (never fails: unknown values are kept).
    pub fn from_raw(raw: u16) -> Self {
        match raw {
            1 => RegionKind::AgentManifest,
            2 => RegionKind::DeviceState,
            3 => RegionKind::MemoryState,
            4 => RegionKind::TaskState,
            5 => RegionKind::WorkloadBlob,
            6 => RegionKind::Journal,
            other => RegionKind::Unknown(other),
        }
    }

    /// The on-wire value.
    pub fn raw(self) -> u16 {
        match self {
            RegionKind::AgentManifest => 1,
            RegionKind::DeviceState => 2,
            RegionKind::MemoryState => 3,
            RegionKind::TaskState => 4,
            RegionKind::WorkloadBlob => 5,
            RegionKind::Journal => 6,
            RegionKind::Unknown(v) => v,
        }
    }

    /// Whether this reader knows the kind (after normalizing `Unknown(1..=6)`).
    pub fn is_known(self) -> bool {
        !matches!(RegionKind::from_raw(self.raw()), RegionKind::Unknown(_))
    }

    /// Stable lower-case name used in messages and JSON.
    pub fn name(self) -> String {
        match RegionKind::from_raw(self.raw()) {
            RegionKind::AgentManifest => "agent-manifest".into(),
            RegionKind::DeviceState => "device-state".into(),
            RegionKind::MemoryState => "memory-state".into(),
            RegionKind::TaskState => "task-state".into(),
            RegionKind::WorkloadBlob => "workload-blob".into(),
            RegionKind::Journal => "journal".into(),
            RegionKind::Unknown(v) => format!("unknown-{v:#06x}"),
        }
    }
}

impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for RegionKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// The flags of a region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionFlags(pub u16);

impl RegionFlags {
    /// A reader that does not know the kind must refuse the image.
    pub const REQUIRED: u16 = layout::REGION_FLAG_REQUIRED;
    /// The payload is a separately preserved memfd.
    pub const EXTERNAL: u16 = layout::REGION_FLAG_EXTERNAL;

    /// Whether [`Self::REQUIRED`] is set.
    pub fn required(self) -> bool {
        self.0 & Self::REQUIRED != 0
    }

    /// Whether [`Self::EXTERNAL`] is set.
    pub fn external(self) -> bool {
        self.0 & Self::EXTERNAL != 0
    }
}

/// A region whose bytes live in a separately preserved memfd: the image names it by the
/// memfd's preservation token and pins its contents by length, CRC32 and SHA-256, so
/// gigabytes of workload memory are referenced, never copied into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalRef {
    /// The token under which the memfd was preserved (LUO token, or the emulator's id).
    pub token: u64,
    /// Length of the contents in bytes.
    pub length: u64,
    /// CRC32 of the contents.
    pub crc32: u32,
    /// SHA-256 of the contents.
    pub sha256: [u8; 32],
}

impl ExternalRef {
    /// The reference for `contents` preserved under `token` (computes CRC32 and SHA-256).
    pub fn of(token: u64, contents: &[u8]) -> Self {
        let (crc32, sha256) = digest_payload(contents);
        ExternalRef {
            token,
            length: contents.len() as u64,
            crc32,
            sha256,
        }
    }

    /// Checks contents streamed from `reader` (a memfd or file) against this reference,
    /// reading at most `length + 1` bytes with a fixed-size buffer.
    pub fn verify_reader<R: Read>(&self, reader: R) -> Result<(), ImageError> {
        let mut limited = reader.take(self.length.saturating_add(1));
        let mut crc = crc32fast::Hasher::new();
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total: u64 = 0;
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ImageError::ExternalIo {
                        token: self.token,
                        source,
                    });
                }
            };
            crc.update(&buf[..n]);
            sha.update(&buf[..n]);
            total += n as u64;
        }
        if total != self.length {
            return Err(ImageError::ExternalLength {
                token: self.token,
                expected: self.length,
                found: total,
            });
        }
        self.check(crc.finalize(), sha.finalize().into())
    }

    fn check(&self, crc32: u32, sha256: [u8; 32]) -> Result<(), ImageError> {
        if crc32 != self.crc32 {
            return Err(ImageError::ExternalCrc {
                token: self.token,
                expected: self.crc32,
                computed: crc32,
            });
        }
        if sha256 != self.sha256 {
            return Err(ImageError::ExternalDigest { token: self.token });
        }
        Ok(())
    }
}

/// Checks an external region's contents (e.g. an mmap of its memfd) against its reference.
pub fn verify_external(reference: &ExternalRef, contents: &[u8]) -> Result<(), ImageError> {
    if contents.len() as u64 != reference.length {
        return Err(ImageError::ExternalLength {
            token: reference.token,
            expected: reference.length,
            found: contents.len() as u64,
        });
    }
    let (crc32, sha256) = digest_payload(contents);
    reference.check(crc32, sha256)
}

/// Chunk size for the interleaved CRC32/SHA-256 pass: small enough that the second pass
/// over each chunk hits the L2 cache.
const CHUNK: usize = 256 * 1024;

/// CRC32 and SHA-256 of `payload` in one pass over memory (chunk by chunk).
///
/// SHA-256 uses `sha2`, which selects the x86 SHA extensions (SHA-NI) at run time when the
/// CPU has them; CRC32 uses `crc32fast`, which selects PCLMULQDQ folding when present.
pub fn digest_payload(payload: &[u8]) -> (u32, [u8; 32]) {
    let mut crc = crc32fast::Hasher::new();
    let mut sha = Sha256::new();
    for chunk in payload.chunks(CHUNK) {
        crc.update(chunk);
        sha.update(chunk);
    }
    (crc.finalize(), sha.finalize().into())
}

/// The message an image signature is over: [`layout::SIGNING_CONTEXT`] || manifest digest.
pub fn signing_message(manifest_digest: &[u8; 32]) -> [u8; 56] {
    let mut m = [0u8; 56];
    m[..24].copy_from_slice(layout::SIGNING_CONTEXT);
    m[24..].copy_from_slice(manifest_digest);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_normalize() {
        for raw in 0..=10u16 {
            assert_eq!(RegionKind::from_raw(raw).raw(), raw);
        }
        assert!(RegionKind::Unknown(3).is_known());
        assert_eq!(RegionKind::Unknown(3).name(), "memory-state");
        assert!(!RegionKind::Unknown(0x100).is_known());
        assert_eq!(RegionKind::Unknown(0x100).to_string(), "unknown-0x0100");
    }

    #[test]
    fn external_reference_checks_contents() {
        let data = vec![7u8; CHUNK * 2 + 5];
        let r = ExternalRef::of(42, &data);
        verify_external(&r, &data).unwrap();
        r.verify_reader(&data[..]).unwrap();
        let mut bad = data.clone();
        bad[CHUNK + 1] ^= 1;
        assert!(matches!(
            verify_external(&r, &bad),
            Err(ImageError::ExternalCrc { token: 42, .. })
        ));
        assert!(matches!(
            r.verify_reader(&bad[..]),
            Err(ImageError::ExternalCrc { token: 42, .. })
        ));
        assert!(matches!(
            verify_external(&r, &data[1..]),
            Err(ImageError::ExternalLength { found, .. }) if found == data.len() as u64 - 1
        ));
        let mut longer = data.clone();
        longer.push(0);
        assert!(matches!(
            r.verify_reader(&longer[..]),
            Err(ImageError::ExternalLength { .. })
        ));
        // Same CRC, different SHA-256: forge the CRC field to isolate the digest check.
        let mut forged = ExternalRef::of(42, &bad);
        forged.crc32 = r.crc32;
        forged.sha256 = r.sha256;
        assert!(verify_external(&forged, &bad).is_err());
        let mut only_sha = r;
        only_sha.sha256[0] ^= 1;
        assert!(matches!(
            verify_external(&only_sha, &data),
            Err(ImageError::ExternalDigest { token: 42 })
        ));
    }

    #[test]
    fn external_read_errors_are_io() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("device gone"))
            }
        }
        let e = ExternalRef::of(9, b"x").verify_reader(Failing).unwrap_err();
        assert!(matches!(e, ImageError::ExternalIo { token: 9, .. }));
        assert_eq!(e.class(), FailureClass::Io);
        assert!(e.to_string().contains("device gone"), "{e}");
    }

    #[test]
    fn signing_message_is_domain_separated() {
        let m = signing_message(&[0xab; 32]);
        assert_eq!(&m[..24], b"mk-upgrade kho image v1\0");
        assert_eq!(&m[24..], &[0xab; 32]);
    }
}
