//! The on-media layout of format 1.1: fixed-size records of typed little-endian fields.
//!
//! These structs are the byte-level specification of `docs/protocol.md` §1.3–§1.4 written
//! as code. Every multi-byte integer is a `zerocopy` little-endian wrapper (`U16`, `U32`,
//! `U64`): the structs have alignment 1, no padding and no native-endian field, so they are
//! read in place from an untrusted `&[u8]` (zero copy) and written with `as_bytes()` — never
//! by transmuting a native struct. The compile-time assertions below pin every size.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The 8 magic bytes that open every image: ASCII `MKKHOIMG`.
pub const MAGIC: [u8; 8] = *b"MKKHOIMG";
/// Format major version written and accepted by this implementation.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version written by this implementation (readers accept any minor of
/// [`FORMAT_MAJOR`]). 1.1 added the signature block's CRC32 ([`SIGNATURE_BLOCK_CRC_MINOR`]).
pub const FORMAT_MINOR: u16 = 1;
/// Size of the 1.0 and 1.1 header in bytes (`header_len` of such an image).
pub const HEADER_LEN: usize = 128;
/// Size of a 1.0 and 1.1 region table entry in bytes (`entry_len` of such an image).
pub const ENTRY_LEN: usize = 80;
/// Bytes of the header covered by `header_crc32` (everything before the CRC field).
pub const HEADER_CRC_COVERAGE: usize = 124;
/// Size of the producer kernel release field (NUL-padded UTF-8).
pub const RELEASE_LEN: usize = 64;
/// Size of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;
/// Size of the signed part of the signature block: signer public key (32) + ed25519
/// signature (64). This is the whole block in format 1.0; from 1.1 on a CRC32 of these 96
/// bytes follows them ([`signature_block_len`]).
pub const SIGNATURE_BLOCK_LEN: usize = 96;
/// Size of the signature block's CRC32 field (format 1.1 and later).
pub const SIGNATURE_BLOCK_CRC_LEN: usize = 4;
/// The first minor whose signature block ends with a CRC32 of its first 96 bytes. Every
/// later minor of major 1 keeps it.
pub const SIGNATURE_BLOCK_CRC_MINOR: u16 = 1;

/// Whether a signed image of `minor` carries the signature block CRC32.
pub const fn has_signature_block_crc(minor: u16) -> bool {
    minor >= SIGNATURE_BLOCK_CRC_MINOR
}

/// Length of the signature block of a signed image of `minor`: 96 bytes in 1.0, 100 (the
/// 96 bytes and their CRC32) from 1.1 on.
pub const fn signature_block_len(minor: u16) -> usize {
    if has_signature_block_crc(minor) {
        SIGNATURE_BLOCK_LEN + SIGNATURE_BLOCK_CRC_LEN
    } else {
        SIGNATURE_BLOCK_LEN
    }
}

/// Length of the trailer (manifest digest, then the signature block if signed) of an
/// image of `minor`: 32 unsigned; 128 signed 1.0; 132 signed 1.1 and later.
pub const fn trailer_len(minor: u16, signed: bool) -> usize {
    DIGEST_LEN
        + if signed {
            signature_block_len(minor)
        } else {
            0
        }
}

/// Byte offsets inside the trailer, from the manifest digest (`manifest_offset`).
pub mod trailer_offset {
    /// The manifest digest (32 bytes).
    pub const MANIFEST_DIGEST: usize = 0;
    /// The signer's ed25519 public key (32 bytes), if signed.
    pub const PUBLIC_KEY: usize = 32;
    /// The ed25519 signature (64 bytes), if signed.
    pub const SIGNATURE: usize = 64;
    /// The CRC32 of bytes `[PUBLIC_KEY, SIGNATURE_BLOCK_CRC)` (4 bytes), if signed and
    /// the minor is 1 or later.
    pub const SIGNATURE_BLOCK_CRC: usize = 128;
}
/// Inline payload offsets are multiples of this.
pub const PAYLOAD_ALIGN: u64 = 8;
/// Largest region count a reader accepts.
pub const MAX_REGIONS: u32 = 65_536;
/// Domain-separation prefix of the signed message (24 bytes, NUL included).
pub const SIGNING_CONTEXT: &[u8; 24] = b"mk-upgrade kho image v1\0";

