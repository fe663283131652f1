//! End to end on the emulated multikernel platform, through the `mk-upgrade` binary.

use mk_integration_tests::{Machine, active, kv};

fn put(m: &Machine, n: usize) {
    for (w, a) in m.addrs.iter().enumerate() {
        for i in 0..n {
            assert!(
                kv(*a, &format!("SET k{w}-{i} v{w}-{i}"))
                    .unwrap()
                    .starts_with("OK")
            );
        }
    }
}

fn check(m: &Machine, n: usize) {
    for (w, a) in m.addrs.iter().enumerate() {
        for i in 0..n {
            assert_eq!(
                kv(*a, &format!("GET k{w}-{i}")).unwrap(),
                format!("VALUE v{w}-{i}"),
                "workload {w} key {i}"
            );
        }
    }
}

#[test]
fn apply_then_rollback_keeps_every_write() {
    let m = Machine::new(2);
    m.init();
    put(&m, 20);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let dry = m.run(&[
        "apply",
        "--kernel",
        b.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.json()["result"], "dry-run");
    assert_eq!(
        active(&m.status()).1,
        "7.2.13-mkA",
        "dry run changes nothing"
    );

    let r = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["result"], "upgraded");
    assert_eq!(doc["kernel_before"], "7.2.13-mkA");
    assert_eq!(doc["kernel_after"], "7.2.13-mkB");
    for w in doc["workloads"].as_array().unwrap() {
        assert_eq!(w["moved"], true, "{w}");
        assert!(w["blackout_ms"].as_f64().unwrap() > 0.0);
    }
    let st = m.status();
    let (id, kernel, names) = active(&st);
    assert_eq!((id, kernel.as_str(), names.len()), (2, "7.2.13-mkB", 2));
    assert_eq!(st["slots"]["previous"]["release"], "7.2.13-mkA");
    // The restored processes live in the new instance's groups when cgroup v2 is used.
    for w in st["instances"][0]["workloads"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        if cg.contains("mk-upgrade-emulated") {
            let name = w["name"].as_str().unwrap();
            assert!(cg.contains(&format!("instance-2/{name}")), "{name}: {cg}");
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains("Cpus_allowed_list:\t0-1"),
            "pinned to the instance's cpus: {status}"
        );
    }
    assert_eq!(
        st["instances"][0]["resources"]["cpus"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "the new instance took every cpu: {st}"
    );
    check(&m, 20);
    put(&m, 30);

    let again = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
    assert_eq!(
        again.code, 14,
        "applying the running kernel is nothing to do: {again:?}"
    );

    let rb = m.run(&["rollback", "--json"]);
    assert_eq!(rb.code, 0, "{rb:?}");
    assert_eq!(rb.json()["kernel_after"], "7.2.13-mkA");
    let (_, kernel, names) = active(&m.status());
    assert_eq!((kernel.as_str(), names.len()), ("7.2.13-mkA", 2));
    check(&m, 30);

    let h = m.run(&["history", "--json"]).json();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["kind"], "apply");
    assert_eq!(h[1]["kind"], "rollback");
    assert!(h.iter().all(|r| r["result"] == "upgraded"));
}

