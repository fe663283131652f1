//! cgroup v2: per-workload groups, `cgroup.freeze`, `cgroup.kill`; SIGSTOP as the fallback.
//!
//! The cgroup v2 hierarchy is found from `/proc/self/mountinfo` (pure v2 at
//! `/sys/fs/cgroup` or the hybrid layout's `/sys/fs/cgroup/unified`). Where no v2 hierarchy
//! is writable (no root, no delegation), [`Freezer::Signal`] stops the workload's processes
//! with SIGSTOP instead, which callers report.
//!
//! Groups are removed as they were created, leaf first and only when empty: `rmdir(2)` of a
//! cgroup fails (`EBUSY`) while it holds a process or a child group, so removal can never
//! take a running process's group away; a group whose processes are still exiting (after
//! `cgroup.kill`) is retried for a short while. [`remove_tree`] removes a group with every
//! group below it; [`Freezer::remove`] a workload's, [`Freezer::remove_base`] an instance's
//! (and its parents up to the mount, each only once empty).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::signal::{Signal, kill};
use nix::sys::time::TimeSpec;
use nix::unistd::Pid;

/// How long a freeze may take to be reported complete by the kernel.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a freeze waits between two reads of `cgroup.events` (a notification the
/// kernel deferred is not waited for longer).
const FREEZE_POLL: Duration = Duration::from_micros(50);
/// How long removing a group may wait for its killed processes to leave it.
pub const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

/// Where the cgroup v2 hierarchy is mounted, if anywhere.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // mountinfo: ... mount-point ... - fstype source options
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Whether the cgroup v2 hierarchy is mounted with `favordynmods`. Without it, moving a
/// process into a cgroup takes `cgroup_threadgroup_rwsem` for writing, which waits for an
/// RCU grace period: ~10–15 ms measured here on every workload start in a new group, the
/// largest fixed cost of a move. `None` when no cgroup v2 hierarchy is mounted.
pub fn favordynmods() -> Option<bool> {
    favordynmods_in(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// [`favordynmods`] over the text of a `mountinfo` file.
pub fn favordynmods_in(mountinfo: &str) -> Option<bool> {
    mountinfo.lines().find_map(|line| {
        let (_, right) = line.split_once(" - ")?;
        let mut it = right.split_whitespace();
        if it.next()? != "cgroup2" {
            return None;
        }
        let super_opts = it.nth(1)?;
        Some(super_opts.split(',').any(|o| o == "favordynmods"))
    })
}

/// The mechanism that freezes workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v2 (mounted at `mount`): one group per workload under `base`.
    Cgroup { mount: PathBuf, base: PathBuf },
    /// SIGSTOP/SIGCONT of the workload's main process.
    Signal,
}

impl Freezer {
    /// Picks cgroup v2 under `<mount>/<tag>` when it can be created, else signals.
    pub fn detect(tag: &str) -> Freezer {
        if let Some(mount) = cgroup2_mount() {
            let base = mount.join(tag);
            // A few attempts: another instance removing a shared, empty parent group at the
            // same moment (remove_base) can make one attempt fail with ENOENT.
            let created = (0..3).any(|_| fs::create_dir_all(&base).is_ok());
            if created && base.join("cgroup.procs").exists() {
                return Freezer::Cgroup { mount, base };
            }
        }
        Freezer::Signal
    }

    /// The cgroup freezer [`Freezer::detect`] picks for `tag`, without creating anything:
    /// for removing the groups of an instance that is gone. `None` without a cgroup v2
    /// mount.
    pub fn of_tag(tag: &str) -> Option<Freezer> {
        let mount = cgroup2_mount()?;
        Some(Freezer::Cgroup {
            base: mount.join(tag),
            mount,
        })
    }

    /// Short name for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            Freezer::Cgroup { .. } => "cgroup.freeze",
            Freezer::Signal => "SIGSTOP",
        }
    }

    /// The group a workload runs in (cgroup freezer only).
    pub fn group(&self, workload: &str) -> Option<PathBuf> {
        match self {
            Freezer::Cgroup { base, .. } => Some(base.join(workload)),
            Freezer::Signal => None,
        }
    }

    /// The cgroup v2 mount and the workload's group path inside it (`/a/b`), for tools
    /// that take a hierarchy root and a path (state-serializers' restore).
    pub fn hierarchy_path(&self, workload: &str) -> Option<(PathBuf, String)> {
        match self {
            Freezer::Cgroup { mount, base } => {
                let rel = base.join(workload);
                let rel = rel.strip_prefix(mount).ok()?;
                Some((mount.clone(), format!("/{}", rel.display())))
            }
            Freezer::Signal => None,
        }
    }

    /// Creates the workload's group; returns the path of its `cgroup.procs`.
    pub fn prepare(&self, workload: &str) -> io::Result<Option<PathBuf>> {
        match self.group(workload) {
            Some(g) => {
                fs::create_dir_all(&g)?;
                Ok(Some(g.join("cgroup.procs")))
            }
            None => Ok(None),
        }
    }

    /// Freezes the workload; returns once the kernel reports it frozen.
    pub fn freeze(&self, workload: &str, pid: i32) -> io::Result<()> {
        match self.group(workload) {
            Some(g) => {
                fs::write(g.join("cgroup.freeze"), "1")?;
                wait_frozen(&g, true)
            }
            None => kill(Pid::from_raw(pid), Signal::SIGSTOP).map_err(io::Error::from),
        }
    }

    /// Thaws the workload.
    pub fn thaw(&self, workload: &str, pid: i32) -> io::Result<()> {
        match self.group(workload) {
            Some(g) => {
                fs::write(g.join("cgroup.freeze"), "0")?;
                wait_frozen(&g, false)
            }
            None => kill(Pid::from_raw(pid), Signal::SIGCONT).map_err(io::Error::from),
        }
    }

    /// Kills every process of the workload (`cgroup.kill`, else SIGKILL of the main pid).
    pub fn kill(&self, workload: &str, pid: i32) -> io::Result<()> {
        if let Some(g) = self.group(workload)
            && g.join("cgroup.kill").exists()
        {
            return fs::write(g.join("cgroup.kill"), "1");
        }
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the workload's group and any group below it, once empty (waiting up to
    /// [`REMOVE_PATIENCE`] for killed processes to leave); missing groups are fine.
    /// Returns whether the group is gone (always true for the signal freezer).
    pub fn remove(&self, workload: &str) -> bool {
        self.group(workload)
            .is_none_or(|g| remove_tree(&g, Instant::now() + REMOVE_PATIENCE))
    }

    /// Removes the base group of this freezer with every group still below it (the
    /// workloads' groups, including those prepared for workloads that never arrived), leaf
    /// first and each only if empty, waiting up to [`REMOVE_PATIENCE`] in all for
    /// processes still exiting; then its parent groups up to the mount, each only while it
    /// is empty (for the emulated platform: the machine's group once no instance is left).
    /// Returns whether the base group is gone.
    pub fn remove_base(&self) -> bool {
        self.remove_base_within(REMOVE_PATIENCE)
    }

    /// Kills every process left anywhere under the base group (`cgroup.kill` is
    /// recursive): what an instance that crashed leaves behind. Frozen processes die too.
    /// Without cgroup v2 (or `cgroup.kill`, Linux < 5.14) nothing can be found this way.
    pub fn kill_base(&self) -> io::Result<()> {
        let Freezer::Cgroup { base, .. } = self else {
            return Ok(());
        };
        let k = base.join("cgroup.kill");
        if k.exists() {
            fs::write(k, "1")?;
        }
        Ok(())
    }

    /// [`Freezer::remove_base`], waiting at most `patience` for busy groups.
    pub fn remove_base_within(&self, patience: Duration) -> bool {
        let Freezer::Cgroup { mount, base } = self else {
            return true;
        };
        if !remove_tree(base, Instant::now() + patience) {
            return false;
        }
        remove_empty_parents(base, mount);
        true
    }
}