/// Header flag: a signature block follows the manifest digest.
pub const HEADER_FLAG_SIGNED: u32 = 1 << 0;
/// Header flags defined in 1.0 (and 1.1, which added none).
pub const HEADER_FLAGS_KNOWN: u32 = HEADER_FLAG_SIGNED;

/// Region flag: a reader that does not know the region's kind must refuse the image.
pub const REGION_FLAG_REQUIRED: u16 = 1 << 0;
/// Region flag: the payload lives in a separately preserved memfd, not in the image.
pub const REGION_FLAG_EXTERNAL: u16 = 1 << 1;
/// Region flags defined in 1.0 (and 1.1, which added none).
pub const REGION_FLAGS_KNOWN: u16 = REGION_FLAG_REQUIRED | REGION_FLAG_EXTERNAL;

/// The fixed header, image bytes `[0, 128)`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawHeader {
    /// 0: [`MAGIC`].
    pub magic: [u8; 8],
    /// 8: format major.
    pub major: U16,
    /// 10: format minor.
    pub minor: U16,
    /// 12: header flags ([`HEADER_FLAG_SIGNED`]).
    pub flags: U32,
    /// 16: header length; the region table starts here. 128 in 1.0 and 1.1.
    pub header_len: U32,
    /// 20: number of region table entries.
    pub region_count: U32,
    /// 24: total image length in bytes, trailer included.
    pub total_len: U64,
    /// 32: generation number (monotonic per host, chosen by the producer).
    pub generation: U64,
    /// 40: random 128-bit upgrade id.
    pub upgrade_id: [u8; 16],
    /// 56: producer kernel release (`uname -r`), UTF-8, NUL-padded.
    pub producer_release: [u8; RELEASE_LEN],
    /// 120: length of one region table entry. 80 in 1.0 and 1.1.
    pub entry_len: U16,
    /// 122: reserved, zero in 1.0 and 1.1.
    pub reserved: [u8; 2],
    /// 124: CRC32 (IEEE, as `crc32fast`) of bytes `[0, 124)`.
    pub header_crc32: U32,
}

/// One region table entry (80 bytes in 1.0 and 1.1).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawEntry {
    /// 0: region kind (0 is reserved and invalid).
    pub kind: U16,
    /// 2: region flags ([`REGION_FLAG_REQUIRED`], [`REGION_FLAG_EXTERNAL`]).
    pub flags: U16,
    /// 4: schema version of the payload, interpreted per kind.
    pub schema_version: U16,
    /// 6: reserved, zero in 1.0 and 1.1.
    pub reserved0: [u8; 2],
    /// 8: region id, unique per kind within an image.
    pub region_id: U32,
    /// 12: CRC32 of the payload bytes (the memfd contents for an external region).
    pub crc32: U32,
    /// 16: inline: byte offset of the payload in the image; external: 0.
    pub offset: U64,
    /// 24: payload length in bytes (the memfd contents' length for an external region).
    pub length: U64,
    /// 32: external: the preserved memfd's token; inline: 0.
    pub token: U64,
    /// 40: reserved, zero in 1.0 and 1.1.
    pub reserved1: [u8; 8],
    /// 48: SHA-256 of the payload bytes (the memfd contents for an external region).
    pub sha256: [u8; DIGEST_LEN],
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(size_of::<RawEntry>() == ENTRY_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, header_crc32) == HEADER_CRC_COVERAGE);
const _: () = assert!(std::mem::offset_of!(RawHeader, producer_release) == 56);
const _: () = assert!(std::mem::offset_of!(RawHeader, entry_len) == 120);
const _: () = assert!(std::mem::offset_of!(RawEntry, sha256) == 48);
const _: () = assert!(trailer_len(0, true) == 128 && trailer_len(1, true) == 132);
const _: () = assert!(trailer_len(0, false) == 32 && trailer_len(7, false) == 32);
const _: () = assert!(
    trailer_offset::SIGNATURE_BLOCK_CRC == DIGEST_LEN + SIGNATURE_BLOCK_LEN
        && trailer_offset::SIGNATURE == trailer_offset::PUBLIC_KEY + 32
);