#[test]
fn refused_images_change_nothing() {
    let m = Machine::new(1);
    m.init();
    put(&m, 5);
    let b = m.path("bzImage-7.2.13-mkB");
    let bs = b.to_str().unwrap();
    // Unsigned.
    let r = m.run(&["apply", "--kernel", bs]);
    assert_eq!(r.code, 5, "unsigned: {r:?}");
    assert!(r.stderr.contains("sig"), "{}", r.stderr);
    // Signed by a key that is not trusted.
    m.sign_with(&b, &kho_proto::keys::NodeKey::from_seed([7; 32]));
    let r = m.run(&["apply", "--kernel", bs]);
    assert_eq!(r.code, 5, "untrusted key: {r:?}");
    // Tampered after signing.
    m.sign(&b);
    let mut bytes = std::fs::read(&b).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&b, &bytes).unwrap();
    let r = m.run(&["apply", "--kernel", bs]);
    assert_eq!(r.code, 5, "tampered: {r:?}");
    // Downgrade.
    let old = m.kernel("7.1.0-old");
    m.sign(&old);
    let r = m.run(&["apply", "--kernel", old.to_str().unwrap()]);
    assert_eq!(r.code, 6, "downgrade: {r:?}");
    // Not a kernel (signed or not).
    let junk = m.path("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let r = m.run(&[
        "apply",
        "--kernel",
        junk.to_str().unwrap(),
        "--insecure-allow-unsigned",
    ]);
    assert_eq!(r.code, 7, "not a kernel: {r:?}");
    // Missing file.
    let r = m.run(&["apply", "--kernel", m.path("nope").to_str().unwrap()]);
    assert_eq!(r.code, 3, "missing: {r:?}");
    // JSON refusals are documents too.
    let r = m.run(&["apply", "--kernel", bs, "--json"]);
    assert_eq!(r.json()["result"], "refused");

    let st = m.status();
    let (id, kernel, names) = active(&st);
    assert_eq!((id, kernel.as_str(), names.len()), (1, "7.2.13-mkA", 1));
    assert!(st["upgrade_in_flight"].is_null());
    assert_eq!(
        m.run(&["history", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    check(&m, 5);
}

#[test]
fn a_second_apply_is_refused_while_one_holds_the_lock() {
    let m = Machine::new(1);
    m.init();
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let guard = rollback::Lock::acquire(&m.path("state")).unwrap();
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap()]);
    assert_eq!(r.code, 9, "{r:?}");
    assert!(r.stderr.contains("lock"), "{}", r.stderr);
    let c = m.run(&["check", "--json"]);
    assert_eq!(c.code, 8);
    assert!(
        c.json()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "lock" && c["ok"] == false)
    );
    // Every verb that changes the machine refuses while an upgrade holds the lock, and
    // changes nothing: `emu down` during an apply must not halt the instances under it.
    for verb in [&["emu", "down"][..], &["rollback"], &["recover"]] {
        let r = m.run(verb);
        assert_eq!(r.code, 9, "{verb:?}: {r:?}");
    }
    // With --json, a refusal is still one JSON document on stdout.
    for verb in [
        &["recover", "--json"][..],
        &["rollback", "--json"],
        &["apply", "--kernel", b.to_str().unwrap(), "--json"],
    ] {
        let r = m.run(verb);
        assert_eq!(r.code, 9, "{verb:?}: {r:?}");
        let doc = r.json();
        assert_eq!(doc["result"], "error", "{verb:?}: {doc}");
        assert_eq!(doc["exit"], 9, "{verb:?}: {doc}");
        assert!(doc["error"].as_str().unwrap().contains("lock"), "{doc}");
    }
    let (id, kernel, names) = active(&m.status());
    assert_eq!((id, kernel.as_str(), names.len()), (1, "7.2.13-mkA", 1));
    drop(guard);
    assert_eq!(m.run(&["check"]).code, 0);
}

#[test]
fn injected_faults_roll_back_and_lose_nothing() {
    let m = Machine::new(2);
    m.init();
    put(&m, 10);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    for (fault, check_name) in [("corrupt-region", "image"), ("health-fail", "unhealthy")] {
        let r = m.run(&[
            "apply",
            "--kernel",
            b.to_str().unwrap(),
            "--json",
            "--inject",
            fault,
        ]);
        assert_eq!(r.code, 10, "{fault}: {r:?}");
        let doc = r.json();
        assert_eq!(doc["result"], "rolled-back", "{fault}");
        assert!(
            doc["error"].as_str().unwrap().contains(check_name),
            "{fault}: {doc}"
        );
        assert!(
            doc["workloads"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["moved"] == false)
        );
        let (id, kernel, names) = active(&m.status());
        assert_eq!(
            (id, kernel.as_str(), names.len()),
            (1, "7.2.13-mkA", 2),
            "{fault}"
        );
        check(&m, 10);
    }
}

/// A two-workload machine with `keys` writes each, whose apply to kernel B was killed
/// (SIGKILL, as kill -9) right after journal write `n`; `ctx` names the case.
fn machine_killed_after_write(n: usize, keys: usize, ctx: &str) -> Machine {
    let m = Machine::new(2);
    m.init();
    put(&m, keys);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let nstr = n.to_string();
    let r = m.run_env(
        &["apply", "--kernel", b.to_str().unwrap()],
        &[("MK_FAULT_CRASH_AFTER_WRITE", &nstr)],
    );
    assert_eq!(r.code, -1, "{ctx}: the agent must have been killed: {r:?}");
    m
}

