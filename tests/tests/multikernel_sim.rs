//! `--platform multikernel` driven end to end on the SIMULATED multikernel kernel
//! (`MK_MULTIKERNEL_SIM`): whole upgrades, rollbacks, injected kernel faults and a crash
//! recovery, with three real mk-demo-kv workloads moving between simulated instances, and
//! the exact kernel calls read back from the simulated kernel's recording.

use mk_integration_tests::{Machine, active, kv};
use upgrade_agent::platform::multikernel::sim::{SimFaults, SimKernel};

fn put(m: &Machine, n: usize, tag: &str) {
    for (i, a) in m.addrs.iter().enumerate() {
        for k in 0..n {
            assert!(
                kv(*a, &format!("SET {tag}-{i}-{k} v{k}"))
                    .unwrap()
                    .starts_with("OK")
            );
        }
    }
}

fn check(m: &Machine, n: usize, tag: &str) {
    for (i, a) in m.addrs.iter().enumerate() {
        for k in 0..n {
            assert_eq!(
                kv(*a, &format!("GET {tag}-{i}-{k}")).unwrap(),
                format!("VALUE v{k}"),
                "{tag}-{i}-{k} lost"
            );
        }
    }
}

fn sim(m: &Machine) -> SimKernel {
    SimKernel::open(&m.sim_dir(), None).unwrap()
}

fn calls(m: &Machine, call: &str) -> Vec<serde_json::Value> {
    sim(m)
        .calls()
        .into_iter()
        .filter(|c| c["call"] == call)
        .collect()
}

/// The simulated pool is cpus 0-1 of this machine (its agents pin themselves there).
fn need_two_cpus() {
    let n = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(
        n >= 2,
        "the simulated pool needs cpus 0 and 1; this machine has {n}"
    );
}

#[test]
fn upgrade_and_rollback_move_every_workload_with_the_patch_sets_calls() {
    need_two_cpus();
    let m = Machine::multikernel_sim(2);
    m.init();
    put(&m, 20, "a");
    let st = m.status();
    assert_eq!(active(&st).0, 1);
    assert!(
        st.to_string().contains("SIMULATED"),
        "status names the simulated kernel: {st}"
    );

    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "apply: {r:?}");
    assert!(
        r.stdout.contains("[multikernel: SIMULATED kernel]"),
        "the result names the simulated kernel: {}",
        r.stdout
    );
    let (id, release, names) = active(&m.status());
    assert_eq!((id, release.as_str()), (2, "7.2.13-mkB"));
    assert_eq!(names.len(), 2);
    check(&m, 20, "a");

    // The calls the patch set documents, in order, for instance 2.
    let k = calls(&m, "kexec_file_load");
    let load2 = k
        .iter()
        .find(|c| c["id"] == 2 && c["unload"].is_null())
        .unwrap();
    assert_eq!(
        load2["flags"],
        0x10 | (2 << 5) | 0x4,
        "MULTIKERNEL | id << 5 | NO_INITRAMFS"
    );
    let unload1 = k
        .iter()
        .find(|c| c["id"] == 1 && c["unload"] == true)
        .unwrap();
    assert_eq!(unload1["flags"], 0x1 | 0x10 | (1 << 5));
    let reboots: Vec<(u64, u64)> = calls(&m, "reboot")
        .iter()
        .map(|c| (c["cmd"].as_u64().unwrap(), c["id"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        reboots,
        [(0x4D4B_4C49, 1), (0x4D4B_4C49, 2), (0x4D4B_4C48, 1)],
        "start 1, start 2, halt 1"
    );
    let st = sim(&m).state().unwrap();
    assert_eq!(
        st.instances.len(),
        1,
        "the old instance was removed: {st:?}"
    );
    assert_eq!(
        st.instances[0].cpus,
        [0, 1],
        "cpus moved to the new instance"
    );
    assert_eq!(st.instances[0].status, "active");
    // Every overlay transaction the upgrade wrote was applied.
    let txs = std::fs::read_dir(m.sim_dir().join("sys/overlays")).unwrap();
    for t in txs.flatten().filter(|e| e.file_name() != "new") {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap();
        assert_eq!(s.trim(), "applied", "{}", t.path().display());
    }

    put(&m, 5, "b");
    let r = m.run(&["rollback", "--json"]);
    assert_eq!(r.code, 0, "rollback: {r:?}");
    let (id, release, _) = active(&m.status());
    assert_eq!((id, release.as_str()), (1, "7.2.13-mkA"));
    check(&m, 20, "a");
    check(&m, 5, "b");
}

#[test]
fn kernel_faults_roll_back_and_leave_the_old_instance_serving() {
    need_two_cpus();
    let m = Machine::multikernel_sim(1);
    m.init();
    put(&m, 10, "a");
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let cases: Vec<(&str, SimFaults, &str)> = vec![
        (
            "create refused with EBUSY",
            SimFaults {
                errno: [("overlay".to_owned(), "EBUSY".to_owned())].into(),
                ..SimFaults::default()
            },
            "overlay refused",
        ),
        (
            "a failed overlay transaction",
            SimFaults {
                overlay_failed: 1,
                ..SimFaults::default()
            },
            "status failed",
        ),
        (
            "kexec_file_load refused with EPERM",
            SimFaults {
                errno: [("kexec_load".to_owned(), "EPERM".to_owned())].into(),
                ..SimFaults::default()
            },
            "kexec_file_load",
        ),
        (
            "an instance that never becomes active",
            SimFaults {
                never_active: true,
                ..SimFaults::default()
            },
            "did not become active",
        ),
        (
            "an active instance whose agent never answers",
            SimFaults {
                agent_silent: true,
                ..SimFaults::default()
            },
            "agent did not answer",
        ),
    ];
    for (what, faults, reason) in cases {
        sim(&m).set_faults(&faults).unwrap();
        let r = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
        sim(&m).set_faults(&SimFaults::default()).unwrap();
        assert_ne!(r.code, 0, "{what}: {r:?}");
        let doc = r.json();
        assert!(
            doc.to_string().contains(reason),
            "{what}: the reason names the failure ({reason}): {doc}"
        );
        let (id, release, names) = active(&m.status());
        assert_eq!(
            (id, release.as_str(), names.len()),
            (1, "7.2.13-mkA", 1),
            "{what}"
        );
        check(&m, 10, "a");
        let st = sim(&m).state().unwrap();
        assert_eq!(st.instances.len(), 1, "{what}: nothing left behind: {st:?}");
    }
    // Then a clean upgrade still works.
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "apply after the faults: {r:?}");
    check(&m, 10, "a");
}

