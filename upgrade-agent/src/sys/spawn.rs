//! Starting a workload: [`spawn`] does the three things `std::process::Command` cannot.
//!
//! * **`LISTEN_PID` after the fork.** systemd socket activation (`sd_listen_fds(3)`) only
//!   accepts the inherited sockets when `LISTEN_PID` equals the receiving process's own pid,
//!   which exists only once the child has been forked. `Command` builds its environment
//!   before the fork, so the value has to be written by the child itself, between fork and
//!   exec, where nothing may allocate: the entry is a buffer prepared in the parent
//!   (`LISTEN_PID=` followed by 21 NUL bytes, already in the `envp` array) into which the
//!   child writes the decimal digits of `getpid()`.
//! * **Born inside the cgroup.** Writing the pid to `cgroup.procs` after the fork (all a
//!   `Command::pre_exec` hook could do) takes `cgroup_threadgroup_rwsem` for writing, which
//!   can wait for an RCU grace period on a stock (non-`favordynmods`) mount: up to ~13 ms
//!   on this machine, on every workload start (an idle micro-benchmark of `/bin/true` here:
//!   ~1.3 ms per spawn more than with `CLONE_INTO_CGROUP`). `clone3(CLONE_INTO_CGROUP)`
//!   creates the child directly in the group instead, with no migration at all; the child
//!   also never runs a single instruction, nor charges a single page, outside its group.
//! * **A pidfd.** `clone3(CLONE_PIDFD)` returns a descriptor for the child together with its
//!   pid, so waiting (`waitid(P_PIDFD)`), polling and signalling (`pidfd_send_signal`) can
//!   never hit another process that reused a recycled pid.
//!
//! **Fallback.** When `clone3` with `CLONE_INTO_CGROUP` fails with `ENOSYS`, `E2BIG` or
//! `EINVAL` (a kernel before 5.7 that lacks the flag or the larger `clone_args`, or before
//! 5.3 that lacks `clone3`), the child is started without the flag — by `clone3(CLONE_PIDFD)`,
//! or on `ENOSYS` by `fork` + `pidfd_open` — and joins the group itself by writing `"0"` to
//! the group's `cgroup.procs`, opened (with `openat` on the group's directory fd) before the
//! fork; it does so first of all its steps. [`Process::placed_by_clone3`] tells which way was
//! taken. Every other error of `clone3` (`EBUSY` for a group that may not hold processes,
//! `EOPNOTSUPP` for a "domain invalid" one, `EACCES`, `ENOENT` for a removed group, `EBADF`,
//! ...) is returned as is: falling back to the `cgroup.procs` write could only fail the same
//! way, later.
//!
//! **The child.** Everything it needs is built before the fork: the `argv`/`envp` arrays of
//! C strings, the `LISTEN_PID` buffer, `/dev/null`, the descriptors to hand over (duplicated
//! above the target range, so no `dup2` can overwrite a later source), the `cgroup.procs`
//! descriptor of the fallback, and a close-on-exec pipe for reporting failures. The parent
//! blocks every signal around the fork, so no handler of the parent runs in the child. The
//! child then makes only async-signal-safe system calls, in this order: join the group
//! (fallback only), reset every signal disposition to `SIG_DFL` (handled ones, and ignored
//! ones such as the `SIGPIPE` the Rust runtime ignores; as systemd does for services),
//! `setsid`, `sched_setaffinity`, stdin from `/dev/null`, `dup2` of the handed-over
//! descriptors to 3, 4, ..., close-on-exec for every descriptor above them, the digits of
//! `LISTEN_PID`, an empty signal mask, `execve`. If a step fails, the child writes its errno
//! and the step to the pipe and exits with status 127; the parent reads the pipe (end of file
//! means `execve` succeeded, since the pipe closes on exec), reaps the child and returns the
//! error ([`ChildError`] inside the `io::Error`, whose kind is the errno's).

use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use state_serializers::sys;

/// What the child's stdin is. stdout and stderr are always inherited from the caller (the
/// supervisor redirects its own where it wants the workloads' output to go).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// stdin is `/dev/null` (opened before the fork).
    #[default]
    Null,
    /// stdin is the caller's fd 0 (or stays closed if the caller has none).
    Inherit,
}

