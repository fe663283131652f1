//! Golden vectors of handover image formats 1.0, 1.1 (and a 1.2 stand-in), committed under
//! `tests/vectors/`.
//!
//! `golden_vectors_decode_forever` reads the committed files and must keep passing for as
//! long as format 1.x exists: a reader change that breaks it breaks compatibility with
//! images already written by deployed agents. The files are never rewritten by a normal
//! test run; `regenerate` (ignored) writes the missing ones, and is only for adding a new
//! vector.

use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt;

use kho_proto::image::{
    ExternalRef, ImageBuilder, ImageError, ImageView, RegionKind, SignatureStatus, VerifyOptions,
    verify_external,
};
use kho_proto::keys::{NodeKey, TrustedKeys};

const UPGRADE_ID: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];
const KEY_SEED: [u8; 32] = [0x5a; 32];
const EXTERNAL_TOKEN: u64 = 0x1234_5678;
const EXTERNAL_CONTENTS: &[u8] = b"golden external memfd contents\n";

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct GoldenManifest {
    target_release: String,
    generation: u64,
    workloads: Vec<String>,
}

fn golden_manifest() -> GoldenManifest {
    GoldenManifest {
        target_release: "6.19.0-mk-new".into(),
        generation: 42,
        workloads: vec!["kv-0".into(), "kv-1".into()],
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn key() -> NodeKey {
    NodeKey::from_seed(KEY_SEED)
}

/// The three-region image of `v1.0-signed-3-regions.bin`, in format 1.`minor`.
fn three_regions(minor: u16) -> ImageBuilder<'static> {
    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 42).unwrap();
    let device: Vec<u8> = (0u8..16).collect();
    b.format_minor(minor)
        .structured(RegionKind::AgentManifest, 0, 1, true, &golden_manifest())
        .unwrap()
        .region(RegionKind::DeviceState, 3, 2, true, device)
        .unwrap()
        .external(
            RegionKind::MemoryState,
            1,
            1,
            true,
            ExternalRef::of(EXTERNAL_TOKEN, EXTERNAL_CONTENTS),
        )
        .unwrap();
    b
}

/// The generators: (file name, bytes). The 1.0 vectors are written with
/// `format_minor(0)`: the builder writes 1.1 by default.
fn generate() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 1).unwrap();
    b.format_minor(0)
        .region(RegionKind::WorkloadBlob, 1, 1, false, &b"hello, kho"[..])
        .unwrap();
    out.push(("v1.0-unsigned-minimal.bin", b.build().unwrap()));

    out.push((
        "v1.0-signed-3-regions.bin",
        three_regions(0).build_signed(&key()).unwrap(),
    ));

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 2).unwrap();
    b.format_minor(0)
        .region(RegionKind::Journal, 0, 1, true, &b"journal"[..])
        .unwrap()
        .region(
            RegionKind::Unknown(0x7f01),
            0,
            1,
            false,
            &b"from the future"[..],
        )
        .unwrap();
    out.push(("v1.0-unknown-optional.bin", b.build().unwrap()));

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 3).unwrap();
    b.format_minor(0)
        .region(RegionKind::Journal, 0, 1, true, &b"journal"[..])
        .unwrap()
        .region(
            RegionKind::Unknown(0x7f02),
            0,
            1,
            true,
            &b"must understand"[..],
        )
        .unwrap();
    out.push(("v1.0-unknown-required.bin", b.build().unwrap()));

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 4).unwrap();
    b.format_minor(1)
        .region(
            RegionKind::Journal,
            0,
            1,
            true,
            &b"written by a 1.1 agent"[..],
        )
        .unwrap();
    out.push(("v1.1-newer-minor.bin", b.build().unwrap()));

    // Format 1.1 as this builder writes it by default: the signature block ends with the
    // CRC32 of the signer key and signature.
    out.push((
        "v1.1-signed-3-regions.bin",
        three_regions(1).build_signed(&key()).unwrap(),
    ));

    // A minor newer than this reader's, signed: the 1.1 signature block (with CRC32) is
    // kept by every later minor.
    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 5).unwrap();
    b.format_minor(2)
        .region(
            RegionKind::Journal,
            0,
            1,
            true,
            &b"written by a 1.2 agent"[..],
        )
        .unwrap();
    out.push((
        "v1.2-newer-minor-signed.bin",
        b.build_signed(&key()).unwrap(),
    ));

    out
}

