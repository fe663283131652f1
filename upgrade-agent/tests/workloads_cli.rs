//! `mk-upgrade workloads check`: what the NixOS module's build-time check runs.

use std::process::Command;

fn check(file: &std::path::Path, json: bool) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mk-upgrade"));
    c.args(["workloads", "check"]).arg(file);
    if json {
        c.arg("--json");
    }
    // No state directory is needed: point it somewhere that does not exist.
    c.env("MK_STATE_DIR", "/nonexistent/mk-upgrade-state");
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_file_lists_its_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.toml");
    std::fs::write(
        &f,
        "[[workload]]\nname = \"kv-1\"\nexec = \"/bin/true\"\n\n[[workload]]\nname = \"kv-2\"\nexec = \"/bin/true\"\n",
    )
    .unwrap();
    let (rc, out, err) = check(&f, true);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["workloads"], serde_json::json!(["kv-1", "kv-2"]));
    let (rc, out, _) = check(&f, false);
    assert_eq!(rc, 0);
    assert!(out.contains("valid, 2 workload(s): kv-1, kv-2"), "{out}");
}

#[test]
fn misspelt_key_is_named_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.toml");
    std::fs::write(
        &f,
        "[[workload]]\nname = \"kv\"\nexec = \"/bin/true\"\nhelth = { kind = \"tcp\" }\n",
    )
    .unwrap();
    let (rc, out, err) = check(&f, false);
    assert_eq!(rc, 2, "{out}{err}");
    assert!(err.contains("unknown field `helth`"), "{err}");
    let (rc, out, _) = check(&f, true);
    assert_eq!(rc, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["exit"], 2);
    assert_eq!(v["file"], f.display().to_string());
    assert!(v["error"].as_str().unwrap().contains("helth"));
}

#[test]
fn duplicate_names_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.toml");
    std::fs::write(
        &f,
        "[[workload]]\nname = \"kv\"\nexec = \"/bin/true\"\n\n[[workload]]\nname = \"kv\"\nexec = \"/bin/true\"\n",
    )
    .unwrap();
    let (rc, _, err) = check(&f, false);
    assert_eq!(rc, 2);
    assert!(err.contains("name is used by an earlier workload"), "{err}");
    let (rc, _, err) = check(&dir.path().join("missing.toml"), false);
    assert_eq!(rc, 3);
    assert!(err.contains("cannot read workload file"), "{err}");
}

#[test]
fn missing_default_file_declares_no_workload() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mk-upgrade"))
        .args(["workloads", "check", "--json"])
        .env("MK_STATE_DIR", dir.path())
        .env_remove("MK_WORKLOADS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["workloads"], serde_json::json!([]));
}
