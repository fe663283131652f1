//! Re-spawning a captured task in the new kernel with its preserved descriptors.
//!
//! The child gets the record's executable, argv (including argv\[0\]), environment, cwd,
//! rlimits, CPU affinity, scheduling policy and nice value, and — when running as root
//! and they differ — uid, gid and supplementary groups. The preserved descriptors are
//! placed at 3, 4, ... in the order given and named in `MK_STATE_FDS` (see
//! [`crate::fdenv`]). With a cgroup v2 root, the record's cgroup is re-created, its
//! `cpu.max`/`memory.max`/`cpuset.cpus` written where the controller is enabled, and the
//! child joins it before `exec` (so it never runs outside it).
//!
//! Everything that could fail for a reason the caller can act on (an absent CPU, a
//! limit above the caller's own, a cgroup the caller may not create) is decided in the
//! parent and reported per the [`Policy`]; the child only performs the prepared calls.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Result, StateError};
use crate::fdenv::{self, NamedFd};
use crate::task::{SchedPolicy, TaskRecord, rlimit_resource};
use crate::{Policy, Report, sys};

/// Options of [`spawn`].
#[derive(Debug)]
pub struct SpawnOptions {
    /// What to do with items that cannot be applied.
    pub policy: Policy,
    /// Mount point of the cgroup v2 hierarchy in which to re-create the record's cgroup;
    /// `None` leaves the child in the caller's cgroup.
    pub cgroup_root: Option<PathBuf>,
    /// Switch to the record's uid/gid/groups when running as root (default true).
    pub set_credentials: bool,
    /// Descriptor numbers the handed-over descriptors get in the child.
    pub placement: FdPlacement,
    pub stdin: Option<Stdio>,
    pub stdout: Option<Stdio>,
    pub stderr: Option<Stdio>,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self {
            policy: Policy::BestEffort,
            cgroup_root: None,
            set_credentials: true,
            placement: FdPlacement::Contiguous,
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }
}

/// Where handed-over descriptors land in the restored task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FdPlacement {
    /// 3, 4, 5, ... in the order given (the `MK_STATE_FDS` default).
    #[default]
    Contiguous,
    /// Explicit numbers (each >= 3, unique), one per descriptor, e.g. the numbers the
    /// workload had them at before the upgrade (`FdRecord::fd`). `MK_STATE_FDS` names
    /// them all the same.
    Explicit(Vec<RawFd>),
}

/// A restored task.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    /// The descriptors as announced in `MK_STATE_FDS`.
    pub fds: Vec<NamedFd>,
    /// What was applied and what was not (only under [`Policy::BestEffort`] can the
    /// latter be non-empty).
    pub report: Report,
}

/// First descriptor number handed to the workload.
pub const FIRST_FD: RawFd = 3;

struct Prepared {
    rlimits: Vec<(u32, u64, u64)>,
    affinity: Option<libc::cpu_set_t>,
    sched: Option<(i32, i32)>,
    nice: Option<i32>,
    creds: Option<(Vec<libc::gid_t>, u32, u32)>,
    cgroup_procs: Option<fs::File>,
}

fn self_affinity() -> Vec<u32> {
    let path = Path::new("/proc/self/status");
    fs::read_to_string(path)
        .ok()
        .and_then(|t| crate::task::parse_status(path, &t).ok())
        .map(|s| s.affinity)
        .unwrap_or_default()
}

