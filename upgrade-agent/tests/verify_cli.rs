//! `mk-upgrade keys generate` and `mk-upgrade sign` (library entry points of the commands).

use std::fs;

use upgrade_agent::cli::keys;
use upgrade_agent::cli::sign::{self, SignArgs};
use upgrade_agent::exit::Exit;
use upgrade_agent::verify::{VerifyPolicy, minimal_bzimage, verify_kernel_image};

fn args(image: &std::path::Path, key: &std::path::Path) -> SignArgs {
    SignArgs {
        image: image.to_owned(),
        key: key.to_owned(),
        floor: None,
        out: None,
    }
}

#[test]
fn generate_sign_verify() {
    let dir = tempfile::tempdir().unwrap();
    let keydir = dir.path().join("keys");
    fs::create_dir(&keydir).unwrap();
    let (id, secret, public) = keys::generate(&keydir, "ops").unwrap();
    assert_eq!(id.to_string().len(), 16);
    assert!(secret.ends_with("ops.key") && public.ends_with("ops.pub"));
    // Refuses to overwrite.
    assert_eq!(keys::generate(&keydir, "ops").unwrap_err().0, Exit::Io);
    assert_eq!(keys::generate(&keydir, "../x").unwrap_err().0, Exit::Usage);

    let image = dir.path().join("new.bzImage");
    fs::write(&image, minimal_bzimage("7.3.1")).unwrap();
    let mut a = args(&image, &secret);
    a.floor = Some("7.3".into());
    let sig = sign::sign(&a).unwrap();
    assert_eq!(sig, dir.path().join("new.bzImage.sig"));

    // Only the public key is in the trusted directory.
    let trusted = dir.path().join("trusted");
    fs::create_dir(&trusted).unwrap();
    fs::copy(&public, trusted.join("ops.pub")).unwrap();
    let policy = VerifyPolicy {
        trusted_keys_dir: trusted,
        allow_unsigned_insecure: false,
        running_release: "7.2.13-mkA".into(),
        floor: None,
        allow_downgrade: false,
    };
    let v = verify_kernel_image(&image, None, &policy).unwrap();
    assert_eq!(v.signer, Some(id));
    assert_eq!(v.manifest.unwrap().version_floor.as_deref(), Some("7.3"));
}

#[test]
fn sign_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (_, secret, _) = keys::generate(dir.path(), "k").unwrap();
    let junk = dir.path().join("junk");
    fs::write(&junk, b"\x7fELF not a bzImage").unwrap();
    let (exit, msg) = sign::sign(&args(&junk, &secret)).unwrap_err();
    assert_eq!(exit, Exit::NotAKernel, "{msg}");
    assert!(!dir.path().join("junk.sig").exists());

    let image = dir.path().join("k.bzImage");
    fs::write(&image, minimal_bzimage("7.2.13")).unwrap();
    let mut a = args(&image, &secret);
    a.floor = Some("8.0".into());
    let (exit, msg) = sign::sign(&a).unwrap_err();
    assert_eq!(exit, Exit::Usage);
    assert!(msg.contains("above"), "{msg}");

    let missing = args(&image, &dir.path().join("none.key"));
    assert_eq!(sign::sign(&missing).unwrap_err().0, Exit::Io);
    let gone = args(&dir.path().join("gone"), &secret);
    assert_eq!(sign::sign(&gone).unwrap_err().0, Exit::Io);

    let mut a = args(&image, &secret);
    a.out = Some(dir.path().join("custom.sig"));
    assert_eq!(sign::sign(&a).unwrap(), dir.path().join("custom.sig"));
}
