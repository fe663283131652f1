//! Verification against real prebuilt kernels (`/work/shared/kernels`, or the directory in
//! `MK_TEST_KERNELS_DIR`). Skipped, with a message, when they are absent.

use std::fs;
use std::path::PathBuf;

use kho_proto::keys::NodeKey;
use sha2::{Digest, Sha256};
use upgrade_agent::exit::Exit;
use upgrade_agent::verify::{VerifyPolicy, bzimage, sign_image, verify_kernel_image};

fn kernels() -> Option<PathBuf> {
    let dir = std::env::var_os("MK_TEST_KERNELS_DIR")
        .map_or_else(|| PathBuf::from("/work/shared/kernels"), PathBuf::from);
    if dir.join("bzImage-7.2.13-mkA").is_file() && dir.join("bzImage-7.2.13-mkB").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no prebuilt kernels in {} (set MK_TEST_KERNELS_DIR)",
            dir.display()
        );
        None
    }
}

#[test]
fn real_headers_parse() {
    let Some(dir) = kernels() else { return };
    for tag in ["A", "B"] {
        let bytes = fs::read(dir.join(format!("bzImage-7.2.13-mk{tag}"))).unwrap();
        let info = bzimage::parse(&bytes).unwrap();
        assert_eq!(info.release, format!("7.2.13-mk{tag}"));
        assert!(info.version_string.starts_with(&info.release));
        assert!(info.boot_protocol >= (2, 12), "{:?}", info.boot_protocol);
        assert!(info.kernel_64 && info.can_load_above_4g && info.relocatable);
        assert!(info.setup_len + info.payload_len <= bytes.len() as u64);
    }
}

#[test]
fn real_kernel_signed_and_verified() {
    let Some(dir) = kernels() else { return };
    let image = dir.join("bzImage-7.2.13-mkB");
    let bytes = fs::read(&image).unwrap();
    let work = tempfile::tempdir().unwrap();
    let key = NodeKey::from_seed([21; 32]);
    key.save(work.path(), "release").unwrap();
    let sig = sign_image(&bytes, &key, Some("7.2.13".into()), 1_795_438_560).unwrap();
    let sig_path = work.path().join("mkB.sig");
    fs::write(&sig_path, sig.to_json()).unwrap();
    let policy = VerifyPolicy {
        trusted_keys_dir: work.path().to_owned(),
        allow_unsigned_insecure: false,
        running_release: "7.2.13-mkA".into(),
        floor: Some("7.2.0".into()),
        allow_downgrade: false,
    };
    let v = verify_kernel_image(&image, Some(&sig_path), &policy).unwrap();
    assert_eq!(v.info.release, "7.2.13-mkB");
    assert_eq!(v.len, bytes.len() as u64);
    assert_eq!(v.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    // The digest matches the published checksum.
    if let Ok(sums) = fs::read_to_string(dir.join("SHA256SUMS")) {
        let line = sums
            .lines()
            .find(|l| l.ends_with("bzImage-7.2.13-mkB"))
            .expect("SHA256SUMS lists mkB");
        assert!(line.starts_with(&hex::encode(v.sha256)), "{line}");
    }
    // The signature of B does not cover A.
    let e =
        verify_kernel_image(&dir.join("bzImage-7.2.13-mkA"), Some(&sig_path), &policy).unwrap_err();
    assert_eq!(e.exit(), Exit::Untrusted, "{e}");
}