/// Everything [`spawn`] needs to start one process. Borrowed: the caller keeps ownership of
/// the strings and descriptors, which only have to live until `spawn` returns.
///
/// Not configurable, and therefore inherited from the caller: the working directory, the
/// credentials, rlimits, the nice value, the umask, stdout and stderr.
pub struct SpawnRequest<'a> {
    /// The program, as an absolute path (no `PATH` search; a relative path is refused with
    /// `InvalidInput`). It is also `argv[0]`.
    pub exec: &'a Path,
    /// `argv[1..]`. An argument containing a NUL byte is refused with `InvalidInput`.
    pub args: &'a [String],
    /// The complete environment: nothing is inherited implicitly. A key that is empty or
    /// contains `=` or NUL, or a value containing NUL, is refused with `InvalidInput`. When
    /// a key appears more than once, the last value wins (at the first one's position).
    pub env: &'a [(String, String)],
    /// Set `LISTEN_PID` to the child's own pid (written by the child after the fork,
    /// before exec). A `LISTEN_PID` in `env` is then replaced, never duplicated. When
    /// false, a `LISTEN_PID` in `env` is passed as given.
    pub listen_pid: bool,
    /// Placed at 3, 4, ... in this order, without `FD_CLOEXEC`. Every other descriptor
    /// from 3 on is closed at exec (close-on-exec, set in the child). `LISTEN_FDS` and
    /// `LISTEN_FDNAMES`, if wanted, belong in `env`.
    pub fds: &'a [BorrowedFd<'a>],
    /// A cgroup v2 directory (an `O_RDONLY` or `O_PATH` fd): the child starts inside that
    /// group (see the module documentation for how and for the fallback).
    pub cgroup_dir: Option<BorrowedFd<'a>>,
    /// `sched_setaffinity` in the child before exec.
    pub cpus: Option<&'a libc::cpu_set_t>,
    /// `setsid()` in the child: it leads a new session and process group (no
    /// controlling terminal).
    pub new_session: bool,
    /// The child's stdin.
    pub stdio: Stdio,
    /// The child's stdout and stderr (both `dup2`ed from this descriptor); `None`:
    /// inherited.
    pub output: Option<BorrowedFd<'a>>,
    /// `CLONE_NEWPID`: the child is the first process (pid 1) of a new PID namespace, so
    /// its pids are free again after it is checkpointed and restored elsewhere. Needs
    /// `clone3` (no fallback to `fork`).
    pub new_pid_namespace: bool,
}

impl fmt::Debug for SpawnRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnRequest")
            .field("exec", &self.exec)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("listen_pid", &self.listen_pid)
            .field("fds", &self.fds)
            .field("cgroup_dir", &self.cgroup_dir)
            .field("cpus", &self.cpus.map(|_| "cpu_set_t"))
            .field("new_session", &self.new_session)
            .field("stdio", &self.stdio)
            .field("output", &self.output)
            .field("new_pid_namespace", &self.new_pid_namespace)
            .finish()
    }
}

/// The step of the child (between fork and exec) that failed; see [`ChildError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChildStep {
    /// Writing `"0"` to `cgroup.procs` (the fallback to `CLONE_INTO_CGROUP`).
    CgroupProcs,
    /// `setsid()`.
    Setsid,
    /// `sched_setaffinity`.
    Affinity,
    /// `dup2` of `/dev/null` to stdin.
    Stdin,
    /// `dup2` of the output descriptor to 1 and 2.
    Output,
    /// `dup2` of a handed-over descriptor to its place.
    Fds,
    /// Marking the other descriptors close-on-exec.
    CloseOnExec,
    /// Emptying the signal mask.
    SignalMask,
    /// `execve` itself.
    Exec,
}

impl ChildStep {
    const ALL: [ChildStep; 9] = [
        ChildStep::CgroupProcs,
        ChildStep::Setsid,
        ChildStep::Affinity,
        ChildStep::Stdin,
        ChildStep::Output,
        ChildStep::Fds,
        ChildStep::CloseOnExec,
        ChildStep::SignalMask,
        ChildStep::Exec,
    ];

    fn code(self) -> u32 {
        ChildStep::ALL
            .iter()
            .position(|&s| s == self)
            .map_or(u32::MAX, |i| i as u32)
    }

    fn from_code(code: u32) -> Option<ChildStep> {
        ChildStep::ALL.get(code as usize).copied()
    }

    fn describe(self) -> &'static str {
        match self {
            ChildStep::CgroupProcs => "joining the cgroup (cgroup.procs)",
            ChildStep::Setsid => "setsid",
            ChildStep::Affinity => "sched_setaffinity",
            ChildStep::Stdin => "stdin from /dev/null",
            ChildStep::Output => "stdout and stderr",
            ChildStep::Fds => "placing the descriptors at 3..",
            ChildStep::CloseOnExec => "marking the other descriptors close-on-exec",
            ChildStep::SignalMask => "emptying the signal mask",
            ChildStep::Exec => "execve",
        }
    }
}

/// A failure of the child before it ran the program, as reported through the pipe. [`spawn`]
/// returns it inside an `io::Error` whose kind is the errno's; get it back with
/// `err.get_ref().and_then(|e| e.downcast_ref::<ChildError>())`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildError {
    /// The program that was to run.
    pub exec: PathBuf,
    /// The step that failed.
    pub step: ChildStep,
    /// Its errno.
    pub errno: i32,
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "starting {}: {} failed in the child: {}",
            self.exec.display(),
            self.step.describe(),
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for ChildError {}

impl ChildError {
    fn into_io(self) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(self.errno).kind(), self)
    }
}

/// A started process: its pid, a pidfd for it, and its exit status once reaped.
///
/// Dropping a `Process` does **not** kill the process (the supervisor decides its
/// lifecycle); it only closes the pidfd. A process that is dropped without having been
/// waited for stays a zombie after it exits until something reaps it (`waitpid`).
///
/// Waiting relies on this process being the child's parent and nothing else reaping it: with
/// `SIGCHLD` ignored (or `SA_NOCLDWAIT`), or a `waitpid(-1)` elsewhere in the process, the
/// wait calls fail with `ECHILD`.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    pidfd: OwnedFd,
    status: Option<Ended>,
    placed_by_clone3: bool,
    /// Started by this process (its parent), so `waitid` can reap it; false for one
    /// [`Process::adopt`]ed after the supervisor restarted.
    child: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A child of ours: its wait status.
    Status(ExitStatus),
    /// An adopted process (not our child): it exited, but only its parent can collect the
    /// status.
    Unknown,
}

