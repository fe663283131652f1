//! Writing handover images.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Write;

use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::layout::{
    self, DIGEST_LEN, ENTRY_LEN, FORMAT_MAJOR, FORMAT_MINOR, HEADER_CRC_COVERAGE, HEADER_LEN,
    MAGIC, MAX_REGIONS, PAYLOAD_ALIGN, RELEASE_LEN, RawEntry, RawHeader,
};
use super::{BuildError, ExternalRef, RegionKind, digest_payload, signing_message};
use crate::keys::NodeKey;

#[derive(Debug)]
enum Payload<'a> {
    Inline(Cow<'a, [u8]>),
    External(ExternalRef),
}

#[derive(Debug)]
struct Pending<'a> {
    kind: RegionKind,
    region_id: u32,
    schema_version: u16,
    required: bool,
    payload: Payload<'a>,
}

/// Builds a format 1.1 image (a signed one ends with the signature block's CRC32).
/// Payloads are borrowed where possible (`&[u8]`), so building
/// an image over large buffers copies each payload once, into the output.
///
/// ```
/// use kho_proto::image::{ImageBuilder, ImageView, RegionKind, VerifyOptions};
/// let mut b = ImageBuilder::new("6.12.0-mk", [1; 16], 7).unwrap();
/// b.region(RegionKind::WorkloadBlob, 1, 1, false, &b"hello"[..]).unwrap();
/// let bytes = b.build().unwrap();
/// let view = ImageView::parse(&bytes).unwrap();
/// view.verify(&VerifyOptions::default()).unwrap();
/// ```
#[derive(Debug)]
pub struct ImageBuilder<'a> {
    release: [u8; RELEASE_LEN],
    upgrade_id: [u8; 16],
    generation: u64,
    minor: u16,
    regions: Vec<Pending<'a>>,
    seen: HashSet<(u16, u32)>,
}

/// Computed layout of one region.
struct Placed {
    offset: u64,
    length: u64,
    crc32: u32,
    sha256: [u8; 32],
    token: u64,
}

fn align_up(v: u64) -> Option<u64> {
    v.checked_add(PAYLOAD_ALIGN - 1)
        .map(|x| x & !(PAYLOAD_ALIGN - 1))
}

impl<'a> ImageBuilder<'a> {
    /// A new image for the producer kernel release `producer_release` (`uname -r`: 1 to 64
    /// bytes of UTF-8 without NUL), a random 128-bit `upgrade_id` and a `generation`.
    pub fn new(
        producer_release: &str,
        upgrade_id: [u8; 16],
        generation: u64,
    ) -> Result<Self, BuildError> {
        let bad = |reason| BuildError::ProducerRelease {
            release: producer_release.to_owned(),
            reason,
        };
        if producer_release.is_empty() {
            return Err(bad("is empty"));
        }
        if producer_release.len() > RELEASE_LEN {
            return Err(bad("is longer than 64 bytes"));
        }
        if producer_release.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        let mut release = [0u8; RELEASE_LEN];
        release[..producer_release.len()].copy_from_slice(producer_release.as_bytes());
        Ok(ImageBuilder {
            release,
            upgrade_id,
            generation,
            minor: FORMAT_MINOR,
            regions: Vec::new(),
            seen: HashSet::new(),
        })
    }

    /// Writes a different minor version into the header, with that minor's layout (minor 0:
    /// a signature block without CRC32; 1 and later: with). Only for producing test images
    /// of an older or newer minor (compatibility tests, golden vectors); real writers use
    /// [`FORMAT_MINOR`].
    #[doc(hidden)]
    pub fn format_minor(&mut self, minor: u16) -> &mut Self {
        self.minor = minor;
        self
    }

    fn push(
        &mut self,
        kind: RegionKind,
        region_id: u32,
        schema_version: u16,
        required: bool,
        payload: Payload<'a>,
    ) -> Result<&mut Self, BuildError> {
        let raw = kind.raw();
        if raw == 0 {
            return Err(BuildError::ReservedKind);
        }
        if self.regions.len() >= MAX_REGIONS as usize {
            return Err(BuildError::TooManyRegions { max: MAX_REGIONS });
        }
        let kind = RegionKind::from_raw(raw);
        if !self.seen.insert((raw, region_id)) {
            return Err(BuildError::DuplicateRegion { kind, region_id });
        }
        self.regions.push(Pending {
            kind,
            region_id,
            schema_version,
            required,
            payload,
        });
        Ok(self)
    }