/// The journal write (1-based) that journals the second workload's freeze: after it kv-1
/// runs on instance 2 and kv-2 still on instance 1.
fn second_freeze_write(writes: &[String]) -> usize {
    writes
        .iter()
        .enumerate()
        .filter(|(_, p)| p.as_str() == "migrating")
        .nth(3)
        .map(|(i, _)| i + 1)
        .expect("four migrating writes for two workloads")
}

/// The journal writes of a clean two-workload upgrade, as its record lists them: the phase
/// journaled by each write, in order.
fn journal_writes() -> Vec<String> {
    let m = Machine::new(2);
    m.init();
    put(&m, 1);
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

/// Kill the agent after every journal write of an upgrade in turn (the list of writes is
/// read from a clean run's record, so an added step is covered without editing this test);
/// recovery must end fully old or fully new with every workload serving all its data: fully
/// new exactly when the write was of the hand-over phase.
#[test]
fn crash_at_every_journal_step_converges() {
    let writes = journal_writes();
    assert!(
        writes.len() >= 11 && writes.iter().any(|p| p == "handing-over"),
        "{writes:?}"
    );
    for (i, phase) in writes.iter().enumerate() {
        let n = i + 1;
        let m = machine_killed_after_write(n, 5, &format!("step {n} ({phase})"));
        let st = m.status();
        assert!(
            !st["upgrade_in_flight"].is_null(),
            "step {n}: journal shows the upgrade"
        );
        let rec = m.run(&["recover", "--json"]);
        assert_eq!(rec.code, 0, "step {n}: {rec:?}");
        let doc = rec.json();
        let (_, kernel, names) = active(&m.status());
        assert_eq!(names.len(), 2, "step {n}: both workloads run");
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
        assert_eq!(doc["recovered"], true);
        check(&m, 5);
        assert!(m.status()["upgrade_in_flight"].is_null());
    }
}

#[test]
fn a_fresh_machine_names_what_is_missing() {
    let m = Machine::new(1);
    // Nothing booted yet: check fails on the instance and says how to fix it.
    let c = m.run(&["check", "--json"]);
    assert_eq!(c.code, 8, "{c:?}");
    let checks = c.json()["checks"].clone();
    let inst = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "instance")
        .unwrap()
        .clone();
    assert_eq!(inst["ok"], false);
    assert!(inst["fix"].as_str().unwrap().contains("emu init"), "{inst}");
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    assert_eq!(m.run(&["apply", "--kernel", b.to_str().unwrap()]).code, 8);
    let r = m.run(&["recover", "--json"]);
    assert_eq!(
        (r.code, r.json()["result"].as_str()),
        (0, Some("nothing-to-recover"))
    );
    m.init();
    let r = m.run(&["rollback"]);
    assert_eq!(r.code, 14, "no previous kernel yet: {r:?}");
    assert!(r.stderr.contains("nothing to roll back"), "{}", r.stderr);
    // A broken workload file is a usage error naming the file.
    std::fs::write(m.path("bad.toml"), "[[workload]]\nname = \"x y\"\n").unwrap();
    let r = m.run(&[
        "--workloads",
        m.path("bad.toml").to_str().unwrap(),
        "apply",
        "--kernel",
        b.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 8, "{r:?}");
    assert!(
        r.stdout.contains("bad.toml") || r.stderr.contains("bad.toml"),
        "{r:?}"
    );
}

/// kill -9 of the OLD instance's supervisor in the middle of a migration (after the first
/// workload moved, as the second is about to freeze), with the apply killed too: recovery
/// must converge on the new instance. Nothing is left frozen, orphaned or running twice,
/// the moved workload keeps every write, the other is restarted (its state died with its
/// instance, and the record says so), `emu down` stops everything and a new `emu init`
/// succeeds (no port held by an orphan), and `recover --json` prints one JSON document.
#[test]
fn the_old_supervisor_dying_mid_migration_converges_on_the_new_instance() {
    let writes = journal_writes();
    let n = second_freeze_write(&writes);
    let m = machine_killed_after_write(n, 5, "mid-migration");
    // Kill the old instance's supervisor (its workloads are left running, orphaned).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor_pid(&m, 1)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let rec = m.run(&["recover", "--json"]);
    let doc = rec.json();
    assert_eq!(doc["result"], "failed", "{rec:?}");
    assert_eq!(rec.code, 12, "{rec:?}");
    assert!(
        doc["error"].as_str().unwrap().contains("kv-2"),
        "the record names the restarted workload: {doc}"
    );
    // Converged on instance 2: both workloads there, thawed, instance 1 gone.
    let st = m.status();
    let (id, kernel, names) = active(&st);
    assert_eq!((id, kernel.as_str()), (2, "7.2.13-mkB"), "{st}");
    assert_eq!(names.len(), 2, "{st}");
    assert!(st["upgrade_in_flight"].is_null());
    let insts = st["instances"].as_array().unwrap();
    assert_eq!(insts.len(), 1, "{st}");
    for w in insts[0]["workloads"].as_array().unwrap() {
        assert_eq!(w["frozen"], false, "{w}");
    }
    // The moved workload kept its writes; the restarted one answers (empty).
    for i in 0..5 {
        assert_eq!(
            kv(m.addrs[0], &format!("GET k0-{i}")).unwrap(),
            format!("VALUE v0-{i}"),
            "kv-1 kept its data"
        );
    }
    assert!(kv(m.addrs[1], "PING").is_ok());
    // Nothing is left behind: a full stop and a fresh start work.
    assert_eq!(m.run(&["emu", "down"]).code, 0);
    m.init();
    assert_eq!(active(&m.status()).2.len(), 2);
}

fn supervisor_pid(m: &Machine, instance: u64) -> i32 {
    let pool: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("state/emulated/pool.json")).unwrap())
            .unwrap();
    let pid = pool["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == instance)
        .and_then(|i| i["supervisor_pid"].as_i64())
        .expect("the instance's supervisor pid");
    i32::try_from(pid).unwrap()
}