impl Ended {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        matches!(self, Ended::Status(s) if s.success())
    }

    /// The exit code, if it exited normally and the status is known.
    pub fn code(&self) -> Option<i32> {
        match self {
            Ended::Status(s) => s.code(),
            Ended::Unknown => None,
        }
    }

    /// The signal that killed it, if one did and the status is known.
    pub fn signal(&self) -> Option<i32> {
        match self {
            Ended::Status(s) => s.signal(),
            Ended::Unknown => None,
        }
    }
}

impl fmt::Display for Ended {
    /// `exit status 3`, `killed by signal 9`, `exited (status unknown: ...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Status(s) => match (s.code(), s.signal()) {
                (Some(c), _) => write!(f, "exit status {c}"),
                (None, Some(sig)) => write!(f, "killed by signal {sig}"),
                _ => write!(f, "{s}"),
            },
            Ended::Unknown => write!(
                f,
                "exited (status unknown: adopted after a supervisor restart, not its child)"
            ),
        }
    }
}

impl Process {
    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// The pidfd (close-on-exec; pollable: readable once the process has exited).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the child was created inside its cgroup by `clone3(CLONE_INTO_CGROUP)`.
    /// False when no `cgroup_dir` was given, or when the fallback was taken (the child then
    /// joined the group by writing `cgroup.procs` before exec).
    pub fn placed_by_clone3(&self) -> bool {
        self.placed_by_clone3
    }

    /// The exit status if the process has exited (reaping it), `None` if it still runs.
    /// The status is cached: later calls return it again.
    pub fn try_wait(&mut self) -> io::Result<Option<Ended>> {
        self.waitid(false)
    }

    /// Waits for the process to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<Ended> {
        match self.waitid(true)? {
            Some(status) => Ok(status),
            None => Err(io::Error::other("waitid returned without a status")),
        }
    }

    /// Waits at most `d` for the process to exit (`poll` on the pidfd, then `waitid`);
    /// `None` if it still runs after that.
    pub fn wait_timeout(&mut self, d: Duration) -> io::Result<Option<Ended>> {
        let deadline = Instant::now().checked_add(d);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let timeout_ms: c_int = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Rounded up, so the last poll does not return just before the deadline.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    c_int::try_from(ms).unwrap_or(c_int::MAX)
                }
            };
            poll_pidfd(self.pidfd.as_fd(), timeout_ms)?;
        }
    }

    /// Sends `sig` with `pidfd_send_signal`. `Ok(())` if the process has already exited
    /// (`ESRCH`, or its status has been collected).
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal(pidfd, sig, NULL, 0): a null siginfo is allowed (the
        // kernel fills in a SI_USER one); no memory of ours is touched.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Sends `SIGKILL` (see [`Process::signal`]); does not wait.
    pub fn kill(&mut self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Best-effort clean-up of a process that must not run on: `SIGKILL`, then waits for
    /// its exit. Errors are ignored (one that already exited is fine).
    pub fn kill_and_reap(&mut self) {
        let _ = self.kill();
        let _ = self.wait();
    }

    fn waitid(&mut self, block: bool) -> io::Result<Option<Ended>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = if self.child {
            waitid_pidfd(self.pidfd.as_fd(), block)?.map(Ended::Status)
        } else {
            // Not our child: waitid would fail with ECHILD. The pidfd turns readable when
            // the process exits.
            poll_pidfd(self.pidfd.as_fd(), if block { -1 } else { 0 })?.then_some(Ended::Unknown)
        };
        if status.is_some() {
            self.status = status;
        }
        Ok(status)
    }

    /// Adopts the running process `pid` (not a child of ours: its supervisor restarted),
    /// if it is still the process that started at `start_time` (`/proc/PID/stat` field 22,
    /// clock ticks since boot; see [`start_time`]): the pidfd is opened first, then the
    /// start time checked, so a pid recycled in between is refused. Its exit is seen (by
    /// polling the pidfd) but its status is not ([`Ended::Unknown`]).
    pub fn adopt(pid: i32, start_time: u64) -> io::Result<Process> {
        if pid <= 0 {
            return Err(invalid(format!("adopt: pid {pid}")));
        }
        // SAFETY: pidfd_open(pid, 0) creates a descriptor and touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just created, owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        let seen = self::start_time(pid)?;
        if seen != start_time {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pid {pid} is another process now (started at {seen}, not {start_time})"),
            ));
        }
        Ok(Process {
            pid,
            pidfd,
            status: None,
            placed_by_clone3: false,
            child: false,
        })
    }

    /// Whether this process was adopted (see [`Process::adopt`]) rather than started here.
    pub fn adopted(&self) -> bool {
        !self.child
    }

    /// A duplicate of the process's descriptor `target` (`pidfd_getfd(2)`, Linux 5.6; the
    /// caller needs ptrace access to it: root, or the same user without restrictions). The
    /// new descriptor is close-on-exec.
    pub fn take_fd(&self, target: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd(pidfd, targetfd, 0) creates a descriptor in this process and
        // touches no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                self.pidfd.as_raw_fd(),
                target,
                0 as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just created, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

/// When process `pid` started: field 22 of `/proc/PID/stat` (clock ticks since boot). With
/// the pid, it names one process for the life of the boot.
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces or ')': the fields
    // after the last ')' start with field 3.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: no start time")))
}

