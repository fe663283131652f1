//! Readers against the committed fixture tree `tests/fixtures/root` (see `make-root.sh`):
//! a well-formed process tree, missing files, malformed content, vanished and exited
//! processes, and permission errors (made at run time: git keeps no modes).

use std::path::{Path, PathBuf};

use state_serializers::StateError;
use state_serializers::device;
use state_serializers::memory;
use state_serializers::task::{self, CaptureOptions, FdKind, SchedPolicy, SocketProto};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/root")
}

fn opts() -> CaptureOptions {
    CaptureOptions {
        descendants: true,
        inspect_memfds: false,
        retries_on_change: 0,
    }
}

#[test]
fn well_formed_process_every_field() {
    let r = task::capture_task(&root(), 4242, &opts()).unwrap();
    assert_eq!(r.pid, 4242);
    assert_eq!(r.ppid, 4241);
    assert_eq!(r.starttime, 1000);
    assert_eq!(r.comm, "sleep");
    assert_eq!(r.exe, "/usr/bin/sleep");
    assert_eq!(r.cmdline, vec!["sleep", "0", "--flag=a b"]);
    assert_eq!(
        r.environ,
        vec!["HOME=/root", "PATH=/usr/bin:/bin", "MK_TEST=1"]
    );
    assert_eq!(r.cwd, "/srv/app");
    assert_eq!(
        (r.creds.uid, r.creds.euid, r.creds.gid, r.creds.egid),
        (1000, 1000, 100, 100)
    );
    assert_eq!(r.creds.groups, vec![10, 20]);
    assert_eq!(r.affinity, vec![0, 1]);
    assert_eq!(r.sched.policy, SchedPolicy::Other);
    assert_eq!(r.sched.nice, 5);
    assert_eq!(r.rlimits.len(), 16);
    let nofile = r.rlimits.iter().find(|l| l.resource == "nofile").unwrap();
    assert_eq!((nofile.soft, nofile.hard), (Some(1024), Some(4096)));
    let stack = r.rlimits.iter().find(|l| l.resource == "stack").unwrap();
    assert_eq!((stack.soft, stack.hard), (Some(8388608), None));
    assert_eq!(r.cgroup.path, "/work.slice/app");
    assert_eq!(r.cgroup.cpu_max.as_deref(), Some("50000 100000"));
    assert_eq!(r.cgroup.memory_max.as_deref(), Some("1073741824"));
    assert_eq!(r.cgroup.cpuset_cpus.as_deref(), Some("0-1"));
    let kinds: Vec<(i32, &FdKind)> = r.fds.iter().map(|f| (f.fd, &f.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (
                0,
                &FdKind::File {
                    path: "/dev/null".into(),
                    offset: 0,
                    deleted: false
                }
            ),
            (3, &FdKind::Pipe { inode: 123 }),
            (
                4,
                &FdKind::ListeningSocket {
                    proto: SocketProto::Tcp,
                    address: "127.0.0.1:8080".into()
                }
            ),
            (
                5,
                &FdKind::ListeningSocket {
                    proto: SocketProto::Unix,
                    address: "/run/app.sock".into()
                }
            ),
            (
                6,
                &FdKind::File {
                    path: "/var/lib/app/data.db".into(),
                    offset: 4096,
                    deleted: true
                }
            ),
            (7, &FdKind::Other),
            (
                8,
                &FdKind::ListeningSocket {
                    proto: SocketProto::Tcp6,
                    address: "[::1]:80".into()
                }
            ),
        ]
    );
    assert_eq!(r.fds[0].flags, 0o100002);
    assert_eq!(r.fds[5].target, "anon_inode:[eventfd]");
}

