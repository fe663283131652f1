//! Reading handover images: zero-copy views over untrusted bytes.

use std::collections::HashSet;

use sha2::{Digest, Sha256};
use zerocopy::FromBytes;

use super::layout::{
    self, DIGEST_LEN, ENTRY_LEN, FORMAT_MAJOR, FORMAT_MINOR, HEADER_CRC_COVERAGE, HEADER_LEN,
    MAGIC, MAX_REGIONS, PAYLOAD_ALIGN, RawEntry, RawHeader, SIGNATURE_BLOCK_LEN, entry_offset,
    header_offset, trailer_offset,
};
use super::{ExternalRef, ImageError, RegionFlags, RegionKind, digest_payload, signing_message};
use crate::keys::{KeyId, PUBLIC_KEY_LEN, SIGNATURE_LEN, TrustedKeys};

/// The decoded header of an image (fixed-size fields copied out, the release borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Format major (always [`FORMAT_MAJOR`] once parsed).
    pub major: u16,
    /// Format minor (any value is accepted).
    pub minor: u16,
    /// Raw header flags.
    pub flags: u32,
    /// Whether a signature block is present.
    pub signed: bool,
    /// Header length; the region table starts here.
    pub header_len: u32,
    /// Region table entry length.
    pub entry_len: u16,
    /// Number of regions.
    pub region_count: u32,
    /// Total image length.
    pub total_len: u64,
    /// Generation number.
    pub generation: u64,
    /// 128-bit upgrade id.
    pub upgrade_id: [u8; 16],
    /// Producer kernel release.
    pub producer_release: &'a str,
    /// Header CRC32 as stored (verified by [`ImageView::parse`]).
    pub header_crc32: u32,
    /// Offset of the manifest digest.
    pub manifest_offset: u64,
    /// The stored CRC32 of the signature block (signed images of minor 1 or later;
    /// checked by [`ImageView::verify`]). `None`: unsigned, or a signed 1.0 image, whose
    /// block has no checksum.
    pub signature_block_crc32: Option<u32>,
    /// End of the region table (= start of the payload area).
    pub table_end: u64,
}

/// Where a region's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionData<'a> {
    /// Inside the image: a borrowed slice of the input.
    Inline(&'a [u8]),
    /// In a separately preserved memfd.
    External(ExternalRef),
}

/// One region table entry, bounds-checked, with its payload borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionView<'a> {
    /// Index in the region table.
    pub index: usize,
    /// Byte offset of this entry in the image.
    pub entry_offset: usize,
    /// Kind.
    pub kind: RegionKind,
    /// Region id (unique per kind).
    pub region_id: u32,
    /// Schema version of the payload (per kind).
    pub schema_version: u16,
    /// Flags.
    pub flags: RegionFlags,
    /// Payload offset in the image (0 for external regions).
    pub offset: u64,
    /// Payload length.
    pub length: u64,
    /// CRC32 of the payload from the table.
    pub crc32: u32,
    /// SHA-256 of the payload from the table.
    pub sha256: [u8; 32],
    /// The payload.
    pub data: RegionData<'a>,
}

impl<'a> RegionView<'a> {
    /// The inline payload, if the region is inline.
    pub fn payload(&self) -> Option<&'a [u8]> {
        match self.data {
            RegionData::Inline(b) => Some(b),
            RegionData::External(_) => None,
        }
    }

    /// The external reference, if the region is external.
    pub fn external(&self) -> Option<ExternalRef> {
        match self.data {
            RegionData::Inline(_) => None,
            RegionData::External(e) => Some(e),
        }
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), ImageError> {
        let (crc, sha) = digest_payload(payload);
        if crc != self.crc32 {
            return Err(ImageError::RegionCrc {
                index: self.index,
                kind: self.kind,
                offset: self.offset,
                expected: self.crc32,
                computed: crc,
            });
        }
        if sha != self.sha256 {
            return Err(ImageError::RegionDigest {
                index: self.index,
                kind: self.kind,
                offset: self.offset,
            });
        }
        Ok(())
    }
}