/// Polls `pidfd` for up to `timeout_ms` (-1: forever); whether the process has exited.
fn poll_pidfd(pidfd: BorrowedFd<'_>, timeout_ms: c_int) -> io::Result<bool> {
    loop {
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one live pollfd on the stack, and 1 is the count passed.
        let r = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// `waitid(P_PIDFD, fd, WEXITED [| WNOHANG])`, retried on `EINTR`.
fn waitid_pidfd(pidfd: BorrowedFd<'_>, block: bool) -> io::Result<Option<ExitStatus>> {
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value (and si_pid == 0 is
        // how WNOHANG reports "no child has exited").
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live siginfo_t for the kernel to fill; the pidfd is borrowed
        // and open.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &raw mut info,
                flags,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled `info` for SIGCHLD (or left it zeroed): the sigchld fields
        // are the ones to read.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return match raw_wait_status(info.si_code, status) {
            Some(raw) => Ok(Some(ExitStatus::from_raw(raw))),
            None => Err(io::Error::other(format!(
                "waitid: unexpected si_code {} for an exited child",
                info.si_code
            ))),
        };
    }
}

/// The `wait(2)` status word for a `waitid` result: `status << 8` for an exit, the signal
/// (with `0x80` if it dumped core) for a kill. `None` for other codes (stopped, continued),
/// which `WEXITED` alone never reports.
fn raw_wait_status(si_code: c_int, si_status: c_int) -> Option<i32> {
    match si_code {
        libc::CLD_EXITED => Some((si_status & 0xff) << 8),
        libc::CLD_KILLED => Some(si_status & 0x7f),
        libc::CLD_DUMPED => Some((si_status & 0x7f) | 0x80),
        _ => None,
    }
}

/// Starts the process `req` describes; returns once it has exec'd (or with the error of the
/// step that failed, see [`ChildError`]). See the module documentation.
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<Process> {
    spawn_with(req, Route::Auto)
}

/// The fallbacks [`spawn`] takes on kernels without `CLONE_INTO_CGROUP` (or without
/// `clone3`), forced: for the tests of those paths only (feature `fault-injection`).
#[cfg(any(test, feature = "fault-injection"))]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// `clone3` without `CLONE_INTO_CGROUP`, then the `cgroup.procs` write.
    Clone3ProcsWrite,
    /// `fork` + `pidfd_open`, then the `cgroup.procs` write.
    ForkProcsWrite,
}

/// [`spawn`] by `fallback`, whatever this kernel supports (tests only).
#[cfg(any(test, feature = "fault-injection"))]
#[doc(hidden)]
pub fn spawn_by_fallback(req: &SpawnRequest<'_>, fallback: Fallback) -> io::Result<Process> {
    spawn_with(
        req,
        match fallback {
            Fallback::Clone3ProcsWrite => Route::Clone3ProcsWrite,
            Fallback::ForkProcsWrite => Route::ForkProcsWrite,
        },
    )
}

/// How the child is created; anything but `Auto` only for the tests of the fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `clone3(CLONE_INTO_CGROUP)`, falling back as the module documentation says.
    Auto,
    /// The fallback: `clone3` without `CLONE_INTO_CGROUP`, then the `cgroup.procs` write.
    #[cfg(any(test, feature = "fault-injection"))]
    Clone3ProcsWrite,
    /// The last fallback: `fork` + `pidfd_open`, then the `cgroup.procs` write.
    #[cfg(any(test, feature = "fault-injection"))]
    ForkProcsWrite,
}

/// The kernel's `struct clone_args` (`CLONE_ARGS_SIZE_VER2`, 88 bytes): every field is a
/// 64-bit value, whatever the architecture.
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7); libc's constant of it is an overflowing `c_int`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `LISTEN_PID=` and room for the digits of any pid plus the terminating NUL.
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const LISTEN_PID_DIGITS: usize = 20;

/// The most descriptors the close-on-exec loop visits when `close_range` is missing.
const CLOEXEC_LOOP_CAP: RawFd = 1 << 16;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The `argv` and `envp` of the child, with the storage their pointers point into.
struct Exec {
    path: CString,
    _strings: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// The `LISTEN_PID=` entry (when asked for). Its heap buffer is only ever accessed
    /// through `listen_pid_digits` and the `envp` pointer, both taken from one `as_mut_ptr`.
    _listen_pid: Option<Vec<u8>>,
    /// Where the child writes the digits of its pid (null without `listen_pid`).
    listen_pid_digits: *mut u8,
}

