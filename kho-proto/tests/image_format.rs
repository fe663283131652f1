//! Behaviour of the handover image reader and writer: round trip and every refusal.

#[path = "image_helpers.rs"]
mod helpers;

use helpers::*;
use kho_proto::image::layout::{ENTRY_LEN, HEADER_LEN, MAX_REGIONS, SIGNATURE_BLOCK_LEN};
use kho_proto::image::{
    BuildError, ExternalRef, FORMAT_MAJOR, FORMAT_MINOR, FailureClass, ImageBuilder, ImageError,
    ImageView, RegionData, RegionKind, SignatureStatus, VerifyOptions, verify_external,
};
use kho_proto::keys::{KeyError, NodeKey};

/// An edit of image bytes.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

fn verify(b: &[u8]) -> Result<kho_proto::image::VerifyReport, ImageError> {
    ImageView::parse(b)?.verify(&VerifyOptions::default())
}

#[test]
fn round_trip_small_image() {
    let bytes = small_builder().build().unwrap();
    let view = ImageView::parse(&bytes).unwrap();
    let h = view.header();
    assert_eq!(h.major, FORMAT_MAJOR);
    assert_eq!(h.minor, FORMAT_MINOR);
    assert_eq!(FORMAT_MINOR, 1);
    assert_eq!(h.producer_release, "6.12.0-mk-old");
    assert_eq!(h.upgrade_id, [0x11; 16]);
    assert_eq!(h.generation, 3);
    assert_eq!(h.region_count, 3);
    assert_eq!(h.total_len, bytes.len() as u64);
    assert!(!h.signed);
    assert_eq!(&bytes[..8], b"MKKHOIMG");

    let report = view.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(report.signature, SignatureStatus::Unsigned);
    assert_eq!(report.inline_verified, 2);
    assert_eq!(report.external, vec![2]);
    assert!(report.skipped_unknown.is_empty());

    let r = view.regions();
    assert_eq!(r[0].kind, RegionKind::AgentManifest);
    assert!(r[0].flags.required());
    assert_eq!(view.decode::<Manifest>(&r[0]).unwrap(), manifest());
    assert_eq!(r[1].payload(), Some(&b"abc"[..]));
    assert_eq!(r[1].schema_version, 2);
    assert_eq!(r[1].region_id, 7);
    assert_eq!(r[1].offset % 8, 0);
    let ext = r[2].external().unwrap();
    assert_eq!(ext, ExternalRef::of(0xfeed, EXTERNAL_CONTENTS));
    verify_external(&ext, EXTERNAL_CONTENTS).unwrap();
    assert!(view.find(RegionKind::WorkloadBlob, 7).is_some());
    assert!(view.find(RegionKind::WorkloadBlob, 8).is_none());
}

#[test]
fn write_to_matches_build_and_encoded_len() {
    let b = small_builder();
    let key = test_key();
    let built = b.build_signed(&key).unwrap();
    let mut streamed = Vec::new();
    let n = b.write_to(&mut streamed, Some(&key)).unwrap();
    assert_eq!(built, streamed);
    assert_eq!(n, built.len() as u64);
    assert_eq!(b.encoded_len(true).unwrap(), n);
    assert_eq!(
        b.encoded_len(false).unwrap(),
        b.build().unwrap().len() as u64
    );
}

#[test]
fn empty_image_is_valid() {
    let bytes = ImageBuilder::new("x", [0; 16], 0).unwrap().build().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 32);
    let report = verify(&bytes).unwrap();
    assert_eq!(report.inline_verified, 0);
}

#[test]
fn not_an_image() {
    assert!(matches!(
        ImageView::parse(b""),
        Err(ImageError::Truncated { have: 0, .. })
    ));
    assert!(matches!(
        ImageView::parse(b"MKKHOIMG"),
        Err(ImageError::Truncated {
            needed: 128,
            have: 8,
            ..
        })
    ));
    assert!(matches!(
        ImageView::parse(b"\x7fELF\x02\x01\x01\x00"),
        Err(ImageError::BadMagic { .. })
    ));
    let mut bytes = small_builder().build().unwrap();
    bytes[0] = b'X';
    let e = ImageView::parse(&bytes).unwrap_err();
    assert!(matches!(e, ImageError::BadMagic { found } if found[0] == b'X'));
    assert_eq!(e.class(), FailureClass::Corrupt);
}

