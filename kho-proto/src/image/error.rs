//! Typed errors of the handover image: every variant names the field and byte offset.

use super::RegionKind;
use super::layout::{FORMAT_MAJOR, FORMAT_MINOR};
use crate::keys::{KeyError, KeyId};

/// How a caller should react to an [`ImageError`]; the agent maps these onto its exit
/// codes (`Io` = 3, `Corrupt` = 4, `Untrusted` = 5, `Incompatible` = 6) and rolls back on
/// any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    /// Malformed or corrupt bytes: magic, CRC, digest, bounds, field values.
    Corrupt,
    /// Trust refused: unsigned when a signature is required, bad or untrusted signature.
    Untrusted,
    /// Well-formed but not for this reader: higher major, unknown required region.
    Incompatible,
    /// External region contents could not be read (an OS error, not bad bytes).
    Io,
}

/// Why an image (or an external region's contents) was refused.
///
/// Offsets are byte offsets from the start of the image unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image truncated: {field} needs {needed} bytes, the input has {have}")]
    Truncated {
        field: &'static str,
        needed: u64,
        have: u64,
    },
    #[error("not a handover image: magic at offset 0 is {found:02x?}, expected \"MKKHOIMG\"")]
    BadMagic { found: [u8; 8] },
    #[error(
        "image format major {found} (offset 8) is not supported: this reader implements major {supported}; upgrade the reader or roll back"
    )]
    UnsupportedMajor { found: u16, supported: u16 },
    #[error(
        "header CRC32 mismatch: field at offset 124 says {expected:#010x}, bytes 0..124 give {computed:#010x}"
    )]
    HeaderCrc { expected: u32, computed: u32 },
    #[error("header field {field} at offset {offset}: {reason}")]
    HeaderField {
        field: &'static str,
        offset: usize,
        reason: String,
    },
    #[error(
        "header total_len (offset 24) is {declared} but the input is {actual} bytes; the image was cut or padded"
    )]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("region {index} ({kind}) field {field} at offset {offset}: {reason}")]
    RegionField {
        index: usize,
        kind: RegionKind,
        field: &'static str,
        offset: usize,
        reason: String,
    },
    #[error(
        "region {index} ({kind}): payload [{offset}, +{length}) lies outside the payload area [{area_start}, {area_end})"
    )]
    RegionOutOfBounds {
        index: usize,
        kind: RegionKind,
        offset: u64,
        length: u64,
        area_start: u64,
        area_end: u64,
    },
    #[error(
        "region {index} ({kind}): payload at offset {offset} starts before the previous payload ends at {previous_end} (payloads must be in table order and must not overlap)"
    )]
    RegionOverlap {
        index: usize,
        kind: RegionKind,
        offset: u64,
        previous_end: u64,
    },
    #[error("region {index}: ({kind}, id {region_id}) appears twice in the region table")]
    DuplicateRegion {
        index: usize,
        kind: RegionKind,
        region_id: u32,
    },
    #[error("padding byte at offset {offset} is {value:#04x}; padding must be zero")]
    NonZeroPadding { offset: u64, value: u8 },
    #[error(
        "region {index} ({kind}) CRC32 mismatch: table says {expected:#010x}, payload at offset {offset} gives {computed:#010x}"
    )]
    RegionCrc {
        index: usize,
        kind: RegionKind,
        offset: u64,
        expected: u32,
        computed: u32,
    },
    #[error("region {index} ({kind}) SHA-256 mismatch over the payload at offset {offset}")]
    RegionDigest {
        index: usize,
        kind: RegionKind,
        offset: u64,
    },
    #[error(
        "manifest digest at offset {offset} does not match SHA-256 of the header and region table"
    )]
    ManifestDigest { offset: u64 },
    #[error(
        "region {index} ({kind}) is marked required but its kind is unknown to this reader (format {FORMAT_MAJOR}.{FORMAT_MINOR}): the image cannot be used; roll back"
    )]
    UnknownRequiredRegion { index: usize, kind: RegionKind },
    #[error(
        "signature block CRC32 mismatch: field at offset {crc_offset} says {expected:#010x}, the signer key and signature at [{offset}, {crc_offset}) give {computed:#010x}; the signature block is damaged"
    )]
    SignatureBlockCrc {
        /// Start of the signature block (the signer public key).
        offset: u64,
        /// Offset of the CRC32 field (the end of the 96 covered bytes).
        crc_offset: u64,
        expected: u32,
        computed: u32,
    },
    #[error("the image is not signed but a signature is required")]
    Unsigned,
    #[error(
        "the image is signed by key {key_id} but no trusted keys were given to check it (pass --trusted-keys DIR)"
    )]
    SignatureNotChecked { key_id: KeyId },
    #[error("image signature (offset {offset}): {source}")]
    Signature {
        offset: u64,
        #[source]
        source: KeyError,
    },
    #[error(
        "region {index} ({kind}) is external (memfd token {token:#x}); its payload is not in the image"
    )]
    NotInline {
        index: usize,
        kind: RegionKind,
        token: u64,
    },
    #[error("region {index} ({kind}) payload at offset {offset} does not decode: {reason}")]
    Decode {
        index: usize,
        kind: RegionKind,
        offset: u64,
        reason: String,
    },
    #[error(
        "external region (memfd token {token:#x}): contents are {found} bytes, the table says {expected}"
    )]
    ExternalLength {
        token: u64,
        expected: u64,
        found: u64,
    },
    #[error(
        "external region (memfd token {token:#x}) CRC32 mismatch: table says {expected:#010x}, contents give {computed:#010x}"
    )]
    ExternalCrc {
        token: u64,
        expected: u32,
        computed: u32,
    },
    #[error("external region (memfd token {token:#x}) SHA-256 mismatch over its contents")]
    ExternalDigest { token: u64 },
    #[error("reading external region (memfd token {token:#x}) contents: {source}")]
    ExternalIo {
        token: u64,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The class of the failure, which decides the exit code and the log wording.
    pub fn class(&self) -> FailureClass {
        match self {
            ImageError::UnsupportedMajor { .. } | ImageError::UnknownRequiredRegion { .. } => {
                FailureClass::Incompatible
            }
            ImageError::Unsigned
            | ImageError::SignatureNotChecked { .. }
            | ImageError::Signature { .. } => FailureClass::Untrusted,
            ImageError::ExternalIo { .. } => FailureClass::Io,
            _ => FailureClass::Corrupt,
        }
    }
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("producer release {release:?}: {reason}")]
    ProducerRelease {
        release: String,
        reason: &'static str,
    },
    #[error("region kind 0 is reserved; use a RegionKind other than Unknown(0)")]
    ReservedKind,
    #[error("region ({kind}, id {region_id}) was added twice")]
    DuplicateRegion { kind: RegionKind, region_id: u32 },
    #[error("too many regions: at most {max}")]
    TooManyRegions { max: u32 },
    #[error("region ({kind}, id {region_id}) cannot be serialized: {source}")]
    Serialize {
        kind: RegionKind,
        region_id: u32,
        #[source]
        source: postcard::Error,
    },
    #[error("the image would exceed u64 bytes")]
    TooLarge,
    #[error("writing the image: {0}")]
    Io(#[from] std::io::Error),
}
