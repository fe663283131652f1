//! `sys::spawn`: what the child gets (LISTEN_PID, environment, descriptors, signals,
//! session, affinity, cgroup) and what the parent gets back (exec errors, exit statuses,
//! signalling through the pidfd).
//!
//! The child is mostly `/bin/sleep`, inspected from outside through `/proc/PID/*` once it
//! sleeps (so exec is complete); a few tests run `/bin/sh`. The cgroup tests need a
//! writable cgroup v2 hierarchy (root); without one they report `SKIP <name>: <reason>` and
//! count as ignored, never as passed (own harness, `harness = false`, libtest-mimic).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upgrade_agent::sys::spawn::{ChildError, ChildStep, Process, SpawnRequest, Stdio, spawn};

use libtest_mimic::{Arguments, Trial};

/// A test that runs in a fresh cgroup.
type GroupTest = fn(TempGroup);

fn main() {
    let args = Arguments::from_args();
    let plain: [(&'static str, fn()); 14] = [
        (
            "listen_pid_is_the_childs_own_pid",
            listen_pid_is_the_childs_own_pid,
        ),
        (
            "listen_pid_off_passes_the_given_value",
            listen_pid_off_passes_the_given_value,
        ),
        (
            "environment_is_exactly_the_given_one",
            environment_is_exactly_the_given_one,
        ),
        (
            "descriptors_are_placed_in_order_and_nothing_else_is_inherited",
            descriptors_are_placed_in_order_and_nothing_else_is_inherited,
        ),
        ("inherited_stdin_is_ours", inherited_stdin_is_ours),
        (
            "a_missing_program_is_reported_promptly",
            a_missing_program_is_reported_promptly,
        ),
        (
            "a_failing_earlier_step_is_reported_with_its_name",
            a_failing_earlier_step_is_reported_with_its_name,
        ),
        (
            "invalid_requests_are_refused_before_forking",
            invalid_requests_are_refused_before_forking,
        ),
        (
            "exit_statuses_through_wait_try_wait_and_wait_timeout",
            exit_statuses_through_wait_try_wait_and_wait_timeout,
        ),
        (
            "signalling_an_exited_but_unreaped_process_is_ok",
            signalling_an_exited_but_unreaped_process_is_ok,
        ),
        (
            "dropping_a_process_does_not_kill_it",
            dropping_a_process_does_not_kill_it,
        ),
        (
            "signals_are_default_and_unblocked_in_the_child",
            signals_are_default_and_unblocked_in_the_child,
        ),
        (
            "new_session_makes_the_child_a_session_leader",
            new_session_makes_the_child_a_session_leader,
        ),
        ("affinity_is_applied", affinity_is_applied),
    ];
    let in_a_group: [(&'static str, GroupTest); 3] = [
        (
            "clone_into_cgroup_starts_the_child_in_its_group",
            clone_into_cgroup_starts_the_child_in_its_group,
        ),
        (
            "cgroup_errors_other_than_an_old_kernels_are_returned",
            cgroup_errors_other_than_an_old_kernels_are_returned,
        ),
        (
            "fallbacks_place_the_child_by_writing_cgroup_procs",
            fallbacks_place_the_child_by_writing_cgroup_procs,
        ),
    ];
    let mut trials: Vec<Trial> = plain
        .into_iter()
        .map(|(name, test)| mk_test_support::plain(name, test))
        .collect();
    trials.extend(in_a_group.into_iter().map(|(name, test)| {
        mk_test_support::skippable(name, move || {
            test(TempGroup::new(name)?);
            Ok(())
        })
    }));
    libtest_mimic::run(&args, trials).exit();
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A request for `exec args...` with `env`, and every option off.
fn request<'a>(exec: &'a str, args: &'a [String], env: &'a [(String, String)]) -> SpawnRequest<'a> {
    SpawnRequest {
        exec: Path::new(exec),
        args,
        env,
        listen_pid: false,
        fds: &[],
        cgroup_dir: None,
        cpus: None,
        new_session: false,
        stdio: Stdio::Null,
        output: None,
        new_pid_namespace: false,
    }
}

/// Kills the process and reaps it when the test ends, pass or fail.
struct Reaper(Process);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `pid` blocks in `clock_nanosleep` (exec is complete, the program runs: its
/// descriptors, environment and status are final).
fn wait_sleeping(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let syscall = format!("/proc/{pid}/syscall");
    let stat = format!("/proc/{pid}/stat");
    let nanosleep = [
        libc::SYS_clock_nanosleep.to_string(),
        libc::SYS_nanosleep.to_string(),
    ];
    while Instant::now() < deadline {
        if let Ok(text) = fs::read_to_string(&syscall) {
            let nr = text.split_whitespace().next().unwrap_or("");
            if nanosleep.iter().any(|n| n == nr) {
                return;
            }
        } else {
            // No access to the syscall file: the state and name have to do.
            let text = fs::read_to_string(&stat).unwrap_or_default();
            if text.contains("(sleep) S") {
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("process {pid} never got to sleep");
}

/// Fields of `/proc/PID/stat` from the state on (index 0 is field 3, the state).
fn stat_fields(pid: u32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 1..];
    after.split_whitespace().map(str::to_owned).collect()
}

/// The session id (field 6 of `/proc/PID/stat`).
fn session_of(pid: &str) -> i64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// A line `Key:\tvalue` of `/proc/PID/status`.
fn status_field(pid: &str, key: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn sigmask(pid: &str, key: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, key), 16).unwrap()
}

fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (File::from(r), File::from(w))
}

fn child_error(err: &io::Error) -> &ChildError {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<ChildError>())
        .unwrap_or_else(|| panic!("not a ChildError: {err:?}"))
}

fn listen_pid_is_the_childs_own_pid() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!("echo \"$$ $LISTEN_PID\" > {}", out.display());
    let args = strings(&["-c", &script]);
    // A stale LISTEN_PID in the environment is replaced, not duplicated.
    let env = pairs(&[("PATH", "/usr/bin:/bin"), ("LISTEN_PID", "1")]);
    let mut req = request("/bin/sh", &args, &env);
    req.listen_pid = true;
    let mut p = spawn(&req).unwrap();
    assert_eq!(p.wait().unwrap().code(), Some(0));
    let text = fs::read_to_string(&out).unwrap();
    let pid = p.id().to_string();
    assert_eq!(text.trim(), format!("{pid} {pid}"));

    // The environment itself, as the kernel holds it: exactly one LISTEN_PID, in the place
    // of the given one.
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &env);
    req.listen_pid = true;
    let p = Reaper(spawn(&req).unwrap());
    wait_sleeping(p.0.id());
    let environ = fs::read(format!("/proc/{}/environ", p.0.id())).unwrap();
    let expected = format!("PATH=/usr/bin:/bin\0LISTEN_PID={}\0", p.0.id());
    assert_eq!(String::from_utf8_lossy(&environ), expected);
}