impl Exec {
    fn new(req: &SpawnRequest<'_>) -> io::Result<Exec> {
        if !req.exec.is_absolute() {
            return Err(invalid(format!(
                "spawn: the program path {} is not absolute",
                req.exec.display()
            )));
        }
        let path = CString::new(req.exec.as_os_str().as_bytes()).map_err(|_| {
            invalid(format!(
                "spawn: the program path {} contains NUL",
                req.exec.display()
            ))
        })?;
        let mut strings = Vec::with_capacity(req.args.len() + req.env.len());
        let mut argv = Vec::with_capacity(req.args.len() + 2);
        argv.push(path.as_ptr());
        for arg in req.args {
            let c = CString::new(arg.as_bytes())
                .map_err(|_| invalid(format!("spawn: the argument {arg:?} contains NUL")))?;
            argv.push(c.as_ptr());
            strings.push(c);
        }
        argv.push(std::ptr::null());

        // The environment in order, duplicates resolved (last value, first position).
        let mut env: Vec<(&str, &str)> = Vec::with_capacity(req.env.len() + 1);
        for (key, value) in req.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(invalid(format!(
                    "spawn: the environment variable name {key:?} is empty or contains '=' or NUL"
                )));
            }
            if value.contains('\0') {
                return Err(invalid(format!(
                    "spawn: the value of the environment variable {key} contains NUL"
                )));
            }
            match env.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value,
                None => env.push((key, value)),
            }
        }

        let mut listen_pid = None;
        let mut listen_pid_ptr: *mut u8 = std::ptr::null_mut();
        if req.listen_pid {
            let mut buf = Vec::with_capacity(LISTEN_PID_PREFIX.len() + LISTEN_PID_DIGITS + 1);
            buf.extend_from_slice(LISTEN_PID_PREFIX);
            buf.resize(LISTEN_PID_PREFIX.len() + LISTEN_PID_DIGITS + 1, 0);
            listen_pid_ptr = buf.as_mut_ptr();
            listen_pid = Some(buf);
            if !env.iter().any(|(k, _)| *k == "LISTEN_PID") {
                env.push(("LISTEN_PID", ""));
            }
        }
        let mut envp = Vec::with_capacity(env.len() + 1);
        for (key, value) in env {
            if req.listen_pid && key == "LISTEN_PID" {
                envp.push(listen_pid_ptr.cast_const().cast::<c_char>());
                continue;
            }
            let mut entry = Vec::with_capacity(key.len() + value.len() + 2);
            entry.extend_from_slice(key.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            // Checked above: neither part contains NUL.
            let c = CString::new(entry).map_err(|e| invalid(e.to_string()))?;
            envp.push(c.as_ptr());
            strings.push(c);
        }
        envp.push(std::ptr::null());

        let listen_pid_digits = if listen_pid_ptr.is_null() {
            listen_pid_ptr
        } else {
            // SAFETY: the buffer is LISTEN_PID_PREFIX.len() + 21 bytes long, so the offset
            // stays inside it.
            unsafe { listen_pid_ptr.add(LISTEN_PID_PREFIX.len()) }
        };
        Ok(Exec {
            path,
            _strings: strings,
            argv,
            envp,
            _listen_pid: listen_pid,
            listen_pid_digits,
        })
    }
}

/// What the child reads between fork and exec: plain numbers and pointers into memory
/// prepared by the parent (the child has its own copy of it).
struct ChildPlan<'a> {
    exec: &'a Exec,
    /// `cgroup.procs` to write `"0"` to (fallback), or -1.
    procs_fd: RawFd,
    new_session: bool,
    cpus: Option<&'a libc::cpu_set_t>,
    /// `/dev/null` for stdin, or -1 to inherit.
    stdin_fd: RawFd,
    /// stdout and stderr, or -1 to inherit.
    output_fd: RawFd,
    /// Flags added to `clone3`'s (`CLONE_NEWPID`).
    clone_flags: u64,
    /// The descriptors to `dup2` to 3, 4, ...; each above `cloexec_from`.
    sources: &'a [RawFd],
    /// 3 + the number of `sources`: every descriptor from here on is close-on-exec.
    cloexec_from: RawFd,
    /// Where the close-on-exec loop stops when `close_range` is missing.
    cloexec_loop_end: RawFd,
    /// The highest signal number (`SIGRTMAX`).
    sig_max: c_int,
    /// The empty signal set.
    empty_mask: libc::sigset_t,
    /// The write end of the report pipe (close-on-exec, above the target range).
    report_fd: RawFd,
}

/// The errno of the last failed call (async-signal-safe: reads a thread-local int).
fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The errno an `io::Error` of a system call carries (no allocation).
fn os(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The child: runs the steps, execs, or reports the failed step and exits with 127.
///
/// Runs between fork and exec of a possibly multi-threaded parent: it must not allocate,
/// take a lock or touch anything but `plan` and its own stack. Everything below is a plain
/// system call (through its libc wrapper, none of which keeps state) on values prepared
/// before the fork.
fn child(plan: &ChildPlan<'_>) -> ! {
    let Err((step, errno)) = child_steps(plan);
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&errno.to_ne_bytes());
    msg[4..].copy_from_slice(&step.code().to_ne_bytes());
    // 8 bytes to an empty pipe: one atomic write that does not block. If it fails there
    // is nobody else to tell; the parent then sees end of file and the exit status 127.
    let _ = sys::write_raw(plan.report_fd, &msg);
    // SAFETY: _exit ends the child at once, without running the parent's atexit handlers
    // or flushing its stdio buffers (copies of the parent's).
    unsafe { libc::_exit(127) }
}