/// kill -9 of the NEW instance's supervisor mid-migration (the apply killed too): recovery
/// converges on the old instance; the workload that had not moved keeps every write, the
/// one whose only copy died with the new instance is restarted (and the record says so).
#[test]
fn the_new_supervisor_dying_mid_migration_converges_on_the_old_instance() {
    let writes = journal_writes();
    let n = second_freeze_write(&writes);
    let m = machine_killed_after_write(n, 5, "mid-migration");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor_pid(&m, 2)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let rec = m.run(&["recover", "--json"]);
    let doc = rec.json();
    assert_eq!(doc["result"], "failed", "{rec:?}");
    assert!(doc["error"].as_str().unwrap().contains("kv-1"), "{doc}");
    let st = m.status();
    let (id, kernel, names) = active(&st);
    assert_eq!((id, kernel.as_str()), (1, "7.2.13-mkA"), "{st}");
    assert_eq!(names.len(), 2, "{st}");
    assert_eq!(st["instances"].as_array().unwrap().len(), 1, "{st}");
    // kv-2 never left instance 1: every write is there.
    for i in 0..5 {
        assert_eq!(
            kv(m.addrs[1], &format!("GET k1-{i}")).unwrap(),
            format!("VALUE v1-{i}")
        );
    }
    assert!(kv(m.addrs[0], "PING").is_ok());
    assert_eq!(m.run(&["emu", "down"]).code, 0);
    m.init();
    assert_eq!(active(&m.status()).2.len(), 2);
}

