//! `mk-upgrade inspect` end to end: exit codes, one-line reasons, human and JSON output,
//! the signature block of format 1.0 and 1.1 images without trusted keys, and the bounded,
//! regular-file-only reading of every input.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kho_proto::image::{ExternalRef, ImageBuilder, RegionKind};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kho-proto/tests/vectors")
}

fn inspect(args: &[&str]) -> Output {
    inspect_within(args, Duration::from_secs(60))
}

/// Runs `mk-upgrade inspect ARGS`, killing it and failing the test if it has not ended
/// within `limit` (a command that blocks on a FIFO or reads /dev/zero forever).
fn inspect_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mk-upgrade"))
        .arg("inspect")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mk-upgrade");
    let started = Instant::now();
    while child.try_wait().expect("wait for mk-upgrade").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mk-upgrade inspect {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect mk-upgrade output")
}

/// A private trusted-keys directory with the vectors' `golden.pub` (a trust store must be
/// owned by root or the running user and writable by nobody else, which the checkout's
/// own directory need not be).
fn trust_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("golden.pub");
    std::fs::copy(vectors().join("golden.pub"), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn vector(name: &str) -> String {
    vectors().join(name).display().to_string()
}

fn stderr_line(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(s.trim_end().lines().count(), 1, "one line expected: {s:?}");
    assert!(s.starts_with("mk-upgrade inspect: "), "{s}");
    s
}

#[test]
fn verifies_a_signed_image_with_its_external_region() {
    let store = trust_store();
    let keys = store.path().display().to_string();
    let ext = format!(
        "0x12345678={}",
        vector("v1.0-signed-3-regions.external-0x12345678.bin")
    );
    let o = inspect(&[
        &vector("v1.0-signed-3-regions.bin"),
        "--trusted-keys",
        &keys,
        "--external",
        &ext,
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("format 1.0, verified"), "{out}");
    assert!(out.contains("signature         verified, key"), "{out}");
    assert!(out.contains("external-verified"), "{out}");

    let o = inspect(&[
        &vector("v1.0-signed-3-regions.bin"),
        "--json",
        "--trusted-keys",
        &keys,
    ]);
    assert_eq!(o.status.code(), Some(0));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["generation"], 42);
    assert_eq!(j["signature"]["status"], "verified");
    assert_eq!(j["regions"].as_array().unwrap().len(), 3);
    assert_eq!(j["regions"][2]["status"], "external-not-checked");
}

#[test]
fn exit_codes_and_reasons() {
    let store = trust_store();
    let keys = store.path().display().to_string();

    let o = inspect(&[&vector("missing.bin")]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr_line(&o).contains("missing.bin"));

    let o = inspect(&[&vector("README.md")]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr_line(&o).contains("magic"));

    let o = inspect(&[
        &vector("v1.0-unsigned-minimal.bin"),
        "--trusted-keys",
        &keys,
    ]);
    assert_eq!(o.status.code(), Some(5));
    assert!(stderr_line(&o).contains("not signed"));

    let o = inspect(&[&vector("v1.0-unknown-required.bin")]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr_line(&o).contains("unknown to this reader"));

    let o = inspect(&[
        &vector("v1.0-signed-3-regions.bin"),
        "--external",
        "nonsense",
    ]);
    assert_eq!(o.status.code(), Some(2));
    stderr_line(&o);

    let o = inspect(&[&vector("v1.0-unknown-required.bin"), "--json"]);
    assert_eq!(o.status.code(), Some(6));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["ok"], false);
    assert_eq!(j["exit"], 6);
}

#[test]
fn corrupt_byte_is_reported_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(vectors().join("v1.0-signed-3-regions.bin")).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x80; // inside the signature
    let p = dir.path().join("tampered.img");
    std::fs::write(&p, &bytes).unwrap();
    let store = trust_store();
    let keys = store.path().display().to_string();
    let o = inspect(&[p.to_str().unwrap(), "--trusted-keys", &keys]);
    assert_eq!(o.status.code(), Some(5));
    assert!(stderr_line(&o).contains("does not verify"));
}