fn prepare(rec: &TaskRecord, opts: &SpawnOptions, report: &mut Report) -> Result<Prepared> {
    let root = sys::euid() == 0;
    let mut rlimits = Vec::new();
    for l in &rec.rlimits {
        let item = format!("rlimit {}", l.resource);
        let Some(res) = rlimit_resource(&l.resource) else {
            report.not_applied(item, "unknown resource in this kernel");
            continue;
        };
        let soft = l.soft.unwrap_or(libc::RLIM_INFINITY);
        let hard = l.hard.unwrap_or(libc::RLIM_INFINITY);
        let cur_hard = match sys::getrlimit_hard(res) {
            Ok(h) => h,
            Err(e) => {
                report.not_applied(item, e.to_string());
                continue;
            }
        };
        if !root && hard > cur_hard {
            report.not_applied(
                item,
                format!("hard limit {hard} exceeds ours ({cur_hard}) and we are not root"),
            );
            continue;
        }
        if soft > hard {
            report.not_applied(item, format!("soft limit {soft} exceeds hard limit {hard}"));
            continue;
        }
        rlimits.push((res, soft, hard));
        report.applied(item);
    }

    let ours = self_affinity();
    let usable: Vec<u32> = rec
        .affinity
        .iter()
        .copied()
        .filter(|c| ours.is_empty() || ours.contains(c))
        .collect();
    let affinity = if rec.affinity.is_empty() {
        None
    } else if usable.is_empty() {
        report.not_applied(
            format!("affinity {}", crate::procfs::format_cpu_list(&rec.affinity)),
            "none of these CPUs is available to this kernel instance",
        );
        None
    } else {
        if usable.len() == rec.affinity.len() {
            report.applied(format!(
                "affinity {}",
                crate::procfs::format_cpu_list(&usable)
            ));
        } else {
            report.not_applied(
                format!("affinity {}", crate::procfs::format_cpu_list(&rec.affinity)),
                format!(
                    "narrowed to {}: other CPUs are not available",
                    crate::procfs::format_cpu_list(&usable)
                ),
            );
        }
        Some(sys::cpu_set(&usable).map_err(|e| StateError::Invalid(e.to_string()))?)
    };

    let sched = match rec.sched.policy {
        SchedPolicy::Other => None,
        SchedPolicy::Fifo | SchedPolicy::RoundRobin if !root => {
            report.not_applied("real-time scheduling policy", "requires root");
            None
        }
        p @ (SchedPolicy::Fifo
        | SchedPolicy::RoundRobin
        | SchedPolicy::Batch
        | SchedPolicy::Idle) => {
            report.applied(format!("scheduling policy {p:?}"));
            Some((p.raw() as i32, rec.sched.rt_priority as i32))
        }
        p => {
            report.not_applied(
                format!("scheduling policy {p:?}"),
                "not restorable with sched_setscheduler",
            );
            None
        }
    };

    let cur_nice = sys::own_nice();
    let nice = if rec.sched.nice < cur_nice && !root {
        report.not_applied(
            format!("nice {}", rec.sched.nice),
            format!("lower than ours ({cur_nice}) and we are not root"),
        );
        None
    } else {
        report.applied(format!("nice {}", rec.sched.nice));
        Some(rec.sched.nice)
    };

    let c = &rec.creds;
    let current = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let creds = if !opts.set_credentials || (c.uid, c.gid) == current && c.groups.is_empty() {
        None
    } else if root {
        report.applied(format!("uid {} gid {} groups {:?}", c.uid, c.gid, c.groups));
        Some((c.groups.clone(), c.gid, c.uid))
    } else if (c.uid, c.gid) != current {
        report.not_applied(
            format!("uid {} gid {}", c.uid, c.gid),
            "changing credentials requires root",
        );
        None
    } else {
        None
    };

    let cgroup_procs = match &opts.cgroup_root {
        None => None,
        Some(cg_root) => prepare_cgroup(cg_root, rec, report),
    };

    Ok(Prepared {
        rlimits,
        affinity,
        sched,
        nice,
        creds,
        cgroup_procs,
    })
}

fn prepare_cgroup(cg_root: &Path, rec: &TaskRecord, report: &mut Report) -> Option<fs::File> {
    let rel = rec.cgroup.path.trim_start_matches('/');
    let dir = cg_root.join(rel);
    let item = format!("cgroup {}", rec.cgroup.path);
    if rel.is_empty() {
        report.not_applied(item, "the record has no cgroup v2 path (root cgroup)");
        return None;
    }
    if let Err(e) = fs::create_dir_all(&dir) {
        report.not_applied(item, format!("mkdir {}: {e}", dir.display()));
        return None;
    }
    for (file, val) in [
        ("cpu.max", &rec.cgroup.cpu_max),
        ("memory.max", &rec.cgroup.memory_max),
        ("cpuset.cpus", &rec.cgroup.cpuset_cpus),
    ] {
        let Some(val) = val else { continue };
        let path = dir.join(file);
        let item = format!("{} {file}={val}", rec.cgroup.path);
        if !path.exists() {
            report.not_applied(item, "controller not enabled in this cgroup");
            continue;
        }
        match fs::write(&path, val) {
            Ok(()) => report.applied(item),
            Err(e) => report.not_applied(item, format!("{}: {e}", path.display())),
        }
    }
    let procs = dir.join("cgroup.procs");
    match fs::OpenOptions::new().write(true).open(&procs) {
        Ok(f) => {
            report.applied(item);
            Some(f)
        }
        Err(e) => {
            report.not_applied(item, format!("{}: {e}", procs.display()));
            None
        }
    }
}