fn listen_pid_off_passes_the_given_value() {
    let args = strings(&["30"]);
    let env = pairs(&[("LISTEN_PID", "42")]);
    let p = Reaper(spawn(&request("/bin/sleep", &args, &env)).unwrap());
    wait_sleeping(p.0.id());
    let environ = fs::read(format!("/proc/{}/environ", p.0.id())).unwrap();
    assert_eq!(environ, b"LISTEN_PID=42\0");
}

fn environment_is_exactly_the_given_one() {
    // Something would show if the environment were inherited: the test process has one
    // (at least what cargo sets).
    assert!(std::env::vars_os().next().is_some());
    let args = strings(&["30"]);
    let env = pairs(&[("A", "1"), ("SPACED", "x y=z"), ("EMPTY", ""), ("A", "2")]);
    let p = Reaper(spawn(&request("/bin/sleep", &args, &env)).unwrap());
    wait_sleeping(p.0.id());
    let environ = fs::read(format!("/proc/{}/environ", p.0.id())).unwrap();
    // Duplicates: the last value, at the first position.
    assert_eq!(
        String::from_utf8_lossy(&environ),
        "A=2\0SPACED=x y=z\0EMPTY=\0"
    );

    // And an empty environment is empty.
    let p = Reaper(spawn(&request("/bin/sleep", &args, &[])).unwrap());
    wait_sleeping(p.0.id());
    let environ = fs::read(format!("/proc/{}/environ", p.0.id())).unwrap();
    assert!(environ.is_empty(), "{environ:?}");
    // argv too: argv[0] is the path.
    let cmdline = fs::read(format!("/proc/{}/cmdline", p.0.id())).unwrap();
    assert_eq!(cmdline, b"/bin/sleep\x0030\0");
}