/// Removes the cgroup `group` and every cgroup below it, deepest first, each with
/// `rmdir(2)`, which the kernel refuses while a group holds a process or a child group: a
/// populated group is never removed, and neither is any group above it. A group that is
/// busy (its processes still exiting after `cgroup.kill`) is retried until `deadline`.
/// A directory that is not a cgroup (no `cgroup.procs`) is left alone. Returns whether
/// `group` is gone (a missing group is gone).
pub fn remove_tree(group: &Path, deadline: Instant) -> bool {
    match fs::symlink_metadata(group) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
        Err(_) => return false,
        Ok(m) if !m.is_dir() => return false,
        Ok(_) => {}
    }
    if !group.join("cgroup.procs").exists() {
        return false;
    }
    let mut children_gone = true;
    if let Ok(entries) = fs::read_dir(group) {
        for e in entries.flatten() {
            // cgroupfs has directories (child groups) and control files, no links.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                children_gone &= remove_tree(&e.path(), deadline);
            }
        }
    }
    if !children_gone {
        return false;
    }
    loop {
        match fs::remove_dir(group) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
}

/// Removes the parents of `group` below `mount`, nearest first, stopping at the first one
/// that is not empty (another instance's or machine's group is still in it).
fn remove_empty_parents(group: &Path, mount: &Path) {
    let mut dir = group.parent();
    while let Some(d) = dir {
        if d == mount || !d.starts_with(mount) || !d.join("cgroup.procs").exists() {
            return;
        }
        match fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return,
        }
        dir = d.parent();
    }
}

fn wait_frozen(group: &Path, want: bool) -> io::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let events = group.join("cgroup.events");
    let file = fs::File::open(&events)?;
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    let line = if want { "frozen 1" } else { "frozen 0" };
    let mut buf = [0u8; 4096];
    loop {
        // Read from the start each time: kernfs re-renders the file, and the read arms
        // the poll below (it wakes on a change after the last read).
        let n = file.read_at(&mut buf, 0)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not report frozen={} within {FREEZE_TIMEOUT:?}",
                    events.display(),
                    u8::from(want)
                ),
            ));
        }
        // The kernel wakes pollers of cgroup.events (POLLPRI) as soon as the group's last
        // task is frozen; it spaces notifications of one file 10 ms apart, deferring one
        // that comes sooner, so the wait is also capped at FREEZE_POLL and the file read
        // again (the old fixed 50 us sleep, now only a fallback).
        let wait = FREEZE_POLL.min(deadline - now);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a process's scheduler state letter from /proc (`T` = stopped).
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::favordynmods_in;

    #[test]
    fn favordynmods_is_read_from_the_super_options() {
        let on =
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods\n";
        let off = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let v1 = "32 31 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(favordynmods_in(on), Some(true));
        assert_eq!(favordynmods_in(&format!("{v1}{off}")), Some(false));
        assert_eq!(favordynmods_in(v1), None);
        assert_eq!(favordynmods_in("garbage"), None);
    }
}