#[test]
fn higher_major_is_incompatible() {
    for major in [0u16, 2, 0xffff] {
        let mut bytes = small_builder().build().unwrap();
        put16(&mut bytes, 8, major);
        reseal(&mut bytes, None);
        let e = ImageView::parse(&bytes).unwrap_err();
        assert!(
            matches!(e, ImageError::UnsupportedMajor { found, supported: 1 } if found == major),
            "{e}"
        );
        assert_eq!(e.class(), FailureClass::Incompatible);
        assert!(e.to_string().contains("offset 8"));
    }
}

#[test]
fn header_crc_is_checked() {
    let mut bytes = small_builder().build().unwrap();
    bytes[60] ^= 0x20; // inside the producer release
    let e = ImageView::parse(&bytes).unwrap_err();
    assert!(matches!(e, ImageError::HeaderCrc { expected, computed } if expected != computed));
    assert!(e.to_string().contains("offset 124"));
}

#[test]
fn total_len_must_equal_the_input() {
    let good = small_builder().build().unwrap();
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        ImageView::parse(&longer),
        Err(ImageError::LengthMismatch { declared, actual }) if declared + 1 == actual
    ));
    assert!(matches!(
        ImageView::parse(&good[..good.len() - 1]),
        Err(ImageError::LengthMismatch { .. })
    ));
    // A header claiming u64::MAX bytes is refused by comparison, before anything is sized
    // from it: the reader only ever borrows slices of the input.
    let mut huge = good.clone();
    put64(&mut huge, 24, u64::MAX);
    reseal(&mut huge, None);
    assert!(matches!(
        ImageView::parse(&huge),
        Err(ImageError::LengthMismatch {
            declared: u64::MAX,
            ..
        })
    ));
}

fn header_field_err(bytes: &[u8]) -> (&'static str, usize) {
    match ImageView::parse(bytes) {
        Err(ImageError::HeaderField { field, offset, .. }) => (field, offset),
        other => panic!("expected HeaderField, got {other:?}"),
    }
}

#[test]
fn header_fields_are_validated() {
    let good = small_builder().build().unwrap();
    let cases: Vec<(Edit, &str, usize)> = vec![
        (Box::new(|b| put32(b, 16, 136)), "header_len", 16),
        (Box::new(|b| put32(b, 16, 64)), "header_len", 16),
        (Box::new(|b| put16(b, 120, 88)), "entry_len", 120),
        (Box::new(|b| b[122] = 1), "reserved", 122),
        (Box::new(|b| put32(b, 12, 1 << 5)), "flags", 12),
        (Box::new(|b| put32(b, 20, u32::MAX)), "region_count", 20),
        (Box::new(|b| b[56..120].fill(0)), "producer_release", 56),
        (Box::new(|b| b[70] = 0xff), "producer_release", 70),
        (Box::new(|b| b[100] = b'x'), "producer_release", 100),
    ];
    for (edit, field, offset) in cases {
        let mut b = good.clone();
        edit(&mut b);
        reseal(&mut b, None);
        assert_eq!(header_field_err(&b), (field, offset), "{field}");
    }
}

#[test]
fn region_table_must_fit() {
    let mut b = small_builder().build().unwrap();
    put32(&mut b, 20, MAX_REGIONS);
    reseal(&mut b, None);
    assert!(matches!(
        ImageView::parse(&b),
        Err(ImageError::Truncated { needed, .. }) if needed == (HEADER_LEN + MAX_REGIONS as usize * ENTRY_LEN + 32) as u64
    ));
}

