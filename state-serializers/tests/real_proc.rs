//! Capture and restore against this machine's real /proc: a child with a known
//! environment, cwd, rlimits, affinity, nice value, a sealed memfd and a listening
//! socket is captured field by field, then restored and captured again.
//!
//! Own harness (`harness = false`, libtest-mimic): a test whose requirement this host lacks
//! (root, a cgroup2 hierarchy it may join) reports `SKIP <name>: <reason>` and ends as
//! "ignored" in cargo's summary, never as "passed".

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};
use mk_test_support::plain;
use nix::sys::memfd::{MFdFlags, memfd_create};
use state_serializers::memory::{self, MemoryRegion, MemoryState, VmSysctls};
use state_serializers::restore::{self, SpawnOptions};
use state_serializers::task::{self, CaptureOptions, FdKind, SchedPolicy, SocketProto, TaskRecord};
use state_serializers::{Policy, RegionDigest, SCHEMA_VERSION, StateError, sys};

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        plain(
            "capture_real_child_every_field_then_restore_equivalent",
            capture_real_child_every_field_then_restore_equivalent,
        ),
        plain(
            "exited_and_reaped_child_is_vanished",
            exited_and_reaped_child_is_vanished,
        ),
        plain(
            "exited_unreaped_child_is_vanished",
            exited_unreaped_child_is_vanished,
        ),
        skippable(
            "restore_with_other_credentials_when_root",
            restore_with_other_credentials_when_root,
        ),
        plain(
            "restore_refuses_bad_fd_names_and_empty_cmdline",
            restore_refuses_bad_fd_names_and_empty_cmdline,
        ),
        plain(
            "restore_reports_absent_cpus_and_missing_cwd",
            restore_reports_absent_cpus_and_missing_cwd,
        ),
        skippable(
            "restore_recreates_cgroup_when_permitted",
            restore_recreates_cgroup_when_permitted,
        ),
        plain(
            "restore_at_the_captured_fd_numbers",
            restore_at_the_captured_fd_numbers,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// How a test that needs something from the host ended.
enum Run {
    /// Every check ran.
    Done,
    /// The host lacks what the test needs: reported as `SKIP <name>: <reason>` and counted
    /// as ignored, never as passed.
    Skip(String),
}

fn skippable(name: &'static str, test: fn() -> Run) -> Trial {
    mk_test_support::skippable(name, move || match test() {
        Run::Done => Ok(()),
        Run::Skip(reason) => Err(reason),
    })
}

const SEALS: u32 =
    (libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE) as u32;

fn sealed_memfd(data: &[u8]) -> OwnedFd {
    let fd = memfd_create(
        c"mk-test-data",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(data).unwrap();
    let fd = OwnedFd::from(f);
    sys::add_seals(fd.as_fd(), SEALS).unwrap();
    fd
}

fn payload() -> Vec<u8> {
    (0..(3 << 20) + 17)
        .map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    sys::euid() == 0
}

/// Starts `/usr/bin/sleep 1000` with the memfd at fd 5 and the listener at fd 6.
fn start_workload(cwd: &Path, memfd: &OwnedFd, listener: &TcpListener) -> Kill {
    // Sources above the targets 5 and 6 (close-on-exec copies): with a source already at 5
    // or 6 (other tests' fds decide the numbers), dup2 would be a no-op that keeps
    // FD_CLOEXEC, or would clobber the other source.
    let m_src = sys::dup_at_least(memfd.as_fd(), 100).unwrap();
    let l_src = sys::dup_at_least(listener.as_fd(), 100).unwrap();
    let (m, l) = (m_src.as_raw_fd(), l_src.as_raw_fd());
    let mut cmd = Command::new("/usr/bin/sleep");
    cmd.arg("1000")
        .env_clear()
        .env("MK_TEST_KEY", "value with spaces=and equals")
        .env("PATH", "/usr/bin:/bin")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let set = sys::cpu_set(&[0]).unwrap();
    let root = is_root();
    let groups: [libc::gid_t; 2] = [10, 4242];
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    // SAFETY: only single async-signal-safe system calls on values prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            sys::dup2_raw(m, 5)?;
            sys::dup2_raw(l, 6)?;
            sys::setrlimit_raw(task::rlimit_resource("nofile").unwrap(), 777, 888)?;
            sys::set_affinity_raw(&set)?;
            sys::set_scheduler_raw(libc::SCHED_BATCH, 0)?;
            if root {
                // Supplementary groups other than ours (same uid/gid).
                sys::set_credentials_raw(&groups, gid, uid)?;
            }
            sys::set_nice_raw(7)
        });
    }
    let child = cmd.spawn().unwrap();
    drop((m_src, l_src));
    Kill(child)
}