/// Writes `bytes` with every bit of `[from, to)` flipped to `dir/name`.
fn flipped(dir: &Path, name: &str, mut bytes: Vec<u8>, from: usize, to: usize) -> PathBuf {
    for b in &mut bytes[from..to] {
        *b ^= 0xff;
    }
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The audit's finding: all 768 bits of the 96-byte signature block of the signed 1.0
/// vector flipped, inspected without trusted keys, used to print "verified" and exit 0.
/// Now a signed 1.0 image without keys is never "verified" (exit 5, the report says which
/// checks were not possible), and in format 1.1 the damaged block is refused as corrupt.
#[test]
fn a_damaged_signature_block_is_never_verified_without_keys() {
    let dir = tempfile::tempdir().unwrap();

    // 1.0: the block cannot be checked without keys; intact or damaged, not "verified".
    let v10 = std::fs::read(vectors().join("v1.0-signed-3-regions.bin")).unwrap();
    let n = v10.len();
    let damaged = flipped(dir.path(), "v1.0-damaged.bin", v10, n - 96, n);
    for file in [
        vector("v1.0-signed-3-regions.bin"),
        damaged.display().to_string(),
    ] {
        let o = inspect(&[&file]);
        assert_eq!(o.status.code(), Some(5), "{file}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("format 1.0, NOT verified"), "{out}");
        assert!(!out.contains(", verified"), "{out}");
        assert!(out.contains("integrity NOT checked"), "{out}");
        let reason = stderr_line(&o);
        assert!(reason.contains("NOT checked"), "{reason}");
        assert!(reason.contains("--trusted-keys"), "{reason}");

        let o = inspect(&[&file, "--json"]);
        assert_eq!(o.status.code(), Some(5));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["ok"], false);
        assert_eq!(j["exit"], 5);
        assert_eq!(j["signature"]["status"], "not-checked-no-checksum");
        assert!(j["reason"].as_str().unwrap().contains("no CRC32"), "{j}");
    }
    // With keys, the 1.0 damage is caught by the signature.
    let store = trust_store();
    let keys = store.path().display().to_string();
    let o = inspect(&[path_str(&damaged), "--trusted-keys", &keys]);
    assert_eq!(o.status.code(), Some(5));

    // 1.1: intact, without keys: verified (the signature said to be unchecked), exit 0.
    let o = inspect(&[&vector("v1.1-signed-3-regions.bin")]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("format 1.1, verified"), "{out}");
    assert!(
        out.contains("intact (block CRC32 verified), NOT checked"),
        "{out}"
    );
    assert!(out.contains("signature CRC32   0x"), "{out}");

    // 1.1, every bit of the 100-byte block (key, signature, CRC32) flipped, and a single
    // bit: refused as corrupt, without keys and with them.
    let v11 = std::fs::read(vectors().join("v1.1-signed-3-regions.bin")).unwrap();
    let n = v11.len();
    let all = flipped(dir.path(), "v1.1-damaged.bin", v11.clone(), n - 100, n);
    let mut one = v11;
    one[n - 60] ^= 0x08;
    let one_path = dir.path().join("v1.1-one-bit.bin");
    std::fs::write(&one_path, one).unwrap();
    for file in [&all, &one_path] {
        let o = inspect(&[path_str(file)]);
        assert_eq!(o.status.code(), Some(4));
        assert!(stderr_line(&o).contains("signature block CRC32 mismatch"));
        let o = inspect(&[path_str(file), "--trusted-keys", &keys]);
        assert_eq!(o.status.code(), Some(4));
    }
}

/// An image with one external region (token 1) that claims `length` bytes.
fn image_claiming(dir: &Path, length: u64) -> PathBuf {
    let mut b = ImageBuilder::new("6.12.0-mk", [7; 16], 1).unwrap();
    b.external(
        RegionKind::MemoryState,
        1,
        1,
        true,
        ExternalRef {
            token: 1,
            length,
            crc32: 0,
            sha256: [0; 32],
        },
    )
    .unwrap();
    let p = dir.join(format!("claims-{length}.img"));
    std::fs::write(&p, b.build().unwrap()).unwrap();
    p
}

/// `--external 1=/dev/zero` against a region claiming 2^64-1 bytes used to read forever.
/// A device is refused unread; a short regular file fails its length before any read.
#[test]
fn an_external_region_claiming_2_64_bytes_ends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_claiming(dir.path(), u64::MAX);
    let img = path_str(&img);

    let o = inspect_within(&[img, "--external", "1=/dev/zero"], Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(3));
    let reason = stderr_line(&o);
    assert!(reason.contains("/dev/zero"), "{reason}");
    assert!(
        reason.contains("a character device, not a regular file"),
        "{reason}"
    );

    let short = dir.path().join("short.bin");
    std::fs::write(&short, b"31 bytes of saved memfd content").unwrap();
    let spec = format!("1={}", short.display());
    let o = inspect_within(&[img, "--external", &spec], Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(4));
    let reason = stderr_line(&o);
    assert!(
        reason.contains("contents are 31 bytes, the table says 18446744073709551615"),
        "{reason}"
    );

    // A FIFO as the external file: refused, not waited on.
    let fifo = dir.path().join("ext.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let spec = format!("1={}", fifo.display());
    let o = inspect_within(&[img, "--external", &spec], Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr_line(&o).contains("a FIFO"));
}

/// A FIFO (or a device) as the image is refused without blocking: opening a FIFO for
/// reading used to wait for a writer, forever.
#[test]
fn a_fifo_or_device_as_the_image_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (file, kind) in [
        (path_str(&fifo), "a FIFO"),
        ("/dev/zero", "a character device"),
        (path_str(dir.path()), "a directory"),
    ] {
        let o = inspect_within(&[file], Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(3), "{file}");
        let reason = stderr_line(&o);
        assert!(reason.contains(kind), "{reason}");
        assert!(reason.contains("not a regular file"), "{reason}");
        let o = inspect_within(&[file, "--json"], Duration::from_secs(10));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (j["ok"].clone(), j["exit"].clone()),
            (false.into(), 3.into())
        );
    }
}

/// Files over the caps are refused by their size, unread (sparse files: nothing is
/// written, and reading them would take long).
#[test]
fn inputs_over_the_caps_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.img");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len((64 << 20) + 1).unwrap();
    let o = inspect_within(&[path_str(&huge)], Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(3));
    let reason = stderr_line(&o);
    assert!(reason.contains("67108865 bytes"), "{reason}");
    assert!(reason.contains("64 MiB"), "{reason}");

    // An external file of exactly the claimed length, but over 64 GiB.
    let length = (64u64 << 30) + 1;
    let img = image_claiming(dir.path(), length);
    let big = dir.path().join("big.ext");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(length)
        .unwrap();
    let spec = format!("1={}", big.display());
    let o = inspect_within(
        &[path_str(&img), "--external", &spec],
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(3));
    let reason = stderr_line(&o);
    assert!(reason.contains("64 GiB"), "{reason}");
}