#[test]
fn newer_minor_may_use_reserved_space_and_is_accepted() {
    let mut b = small_builder().build().unwrap();
    put16(&mut b, 10, 7); // minor 7
    b[122] = 0xaa; // reserved
    put32(&mut b, 12, 1 << 9); // an unknown header flag
    put16(&mut b, entry(1) + 2, 1 << 8); // an unknown region flag
    b[entry(1) + 6] = 1; // reserved0
    b[entry(1) + 40] = 1; // reserved1
    reseal(&mut b, None);
    let view = ImageView::parse(&b).unwrap();
    assert_eq!(view.header().minor, 7);
    view.verify(&VerifyOptions::default()).unwrap();

    // The same bytes claiming minor 0 are refused.
    put16(&mut b, 10, 0);
    reseal(&mut b, None);
    assert!(ImageView::parse(&b).is_err());
}

fn region_field_err(bytes: &[u8]) -> (usize, &'static str, usize) {
    match ImageView::parse(bytes) {
        Err(ImageError::RegionField {
            index,
            field,
            offset,
            ..
        }) => (index, field, offset),
        other => panic!("expected RegionField, got {other:?}"),
    }
}

#[test]
fn region_entries_are_validated() {
    let good = small_builder().build().unwrap();
    let e1 = entry(1);
    let e2 = entry(2);
    let cases: Vec<(Edit, usize, &str, usize)> = vec![
        (Box::new(move |b| put16(b, e1, 0)), 1, "kind", e1),
        (Box::new(move |b| put16(b, e1 + 2, 4)), 1, "flags", e1 + 2),
        (Box::new(move |b| b[e1 + 7] = 1), 1, "reserved0", e1 + 6),
        (Box::new(move |b| b[e1 + 47] = 1), 1, "reserved1", e1 + 40),
        (Box::new(move |b| put64(b, e1 + 32, 5)), 1, "token", e1 + 32),
        (
            Box::new(move |b| put64(b, e2 + 16, 8)),
            2,
            "offset",
            e2 + 16,
        ),
        (
            Box::new(move |b| {
                let off = u64::from_le_bytes(b[e1 + 16..e1 + 24].try_into().unwrap());
                put64(b, e1 + 16, off + 1);
            }),
            1,
            "offset",
            e1 + 16,
        ),
    ];
    for (edit, index, field, offset) in cases {
        let mut b = good.clone();
        edit(&mut b);
        reseal(&mut b, None);
        assert_eq!(region_field_err(&b), (index, field, offset), "{field}");
    }
}

#[test]
fn region_bounds_overlap_and_duplicates() {
    let good = small_builder().build().unwrap();
    let e1 = entry(1);
    // Length running past the manifest, and offset + length overflowing u64.
    for (off, len) in [(None, 1000u64), (Some(u64::MAX - 7), 16), (Some(0), 1)] {
        let mut b = good.clone();
        if let Some(off) = off {
            put64(&mut b, e1 + 16, off);
        }
        put64(&mut b, e1 + 24, len);
        reseal(&mut b, None);
        let e = ImageView::parse(&b).unwrap_err();
        assert!(
            matches!(e, ImageError::RegionOutOfBounds { index: 1, .. }),
            "{e}"
        );
    }
    // Second inline payload starting inside the first.
    let mut b = good.clone();
    let first = u64::from_le_bytes(b[entry(0) + 16..entry(0) + 24].try_into().unwrap());
    put64(&mut b, e1 + 16, first);
    reseal(&mut b, None);
    assert!(matches!(
        ImageView::parse(&b),
        Err(ImageError::RegionOverlap { index: 1, .. })
    ));
    // Same (kind, id) twice.
    let mut b = good.clone();
    put16(&mut b, e1, RegionKind::AgentManifest.raw());
    put32(&mut b, e1 + 8, 0);
    reseal(&mut b, None);
    assert!(matches!(
        ImageView::parse(&b),
        Err(ImageError::DuplicateRegion {
            index: 1,
            region_id: 0,
            ..
        })
    ));
}

