//! The raw system calls of this crate, each wrapped once with its safety argument.
//!
//! This is the only module of `state-serializers` allowed to use `unsafe` (the crate root
//! has `#![deny(unsafe_code)]`, lifted for this module alone; `tests/unsafe_confined.rs`
//! checks it). Every `unsafe` block carries its reason in a `// SAFETY:` comment.
//!
//! Everything here that is called from a `pre_exec` hook (between `fork` and `exec`, see
//! `set_child_setup`) is a single system call with no allocation, no lock and no `errno`
//! beyond reading it once: async-signal-safe by construction.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `fcntl(F_GET_SEALS)`: the seals of a memfd (or shmem file). `EINVAL` for other files.
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the file's seal set; the fd is
    // borrowed, so it stays open for the duration of the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u32)
    }
}

/// `fcntl(F_ADD_SEALS)`: adds seals to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int flag set and changes only the file's seal set; the
    // fd is borrowed and open.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `F_DUPFD_CLOEXEC`: duplicates `fd` at the lowest free number `>= min`, close-on-exec.
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches no memory.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a descriptor the kernel just created for us and nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `dup2(src, dst)`; the new descriptor does not have `FD_CLOEXEC`. Async-signal-safe.
pub fn dup2_raw(src: RawFd, dst: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates this process's descriptor table.
    check(unsafe { libc::dup2(src, dst) })
}

/// Clears `FD_CLOEXEC` on `fd` (needed when `dup2` had `src == dst`). Async-signal-safe.
pub fn clear_cloexec_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD with 0 only changes the descriptor's flags.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: every descriptor from `first` on is
/// closed at the coming `exec` (so a restored workload inherits only what it is handed),
/// without closing anything before it (the runtime's own exec-status pipe keeps working).
/// Kernels before 5.11 lack the flag: the error is returned and may be ignored.
/// Async-signal-safe.
pub fn cloexec_from_raw(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets descriptor flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `setrlimit`. Async-signal-safe.
pub fn setrlimit_raw(resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit on the stack for the duration of the call; the
    // resource number comes from the libc constants (see `task::rlimit_resource`).
    check(unsafe { libc::setrlimit(resource as _, &raw const lim) })
}

/// Builds a CPU set for [`set_affinity_raw`] (allocation-free to apply).
pub fn cpu_set(cpus: &[u32]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cpus {
        if c as usize >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpu {c} is beyond the {max} CPUs a cpu_set_t holds"),
            ));
        }
        // SAFETY: `c` was checked against the set's capacity just above.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    Ok(set)
}

/// `sched_setaffinity(0, set)`. Async-signal-safe.
pub fn set_affinity_raw(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` points to a live cpu_set_t of the size passed.
    check(unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            std::ptr::from_ref(set),
        )
    })
}

/// `setpriority(PRIO_PROCESS, 0, nice)`. Async-signal-safe.
pub fn set_nice_raw(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority on the calling process touches no memory.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) })
}

/// `sched_setscheduler(0, policy, prio)`. Async-signal-safe.
pub fn set_scheduler_raw(policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` lives on the stack for the duration of the call.
    check(unsafe { libc::sched_setscheduler(0, policy, &raw const param) })
}

/// `setgroups`, `setgid`, `setuid` in that order. Async-signal-safe in a child after fork
/// (a single thread, so glibc's cross-thread broadcast has nobody to signal).
pub fn set_credentials_raw(groups: &[libc::gid_t], gid: u32, uid: u32) -> io::Result<()> {
    // SAFETY: `groups` is a live slice whose length is passed alongside its pointer.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain credential system calls; no memory is touched.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) })
}

/// `write(2)` of a whole small buffer. Async-signal-safe.
pub fn write_raw(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is a live slice whose length is passed alongside its pointer.
    let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else if r as usize != buf.len() {
        // `From<ErrorKind>` allocates nothing (a message would be boxed): this function
        // runs between fork and exec.
        Err(io::Error::from(io::ErrorKind::WriteZero))
    } else {
        Ok(())
    }
}

/// The hard limit of `resource` for this process.
pub fn getrlimit_hard(resource: u32) -> io::Result<u64> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `cur`, a live stack value.
    check(unsafe { libc::getrlimit(resource as _, &raw mut cur) })?;
    Ok(cur.rlim_max)
}