/// The (device, inode) of what an open descriptor refers to.
fn identity(path: impl AsRef<Path>) -> (u64, u64) {
    let m = fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

fn identity_of(fd: BorrowedFd<'_>) -> (u64, u64) {
    identity(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn descriptors_are_placed_in_order_and_nothing_else_is_inherited() {
    let (_r1, w1) = pipe();
    let (_r2, w2) = pipe();
    let (_r3, w3) = pipe();
    let file = tempfile::tempfile().unwrap();
    // A descriptor without close-on-exec: the child must still not inherit it.
    let leak = file.as_fd().try_clone_to_owned().unwrap();
    state_serializers::sys::clear_cloexec_raw(leak.as_raw_fd()).unwrap();
    // Low-numbered sources in an order that would clobber each other if placed naively.
    let fds = [w3.as_fd(), w1.as_fd(), file.as_fd(), w2.as_fd()];
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.fds = &fds;
    let p = Reaper(spawn(&req).unwrap());
    let pid = p.0.id();
    wait_sleeping(pid);

    let mut listed: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(
        listed,
        [0, 1, 2, 3, 4, 5, 6],
        "leak was fd {}",
        leak.as_raw_fd()
    );
    for (target, fd) in (3..).zip(fds) {
        assert_eq!(
            identity(format!("/proc/{pid}/fd/{target}")),
            identity_of(fd),
            "fd {target}"
        );
    }
    // stdin is /dev/null; stdout and stderr are ours.
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
        Path::new("/dev/null")
    );
    for fd in [1, 2] {
        assert_eq!(
            identity(format!("/proc/{pid}/fd/{fd}")),
            identity(format!("/proc/self/fd/{fd}")),
            "fd {fd}"
        );
    }
}

fn inherited_stdin_is_ours() {
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.stdio = Stdio::Inherit;
    let p = Reaper(spawn(&req).unwrap());
    let pid = p.0.id();
    wait_sleeping(pid);
    match fs::metadata("/proc/self/fd/0") {
        Ok(_) => assert_eq!(
            identity(format!("/proc/{pid}/fd/0")),
            identity("/proc/self/fd/0")
        ),
        Err(_) => assert!(fs::metadata(format!("/proc/{pid}/fd/0")).is_err()),
    }
}

fn a_missing_program_is_reported_promptly() {
    let started = Instant::now();
    let err = spawn(&request("/nonexistent/program", &[], &[])).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    let child = child_error(&err);
    assert_eq!(child.step, ChildStep::Exec);
    assert_eq!(child.errno, libc::ENOENT);
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");

    // Not executable at all.
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let err = spawn(&request(&path, &[], &[])).unwrap_err();
    assert_eq!(child_error(&err).errno, libc::EACCES, "{err}");
}

fn a_failing_earlier_step_is_reported_with_its_name() {
    // An empty cpu set: sched_setaffinity fails with EINVAL in the child.
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let empty: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.cpus = Some(&empty);
    let err = spawn(&req).unwrap_err();
    let child = child_error(&err);
    assert_eq!(
        (child.step, child.errno),
        (ChildStep::Affinity, libc::EINVAL)
    );
    assert!(err.to_string().contains("sched_setaffinity"), "{err}");
}

fn invalid_requests_are_refused_before_forking() {
    let bad_arg = strings(&["a\0b"]);
    let bad_key = pairs(&[("A=B", "1")]);
    let nul_key = pairs(&[("A\0", "1")]);
    let nul_value = pairs(&[("A", "1\0")]);
    for req in [
        request("/bin/true", &bad_arg, &[]),
        request("/bin/true", &[], &bad_key),
        request("/bin/true", &[], &nul_key),
        request("/bin/true", &[], &nul_value),
        request("true", &[], &[]),
        request("/bin/tr\0ue", &[], &[]),
    ] {
        let err = spawn(&req).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{req:?}: {err}");
    }
}

fn exit_statuses_through_wait_try_wait_and_wait_timeout() {
    let args = strings(&["-c", "exit 3"]);
    let mut p = spawn(&request("/bin/sh", &args, &[])).unwrap();
    let status = p.wait().unwrap();
    assert_eq!((status.code(), status.signal()), (Some(3), None));
    // Cached.
    assert_eq!(p.try_wait().unwrap(), Some(status));
    assert_eq!(p.wait_timeout(Duration::ZERO).unwrap(), Some(status));
    assert_eq!(p.wait().unwrap(), status);

    let args = strings(&["-c", "exit 3"]);
    let mut p = spawn(&request("/bin/sh", &args, &[])).unwrap();
    let status = p
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("exited");
    assert_eq!(status.code(), Some(3));

    let args = strings(&["30"]);
    let mut p = spawn(&request("/bin/sleep", &args, &[])).unwrap();
    assert_eq!(p.try_wait().unwrap(), None);
    let started = Instant::now();
    assert_eq!(p.wait_timeout(Duration::from_millis(100)).unwrap(), None);
    assert!(started.elapsed() >= Duration::from_millis(100));
    p.kill().unwrap();
    let status = p
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("killed");
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(libc::SIGKILL))
    );
    assert_eq!(p.try_wait().unwrap(), Some(status));
    // Signalling a process that is gone is not an error.
    p.signal(libc::SIGTERM).unwrap();
    p.kill().unwrap();

    // SIGTERM through the pidfd, reaped by try_wait after polling the pidfd ourselves.
    let mut p = spawn(&request("/bin/sleep", &args, &[])).unwrap();
    wait_sleeping(p.id());
    p.signal(libc::SIGTERM).unwrap();
    let mut pfd = libc::pollfd {
        fd: p.pidfd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, count 1.
    assert_eq!(unsafe { libc::poll(&raw mut pfd, 1, 10_000) }, 1);
    let status = p.try_wait().unwrap().expect("exited");
    assert_eq!(status.signal(), Some(libc::SIGTERM));
}

fn signalling_an_exited_but_unreaped_process_is_ok() {
    let mut p = spawn(&request("/bin/true", &[], &[])).unwrap();
    // Wait for the zombie without reaping it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stat_fields(p.id())[0] != "Z" {
        assert!(Instant::now() < deadline, "never exited");
        std::thread::sleep(Duration::from_millis(2));
    }
    p.signal(libc::SIGTERM).unwrap();
    p.kill().unwrap();
    assert_eq!(p.wait().unwrap().code(), Some(0));
}

