//! The one step of starting a workload that runs between `fork` and `exec`: joining the
//! workload's cgroup, pinning it to the instance's cpus and placing its preserved fds at
//! 3, 4, ... (`MK_STATE_FDS` order).

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use state_serializers::sys;

/// Arranges for the child of `cmd` to write "0" to `procs_fd` (the workload group's
/// `cgroup.procs`, moving itself in), pin itself to `cpus`, and `dup2` each of `sources` to
/// 3, 4, ... in order, all after `fork` and before `exec`. The raw fds must stay open until
/// `cmd` has been spawned.
pub fn place_before_exec(
    cmd: &mut Command,
    procs_fd: Option<RawFd>,
    cpus: libc::cpu_set_t,
    sources: Vec<RawFd>,
) {
    // SAFETY: the hook runs between fork and exec; it only makes single system calls
    // (write, dup2, sched_setaffinity) on values prepared before the fork, allocates nothing
    // and takes no lock, so it is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself into the group.
                sys::write_raw(fd, b"0")?;
            }
            sys::set_affinity_raw(&cpus)?;
            for (target, src) in (3..).zip(sources.iter()) {
                sys::dup2_raw(*src, target)?;
            }
            Ok(())
        });
    }
}