#[test]
fn payload_corruption_is_detected() {
    let good = small_builder().build().unwrap();
    let view = ImageView::parse(&good).unwrap();
    let blob = view.regions()[1];
    let (off, len) = (blob.offset as usize, blob.length as usize);
    drop(view);

    let mut b = good.clone();
    b[off + 1] ^= 0x04;
    let e = verify(&b).unwrap_err();
    assert!(
        matches!(e, ImageError::RegionCrc { index: 1, offset, .. } if offset == off as u64),
        "{e}"
    );
    assert_eq!(e.class(), FailureClass::Corrupt);

    // Matching CRC32 (forged in the table) but different bytes: the SHA-256 catches it.
    let mut b = good.clone();
    b[off..off + len].copy_from_slice(b"abd");
    put32(&mut b, entry(1) + 12, crc32fast::hash(b"abd"));
    reseal(&mut b, None);
    assert!(matches!(
        verify(&b),
        Err(ImageError::RegionDigest { index: 1, .. })
    ));

    // Padding after the 3-byte payload must be zero.
    let mut b = good.clone();
    b[off + len] = 9;
    assert!(matches!(
        verify(&b),
        Err(ImageError::NonZeroPadding { offset, value: 9 }) if offset == (off + len) as u64
    ));
}

#[test]
fn manifest_digest_covers_the_table() {
    let mut b = small_builder().build().unwrap();
    // Change a region's schema version without resealing: the header CRC still holds,
    // the manifest digest does not.
    b[entry(1) + 4] ^= 1;
    let e = verify(&b).unwrap_err();
    assert!(
        matches!(e, ImageError::ManifestDigest { offset } if offset == b.len() as u64 - 32),
        "{e}"
    );
}

#[test]
fn signatures() {
    let key = test_key();
    let keys = trusted(&key);
    let signed = small_builder().build_signed(&key).unwrap();
    let view = ImageView::parse(&signed).unwrap();
    assert!(view.header().signed);
    let opts = VerifyOptions {
        trusted_keys: Some(&keys),
        require_signature: true,
    };
    assert_eq!(
        view.verify(&opts).unwrap().signature,
        SignatureStatus::Verified {
            key_id: key.key_id()
        }
    );
    assert_eq!(
        view.verify(&VerifyOptions::default()).unwrap().signature,
        SignatureStatus::NotChecked {
            key_id: key.key_id()
        }
    );
    let e = view
        .verify(&VerifyOptions {
            trusted_keys: None,
            require_signature: true,
        })
        .unwrap_err();
    assert!(matches!(e, ImageError::SignatureNotChecked { .. }));
    assert_eq!(e.class(), FailureClass::Untrusted);

    // Signed by a key that is not trusted.
    let other = NodeKey::from_seed([9; 32]);
    let by_other = small_builder().build_signed(&other).unwrap();
    let e = ImageView::parse(&by_other)
        .unwrap()
        .verify(&opts)
        .unwrap_err();
    assert!(matches!(
        e,
        ImageError::Signature {
            source: KeyError::Untrusted { .. },
            ..
        }
    ));
    assert_eq!(e.class(), FailureClass::Untrusted);

    // A signature over other bytes (its last byte changed, the block CRC32 recomputed).
    let mut bad = signed.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    reseal_signature_block_crc(&mut bad);
    let e = ImageView::parse(&bad).unwrap().verify(&opts).unwrap_err();
    assert!(matches!(
        e,
        ImageError::Signature {
            source: KeyError::BadSignature { .. },
            ..
        }
    ));

    // Stripping the signature (clearing the flag, cutting the block, resealing) yields an
    // unsigned image, refused when a signature is required.
    let mut stripped = signed[..signed.len() - 100].to_vec();
    put32(&mut stripped, 12, 0);
    let len = stripped.len() as u64;
    put64(&mut stripped, 24, len);
    reseal(&mut stripped, None);
    let view = ImageView::parse(&stripped).unwrap();
    let e = view.verify(&opts).unwrap_err();
    assert!(matches!(e, ImageError::Unsigned));
    assert_eq!(e.class(), FailureClass::Untrusted);
}