/// Starts `record` again with `fds` at 3, 4, ... (or per `opts.placement`), named in
/// `MK_STATE_FDS`.
///
/// Under [`Policy::Strict`] nothing is started when any item cannot be applied.
pub fn spawn(
    record: &TaskRecord,
    fds: Vec<(String, OwnedFd)>,
    mut opts: SpawnOptions,
) -> Result<Spawned> {
    let mut report = Report::default();
    let targets: Vec<RawFd> = match &opts.placement {
        FdPlacement::Contiguous => (0..fds.len()).map(|i| FIRST_FD + i as RawFd).collect(),
        FdPlacement::Explicit(t) if t.len() == fds.len() => t.clone(),
        FdPlacement::Explicit(t) => {
            return Err(StateError::Invalid(format!(
                "{} descriptor number(s) given for {} descriptor(s)",
                t.len(),
                fds.len()
            )));
        }
    };
    let named: Vec<NamedFd> = fds
        .iter()
        .zip(&targets)
        .map(|((name, _), fd)| NamedFd {
            name: name.clone(),
            fd: *fd,
        })
        .collect();
    let env_value = fdenv::format(&named).map_err(|e| StateError::Invalid(e.to_string()))?;
    let Some(argv0) = record.cmdline.first() else {
        return Err(StateError::Invalid(format!(
            "task {} has an empty cmdline",
            record.pid
        )));
    };
    let exe = match record.exe.strip_suffix(" (deleted)") {
        Some(e) => {
            report.not_applied(
                format!("exe {}", record.exe),
                format!("the binary was replaced; starting the current {e}"),
            );
            e.to_owned()
        }
        None => record.exe.clone(),
    };
    let cwd = if Path::new(&record.cwd).is_dir() {
        PathBuf::from(&record.cwd)
    } else {
        report.not_applied(
            format!("cwd {}", record.cwd),
            "no such directory; starting in /",
        );
        PathBuf::from("/")
    };

    for e in &record.environ {
        if !e.contains('=') || e.starts_with('=') {
            report.not_applied(format!("environment entry {e:?}"), "not KEY=VALUE; dropped");
        }
    }
    let mut prepared = prepare(record, &opts, &mut report)?;
    report = report.finish(opts.policy)?;

    // Move every source above the highest target so no dup2 in the child clobbers another.
    let above = targets.iter().copied().max().unwrap_or(FIRST_FD - 1) + 1;
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|(_, fd)| sys::dup_at_least(fd.as_fd(), above))
        .collect::<std::io::Result<_>>()
        .map_err(|e| StateError::Sys {
            call: "fcntl(F_DUPFD_CLOEXEC)",
            source: e,
        })?;
    let moves: Vec<(RawFd, RawFd)> = high
        .iter()
        .zip(&targets)
        .map(|(fd, t)| (fd.as_raw_fd(), *t))
        .collect();

    let mut cmd = Command::new(&exe);
    cmd.arg0(argv0).args(&record.cmdline[1..]).env_clear();
    for e in &record.environ {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() && k != fdenv::ENV_VAR => {
                cmd.env(k, v);
            }
            // Malformed entries were reported above; a stale MK_STATE_FDS is replaced.
            _ => {}
        }
    }
    cmd.env(fdenv::ENV_VAR, &env_value).current_dir(&cwd);
    if let Some(s) = opts.stdin.take() {
        cmd.stdin(s);
    }
    if let Some(s) = opts.stdout.take() {
        cmd.stdout(s);
    }
    if let Some(s) = opts.stderr.take() {
        cmd.stderr(s);
    }
    // Runs in the forked child before exec: only system calls over data prepared here.
    // `high` and `prepared` (owners of the raw descriptors below) outlive the spawn.
    sys::set_child_setup(
        &mut cmd,
        sys::ChildSetup {
            cgroup_procs: prepared.cgroup_procs.as_ref().map(AsRawFd::as_raw_fd),
            cloexec_from: FIRST_FD,
            moves,
            rlimits: std::mem::take(&mut prepared.rlimits),
            affinity: prepared.affinity,
            sched: prepared.sched,
            nice: prepared.nice,
            creds: prepared.creds.take(),
        },
    );
    let child = cmd.spawn().map_err(|e| StateError::Io {
        path: PathBuf::from(OsString::from_vec(exe.clone().into_bytes())),
        source: std::io::Error::new(
            e.kind(),
            format!(
                "starting task {} ({}) failed in exec or in pre-exec setup (fds, cgroup, rlimits, affinity, scheduling, credentials): {e}",
                record.pid, record.comm
            ),
        ),
    })?;
    drop(high);
    drop(prepared);
    Ok(Spawned {
        child,
        fds: named,
        report,
    })
}
