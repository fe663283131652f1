//! Property tests of the handover image: round trip, single-bit-flip mutation (every bit
//! of a small signed image, with and without trusted keys), arbitrary bytes, and replay of
//! fuzz-found inputs.

#[path = "image_helpers.rs"]
mod helpers;

use helpers::*;
use kho_proto::image::{
    ExternalRef, ImageBuilder, ImageError, ImageView, RegionKind, VerifyOptions,
};
use kho_proto::keys::NodeKey;
use proptest::prelude::*;

/// Full check as the agent runs it: parse, verify with trusted keys, require signature.
fn check(bytes: &[u8], opts: &VerifyOptions<'_>) -> Result<(), ImageError> {
    ImageView::parse(bytes)?.verify(opts).map(|_| ())
}

#[derive(Debug, Clone)]
enum Spec {
    Inline(u16, u32, u16, bool, Vec<u8>),
    External(u16, u32, u16, bool, u64, Vec<u8>),
}

fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![1u16..=6, 7u16..=u16::MAX];
    prop_oneof![
        (
            kind.clone(),
            any::<u32>(),
            any::<u16>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..200)
        )
            .prop_map(|(k, id, s, r, p)| Spec::Inline(k, id, s, r, p)),
        (
            kind,
            any::<u32>(),
            any::<u16>(),
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(k, id, s, r, t, p)| Spec::External(k, id, s, r, t, p)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn round_trip(
        release in "[a-z0-9.+-]{1,64}",
        upgrade_id in any::<[u8; 16]>(),
        generation in any::<u64>(),
        specs in proptest::collection::vec(spec(), 0..12),
        signed in any::<bool>(),
    ) {
        let mut b = ImageBuilder::new(&release, upgrade_id, generation).unwrap();
        let mut expected = Vec::new();
        for s in &specs {
            let (k, id) = match s { Spec::Inline(k, id, ..) | Spec::External(k, id, ..) => (*k, *id) };
            if expected.iter().any(|(ek, eid, _)| *ek == k && *eid == id) {
                continue; // duplicates are a builder error, tested elsewhere
            }
            match s {
                Spec::Inline(k, id, sv, req, p) => {
                    b.region(RegionKind::from_raw(*k), *id, *sv, *req, p.clone()).unwrap();
                }
                Spec::External(k, id, sv, req, tok, p) => {
                    b.external(RegionKind::from_raw(*k), *id, *sv, *req, ExternalRef::of(*tok, p)).unwrap();
                }
            }
            expected.push((k, id, s.clone()));
        }
        let key = test_key();
        let keys = trusted(&key);
        let bytes = if signed { b.build_signed(&key).unwrap() } else { b.build().unwrap() };
        let view = ImageView::parse(&bytes).unwrap();
        prop_assert_eq!(view.header().producer_release, release.as_str());
        prop_assert_eq!(view.header().upgrade_id, upgrade_id);
        prop_assert_eq!(view.header().generation, generation);
        prop_assert_eq!(view.regions().len(), expected.len());
        let any_unknown_required = expected.iter().any(|(k, _, s)| {
            let req = match s { Spec::Inline(_, _, _, r, _) | Spec::External(_, _, _, r, _, _) => *r };
            !RegionKind::from_raw(*k).is_known() && req
        });
        let result = view.verify(&VerifyOptions { trusted_keys: Some(&keys), require_signature: signed });
        if any_unknown_required {
            let is_unknown_required = matches!(result, Err(ImageError::UnknownRequiredRegion { .. }));
            prop_assert!(is_unknown_required);
        } else {
            prop_assert!(result.is_ok(), "{:?}", result);
        }
        for (r, (k, id, s)) in view.regions().iter().zip(&expected) {
            prop_assert_eq!(r.kind.raw(), *k);
            prop_assert_eq!(r.region_id, *id);
            match s {
                Spec::Inline(_, _, sv, req, p) => {
                    prop_assert_eq!(r.payload(), Some(&p[..]));
                    prop_assert_eq!(r.schema_version, *sv);
                    prop_assert_eq!(r.flags.required(), *req);
                }
                Spec::External(_, _, sv, req, tok, p) => {
                    prop_assert_eq!(r.external(), Some(ExternalRef::of(*tok, p)));
                    prop_assert_eq!(r.schema_version, *sv);
                    prop_assert_eq!(r.flags.required(), *req);
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = check(&bytes, &VerifyOptions::default());
    }

    #[test]
    fn arbitrary_tails_after_a_valid_header_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..1024),
        count in 0u32..8,
        signed in any::<bool>(),
    ) {
        // A valid, correctly sealed header over random table and payload bytes exercises
        // the table checks rather than stopping at the magic or CRC.
        let mut bytes = ImageBuilder::new("r", [0; 16], 0).unwrap().build().unwrap();
        bytes.truncate(128);
        bytes.extend_from_slice(&tail);
        put32(&mut bytes, 20, count);
        put32(&mut bytes, 12, u32::from(signed));
        let len = bytes.len() as u64;
        put64(&mut bytes, 24, len);
        reseal(&mut bytes, None);
        let _ = check(&bytes, &VerifyOptions::default());
    }

    #[test]
    fn random_multi_byte_corruption_is_rejected(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let key = test_key();
        let keys = trusted(&key);
        let good = small_builder().build_signed(&key).unwrap();
        let mut bad = good.clone();
        for (at, x) in &edits {
            bad[at.index(good.len())] ^= x;
        }
        prop_assume!(bad != good);
        let opts = VerifyOptions { trusted_keys: Some(&keys), require_signature: true };
        prop_assert!(check(&bad, &opts).is_err());
    }
}

/// Flips every bit of `good` (which `opts` accepts) in turn: each must be refused.
fn every_single_bit_flip_is_rejected(good: &[u8], opts: &VerifyOptions<'_>) {
    check(good, opts).unwrap();
    let mut bad = good.to_vec();
    for byte in 0..good.len() {
        for bit in 0..8 {
            bad[byte] ^= 1 << bit;
            assert!(
                check(&bad, opts).is_err(),
                "flip of byte {byte} bit {bit} (of {}) was accepted",
                good.len()
            );
            bad[byte] ^= 1 << bit;
        }
    }
}

/// Every single-bit flip of a small signed image (all of its bits, not a sample) is
/// rejected with an error: never accepted, never a panic. For the current format (1.1)
/// and for 1.0, verified with trusted keys.
#[test]
fn every_single_bit_flip_of_a_signed_image_is_rejected() {
    let key = test_key();
    let keys = trusted(&key);
    let opts = VerifyOptions {
        trusted_keys: Some(&keys),
        require_signature: true,
    };
    every_single_bit_flip_is_rejected(&small_builder().build_signed(&key).unwrap(), &opts);
    let mut b = small_builder();
    b.format_minor(0);
    every_single_bit_flip_is_rejected(&b.build_signed(&key).unwrap(), &opts);
}

/// A signed 1.1 image verified WITHOUT trusted keys: integrity alone (header CRC, region
/// CRC/SHA-256, zero padding, manifest digest, and the signature block's CRC32) catches
/// every single-bit flip of the whole file, the 100-byte signature block included.
#[test]
fn every_single_bit_flip_of_a_signed_1_1_image_is_rejected_without_keys() {
    let good = small_builder().build_signed(&test_key()).unwrap();
    assert_eq!(ImageView::parse(&good).unwrap().header().minor, 1);
    every_single_bit_flip_is_rejected(&good, &VerifyOptions::default());
}

/// The same for an unsigned image verified without keys: integrity alone (header CRC,
/// region CRC/SHA-256, zero padding, manifest digest) catches every single-bit flip.
#[test]
fn every_single_bit_flip_of_an_unsigned_image_is_rejected() {
    every_single_bit_flip_is_rejected(&small_builder().build().unwrap(), &VerifyOptions::default());
}

/// Every truncation of a valid image is rejected.
#[test]
fn every_truncation_is_rejected() {
    let good = small_builder().build_signed(&test_key()).unwrap();
    for len in 0..good.len() {
        assert!(
            check(&good[..len], &VerifyOptions::default()).is_err(),
            "{len}"
        );
    }
}

/// Inputs that ever crashed the `image` fuzz target (kept forever, see
/// `fuzz/regressions/README.md`), replayed through the calls that target makes.
#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/image");
    let keys = trusted(&NodeKey::from_seed([0x5a; 32]));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/image exists") {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        if let Ok(view) = ImageView::parse(&bytes) {
            let _ = view.verify(&VerifyOptions::default());
            let _ = view.verify(&VerifyOptions {
                trusted_keys: Some(&keys),
                require_signature: true,
            });
            for r in view.regions() {
                let _ = view.decode::<Vec<String>>(r);
                let _ = view.decode::<(u64, Vec<u8>)>(r);
            }
        }
        n += 1;
    }
    eprintln!("replayed {n} inputs from {}", dir.display());
}