#[test]
fn a_halt_that_never_parks_is_forced_and_one_that_never_parks_at_all_is_reported() {
    need_two_cpus();
    let m = Machine::multikernel_sim(1);
    m.init();
    put(&m, 5, "a");
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    sim(&m)
        .set_faults(&SimFaults {
            halt_never_parks: true,
            ..SimFaults::default()
        })
        .unwrap();
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 0, "apply: {r:?}");
    let cmds: Vec<u64> = calls(&m, "reboot")
        .iter()
        .filter(|c| c["id"] == 1)
        .map(|c| c["cmd"].as_u64().unwrap())
        .collect();
    assert_eq!(
        cmds,
        [0x4D4B_4C49, 0x4D4B_4C48, 0x4D4B_4C46],
        "start, halt, force halt"
    );
    check(&m, 5, "a");
}

#[test]
fn check_names_every_missing_piece_on_a_host_without_the_patch_set() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        !std::path::Path::new("/sys/fs/multikernel").exists(),
        "this test expects a host without the multikernel patch set"
    );
    let out = std::process::Command::new(mk_integration_tests::bin("mk-upgrade"))
        .args(["--state-dir"])
        .arg(dir.path())
        .args(["--platform", "multikernel", "check", "--json"])
        .env_remove("MK_MULTIKERNEL_SIM")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(8),
        "pre-flight failed exit code: {out:?}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&str> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for piece in ["multikernel-fs", "kexec-flag", "vsock-transport"] {
        assert!(failed.contains(&piece), "{piece} named: {doc}");
    }
}

/// The journal writes of a clean one-workload upgrade on the simulated kernel.
fn journal_writes() -> Vec<String> {
    let m = Machine::multikernel_sim(1);
    m.init();
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    r.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["journaled"].as_str().map(str::to_owned))
        .collect()
}

/// The agent killed (SIGKILL) after every journal write of an upgrade in turn; `recover`
/// (a new process, the same simulated kernel) must end fully old or fully new with the
/// workload serving all its data, and no instance left behind in the kernel.
#[test]
fn a_crash_at_every_journal_write_converges_on_the_simulated_kernel() {
    need_two_cpus();
    let writes = journal_writes();
    assert!(writes.iter().any(|p| p == "handing-over"), "{writes:?}");
    for (i, phase) in writes.iter().enumerate() {
        let n = i + 1;
        let m = Machine::multikernel_sim(1);
        m.init();
        put(&m, 5, "a");
        let b = m.path("bzImage-7.2.13-mkB");
        m.sign(&b);
        let nstr = n.to_string();
        let r = m.run_env(
            &["apply", "--kernel", b.to_str().unwrap()],
            &[("MK_FAULT_CRASH_AFTER_WRITE", &nstr)],
        );
        assert_eq!(r.code, -1, "step {n} ({phase}): killed: {r:?}");
        let rec = m.run(&["recover", "--json"]);
        assert_eq!(rec.code, 0, "step {n} ({phase}): {rec:?}");
        let doc = rec.json();
        let (_, kernel, names) = active(&m.status());
        assert_eq!(names.len(), 1, "step {n}: the workload runs");
        let want = if phase == "handing-over" {
            ("upgraded", "7.2.13-mkB")
        } else {
            ("rolled-back", "7.2.13-mkA")
        };
        assert_eq!(
            (doc["result"].as_str(), kernel.as_str()),
            (Some(want.0), want.1),
            "step {n} ({phase})"
        );
        check(&m, 5, "a");
        let st = sim(&m).state().unwrap();
        assert_eq!(st.instances.len(), 1, "step {n} ({phase}): {st:?}");
    }
}