/// The steps of the child in order; returns only on failure.
fn child_steps(plan: &ChildPlan<'_>) -> Result<std::convert::Infallible, (ChildStep, i32)> {
    if plan.procs_fd >= 0 {
        // "0" moves the writing process itself into the group.
        sys::write_raw(plan.procs_fd, b"0").map_err(|e| (ChildStep::CgroupProcs, os(&e)))?;
    }
    reset_signal_dispositions(plan.sig_max);
    if plan.new_session {
        // SAFETY: setsid only changes the calling process's session.
        if unsafe { libc::setsid() } < 0 {
            return Err((ChildStep::Setsid, errno()));
        }
    }
    if let Some(set) = plan.cpus {
        sys::set_affinity_raw(set).map_err(|e| (ChildStep::Affinity, os(&e)))?;
    }
    if plan.stdin_fd >= 0 {
        sys::dup2_raw(plan.stdin_fd, 0).map_err(|e| (ChildStep::Stdin, os(&e)))?;
    }
    if plan.output_fd >= 0 {
        sys::dup2_raw(plan.output_fd, 1).map_err(|e| (ChildStep::Output, os(&e)))?;
        sys::dup2_raw(plan.output_fd, 2).map_err(|e| (ChildStep::Output, os(&e)))?;
    }
    for (target, &src) in (3..).zip(plan.sources) {
        // Every source lies above every target, so no dup2 overwrites a later source;
        // dup2 leaves FD_CLOEXEC clear on the target.
        sys::dup2_raw(src, target).map_err(|e| (ChildStep::Fds, os(&e)))?;
    }
    cloexec_from(plan.cloexec_from, plan.cloexec_loop_end)
        .map_err(|e| (ChildStep::CloseOnExec, e))?;
    if !plan.exec.listen_pid_digits.is_null() {
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
        // SAFETY: listen_pid_digits points to LISTEN_PID_DIGITS + 1 NUL bytes of the
        // child's own copy of the parent's buffer, which nothing else uses in the child.
        unsafe { write_decimal(plan.exec.listen_pid_digits, pid as u64) };
    }
    let mask = &raw const plan.empty_mask;
    // SAFETY: `mask` points to a valid, initialised sigset_t; the old mask is not wanted.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) } < 0 {
        return Err((ChildStep::SignalMask, errno()));
    }
    // SAFETY: path, argv and envp are NUL-terminated strings and NULL-terminated pointer
    // arrays built before the fork (their storage is in the child's copy of the parent's
    // memory); execve only returns on failure.
    unsafe {
        libc::execve(
            plan.exec.path.as_ptr(),
            plan.exec.argv.as_ptr(),
            plan.exec.envp.as_ptr(),
        )
    };
    Err((ChildStep::Exec, errno()))
}

