//! Fuzz target: the handover image reader on arbitrary bytes.
//!
//! Runs what the agent runs on an image from another kernel: parse, full verification
//! (region CRC32/SHA-256, padding, manifest digest, signature block CRC32, signature
//! against a trusted key, compatibility rule), then decoding of every inline region. It
//! must never panic, whatever the bytes. The input is also tried with a freshly computed
//! header CRC, so the fuzzer gets past the CRC and explores the table and region checks,
//! and once more with a recomputed manifest digest and (signed images of format 1.1 and
//! later) signature block CRC32, to reach the signature and compatibility checks.
#![no_main]

use kho_proto::image::layout::{
    DIGEST_LEN, HEADER_CRC_COVERAGE, HEADER_LEN, SIGNATURE_BLOCK_LEN, trailer_offset,
};
use kho_proto::image::{ImageView, VerifyOptions, verify_external};
use kho_proto::keys::{NodeKey, TrustedKeys};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn run(data: &[u8], keys: &TrustedKeys) {
    let Ok(view) = ImageView::parse(data) else {
        return;
    };
    for opts in [
        VerifyOptions::default(),
        VerifyOptions {
            trusted_keys: Some(keys),
            require_signature: true,
        },
    ] {
        let _ = view.verify(&opts);
    }
    for r in view.regions() {
        let _ = view.decode::<Vec<String>>(r);
        let _ = view.decode::<(u64, Vec<u8>)>(r);
        if let Some(e) = r.external() {
            let _ = verify_external(&e, data);
        }
    }
    let _ = view.header().producer_release.len();
}

fuzz_target!(|data: &[u8]| {
    let mut keys = TrustedKeys::default();
    let _ = keys.add(NodeKey::from_seed([0x5a; 32]).public(), "fuzz.pub".into());
    run(data, &keys);
    if data.len() >= HEADER_LEN {
        // Reseal: fix the header CRC, then the manifest digest and the signature block's
        // CRC32, so mutations reach the checks behind them (table, padding, signature,
        // compatibility).
        let mut fixed = data.to_vec();
        let crc = crc32fast::hash(&fixed[..HEADER_CRC_COVERAGE]);
        fixed[HEADER_CRC_COVERAGE..HEADER_CRC_COVERAGE + 4].copy_from_slice(&crc.to_le_bytes());
        run(&fixed, &keys);
        if let Ok(view) = ImageView::parse(&fixed) {
            let (end, at, block_crc) = (
                view.header().table_end as usize,
                view.header().manifest_offset as usize,
                view.header().signature_block_crc32.is_some(),
            );
            let digest = Sha256::digest(&fixed[..end]);
            fixed[at..at + DIGEST_LEN].copy_from_slice(&digest);
            if block_crc {
                let block = at + trailer_offset::PUBLIC_KEY;
                let crc = crc32fast::hash(&fixed[block..block + SIGNATURE_BLOCK_LEN]);
                let c = at + trailer_offset::SIGNATURE_BLOCK_CRC;
                fixed[c..c + 4].copy_from_slice(&crc.to_le_bytes());
            }
            run(&fixed, &keys);
        }
    }
});
