//! `mk-upgrade inspect` end to end: exit codes, one-line reasons, human and JSON output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kho-proto/tests/vectors")
}

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mk-upgrade"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("run mk-upgrade")
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
    let keys = vectors().display().to_string();
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
    let keys = vectors().display().to_string();

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
    let keys = vectors().display().to_string();
    let o = inspect(&[p.to_str().unwrap(), "--trusted-keys", &keys]);
    assert_eq!(o.status.code(), Some(5));
    assert!(stderr_line(&o).contains("does not verify"));
}