/// What [`ImageView::verify`] checks beyond integrity.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'k> {
    /// Keys a signature must verify against. `None`: a signature is reported, not checked.
    pub trusted_keys: Option<&'k TrustedKeys>,
    /// Refuse unsigned images, and signed images when no trusted keys are given.
    pub require_signature: bool,
}

/// The outcome of signature checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum SignatureStatus {
    /// No signature block.
    Unsigned,
    /// Signed by `key_id`, and that key is trusted and the signature verified.
    Verified { key_id: KeyId },
    /// Signed by `key_id` (format 1.1 or later); no trusted keys were given, so the
    /// signature was not checked, but the block's CRC32 was: the block is intact.
    NotChecked { key_id: KeyId },
    /// Signed by `key_id` in format 1.0, and no trusted keys were given: the signature was
    /// not checked, and since 1.0 has no checksum over the signature block, neither was
    /// the block's integrity. Nothing vouches for those 96 bytes (`key_id` is read from
    /// them): a damaged block is not detected.
    NotCheckedNoChecksum { key_id: KeyId },
}

impl SignatureStatus {
    /// Whether every byte of the signature block (if any) was checked, by the signature
    /// or by its CRC32: false only for [`SignatureStatus::NotCheckedNoChecksum`].
    pub fn block_integrity_checked(&self) -> bool {
        !matches!(self, SignatureStatus::NotCheckedNoChecksum { .. })
    }
}

/// What a successful [`ImageView::verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The manifest digest (SHA-256 of header and table), verified.
    pub manifest_digest: [u8; 32],
    /// The signature outcome.
    pub signature: SignatureStatus,
    /// Number of inline regions whose CRC32 and SHA-256 verified.
    pub inline_verified: usize,
    /// Total inline payload bytes hashed.
    pub inline_bytes: u64,
    /// Indices of external regions (their contents are checked with
    /// [`super::verify_external`], not here).
    pub external: Vec<usize>,
    /// Indices of optional regions of unknown kind, skipped by the compatibility rule.
    pub skipped_unknown: Vec<usize>,
}

/// A parsed, bounds-checked image borrowing the input bytes.
#[derive(Debug, Clone)]
pub struct ImageView<'a> {
    bytes: &'a [u8],
    header: Header<'a>,
    regions: Vec<RegionView<'a>>,
}

fn header_field(field: &'static str, offset: usize, reason: impl Into<String>) -> ImageError {
    ImageError::HeaderField {
        field,
        offset,
        reason: reason.into(),
    }
}

fn decode_release(raw: &[u8; layout::RELEASE_LEN]) -> Result<&str, ImageError> {
    let off = header_offset::PRODUCER_RELEASE;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if end == 0 {
        return Err(header_field("producer_release", off, "is empty"));
    }
    if let Some(p) = raw[end..].iter().position(|&b| b != 0) {
        return Err(header_field(
            "producer_release",
            off + end + p,
            "non-NUL byte after the terminating NUL (padding must be NUL)",
        ));
    }
    std::str::from_utf8(&raw[..end]).map_err(|e| {
        header_field(
            "producer_release",
            off + e.valid_up_to(),
            "is not valid UTF-8",
        )
    })
}