    /// Adds an inline region of raw bytes. `required`: a reader that does not know `kind`
    /// must refuse the image rather than skip the region.
    pub fn region(
        &mut self,
        kind: RegionKind,
        region_id: u32,
        schema_version: u16,
        required: bool,
        payload: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self, BuildError> {
        self.push(
            kind,
            region_id,
            schema_version,
            required,
            Payload::Inline(payload.into()),
        )
    }

    /// Adds an inline region holding `value` serialized with postcard.
    pub fn structured<T: serde::Serialize + ?Sized>(
        &mut self,
        kind: RegionKind,
        region_id: u32,
        schema_version: u16,
        required: bool,
        value: &T,
    ) -> Result<&mut Self, BuildError> {
        let bytes = postcard::to_stdvec(value).map_err(|source| BuildError::Serialize {
            kind: RegionKind::from_raw(kind.raw()),
            region_id,
            source,
        })?;
        self.region(kind, region_id, schema_version, required, bytes)
    }

    /// Adds an external region: contents in a separately preserved memfd.
    pub fn external(
        &mut self,
        kind: RegionKind,
        region_id: u32,
        schema_version: u16,
        required: bool,
        reference: ExternalRef,
    ) -> Result<&mut Self, BuildError> {
        self.push(
            kind,
            region_id,
            schema_version,
            required,
            Payload::External(reference),
        )
    }

    /// Number of regions added so far.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region was added.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    fn place(&self) -> Result<(Vec<Placed>, u64), BuildError> {
        let digest = |r: &Pending<'_>| match &r.payload {
            Payload::Inline(b) => digest_payload(b),
            Payload::External(e) => (e.crc32, e.sha256),
        };
        let inline: usize = self
            .regions
            .iter()
            .map(|r| match &r.payload {
                Payload::Inline(b) => b.len(),
                Payload::External(_) => 0,
            })
            .sum();
        let digests = super::per_region(&self.regions, inline, digest);
        let table_end = (HEADER_LEN + self.regions.len() * ENTRY_LEN) as u64;
        let mut cursor = table_end;
        let mut placed = Vec::with_capacity(self.regions.len());
        for (r, (crc32, sha256)) in self.regions.iter().zip(digests) {
            match &r.payload {
                Payload::Inline(b) => {
                    let offset = align_up(cursor).ok_or(BuildError::TooLarge)?;
                    let length = b.len() as u64;
                    cursor = offset.checked_add(length).ok_or(BuildError::TooLarge)?;
                    placed.push(Placed {
                        offset,
                        length,
                        crc32,
                        sha256,
                        token: 0,
                    });
                }
                Payload::External(e) => placed.push(Placed {
                    offset: 0,
                    length: e.length,
                    crc32,
                    sha256,
                    token: e.token,
                }),
            }
        }
        let manifest_offset = align_up(cursor).ok_or(BuildError::TooLarge)?;
        Ok((placed, manifest_offset))
    }

    fn header_and_table(
        &self,
        placed: &[Placed],
        total_len: u64,
        signed: bool,
    ) -> (Vec<u8>, [u8; DIGEST_LEN]) {
        let mut h = RawHeader::new_zeroed();
        h.magic = MAGIC;
        h.major = U16::new(FORMAT_MAJOR);
        h.minor = U16::new(self.minor);
        h.flags = U32::new(if signed {
            layout::HEADER_FLAG_SIGNED
        } else {
            0
        });
        h.header_len = U32::new(HEADER_LEN as u32);
        h.region_count = U32::new(self.regions.len() as u32);
        h.total_len = U64::new(total_len);
        h.generation = U64::new(self.generation);
        h.upgrade_id = self.upgrade_id;
        h.producer_release = self.release;
        h.entry_len = U16::new(ENTRY_LEN as u16);
        let crc = crc32fast::hash(&h.as_bytes()[..HEADER_CRC_COVERAGE]);
        h.header_crc32 = U32::new(crc);

        let mut out = Vec::with_capacity(HEADER_LEN + placed.len() * ENTRY_LEN);
        out.extend_from_slice(h.as_bytes());
        for (r, p) in self.regions.iter().zip(placed) {
            let mut e = RawEntry::new_zeroed();
            let external = matches!(r.payload, Payload::External(_));
            let mut flags = 0;
            if r.required {
                flags |= layout::REGION_FLAG_REQUIRED;
            }
            if external {
                flags |= layout::REGION_FLAG_EXTERNAL;
            }
            e.kind = U16::new(r.kind.raw());
            e.flags = U16::new(flags);
            e.schema_version = U16::new(r.schema_version);
            e.region_id = U32::new(r.region_id);
            e.crc32 = U32::new(p.crc32);
            e.offset = U64::new(p.offset);
            e.length = U64::new(p.length);
            e.token = U64::new(p.token);
            e.sha256 = p.sha256;
            out.extend_from_slice(e.as_bytes());
        }
        let digest: [u8; 32] = Sha256::digest(&out).into();
        (out, digest)
    }

    /// The exact length [`Self::build`] will produce.
    pub fn encoded_len(&self, signed: bool) -> Result<u64, BuildError> {
        let mut cursor = (HEADER_LEN + self.regions.len() * ENTRY_LEN) as u64;
        for r in &self.regions {
            if let Payload::Inline(b) = &r.payload {
                cursor = align_up(cursor)
                    .and_then(|o| o.checked_add(b.len() as u64))
                    .ok_or(BuildError::TooLarge)?;
            }
        }
        trailer_end(
            align_up(cursor).ok_or(BuildError::TooLarge)?,
            self.minor,
            signed,
        )
    }

    /// Streams the image to `out` (e.g. a memfd), signing it with `key` if given.
    /// Returns the number of bytes written (the image's `total_len`).
    pub fn write_to<W: Write>(&self, mut out: W, key: Option<&NodeKey>) -> Result<u64, BuildError> {
        let (placed, manifest_offset) = self.place()?;
        let total_len = trailer_end(manifest_offset, self.minor, key.is_some())?;
        let (head, digest) = self.header_and_table(&placed, total_len, key.is_some());
        out.write_all(&head)?;
        let mut pos = head.len() as u64;
        const ZEROS: [u8; PAYLOAD_ALIGN as usize] = [0; PAYLOAD_ALIGN as usize];
        for (r, p) in self.regions.iter().zip(&placed) {
            if let Payload::Inline(b) = &r.payload {
                // Padding is less than PAYLOAD_ALIGN bytes by construction.
                out.write_all(&ZEROS[..(p.offset - pos) as usize])?;
                out.write_all(b)?;
                pos = p.offset + p.length;
            }
        }
        out.write_all(&ZEROS[..(manifest_offset - pos) as usize])?;
        out.write_all(&digest)?;
        if let Some(key) = key {
            let public = key.public();
            let signature = key.sign(&signing_message(&digest));
            out.write_all(&public)?;
            out.write_all(&signature)?;
            if layout::has_signature_block_crc(self.minor) {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&public);
                crc.update(&signature);
                out.write_all(&crc.finalize().to_le_bytes())?;
            }
        }
        out.flush()?;
        Ok(total_len)
    }

    /// The unsigned image.
    pub fn build(&self) -> Result<Vec<u8>, BuildError> {
        self.build_inner(None)
    }

    /// The image signed with `key` (ed25519 over the domain-separated manifest digest).
    pub fn build_signed(&self, key: &NodeKey) -> Result<Vec<u8>, BuildError> {
        self.build_inner(Some(key))
    }

    fn build_inner(&self, key: Option<&NodeKey>) -> Result<Vec<u8>, BuildError> {
        let len = self.encoded_len(key.is_some())?;
        let len = usize::try_from(len).map_err(|_| BuildError::TooLarge)?;
        let mut out = Vec::with_capacity(len);
        self.write_to(&mut out, key)?;
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }
}

fn trailer_end(manifest_offset: u64, minor: u16, signed: bool) -> Result<u64, BuildError> {
    manifest_offset
        .checked_add(layout::trailer_len(minor, signed) as u64)
        .ok_or(BuildError::TooLarge)
}