/// The crash matrix: the apply is killed after each journal write in turn (the list read
/// from a clean run's record), and with it an instance's supervisor (old, then new, where
/// one exists at that point); then `recover`. Always: one instance left, serving every
/// workload exactly once, nothing frozen, nothing left in flight, and a result that is
/// true: "upgraded"/"rolled-back" only with every acknowledged write present; "failed"
/// naming each workload that lost its state (the others keep every write).
#[test]
fn crash_matrix_apply_and_a_supervisor_die_at_each_journal_write() {
    let writes = journal_writes();
    for (i, phase) in writes.iter().enumerate() {
        let n = i + 1;
        for victim in [1u64, 2] {
            let ctx = format!("write {n} ({phase}), supervisor of instance {victim} killed");
            let m = machine_killed_after_write(n, 3, &ctx);
            let pool: serde_json::Value =
                serde_json::from_slice(&std::fs::read(m.path("state/emulated/pool.json")).unwrap())
                    .unwrap();
            let Some(pid) = pool["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["id"] == victim && x["state"] == "active")
                .and_then(|x| x["supervisor_pid"].as_i64())
            else {
                continue; // that instance does not run yet at this write
            };
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            let rec = m.run(&["recover", "--json"]);
            let doc = rec.json();
            let st = m.status();
            assert!(st["upgrade_in_flight"].is_null(), "{ctx}: {st}");
            let insts = st["instances"].as_array().unwrap();
            assert_eq!(insts.len(), 1, "{ctx}: {st}");
            let (_, _, names) = active(&st);
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(sorted, vec!["kv-1", "kv-2"], "{ctx}: {st}");
            for w in insts[0]["workloads"].as_array().unwrap() {
                assert_eq!(w["frozen"], false, "{ctx}: {w}");
            }
            let result = doc["result"].as_str().unwrap_or_default().to_owned();
            let error = doc["error"].as_str().unwrap_or_default().to_owned();
            for (k, name) in ["kv-1", "kv-2"].iter().enumerate() {
                let lost = result == "failed" && error.contains(name);
                if lost {
                    assert!(kv(m.addrs[k], "PING").is_ok(), "{ctx}: {name} restarted");
                    continue;
                }
                for j in 0..3 {
                    assert_eq!(
                        kv(m.addrs[k], &format!("GET k{k}-{j}")).unwrap(),
                        format!("VALUE v{k}-{j}"),
                        "{ctx}: {name} ({result}: {error})"
                    );
                }
            }
            assert!(
                ["upgraded", "rolled-back", "failed"].contains(&result.as_str()),
                "{ctx}: {doc}"
            );
            assert_eq!(m.run(&["emu", "down"]).code, 0, "{ctx}");
        }
    }
}

/// The crash matrix's workload role: the apply is killed after each journal write in turn
/// and then every process of kv-1 is killed (SIGKILL, on whichever instances run a copy:
/// frozen, pending or committed); then `recover`. The supervisor, which holds kv-1's
/// memfds, restarts it (restart = "on-failure", the default) once the move no longer holds
/// it: always one instance left, both workloads running and thawed, every acknowledged
/// write present (mk-demo-kv keeps its data in its memfd, which outlives its process).
#[test]
fn crash_matrix_a_workload_dies_at_each_journal_write() {
    let writes = journal_writes();
    assert!(
        writes.len() >= 11,
        "a clean upgrade journals its steps: {writes:?}"
    );
    for (i, phase) in writes.iter().enumerate() {
        let n = i + 1;
        let ctx = format!("write {n} ({phase}), kv-1 killed");
        let m = machine_killed_after_write(n, 3, &ctx);
        let st = m.status();
        for inst in st["instances"].as_array().unwrap() {
            for w in inst["workloads"].as_array().unwrap() {
                if w["name"] == "kv-1"
                    && let Some(pid) = w["pid"].as_i64().filter(|p| *p > 0)
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let rec = m.run(&["recover", "--json"]);
        let doc = rec.json();
        let result = doc["result"].as_str().unwrap_or_default().to_owned();
        assert!(
            ["upgraded", "rolled-back", "failed", ""].contains(&result.as_str()),
            "{ctx}: {doc}"
        );
        // The restart follows its back-off (100 ms first).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let st = loop {
            let st = m.status();
            let insts = st["instances"].as_array().unwrap().clone();
            let settled = insts.len() == 1
                && insts[0]["workloads"].as_array().unwrap().len() == 2
                && insts[0]["workloads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|w| w["state"] == "running" && w["frozen"] == false);
            if settled || std::time::Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(st["upgrade_in_flight"].is_null(), "{ctx}: {st}");
        let insts = st["instances"].as_array().unwrap();
        assert_eq!(insts.len(), 1, "{ctx}: {st} (recover: {doc})");
        for w in insts[0]["workloads"].as_array().unwrap() {
            assert_eq!(w["state"], "running", "{ctx}: {w} (recover: {doc})");
            assert_eq!(w["frozen"], false, "{ctx}: {w}");
        }
        for k in 0..2 {
            for j in 0..3 {
                assert_eq!(
                    kv(m.addrs[k], &format!("GET k{k}-{j}")).unwrap(),
                    format!("VALUE v{k}-{j}"),
                    "{ctx} ({result}: {doc})"
                );
            }
        }
        let down = m.run(&["emu", "down"]);
        assert_eq!(down.code, 0, "{ctx}: {down:?}");
    }
}

/// `standby = true`: the new copy starts before the freeze and takes its descriptors
/// from the agent (mk-demo-kv says READY on MK_STANDBY_FD); a copy that cannot stand by
/// (here a wrapper that exits when MK_STANDBY_FD is set) is started after the freeze as
/// usual. Both moves keep every write, both ways.
#[test]
fn standby_copies_take_over_and_a_failed_standby_falls_back() {
    let m = Machine::new(2);
    let kv = mk_integration_tests::bin("mk-demo-kv");
    let wrapper = m.path("no-standby.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ -n \"$MK_STANDBY_FD\" ] && exit 3\nexec {} \"$@\"\n",
            kv.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let file = m.path("state/workloads.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut blocks: Vec<String> = text
        .split("[[workload]]\n")
        .filter(|b| !b.is_empty())
        .map(|b| b.replacen("args = ", "standby = true\nargs = ", 1))
        .collect();
    blocks[1] = blocks[1].replace(&kv.display().to_string(), &wrapper.display().to_string());
    std::fs::write(
        &file,
        format!("[[workload]]\n{}", blocks.join("[[workload]]\n")),
    )
    .unwrap();
    m.init();
    put(&m, 20);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["result"], "upgraded", "{r:?}");
    check(&m, 20);
    let log = std::fs::read_to_string(m.path("state/emulated/instance-2/supervisor.log"))
        .unwrap_or_default();
    assert!(
        log.contains("standby: waiting for the descriptors"),
        "kv-1 stood by: {log}"
    );
    assert!(
        log.contains("standby copy failed"),
        "kv-2's standby exited and was reported: {log}"
    );
    put(&m, 30);
    let back = m.run(&["rollback", "--json"]);
    assert_eq!(back.code, 0, "{back:?}");
    check(&m, 30);
    let (_, kernel, names) = active(&m.status());
    assert_eq!((kernel.as_str(), names.len()), ("7.2.13-mkA", 2));
}

/// `integrity = "identity"` (with the default `transfer = "share"`): the image is built
/// before the freeze and verified by the new instance while the workload still serves
/// (`RegionStage`, protocol version 2); the offer after the freeze carries the fds alone.
/// Every write survives the upgrade and the rollback, which stages the same way.
#[test]
fn identity_moves_stage_the_image_before_the_freeze() {
    let m = Machine::new(2);
    let file = m.path("state/workloads.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text.replace("args = ", "integrity = \"identity\"\nargs = ");
    assert_eq!(text.matches("integrity = ").count(), 2, "{text}");
    std::fs::write(&file, text).unwrap();
    m.init();
    put(&m, 20);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let staged_moves = |r: &mk_integration_tests::Run| -> Vec<String> {
        r.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["what"].as_str())
            .filter(|w| w.contains("verified there before the freeze"))
            .map(|w| w.split(':').next().unwrap_or("").to_owned())
            .collect()
    };
    let r = m.run(&["apply", "--kernel", b.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["result"], "upgraded", "{r:?}");
    assert_eq!(staged_moves(&r), ["kv-1", "kv-2"], "{r:?}");
    check(&m, 20);
    put(&m, 30);
    let back = m.run(&["rollback", "--json"]);
    assert_eq!(back.code, 0, "{back:?}");
    assert_eq!(staged_moves(&back), ["kv-1", "kv-2"], "{back:?}");
    check(&m, 30);
    let (_, kernel, names) = active(&m.status());
    assert_eq!((kernel.as_str(), names.len()), ("7.2.13-mkA", 2));
}

/// `FreezeFds`, the request a move's blackout starts with: the workload is frozen and its
/// declared memfd comes back attached, in one round trip; a workload the instance does not
/// run is an error that freezes nothing.
#[test]
fn freeze_fds_freezes_and_hands_the_descriptors_in_one_request() {
    use upgrade_agent::host::ctl::{Request, Response, call};
    let m = Machine::new(1);
    m.init();
    put(&m, 3);
    let sock = m.path("state/emulated/instance-1/ctl.sock");
    let frozen = |m: &Machine| -> Vec<bool> {
        m.status()["instances"][0]["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["frozen"].as_bool().unwrap())
            .collect()
    };
    let e = call(
        1,
        &sock,
        &Request::FreezeFds {
            name: "nope".into(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    assert_eq!(frozen(&m), vec![false]);
    let (resp, fds) = call(
        1,
        &sock,
        &Request::FreezeFds {
            name: "kv-1".into(),
        },
    )
    .unwrap();
    let Response::Fds { names } = resp else {
        panic!("{resp:?}")
    };
    assert_eq!(names, ["kv-data", "listen"]);
    assert_eq!(names.len(), fds.len());
    assert!(
        upgrade_agent::sys::memfd::size(std::os::fd::AsFd::as_fd(&fds[0])).unwrap() > 0,
        "the store's memfd"
    );
    assert_eq!(frozen(&m), vec![true]);
    call(
        1,
        &sock,
        &Request::Thaw {
            name: "kv-1".into(),
        },
    )
    .unwrap();
    assert_eq!(frozen(&m), vec![false]);
    check(&m, 3);
    // `Workload`: what `Ping` says of that one workload; an unknown one is an error.
    let (resp, _) = call(
        1,
        &sock,
        &Request::Workload {
            name: "kv-1".into(),
        },
    )
    .unwrap();
    let Response::Workload(one) = resp else {
        panic!("{resp:?}")
    };
    let (Response::Pong { workloads, .. }, _) = call(1, &sock, &Request::Ping).unwrap() else {
        panic!("no pong")
    };
    assert_eq!(workloads, vec![one.clone()]);
    assert!(one.pid > 0 && !one.frozen, "{one:?}");
    let e = call(
        1,
        &sock,
        &Request::Workload {
            name: "nope".into(),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("does not run on this instance"),
        "{e}"
    );
}

/// `mk-upgrade` invoked by the name `mk-agentd` (a link to it, as the VM suite's initramfs
/// has it) is the daemon: its start-up recovery answers as `mk-agentd` does, and it
/// supervises the emulated instances through a whole apply.
#[test]
fn mk_upgrade_linked_as_mk_agentd_is_the_daemon() {
    use mk_integration_tests::bin;
    use std::process::Command;
    let m = Machine::new(1);
    let link = m.path("mk-agentd");
    std::os::unix::fs::symlink(bin("mk-upgrade"), &link).unwrap();
    let v = Command::new(&link).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(v.starts_with("mk-agentd "), "{v}");
    for exe in [link.clone(), bin("mk-agentd")] {
        let o = Command::new(&exe)
            .arg("--state-dir")
            .arg(m.path("fresh"))
            .arg("--json")
            .env_remove("MK_STATE_DIR")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            (o.status.code(), out.trim()),
            (Some(0), r#"{"result":"nothing-to-recover"}"#),
            "{}: {}",
            exe.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let env = [("MK_AGENTD", link.to_str().unwrap())];
    let a = m.path("bzImage-7.2.13-mkA");
    let r = m.run_env(&["emu", "init", "--kernel", a.to_str().unwrap()], &env);
    assert_eq!(r.code, 0, "{r:?}");
    let exe_of = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let real = std::fs::canonicalize(bin("mk-upgrade")).unwrap();
    assert_eq!(exe_of(supervisor_pid(&m, 1)), real);
    put(&m, 5);
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    let r = m.run_env(&["apply", "--kernel", b.to_str().unwrap(), "--json"], &env);
    assert_eq!(
        (r.code, r.json()["result"].as_str()),
        (0, Some("upgraded")),
        "{r:?}"
    );
    assert_eq!(exe_of(supervisor_pid(&m, 2)), real);
    let (_, kernel, _) = active(&m.status());
    assert_eq!(kernel, "7.2.13-mkB");
    check(&m, 5);
}