fn dropping_a_process_does_not_kill_it() {
    let args = strings(&["30"]);
    let p = spawn(&request("/bin/sleep", &args, &[])).unwrap();
    let pid = p.id();
    let pidfd: OwnedFd = p.pidfd().try_clone_to_owned().unwrap();
    drop(p);
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(stat_fields(pid)[0], "Z");
    // Clean up through our own copy of the pidfd.
    // SAFETY: pidfd_send_signal with a null siginfo touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    assert_eq!(r, 0);
    // SAFETY: waits for our own child (the pid is not reused before it is reaped).
    let reaped = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    assert_eq!(reaped, pid as i32);
}

fn signals_are_default_and_unblocked_in_the_child() {
    // The Rust runtime ignores SIGPIPE; make sure of it, and ignore SIGXFSZ too.
    // SAFETY: setting a disposition to SIG_IGN installs no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let ours = sigmask("self", "SigIgn");
    assert_ne!(ours & bit(libc::SIGPIPE), 0);
    // Block a signal in this thread: the child's mask must still be empty.
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the masks are live.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGUSR1);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, &raw mut old);
        old
    };
    let args = strings(&["30"]);
    let spawned = spawn(&request("/bin/sleep", &args, &[]));
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const old, std::ptr::null_mut()) };
    let p = Reaper(spawned.unwrap());
    let pid = p.0.id().to_string();
    wait_sleeping(p.0.id());
    let ignored = sigmask(&pid, "SigIgn");
    assert_eq!(ignored & bit(libc::SIGPIPE), 0, "SigIgn {ignored:016x}");
    assert_eq!(ignored & bit(libc::SIGXFSZ), 0, "SigIgn {ignored:016x}");
    assert_eq!(sigmask(&pid, "SigBlk"), 0);
}