#[test]
fn compatibility_rule_for_unknown_regions() {
    let mut b = ImageBuilder::new("6.12.0", [2; 16], 1).unwrap();
    b.region(RegionKind::Journal, 0, 1, true, &b"j"[..])
        .unwrap()
        .region(RegionKind::Unknown(0x7001), 0, 1, false, &b"future"[..])
        .unwrap();
    let bytes = b.build().unwrap();
    let report = verify(&bytes).unwrap();
    assert_eq!(report.skipped_unknown, vec![1]);

    let mut b = ImageBuilder::new("6.12.0", [2; 16], 1).unwrap();
    b.region(RegionKind::Unknown(0x7001), 0, 1, true, &b"future"[..])
        .unwrap();
    let bytes = b.build().unwrap();
    let e = verify(&bytes).unwrap_err();
    assert!(
        matches!(e, ImageError::UnknownRequiredRegion { index: 0, kind } if kind == RegionKind::Unknown(0x7001))
    );
    assert_eq!(e.class(), FailureClass::Incompatible);
}

#[test]
fn decode_errors() {
    let mut b = ImageBuilder::new("r", [0; 16], 0).unwrap();
    b.structured(RegionKind::TaskState, 0, 1, true, &(5u8, 6u8))
        .unwrap()
        .region(RegionKind::DeviceState, 0, 1, true, &[0xffu8; 3][..])
        .unwrap()
        .external(
            RegionKind::MemoryState,
            0,
            1,
            true,
            ExternalRef::of(1, b"m"),
        )
        .unwrap();
    let bytes = b.build().unwrap();
    let view = ImageView::parse(&bytes).unwrap();
    let r = view.regions();
    assert_eq!(view.decode::<(u8, u8)>(&r[0]).unwrap(), (5, 6));
    let e = view.decode::<u8>(&r[0]).unwrap_err();
    assert!(
        matches!(e, ImageError::Decode { index: 0, ref reason, .. } if reason.contains("trailing"))
    );
    assert!(matches!(
        view.decode::<u64>(&r[1]),
        Err(ImageError::Decode { index: 1, .. })
    ));
    assert!(matches!(
        view.decode::<u8>(&r[2]),
        Err(ImageError::NotInline {
            index: 2,
            token: 1,
            ..
        })
    ));
    assert!(matches!(r[2].data, RegionData::External(_)));
}

#[test]
fn builder_refusals() {
    for (release, reason) in [("", "empty"), ("a\0b", "NUL"), (&*"x".repeat(65), "64")] {
        let e = ImageBuilder::new(release, [0; 16], 0).unwrap_err();
        assert!(matches!(e, BuildError::ProducerRelease { .. }));
        assert!(e.to_string().contains(reason), "{e}");
    }
    assert!(ImageBuilder::new(&"x".repeat(64), [0; 16], 0).is_ok());
    let mut b = ImageBuilder::new("r", [0; 16], 0).unwrap();
    assert!(matches!(
        b.region(RegionKind::Unknown(0), 0, 0, false, &[][..]),
        Err(BuildError::ReservedKind)
    ));
    b.region(RegionKind::Journal, 1, 0, false, &[][..]).unwrap();
    // Unknown(6) is the journal kind: normalized, so it is a duplicate.
    assert!(matches!(
        b.region(RegionKind::Unknown(6), 1, 0, false, &[][..]),
        Err(BuildError::DuplicateRegion { region_id: 1, .. })
    ));
}

#[test]
fn zero_length_regions_and_many_regions() {
    let mut b = ImageBuilder::new("r", [0; 16], 0).unwrap();
    for i in 0..300u32 {
        let payload = vec![i as u8; (i % 13) as usize];
        b.region(RegionKind::WorkloadBlob, i, 1, i % 2 == 0, payload)
            .unwrap();
    }
    let bytes = b.build().unwrap();
    let view = ImageView::parse(&bytes).unwrap();
    assert_eq!(view.regions().len(), 300);
    assert_eq!(view.regions()[26].payload(), Some(&[26u8; 0][..]));
    assert_eq!(view.regions()[25].payload().unwrap(), &[25u8; 12][..]);
    view.verify(&VerifyOptions::default()).unwrap();
}

#[test]
fn messages_name_field_and_offset() {
    let mut b = small_builder().build().unwrap();
    put16(&mut b, entry(1) + 2, 4);
    reseal(&mut b, None);
    let msg = ImageView::parse(&b).unwrap_err().to_string();
    assert!(msg.contains("region 1"), "{msg}");
    assert!(msg.contains("flags"), "{msg}");
    assert!(msg.contains(&format!("offset {}", entry(1) + 2)), "{msg}");
}

