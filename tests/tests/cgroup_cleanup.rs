//! The emulated platform leaves no cgroup behind: after a failed (rolled back) upgrade the
//! new instance's groups are gone, including those prepared for workloads that never
//! arrived, and after `emu down` nothing is left under the machine's group
//! (`<cgroup2 mount>/mk-upgrade-emulated/<state tag>`), even when its supervisor crashed.
//!
//! Needs root and a cgroup v2 hierarchy (`/sys/fs/cgroup/unified` or `/sys/fs/cgroup`);
//! without them each test reports `SKIP <name>: <reason>` and counts as ignored, never as
//! passed (own harness, `harness = false`, libtest-mimic).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libtest_mimic::Arguments;
use mk_integration_tests::{Machine, active, kv};
use upgrade_agent::platform::emulated::state_tag;
use upgrade_agent::sys::cgroup::cgroup2_mount;

/// A test of a booted machine and its group.
type MachineTest = fn(Machine, PathBuf);

fn main() {
    let args = Arguments::from_args();
    let tests: [(&'static str, MachineTest); 2] = [
        (
            "failed_upgrades_and_emu_down_leave_no_cgroup",
            failed_upgrades_and_emu_down_leave_no_cgroup,
        ),
        (
            "emu_down_after_an_instance_crashed_leaves_no_cgroup",
            emu_down_after_an_instance_crashed_leaves_no_cgroup,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            mk_test_support::skippable(name, move || {
                let (m, group) = boot()?;
                test(m, group);
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// The machine's group, or why this host cannot run the test.
fn machine_group(m: &Machine) -> Result<PathBuf, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (cgroup v2 groups)".into());
    }
    let Some(mount) = cgroup2_mount() else {
        return Err("no cgroup v2 hierarchy mounted".into());
    };
    if mount != Path::new("/sys/fs/cgroup/unified") && mount != Path::new("/sys/fs/cgroup") {
        return Err(format!(
            "cgroup v2 is mounted at {}, not /sys/fs/cgroup/unified or /sys/fs/cgroup",
            mount.display()
        ));
    }
    Ok(mount
        .join("mk-upgrade-emulated")
        .join(state_tag(&m.path("state"))))
}

/// Every group below `root`, as paths relative to it (empty when `root` is gone).
fn groups_under(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let p = e.path();
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Boots the machine with one workload: the machine and its group, or why this host cannot
/// run the test.
fn boot() -> Result<(Machine, PathBuf), String> {
    let m = Machine::new(1);
    let group = machine_group(&m)?;
    m.init();
    let want: BTreeSet<String> = ["instance-1", "instance-1/kv-1"]
        .into_iter()
        .map(String::from)
        .collect();
    let have = groups_under(&group);
    if have.is_empty() {
        return Err(format!(
            "the emulated instance did not use cgroup v2 ({} absent; it fell back to SIGSTOP)",
            group.display()
        ));
    }
    assert_eq!(have, want, "the booted machine's groups");
    Ok((m, group))
}

/// `emu down` ends with exit 0 and the machine's group gone.
fn down_leaves_nothing(m: &Machine, group: &Path) {
    let r = m.run(&["emu", "down"]);
    assert_eq!(r.code, 0, "emu down: {r:?}");
    assert!(
        !group.exists(),
        "groups left after emu down under {}: {:?}",
        group.display(),
        groups_under(group)
    );
}

fn failed_upgrades_and_emu_down_leave_no_cgroup(m: Machine, group: PathBuf) {
    let b = m.path("bzImage-7.2.13-mkB");
    m.sign(&b);
    // corrupt-region: the new instance prepared kv-1's group, the workload never arrived;
    // health-fail: it started there, failed its check and was stopped.
    for fault in ["corrupt-region", "health-fail"] {
        let r = m.run(&[
            "apply",
            "--kernel",
            b.to_str().unwrap(),
            "--json",
            "--inject",
            fault,
        ]);
        assert_eq!(r.code, 10, "{fault}: {r:?}");
        assert_eq!(
            active(&m.status()).0,
            1,
            "{fault}: rolled back to instance 1"
        );
        let have = groups_under(&group);
        assert_eq!(
            have,
            ["instance-1", "instance-1/kv-1"]
                .into_iter()
                .map(String::from)
                .collect::<BTreeSet<_>>(),
            "{fault}: only the running instance's groups are left"
        );
        assert!(kv(m.addrs[0], "PING").unwrap().starts_with("PONG"));
    }
    down_leaves_nothing(&m, &group);
}

fn emu_down_after_an_instance_crashed_leaves_no_cgroup(m: Machine, group: PathBuf) {
    // The supervisor dies without halting (it cannot remove its groups), then so does its
    // workload: only empty groups remain, and `emu down` must remove them.
    let pool: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.path("state/emulated/pool.json")).unwrap())
            .unwrap();
    let supervisor = pool["instances"][0]["supervisor_pid"].as_i64().unwrap();
    let workload = std::fs::read_to_string(group.join("instance-1/kv-1/cgroup.procs")).unwrap();
    let kill = |pid: i64| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    kill(supervisor);
    for pid in workload.split_whitespace() {
        kill(pid.parse().unwrap());
    }
    // Wait until the workload's group is empty (the processes are gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(group.join("instance-1/kv-1/cgroup.procs"))
        .is_ok_and(|p| !p.trim().is_empty())
    {
        assert!(Instant::now() < deadline, "the workload did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        groups_under(&group).contains("instance-1/kv-1"),
        "the crashed instance left its groups"
    );
    down_leaves_nothing(&m, &group);
}