fn new_session_makes_the_child_a_session_leader() {
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.new_session = true;
    let p = Reaper(spawn(&req).unwrap());
    wait_sleeping(p.0.id());
    assert_eq!(session_of(&p.0.id().to_string()), i64::from(p.0.id()));

    let p = Reaper(spawn(&request("/bin/sleep", &args, &[])).unwrap());
    wait_sleeping(p.0.id());
    assert_eq!(session_of(&p.0.id().to_string()), session_of("self"));
}

fn affinity_is_applied() {
    let cpu = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| {
            let first = v.trim().split([',', '-']).next().unwrap();
            first.parse::<u32>().unwrap()
        })
        .unwrap();
    let set = state_serializers::sys::cpu_set(&[cpu]).unwrap();
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.cpus = Some(&set);
    let p = Reaper(spawn(&req).unwrap());
    wait_sleeping(p.0.id());
    assert_eq!(
        status_field(&p.0.id().to_string(), "Cpus_allowed_list"),
        cpu.to_string()
    );
}

/// The cgroup v2 mount, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// A temporary group directly under the cgroup v2 mount, removed (with the groups below
/// it) at the end of the test.
struct TempGroup {
    path: PathBuf,
    /// The path inside the hierarchy, as `/proc/PID/cgroup` shows it.
    rel: String,
}

impl TempGroup {
    fn new(tag: &str) -> Result<TempGroup, String> {
        let mount = cgroup2_mount().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
        let name = format!("mk-spawn-test-{tag}-{}", std::process::id());
        let path = mount.join(&name);
        fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempGroup {
            path,
            rel: format!("/{name}"),
        })
    }

    fn remove(path: &Path) {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    TempGroup::remove(&e.path());
                }
            }
        }
        for _ in 0..200 {
            if fs::remove_dir(path).is_ok() || !path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        TempGroup::remove(&self.path);
    }
}