/// Waits (up to 5 s) until a just-spawned `sleep` child sleeps (state `S`): `spawn` returns
/// once the exec is committed, and a capture in the moments after sees a task still starting
/// up: an empty `/proc/<pid>/cmdline` until the kernel has set up the new argument area
/// (capture refuses: "empty cmdline"), then the locale files `sleep` opens and closes (an extra
/// fd 3). Each failed about one run in 40.
fn wait_asleep(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, s)| s.trim_start());
        if state.is_none_or(|s| s.starts_with('S')) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn capture(pid: i32) -> TaskRecord {
    wait_asleep(pid);
    task::capture_task(Path::new("/"), pid, &CaptureOptions::default()).unwrap()
}

/// A captured record of a plain `sleep 1000` child, to edit and restore.
fn template() -> TaskRecord {
    let k = Kill(
        Command::new("/usr/bin/sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    capture(k.0.id() as i32)
}

fn capture_real_child_every_field_then_restore_equivalent() {
    let data = payload();
    let memfd = sealed_memfd(&data);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    let child = start_workload(&cwd, &memfd, &listener);
    let pid = child.0.id() as i32;

    wait_asleep(pid);
    let state = task::capture_tasks(Path::new("/"), &[pid], &CaptureOptions::default()).unwrap();
    assert_eq!(state.tasks.len(), 1);
    let rec = state.tasks[0].clone();
    assert_eq!(rec.pid, pid);
    assert_eq!(rec.ppid, std::process::id() as i32);
    assert_eq!(rec.exe, "/usr/bin/sleep");
    assert_eq!(rec.comm, "sleep");
    assert_eq!(rec.cmdline, vec!["/usr/bin/sleep", "1000"]);
    assert_eq!(
        rec.environ,
        vec![
            "MK_TEST_KEY=value with spaces=and equals",
            "PATH=/usr/bin:/bin"
        ]
    );
    assert_eq!(rec.cwd, cwd.to_str().unwrap());
    let nofile = rec.rlimits.iter().find(|l| l.resource == "nofile").unwrap();
    assert_eq!((nofile.soft, nofile.hard), (Some(777), Some(888)));
    assert_eq!(rec.affinity, vec![0]);
    assert_eq!(rec.sched.nice, 7);
    assert_eq!(rec.sched.policy, SchedPolicy::Batch);
    assert_eq!(rec.creds.uid, nix::unistd::getuid().as_raw());
    assert_eq!(rec.creds.gid, nix::unistd::getgid().as_raw());
    let groups: Vec<u32> = if is_root() {
        vec![10, 4242]
    } else {
        let mut g: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        g.sort_unstable();
        g
    };
    let mut got = rec.creds.groups.clone();
    got.sort_unstable();
    assert_eq!(got, groups);
    let own_cg = task::parse_cgroup(
        Path::new("/proc/self/cgroup"),
        &std::fs::read_to_string("/proc/self/cgroup").unwrap(),
    )
    .unwrap();
    assert_eq!(rec.cgroup.path, own_cg);
    let fd5 = rec.fds.iter().find(|f| f.fd == 5).expect("fd 5 captured");
    assert_eq!(
        fd5.kind,
        FdKind::Memfd {
            name: "mk-test-data".into(),
            size: Some(data.len() as u64),
            seals: Some(SEALS)
        }
    );
    let fd6 = rec.fds.iter().find(|f| f.fd == 6).expect("fd 6 captured");
    assert_eq!(
        fd6.kind,
        FdKind::ListeningSocket {
            proto: SocketProto::Tcp,
            address: format!("127.0.0.1:{port}")
        }
    );
    let fd0 = rec.fds.iter().find(|f| f.fd == 0).unwrap();
    assert_eq!(
        fd0.kind,
        FdKind::File {
            path: "/dev/null".into(),
            offset: 0,
            deleted: false
        }
    );

    // Memory: the memfd of the task, digested through /proc/PID/fd/5.
    let regions = memory::regions_of_tasks(Path::new("/"), &state).unwrap();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].token, memory::task_region_token(pid, 5));
    assert_eq!(regions[0].seals, SEALS);
    assert_eq!(regions[0].digest, RegionDigest::of_bytes(&data));

    // Restore: same spec, memfd handed over as "data" at fd 3, the listener as "listen".
    let handed = memfd.try_clone().unwrap();
    let handed_listener = OwnedFd::from(listener.try_clone().unwrap());
    let spawned = restore::spawn(
        &rec,
        vec![("data".into(), handed), ("listen".into(), handed_listener)],
        SpawnOptions {
            policy: Policy::Strict,
            stdin: Some(Stdio::null()),
            stdout: Some(Stdio::null()),
            stderr: Some(Stdio::null()),
            ..SpawnOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        spawned.fds,
        vec![
            state_serializers::fdenv::NamedFd {
                name: "data".into(),
                fd: 3
            },
            state_serializers::fdenv::NamedFd {
                name: "listen".into(),
                fd: 4
            },
        ]
    );
    assert!(
        spawned.report.not_applied.is_empty(),
        "{:?}",
        spawned.report
    );
    let restored = Kill(spawned.child);
    let rpid = restored.0.id() as i32;
    let again = capture(rpid);
    assert_eq!(again.exe, rec.exe);
    assert_eq!(again.cmdline, rec.cmdline);
    let mut want_env = rec.environ.clone();
    want_env.push("MK_STATE_FDS=data:3,listen:4".into());
    let mut got_env = again.environ.clone();
    got_env.sort();
    want_env.sort();
    assert_eq!(got_env, want_env);
    assert_eq!(again.cwd, rec.cwd);
    assert_eq!(again.rlimits, rec.rlimits);
    assert_eq!(again.affinity, rec.affinity);
    assert_eq!(again.sched, rec.sched);
    assert_eq!(again.creds, rec.creds);
    assert_eq!(again.cgroup, rec.cgroup);
    let fd3 = again.fds.iter().find(|f| f.fd == 3).expect("memfd at fd 3");
    assert_eq!(fd3.kind, fd5.kind);
    assert!(
        fd3.flags & libc::O_CLOEXEC as u32 == 0,
        "handed-over fd must survive exec"
    );
    let fd4 = again
        .fds
        .iter()
        .find(|f| f.fd == 4)
        .expect("listener at fd 4");
    assert_eq!(fd4.kind, fd6.kind);
    assert!(
        again.fds.iter().all(|f| f.fd <= 4),
        "only stdio and the handed fds: {:?}",
        again.fds
    );

    // The contents in the restored task verify against the captured digest.
    let mstate = MemoryState {
        schema_version: SCHEMA_VERSION,
        regions: vec![MemoryRegion {
            token: "data".into(),
            ..regions[0].clone()
        }],
        hugepages: vec![],
        vm: VmSysctls::default(),
    };
    let in_child = std::fs::File::open(format!("/proc/{rpid}/fd/3")).unwrap();
    memory::verify_regions(&mstate, &[("data", in_child.as_fd())]).unwrap();

    // A different memfd with other contents fails verification, naming the region.
    let other = sealed_memfd(b"not the same");
    let e = memory::verify_regions(&mstate, &[("data", other.as_fd())]).unwrap_err();
    assert!(
        matches!(e, StateError::DigestMismatch { ref token, .. } if token == "data"),
        "{e}"
    );
    // An unsealed memfd with the same contents lacks the captured seals.
    let unsealed = memfd_create(c"x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    std::fs::File::from(unsealed.try_clone().unwrap())
        .write_all(&data)
        .unwrap();
    let e = memory::verify_regions(&mstate, &[("data", unsealed.as_fd())]).unwrap_err();
    assert!(matches!(e, StateError::SealsMismatch { .. }), "{e}");
    let e = memory::verify_regions(&mstate, &[]).unwrap_err();
    assert!(
        matches!(e, StateError::RegionMissing { ref token } if token == "data"),
        "{e}"
    );
    drop(child);
}

fn exited_and_reaped_child_is_vanished() {
    let mut c = Command::new("/bin/true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    let e = task::capture_task(Path::new("/"), pid, &CaptureOptions::default()).unwrap_err();
    assert!(
        matches!(e, StateError::ProcessVanished { pid: p } if p == pid),
        "{e}"
    );
}

fn exited_unreaped_child_is_vanished() {
    let mut c = Command::new("/bin/true").spawn().unwrap();
    let pid = c.id() as i32;
    // Wait (without reaping) until the child is a zombie.
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: waitid writes one siginfo_t into `info`; WNOWAIT leaves the child unreaped.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as u32,
            info.as_mut_ptr(),
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(r, 0);
    let e = task::capture_task(Path::new("/"), pid, &CaptureOptions::default()).unwrap_err();
    assert!(
        matches!(e, StateError::ProcessVanished { pid: p } if p == pid),
        "{e}"
    );
    c.wait().unwrap();
}

fn restore_with_other_credentials_when_root() -> Run {
    if !is_root() {
        // Non-root: a record with another uid is reported, and refused under Strict.
        let mut rec = template();
        rec.creds.uid = 65534;
        rec.fds.clear();
        let e = restore::spawn(
            &rec,
            vec![],
            SpawnOptions {
                policy: Policy::Strict,
                ..SpawnOptions::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, StateError::NotApplied { .. }), "{e}");
        return Run::Skip(format!(
            "needs root (euid {}); checked only that another uid is refused under Strict",
            sys::euid()
        ));
    }
    let mut rec = template();
    rec.exe = "/usr/bin/sleep".into();
    rec.cmdline = vec!["sleep".into(), "1000".into()];
    rec.environ = vec!["A=b".into()];
    rec.cwd = "/".into();
    rec.creds.uid = 65534;
    rec.creds.euid = 65534;
    rec.creds.gid = 65534;
    rec.creds.egid = 65534;
    rec.creds.groups = vec![4242, 65534];
    let sp = restore::spawn(
        &rec,
        vec![],
        SpawnOptions {
            policy: Policy::Strict,
            stdout: Some(Stdio::null()),
            ..SpawnOptions::default()
        },
    )
    .unwrap();
    let k = Kill(sp.child);
    let got = capture(k.0.id() as i32);
    assert_eq!(got.creds, rec.creds);
    assert_eq!(got.environ, vec!["A=b", "MK_STATE_FDS="]);
    Run::Done
}

fn restore_refuses_bad_fd_names_and_empty_cmdline() {
    let mut rec = template();
    rec.exe = "/usr/bin/sleep".into();
    rec.cmdline = vec!["sleep".into(), "1000".into()];
    let fd = sealed_memfd(b"x");
    let e =
        restore::spawn(&rec, vec![("bad name".into(), fd)], SpawnOptions::default()).unwrap_err();
    assert!(
        matches!(e, StateError::Invalid(ref m) if m.contains("MK_STATE_FDS")),
        "{e}"
    );
    rec.cmdline.clear();
    let e = restore::spawn(&rec, vec![], SpawnOptions::default()).unwrap_err();
    assert!(
        matches!(e, StateError::Invalid(ref m) if m.contains("empty cmdline")),
        "{e}"
    );
}

fn restore_reports_absent_cpus_and_missing_cwd() {
    let mut rec = template();
    rec.exe = "/usr/bin/sleep".into();
    rec.cmdline = vec!["sleep".into(), "1000".into()];
    rec.cwd = "/nonexistent/dir".into();
    rec.affinity = vec![0, 1000];
    rec.environ.push("BROKEN".into());
    rec.fds.clear();
    let e = restore::spawn(
        &rec,
        vec![],
        SpawnOptions {
            policy: Policy::Strict,
            ..SpawnOptions::default()
        },
    )
    .unwrap_err();
    let StateError::NotApplied { not_applied } = e else {
        panic!("{e}")
    };
    let items: Vec<&str> = not_applied.iter().map(|w| w.item.as_str()).collect();
    assert_eq!(
        items,
        vec![
            "cwd /nonexistent/dir",
            "environment entry \"BROKEN\"",
            "affinity 0,1000"
        ]
    );
    let sp = restore::spawn(
        &rec,
        vec![],
        SpawnOptions {
            stdout: Some(Stdio::null()),
            ..SpawnOptions::default()
        },
    )
    .unwrap();
    assert_eq!(sp.report.not_applied.len(), 3);
    let k = Kill(sp.child);
    let got = capture(k.0.id() as i32);
    assert_eq!(got.cwd, "/");
    assert_eq!(got.affinity, vec![0]);
}

fn restore_recreates_cgroup_when_permitted() -> Run {
    let Some(mount) = task::cgroup2_mount(Path::new("/")).unwrap() else {
        return Run::Skip("no cgroup2 hierarchy mounted".into());
    };
    let cg_root = Path::new(&mount).to_path_buf();
    let name = format!("/mk-state-test-{}", std::process::id());
    let mut rec = template();
    rec.exe = "/usr/bin/sleep".into();
    rec.cmdline = vec!["sleep".into(), "1000".into()];
    rec.fds.clear();
    rec.cgroup.path.clone_from(&name);
    rec.cgroup.cpu_max = Some("50000 100000".into());
    rec.cgroup.memory_max = None;
    rec.cgroup.cpuset_cpus = None;
    let cpu_max_present = cg_root.join("cgroup.subtree_control").exists()
        && std::fs::read_to_string(cg_root.join("cgroup.subtree_control"))
            .unwrap()
            .contains("cpu");
    let r = restore::spawn(
        &rec,
        vec![],
        SpawnOptions {
            cgroup_root: Some(cg_root.clone()),
            stdout: Some(Stdio::null()),
            ..SpawnOptions::default()
        },
    );
    let dir = cg_root.join(name.trim_start_matches('/'));
    let mut run = Run::Done;
    match r {
        Ok(sp) => {
            let k = Kill(sp.child);
            let items: Vec<&str> = sp
                .report
                .not_applied
                .iter()
                .map(|w| w.item.as_str())
                .collect();
            if items.iter().any(|i| i.starts_with("cgroup ")) {
                run = Run::Skip(format!(
                    "the cgroup could not be joined here, its checks not run: {:?}",
                    sp.report.not_applied
                ));
            } else {
                let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", k.0.id())).unwrap();
                assert!(cg.lines().any(|l| l == format!("0::{name}")), "{cg}");
                let cpu_item = format!("{name} cpu.max=50000 100000");
                if cpu_max_present {
                    assert!(sp.report.applied.contains(&cpu_item), "{:?}", sp.report);
                } else {
                    assert!(items.contains(&cpu_item.as_str()), "{:?}", sp.report);
                }
            }
            drop(k);
        }
        Err(e) => panic!("{e}"),
    }
    let _ = std::fs::remove_dir(&dir);
    run
}

fn restore_at_the_captured_fd_numbers() {
    let rec = template();
    let a = sealed_memfd(b"first");
    let b = sealed_memfd(b"second");
    let sp = restore::spawn(
        &rec,
        vec![("a".into(), a), ("b".into(), b)],
        SpawnOptions {
            placement: restore::FdPlacement::Explicit(vec![9, 5]),
            stdout: Some(Stdio::null()),
            ..SpawnOptions::default()
        },
    )
    .unwrap();
    let k = Kill(sp.child);
    let got = capture(k.0.id() as i32);
    let fds: Vec<(i32, &FdKind)> = got
        .fds
        .iter()
        .filter(|f| f.fd > 2)
        .map(|f| (f.fd, &f.kind))
        .collect();
    assert_eq!(
        fds,
        vec![
            (
                5,
                &FdKind::Memfd {
                    name: "mk-test-data".into(),
                    size: Some(6),
                    seals: Some(SEALS)
                }
            ),
            (
                9,
                &FdKind::Memfd {
                    name: "mk-test-data".into(),
                    size: Some(5),
                    seals: Some(SEALS)
                }
            ),
        ]
    );
    assert!(
        got.environ.contains(&"MK_STATE_FDS=a:9,b:5".to_owned()),
        "{:?}",
        got.environ
    );
    let e = restore::spawn(
        &rec,
        vec![("a".into(), sealed_memfd(b"x"))],
        SpawnOptions {
            placement: restore::FdPlacement::Explicit(vec![2]),
            ..SpawnOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, StateError::Invalid(ref m) if m.contains(">= 3")),
        "{e}"
    );
}
