//! Golden vectors of handover image format 1.0, committed under `tests/vectors/`.
//!
//! `golden_vectors_decode_forever` reads the committed files and must keep passing for as
//! long as format 1.x exists: a reader change that breaks it breaks compatibility with
//! images already written by deployed agents. The files are never rewritten by a normal
//! test run; `regenerate` (ignored) writes them, and is only for adding a new vector.

use std::path::{Path, PathBuf};

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

/// The generators: (file name, bytes).
fn generate() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 1).unwrap();
    b.region(RegionKind::WorkloadBlob, 1, 1, false, &b"hello, kho"[..])
        .unwrap();
    out.push(("v1.0-unsigned-minimal.bin", b.build().unwrap()));

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 42).unwrap();
    let device: Vec<u8> = (0u8..16).collect();
    b.structured(RegionKind::AgentManifest, 0, 1, true, &golden_manifest())
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
    out.push(("v1.0-signed-3-regions.bin", b.build_signed(&key()).unwrap()));

    let mut b = ImageBuilder::new("6.12.0-mk", UPGRADE_ID, 2).unwrap();
    b.region(RegionKind::Journal, 0, 1, true, &b"journal"[..])
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
    b.region(RegionKind::Journal, 0, 1, true, &b"journal"[..])
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

    out
}

fn read(name: &str) -> Vec<u8> {
    let p = dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("golden vector {} missing: {e}", p.display()))
}

fn trusted() -> TrustedKeys {
    TrustedKeys::load_dir(&dir()).unwrap()
}

#[test]
#[ignore = "writes tests/vectors/; run only to add a new vector, never to 'fix' a failing one"]
fn regenerate() {
    for (name, bytes) in generate() {
        std::fs::write(dir().join(name), bytes).unwrap();
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

    // A newer minor is read by this (1.0) reader.
    let bytes = read("v1.1-newer-minor.bin");
    let view = ImageView::parse(&bytes).unwrap();
    assert_eq!(view.header().minor, 1);
    view.verify(&strict).unwrap();
}

/// The writer still produces the committed bytes (ed25519 signatures are deterministic):
/// an accidental change to the encoder shows up here, not in a fleet.
#[test]
fn builder_still_writes_the_golden_bytes() {
    for (name, bytes) in generate() {
        assert!(read(name) == bytes, "{name}: the builder's output changed");
    }
}
