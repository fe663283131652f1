//! The emulated platform enforces what the real multikernel interface enforces.
//!
//! Own harness (`harness = false`, libtest-mimic): a test that needs what the machine lacks
//! reports SKIP and counts as ignored, never as passed.

use std::os::fd::AsFd;

use libtest_mimic::Arguments;
use upgrade_agent::handover::sealed_memfd;
use upgrade_agent::platform::emulated::EmulatedPlatform;
use upgrade_agent::platform::{InstanceState, LoadableKernel, Platform, PlatformError, Resources};
use upgrade_agent::verify::bzimage::minimal_bzimage;

fn platform() -> (tempfile::TempDir, EmulatedPlatform) {
    // mk-agentd is found beside the test binary's target directory (cargo builds it).
    assert!(std::path::Path::new(env!("CARGO_BIN_EXE_mk-agentd")).is_file());
    let dir = tempfile::tempdir().unwrap();
    let p = EmulatedPlatform::new(dir.path()).unwrap();
    (dir, p)
}

fn res(cpus: &[u32]) -> Resources {
    Resources {
        cpus: cpus.to_vec(),
        memory_bytes: 1 << 20,
    }
}

fn main() {
    let args = Arguments::from_args();
    let keeps_off = "the_orchestrator_keeps_off_the_receiving_instance_cpus";
    let trials = vec![
        mk_test_support::plain("lifecycle_rules_are_enforced", lifecycle_rules_are_enforced),
        mk_test_support::skippable(
            keeps_off,
            the_orchestrator_keeps_off_the_receiving_instance_cpus,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn lifecycle_rules_are_enforced() {
    let (_dir, mut p) = platform();
    let caps = p.probe().unwrap();
    assert!(caps.emulated && caps.side_by_side);
    assert!(caps.notes.iter().any(|n| n.contains("EMULATED")));
    let cpu = caps.cpus[0];

    // No cpu, a cpu that does not exist: refused.
    assert!(matches!(
        p.create_instance(&res(&[])),
        Err(PlatformError::NoResources(_))
    ));
    assert!(matches!(
        p.create_instance(&res(&[9999])),
        Err(PlatformError::NoResources(_))
    ));

    let id = p.create_instance(&res(&[cpu])).unwrap();
    assert_eq!(id, 1, "ids start at 1 (0 is the host kernel)");
    // Its cpu is no longer spare.
    assert!(!p.probe().unwrap().spare_cpus.contains(&cpu));
    assert!(matches!(
        p.create_instance(&res(&[cpu])),
        Err(PlatformError::NoResources(_))
    ));

    // Boot before load: refused (ready, needs loaded).
    let e = p.boot(id, None).unwrap_err();
    assert!(
        matches!(
            e,
            PlatformError::WrongState {
                state: InstanceState::Ready,
                ..
            }
        ),
        "{e}"
    );

    // Loading something that is not a kernel: refused, state unchanged.
    let junk = sealed_memfd("junk", &[0x5a; 4096]).unwrap();
    let e = p
        .load(
            id,
            &LoadableKernel {
                image: junk.as_fd(),
                release: "7.2.13-mkA".into(),
                sha256: [0; 32],
                initrd: None,
                cmdline: "",
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("refusing to load"), "{e}");
    assert_eq!(p.instances().unwrap()[0].state, InstanceState::Ready);

    // A kernel whose header disagrees with the caller's release: refused.
    let k = sealed_memfd("k", &minimal_bzimage("7.2.13-mkA")).unwrap();
    let kernel = |release: &str| LoadableKernel {
        image: k.as_fd(),
        release: release.to_owned(),
        sha256: [0; 32],
        initrd: None,
        cmdline: "",
    };
    assert!(p.load(id, &kernel("7.2.13-mkB")).is_err());
    p.load(id, &kernel("7.2.13-mkA")).unwrap();
    assert!(matches!(
        p.load(id, &kernel("7.2.13-mkA")),
        Err(PlatformError::WrongState { .. })
    ));
    let info = &p.instances().unwrap()[0];
    assert_eq!(
        (info.state, info.kernel_release.as_deref()),
        (InstanceState::Loaded, Some("7.2.13-mkA"))
    );

    p.boot(id, None).unwrap();
    assert_eq!(p.instances().unwrap()[0].state, InstanceState::Active);
    // Active instances can be neither destroyed nor stripped of their resources.
    assert!(matches!(
        p.destroy(id),
        Err(PlatformError::WrongState { .. })
    ));
    let other = caps.cpus.get(1).copied();
    if let Some(c) = other {
        let id2 = p.create_instance(&res(&[c])).unwrap();
        assert!(matches!(
            p.transfer_resources(id, id2),
            Err(PlatformError::WrongState { .. })
        ));
        p.destroy(id2).unwrap();
    }
    // Workload operations name the missing workload.
    assert!(
        p.freeze(id, "nope")
            .unwrap_err()
            .to_string()
            .contains("nope")
    );

    p.halt(id).unwrap();
    assert_eq!(
        p.instances().unwrap()[0].state,
        InstanceState::Loaded,
        "halt returns to loaded"
    );
    p.destroy(id).unwrap();
    assert!(p.instances().unwrap().is_empty());
    assert!(matches!(p.halt(id), Err(PlatformError::NoSuchInstance(1))));
}

fn own_cpus() -> Vec<usize> {
    let m = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .filter(|c| m.is_set(*c).unwrap_or(false))
        .collect()
}

/// EMULATED topology: the orchestrating thread keeps off the cpus of the instance a
/// workload moves to (as a process of the old kernel would) from `prepare` on, and gets
/// its own mask back when the upgrade's channels close and when the platform is dropped.
/// `Err(reason)`: not run (SKIP).
fn the_orchestrator_keeps_off_the_receiving_instance_cpus() -> Result<(), String> {
    let before = own_cpus();
    if before.len() < 2 {
        return Err(format!(
            "this thread may run on {before:?} only; the test needs two cpus"
        ));
    }
    let spec = upgrade_agent::workload::WorkloadSpec::new("kv", "/bin/true");
    let (_dir, mut p) = platform();
    let free = p.probe().unwrap().spare_cpus;
    let Some(&cpu) = free.iter().find(|c| before.contains(&(**c as usize))) else {
        return Err(format!(
            "no spare cpu of this thread's {before:?} (spare: {free:?})"
        ));
    };
    let id = p.create_instance(&res(&[cpu])).unwrap();
    // Not booted: the prepare fails at the channel, after the thread left the cpu. A second
    // prepare keeps the mask found before the first.
    assert!(p.prepare(id, &spec).is_err());
    assert!(p.prepare(id, &spec).is_err());
    let during = own_cpus();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        assert_eq!(
            rayon::current_num_threads(),
            before.len(),
            "rayon's pool was started before the mask narrowed"
        );
    }
    assert!(
        !during.contains(&(cpu as usize)),
        "{during:?} still has {cpu}"
    );
    assert_eq!(during.len(), before.len() - 1, "{before:?} -> {during:?}");
    p.disconnect(None);
    assert_eq!(own_cpus(), before, "disconnect gives the mask back");

    assert!(p.prepare(id, &spec).is_err());
    assert_ne!(own_cpus(), before);
    p.abort(id, "kv", "test");
    assert_eq!(own_cpus(), before, "an aborted move gives the mask back");

    assert!(p.prepare(id, &spec).is_err());
    assert_ne!(own_cpus(), before);
    drop(p);
    assert_eq!(own_cpus(), before, "drop gives the mask back");
    Ok(())
}
