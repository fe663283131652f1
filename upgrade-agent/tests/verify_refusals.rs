//! Kernel image verification: what is accepted, and every refusal with its typed variant
//! (the variant decides the exit code: `verify_exit` in the mk-upgrade binary).

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kho_proto::keys::{KeyError, NodeKey};
use sha2::{Digest, Sha256};
use upgrade_agent::sys::memfd::{self, IMAGE_SEALS};
use upgrade_agent::verify::{
    MAX_KERNEL_IMAGE, MAX_SIG_FILE, MalformedSig, NotAKernelReason, SigFileError, VerifiedImage,
    VerifyError, VerifyPolicy, default_sig_path, minimal_bzimage, sign_image, verify_kernel_image,
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
                reason: NotAKernelReason::NotARegularFile {
                    kind: "a directory"
                },
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

// --- Inputs that are not regular files, or too large: refused before they are opened. ---
//
// A FIFO used to block verification (the signature file was opened with a plain `open`,
// which waits for a writer) while `apply` held the upgrade lock. Every check below runs on
// another thread with a timeout, so a regression fails instead of hanging the suite.

/// How long a refusal may take (it takes microseconds; a blocked open takes forever).
const QUICK: Duration = Duration::from_secs(10);

/// Runs `verify_kernel_image(image, sig, policy)` on another thread; `None` if it did not
/// end within [`QUICK`] (then `unblock` runs, so the stuck thread can end).
fn verify_within(
    image: &Path,
    sig: Option<&Path>,
    policy: &VerifyPolicy,
    unblock: impl FnOnce(),
) -> Option<Result<VerifiedImage, VerifyError>> {
    let (tx, rx) = mpsc::channel();
    let (image, sig, policy) = (image.to_owned(), sig.map(Path::to_owned), policy.clone());
    std::thread::spawn(move || {
        let _ = tx.send(verify_kernel_image(&image, sig.as_deref(), &policy));
    });
    let started = Instant::now();
    let r = rx.recv_timeout(QUICK).ok();
    if r.is_none() {
        unblock();
    } else {
        assert!(started.elapsed() < QUICK);
    }
    r
}

/// The refusal of `image` (with `sig`), which must come within [`QUICK`].
fn refused_quickly(
    image: &Path,
    sig: Option<&Path>,
    policy: &VerifyPolicy,
    fifo: Option<&Path>,
) -> VerifyError {
    match verify_within(image, sig, policy, || {
        if let Some(f) = fifo {
            release_fifo(f);
        }
    }) {
        Some(Ok(_)) => panic!("{} was accepted", image.display()),
        Some(Err(e)) => e,
        None => panic!(
            "verifying {} (signature {:?}) did not end within {QUICK:?}: it blocked",
            image.display(),
            sig
        ),
    }
}

/// Opens `fifo` for writing without blocking and closes it: a reader blocked in `open`
/// then proceeds and reads end of file (this releases a thread of a failed test).
fn release_fifo(fifo: &Path) {
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

fn is_not_regular_image(e: &VerifyError, want: &str) -> bool {
    matches!(
        e,
        VerifyError::NotAKernel {
            reason: NotAKernelReason::NotARegularFile { kind },
            ..
        } if *kind == want
    )
}

fn is_not_regular_sig(e: &VerifyError, want: &str) -> bool {
    matches!(
        e,
        VerifyError::SignatureFile(SigFileError::NotARegularFile { kind, .. }) if *kind == want
    )
}

#[test]
fn a_fifo_as_the_image_is_refused_at_once() {
    let fx = Fixture::new();
    let fifo = fx.path("image.fifo");
    mkfifo(&fifo);
    let e = refused_quickly(&fifo, None, &fx.policy(), Some(&fifo));
    assert!(is_not_regular_image(&e, "a FIFO"), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("image.fifo") && msg.contains("a FIFO, not a regular file"),
        "{msg}"
    );
    // Whatever the policy: the insecure flag does not make a FIFO readable.
    let mut policy = fx.policy();
    policy.allow_unsigned_insecure = true;
    let e = refused_quickly(&fifo, None, &policy, Some(&fifo));
    assert!(is_not_regular_image(&e, "a FIFO"), "{e}");
    // Through a symbolic link too (the check follows it, as the open would).
    let link = fx.path("image.link");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let e = refused_quickly(&link, None, &policy, Some(&fifo));
    assert!(is_not_regular_image(&e, "a FIFO"), "{e}");
}

#[test]
fn dev_zero_as_the_image_is_refused_unread() {
    let fx = Fixture::new();
    let mut policy = fx.policy();
    policy.allow_unsigned_insecure = true;
    let e = refused_quickly(Path::new("/dev/zero"), None, &policy, None);
    assert!(is_not_regular_image(&e, "a character device"), "{e}");
    assert!(e.to_string().contains("/dev/zero"), "{e}");
}

#[test]
fn an_image_over_the_cap_is_refused_by_its_size_unread() {
    let fx = Fixture::new();
    // Sparse: no disk space, and never read (the size decides before the open).
    let big = fx.path("big.bzImage");
    fs::File::create(&big)
        .unwrap()
        .set_len(MAX_KERNEL_IMAGE + 1)
        .unwrap();
    let e = refused_quickly(&big, None, &fx.policy(), None);
    assert!(
        matches!(
            e,
            VerifyError::NotAKernel {
                reason: NotAKernelReason::TooLarge { len },
                ..
            } if len == MAX_KERNEL_IMAGE + 1
        ),
        "{e}"
    );
}

#[test]
fn a_fifo_as_the_signature_file_is_refused_at_once() {
    let fx = Fixture::new();
    let p = fx.signed("s.bzImage", "7.2.13-mkB");
    // `apply --signature FIFO`.
    let fifo = fx.path("sig.fifo");
    mkfifo(&fifo);
    let e = refused_quickly(&p, Some(&fifo), &fx.policy(), Some(&fifo));
    assert!(is_not_regular_sig(&e, "a FIFO"), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("sig.fifo") && msg.contains("not a regular file"),
        "{msg}"
    );
    // Not taken for "unsigned" by the insecure flag either: it is refused.
    let mut insecure = fx.policy();
    insecure.allow_unsigned_insecure = true;
    let e = refused_quickly(&p, Some(&fifo), &insecure, Some(&fifo));
    assert!(is_not_regular_sig(&e, "a FIFO"), "{e}");
    // IMAGE.sig itself a FIFO (the default signature path).
    let sig = default_sig_path(&p);
    fs::remove_file(&sig).unwrap();
    mkfifo(&sig);
    let e = refused_quickly(&p, None, &fx.policy(), Some(&sig));
    assert!(is_not_regular_sig(&e, "a FIFO"), "{e}");
    let e = refused_quickly(&p, None, &insecure, Some(&sig));
    assert!(is_not_regular_sig(&e, "a FIFO"), "{e}");
}

#[test]
fn a_device_directory_or_oversized_file_as_the_signature_is_refused_unread() {
    let fx = Fixture::new();
    let p = fx.signed("d.bzImage", "7.2.13-mkB");
    let e = refused_quickly(&p, Some(Path::new("/dev/zero")), &fx.policy(), None);
    assert!(is_not_regular_sig(&e, "a character device"), "{e}");
    let e = refused_quickly(&p, Some(fx.dir.path()), &fx.policy(), None);
    assert!(is_not_regular_sig(&e, "a directory"), "{e}");
    // A (sparse) file one byte over the cap: malformed, refused by its size.
    let big = fx.path("big.sig");
    fs::File::create(&big)
        .unwrap()
        .set_len(MAX_SIG_FILE + 1)
        .unwrap();
    let e = refused_quickly(&p, Some(&big), &fx.policy(), None);
    assert!(
        matches!(
            e,
            VerifyError::SignatureFile(SigFileError::Malformed {
                reason: MalformedSig::TooLarge,
                ..
            })
        ),
        "{e}"
    );
    // The real signature still verifies, through a symbolic link too.
    let link = fx.path("link.sig");
    std::os::unix::fs::symlink(default_sig_path(&p), &link).unwrap();
    match verify_within(&p, Some(&link), &fx.policy(), || ()) {
        Some(Ok(v)) => assert_eq!(v.signer, Some(fx.key.key_id())),
        other => panic!("{other:?}"),
    }
}

/// `mk-upgrade apply --signature FIFO` on a running (emulated) machine: exit 3 at once,
/// and the upgrade lock is free afterwards (a dry run of the same image with its real
/// signature passes). It used to block forever holding the lock.
#[test]
fn apply_with_a_fifo_signature_exits_3_at_once_and_frees_the_lock() {
    let fx = Fixture::new();
    let state = fx.path("state");
    fs::create_dir_all(state.join("trusted-keys")).unwrap();
    fs::copy(
        fx.path("trusted/release.pub"),
        state.join("trusted-keys/release.pub"),
    )
    .unwrap();
    let a = fx.unsigned("a.bzImage", &minimal_bzimage("7.2.13-mkA"));
    let b = fx.signed("b.bzImage", "7.2.13-mkB");
    let mk = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mk-upgrade"));
        c.arg("--state-dir")
            .arg(&state)
            .args(["--platform", "emulated"])
            .args(args)
            .env("MK_AGENTD", env!("CARGO_BIN_EXE_mk-agentd"))
            .env_remove("MK_STATE_DIR")
            .env_remove("MK_WORKLOADS")
            .env_remove("MK_TRUSTED_KEYS")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let init = run_within(
        mk(&[
            "emu".as_ref(),
            "init".as_ref(),
            "--kernel".as_ref(),
            a.as_os_str(),
        ]),
        QUICK,
    )
    .expect("emu init did not end");
    struct Down<F: Fn()>(F);
    impl<F: Fn()> Drop for Down<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _down = Down(|| {
        let _ = run_within(mk(&["emu".as_ref(), "down".as_ref()]), QUICK);
    });
    assert!(init.status.success(), "emu init: {init:?}");

    let fifo = fx.path("b.sig.fifo");
    mkfifo(&fifo);
    let apply = |sig: &Path| {
        mk(&[
            "apply".as_ref(),
            "--kernel".as_ref(),
            b.as_os_str(),
            "--signature".as_ref(),
            sig.as_os_str(),
            "--dry-run".as_ref(),
        ])
    };
    let started = Instant::now();
    let o = run_within(apply(&fifo), QUICK);
    release_fifo(&fifo);
    let o = o.unwrap_or_else(|| panic!("apply --signature FIFO blocked for {QUICK:?}"));
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(started.elapsed() < QUICK);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("b.sig.fifo") && stderr.contains("a FIFO, not a regular file"),
        "{stderr}"
    );
    // /dev/zero as the signature: the same refusal, nothing read.
    let o = run_within(apply(Path::new("/dev/zero")), QUICK).expect("apply blocked");
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    // The lock was released: the real signature passes the same dry run.
    let o = run_within(apply(&default_sig_path(&b)), QUICK).expect("apply blocked");
    assert!(o.status.success(), "{o:?}");
}

/// Runs `cmd`; `None` (after killing it) if it has not exited within `limit`.
fn run_within(mut cmd: Command, limit: Duration) -> Option<std::process::Output> {
    let mut child = cmd.spawn().expect("spawning mk-upgrade");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waiting").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(child.wait_with_output().expect("collecting output"))
}