/// Every signal back to `SIG_DFL`: handlers of the parent (they would not survive exec
/// anyway, but must not run before it) and ignored signals (which would: `SIGPIPE`, which
/// the Rust runtime ignores, and any other). Signals that cannot be changed (`SIGKILL`,
/// `SIGSTOP`, libc's internal ones) fail, which is ignored.
fn reset_signal_dispositions(sig_max: c_int) {
    for sig in 1..=sig_max {
        // SAFETY: sigaction is plain data; all-zero is valid (and is SIG_DFL, no flags).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the disposition of `sig` into `old`, a live stack value.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &raw mut old) } < 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            // SAFETY: as above; all-zero is SIG_DFL with an empty mask and no flags.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: installs `dfl`, a live stack value; the old one is not wanted.
            unsafe { libc::sigaction(sig, &raw const dfl, std::ptr::null_mut()) };
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec: `close_range(CLOSE_RANGE_CLOEXEC)`
/// (Linux 5.11), else `fcntl` on each number up to `loop_end`. The errno on failure.
fn cloexec_from(first: RawFd, loop_end: RawFd) -> Result<(), i32> {
    match sys::cloexec_from_raw(first) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) => {}
        Err(e) => return Err(os(&e)),
    }
    for fd in first..loop_end {
        // SAFETY: F_GETFD/F_SETFD only read and set descriptor flags; a number that is
        // not open fails with EBADF, which is skipped.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Writes the decimal digits of `n` at `dst` (at most 20 bytes; no allocation).
///
/// # Safety
/// `dst` must be valid for writing 20 bytes.
unsafe fn write_decimal(dst: *mut u8, mut n: u64) {
    let mut digits = [0u8; LISTEN_PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= 20 bytes, which the caller guarantees are writable.
        unsafe { dst.add(i).write(digits[len - 1 - i]) };
    }
}

/// `fd` itself if it lies at or above `floor`, else a close-on-exec duplicate there.
fn above(fd: OwnedFd, floor: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= floor {
        Ok(fd)
    } else {
        sys::dup_at_least(fd.as_fd(), floor)
    }
}

/// A close-on-exec pipe: (read end, write end).
fn report_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live two-int array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by the kernel and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `openat(dir, "cgroup.procs", O_WRONLY | O_CLOEXEC)`.
fn open_procs(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: the path is a NUL-terminated literal; `dir` is borrowed and open.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How one attempt creates the child.
#[derive(Debug, Clone, Copy)]
enum Launch {
    /// `clone3(CLONE_PIDFD [| CLONE_INTO_CGROUP with this directory])`.
    Clone3(Option<RawFd>),
    /// `fork` + `pidfd_open`.
    Fork,
}

/// Blocks every signal for as long as it lives (restoring the previous mask on drop), so
/// that no handler of the parent runs in the child before it has reset them.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> io::Result<SignalsBlocked> {
        // SAFETY: sigset_t is plain data; sigfillset initialises it completely.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is a live sigset_t.
        unsafe { libc::sigfillset(&raw mut all) };
        // SAFETY: as above; pthread_sigmask fills it with the current mask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets are live stack values; this changes only this thread's mask.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut old) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(SignalsBlocked(old))
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`, a valid sigset_t.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const self.0, std::ptr::null_mut())
        };
    }
}

/// Creates the child as `how` says; in the parent returns its pid and pidfd.
fn launch(how: Launch, plan: &ChildPlan<'_>) -> io::Result<(i32, OwnedFd)> {
    let blocked = SignalsBlocked::new()?;
    let result = match how {
        Launch::Clone3(cgroup) => {
            let mut pidfd: c_int = -1;
            let mut args = CloneArgs {
                flags: libc::CLONE_PIDFD as u64 | plan.clone_flags,
                pidfd: (&raw mut pidfd) as u64,
                exit_signal: libc::SIGCHLD as u64,
                ..CloneArgs::default()
            };
            if let Some(dir) = cgroup {
                args.flags |= CLONE_INTO_CGROUP;
                args.cgroup = dir as u64;
            }
            // SAFETY: clone3 with a fully initialised clone_args of the size passed, no
            // CLONE_VM and no stack: the child gets a copy of this address space and
            // returns here on its own copy of this stack, like fork. It then only runs
            // `child`, which never returns (see its contract). The kernel writes the pidfd
            // into `pidfd`, a live local.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &raw const args,
                    std::mem::size_of::<CloneArgs>(),
                )
            };
            if r == 0 {
                child(plan);
            }
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor that nobody
                // else owns.
                Ok((r as i32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
            }
        }
        Launch::Fork if plan.clone_flags != 0 => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a new PID namespace needs clone3 (Linux 5.3), which this kernel lacks",
        )),
        Launch::Fork => {
            // SAFETY: the child only runs `child`, which never returns (see its contract).
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                child(plan);
            }
            if pid < 0 {
                Err(io::Error::last_os_error())
            } else {
                pidfd_open(pid)
            }
        }
    };
    drop(blocked);
    result
}

/// `pidfd_open` for the child `pid` just forked (not yet reaped, so the pid cannot have
/// been reused). On failure the child is killed and reaped.
fn pidfd_open(pid: i32) -> io::Result<(i32, OwnedFd)> {
    // SAFETY: pidfd_open(pid, 0) creates a descriptor and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: `pid` is our unreaped child: killing and reaping it cannot hit anyone
        // else; waitpid writes no status (null).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            while libc::waitpid(pid, std::ptr::null_mut(), 0) < 0 && errno() == libc::EINTR {}
        }
        return Err(io::Error::new(
            e.kind(),
            format!("pidfd_open of the forked child (Linux 5.3 needed): {e}"),
        ));
    }
    // SAFETY: a descriptor the kernel just created, owned by nobody else.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(r as RawFd) }))
}

fn spawn_with(req: &SpawnRequest<'_>, route: Route) -> io::Result<Process> {
    let exec = Exec::new(req)?;
    let count = RawFd::try_from(req.fds.len())
        .ok()
        .filter(|&n| n < RawFd::MAX / 2)
        .ok_or_else(|| invalid(format!("spawn: {} descriptors", req.fds.len())))?;
    let cloexec_from = 3 + count;
    // Everything the child holds lives at or above `floor`, out of the range 3.. it fills.
    let floor = cloexec_from + 16;
    let sources: Vec<OwnedFd> = req
        .fds
        .iter()
        .map(|fd| sys::dup_at_least(*fd, floor))
        .collect::<io::Result<_>>()?;
    let raw_sources: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let devnull = match req.stdio {
        Stdio::Null => {
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            Some(above(OwnedFd::from(f), floor)?)
        }
        Stdio::Inherit => None,
    };
    let output = req
        .output
        .map(|o| sys::dup_at_least(o, floor))
        .transpose()?;
    let (report_read, report_write) = report_pipe()?;
    let report_write = above(report_write, floor)?;
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let cloexec_loop_end = RawFd::try_from(nofile)
        .unwrap_or(RawFd::MAX)
        .clamp(1024, CLOEXEC_LOOP_CAP)
        .max(floor + 8);
    // SAFETY: sigset_t is plain data; sigemptyset initialises it completely.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty_mask` is a live sigset_t.
    unsafe { libc::sigemptyset(&raw mut empty_mask) };

    let mut plan = ChildPlan {
        exec: &exec,
        procs_fd: -1,
        new_session: req.new_session,
        cpus: req.cpus,
        stdin_fd: devnull.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        output_fd: output.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        clone_flags: if req.new_pid_namespace {
            libc::CLONE_NEWPID as u64
        } else {
            0
        },
        sources: &raw_sources,
        cloexec_from,
        cloexec_loop_end,
        sig_max: libc::SIGRTMAX(),
        empty_mask,
        report_fd: report_write.as_raw_fd(),
    };

    // The attempts: CLONE_INTO_CGROUP first, then (on the errors of a kernel that cannot)
    // the cgroup.procs write after clone3, or after fork if clone3 is missing altogether.
    let mut procs: Option<OwnedFd> = None;
    let mut next = match (route, req.cgroup_dir) {
        (Route::Auto, dir) => Launch::Clone3(dir.map(|d| d.as_raw_fd())),
        #[cfg(any(test, feature = "fault-injection"))]
        (Route::Clone3ProcsWrite | Route::ForkProcsWrite, dir) => {
            if let Some(dir) = dir {
                procs = Some(above(open_procs(dir)?, floor)?);
            }
            if route == Route::ForkProcsWrite {
                Launch::Fork
            } else {
                Launch::Clone3(None)
            }
        }
    };
    let (pid, pidfd) = loop {
        plan.procs_fd = procs.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        match launch(next, &plan) {
            Ok(child) => break child,
            Err(e) => {
                let code = e.raw_os_error();
                next = match (next, code) {
                    (Launch::Clone3(Some(_)), Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)) => {
                        let dir = req.cgroup_dir.expect("a cgroup attempt has a directory");
                        procs = Some(above(open_procs(dir)?, floor)?);
                        if code == Some(libc::ENOSYS) {
                            Launch::Fork
                        } else {
                            Launch::Clone3(None)
                        }
                    }
                    (Launch::Clone3(None), Some(libc::ENOSYS)) => Launch::Fork,
                    _ => return Err(e),
                };
            }
        }
    };
    let placed_by_clone3 = matches!(next, Launch::Clone3(Some(_)));
    // The parent's copies: the child has its own. The write end must be closed here for
    // the read below to see end of file at the child's exec.
    drop(report_write);
    drop(procs);
    drop(devnull);
    drop(output);
    drop(sources);

    let mut process = Process {
        pid,
        pidfd,
        status: None,
        placed_by_clone3,
        child: true,
    };
    match read_report(report_read.as_fd()) {
        Ok(None) => Ok(process),
        Ok(Some((step, errno))) => {
            // It exits with 127 right after the report: reap it. A failure to do so
            // matters less than the error being reported.
            let _ = process.wait();
            Err(ChildError {
                exec: req.exec.to_path_buf(),
                step,
                errno,
            }
            .into_io())
        }
        Err(e) => {
            // The child's state is unknown: do not leave it running unsupervised.
            process.kill_and_reap();
            Err(e)
        }
    }
}

/// Reads the report pipe to its end: `None` when the child exec'd (nothing written),
/// else the failed step and its errno.
fn read_report(fd: BorrowedFd<'_>) -> io::Result<Option<(ChildStep, i32)>> {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`, a live stack array, with its
        // length passed; the fd is borrowed and open.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[filled..].as_mut_ptr().cast(),
                buf.len() - filled,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        filled += n as usize;
    }
    match filled {
        0 => Ok(None),
        8 => {
            let errno = i32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
            let code = u32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
            let step = ChildStep::from_code(code).ok_or_else(|| {
                io::Error::other(format!("spawn: the child reported an unknown step {code}"))
            })?;
            Ok(Some((step, errno)))
        }
        n => Err(io::Error::other(format!(
            "spawn: the child's report was cut short ({n} of 8 bytes)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn wait_status_words() {
        let exited = ExitStatus::from_raw(raw_wait_status(libc::CLD_EXITED, 3).unwrap());
        assert_eq!(exited.code(), Some(3));
        let killed = ExitStatus::from_raw(raw_wait_status(libc::CLD_KILLED, 9).unwrap());
        assert_eq!((killed.code(), killed.signal()), (None, Some(9)));
        assert!(!killed.core_dumped());
        let dumped = ExitStatus::from_raw(raw_wait_status(libc::CLD_DUMPED, 11).unwrap());
        assert_eq!((dumped.signal(), dumped.core_dumped()), (Some(11), true));
        assert_eq!(raw_wait_status(libc::CLD_STOPPED, 19), None);
    }

    #[test]
    fn decimal_digits() {
        for n in [0u64, 7, 10, 4_194_304, u64::from(u32::MAX), u64::MAX] {
            let mut buf = [0u8; LISTEN_PID_DIGITS + 1];
            // SAFETY: `buf` has room for 20 digits.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let text = CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap();
            assert_eq!(text, n.to_string());
        }
    }

    fn envp_of(exec: &Exec) -> Vec<String> {
        exec.envp
            .iter()
            .take_while(|p| !p.is_null())
            // SAFETY: every non-null entry points to a NUL-terminated string owned by `exec`.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned())
            .collect()
    }

    fn request(env: &[(String, String)], listen_pid: bool) -> SpawnRequest<'_> {
        SpawnRequest {
            exec: Path::new("/bin/true"),
            args: &[],
            env,
            listen_pid,
            fds: &[],
            cgroup_dir: None,
            cpus: None,
            new_session: false,
            stdio: Stdio::Null,
            output: None,
            new_pid_namespace: false,
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_is_built_in_order_with_one_listen_pid() {
        let env = pairs(&[("A", "1"), ("LISTEN_PID", "1"), ("B", "2"), ("A", "3")]);
        let exec = Exec::new(&request(&env, true)).unwrap();
        // The child fills the digits; before that the entry ends right after the '='.
        assert_eq!(envp_of(&exec), ["A=3", "LISTEN_PID=", "B=2"]);
        let exec = Exec::new(&request(&env, false)).unwrap();
        assert_eq!(envp_of(&exec), ["A=3", "LISTEN_PID=1", "B=2"]);
        let env = pairs(&[("A", "1")]);
        let exec = Exec::new(&request(&env, true)).unwrap();
        assert_eq!(envp_of(&exec), ["A=1", "LISTEN_PID="]);
        assert!(!exec.listen_pid_digits.is_null());
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        for bad in [
            pairs(&[("A=B", "1")]),
            pairs(&[("", "1")]),
            pairs(&[("A\0", "1")]),
            pairs(&[("A", "1\0")]),
        ] {
            let err = Exec::new(&request(&bad, false)).err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn fork_fallback_reports_exec_failures_and_exit_codes() {
        let env = pairs(&[]);
        let mut req = request(&env, false);
        req.exec = Path::new("/nonexistent/program");
        let err = spawn_with(&req, Route::ForkProcsWrite).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        req.exec = Path::new("/bin/false");
        let mut p = spawn_with(&req, Route::ForkProcsWrite).unwrap();
        assert_eq!(p.wait().unwrap().code(), Some(1));
    }
}
