//! Verification against real prebuilt kernels: the pair `tests/vm/run` uses, found the way
//! `kernel-patches/get-test-kernels.sh` finds them (without building):
//!   1. `MK_TEST_KERNEL_A` / `MK_TEST_KERNEL_B` (any path; set both or neither),
//!   2. `MK_TEST_KERNELS_DIR` (a directory holding `bzImage-*-mkA` and `bzImage-*-mkB`),
//!   3. `../shared/kernels` beside the repository,
//!   4. the local kernel cache (`MK_KERNEL_CACHE`, default `/var/cache/mk-upgrade/kernels`).
//!
//! Files are named `bzImage-<uname -r>`, as `tests/vm/run` expects, so the name gives the
//! release to check against. Where no pair is found the tests report `SKIP <name>: <reason>`
//! and count as ignored (own harness: `harness = false`, libtest-mimic), never as passed.

use std::fs;
use std::path::{Path, PathBuf};

use kho_proto::keys::NodeKey;
use libtest_mimic::{Arguments, Trial};
use sha2::{Digest, Sha256};
use upgrade_agent::verify::{VerifyError, VerifyPolicy, bzimage, sign_image, verify_kernel_image};

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        with_kernels("real_headers_parse", real_headers_parse),
        with_kernels(
            "real_kernel_signed_and_verified",
            real_kernel_signed_and_verified,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// A test that needs the kernel pair: without it, `SKIP <name>: <reason>`, counted as ignored.
fn with_kernels(name: &'static str, test: fn(&Kernels)) -> Trial {
    mk_test_support::skippable(name, move || {
        test(&kernels()?);
        Ok(())
    })
}

/// The two test kernels and the releases their file names give.
struct Kernels {
    a: PathBuf,
    b: PathBuf,
    release_a: String,
    release_b: String,
}

impl Kernels {
    fn path(&self, tag: &str) -> &Path {
        if tag == "A" { &self.a } else { &self.b }
    }

    fn release(&self, tag: &str) -> &str {
        if tag == "A" {
            &self.release_a
        } else {
            &self.release_b
        }
    }
}

/// The release a test kernel's file name carries (`bzImage-<release>`).
fn release_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match name.strip_prefix("bzImage-") {
        Some(release) if !release.is_empty() => release.to_owned(),
        _ => panic!(
            "{}: test kernels are named bzImage-<uname -r> (as tests/vm/run expects)",
            path.display()
        ),
    }
}

fn pair(a: PathBuf, b: PathBuf) -> Kernels {
    Kernels {
        release_a: release_of(&a),
        release_b: release_of(&b),
        a,
        b,
    }
}

/// `bzImage-*-mkA` and `bzImage-*-mkB` in `dir`, if both are there.
fn pair_in(dir: &Path) -> Option<Kernels> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let find = |tag: &str| {
        names
            .iter()
            .find(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with("bzImage-") && n.ends_with(&format!("-mk{tag}"))
            })
            .cloned()
    };
    Some(pair(find("A")?, find("B")?))
}

/// The kernel pair, or why there is none. Settings that name kernels which are not there
/// fail the test: a pair asked for by name is never skipped.
fn kernels() -> Result<Kernels, String> {
    let a = std::env::var_os("MK_TEST_KERNEL_A").filter(|v| !v.is_empty());
    let b = std::env::var_os("MK_TEST_KERNEL_B").filter(|v| !v.is_empty());
    match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (PathBuf::from(a), PathBuf::from(b));
            for p in [&a, &b] {
                assert!(
                    p.is_file(),
                    "MK_TEST_KERNEL_A/B: {} is not a file",
                    p.display()
                );
            }
            return Ok(pair(a, b));
        }
        (None, None) => {}
        _ => panic!("set both MK_TEST_KERNEL_A and MK_TEST_KERNEL_B, or neither"),
    }
    if let Some(dir) = std::env::var_os("MK_TEST_KERNELS_DIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return Ok(pair_in(&dir).unwrap_or_else(|| {
            panic!(
                "MK_TEST_KERNELS_DIR: no bzImage-*-mkA and bzImage-*-mkB in {}",
                dir.display()
            )
        }));
    }
    // <repo>/../shared/kernels (this file's package sits one level below the repository).
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let shared = repo.parent().unwrap_or(repo).join("shared/kernels");
    if let Some(k) = pair_in(&shared) {
        return Ok(k);
    }
    let cache = std::env::var_os("MK_KERNEL_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/mk-upgrade/kernels"),
            PathBuf::from,
        );
    // Newest cache entry first, as get-test-kernels.sh picks it.
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort();
    if let Some(k) = entries.iter().rev().find_map(|(_, d)| pair_in(d)) {
        return Ok(k);
    }
    Err(format!(
        "no test kernels: MK_TEST_KERNEL_A/B unset, no bzImage-*-mkA/-mkB in {} or {}/* \
         (tests/vm/run builds them there)",
        shared.display(),
        cache.display()
    ))
}

fn real_headers_parse(k: &Kernels) {
    for tag in ["A", "B"] {
        let bytes = fs::read(k.path(tag)).unwrap();
        let info = bzimage::parse(&bytes).unwrap();
        assert_eq!(info.release, k.release(tag));
        assert!(info.version_string.starts_with(&info.release));
        assert!(info.boot_protocol >= (2, 12), "{:?}", info.boot_protocol);
        assert!(info.kernel_64 && info.can_load_above_4g && info.relocatable);
        assert!(info.setup_len + info.payload_len <= bytes.len() as u64);
    }
}

fn real_kernel_signed_and_verified(k: &Kernels) {
    // B's version without its local suffix ("7.3.4" for "7.3.4-mkB") is the floor the image
    // raises; the host's own floor is that version's x.y.0.
    let version = k.release_b.split('-').next().unwrap().to_owned();
    let host_floor = format!(
        "{}.0",
        version.split('.').take(2).collect::<Vec<_>>().join(".")
    );
    let image = k.b.clone();
    let bytes = fs::read(&image).unwrap();
    let work = tempfile::tempdir().unwrap();
    let key = NodeKey::from_seed([21; 32]);
    key.save(work.path(), "release").unwrap();
    let sig = sign_image(&bytes, &key, Some(version), 1_795_438_560).unwrap();
    let sig_path = work.path().join("mkB.sig");
    fs::write(&sig_path, sig.to_json()).unwrap();
    let policy = VerifyPolicy {
        trusted_keys_dir: work.path().to_owned(),
        allow_unsigned_insecure: false,
        running_release: k.release_a.clone(),
        floor: Some(host_floor),
        allow_downgrade: false,
    };
    let v = verify_kernel_image(&image, Some(&sig_path), &policy).unwrap();
    assert_eq!(v.info.release, k.release_b);
    assert_eq!(v.len, bytes.len() as u64);
    assert_eq!(v.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    // The digest matches the published checksum.
    let b_name = image.file_name().unwrap().to_string_lossy().into_owned();
    if let Ok(sums) = fs::read_to_string(image.with_file_name("SHA256SUMS")) {
        let line = sums
            .lines()
            .find(|l| l.ends_with(&b_name))
            .expect("SHA256SUMS lists mkB");
        assert!(line.starts_with(&hex::encode(v.sha256)), "{line}");
    }
    // The signature of B does not cover A: A's digest is not the signed one (a refusal as
    // untrusted; the variant decides the exit code, `verify_exit` in the mk-upgrade binary).
    let e = verify_kernel_image(&k.a, Some(&sig_path), &policy).unwrap_err();
    assert!(matches!(e, VerifyError::Tampered { .. }), "{e}");
}