fn read(name: &str) -> Vec<u8> {
    let p = dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("golden vector {} missing: {e}", p.display()))
}

/// `golden.pub` in a private trusted-keys directory: the checkout's own directory is not
/// a safe trust store for `TrustedKeys::load_dir` (its owner and modes are the
/// checkout's), so the key is copied into a fresh 0700 directory with mode 0644.
fn trusted() -> TrustedKeys {
    let store = tempfile::tempdir().unwrap();
    let p = store.path().join("golden.pub");
    std::fs::write(&p, read("golden.pub")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    TrustedKeys::load_dir(store.path()).unwrap()
}

#[test]
#[ignore = "writes tests/vectors/; run only to add a new vector, never to 'fix' a failing one"]
fn regenerate() {
    for (name, bytes) in generate() {
        let p = dir().join(name);
        // Never rewrite a committed vector: only add the missing ones.
        if !p.exists() {
            std::fs::write(p, bytes).unwrap();
        }
    }
    std::fs::write(
        dir().join(format!(
            "v1.0-signed-3-regions.external-{EXTERNAL_TOKEN:#x}.bin"
        )),
        EXTERNAL_CONTENTS,
    )
    .unwrap();
    std::fs::write(
        dir().join("golden.pub"),
        format!("{}\n", hex::encode(key().public())),
    )
    .unwrap();
}

#[test]
fn golden_vectors_decode_forever() {
    let keys = trusted();
    let strict = VerifyOptions {
        trusted_keys: Some(&keys),
        require_signature: false,
    };

    // Unsigned minimal.
    let bytes = read("v1.0-unsigned-minimal.bin");
    let view = ImageView::parse(&bytes).unwrap();
    let h = view.header();
    assert_eq!((h.major, h.minor), (1, 0));
    assert_eq!(h.producer_release, "6.12.0-mk");
    assert_eq!(h.upgrade_id, UPGRADE_ID);
    assert_eq!(h.generation, 1);
    assert!(!h.signed);
    let report = view.verify(&strict).unwrap();
    assert_eq!(report.signature, SignatureStatus::Unsigned);
    let r = &view.regions()[0];
    assert_eq!(r.kind, RegionKind::WorkloadBlob);
    assert_eq!(r.payload(), Some(&b"hello, kho"[..]));
    assert!(matches!(
        view.verify(&VerifyOptions {
            trusted_keys: Some(&keys),
            require_signature: true
        }),
        Err(ImageError::Unsigned)
    ));

    // Signed, three regions, one external.
    let bytes = read("v1.0-signed-3-regions.bin");
    let view = ImageView::parse(&bytes).unwrap();
    assert!(view.header().signed);
    assert_eq!(view.header().generation, 42);
    let report = view
        .verify(&VerifyOptions {
            trusted_keys: Some(&keys),
            require_signature: true,
        })
        .unwrap();
    assert_eq!(
        report.signature,
        SignatureStatus::Verified {
            key_id: key().key_id()
        }
    );
    assert_eq!(report.external, vec![2]);
    let regions = view.regions();
    assert_eq!(
        view.decode::<GoldenManifest>(&regions[0]).unwrap(),
        golden_manifest()
    );
    assert_eq!(regions[1].kind, RegionKind::DeviceState);
    assert_eq!(regions[1].schema_version, 2);
    assert_eq!(
        regions[1].payload().unwrap(),
        &(0u8..16).collect::<Vec<_>>()[..]
    );
    let ext = regions[2].external().unwrap();
    assert_eq!(ext.token, EXTERNAL_TOKEN);
    let contents = read(&format!(
        "v1.0-signed-3-regions.external-{EXTERNAL_TOKEN:#x}.bin"
    ));
    verify_external(&ext, &contents).unwrap();
    assert!(verify_external(&ext, b"other contents").is_err());

    // Unknown optional region: decodes, the region is skipped.
    let bytes = read("v1.0-unknown-optional.bin");
    let report = ImageView::parse(&bytes).unwrap().verify(&strict).unwrap();
    assert_eq!(report.skipped_unknown, vec![1]);

    // Unknown required region: refused as incompatible.
    let bytes = read("v1.0-unknown-required.bin");
    let e = ImageView::parse(&bytes)
        .unwrap()
        .verify(&strict)
        .unwrap_err();
    assert!(matches!(
        e,
        ImageError::UnknownRequiredRegion {
            index: 1,
            kind: RegionKind::Unknown(0x7f02)
        }
    ));

    // Written by a 1.0 reader's test as "a newer minor": an unsigned 1.1 image (1.1
    // changed only the signature block, so an unsigned 1.1 image is a 1.0 one with minor 1).
    let bytes = read("v1.1-newer-minor.bin");
    let view = ImageView::parse(&bytes).unwrap();
    assert_eq!(view.header().minor, 1);
    view.verify(&strict).unwrap();

    // A signed 1.0 image read without trusted keys: nothing checked its signature block.
    let bytes = read("v1.0-signed-3-regions.bin");
    let view = ImageView::parse(&bytes).unwrap();
    assert_eq!(view.header().signature_block_crc32, None);
    assert_eq!(
        view.verify(&VerifyOptions::default()).unwrap().signature,
        SignatureStatus::NotCheckedNoChecksum {
            key_id: key().key_id()
        }
    );

    // Format 1.1, signed: the same three regions, and a CRC32 after the signature.
    let bytes = read("v1.1-signed-3-regions.bin");
    assert_eq!(bytes.len(), read("v1.0-signed-3-regions.bin").len() + 4);
    let view = ImageView::parse(&bytes).unwrap();
    let h = view.header();
    assert_eq!((h.major, h.minor, h.generation), (1, 1, 42));
    let block = h.manifest_offset as usize + 32;
    assert_eq!(block + 100, bytes.len());
    assert_eq!(
        h.signature_block_crc32,
        Some(crc32fast::hash(&bytes[block..block + 96]))
    );
    let report = view
        .verify(&VerifyOptions {
            trusted_keys: Some(&keys),
            require_signature: true,
        })
        .unwrap();
    assert_eq!(
        report.signature,
        SignatureStatus::Verified {
            key_id: key().key_id()
        }
    );
    assert_eq!(
        view.verify(&VerifyOptions::default()).unwrap().signature,
        SignatureStatus::NotChecked {
            key_id: key().key_id()
        }
    );
    let regions = view.regions();
    assert_eq!(
        view.decode::<GoldenManifest>(&regions[0]).unwrap(),
        golden_manifest()
    );
    verify_external(&regions[2].external().unwrap(), &contents).unwrap();

    // A newer minor (1.2) is read by this (1.1) reader, its 1.1 signature block included.
    let bytes = read("v1.2-newer-minor-signed.bin");
    let view = ImageView::parse(&bytes).unwrap();
    assert_eq!(view.header().minor, 2);
    assert!(view.header().signature_block_crc32.is_some());
    let report = view
        .verify(&VerifyOptions {
            trusted_keys: Some(&keys),
            require_signature: true,
        })
        .unwrap();
    assert!(matches!(report.signature, SignatureStatus::Verified { .. }));
}

/// The audit's case: every one of the 768 bits of the signature block (and the 32 of its
/// CRC32) of the signed 1.1 vector, flipped, is refused WITHOUT trusted keys. (The same
/// flips in the 1.0 vector go unnoticed without keys: `NotCheckedNoChecksum` above.)
#[test]
fn every_bit_of_the_1_1_signature_block_is_checked_without_keys() {
    let good = read("v1.1-signed-3-regions.bin");
    let block = good.len() - 100;
    let mut bad = good.clone();
    for byte in block..good.len() {
        for bit in 0..8 {
            bad[byte] ^= 1 << bit;
            let e = ImageView::parse(&bad)
                .unwrap()
                .verify(&VerifyOptions::default())
                .unwrap_err();
            assert!(
                matches!(e, ImageError::SignatureBlockCrc { .. }),
                "byte {byte} bit {bit}: {e}"
            );
            bad[byte] ^= 1 << bit;
        }
    }
}

/// The writer still produces the committed bytes (ed25519 signatures are deterministic):
/// an accidental change to the encoder shows up here, not in a fleet.
#[test]
fn builder_still_writes_the_golden_bytes() {
    for (name, bytes) in generate() {
        assert!(read(name) == bytes, "{name}: the builder's output changed");
    }
}
