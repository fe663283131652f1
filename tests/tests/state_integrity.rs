//! The safety net itself, through the `mk-upgrade` binary: damaged state files are reported
//! (exit 4) and kept, a damaged journal is quarantined and refused until the operator
//! resolves it, a rollback never goes below the version floor, and the state directory is
//! private whatever the umask.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use mk_integration_tests::{Machine, Run, active, bin, kv};

/// Exit codes (`docs/cli.md`).
const CORRUPT: i32 = 4;
const INCOMPATIBLE: i32 = 6;
const PREFLIGHT_FAILED: i32 = 8;

fn run_cmd(mut c: Command) -> Run {
    let o = c.output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `journal.json.corrupt-*` files (quarantined, not resolved) of a state directory.
fn quarantined(state: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("journal.json.corrupt-")
                && p.extension().is_none_or(|e| e != "resolved" && e != "log")
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_damaged_journal_is_quarantined_and_refused_until_resolved() {
    let m = Machine::new(1);
    m.init();
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    // Killed after journal write 6 (of one workload: freeze, commit, committed): the workload
    // is frozen on the old instance and runs uncommitted on the new one.
    let r = m.run_env(
        &["apply", "--kernel", b.to_str().unwrap()],
        &[("MK_FAULT_CRASH_AFTER_WRITE", "6")],
    );
    assert_eq!(r.code, -1, "the agent must have been killed: {r:?}");
    assert!(!m.status()["upgrade_in_flight"].is_null());

    // One flipped bit in `seq` (outside the checksum in the previous format: the record was
    // then deleted as "already finished" and recover said there was nothing to do).
    let state = m.path("state");
    let journal = state.join("journal.json");
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = String::from_utf8_lossy(&bytes).find("\"seq\": ").unwrap() + "\"seq\": ".len();
    bytes[at] ^= 1;
    std::fs::write(&journal, &bytes).unwrap();

    let st = m.run(&["status"]);
    assert_eq!(st.code, CORRUPT, "{st:?}");
    assert!(!st.stdout.contains("no upgrade in flight"), "{st:?}");
    assert!(st.stdout.contains("UNKNOWN"), "{st:?}");
    // Kept under a name that says so, byte for byte.
    assert!(!journal.exists(), "moved aside");
    let q = quarantined(&state);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(std::fs::read(&q[0]).unwrap(), bytes);
    let qs = q[0].to_str().unwrap();
    // The steps after journal.json (the journal's log) are kept beside it.
    let log = format!("{qs}.log");
    assert!(std::path::Path::new(&log).exists(), "{log}");
    for want in [
        qs,
        "quarantined",
        "jq .",
        &log,
        ".resolved",
        "mk-upgrade status",
    ] {
        assert!(st.stderr.contains(want), "{want:?} missing: {}", st.stderr);
    }

    // Every later command sees it, and none starts an upgrade.
    for _ in 0..2 {
        let st = m.run(&["status", "--json"]);
        assert_eq!(st.code, CORRUPT, "{st:?}");
        let doc = st.json();
        assert_eq!(doc["journal_ok"], false, "{doc}");
        assert!(doc["errors"][0].as_str().unwrap().contains(qs), "{doc}");

        let rec = m.run(&["recover"]);
        assert_eq!(rec.code, CORRUPT, "{rec:?}");
        assert!(!rec.stdout.contains("no interrupted upgrade"), "{rec:?}");
        assert!(rec.stderr.contains(qs), "{rec:?}");
        let rec = m.run(&["recover", "--json"]);
        assert_eq!(rec.code, CORRUPT, "{rec:?}");
        assert_eq!(rec.json()["result"], "refused");

        let ap = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
        assert_eq!(ap.code, PREFLIGHT_FAILED, "{ap:?}");
        assert!(ap.stderr.contains("journal"), "{ap:?}");
        let rb = m.run(&["rollback"]);
        assert_eq!(rb.code, PREFLIGHT_FAILED, "{rb:?}");
        assert_eq!(m.run(&["history"]).code, 0);
    }
    assert_eq!(quarantined(&state), q);
    assert_eq!(std::fs::read(&q[0]).unwrap(), bytes);

    // The operator settled it by hand and marks it resolved: the journal is usable again,
    // and the quarantined file is kept.
    let resolved = PathBuf::from(format!("{qs}.resolved"));
    std::fs::rename(&q[0], &resolved).unwrap();
    let st = m.run(&["status"]);
    assert_eq!(st.code, 0, "{st:?}");
    assert!(st.stdout.contains("no upgrade in flight"), "{st:?}");
    assert_eq!(std::fs::read(&resolved).unwrap(), bytes);
}

#[test]
fn status_reports_a_damaged_slot_table() {
    let m = Machine::new(1);
    m.init();
    let table = m.path("state/slots/slots.json");
    assert!(table.exists());
    std::fs::write(&table, b"{ garbage").unwrap();
    let st = m.run(&["status"]);
    assert_eq!(st.code, CORRUPT, "{st:?}");
    assert!(
        st.stderr.contains("slots.json") && st.stderr.contains("damaged"),
        "{st:?}"
    );
    let st = m.run(&["status", "--json"]);
    assert_eq!(st.code, CORRUPT, "{st:?}");
    let doc = st.json();
    assert_eq!(doc["errors"].as_array().unwrap().len(), 1, "{doc}");
    assert!(
        doc["errors"][0].as_str().unwrap().contains("slots.json"),
        "{doc}"
    );
    // Not something a rollback can use either; the file is kept as is.
    let rb = m.run(&["rollback"]);
    assert_eq!(rb.code, CORRUPT, "{rb:?}");
    assert_eq!(std::fs::read(&table).unwrap(), b"{ garbage");
    // A damaged floor likewise.
    std::fs::write(m.path("state/slots/floor.json"), b"[]").unwrap();
    let st = m.run(&["status", "--json"]);
    assert_eq!(st.code, CORRUPT, "{st:?}");
    assert_eq!(st.json()["errors"].as_array().unwrap().len(), 2);
}

#[test]
fn rollback_never_goes_below_the_version_floor() {
    let m = Machine::new(1);
    let a = m.kernel("7.2.14-mkA");
    let b = m.kernel("7.2.17-mkB");
    let r = m.run(&["emu", "init", "--kernel", a.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    kv(m.addrs[0], "PING").unwrap();
    assert!(kv(m.addrs[0], "SET k v").unwrap().starts_with("OK"));
    // B carries the floor 7.2.17: once applied, nothing below it may run again.
    let sig = upgrade_agent::verify::sign_image(
        &std::fs::read(&b).unwrap(),
        &m.key,
        Some("7.2.17".into()),
        1_800_000_000,
    )
    .unwrap();
    std::fs::write(upgrade_agent::verify::default_sig_path(&b), sig.to_json()).unwrap();
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    let before = m.status();
    assert_eq!(before["version_floor"], "7.2.17");
    assert_eq!(before["slots"]["previous"]["release"], "7.2.14-mkA");
    let slots = std::fs::read(m.path("state/slots/slots.json")).unwrap();

    let r = m.run(&["rollback"]);
    assert_eq!(r.code, INCOMPATIBLE, "{r:?}");
    assert!(
        r.stderr.contains("7.2.14-mkA") && r.stderr.contains("floor 7.2.17"),
        "{r:?}"
    );
    let r = m.run(&["rollback", "--json"]);
    assert_eq!(r.code, INCOMPATIBLE, "{r:?}");
    assert_eq!(r.json()["result"], "refused");

    // Nothing changed.
    let after = m.status();
    let (id, kernel, names) = active(&after);
    assert_eq!((kernel.as_str(), names.len()), ("7.2.17-mkB", 1));
    assert_eq!(id, active(&before).0);
    assert_eq!(after["slots"], before["slots"]);
    assert_eq!(
        std::fs::read(m.path("state/slots/slots.json")).unwrap(),
        slots
    );
    assert_eq!(
        m.run(&["history", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(kv(m.addrs[0], "GET k").unwrap(), "VALUE v");
}

/// Halts the emulated machine of another state directory when dropped.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let mut c = Command::new(bin("mk-upgrade"));
        c.arg("--state-dir")
            .arg(&self.0)
            .args(["--platform", "emulated", "emu", "down"])
            .env("MK_AGENTD", bin("mk-agentd"));
        let _ = c.output();
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn state_is_private_whatever_the_umask() {
    let m = Machine::new(1);
    // A state directory the agent creates itself (with a missing parent), under umask 000.
    let state = m.path("private/state");
    let _down = Down(state.clone());
    let run = |args: &[&str]| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("umask 000; exec \"$0\" \"$@\"")
            .arg(bin("mk-upgrade"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--platform")
            .arg("emulated")
            .arg("--workloads")
            .arg(m.path("state/workloads.toml"))
            .arg("--trusted-keys")
            .arg(m.path("state/trusted-keys"))
            .args(args)
            .env("MK_AGENTD", bin("mk-agentd"))
            .env_remove("MK_STATE_DIR")
            .env_remove("RUST_LOG");
        run_cmd(c)
    };
    let a = m.path("bzImage-7.2.13-mkA");
    let r = run(&["emu", "init", "--kernel", a.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    kv(m.addrs[0], "PING").unwrap();
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let r = run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");

    assert_eq!(mode(&m.path("private")), 0o700, "created parent");
    assert_eq!(mode(&state), 0o700, "state dir");
    for d in ["history", "slots", "slots/images", "node-keys"] {
        assert_eq!(mode(&state.join(d)), 0o700, "{d}");
    }
    let mut files = vec![
        state.join("lock"),
        state.join("slots/slots.json"),
        state.join("workloads.toml"),
    ];
    for d in ["history", "slots/images"] {
        let entries: Vec<PathBuf> = std::fs::read_dir(state.join(d))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!entries.is_empty(), "{d}");
        files.extend(entries);
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // Whatever else lives in the state directory is behind its mode 0700; list what is
    // open to others for the record.
    let mut open = Vec::new();
    let mut stack = vec![state.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p.clone());
            }
            if !md.file_type().is_symlink() && !md.file_type().is_socket() && mode(&p) & 0o077 != 0
            {
                open.push(format!("{:o} {}", mode(&p), p.display()));
            }
        }
    }
    if !open.is_empty() {
        eprintln!("not private (protected by the state directory's mode): {open:#?}");
    }
}

#[test]
fn keys_generate_names_a_missing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nonexistent");
    let mut c = Command::new(bin("mk-upgrade"));
    c.args(["keys", "generate", "--dir"])
        .arg(&missing)
        .args(["--name", "k"]);
    let r = run_cmd(c);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains(missing.to_str().unwrap()),
        "{r:?}"
    );
    assert!(!r.stderr.contains("k.key"), "{r:?}");
}