/// This process's nice value (`getpriority(PRIO_PROCESS, 0)`).
pub fn own_nice() -> i32 {
    // SAFETY: errno is thread-local; getpriority touches no memory. errno is reset first
    // because -1 is also a valid nice value; on the (impossible for our own process)
    // error we report 0.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// What a restored task does to itself between `fork` and `exec` ([`set_child_setup`]).
/// Every value is decided, and every buffer allocated, in the parent.
pub(crate) struct ChildSetup {
    /// `cgroup.procs` of the cgroup to join (by writing `0`). Joined first: the descriptor
    /// may sit in the range the moves fill. Must stay open until the spawn returns.
    pub cgroup_procs: Option<RawFd>,
    /// Every descriptor from this one on is marked close-on-exec before the moves, so the
    /// workload inherits only what it is handed (best effort: kernels before 5.11 lack
    /// `CLOSE_RANGE_CLOEXEC`; the error is ignored).
    pub cloexec_from: RawFd,
    /// `(src, dst)`: `dup2(src, dst)`, which clears `FD_CLOEXEC` on `dst`. Every `src`
    /// must lie above every `dst` (no move clobbers a later source) and stay open until
    /// the spawn returns.
    pub moves: Vec<(RawFd, RawFd)>,
    /// `(resource, soft, hard)` for `setrlimit`.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// For `sched_setaffinity` (built with [`cpu_set`]).
    pub affinity: Option<libc::cpu_set_t>,
    /// `(policy, priority)` for `sched_setscheduler`.
    pub sched: Option<(i32, i32)>,
    /// For `setpriority`.
    pub nice: Option<i32>,
    /// `(groups, gid, uid)` for `setgroups`, `setgid`, `setuid`.
    pub creds: Option<(Vec<libc::gid_t>, u32, u32)>,
}

/// Has the child of `cmd` apply `setup` to itself after `fork`, before `exec`, in this
/// order: join the cgroup, mark descriptors from `cloexec_from` on close-on-exec, the
/// `dup2` moves, rlimits, affinity, scheduling policy, nice value, then credentials (last:
/// the steps before may need root). The first failing step ends the child and
/// `Command::spawn` returns its error (only the errno reaches the parent).
///
/// Contract of the hook (`CommandExt::pre_exec`): it runs in the child of a `fork` of a
/// possibly multi-threaded process, where another thread may have held the allocator's
/// or any other lock at the time of the fork, so only async-signal-safe work is allowed.
/// The hook does no more than that: it reads `setup` (moved into it, built before the
/// fork) without allocating, and calls the wrappers of this module, each one system call
/// (`write`, `close_range`, `dup2`, `setrlimit`, `sched_setaffinity`,
/// `sched_setscheduler`, `setpriority`, `setgroups`, `setgid`, `setuid`) whose error is an
/// errno (`io::Error::last_os_error`, or `WriteZero` from its kind: no allocation). It
/// touches no Rust object of the parent but `setup`, takes no lock and reads no
/// environment. The descriptors it names are plain numbers in the child's own copy of the
/// table, about to be replaced by `exec`: a stale one fails the call (`EBADF`), which
/// ends the spawn with that error.
pub(crate) fn set_child_setup(cmd: &mut Command, setup: ChildSetup) {
    let ChildSetup {
        cgroup_procs,
        cloexec_from,
        moves,
        rlimits,
        affinity,
        sched,
        nice,
        creds,
    } = setup;
    let hook = move || -> io::Result<()> {
        if let Some(fd) = cgroup_procs {
            write_raw(fd, b"0")?;
        }
        let _ = cloexec_from_raw(cloexec_from);
        for &(src, dst) in &moves {
            dup2_raw(src, dst)?;
        }
        for &(res, soft, hard) in &rlimits {
            setrlimit_raw(res, soft, hard)?;
        }
        if let Some(set) = &affinity {
            set_affinity_raw(set)?;
        }
        if let Some((policy, prio)) = sched {
            set_scheduler_raw(policy, prio)?;
        }
        if let Some(n) = nice {
            set_nice_raw(n)?;
        }
        if let Some((groups, gid, uid)) = &creds {
            set_credentials_raw(groups, *gid, *uid)?;
        }
        Ok(())
    };
    // SAFETY: `hook` is async-signal-safe as the contract above details: single system
    // calls over values computed before the fork, no allocation, no lock, no access to
    // anything of the parent but its own captured data.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// `pidfd_open(pid, 0)`: a descriptor that refers to process `pid` itself (not to whatever
/// process reuses the number later).
pub fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a descriptor the kernel just created for us and nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate, in this process, of descriptor `fd` of the
/// process `pidfd` refers to (needs ptrace access to it: root, or the same user without
/// Yama restrictions). The duplicate is close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd takes two descriptors numbers and flags and returns a new
    // descriptor or -1; the pidfd is borrowed and open; no memory of ours is touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd,
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a descriptor the kernel just created for us and nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) })
}

/// `getsockopt(fd, level, name)` of an `int` option.
pub fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes for the whole call and `len` holds the
    // size of `v`; the kernel writes at most `len` bytes; the fd is borrowed and open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut v).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    check(r).map(|()| v)
}
