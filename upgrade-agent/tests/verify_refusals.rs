//! Kernel image verification: what is accepted, and every refusal with its typed variant
//! (the variant decides the exit code: `verify_exit` in the mk-upgrade binary).

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use kho_proto::keys::{KeyError, NodeKey};
use sha2::{Digest, Sha256};
use upgrade_agent::sys::memfd::{self, IMAGE_SEALS};
use upgrade_agent::verify::{
    NotAKernelReason, SigFileError, VerifyError, VerifyPolicy, default_sig_path, minimal_bzimage,
    sign_image, verify_kernel_image,
};

struct Fixture {
    dir: tempfile::TempDir,
    key: NodeKey,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("trusted")).unwrap();
        let key = NodeKey::from_seed([11; 32]);
        key.save(&dir.path().join("trusted"), "release").unwrap();
        Fixture { dir, key }
    }

    fn policy(&self) -> VerifyPolicy {
        VerifyPolicy {
            trusted_keys_dir: self.dir.path().join("trusted"),
            allow_unsigned_insecure: false,
            running_release: "7.2.13-mkA".into(),
            floor: None,
            allow_downgrade: false,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bytes` as `name` without a signature.
    fn unsigned(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Writes a minimal image of `release` and signs it with `key`.
    fn signed_by(&self, name: &str, release: &str, floor: Option<&str>, key: &NodeKey) -> PathBuf {
        let img = minimal_bzimage(release);
        let p = self.unsigned(name, &img);
        let sig = sign_image(&img, key, floor.map(str::to_owned), 1_795_438_560).unwrap();
        fs::write(default_sig_path(&p), sig.to_json()).unwrap();
        p
    }

    fn signed(&self, name: &str, release: &str) -> PathBuf {
        self.signed_by(name, release, None, &self.key)
    }
}

fn refused(path: &Path, policy: &VerifyPolicy) -> VerifyError {
    verify_kernel_image(path, None, policy).expect_err("the image was accepted")
}

#[test]
fn signed_image_is_accepted_in_a_sealed_memfd() {
    let fx = Fixture::new();
    let p = fx.signed("new.bzImage", "7.2.13-mkB");
    let v = verify_kernel_image(&p, None, &fx.policy()).unwrap();
    let bytes = fs::read(&p).unwrap();
    assert_eq!(v.len, bytes.len() as u64);
    assert_eq!(v.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    assert_eq!(v.info.release, "7.2.13-mkB");
    assert_eq!(v.signer, Some(fx.key.key_id()));
    let m = v.manifest.as_ref().unwrap();
    assert_eq!(
        (m.kernel_release.as_str(), m.image_sha256),
        ("7.2.13-mkB", v.sha256)
    );
    assert!(v.warnings.is_empty());
    // The memfd is sealed, holds exactly the file's bytes, and cannot be written.
    assert!(memfd::seals(v.memfd.as_fd()).unwrap().contains(IMAGE_SEALS));
    assert_eq!(&v.map().unwrap()[..], &bytes[..]);
    let e = memfd::write_all(v.memfd.as_fd(), b"evil").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert_eq!(memfd::size(v.memfd.as_fd()).unwrap(), v.len);
}

#[test]
fn replacing_the_file_after_verification_does_not_change_what_boots() {
    let fx = Fixture::new();
    let p = fx.signed("new.bzImage", "7.2.13-mkB");
    let original = fs::read(&p).unwrap();
    let v = verify_kernel_image(&p, None, &fx.policy()).unwrap();
    // Overwrite the same inode in place.
    let mut f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(&vec![0xCC; original.len()]).unwrap();
    drop(f);
    assert_eq!(&v.map().unwrap()[..], &original[..]);
    assert_eq!(v.sha256, <[u8; 32]>::from(Sha256::digest(&original)));
}

#[test]
fn explicit_signature_path() {
    let fx = Fixture::new();
    let p = fx.signed("a.bzImage", "7.2.13-mkB");
    let other = fx.path("elsewhere.sig");
    fs::rename(default_sig_path(&p), &other).unwrap();
    assert!(matches!(
        refused(&p, &fx.policy()),
        VerifyError::Unsigned { .. }
    ));
    verify_kernel_image(&p, Some(&other), &fx.policy()).unwrap();
}

#[test]
fn unsigned_is_refused_unless_insecure_flag() {
    let fx = Fixture::new();
    let p = fx.unsigned("u.bzImage", &minimal_bzimage("7.2.13-mkB"));
    let e = refused(&p, &fx.policy());
    assert!(matches!(e, VerifyError::Unsigned { .. }), "{e}");
    assert!(e.to_string().contains("mk-upgrade sign"), "{e}");
    let mut policy = fx.policy();
    policy.allow_unsigned_insecure = true;
    let v = verify_kernel_image(&p, None, &policy).unwrap();
    assert!(v.manifest.is_none() && v.signer.is_none());
    assert!(v.warnings[0].contains("INSECURE"), "{:?}", v.warnings);
    // The insecure flag does not accept a non-kernel or a downgrade.
    let junk = fx.unsigned("junk", b"#!/bin/sh\necho not a kernel\n");
    assert!(matches!(
        refused(&junk, &policy),
        VerifyError::NotAKernel { .. }
    ));
    let old = fx.unsigned("old", &minimal_bzimage("7.1.0"));
    assert!(matches!(
        refused(&old, &policy),
        VerifyError::Downgrade { .. }
    ));
}

#[test]
fn tampered_image_is_refused_even_with_insecure_flag() {
    let fx = Fixture::new();
    let p = fx.signed("t.bzImage", "7.2.13-mkB");
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // one bit in the kernel body; the header still parses
    fs::write(&p, &bytes).unwrap();
    let mut policy = fx.policy();
    policy.allow_unsigned_insecure = true;
    let e = refused(&p, &policy);
    assert!(matches!(e, VerifyError::Tampered { .. }), "{e}");
    assert!(e.to_string().contains("tampered"), "{e}");
}

#[test]
fn signature_of_another_image_is_refused() {
    let fx = Fixture::new();
    let a = fx.signed("a.bzImage", "7.2.13-mkB");
    let b = fx.unsigned("b.bzImage", &minimal_bzimage("7.2.14"));
    fs::copy(default_sig_path(&a), default_sig_path(&b)).unwrap();
    assert!(matches!(
        refused(&b, &fx.policy()),
        VerifyError::Tampered { .. }
    ));
}

#[test]
fn untrusted_key_is_refused() {
    let fx = Fixture::new();
    let stranger = NodeKey::from_seed([99; 32]);
    let p = fx.signed_by("s.bzImage", "7.2.13-mkB", None, &stranger);
    let e = refused(&p, &fx.policy());
    assert!(
        matches!(e, VerifyError::UntrustedKey { key_id, .. } if key_id == stranger.key_id()),
        "{e}"
    );
    assert!(e.to_string().contains(&stranger.key_id().to_string()));
}

#[test]
fn edited_signature_file_is_refused() {
    let fx = Fixture::new();
    let p = fx.signed("e.bzImage", "7.2.13-mkB");
    let sig = default_sig_path(&p);
    let text = fs::read_to_string(&sig).unwrap();
    // Forge a higher creation time: still valid JSON, no longer what was signed.
    fs::write(&sig, text.replace("1795438560", "1795438561")).unwrap();
    let e = refused(&p, &fx.policy());
    assert!(matches!(e, VerifyError::BadSignature { .. }), "{e}");
    fs::write(&sig, "{ not json").unwrap();
    let e = refused(&p, &fx.policy());
    // Malformed (untrusted), not an I/O error.
    assert!(
        matches!(
            e,
            VerifyError::SignatureFile(SigFileError::Malformed { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains(".sig"), "{e}");
}

#[test]
fn trust_store_problems() {
    let fx = Fixture::new();
    let p = fx.signed("k.bzImage", "7.2.13-mkB");
    let mut policy = fx.policy();
    policy.trusted_keys_dir = fx.path("empty");
    fs::create_dir(&policy.trusted_keys_dir).unwrap();
    let e = refused(&p, &policy);
    // An empty trust store refuses (untrusted), it is not an I/O error.
    assert!(
        matches!(
            e,
            VerifyError::TrustStore {
                source: KeyError::NoTrustedKeys { .. },
                ..
            }
        ),
        "{e}"
    );
    policy.trusted_keys_dir = fx.path("missing");
    let e = refused(&p, &policy);
    assert!(
        matches!(
            e,
            VerifyError::TrustStore {
                source: KeyError::Io { .. },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    let fx = Fixture::new();
    let p = fx.signed("old.bzImage", "7.2.12");
    let e = refused(&p, &fx.policy());
    assert!(matches!(e, VerifyError::Downgrade { .. }), "{e}");
    let mut policy = fx.policy();
    policy.allow_downgrade = true;
    verify_kernel_image(&p, None, &policy).unwrap();
    // Same numbers, other suffix: not a downgrade.
    let same = fx.signed("same.bzImage", "7.2.13-aaa");
    verify_kernel_image(&same, None, &fx.policy()).unwrap();
}

#[test]
fn version_floor_is_never_bypassed() {
    let fx = Fixture::new();
    let p = fx.signed("f.bzImage", "7.2.13-mkB");
    let mut policy = fx.policy();
    policy.floor = Some("7.3.0".into());
    policy.allow_downgrade = true;
    let e = refused(&p, &policy);
    assert!(
        matches!(&e, VerifyError::BelowFloor { floor, .. } if floor == "7.3.0"),
        "{e}"
    );
    policy.floor = Some("7.2.13".into());
    verify_kernel_image(&p, None, &policy).unwrap();
    // A floor carried in the signed manifest is reported.
    let with_floor = fx.signed_by("g.bzImage", "7.2.13-mkB", Some("7.2.13"), &fx.key);
    let v = verify_kernel_image(&with_floor, None, &fx.policy()).unwrap();
    assert_eq!(v.manifest.unwrap().version_floor.as_deref(), Some("7.2.13"));
}

#[test]
fn non_kernels_are_refused() {
    let fx = Fixture::new();
    let policy = fx.policy();
    let not_kernel = |name: &str, bytes: &[u8], needle: &str| {
        let p = fx.unsigned(name, bytes);
        let e = refused(&p, &policy);
        assert!(matches!(e, VerifyError::NotAKernel { .. }), "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(needle) && msg.contains(name), "{name}: {msg}");
    };
    // Deterministic pseudo-random bytes.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let random: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    not_kernel("random", &random, "0xAA55");
    let good = minimal_bzimage("7.2.13-mkB");
    not_kernel("truncated-header", &good[..0x210], "too short");
    not_kernel("truncated-body", &good[..good.len() - 16], "truncated");
    let mut no_magic = good.clone();
    no_magic[0x202..0x206].copy_from_slice(b"\0\0\0\0");
    not_kernel("no-hdrs", &no_magic, "HdrS");
    let mut not_relocatable = good;
    not_relocatable[0x236] = 0x01;
    not_kernel("not-relocatable", &not_relocatable, "CONFIG_RELOCATABLE");
    not_kernel("empty", b"", "empty");
    // Neither a directory nor a FIFO is a kernel (and opening the FIFO does not hang).
    let e = refused(fx.dir.path(), &policy);
    assert!(
        matches!(
            e,
            VerifyError::NotAKernel {
                reason: NotAKernelReason::NotARegularFile,
                ..
            }
        ),
        "{e}"
    );
    let fifo = fx.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = refused(&fifo, &policy);
    assert!(e.to_string().contains("not a regular file"), "{e}");
    // A signed non-kernel is still not a kernel.
    let sig = sign_image(&minimal_bzimage("7.2.13"), &fx.key, None, 0).unwrap();
    let p = fx.unsigned("signed-junk", &random);
    fs::write(default_sig_path(&p), sig.to_json()).unwrap();
    assert!(matches!(
        refused(&p, &policy),
        VerifyError::NotAKernel {
            reason: NotAKernelReason::Header(_),
            ..
        }
    ));
}

#[test]
fn missing_file_is_an_io_error() {
    let fx = Fixture::new();
    let p = fx.path("nope.bzImage");
    let e = refused(&p, &fx.policy());
    assert!(matches!(e, VerifyError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope.bzImage"), "{e}");
}

#[test]
fn manifest_for_another_release_is_refused() {
    use upgrade_agent::verify::{ImageManifest, SignatureFile};
    let fx = Fixture::new();
    let img = minimal_bzimage("7.2.13-mkB");
    let p = fx.unsigned("r.bzImage", &img);
    // A trusted signer vouched for these bytes, but as another release.
    let manifest = ImageManifest::new(Sha256::digest(&img).into(), "7.2.14".into(), None, 0);
    fs::write(
        default_sig_path(&p),
        SignatureFile::sign(manifest, &fx.key).to_json(),
    )
    .unwrap();
    let e = refused(&p, &fx.policy());
    assert!(matches!(e, VerifyError::ReleaseMismatch { .. }), "{e}");
}