/// Byte offsets of header fields, for error messages (kept equal to the struct by tests).
pub mod header_offset {
    pub const MAGIC: usize = 0;
    pub const MAJOR: usize = 8;
    pub const MINOR: usize = 10;
    pub const FLAGS: usize = 12;
    pub const HEADER_LEN: usize = 16;
    pub const REGION_COUNT: usize = 20;
    pub const TOTAL_LEN: usize = 24;
    pub const GENERATION: usize = 32;
    pub const UPGRADE_ID: usize = 40;
    pub const PRODUCER_RELEASE: usize = 56;
    pub const ENTRY_LEN: usize = 120;
    pub const RESERVED: usize = 122;
    pub const HEADER_CRC32: usize = 124;
}

/// Byte offsets of entry fields relative to the entry start.
pub mod entry_offset {
    pub const KIND: usize = 0;
    pub const FLAGS: usize = 2;
    pub const SCHEMA_VERSION: usize = 4;
    pub const RESERVED0: usize = 6;
    pub const REGION_ID: usize = 8;
    pub const CRC32: usize = 12;
    pub const OFFSET: usize = 16;
    pub const LENGTH: usize = 24;
    pub const TOKEN: usize = 32;
    pub const RESERVED1: usize = 40;
    pub const SHA256: usize = 48;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use zerocopy::FromZeros;

    #[test]
    fn offsets_match_the_structs() {
        use header_offset as h;
        assert_eq!(offset_of!(RawHeader, magic), h::MAGIC);
        assert_eq!(offset_of!(RawHeader, major), h::MAJOR);
        assert_eq!(offset_of!(RawHeader, minor), h::MINOR);
        assert_eq!(offset_of!(RawHeader, flags), h::FLAGS);
        assert_eq!(offset_of!(RawHeader, header_len), h::HEADER_LEN);
        assert_eq!(offset_of!(RawHeader, region_count), h::REGION_COUNT);
        assert_eq!(offset_of!(RawHeader, total_len), h::TOTAL_LEN);
        assert_eq!(offset_of!(RawHeader, generation), h::GENERATION);
        assert_eq!(offset_of!(RawHeader, upgrade_id), h::UPGRADE_ID);
        assert_eq!(offset_of!(RawHeader, producer_release), h::PRODUCER_RELEASE);
        assert_eq!(offset_of!(RawHeader, entry_len), h::ENTRY_LEN);
        assert_eq!(offset_of!(RawHeader, reserved), h::RESERVED);
        assert_eq!(offset_of!(RawHeader, header_crc32), h::HEADER_CRC32);
        use entry_offset as e;
        assert_eq!(offset_of!(RawEntry, kind), e::KIND);
        assert_eq!(offset_of!(RawEntry, flags), e::FLAGS);
        assert_eq!(offset_of!(RawEntry, schema_version), e::SCHEMA_VERSION);
        assert_eq!(offset_of!(RawEntry, reserved0), e::RESERVED0);
        assert_eq!(offset_of!(RawEntry, region_id), e::REGION_ID);
        assert_eq!(offset_of!(RawEntry, crc32), e::CRC32);
        assert_eq!(offset_of!(RawEntry, offset), e::OFFSET);
        assert_eq!(offset_of!(RawEntry, length), e::LENGTH);
        assert_eq!(offset_of!(RawEntry, token), e::TOKEN);
        assert_eq!(offset_of!(RawEntry, reserved1), e::RESERVED1);
        assert_eq!(offset_of!(RawEntry, sha256), e::SHA256);
    }

    #[test]
    fn integers_are_little_endian_on_the_wire() {
        let mut h = RawHeader::new_zeroed();
        h.major = U16::new(0x0102);
        h.total_len = U64::new(0x0102_0304_0506_0708);
        let b = h.as_bytes();
        assert_eq!(&b[8..10], &[0x02, 0x01]);
        assert_eq!(&b[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }
}