#[test]
fn comm_with_parentheses_and_process_tree() {
    let s = task::capture_tasks(&root(), &[4241], &opts()).unwrap();
    let pids: Vec<(i32, i32)> = s.tasks.iter().map(|t| (t.pid, t.ppid)).collect();
    assert_eq!(pids, vec![(4241, 1), (4242, 4241)]);
    assert_eq!(s.tasks[0].comm, "my (odd) app");
    assert_eq!(s.schema_version, state_serializers::SCHEMA_VERSION);
    let no_tree = task::capture_tasks(
        &root(),
        &[4241, 4241],
        &CaptureOptions {
            descendants: false,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(no_tree.tasks.len(), 1);
}

#[test]
fn vanished_process_is_typed() {
    let e = task::capture_task(&root(), 4249, &opts()).unwrap_err();
    assert!(
        matches!(e, StateError::ProcessVanished { pid: 4249 }),
        "{e}"
    );
    let e = task::capture_tasks(&root(), &[4242, 4249], &opts()).unwrap_err();
    assert!(
        matches!(e, StateError::ProcessVanished { pid: 4249 }),
        "{e}"
    );
}

#[test]
fn zombie_counts_as_vanished() {
    let e = task::capture_task(&root(), 4255, &opts()).unwrap_err();
    assert!(
        matches!(e, StateError::ProcessVanished { pid: 4255 }),
        "{e}"
    );
}

#[test]
fn malformed_content_names_file_and_field() {
    let cases: [(i32, &str, &str); 4] = [
        (4250, "4250/stat", "fields after comm"),
        (4251, "4251/limits", "Max open files"),
        (4253, "4253/status", "no Uid: line"),
        (4254, "4254/fdinfo/3", "not octal"),
    ];
    for (pid, file, what) in cases {
        let e = task::capture_task(&root(), pid, &opts()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, StateError::Malformed { .. }),
            "pid {pid}: {msg}"
        );
        assert!(msg.contains(file) && msg.contains(what), "pid {pid}: {msg}");
    }
}

#[test]
fn non_utf8_argument_is_refused_clearly() {
    let e = task::capture_task(&root(), 4256, &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            StateError::NotUtf8 {
                field: "cmdline",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("4256/cmdline"), "{e}");
}

#[test]
fn missing_file_of_a_live_process_is_an_io_error_with_path() {
    let e = task::capture_task(&root(), 4252, &opts()).unwrap_err();
    assert!(matches!(e, StateError::Io { .. }), "{e}");
    assert!(e.to_string().contains("4252/limits"), "{e}");
}

#[test]
fn missing_proc_root_is_an_io_error() {
    let e = task::capture_tasks(Path::new("/nonexistent-root"), &[1], &opts()).unwrap_err();
    assert!(matches!(e, StateError::Io { .. }), "{e}");
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Reads `path` as uid 65534 even when the test runs as root: `setfsuid` on a fresh
/// thread drops the file-system capabilities of that thread only.
fn capture_as_nobody(root: PathBuf, pid: i32) -> state_serializers::Result<task::TaskRecord> {
    std::thread::spawn(move || {
        // SAFETY: setfsuid only changes this thread's file-system uid.
        unsafe { libc::setfsuid(65534) };
        task::capture_task(&root, pid, &opts())
    })
    .join()
    .unwrap()
}

#[test]
fn permission_denied_is_typed_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&root(), tmp.path());
    let r = tmp.path().join("root");
    let environ = r.join("proc/4242/environ");
    std::fs::set_permissions(
        &environ,
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let e = capture_as_nobody(r.clone(), 4242).unwrap_err();
    assert!(matches!(e, StateError::PermissionDenied { .. }), "{e}");
    assert!(
        e.to_string().contains("4242/environ") && e.to_string().contains("root"),
        "{e}"
    );
}

#[test]
fn memory_fixture_capture_and_restore() {
    let m = memory::capture_memory(&root(), &[]).unwrap();
    assert_eq!(m.vm.overcommit_memory, Some(0));
    assert_eq!(m.vm.overcommit_ratio, Some(50));
    assert_eq!(m.vm.swappiness, Some(60));
    assert_eq!(m.vm.max_map_count, Some(65530));
    let pools: Vec<(u64, u64)> = m
        .hugepages
        .iter()
        .map(|p| (p.page_size_kb, p.nr_hugepages))
        .collect();
    assert_eq!(pools, vec![(2048, 16), (1048576, 0)]);

    // Restore into a copy: values differ, get written, and are read back.
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&root(), tmp.path());
    let r = tmp.path().join("root");
    let mut want = m.clone();
    want.vm.swappiness = Some(10);
    want.hugepages[0].nr_hugepages = 32;
    let rep = memory::restore_memory(&r, &want, state_serializers::Policy::Strict).unwrap();
    assert!(rep.not_applied.is_empty(), "{rep:?}");
    assert_eq!(
        std::fs::read_to_string(r.join("proc/sys/vm/swappiness"))
            .unwrap()
            .trim(),
        "10"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"))
            .unwrap()
            .trim(),
        "32"
    );
    assert_eq!(memory::capture_memory(&r, &[]).unwrap(), want);

    // A pool size the new kernel lacks, and a sysctl it lacks.
    want.hugepages.push(memory::HugepagePool {
        page_size_kb: 16384,
        nr_hugepages: 1,
    });
    std::fs::remove_file(r.join("proc/sys/vm/max_map_count")).unwrap();
    let e = memory::restore_memory(&r, &want, state_serializers::Policy::Strict).unwrap_err();
    match e {
        StateError::NotApplied { not_applied } => {
            let items: Vec<&str> = not_applied.iter().map(|w| w.item.as_str()).collect();
            assert_eq!(items, vec!["vm.max_map_count=65530", "hugepages-16384kB=1"]);
        }
        e => panic!("{e}"),
    }
    let rep = memory::restore_memory(&r, &want, state_serializers::Policy::BestEffort).unwrap();
    assert_eq!(rep.not_applied.len(), 2);
}

#[test]
fn malformed_sysctl_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&root(), tmp.path());
    let r = tmp.path().join("root");
    std::fs::write(r.join("proc/sys/vm/swappiness"), "sixty\n").unwrap();
    let e = memory::capture_memory(&r, &[]).unwrap_err();
    assert!(e.to_string().contains("swappiness"), "{e}");
}