/// Format 1.1: a signed image's block ends with a CRC32 of the signer key and signature,
/// checked with or without trusted keys. Before 1.1, a damaged block was reported as
/// "signature present, not checked" and the image passed without keys.
#[test]
fn signature_block_crc_is_written_and_checked_without_keys() {
    let key = test_key();
    let keys = trusted(&key);
    let unsigned = small_builder().build().unwrap();
    let signed = small_builder().build_signed(&key).unwrap();
    // Layout: digest (32), key (32), signature (64), CRC32 (4) = a 132-byte trailer.
    assert_eq!(signed.len(), unsigned.len() + 100);
    let view = ImageView::parse(&signed).unwrap();
    let block = view.header().manifest_offset as usize + 32;
    assert_eq!(block + 100, signed.len());
    let crc = crc32fast::hash(&signed[block..block + 96]);
    assert_eq!(le32(&signed, block + 96), crc);
    assert_eq!(view.header().signature_block_crc32, Some(crc));
    assert_eq!(
        view.verify(&VerifyOptions::default()).unwrap().signature,
        SignatureStatus::NotChecked {
            key_id: key.key_id()
        }
    );

    // Every byte of the block, and of the CRC field, flipped: refused without keys, and
    // with keys too (the CRC is checked first: a damaged block is corrupt, not untrusted).
    for at in block..signed.len() {
        let mut bad = signed.clone();
        bad[at] ^= 0x10;
        let view = ImageView::parse(&bad).unwrap();
        for opts in [
            VerifyOptions::default(),
            VerifyOptions {
                trusted_keys: Some(&keys),
                require_signature: true,
            },
        ] {
            let e = view.verify(&opts).unwrap_err();
            assert!(
                matches!(e, ImageError::SignatureBlockCrc { offset, crc_offset, .. }
                    if offset == block as u64 && crc_offset == (block + 96) as u64),
                "byte {at}: {e}"
            );
            assert_eq!(e.class(), FailureClass::Corrupt);
            let msg = e.to_string();
            assert!(msg.contains(&format!("offset {}", block + 96)), "{msg}");
        }
    }

    // A forged block with a matching CRC is still a bad signature for a key holder.
    let mut forged = signed.clone();
    forged[block + 40] ^= 1;
    reseal_signature_block_crc(&mut forged);
    let e = ImageView::parse(&forged)
        .unwrap()
        .verify(&VerifyOptions {
            trusted_keys: Some(&keys),
            require_signature: true,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Signature {
                source: KeyError::BadSignature { .. },
                ..
            }
        ),
        "{e}"
    );
}

/// A signed 1.0 image (no block CRC) still decodes and verifies with trusted keys; without
/// them its signature status says that nothing checked the block.
#[test]
fn signed_1_0_images_still_decode_and_say_the_block_is_unchecked() {
    let key = test_key();
    let keys = trusted(&key);
    let mut b = small_builder();
    b.format_minor(0);
    let signed = b.build_signed(&key).unwrap();
    assert_eq!(signed.len(), b.build().unwrap().len() + SIGNATURE_BLOCK_LEN);
    let view = ImageView::parse(&signed).unwrap();
    assert_eq!(view.header().minor, 0);
    assert_eq!(view.header().signature_block_crc32, None);
    let with_keys = VerifyOptions {
        trusted_keys: Some(&keys),
        require_signature: true,
    };
    assert_eq!(
        view.verify(&with_keys).unwrap().signature,
        SignatureStatus::Verified {
            key_id: key.key_id()
        }
    );
    let status = view.verify(&VerifyOptions::default()).unwrap().signature;
    assert_eq!(
        status,
        SignatureStatus::NotCheckedNoChecksum {
            key_id: key.key_id()
        }
    );
    assert!(!status.block_integrity_checked());
    let json = serde_json::to_value(status).unwrap();
    assert_eq!(json["status"], "not-checked-no-checksum");

    // The limitation 1.1 removes: without keys, a damaged 1.0 block goes unnoticed...
    let mut bad = signed.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let view = ImageView::parse(&bad).unwrap();
    assert!(matches!(
        view.verify(&VerifyOptions::default()).unwrap().signature,
        SignatureStatus::NotCheckedNoChecksum { .. }
    ));
    // ...and only a key holder catches it.
    assert!(matches!(
        view.verify(&with_keys),
        Err(ImageError::Signature { .. })
    ));
}

