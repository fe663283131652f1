//! Helpers shared by the image tests (`#[path]`-included; this target has no tests).
#![allow(dead_code)]

use kho_proto::image::layout::{
    DIGEST_LEN, HEADER_CRC_COVERAGE, HEADER_FLAG_SIGNED, SIGNATURE_BLOCK_LEN,
    has_signature_block_crc, trailer_len,
};
use kho_proto::image::{ExternalRef, ImageBuilder, RegionKind, signing_message};
use kho_proto::keys::{NodeKey, TrustedKeys};
use sha2::{Digest, Sha256};

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// After editing header or table bytes, recomputes the header CRC32, the manifest digest,
/// (with `key`) the signature, and (minor 1 or later) the signature block's CRC32, so that
/// a test reaches the check after them. Reads the layout fields from the (edited) bytes
/// themselves, like an attacker would write them.
pub fn reseal(b: &mut [u8], key: Option<&NodeKey>) {
    let crc = crc32fast::hash(&b[..HEADER_CRC_COVERAGE]);
    put32(b, HEADER_CRC_COVERAGE, crc);
    let minor = le16(b, 10);
    let signed = le32(b, 12) & HEADER_FLAG_SIGNED != 0;
    let header_len = le32(b, 16) as usize;
    let count = le32(b, 20) as usize;
    let entry_len = le16(b, 120) as usize;
    let table_end = header_len + count * entry_len;
    // An input too short for its trailer cannot be sealed beyond the header CRC; the reader
    // refuses it as truncated.
    let Some(manifest) = b.len().checked_sub(trailer_len(minor, signed)) else {
        return;
    };
    // Edits that make the table overrun the input cannot be sealed; the reader refuses
    // them before it looks at the digest.
    let digest: [u8; 32] = Sha256::digest(&b[..table_end.min(manifest)]).into();
    b[manifest..manifest + DIGEST_LEN].copy_from_slice(&digest);
    let at = manifest + DIGEST_LEN;
    if let (true, Some(key)) = (signed, key) {
        b[at..at + 32].copy_from_slice(&key.public());
        b[at + 32..at + 96].copy_from_slice(&key.sign(&signing_message(&digest)));
    }
    if signed && has_signature_block_crc(minor) {
        reseal_signature_block_crc(b);
    }
}

/// Offset of the signature block (signer public key) of a signed image, placed by the
/// minor in its header.
pub fn signature_block_at(b: &[u8]) -> usize {
    b.len() - trailer_len(le16(b, 10), true) + DIGEST_LEN
}

/// Recomputes the CRC32 at the end of a signed 1.1+ image's signature block.
pub fn reseal_signature_block_crc(b: &mut [u8]) {
    let at = signature_block_at(b);
    let crc = crc32fast::hash(&b[at..at + SIGNATURE_BLOCK_LEN]);
    put32(b, at + SIGNATURE_BLOCK_LEN, crc);
}

pub fn test_key() -> NodeKey {
    NodeKey::from_seed([0x42; 32])
}

pub fn trusted(key: &NodeKey) -> TrustedKeys {
    let mut t = TrustedKeys::default();
    t.add(key.public(), "test.pub".into()).unwrap();
    t
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub target_release: String,
    pub workloads: Vec<String>,
    pub deadline_ms: u64,
}

pub fn manifest() -> Manifest {
    Manifest {
        target_release: "6.19.0-mk".into(),
        workloads: vec!["kv-0".into(), "kv-1".into()],
        deadline_ms: 30_000,
    }
}

pub const EXTERNAL_CONTENTS: &[u8] = b"workload memory, preserved in its own memfd";

/// A small image with three regions: structured manifest (required), a 3-byte blob (so
/// there is padding) and an external memory region.
pub fn small_builder() -> ImageBuilder<'static> {
    let mut b = ImageBuilder::new("6.12.0-mk-old", [0x11; 16], 3).unwrap();
    b.structured(RegionKind::AgentManifest, 0, 1, true, &manifest())
        .unwrap()
        .region(RegionKind::WorkloadBlob, 7, 2, false, &b"abc"[..])
        .unwrap()
        .external(
            RegionKind::MemoryState,
            1,
            1,
            true,
            ExternalRef::of(0xfeed, EXTERNAL_CONTENTS),
        )
        .unwrap();
    b
}

/// Offset of region table entry `i` in a 1.0 image.
pub fn entry(i: usize) -> usize {
    128 + i * 80
}
