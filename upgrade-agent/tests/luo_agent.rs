//! The LUO host agent (`mk-agentd serve`, the real binary) on a kernel without
//! `/dev/liveupdate`: it serves the instance protocol (the running kernel is the one
//! instance), and refuses an upgrade before anything changes, naming what is missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Arguments;
use upgrade_agent::fault::Faults;
use upgrade_agent::platform::luo::client::{AgentClient, Handed};
use upgrade_agent::record::{Outcome, UpgradeKind};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Own harness (`harness = false`, libtest-mimic): on a LUO host the test reports SKIP and
/// counts as ignored, never as passed.
fn main() {
    let args = Arguments::from_args();
    let name = "host_agent_serves_ping_and_refuses_upgrades_without_liveupdate";
    let trials = vec![mk_test_support::skippable(name, move || {
        if Path::new(upgrade_agent::sys::luo::DEV_PATH).exists() {
            // The agent would take the host's exclusive device.
            return Err("this host has /dev/liveupdate".into());
        }
        host_agent_serves_ping_and_refuses_upgrades_without_liveupdate();
        Ok(())
    })];
    libtest_mimic::run(&args, trials).exit();
}

fn host_agent_serves_ping_and_refuses_upgrades_without_liveupdate() {
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_mk-agentd"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("serve")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = upgrade_agent::platform::luo::ctl_socket(dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never bound {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let client = AgentClient::new(dir.path());
    let st = client.status().unwrap();
    assert_eq!(st.release, upgrade_agent::platform::luo::running_release());
    assert!(st.workloads.is_empty());
    let boot = std::fs::read_to_string(
        upgrade_agent::platform::luo::agent_dir(dir.path()).join("boot.json"),
    )
    .unwrap();
    assert!(boot.contains("\"resumed\":false"), "{boot}");
    // No previous kernel to roll back to: nothing to do, nothing changed.
    let handed = client
        .apply(
            UpgradeKind::Rollback,
            "",
            &[0; 32],
            "",
            Faults::NONE,
            None,
            None,
            None,
        )
        .unwrap();
    match handed {
        Handed::NothingToDo(m) => assert!(m.contains("no previous kernel"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An upgrade is refused before anything changes, naming what is missing.
    let kernel = upgrade_agent::handover::sealed_memfd("k", b"not looked at").unwrap();
    let handed = client
        .apply(
            UpgradeKind::Apply,
            "9.9.9",
            &[1; 32],
            "",
            Faults::NONE,
            Some(std::os::fd::AsFd::as_fd(&kernel)),
            None,
            None,
        )
        .unwrap();
    let Handed::Finished { record, error } = handed else {
        panic!("the agent kexeced on a kernel without /dev/liveupdate");
    };
    let error = error.unwrap_or_default();
    assert_eq!(record.outcome, Some(Outcome::Refused), "{error}");
    assert!(
        error.contains("/dev/liveupdate") && error.contains("liveupdate=on"),
        "{error}"
    );
    // Nothing is left in flight.
    let j = rollback::Journal::<upgrade_agent::record::UpgradeRecord>::open(dir.path()).unwrap();
    assert!(j.current().unwrap().is_none());
}