#[test]
fn newer_minor_may_grow_the_header_and_the_entries() {
    let mut b = ImageBuilder::new("r", [0; 16], 0).unwrap();
    b.region(RegionKind::Journal, 0, 1, true, &b"payload!"[..])
        .unwrap();
    let old = b.build().unwrap();
    // 1.0 layout: header [0,128), entry [128,208), payload [208,216), manifest [216,248).
    assert_eq!(old.len(), 248);
    // A "1.2" image: 8 more header bytes and 8 more bytes per entry, which a 1.1 reader
    // must skip: header [0,136), entry [136,224), payload [224,232), manifest [232,264).
    let mut new = Vec::new();
    new.extend_from_slice(&old[..128]);
    new.extend_from_slice(&[0xee; 8]);
    new.extend_from_slice(&old[128..208]);
    new.extend_from_slice(&[0xdd; 8]);
    new.extend_from_slice(&old[208..216]);
    new.extend_from_slice(&[0; 32]);
    put16(&mut new, 10, 2);
    put32(&mut new, 16, 136);
    put16(&mut new, 120, 88);
    let len = new.len() as u64;
    put64(&mut new, 24, len);
    put64(&mut new, 136 + 16, 224);
    reseal(&mut new, None);
    let view = ImageView::parse(&new).unwrap();
    assert_eq!(view.header().table_end, 224);
    assert_eq!(view.regions()[0].payload(), Some(&b"payload!"[..]));
    view.verify(&VerifyOptions::default()).unwrap();
    // The extension bytes are covered by the manifest digest.
    let mut tampered = new.clone();
    tampered[130] ^= 1;
    assert!(matches!(
        verify(&tampered),
        Err(ImageError::ManifestDigest { .. })
    ));
    // The same layout claiming this reader's minor (or an older one) is refused.
    for minor in [1, 0] {
        put16(&mut new, 10, minor);
        reseal(&mut new, None);
        assert_eq!(header_field_err(&new), ("header_len", 16));
    }
}

/// Images below `PARALLEL_MIN_BYTES` of inline payload are hashed on the calling thread,
/// larger ones across rayon's pool: both paths build the same digests and report the same
/// (first) corrupt region. (It checks that the two agree, not which one ran.)
#[test]
fn small_and_large_images_report_the_first_corrupt_region() {
    for each in [3usize, kho_proto::image::PARALLEL_MIN_BYTES / 2] {
        let payloads: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; each]).collect();
        let mut builder = ImageBuilder::new("6.12.0-mk-old", [0x11; 16], 3).unwrap();
        for (i, p) in payloads.iter().enumerate() {
            builder
                .region(RegionKind::WorkloadBlob, i as u32, 1, false, &p[..])
                .unwrap();
        }
        let good = builder.build().unwrap();
        let view = ImageView::parse(&good).unwrap();
        let inline: usize = view.regions().iter().map(|r| r.length as usize).sum();
        assert_eq!(
            inline >= kho_proto::image::PARALLEL_MIN_BYTES,
            each > 3,
            "the two cases take the two paths"
        );
        for (r, p) in view.regions().iter().zip(&payloads) {
            assert_eq!(r.crc32, crc32fast::hash(p), "the digest built for {each}");
        }
        let offsets: Vec<usize> = view.regions().iter().map(|r| r.offset as usize).collect();
        drop(view);
        verify(&good).unwrap();

        let mut b = good.clone();
        b[offsets[2]] ^= 1;
        let e = verify(&b).unwrap_err();
        assert!(matches!(e, ImageError::RegionCrc { index: 2, .. }), "{e}");
        b[offsets[1] + each - 1] ^= 1;
        let e = verify(&b).unwrap_err();
        assert!(
            matches!(e, ImageError::RegionCrc { index: 1, .. }),
            "{each}: {e}"
        );
    }
}
