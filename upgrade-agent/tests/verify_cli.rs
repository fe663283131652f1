//! `mk-upgrade keys generate` and `mk-upgrade sign`, run as the operator runs them: the
//! real binary, its output and its documented exit codes (docs/cli.md).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use upgrade_agent::exit::Exit;
use upgrade_agent::verify::{VerifyPolicy, minimal_bzimage, verify_kernel_image};

fn mk(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mk-upgrade"))
        .args(args)
        .output()
        .expect("running mk-upgrade")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn generate(dir: &Path, name: &str) -> Output {
    mk(&[
        "keys".as_ref(),
        "generate".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
        "--name".as_ref(),
        name.as_ref(),
    ])
}

fn sign(image: &Path, key: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "sign".as_ref(),
        image.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    mk(&args)
}

fn stdout_field(o: &Output, label: &str) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(label).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| {
            panic!(
                "no {label:?} line in {:?}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
}

#[test]
fn generate_sign_verify() {
    let dir = tempfile::tempdir().unwrap();
    let keydir = dir.path().join("keys");
    fs::create_dir(&keydir).unwrap();
    let g = generate(&keydir, "ops");
    assert_eq!(code(&g), Exit::Ok as i32, "{g:?}");
    let id = stdout_field(&g, "key id:");
    assert_eq!(id.len(), 16, "{id}");
    let secret = keydir.join("ops.key");
    let public = keydir.join("ops.pub");
    assert!(secret.is_file() && public.is_file());
    // Refuses to overwrite; refuses a name that is a path.
    assert_eq!(code(&generate(&keydir, "ops")), Exit::Io as i32);
    assert_eq!(code(&generate(&keydir, "../x")), Exit::Usage as i32);

    let image = dir.path().join("new.bzImage");
    fs::write(&image, minimal_bzimage("7.3.1")).unwrap();
    let s = sign(&image, &secret, &["--floor", "7.3"]);
    assert_eq!(code(&s), Exit::Ok as i32, "{s:?}");
    assert_eq!(
        stdout_field(&s, "wrote:"),
        dir.path().join("new.bzImage.sig").display().to_string()
    );

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
    assert_eq!(v.signer.map(|k| k.to_string()), Some(id));
    assert_eq!(v.manifest.unwrap().version_floor.as_deref(), Some("7.3"));
}

#[test]
fn sign_refusals() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(code(&generate(dir.path(), "k")), Exit::Ok as i32);
    let secret = dir.path().join("k.key");
    let junk = dir.path().join("junk");
    fs::write(&junk, b"\x7fELF not a bzImage").unwrap();
    let o = sign(&junk, &secret, &[]);
    assert_eq!(code(&o), Exit::NotAKernel as i32, "{o:?}");
    assert!(!dir.path().join("junk.sig").exists());

    let image = dir.path().join("k.bzImage");
    fs::write(&image, minimal_bzimage("7.2.13")).unwrap();
    let o = sign(&image, &secret, &["--floor", "8.0"]);
    assert_eq!(code(&o), Exit::Usage as i32);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("above"),
        "{o:?}"
    );

    assert_eq!(
        code(&sign(&image, &dir.path().join("none.key"), &[])),
        Exit::Io as i32
    );
    assert_eq!(
        code(&sign(&dir.path().join("gone"), &secret, &[])),
        Exit::Io as i32
    );

    let custom = dir.path().join("custom.sig");
    let o = sign(&image, &secret, &["--out", custom.to_str().unwrap()]);
    assert_eq!(code(&o), Exit::Ok as i32, "{o:?}");
    assert!(custom.is_file());
}

#[test]
fn sign_reads_only_a_bounded_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(code(&generate(dir.path(), "k")), Exit::Ok as i32);
    let secret = dir.path().join("k.key");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Run with a deadline: a regression would block on the FIFO forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    let s = secret.clone();
    std::thread::spawn(move || {
        let _ = tx.send(sign(&f, &s, &[]));
    });
    let Ok(o) = rx.recv_timeout(std::time::Duration::from_secs(10)) else {
        // Unblock the reader before failing.
        let _ = fs::write(&fifo, b"x");
        panic!("sign blocked on a FIFO");
    };
    assert_eq!(code(&o), Exit::Io as i32, "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a regular file"),
        "{o:?}"
    );
    let o = sign(Path::new("/dev/zero"), &secret, &[]);
    assert_eq!(code(&o), Exit::Io as i32, "{o:?}");
}