impl<'a> ImageView<'a> {
    /// Parses the header and region table of `bytes` and checks every bound: magic,
    /// major, header CRC32, lengths, reserved fields, flags, producer release, region
    /// offsets (aligned, in order, non-overlapping, inside the payload area) and duplicate
    /// regions. Cost: O(header + table); payloads are not read (see [`Self::verify`]).
    ///
    /// `bytes` must be exactly the image (`total_len` bytes).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let have = bytes.len() as u64;
        if bytes.len() < HEADER_LEN {
            // Still name a wrong magic first: "not an image" beats "too short".
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                let mut found = [0u8; 8];
                found.copy_from_slice(&bytes[..8]);
                return Err(ImageError::BadMagic { found });
            }
            return Err(ImageError::Truncated {
                field: "header",
                needed: HEADER_LEN as u64,
                have,
            });
        }
        let (raw, _) = RawHeader::ref_from_prefix(bytes).map_err(|_| ImageError::Truncated {
            field: "header",
            needed: HEADER_LEN as u64,
            have,
        })?;
        if raw.magic != MAGIC {
            return Err(ImageError::BadMagic { found: raw.magic });
        }
        let major = raw.major.get();
        if major != FORMAT_MAJOR {
            return Err(ImageError::UnsupportedMajor {
                found: major,
                supported: FORMAT_MAJOR,
            });
        }
        let computed = crc32fast::hash(&bytes[..HEADER_CRC_COVERAGE]);
        let expected = raw.header_crc32.get();
        if computed != expected {
            return Err(ImageError::HeaderCrc { expected, computed });
        }
        let minor = raw.minor.get();
        // A newer minor may use reserved fields, new flags and longer records; a reader of
        // this minor ignores them. At or below our minor they must be exactly 1.1's (the
        // same as 1.0's: 1.1 changed only the signature block).
        let newer = minor > FORMAT_MINOR;

        let flags = raw.flags.get();
        if !newer && flags & !layout::HEADER_FLAGS_KNOWN != 0 {
            return Err(header_field(
                "flags",
                header_offset::FLAGS,
                format!(
                    "unknown bits {:#x} set",
                    flags & !layout::HEADER_FLAGS_KNOWN
                ),
            ));
        }
        let signed = flags & layout::HEADER_FLAG_SIGNED != 0;

        let header_len = raw.header_len.get();
        if (newer && (header_len as usize) < HEADER_LEN)
            || (!newer && header_len as usize != HEADER_LEN)
        {
            return Err(header_field(
                "header_len",
                header_offset::HEADER_LEN,
                format!("is {header_len}, expected {HEADER_LEN}"),
            ));
        }
        if u64::from(header_len) % PAYLOAD_ALIGN != 0 {
            return Err(header_field(
                "header_len",
                header_offset::HEADER_LEN,
                format!("{header_len} is not a multiple of {PAYLOAD_ALIGN}"),
            ));
        }
        let entry_len = raw.entry_len.get();
        if (newer && (entry_len as usize) < ENTRY_LEN)
            || (!newer && entry_len as usize != ENTRY_LEN)
        {
            return Err(header_field(
                "entry_len",
                header_offset::ENTRY_LEN,
                format!("is {entry_len}, expected {ENTRY_LEN}"),
            ));
        }
        if !newer && raw.reserved != [0; 2] {
            return Err(header_field(
                "reserved",
                header_offset::RESERVED,
                "must be zero in formats 1.0 and 1.1",
            ));
        }

        let total_len = raw.total_len.get();
        if total_len != have {
            return Err(ImageError::LengthMismatch {
                declared: total_len,
                actual: have,
            });
        }
        let producer_release = decode_release(&raw.producer_release)?;

        let region_count = raw.region_count.get();
        if region_count > MAX_REGIONS {
            return Err(header_field(
                "region_count",
                header_offset::REGION_COUNT,
                format!("{region_count} exceeds the limit of {MAX_REGIONS}"),
            ));
        }
        // The signature block has a CRC32 from minor 1 on (a 1.0 reader could not read a
        // signed image of a later minor, see docs/protocol.md §1.9).
        let trailer = layout::trailer_len(minor, signed) as u64;
        let table_end = u64::from(header_len) + u64::from(region_count) * u64::from(entry_len);
        let needed = table_end + trailer; // no overflow: both terms < 2^40
        if needed > have {
            return Err(ImageError::Truncated {
                field: "header, region table and manifest",
                needed,
                have,
            });
        }
        let manifest_offset = have - trailer;
        let signature_block_crc32 = (signed && layout::has_signature_block_crc(minor)).then(|| {
            let at = manifest_offset as usize + trailer_offset::SIGNATURE_BLOCK_CRC;
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        });

        let header = Header {
            major,
            minor,
            flags,
            signed,
            header_len,
            entry_len,
            region_count,
            total_len,
            generation: raw.generation.get(),
            upgrade_id: raw.upgrade_id,
            producer_release,
            header_crc32: expected,
            manifest_offset,
            signature_block_crc32,
            table_end,
        };

        // The table fits in the input (checked above), so this allocation is bounded by
        // input length / entry_len records.
        let mut regions = Vec::with_capacity(region_count as usize);
        let mut seen = HashSet::with_capacity(region_count as usize);
        let mut previous_end = table_end;
        for index in 0..region_count as usize {
            let entry_start = header_len as usize + index * entry_len as usize;
            let entry_bytes = &bytes[entry_start..entry_start + ENTRY_LEN];
            let e = RawEntry::ref_from_bytes(entry_bytes).map_err(|_| ImageError::Truncated {
                field: "region table entry",
                needed: (entry_start + ENTRY_LEN) as u64,
                have,
            })?;
            let kind_raw = e.kind.get();
            let kind = RegionKind::from_raw(kind_raw);
            let field = |field: &'static str, rel: usize, reason: String| ImageError::RegionField {
                index,
                kind,
                field,
                offset: entry_start + rel,
                reason,
            };
            if kind_raw == 0 {
                return Err(field(
                    "kind",
                    entry_offset::KIND,
                    "kind 0 is reserved".into(),
                ));
            }
            let flags = e.flags.get();
            if !newer && flags & !layout::REGION_FLAGS_KNOWN != 0 {
                return Err(field(
                    "flags",
                    entry_offset::FLAGS,
                    format!(
                        "unknown bits {:#x} set",
                        flags & !layout::REGION_FLAGS_KNOWN
                    ),
                ));
            }
            if !newer && e.reserved0 != [0; 2] {
                return Err(field(
                    "reserved0",
                    entry_offset::RESERVED0,
                    "must be zero in formats 1.0 and 1.1".into(),
                ));
            }
            if !newer && e.reserved1 != [0; 8] {
                return Err(field(
                    "reserved1",
                    entry_offset::RESERVED1,
                    "must be zero in formats 1.0 and 1.1".into(),
                ));
            }
            let region_id = e.region_id.get();
            if !seen.insert((kind_raw, region_id)) {
                return Err(ImageError::DuplicateRegion {
                    index,
                    kind,
                    region_id,
                });
            }
            let flags = RegionFlags(flags);
            let offset = e.offset.get();
            let length = e.length.get();
            let token = e.token.get();
            let data = if flags.external() {
                if offset != 0 {
                    return Err(field(
                        "offset",
                        entry_offset::OFFSET,
                        format!("external region has offset {offset}, must be 0"),
                    ));
                }
                RegionData::External(ExternalRef {
                    token,
                    length,
                    crc32: e.crc32.get(),
                    sha256: e.sha256,
                })
            } else {
                if token != 0 {
                    return Err(field(
                        "token",
                        entry_offset::TOKEN,
                        format!("inline region has token {token:#x}, must be 0"),
                    ));
                }
                if offset % PAYLOAD_ALIGN != 0 {
                    return Err(field(
                        "offset",
                        entry_offset::OFFSET,
                        format!("{offset} is not a multiple of {PAYLOAD_ALIGN}"),
                    ));
                }
                let end = offset.checked_add(length);
                if offset < table_end || end.is_none_or(|end| end > manifest_offset) {
                    return Err(ImageError::RegionOutOfBounds {
                        index,
                        kind,
                        offset,
                        length,
                        area_start: table_end,
                        area_end: manifest_offset,
                    });
                }
                if offset < previous_end {
                    return Err(ImageError::RegionOverlap {
                        index,
                        kind,
                        offset,
                        previous_end,
                    });
                }
                // In bounds of `bytes` (end <= manifest_offset <= len), so the casts hold.
                let end = offset + length;
                previous_end = end;
                RegionData::Inline(&bytes[offset as usize..end as usize])
            };
            regions.push(RegionView {
                index,
                entry_offset: entry_start,
                kind,
                region_id,
                schema_version: e.schema_version.get(),
                flags,
                offset,
                length,
                crc32: e.crc32.get(),
                sha256: e.sha256,
                data,
            });
        }
        Ok(ImageView {
            bytes,
            header,
            regions,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header<'a> {
        &self.header
    }

    /// The regions, in table order.
    pub fn regions(&self) -> &[RegionView<'a>] {
        &self.regions
    }

    /// The first region of `kind` with `region_id`.
    pub fn find(&self, kind: RegionKind, region_id: u32) -> Option<&RegionView<'a>> {
        let raw = kind.raw();
        self.regions
            .iter()
            .find(|r| r.kind.raw() == raw && r.region_id == region_id)
    }

    /// The stored manifest digest.
    pub fn manifest_digest(&self) -> [u8; 32] {
        let mut d = [0u8; 32];
        let at = self.header.manifest_offset as usize;
        d.copy_from_slice(&self.bytes[at..at + DIGEST_LEN]);
        d
    }

    /// The signer's public key and signature, if the image is signed.
    pub fn signature_block(&self) -> Option<([u8; PUBLIC_KEY_LEN], [u8; SIGNATURE_LEN])> {
        if !self.header.signed {
            return None;
        }
        let at = self.header.manifest_offset as usize + trailer_offset::PUBLIC_KEY;
        let mut public = [0u8; PUBLIC_KEY_LEN];
        let mut sig = [0u8; SIGNATURE_LEN];
        public.copy_from_slice(&self.bytes[at..at + PUBLIC_KEY_LEN]);
        sig.copy_from_slice(&self.bytes[at + PUBLIC_KEY_LEN..at + PUBLIC_KEY_LEN + SIGNATURE_LEN]);
        Some((public, sig))
    }

    /// Verifies the whole image, in this order, returning the first failure:
    /// 1. every inline region's CRC32 then SHA-256 (regions in parallel; the lowest failing
    ///    index is reported),
    /// 2. all padding bytes of the payload area are zero,
    /// 3. the manifest digest (SHA-256 of bytes `[0, table_end)`),
    /// 4. the signature block's CRC32 (signed images of minor 1 or later), whether or not
    ///    trusted keys are given,
    /// 5. the signature (see [`VerifyOptions`]),
    /// 6. the compatibility rule: an unknown-kind region marked required is refused,
    ///    an unknown optional one is skipped.
    pub fn verify(&self, opts: &VerifyOptions<'_>) -> Result<VerifyReport, ImageError> {
        let inline: usize = self
            .regions
            .iter()
            .filter_map(RegionView::payload)
            .map(<[u8]>::len)
            .sum();
        let checked = super::per_region(&self.regions, inline, |r| {
            r.payload().map(|p| r.check_payload(p))
        });
        for r in checked.into_iter().flatten() {
            r?;
        }
        self.check_padding()?;

        let table_end = self.header.table_end as usize;
        let computed: [u8; 32] = Sha256::digest(&self.bytes[..table_end]).into();
        let manifest_digest = self.manifest_digest();
        if computed != manifest_digest {
            return Err(ImageError::ManifestDigest {
                offset: self.header.manifest_offset,
            });
        }

        self.check_signature_block_crc()?;
        let signature = match self.signature_block() {
            None if opts.require_signature => return Err(ImageError::Unsigned),
            None => SignatureStatus::Unsigned,
            Some((public, sig)) => {
                let key_id = KeyId::of(&public);
                match opts.trusted_keys {
                    Some(keys) => {
                        let message = signing_message(&manifest_digest);
                        let key_id = keys.verify(&public, &message, &sig).map_err(|source| {
                            ImageError::Signature {
                                offset: self.signature_block_offset(),
                                source,
                            }
                        })?;
                        SignatureStatus::Verified { key_id }
                    }
                    None if opts.require_signature => {
                        return Err(ImageError::SignatureNotChecked { key_id });
                    }
                    None if self.header.signature_block_crc32.is_some() => {
                        SignatureStatus::NotChecked { key_id }
                    }
                    None => SignatureStatus::NotCheckedNoChecksum { key_id },
                }
            }
        };

        let mut external = Vec::new();
        let mut skipped_unknown = Vec::new();
        let mut inline_verified = 0;
        let mut inline_bytes = 0;
        for r in &self.regions {
            if !r.kind.is_known() {
                if r.flags.required() {
                    return Err(ImageError::UnknownRequiredRegion {
                        index: r.index,
                        kind: r.kind,
                    });
                }
                skipped_unknown.push(r.index);
            }
            match r.data {
                RegionData::Inline(p) => {
                    inline_verified += 1;
                    inline_bytes += p.len() as u64;
                }
                RegionData::External(_) => external.push(r.index),
            }
        }
        Ok(VerifyReport {
            manifest_digest,
            signature,
            inline_verified,
            inline_bytes,
            external,
            skipped_unknown,
        })
    }

    /// Offset of the signature block (the signer public key), meaningful if signed.
    fn signature_block_offset(&self) -> u64 {
        self.header.manifest_offset + trailer_offset::PUBLIC_KEY as u64
    }

    /// The signature block's CRC32 (minor 1 or later): over the signer key and signature.
    fn check_signature_block_crc(&self) -> Result<(), ImageError> {
        let Some(expected) = self.header.signature_block_crc32 else {
            return Ok(());
        };
        let start = self.signature_block_offset() as usize;
        let computed = crc32fast::hash(&self.bytes[start..start + SIGNATURE_BLOCK_LEN]);
        if computed != expected {
            return Err(ImageError::SignatureBlockCrc {
                offset: start as u64,
                crc_offset: (start + SIGNATURE_BLOCK_LEN) as u64,
                expected,
                computed,
            });
        }
        Ok(())
    }

    fn check_padding(&self) -> Result<(), ImageError> {
        let mut cursor = self.header.table_end;
        let mut gaps = Vec::new();
        for r in &self.regions {
            if let RegionData::Inline(_) = r.data {
                gaps.push((cursor, r.offset));
                cursor = r.offset + r.length;
            }
        }
        gaps.push((cursor, self.header.manifest_offset));
        for (start, end) in gaps {
            let gap = &self.bytes[start as usize..end as usize];
            if let Some(p) = gap.iter().position(|&b| b != 0) {
                return Err(ImageError::NonZeroPadding {
                    offset: start + p as u64,
                    value: gap[p],
                });
            }
        }
        Ok(())
    }

    /// Decodes a structured (postcard) inline region. Call after [`Self::verify`]: this
    /// checks only that the bytes decode, completely, as `T`.
    pub fn decode<T: serde::Deserialize<'a>>(
        &self,
        region: &RegionView<'a>,
    ) -> Result<T, ImageError> {
        let payload = match region.data {
            RegionData::Inline(p) => p,
            RegionData::External(e) => {
                return Err(ImageError::NotInline {
                    index: region.index,
                    kind: region.kind,
                    token: e.token,
                });
            }
        };
        let err = |reason: String| ImageError::Decode {
            index: region.index,
            kind: region.kind,
            offset: region.offset,
            reason,
        };
        let (value, rest) =
            postcard::take_from_bytes::<T>(payload).map_err(|e| err(e.to_string()))?;
        if !rest.is_empty() {
            return Err(err(format!(
                "{} trailing bytes after the value",
                rest.len()
            )));
        }
        Ok(value)
    }

    /// The image bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}