/// Runs in a fresh group (see `main`).
fn clone_into_cgroup_starts_the_child_in_its_group(group: TempGroup) {
    let dir = File::open(&group.path).unwrap();
    let (mut report, report_w) = pipe();
    // The shell reports its own group before it does anything else, then sleeps.
    let args = strings(&[
        "-c",
        "cat /proc/$$/cgroup >&3; exec 3>&-; exec /bin/sleep 30",
    ]);
    let fds = [report_w.as_fd()];
    let mut req = request("/bin/sh", &args, &[]);
    req.fds = &fds;
    req.cgroup_dir = Some(dir.as_fd());
    let p = Reaper(spawn(&req).unwrap());
    drop(report_w);
    assert!(p.0.placed_by_clone3());
    let mut seen = String::new();
    report.read_to_string(&mut seen).unwrap();
    let v2 = seen
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("");
    assert_eq!(v2, group.rel, "{seen}");
    let procs = fs::read_to_string(group.path.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == p.0.id().to_string()), "{procs}");
    let mut p = p;
    p.0.kill().unwrap();
    p.0.wait().unwrap();

    // Without cgroup_dir, nothing says it was placed.
    let mut q = spawn(&request("/bin/true", &[], &[])).unwrap();
    assert!(!q.placed_by_clone3());
    q.wait().unwrap();
}

/// Runs in a fresh group (see `main`).
fn cgroup_errors_other_than_an_old_kernels_are_returned(group: TempGroup) {
    // A threaded child turns the group into a threaded domain; a plain child created
    // beside it is then "domain invalid": no process may enter it (EOPNOTSUPP).
    fs::create_dir(group.path.join("threads")).unwrap();
    fs::write(group.path.join("threads/cgroup.type"), "threaded").unwrap();
    let invalid = group.path.join("invalid");
    fs::create_dir(&invalid).unwrap();
    let kind = fs::read_to_string(invalid.join("cgroup.type")).unwrap();
    assert_eq!(kind.trim(), "domain invalid");
    let dir = File::open(&invalid).unwrap();
    let args = strings(&["30"]);
    let mut req = request("/bin/sleep", &args, &[]);
    req.cgroup_dir = Some(dir.as_fd());
    let err = spawn(&req).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");

    // A removed group (its directory still open): ENOENT (the kernel finds no live group
    // behind the directory).
    let gone = group.path.join("gone");
    fs::create_dir(&gone).unwrap();
    let dir = File::open(&gone).unwrap();
    fs::remove_dir(&gone).unwrap();
    req.cgroup_dir = Some(dir.as_fd());
    let err = spawn(&req).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}

/// The fallbacks (which a kernel with `CLONE_INTO_CGROUP` never needs, forced here): the
/// child joins the group itself by writing `cgroup.procs`, before exec.
#[cfg(feature = "fault-injection")]
fn fallbacks_place_the_child_by_writing_cgroup_procs(group: TempGroup) {
    use upgrade_agent::sys::spawn::{Fallback, spawn_by_fallback};
    for fallback in [Fallback::Clone3ProcsWrite, Fallback::ForkProcsWrite] {
        let dir = File::open(&group.path).unwrap();
        let args = strings(&["30"]);
        let env = pairs(&[("A", "1")]);
        let mut req = request("/bin/sleep", &args, &env);
        req.listen_pid = true;
        req.cgroup_dir = Some(dir.as_fd());
        let p = Reaper(spawn_by_fallback(&req, fallback).unwrap());
        assert!(!p.0.placed_by_clone3(), "{fallback:?}");
        let procs = fs::read_to_string(group.path.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == p.0.id().to_string()),
            "{fallback:?}: {} not in {procs:?}",
            p.0.id()
        );
        wait_sleeping(p.0.id());
        let environ = fs::read(format!("/proc/{}/environ", p.0.id())).unwrap();
        assert_eq!(
            environ,
            format!("A=1\0LISTEN_PID={}\0", p.0.id()).as_bytes(),
            "{fallback:?}"
        );
        let mut p = p;
        p.0.kill().unwrap();
        assert_eq!(p.0.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}

/// Without the feature the fallbacks cannot be forced: the test fails, naming the fix,
/// rather than passing without running.
#[cfg(not(feature = "fault-injection"))]
fn fallbacks_place_the_child_by_writing_cgroup_procs(_: TempGroup) {
    panic!(
        "build the tests with --features upgrade-agent/fault-injection (cargo test --workspace does)"
    );
}