#[test]
fn device_fixture_pci_block_mounts() {
    let d = device::capture_device(&root(), false).unwrap();
    assert!(d.interfaces.is_empty() && d.routes.is_empty());
    assert_eq!(d.pci.len(), 2);
    assert_eq!(d.pci[0].driver, None);
    assert_eq!(d.pci[1].address, "0000:00:03.0");
    assert_eq!(d.pci[1].driver.as_deref(), Some("virtio-pci"));
    assert_eq!(d.pci[1].vendor, "0x1af4");
    let blocks: Vec<(&str, &str, u64, bool, bool)> = d
        .block
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.dev.as_str(),
                b.size_bytes,
                b.removable,
                b.read_only,
            )
        })
        .collect();
    assert_eq!(
        blocks,
        vec![
            ("sr0", "11:0", 2048 * 512, true, true),
            ("vda", "254:0", 41943040 * 512, false, false)
        ]
    );
    assert_eq!(d.mounts.len(), 4);
    assert_eq!(d.mounts[3].mount_point, "/srv/with space");
    assert_eq!(d.mounts[2].fstype, "cgroup2");
}

#[test]
fn device_fixture_malformed_block_size() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&root(), tmp.path());
    let r = tmp.path().join("root");
    std::fs::write(r.join("sys/block/vda/size"), "99999999999999999999999\n").unwrap();
    let e = device::capture_device(&r, false).unwrap_err();
    assert!(
        matches!(e, StateError::Malformed { .. }) && e.to_string().contains("vda/size"),
        "{e}"
    );
    std::fs::remove_file(r.join("sys/block/vda/size")).unwrap();
    let e = device::capture_device(&r, false).unwrap_err();
    assert!(
        matches!(e, StateError::Io { .. }) && e.to_string().contains("vda/size"),
        "{e}"
    );
}

#[test]
fn refused_writes_are_not_applied_items() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&root(), tmp.path());
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let r = tmp.path().join("root");
    // Read-only whatever the checkout's umask (a group-writable copy is writable by fsgid 0)
    // and whoever runs the test (without root, setfsuid below fails and the file is ours).
    std::fs::set_permissions(
        r.join("proc/sys/vm/swappiness"),
        std::os::unix::fs::PermissionsExt::from_mode(0o444),
    )
    .unwrap();
    let mut want = memory::capture_memory(&r, &[]).unwrap();
    want.vm.swappiness = Some(1);
    // As uid 65534 (setfsuid on a fresh thread), the root-owned sysctl file is not writable.
    let rep = std::thread::spawn(move || {
        // SAFETY: setfsuid only changes this thread's file-system uid.
        unsafe { libc::setfsuid(65534) };
        memory::restore_memory(&r, &want, state_serializers::Policy::BestEffort)
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(rep.not_applied.len(), 1, "{rep:?}");
    assert_eq!(rep.not_applied[0].item, "vm.swappiness=1");
    assert!(
        rep.not_applied[0].reason.contains("ermission denied"),
        "{rep:?}"
    );
}
